"""The CLI end to end on the tiny checkpoint: quick → results folder → report elsewhere."""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from entropy_lab import cli, protocol
from entropy_lab.errors import EntropyLabError

pytestmark = [pytest.mark.cpu, pytest.mark.xdist_group("cli")]  # quick_run built once

SMALL = ["--eval-size", "32", "--buffer-size", "8", "--num-repeats", "2", "--no-progress"]
ROOT = Path(__file__).resolve().parents[1]


SCRIPT = ROOT / "scripts" / "quick_entropy_lr_test.py"


@pytest.fixture(scope="module")
def script_run(tiny_checkpoint, tmp_path_factory) -> tuple[Path, str]:
    """The original quick script run as ``__main__`` (its legacy space-separated η), in this
    process: the quick run the artefact tests read. Returns its results folder and stdout."""
    out = tmp_path_factory.mktemp("quick")
    argv = [str(SCRIPT), "--learning-rates", "1e-7", "1e-6", "1e-5", "--output-dir", str(out)]
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(sys, "argv", [*argv, "--threads", "1", *SMALL])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(SCRIPT), run_name="__main__")
    assert done.value.code == 0
    (folder,) = out.glob("entropy_lr_experiment_*")
    return folder, printed.getvalue()


@pytest.fixture(scope="module")
def quick_run(script_run) -> Path:
    return script_run[0]


def test_results_folder_has_every_artefact(quick_run):
    names = {p.name for p in quick_run.iterdir()}
    for expected in (
        "raw_results.json",
        "analysis.json",
        "config.yaml",
        "run_meta.json",
        "entropy_vs_learning_rate.png",
        "raw_measurements.png",
    ):
        assert expected in names, names
    assert any(n.startswith("eval_batch.") for n in names)
    runs = sorted(p.parent.name for p in quick_run.glob("lr_*_run_*/result.json"))
    assert len(runs) == 6 and "lr_1e-07_run_0" in runs
    raw = json.loads((quick_run / "raw_results.json").read_text())
    fields = {
        "learning_rate",
        "repeat",
        "seed",
        "success",
        "entropy_before",
        "entropy_after",
        "entropy_change",
        "first_order_prediction",
        "ess",
        "quantized_fraction",
        "update_norm",
        "duration_s",
    }
    assert all(fields <= set(r) for r in raw)
    config = yaml.safe_load((quick_run / "config.yaml").read_text())
    assert config["learning_rates"] == [1e-7, 1e-6, 1e-5] and config["dtype"] == "fp64"
    meta = json.loads((quick_run / "run_meta.json").read_text())
    assert meta["thresholds"]["linearity"]["r2_min"] == 0.95
    costs = meta["costs"]  # seconds and evaluations of E per phase of this run
    assert costs["score E at θ₀"]["evals_of_E"] == 1.0 and costs["score E at θ₀"]["calls"] == 1
    assert costs["sample U"]["calls"] == 2 and costs["step + score E at +η"]["calls"] == 6
    assert {"sample E", "gradient", "update vector", "jvp to order 1"} <= set(costs)
    assert config["jet"] == 1  # the default: ∇H·v by jvp, c and ∇³H from the ±η pairs
    assert all(r["curvature"] is None and r["entropy_change_negative"] for r in raw)
    assert all(row["seconds"] > 0 for row in costs.values())
    forecast = meta["memory_forecast"]  # the peak predicted before sampling
    assert forecast["peak_bytes"] > 0 and forecast["peak_phase"] in forecast["phases_bytes"]


def test_report_elsewhere_reproduces_analysis_exactly(quick_run, tmp_path, capsys):
    """`report` on a copy (no checkpoint needed) rewrites analysis.json byte for byte."""
    copy = tmp_path / "copied"
    shutil.copytree(quick_run, copy)
    (copy / "analysis.json").unlink()
    assert cli.main(["report", str(copy)]) == 0
    assert (copy / "analysis.json").read_bytes() == (quick_run / "analysis.json").read_bytes()
    printed = capsys.readouterr().out
    assert "LINEARITY ANALYSIS" in printed and "DETAILED RESULTS" in printed


def test_report_applies_the_stored_thresholds(quick_run, tmp_path):
    """A planted threshold change in run_meta.json changes the report: it is really read."""
    copy = tmp_path / "strict"
    shutil.copytree(quick_run, copy)
    meta = json.loads((copy / "run_meta.json").read_text())
    meta["thresholds"]["linearity"]["r2_min"] = 0.999999999
    (copy / "run_meta.json").write_text(json.dumps(meta))
    assert cli.main(["report", str(copy)]) == 0
    analysis = json.loads((copy / "analysis.json").read_text())
    assert analysis["summary"]["checks"]["r_squared"]["threshold"] == 0.999999999
    assert analysis["summary"]["checks"]["r_squared"]["passed"] is False


def test_setup_table_folder_and_threads_come_before_e_is_sampled(
    tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    """configure → the setup table, the results folder → prepare (the slow part): when E's
    sampling starts, the table is printed, the folder is open, the CPU threads are the
    flag's and the config is the flags'; a run refused there leaves no empty folder."""
    import torch

    out = tmp_path / "out"
    seen = {}

    def refuse(configured, forecast=None):
        seen["forecast"] = forecast  # checked before the folder, handed on to prepare
        seen["folders"] = list(out.glob("entropy_lr_experiment_*"))
        seen["printed"] = capsys.readouterr().out
        seen["threads"] = torch.get_num_threads()
        seen["cfg"] = configured.cfg
        raise EntropyLabError("refused before sampling")

    monkeypatch.setattr(protocol, "prepare", refuse)
    argv = ["sweep", "--checkpoint", str(tiny_checkpoint), "--output-dir", str(out), *SMALL]
    try:
        rc = cli.main([*argv, "--threads", "2", "--reading", "conditional", "--jet", "2"])
    finally:
        torch.set_num_threads(1)
    assert rc == 2 and "refused before sampling" in capsys.readouterr().err
    assert len(seen["folders"]) == 1 and seen["printed"].startswith("TRAINING SETUP")
    assert "MEMORY FORECAST" in seen["printed"] and seen["forecast"].peak > 0
    assert seen["threads"] == 2
    cfg = seen["cfg"]
    assert (cfg.reading, cfg.jet, cfg.eval_size, cfg.buffer_size) == ("conditional", 2, 32, 8)
    assert not list(out.glob("entropy_lr_experiment_*"))


def test_the_jet_flag_and_the_older_flags_that_capped_it():
    parser = cli.build_parser()

    def jet(*flags):
        return cli.jet_of(parser.parse_args(["sweep", "--checkpoint", "x", *flags]))

    assert jet() == 1 and jet("--jet", "3") == 3 and jet("--jet", "2") == 2
    assert jet("--jet", "3", "--no-third-order") == 2 and jet("--jet", "3", "--no-curvature") == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["sweep", "--checkpoint", "x", "--jet", "4"])
    from entropy_lab.config import ExperimentConfig
    from entropy_lab.errors import ConfigError

    with pytest.raises(ConfigError, match="--jet must be 1, 2 or 3"):
        ExperimentConfig(learning_rates=[1e-6], jet=0)


def test_legacy_flags_are_translated(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "main", lambda argv: seen.append(argv) or 0)
    argv = ["--learning_rates", "1e-8", "1e-7", "--num_repeats", "3", "--output_dir=a_b"]
    assert cli.legacy_main("sweep", argv) == 0
    assert seen == [
        ["sweep", "--learning-rates", "1e-8,1e-7", "--num-repeats", "3", "--output-dir=a_b"]
    ]


def test_original_quick_script_runs(script_run):
    folder, stdout = script_run
    assert "LINEARITY ANALYSIS" in stdout
    assert len(list(folder.glob("lr_*_run_*/result.json"))) == 6  # 3 η × 2 repeats


def test_make_tiny_seed_zero_is_seed_zero(monkeypatch, tmp_path, capsys):
    """``make-tiny --seed 0`` builds with seed 0 (it once became the default 1234)."""
    import entropy_lab.tiny as tiny

    seeds = []

    def fake_build(folder, seed, verbose):
        seeds.append(seed)
        return {
            "rl_greedy_accuracy": 0.0,
            "trainable_parameters": 1,
            "total_parameters": 1,
            "build_seconds": 0.0,
            "digest": "0" * 16,
        }

    monkeypatch.setattr(tiny, "build_tiny_checkpoint", fake_build)
    assert cli.main(["make-tiny", str(tmp_path), "--seed", "0"]) == 0
    assert cli.main(["make-tiny", str(tmp_path)]) == 0
    assert seeds == [0, tiny.TINY_SEED]
