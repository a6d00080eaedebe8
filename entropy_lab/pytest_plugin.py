"""The pytest face of entropy_lab: options, markers, shared measurements, JSON report.

Registered from the root conftest.py. Measurements are computed once per η per pytest run,
even under pytest-xdist: a file lock per η in a store shared by all workers (under the
run's base temp dir), keyed by checkpoint digest and measurement settings. Any test still
runs alone: it measures what it needs on demand.

``--checkpoint=RUN`` with a run folder (what ``entropy-lab track`` accepts: an RL_Practice run
or its ``training_state/``, a TRL ``output_dir``) parametrizes the suite per checkpoint
(``test_linear_window_covers_grid[step_10]``), one store per checkpoint. The tests read the
analysis as the typed ``Analysis`` and the records as ``PointRecord``; dicts only at files.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from entropy_lab.errors import EntropyLabError

GPU_DEFAULT_GRID = "1e-8,1e-7,1e-6,1e-5,1e-4"
CPU_DEFAULT_GRID = "1e-8,1e-7,1e-6,1e-5"  # inside the tiny model's faithful-fp64 window
CPU_EVAL_SIZE = 256
JSON_SCHEMA_VERSION = 2  # 2: ``checkpoints``, one entry per checkpoint of a run folder
CHECKPOINT_PROPERTY = "checkpoint"  # the JUnit property naming a run's checkpoint
CHECKPOINT_FILE = "run_checkpoint.json"  # in a store folder: which checkpoint of the run


def pytest_addoption(parser: pytest.Parser) -> None:
    from entropy_lab.config import JET_OPTION

    g = parser.getgroup("entropy_lab", "entropy-lab linearity suite")
    g.addoption("--checkpoint", default=None, help="checkpoint folder (gpu suite: required)")
    g.addoption("--base-config", default=None, help="training YAML (default: checkpoint's)")
    g.addoption("--base-model", default=None, help="base model folder for an adapter")
    g.addoption("--learning-rates", default=None, help="comma-separated η grid")
    g.addoption("--num-repeats", type=int, default=None, help="repeats per η")
    g.addoption("--device", default=None, help="cpu / cuda; gpu suite with cpu runs on the CPU")
    g.addoption(
        "--dtype",
        default=None,
        choices=["fp32", "fp64", "bf16"],
        help="default: fp64 for the built-in tiny checkpoint, else fp32 (as the CLI)",
    )
    g.addoption("--eval-size", type=int, default=None, help="evaluation prompts B_E")
    g.addoption("--r2-min", type=float, default=0.95, help="R² threshold (default 0.95)")
    g.addoption("--jet", **JET_OPTION)
    g.addoption("--entropy-json", default=None, help="write the JSON report to PATH")
    _add_setting_options(g)
    g.addoption("--reference-model", default=None, help="KL reference of a full fine-tune")


def _add_setting_options(group) -> None:
    """One option per training-setup setting, from the same declaration as the sweep's flags
    (config.SETTINGS): ``--prompts=``, ``--reward=``, ``--loss-type=`` …"""
    from entropy_lab.config import SETTINGS

    for setting in SETTINGS:
        group.addoption(
            setting.flag,
            dest=f"entropy_{setting.name}",
            default=None,
            help=f"{setting.help} (default: the checkpoint's training config)",
        )


def setting_options(config: pytest.Config) -> dict[str, Any]:
    from entropy_lab.config import SETTING_NAMES

    return {name: config.getoption(f"entropy_{name}") for name in SETTING_NAMES}


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _pins_gpus(config: pytest.Config) -> bool:
    """An xdist worker of this plugin's gpu suite on CUDA. Only with --checkpoint: another
    project's workers keep the GPUs they were given (and import no torch for this plugin)."""
    on_cuda = config.getoption("--device") in (None, "cuda")
    return _is_worker(config) and on_cuda and bool(config.getoption("--checkpoint"))


def pytest_configure(config: pytest.Config) -> None:
    if _pins_gpus(config):
        _pin_worker_gpu(config.workerinput["workerid"])  # type: ignore[attr-defined]
    session = EntropySession(config)
    config.stash[SESSION] = session
    config.pluginmanager.register(session, "entropy_lab_session")
    if not _is_worker(config):
        _check_options(config)


def worker_gpu(worker: str, visible: str | None, gpu_count: int) -> str | None:
    """The CUDA_VISIBLE_DEVICES entry for xdist worker gwK: the (K mod n)-th visible GPU.

    ``visible`` is the inherited CUDA_VISIBLE_DEVICES (None: unset, all ``gpu_count`` GPUs);
    None means leave the environment alone (no GPU, or not an xdist worker id).
    """
    if not worker.startswith("gw") or not worker[2:].isdigit():
        return None
    if visible is None:
        devices = [str(i) for i in range(gpu_count)]
    else:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
    return devices[int(worker[2:]) % len(devices)] if devices else None


def _pin_worker_gpu(worker: str) -> None:
    """Pin this xdist worker to one GPU, before anything initialises CUDA in the process.

    The CUDA driver reads CUDA_VISIBLE_DEVICES once, at its initialisation: so the count
    comes from ``torch.cuda.device_count()``, which asks NVML and initialises nothing, and
    never from ``torch.cuda.is_available()``, which initialises the driver (cuInit).
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = 0
    if visible is None:
        try:
            import torch

            count = torch.cuda.device_count()
        except Exception:  # a CPU build, or no driver: nothing to pin
            count = 0
    device = worker_gpu(worker, visible, count)
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device


def _check_checkpoint_spelling(config: pytest.Config) -> None:
    """``--checkpoint DIR`` (a space) reaches pytest's rootdir search before this plugin's
    options exist: DIR is taken for a test path, pytest.ini is lost (markers, strictness).
    Refuse it with the fix rather than run a suite configured from the wrong folder."""
    checkpoint = config.getoption("--checkpoint")
    if not checkpoint:
        return
    # Harmful only when pytest then found no ini file (a checkpoint inside the repo is fine).
    spaced = "--checkpoint" in (str(a) for a in config.invocation_params.args)
    if spaced and config.inipath is None:
        raise pytest.UsageError(
            f"write --checkpoint={checkpoint} (with '='): with a space pytest reads the folder "
            "as a test path before entropy_lab's options are known, and loses pytest.ini"
        )


def _check_options(config: pytest.Config) -> None:
    """Bad suite options stop the run up front with the CLI's one-line message (exit code 4),
    instead of one traceback per test."""
    from entropy_lab.config import (
        check_num_repeats,
        check_setting,
        parse_learning_rates,
        read_yaml_mapping,
    )

    _check_checkpoint_spelling(config)
    try:
        if config.getoption("--learning-rates") is not None:
            parse_learning_rates(config.getoption("--learning-rates"))
        if config.getoption("--num-repeats") is not None:
            check_num_repeats(config.getoption("--num-repeats"))
        if config.getoption("--base-config"):
            read_yaml_mapping(config.getoption("--base-config"))
        for name, value in setting_options(config).items():
            if value is not None:
                check_setting(name, value)
        if config.getoption("--checkpoint"):
            from entropy_lab.checkpoint import resolve_layout

            resolve_layout(config.getoption("--checkpoint"))
            run_of(config.getoption("--checkpoint"))  # a run's steps and their order
    except EntropyLabError as exc:
        raise pytest.UsageError(str(exc)) from None


def run_of(checkpoint: str | None) -> list[Any] | None:
    """The checkpoints of a run folder in training order (``track.run_checkpoints``, as
    ``entropy-lab track`` reads RUN); None for one checkpoint (a folder with optimizer.pt,
    ``step_latest`` included) or none given: the suite is then not parametrized by it."""
    if not checkpoint or (Path(checkpoint).expanduser() / "optimizer.pt").exists():
        return None
    from entropy_lab.track import run_checkpoints

    return run_checkpoints([checkpoint]).checkpoints


def _fail_cleanly_on_user_errors(method):
    """A checkpoint or config problem found while measuring fails the test with the CLI's
    one-line message, not a traceback."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except EntropyLabError as exc:
            message = f"entropy-lab: error: {exc}"
        pytest.fail(message, pytrace=False)  # outside `except`: no chained traceback

    return wrapper


# -- suite settings -------------------------------------------------------------------------


@dataclass(frozen=True)
class SuiteSettings:
    kind: str  # "cpu" or "gpu"
    checkpoint: str
    base_config: str | None
    base_model: str | None
    learning_rates: list[float]
    num_repeats: int
    device: str
    dtype: str
    eval_size: int | None
    r2_min: float
    setup_flags: tuple[tuple[str, str], ...] = ()  # the training-setup options given
    reference_model: str | None = None
    buffer_size: int | None = None  # the spread fixture's setting; None: the checkpoint's
    variant: str = "default"
    jet: int = 1  # derivatives along v by jvp (--jet)


def suite_settings(config: pytest.Config, kind: str, variant: str = "default") -> SuiteSettings:
    """Defaults per marker; skips (with a reason a person can act on) decided here only."""
    from entropy_lab.config import parse_learning_rates

    checkpoint = config.getoption("--checkpoint")
    buffer_size = None
    if variant == "spread":
        if checkpoint:
            pytest.skip(
                "the spread fixture is the built-in tiny checkpoint with a small update "
                "buffer; with --checkpoint the suite runs on your checkpoint's directions"
            )
        from entropy_lab.tiny import SPREAD_BUFFER_SIZE

        buffer_size = SPREAD_BUFFER_SIZE
    device = config.getoption("--device")
    if kind == "gpu":
        if not checkpoint:
            pytest.skip("gpu suite needs --checkpoint DIR (your RL checkpoint folder)")
        if device is None:
            import torch

            if not torch.cuda.is_available():
                pytest.skip("gpu suite needs CUDA; add --device cpu to run its bodies on the CPU")
            device = "cuda"
        grid, repeats = GPU_DEFAULT_GRID, 5
    else:
        if not checkpoint:
            from entropy_lab.tiny import ensure_tiny_checkpoint

            checkpoint = str(ensure_tiny_checkpoint())
        device = device or "cpu"
        grid, repeats = CPU_DEFAULT_GRID, 3
    # The built-in checkpoint's measurement defaults (faithful fp64, B_E = 256) are quick's:
    # any other checkpoint gets the sweep's (fp32, B_E = 64), as on the command line.
    builtin = kind == "cpu" and not config.getoption("--checkpoint")
    etas = parse_learning_rates(config.getoption("--learning-rates") or grid)
    eval_size = config.getoption("--eval-size") or (CPU_EVAL_SIZE if builtin else None)
    return SuiteSettings(
        kind=kind,
        checkpoint=checkpoint,
        base_config=config.getoption("--base-config"),
        base_model=config.getoption("--base-model"),
        learning_rates=etas,
        num_repeats=config.getoption("--num-repeats") or repeats,
        device=device,
        dtype=config.getoption("--dtype") or ("fp64" if builtin else "fp32"),
        eval_size=eval_size,
        r2_min=config.getoption("--r2-min"),
        setup_flags=tuple((k, v) for k, v in setting_options(config).items() if v is not None),
        reference_model=config.getoption("--reference-model"),
        buffer_size=buffer_size,
        variant=variant,
        jet=config.getoption("--jet"),
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Only this plugin's own suites: another project's test (or fixture) named `eta` is theirs.
    suite = metafunc.cls is not None and issubclass(metafunc.cls, LinearitySuite)
    if suite and "entropy_checkpoint" in metafunc.fixturenames:
        run = metafunc.config.stash[SESSION].run()
        if run is not None:  # first, so ids read test_entropy_change[step_10-eta=1e-06]
            ids = [cp.label for cp in run]
            metafunc.parametrize("entropy_checkpoint", run, ids=ids, indirect=True)
    if suite and "eta" in metafunc.fixturenames:
        from entropy_lab.config import parse_learning_rates

        cls = metafunc.cls
        kind = getattr(cls, "suite_kind", "cpu")
        default = GPU_DEFAULT_GRID if kind == "gpu" else CPU_DEFAULT_GRID
        etas = parse_learning_rates(metafunc.config.getoption("--learning-rates") or default)
        metafunc.parametrize("eta", etas, ids=[f"eta={e!r}" for e in etas])


# -- shared measurement store -----------------------------------------------------------------


class MeasurementStore:
    """Per-η records on disk, measured once under a file lock, shared by xdist workers.

    ``run_checkpoint``: which checkpoint of a run folder this is (None: a single checkpoint);
    ``take_base``: asked for a loaded checkpoint whose base to reuse before this store loads
    its own (the session hands the previous checkpoint of the run on, as track does)."""

    def __init__(
        self,
        root: Path,
        settings: SuiteSettings,
        run_checkpoint: Any = None,
        take_base: Any = None,
    ) -> None:
        self.settings = settings
        self.root = root
        self.run_checkpoint = run_checkpoint
        self._take_base = take_base
        self._setup = None
        self._directions: dict[int, Any] = {}
        self._key_dir: Path | None = None
        self._digest: str | None = None
        self._analysis = None

    @property
    def digest(self) -> str:
        """The checkpoint's content digest, computed once (it hashes every file)."""
        if self._digest is None:
            from entropy_lab.checkpoint import checkpoint_digest, resolve_layout

            self._digest = checkpoint_digest(resolve_layout(self.settings.checkpoint))
        return self._digest

    # Lazy: loading the checkpoint only when something must really be measured.
    def _ensure_setup(self):
        if self._setup is None:
            from entropy_lab.config import Measurement
            from entropy_lab.protocol import open_experiment

            s = self.settings
            reuse = self._take_base(self) if self._take_base else None
            self._setup = open_experiment(
                s.checkpoint,
                s.learning_rates,
                measurement=Measurement(
                    num_repeats=s.num_repeats, eval_size=s.eval_size, jet=s.jet
                ),
                base_config=s.base_config,
                base_model=s.base_model,
                dtype=s.dtype,
                device=s.device,
                # The spread fixture's update buffer is a setting like a flag (the setup
                # table says so).
                settings=dict(s.setup_flags)
                | ({"buffer_size": s.buffer_size} if s.buffer_size else {}),
                reference_model=s.reference_model,
                reuse=reuse,
            )
            self._write_meta(self._setup)
        return self._setup

    def release(self) -> Any:
        """Drop this store's model (its records stay on disk) and return the loaded
        checkpoint, for the next checkpoint of the run to swap its adapter into."""
        loaded = self._setup.checkpoint if self._setup is not None else None
        self._setup = None
        self._directions.clear()
        return loaded

    @property
    def key_dir(self) -> Path:
        """One folder per (checkpoint digest, measurement settings), and per step of a run."""
        if self._key_dir is None:
            s = self.settings
            ident = {
                "digest": self.digest,
                "repeats": s.num_repeats,
                "device": s.device,
                "dtype": s.dtype,
                "eval_size": s.eval_size,
                "base_config": s.base_config,
                "base_model": s.base_model,
                "setup_flags": list(s.setup_flags),
                "reference_model": s.reference_model,
                "buffer_size": s.buffer_size,
                "jet": s.jet,
            }
            if self.run_checkpoint is not None:  # two saves of one content are two entries
                ident["run_checkpoint"] = [self.run_checkpoint.step, str(self.run_checkpoint.path)]
            key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
            self._key_dir = self.root / key
            self._key_dir.mkdir(parents=True, exist_ok=True)
            if self.run_checkpoint is not None:  # for the JSON report's per-checkpoint entries
                from entropy_lab.store import atomic_write_json

                cp = StoredCheckpoint(
                    self.run_checkpoint.step, str(self.run_checkpoint.path), self.digest
                )
                atomic_write_json(self._key_dir / CHECKPOINT_FILE, dataclasses.asdict(cp))
        return self._key_dir

    @_fail_cleanly_on_user_errors
    def records(self, eta: float) -> list[dict[str, Any]]:
        from filelock import FileLock

        from entropy_lab.store import atomic_write_json, eta_label

        path = self.key_dir / f"lr_{eta_label(eta)}.json"
        with FileLock(str(path) + ".lock"):
            if path.is_file():
                return json.loads(path.read_text())
            records = self._measure(eta)
            atomic_write_json(path, records)
            with open(self.key_dir / "measure_log.jsonl", "a") as log:
                log.write(json.dumps({"eta": eta, "pid": os.getpid(), "t": time.time()}) + "\n")
            return records

    def _measure(self, eta: float) -> list[dict[str, Any]]:
        from entropy_lab.protocol import direction_or_failure, measure_point

        setup = self._ensure_setup()
        out = []
        for repeat in range(self.settings.num_repeats):
            if repeat not in self._directions:  # a failed one fails every η of its repeat
                self._directions[repeat] = direction_or_failure(setup, repeat)
            out.append(measure_point(setup, self._directions[repeat], eta).to_dict())
        return out

    def point_records(self, eta: float) -> list[Any]:
        """``records(eta)`` read as PointRecords (the file's dicts end here)."""
        from entropy_lab.records import PointRecord

        return [PointRecord.from_dict(r) for r in self.records(eta)]

    def all_records(self) -> list[Any]:
        return [r for eta in self.settings.learning_rates for r in self.point_records(eta)]

    @_fail_cleanly_on_user_errors
    def meta(self) -> dict[str, Any]:
        """The CLI's run_meta.json for this measurement (store.run_meta), written by whichever
        worker opened the checkpoint: another worker reads it instead of opening it again."""
        path = self.key_dir / "run_meta.json"
        if not path.is_file():
            self._ensure_setup()
        return json.loads(path.read_text())

    def _write_meta(self, setup) -> None:
        from filelock import FileLock

        from entropy_lab.report import default_thresholds
        from entropy_lab.store import atomic_write_json, run_meta

        path = self.key_dir / "run_meta.json"
        with FileLock(str(path) + ".lock"):
            if not path.is_file():
                s = self.settings
                thresholds = default_thresholds(r2_min=s.r2_min)
                atomic_write_json(path, run_meta(setup, s.device, s.dtype, thresholds))

    def analysis(self):
        """The paired analysis of every η (measured on demand), also saved as JSON."""
        from entropy_lab.analysis import analyze
        from entropy_lab.report import thresholds_from_meta
        from entropy_lab.store import atomic_write_json

        if self._analysis is None:
            meta = self.meta()
            linearity, floor = thresholds_from_meta(meta)
            self._analysis = analyze(self.all_records(), meta, linearity, floor)
            atomic_write_json(self.key_dir / "analysis.json", self._analysis.to_dict())
        return self._analysis


class EntropySession:
    """The plugin's state for one pytest session (pytest-benchmark's BenchmarkSession is the
    model): the measurement stores, the JSON report's test entries, and where the stores
    live. Registered in pytest_configure, kept in ``config.stash``."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.stores: dict[tuple[str, str, str], MeasurementStore] = {}
        # (the run checkpoint's label or None, the test's entry): the JSON report's tests
        self.reports: list[tuple[str | None, dict[str, Any]]] = []
        self.roots: set[str] = set()  # store folders (xdist: reported back by each worker)
        self._run: list[Any] | None = None
        self._run_read = False
        self._live: MeasurementStore | None = None  # the run checkpoint whose model is loaded

    def run(self) -> list[Any] | None:
        """``--checkpoint``'s run checkpoints (``run_of``), read once per process."""
        if not self._run_read:
            self._run = run_of(self.config.getoption("--checkpoint"))
            self._run_read = True
        return self._run

    def store(
        self, request: pytest.FixtureRequest, base: Path, run_checkpoint: Any = None
    ) -> MeasurementStore:
        """The suite's store (one per checkpoint of a run); ``base`` is this process's
        basetemp (xdist workers share its parent, so each η is measured once across them)."""
        kind = getattr(request.cls, "suite_kind", "cpu")
        variant = getattr(request.cls, "suite_variant", "default")
        key = (kind, variant, str(run_checkpoint.path) if run_checkpoint is not None else "")
        if key not in self.stores:
            settings = suite_settings(self.config, kind, variant)
            root = (base.parent if _is_worker(self.config) else base) / "entropy_store"
            self.roots.add(str(root))
            if run_checkpoint is None:
                self.stores[key] = MeasurementStore(root, settings)
            else:
                settings = dataclasses.replace(settings, checkpoint=str(run_checkpoint.path))
                self.stores[key] = MeasurementStore(root, settings, run_checkpoint, self._hand_base)
        if kind == "gpu" or variant != "default":
            suite_settings(self.config, kind, variant)  # re-check skips for every test
        return self.stores[key]

    def _hand_base(self, store: MeasurementStore) -> Any:
        """One checkpoint of a run in memory per process: the one loaded before gives up its
        model, and the next swaps its adapter into that base where they share it (track's
        way; the swap is checked like a fresh load)."""
        previous, self._live = self._live, store
        return previous.release() if previous is not None and previous is not store else None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            label = next((v for k, v in report.user_properties if k == CHECKPOINT_PROPERTY), None)
            entry = {
                "nodeid": report.nodeid,
                "outcome": report.outcome,
                "duration_s": report.duration,
                "properties": {k: v for k, v in report.user_properties},
                "longrepr": str(report.longrepr)[:4000] if report.failed else None,
            }
            self.reports.append((label, entry))

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:  # xdist: a worker is done
        self.roots.update(getattr(node, "workeroutput", {}).get("entropy_store_roots", []))

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if _is_worker(self.config):
            self.config.workeroutput["entropy_store_roots"] = sorted(self.roots)  # type: ignore[attr-defined]
            return
        path = self.config.getoption("--entropy-json")
        if path:
            self.write_json(Path(path), int(exitstatus))

    def write_json(self, path: Path, exit_status: int) -> None:
        """The JSON report: every test; each analysis's summary and per-η blocks, those of a
        run's checkpoints in ``checkpoints`` (by step), each with its own tests."""
        from entropy_lab.store import atomic_write_json

        summaries: list[Any] = []
        per_eta: list[Any] = []
        checkpoints: list[tuple[int, str, dict[str, Any]]] = []
        for root in sorted(self.roots):
            for folder in sorted(p.parent for p in Path(root).glob("*/analysis.json")):
                summary, points = _report_blocks(json.loads((folder / "analysis.json").read_text()))
                cp = _read_run_checkpoint(folder)
                if cp is None:
                    summaries.append(summary)
                    per_eta.append(points)
                    continue
                label = _label(cp.step)
                entry = {
                    "label": label,
                    **dataclasses.asdict(cp),
                    "tests": [test for mine, test in self.reports if mine == label],
                    "analysis": summary,
                    "per_learning_rate": points,
                }
                checkpoints.append((cp.step, str(folder), entry))
        checkpoints.sort(key=_step_and_folder)
        atomic_write_json(
            path,
            {
                "schema_version": JSON_SCHEMA_VERSION,
                "exit_status": exit_status,
                "tests": [test for _, test in self.reports],
                "analysis": summaries,
                "per_learning_rate": per_eta,
                "checkpoints": [entry for _, _, entry in checkpoints],
            },
        )


@dataclass(frozen=True)
class StoredCheckpoint:
    """A store folder's checkpoint of a run (CHECKPOINT_FILE), for the JSON report."""

    step: int
    path: str
    digest: str


def _label(step: int) -> str:
    from entropy_lab.track import RunCheckpoint

    return RunCheckpoint(step, Path()).label


def _step_and_folder(item: tuple[int, str, dict[str, Any]]) -> tuple[int, str]:
    return item[0], item[1]


def _read_run_checkpoint(folder: Path) -> StoredCheckpoint | None:
    """CHECKPOINT_FILE read back (None: the store of a single checkpoint)."""
    from entropy_lab.jsonio import from_json

    path = folder / CHECKPOINT_FILE
    return from_json(StoredCheckpoint, json.loads(path.read_text())) if path.is_file() else None


def _report_blocks(analysis_json: dict[str, Any]) -> tuple[Any, Any]:
    """The JSON report's copy of one analysis.json: its summary and per-η blocks, as the
    file has them (the report's serialiser; the tests read the typed Analysis)."""
    return analysis_json["summary"], analysis_json["per_learning_rate"]


SESSION = pytest.StashKey[EntropySession]()


@pytest.fixture
def entropy_checkpoint(request: pytest.FixtureRequest, record_property) -> Any:
    """The checkpoint of the run this test measures (a ``track.RunCheckpoint``, parametrized
    when ``--checkpoint`` is a run folder, named in the test's JUnit properties); None for a
    single checkpoint."""
    cp = getattr(request, "param", None)
    if cp is not None:
        record_property(CHECKPOINT_PROPERTY, cp.label)
        record_property("checkpoint_step", int(cp.step))
    return cp


@pytest.fixture
def entropy_store(
    request: pytest.FixtureRequest, entropy_checkpoint: Any, tmp_path_factory
) -> MeasurementStore:
    base = tmp_path_factory.getbasetemp()
    return request.config.stash[SESSION].store(request, base, entropy_checkpoint)


# -- the suite's test bodies (subclassed per marker in tests/) ----------------------------------


def _builtin(value: Any) -> Any:
    """A JUnit property value xdist can send: bool, int, float, str or None (NaN → None)."""
    from entropy_lab.jsonio import json_safe

    value = json_safe(value)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    return float(value) if isinstance(value, float) else str(value)


def _versions() -> list[tuple[str, str]]:
    """The packages' versions in this process (the one that measured, or its xdist sibling
    in the same environment), as analysis.json's environment states them."""
    import importlib.metadata

    out = []
    for package in ("torch", "transformers", "peft"):
        try:
            out.append((package, importlib.metadata.version(package)))
        except importlib.metadata.PackageNotFoundError:
            out.append((package, "None"))
    return out


def _record_run_facts(record_property, store: MeasurementStore) -> Any:
    """The run's headline numbers as JUnit properties (built-in types only, for xdist);
    returns the typed Analysis."""
    a = store.analysis()
    fits, mixed, r2 = a.pooled.fits, a.mixed_model, a.repeat_r_squared
    for key, value in (
        ("verdict", a.verdict),
        ("eta_min", a.window.eta_min),
        ("eta_max", a.window.eta_max),
        ("r_squared_per_repeat_min", min(r2) if r2 else None),
        ("r_squared_per_repeat_median", statistics.median(r2) if r2 else None),
        ("mixed_slope", mixed.slope if mixed else None),
        ("mixed_slope_ci_low", mixed.slope_ci_low if mixed else None),
        ("mixed_slope_ci_high", mixed.slope_ci_high if mixed else None),
        # The seed's pooled statistics, reported (they do not decide: DESIGN §4).
        ("slope", fits.ols.slope if fits.ols else None),
        ("r_squared", fits.ols.r_squared if fits.ols else None),
        ("lack_of_fit_p", fits.lack_of_fit.p_value if fits.lack_of_fit else None),
        ("loglog_slope", fits.loglog.slope if fits.loglog else None),
        ("checkpoint_digest", store.digest),
    ):
        record_property(key, _builtin(value))
    for key, value in (*_versions(), ("device", store.settings.device)):
        record_property(key, str(value))
    record_property("dtype", str(store.settings.dtype))
    return a


class LinearitySuite:
    """Per-η tests (pass exactly for the η inside the measured window), then the paired
    aggregate tests that decide the verdict (DESIGN §4)."""

    suite_kind = "cpu"
    suite_variant = "default"

    def test_entropy_change(self, eta: float, entropy_store: MeasurementStore, record_property):
        from entropy_lab.stats import mean_stderr

        records = entropy_store.point_records(eta)
        ok = [r for r in records if r.success]
        errors = [r.error for r in records if not r.success]
        assert ok, f"every repeat at η={eta!r} failed: {errors}"
        changes = mean_stderr([r.entropy_change for r in ok])
        record_property("learning_rate", float(eta))
        record_property("n_samples", changes.n)
        record_property("mean_entropy_change", changes.mean)
        record_property("std_entropy_change", changes.std)
        record_property("stderr_entropy_change", changes.stderr)
        fo = mean_stderr([r.first_order_prediction or math.nan for r in ok])
        if fo.n == len(ok):
            record_property("first_order_prediction", fo.mean)
        analysis = entropy_store.analysis()
        point = analysis.point(eta)
        record_property("resolvable", bool(point.resolvable))
        record_property("status", point.status)
        record_property("nonlinearity_bound", point.nonlinearity_bound)
        if not point.resolvable:
            pytest.xfail(f"η={eta!r} unresolvable: " + "; ".join(point.reasons))
        if not point.in_window:
            from entropy_lab.report import format_tables

            w = analysis.window
            pytest.fail(
                f"η={eta!r} is outside the linear window [{w.eta_min}, {w.eta_max}]: {point.status} "
                f"(mean |n_r| {_percent(point.nonlinearity_mean_abs)}, upper bound "
                f"{_percent(point.nonlinearity_bound)}, tolerance {w.tolerance:.0%})\n\n"
                f"{format_tables(analysis)}",
                pytrace=False,
            )

    def _check(self, name: str, store: MeasurementStore, record_property) -> None:
        from entropy_lab.report import format_tables

        analysis = _record_run_facts(record_property, store)
        check = analysis.checks[name]
        record_property(f"{name}_value", _builtin(check.value))
        record_property(f"{name}_threshold", str(check.threshold))
        if check.passed is not True:
            state = "inconclusive" if check.passed is None else "failed"
            pytest.fail(
                f"{name} {state}: {check.detail}\n\n{format_tables(analysis)}", pytrace=False
            )

    def test_r_squared(self, entropy_store, record_property):
        """Each update direction's own line: min and median R² > r2_min."""
        self._check("r_squared", entropy_store, record_property)

    def test_nonlinearity_within_tolerance(self, entropy_store, record_property):
        """ΔH_r/η bends by at most the tolerance at every resolvable η (paired bound)."""
        self._check("nonlinearity", entropy_store, record_property)

    def test_slope_matches_first_order(self, entropy_store, record_property):
        """Each repeat's ΔH/η at its smallest resolvable η equals its own ∇H·v."""
        self._check("first_order", entropy_store, record_property)

    def test_linear_window_covers_grid(self, entropy_store, record_property):
        """The verdict: LINEAR over the tested grid."""
        from entropy_lab.jsonio import eta_label
        from entropy_lab.report import format_tables

        analysis = _record_run_facts(record_property, entropy_store)
        if analysis.verdict != "linear":
            outside = [
                f"η={eta_label(p.learning_rate)}: {p.status}"
                + (f" ({'; '.join(p.reasons)})" if not p.resolvable else "")
                for p in analysis.per_eta
                if not p.in_window
            ]
            pytest.fail(
                f"verdict {analysis.verdict.upper()}: {analysis.verdict_reason}\n  "
                + "\n  ".join(outside)
                + f"\n\n{format_tables(analysis)}",
                pytrace=False,
            )


def _percent(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.2%}"
