"""The results folder: every file a sweep leaves behind, written atomically.

Layout (DESIGN §5)::

    OUTPUT/entropy_lr_experiment_YYYY-MM-DD_HH-MM-SS/
        raw_results.json            all records, sorted by (learning_rate, repeat)
        lr_<η>_run_<r>/result.json  one record each (the source of truth on resume)
        run_meta.json               checkpoint, effective config, environment
        config.yaml                 the effective config
        eval_batch.json             token ids and response mask of the evaluation batch E
        analysis.json, *.png        written by entropy_lab.report

Every write goes to a temporary file in the same folder followed by ``os.replace``, so
a crash (or a second process reading) never sees half a file.  A record is written to
its own ``result.json`` first and then merged into ``raw_results.json``; if the run
dies between the two, :meth:`ResultsFolder.records` still finds it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from entropy_lab.jsonio import eta_label, json_safe
from entropy_lab.records import PointRecord

__all__ = [
    "ResultsFolder",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "environment_info",
    "eta_label",
    "json_safe",
    "new_results_dir",
    "run_dir_name",
]

RAW_RESULTS = "raw_results.json"
RUN_META = "run_meta.json"
CONFIG = "config.yaml"
EVAL_BATCH = "eval_batch.json"
RESULT = "result.json"
_RUN_DIR = re.compile(r"^lr_(?P<eta>.+)_run_(?P<repeat>\d+)$")


# --------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_folder(target.parent)  # the rename itself survives a power cut
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory handles: best effort
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """The one JSON encoding used for every file of the folder (deterministic)."""
    return json.dumps(json_safe(obj), indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON (non-finite floats become null) atomically."""
    return atomic_write_text(path, dumps_json(obj))


# --------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------


def run_dir_name(eta: float, repeat: int) -> str:
    return f"lr_{eta_label(eta)}_run_{int(repeat)}"


def new_results_dir(
    output_dir: str | os.PathLike[str],
    now: _dt.datetime | None = None,
    prefix: str = "entropy_lr_experiment",
) -> Path:
    """Create ``OUTPUT/<prefix>_YYYY-MM-DD_HH-MM-SS`` (``_2``, ``_3`` … if taken)."""
    root = Path(output_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    stamp = (now or _dt.datetime.now()).strftime("%Y-%m-%d_%H-%M-%S")
    base = f"{prefix}_{stamp}"
    for attempt in range(1, 10_000):
        path = root / (base if attempt == 1 else f"{base}_{attempt}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"could not create a fresh results folder under {root}")


# --------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------


def _pair(record: Mapping[str, Any]) -> tuple[float, int]:
    return float(record["learning_rate"]), int(record["repeat"])


class ResultsFolder:
    """Read and write one results folder."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"ResultsFolder({str(self.path)!r})"

    # -- records ------------------------------------------------------------------------

    def record_path(self, eta: float, repeat: int) -> Path:
        return self.path / run_dir_name(eta, repeat) / RESULT

    def write_record(self, record: Mapping[str, Any] | PointRecord) -> Path:
        """Store one (η, repeat) record; a later record of the same pair replaces it."""
        if isinstance(record, PointRecord):
            record = record.to_dict()
        eta, repeat = _pair(record)
        path = atomic_write_json(self.record_path(eta, repeat), record)
        by_pair = {_pair(r): r for r in self.records()}
        by_pair[(eta, repeat)] = json_safe(record)
        self._write_raw(by_pair.values())
        return path

    def _write_raw(self, records: Any) -> None:
        ordered = sorted(records, key=_pair)
        atomic_write_json(self.path / RAW_RESULTS, ordered)

    def _run_records(self) -> list[dict[str, Any]]:
        out = []
        if not self.path.is_dir():
            return out
        for sub in sorted(self.path.iterdir()):
            if sub.is_dir() and _RUN_DIR.match(sub.name) and (sub / RESULT).is_file():
                out.append(json.loads((sub / RESULT).read_text(encoding="utf-8")))
        return out

    def records(self) -> list[dict[str, Any]]:
        """Every stored record, sorted by (learning_rate, repeat).

        The per-run ``result.json`` files are written first, so they win over
        ``raw_results.json`` (which may lag after a crash between the two writes, or be
        missing); records found only in ``raw_results.json`` are kept too.
        """
        raw = self.path / RAW_RESULTS
        by_pair: dict[tuple[float, int], dict[str, Any]] = {}
        if raw.is_file():
            for r in json.loads(raw.read_text(encoding="utf-8")):
                by_pair[_pair(r)] = r
        for r in self._run_records():
            by_pair[_pair(r)] = r
        return [by_pair[k] for k in sorted(by_pair)]

    def done_pairs(self) -> set[tuple[float, int]]:
        """(η, repeat) pairs already measured successfully: skip them on --resume."""
        return {_pair(r) for r in self.records() if PointRecord.from_dict(r).measured}

    # -- run description ----------------------------------------------------------------

    def write_config(self, effective: Mapping[str, Any]) -> Path:
        text = yaml.safe_dump(json_safe(effective), sort_keys=False, allow_unicode=True)
        return atomic_write_text(self.path / CONFIG, text)

    def read_config(self) -> dict[str, Any]:
        return yaml.safe_load((self.path / CONFIG).read_text(encoding="utf-8")) or {}

    def write_eval_batch(self, batch: Mapping[str, Any]) -> Path:
        """The evaluation batch E: ``input_ids``, ``attention_mask``, ``response_mask``,
        ``prompt_index``, ``responses`` (lists; tensors are converted)."""
        missing = {"input_ids", "response_mask"} - set(batch)
        if missing:
            raise ValueError(f"eval batch lacks {sorted(missing)}")
        # compact: tens of thousands of token ids, one per line with indent, is just bulk
        text = json.dumps(json_safe(batch), separators=(",", ":"), allow_nan=False) + "\n"
        return atomic_write_text(self.path / EVAL_BATCH, text)

    def read_eval_batch(self) -> dict[str, Any]:
        return json.loads((self.path / EVAL_BATCH).read_text(encoding="utf-8"))

    def write_meta(self, meta: Mapping[str, Any]) -> Path:
        """``run_meta.json``: {checkpoint, config, environment, …} — enough for ``report``
        to rebuild the analysis without the checkpoint."""
        return atomic_write_json(self.path / RUN_META, meta)

    def read_meta(self) -> dict[str, Any]:
        """``run_meta.json``, or {} when the folder has none."""
        path = self.path / RUN_META
        if not path.is_file():
            return {}
        return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_info(device: str, dtype: str, precision: Mapping[str, Any]) -> dict[str, Any]:
    """Versions, platform, device and precision flags, for ``run_meta.json``."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    for package in ("torch", "transformers", "peft", "numpy", "scipy"):
        info[package] = _version(package)
    info["entropy_lab"] = _version("entropy-lab")
    info["device"] = str(device)
    info["dtype"] = str(dtype)
    if str(device).startswith("cuda"):
        import torch

        info["cuda"] = torch.version.cuda
        try:
            info["cuda_device_name"] = torch.cuda.get_device_name(torch.device(device))
        except (RuntimeError, AssertionError) as exc:  # no driver / wrong index
            info["cuda_device_name"] = f"unavailable ({exc})"
    info.update(json_safe(dict(precision)))  # tf32_matmul, tf32_cudnn, float32_matmul_precision
    return info


def run_meta(setup: Any, device: str, dtype: str, thresholds: Mapping[str, Any]) -> dict[str, Any]:
    """``run_meta.json``: the checkpoint, the effective config, where every training-setup
    setting came from, the environment with the precision flags as measured at load, and the
    thresholds the analysis applies. One builder for the CLI and the pytest plugin, so both
    write the same analysis.json for the same run."""
    metadata = setup.checkpoint.metadata
    precision = {k: metadata[k] for k in ("tf32_matmul", "tf32_cudnn") if k in metadata}
    forecast = getattr(setup, "memory_forecast", None)
    return {
        "checkpoint": metadata,
        "config": setup.cfg.effective(),
        "setup_sources": dict(setup.training.sources),
        "setup_not_used": list(setup.training.not_used),
        "setup_notes": list(setup.training.notes),
        "environment": environment_info(device, dtype, precision),
        "thresholds": dict(thresholds),
        # The peak predicted before sampling (entropy_lab.memory), None where not forecast.
        "memory_forecast": forecast.to_dict() if forecast is not None else None,
    }
