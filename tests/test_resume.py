"""Durability: every finished (η, repeat) is on disk before the next one starts; an interrupted
sweep (Ctrl-C or SIGKILL) resumes without recomputing finished points and ends with the same
analysis.json as an uninterrupted run; pytest-xdist workers share one store safely.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from entropy_lab import protocol
from entropy_lab.analysis import PointRecord
from entropy_lab.store import ResultsFolder

pytestmark = pytest.mark.cpu

ETAS = [1e-7, 1e-6, 1e-5]


# ----------------------------------------------------------------------------- write order


def _fake_sweep(monkeypatch, on_measure):
    """run_sweep with fake directions and points: fast, and lets a test look at the disk
    when each point starts."""
    directions = []

    def direction(setup, repeat):
        directions.append(repeat)
        return SimpleNamespace(repeat=repeat, seconds=0.0)

    def measure_point(setup, d, eta):
        on_measure(eta, d.repeat)
        return PointRecord(eta, d.repeat, success=True, entropy_change=eta)

    monkeypatch.setattr(protocol, "direction_or_failure", direction)
    monkeypatch.setattr(protocol, "measure_point", measure_point)
    setup = SimpleNamespace(cfg=SimpleNamespace(num_repeats=2, learning_rates=ETAS))
    return setup, directions


def _on_disk(folder: ResultsFolder) -> set[tuple[float, int]]:
    raw = folder.path / "raw_results.json"
    stored = json.loads(raw.read_text()) if raw.is_file() else []
    in_raw = {(r["learning_rate"], r["repeat"]) for r in stored}
    in_runs = {
        (float(r["learning_rate"]), int(r["repeat"]))
        for r in (json.loads(p.read_text()) for p in folder.path.glob("lr_*_run_*/result.json"))
    }
    assert in_raw == in_runs, "raw_results.json lags the per-run files"
    return in_runs


def _sweep_checking_disk(monkeypatch, tmp_path, on_record_for):
    folder = ResultsFolder(tmp_path / "run")
    finished: list[tuple[float, int]] = []

    def on_measure(eta, repeat):  # a point starts: every earlier one must be on disk
        if finished:
            assert _on_disk(folder) == set(finished), f"not on disk when ({eta}, {repeat}) began"

    setup, _ = _fake_sweep(monkeypatch, on_measure)

    def on_record(record):
        on_record_for(folder)(record)
        finished.append((record.learning_rate, record.repeat))

    protocol.run_sweep(setup, on_record=on_record, progress=False)
    return folder, finished


def test_each_point_is_on_disk_before_the_next_starts(monkeypatch, tmp_path):
    folder, finished = _sweep_checking_disk(monkeypatch, tmp_path, lambda f: f.write_record)
    assert len(finished) == 6 and _on_disk(folder) == set(finished)
    assert not list(folder.path.rglob("*.tmp")), "temporary files left behind"


def test_the_disk_check_catches_a_writer_that_lags(monkeypatch, tmp_path):
    """Planted: a writer that stores each record one point late must fail the check above."""
    pending = []

    def lagging(folder):
        def write(record):
            if pending:
                folder.write_record(pending.pop())
            pending.append(record)

        return write

    with pytest.raises(AssertionError, match=r"not on disk when \(1e-06, 0\) began"):
        _sweep_checking_disk(monkeypatch, tmp_path, lagging)


def test_resume_skips_finished_points_and_their_directions(monkeypatch):
    measured = []
    setup, directions = _fake_sweep(monkeypatch, lambda eta, r: measured.append((eta, r)))
    done = {(eta, 0) for eta in ETAS} | {(1e-7, 1)}
    records = protocol.run_sweep(setup, done=done, progress=False)
    assert measured == [(1e-6, 1), (1e-5, 1)]
    assert directions == [1]  # repeat 0 is finished: its direction is not recomputed
    assert [(r.learning_rate, r.repeat) for r in records] == measured


# ----------------------------------------------------------------------------- interruption

QUICK = [
    *("quick", "--no-progress", "--learning-rates", ",".join(map(repr, ETAS))),
    *("--num-repeats", "2", "--eval-size", "32", "--buffer-size", "8", "--threads", "1"),
]
# Fields that may differ between an interrupted-and-resumed sweep and an uninterrupted one:
# the wall-clock time each point and each direction took (raw records only). analysis.json
# holds no timestamps, durations or results-folder paths, so nothing in it is excluded.
TIMING_FIELDS = ("duration_s", "direction_seconds")


def _start(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "entropy_lab", *QUICK, "--output-dir", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _result_files(out: Path) -> list[Path]:
    return sorted(out.glob("*/lr_*_run_*/result.json"))


def _interrupt_after(proc: subprocess.Popen, out: Path, points: int, sig: int) -> None:
    """Send ``sig`` once at least ``points`` results are on disk."""
    deadline = time.monotonic() + 300
    while len(_result_files(out)) < points:
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended before {points} points: {_finish(proc)}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no results appeared within 300 s")
        time.sleep(0.02)
    proc.send_signal(sig)


def _records(folder: Path) -> list[dict]:
    rows = ResultsFolder(folder).records()
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def _analysis(folder: Path) -> dict:
    return json.loads((folder / "analysis.json").read_text())


def _rebuilt_analysis(folder: Path, edit=None) -> dict:
    """analysis.json rebuilt from the folder's records, after ``edit(records)``."""
    from entropy_lab.report import build_analysis, thresholds_from_meta

    results = ResultsFolder(folder)
    records = results.records()
    if edit is not None:
        edit(records)
    linearity, floor = thresholds_from_meta(results.read_meta())
    return build_analysis(records, results.read_meta(), linearity, floor)


def _one_ulp_smaller(records: list[dict]) -> None:
    records[-1]["entropy_change"] = math.nextafter(records[-1]["entropy_change"], 0.0)


@pytest.fixture(scope="module")
def uninterrupted(tiny_checkpoint, tmp_path_factory) -> Path:
    """The reference run, in this process: the interrupted runs are the subprocesses (real
    signals); this one would only add its imports and checkpoint load (~12 s of CPU)."""
    from entropy_lab.cli import main

    out = tmp_path_factory.mktemp("uninterrupted")
    assert main([*QUICK, "--output-dir", str(out)]) == 0
    (folder,) = out.iterdir()
    return folder


def test_ctrl_c_before_the_first_point_exits_130_with_a_resume_hint(
    tiny_checkpoint, tmp_path, capsys, monkeypatch
):
    """Planted: interrupted before any point finished, so there is nothing to analyse (the
    report would refuse an empty folder); still exit 130 and say how to resume."""
    from entropy_lab.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(protocol, "run_sweep", interrupted)
    small = ["--eval-size", "8", "--buffer-size", "4", "--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        main([*QUICK, *small])
    assert e.value.code == 130
    (folder,) = tmp_path.iterdir()
    assert capsys.readouterr().err.strip().splitlines() == [
        f"interrupted: no point had finished in {folder}",
        f"resume with: entropy-lab quick --resume {folder} (and the same other flags)",
    ]


@pytest.mark.slow
@pytest.mark.xdist_group("resume")  # `uninterrupted` built once
def _ctrl_c_here(argv: list[str], out: Path, points: int) -> int:
    """``main(argv)`` in this process, Ctrl-C'd once ``points`` results are on disk: a real
    SIGINT from a watcher thread, met by Python's own handler as in a terminal (this process's
    handler and mask are put back after). Returns the exit status."""
    from entropy_lab.cli import main

    target, stop = threading.main_thread().ident, threading.Event()

    def watch() -> None:
        while not stop.is_set() and len(_result_files(out)) < points:
            time.sleep(0.02)
        if not stop.is_set():
            signal.pthread_kill(target, signal.SIGINT)

    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        try:
            return main(argv)
        except SystemExit as exc:
            return exc.code
    finally:
        stop.set()
        watcher.join()
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGINT, handler)


@pytest.mark.slow
@pytest.mark.xdist_group("resume")  # `uninterrupted` built once
def test_interrupted_sweeps_resume_to_the_uninterrupted_result(uninterrupted, tmp_path, capsys):
    """Ctrl-C after the first point, resume, SIGKILL that run mid-way, resume to the end:
    the same records and the same analysis.json as one uninterrupted run. The SIGKILL'd run
    is a subprocess; the Ctrl-C (a real SIGINT) and the last resume run here (a subprocess
    would only add its imports and checkpoint load, ~10 s of CPU each)."""
    from entropy_lab.cli import main

    out = tmp_path / "out"
    capsys.readouterr()
    rc = _ctrl_c_here([*QUICK, "--output-dir", str(out)], out, 1)
    err = capsys.readouterr().err
    assert rc == 130, err
    (folder,) = out.iterdir()
    assert "Traceback" not in err
    assert f"interrupted: partial analysis written to {folder}" in err
    assert f"resume with: entropy-lab quick --resume {folder} (and the same other flags)" in err
    kept = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in _result_files(out)}
    assert 1 <= len(kept) < 6
    partial = _analysis(folder)
    assert partial["summary"]["n_records"] == len(kept)  # the partial analysis is up to date

    second = _start(out, "--resume", str(folder))
    _interrupt_after(second, out, len(kept) + 1, signal.SIGKILL)
    rc, _, err = _finish(second)
    assert rc == -signal.SIGKILL
    assert f"resuming {folder}: {len(kept)} finished points kept" in err
    after_kill = _result_files(out)
    assert len(kept) < len(after_kill) < 6, "SIGKILL should land mid-sweep"
    for p, (data, mtime) in kept.items():  # finished points are never recomputed
        assert (p.read_bytes(), p.stat().st_mtime_ns) == (data, mtime), p

    capsys.readouterr()
    rc = main([*QUICK, "--output-dir", str(out), "--resume", str(folder)])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert f"resuming {folder}: {len(after_kill)} finished points kept" in err
    assert "VERDICT" in stdout and "Traceback" not in err
    assert list(out.iterdir()) == [folder]  # resumed in place, no second results folder

    # Directions recomputed on resume are the original ones (same seed): bit-identical
    # records, apart from how long each took.
    assert _records(folder) == _records(uninterrupted)
    assert _analysis(folder) == _analysis(uninterrupted)
    # ... and the comparison is sharp: the stored analysis is what the records give, and one
    # record changed by one ulp gives a different one.
    assert _rebuilt_analysis(folder) == _analysis(uninterrupted)
    assert _rebuilt_analysis(folder, _one_ulp_smaller) != _analysis(uninterrupted)
    assert (folder / "eval_batch.json").read_bytes() == (
        uninterrupted / "eval_batch.json"
    ).read_bytes()


@pytest.mark.slow
@pytest.mark.xdist_group("resume")
def test_resume_refuses_a_different_evaluation_batch(uninterrupted, tmp_path, capsys):
    """Planted: E stored in the folder no longer matches the one the seed samples."""
    import shutil

    from entropy_lab.cli import main

    folder = tmp_path / uninterrupted.name
    shutil.copytree(uninterrupted, folder)
    batch = json.loads((folder / "eval_batch.json").read_text())
    batch["input_ids"][0][-1] += 1
    (folder / "eval_batch.json").write_text(json.dumps(batch))
    assert main([*QUICK, "--resume", str(folder)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"entropy-lab: error: --resume {folder}: the evaluation batch sampled now differs from "
        "the stored eval_batch.json (another torch/transformers version or device?); resume "
        "where the sweep started, or start a new sweep"
    ]


# ----------------------------------------------------------------------------- xdist store


def _worker(store, etas, out: Path) -> None:
    out.write_text(json.dumps([store.records(eta) for eta in etas]))


def _store_workers(tiny_checkpoint, tmp_path, monkeypatch):
    """Four forked processes ask one store for every η at once (two in reverse order), as
    xdist workers do. Returns the logged measurements and, per η, what each process read."""
    from entropy_lab.pytest_plugin import MeasurementStore, SuiteSettings

    def slow_measure(self, eta):
        time.sleep(0.2)  # a wide window for another process to measure or read too early
        return [{"learning_rate": eta, "repeat": r, "pid": os.getpid()} for r in range(2)]

    monkeypatch.setattr(MeasurementStore, "_measure", slow_measure)
    settings = SuiteSettings(
        *("cpu", str(tiny_checkpoint), None, None, ETAS, 2, "cpu", "fp64", 32, 0.95)
    )
    ctx = multiprocessing.get_context("fork")
    orders = [ETAS, ETAS[::-1], ETAS, ETAS[::-1]]
    outs = [tmp_path / f"out{i}.json" for i in range(len(orders))]
    store = MeasurementStore(tmp_path / "store", settings)
    procs = [ctx.Process(target=_worker, args=(store, o, out)) for o, out in zip(orders, outs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    (log,) = (tmp_path / "store").glob("*/measure_log.jsonl")
    logged = [json.loads(line)["eta"] for line in log.read_text().splitlines()]
    by_eta: dict[float, list] = {}
    for order, out in zip(orders, outs):
        for eta, records in zip(order, json.loads(out.read_text())):
            by_eta.setdefault(eta, []).append(records)
    assert not list((tmp_path / "store").rglob("*.tmp"))
    return logged, by_eta


def test_measurement_store_is_shared_safely_by_concurrent_processes(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """Each η is measured once, under its lock, and every process reads the same complete
    records. tests/test_suite_behaviour.py shows it with real xdist workers and real
    measurements; this one makes the race window wide on purpose."""
    logged, by_eta = _store_workers(tiny_checkpoint, tmp_path, monkeypatch)
    assert sorted(logged) == ETAS  # each η measured exactly once
    for eta, seen in by_eta.items():
        assert len(seen) == 4 and all(s == seen[0] for s in seen), eta


def test_the_store_check_catches_a_missing_lock(tiny_checkpoint, tmp_path, monkeypatch):
    """Planted: without the file lock the same η is measured by several processes."""
    import contextlib

    import filelock

    monkeypatch.setattr(filelock, "FileLock", lambda path: contextlib.nullcontext())
    logged, by_eta = _store_workers(tiny_checkpoint, tmp_path, monkeypatch)
    assert sorted(logged) != ETAS
    assert any(any(s != seen[0] for s in seen) for seen in by_eta.values())
