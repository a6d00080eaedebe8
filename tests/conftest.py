"""Shared fixtures: the tiny checkpoint (built once, cached) and loaded setups."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(1)  # tiny matmuls: one thread is faster, and xdist workers don't thrash

ROOT = Path(__file__).resolve().parents[1]


def _pin_tiny_cache() -> None:
    """pytester points HOME at its own folder, so a child pytest (or CLI) started from a test
    would look for the tiny checkpoint under that folder's ~/.cache and build it again (~33 s
    of CPU each time). Children inherit this process's cache folder instead."""
    from entropy_lab.tiny import default_cache_dir

    os.environ.setdefault("ENTROPY_LAB_CACHE", str(default_cache_dir()))


_pin_tiny_cache()


def write_project_settings(folder: Path) -> Path:
    """The project's pytest.ini and root conftest, copied into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("pytest.ini", "conftest.py"):
        (folder / name).write_text((ROOT / name).read_text())
    return folder


def write_suite(folder: Path) -> Path:
    """The linearity suite as a project of its own in ``folder``: tests/test_linearity.py with
    the project's pytest.ini and root conftest."""
    write_project_settings(folder)
    (folder / "test_linearity.py").write_text((ROOT / "tests" / "test_linearity.py").read_text())
    return folder


def run_suite(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """The linearity suite run in a child pytest in ``pytester``'s folder, with ``args`` (for
    runs that start processes of their own: ``-n 2``)."""
    write_suite(pytester.path)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)


def run_suite_here(folder: Path, *args: str) -> pytest.RunResult:
    """The linearity suite run by ``pytest.main`` in this process, in ``folder``, with ``args``.

    A child pytest would spend ~10 s of CPU importing torch, transformers and peft and loading
    the checkpoint. Not pytester's in-process run: its fixture drops at teardown every module
    imported while it was set up, and later tests then fail re-importing torch's or numpy's C
    extensions. Only the suite's own modules (files in ``folder``) are dropped here, and
    ``sys.path``, the working directory and the modules they replaced are put back.
    """
    write_suite(folder)
    if not any(a.startswith("--basetemp") for a in args):
        args = (*args, f"--basetemp={folder / 'basetemp'}")
    path, modules, cwd = list(sys.path), dict(sys.modules), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            ret = pytest.main(["-p", "no:cacheprovider", "-p", "no:faulthandler", *args])
    finally:
        os.chdir(cwd)
        sys.path[:] = path
        for name, module in list(sys.modules.items()):
            if str(getattr(module, "__file__", None) or "").startswith(str(folder)):
                del sys.modules[name]
        sys.modules.update({k: m for k, m in modules.items() if k not in sys.modules})
    lines = (out.getvalue().splitlines(), err.getvalue().splitlines())
    return pytest.RunResult(ret, *lines, time.perf_counter() - started)


@pytest.fixture(scope="session")
def tiny_checkpoint():
    from entropy_lab.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint()


def make_setup(path, dtype="fp32", eval_size=64, **settings):
    """``open_experiment`` with training-setup flags and measurement settings mixed, as tests
    write them (``buffer_size=8, first_order=False``)."""
    from entropy_lab.config import SETTING_NAMES, Measurement
    from entropy_lab.protocol import open_experiment

    flags = {k: settings.pop(k) for k in list(settings) if k in SETTING_NAMES}
    return open_experiment(
        path,
        [1e-6],
        measurement=Measurement(**{"num_repeats": 2, "eval_size": eval_size, **settings}),
        dtype=dtype,
        settings=flags,
    )


# The oracle tests hold the measurements against every jvp (--jet 3), not the default jet 1.
@pytest.fixture(scope="session")
def setup64(tiny_checkpoint):
    return make_setup(tiny_checkpoint, dtype="fp64", eval_size=128, jet=3)


@pytest.fixture(scope="session")
def setup32(tiny_checkpoint):
    return make_setup(tiny_checkpoint, dtype="fp32", eval_size=256, jet=3)


@pytest.fixture(scope="session")
def proxy_fp32():
    """(memory forecast, measured peaks) of every phase of a sweep on a random Qwen2 with
    V = 151,936 (hidden 64, 2 layers, LoRA r 8, fp32): E 2 rows, U 2 prompts × 4, 24 tokens
    (8 of prompt), 16-token chunks (memory.proxy_sweep_peaks)."""
    from entropy_lab.memory import proxy_sweep_peaks
    from entropy_lab.proxy import QWEN25_VOCAB, build_proxy, random_batch

    model = build_proxy(QWEN25_VOCAB, 64, 2, "fp32", rank=8)
    eval_batch = random_batch(QWEN25_VOCAB, 2, 24, 8, seed=1)
    update = random_batch(QWEN25_VOCAB, 2 * 4, 24, 8, seed=2)
    return proxy_sweep_peaks(model, eval_batch, update, 4, 16)
