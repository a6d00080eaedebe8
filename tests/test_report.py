"""Tests for entropy_lab.store and entropy_lab.report on synthetic records (no model)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from entropy_lab import report, stats
from entropy_lab.store import (
    ResultsFolder,
    atomic_write_json,
    atomic_write_text,
    environment_info,
    eta_label,
    new_results_dir,
    run_dir_name,
)

pytestmark = pytest.mark.cpu

GRID = [1e-8, 1e-7, 1e-6, 1e-5, 1e-4]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_records(
    *,
    etas: list[float] = GRID,
    repeats: int = 4,
    slope: float = -50.0,
    curvature: float = -5e3,
    rel_noise: float = 1e-4,
    noisy_etas: tuple[float, ...] = (),
    fail: tuple[tuple[float, int], ...] = (),
    entropy_before: float = 2.0,
    seed: int = 0,
) -> list[dict]:
    """Records shaped like protocol.measure_point's, from ΔH = s_r·η + c·η²/2 + noise.

    Each repeat r has its own direction, so its own slope s_r (spread 5 %); the
    mirrored reading ΔH(−η) is consistent with the same law unless η is in
    ``noisy_etas``, where both readings get rounding-like noise of the size of ΔH.
    """
    rng = np.random.default_rng(seed)
    out = []
    for r in range(repeats):
        s_r = slope * (1 + 0.05 * rng.standard_normal())
        c_r = curvature * (1 + 0.05 * rng.standard_normal())
        for eta in etas:
            base = {
                "learning_rate": eta,
                "repeat": r,
                "seed": 1000 * (r + 1),
                "reading": "policy",
                "dtype": "fp64",
                "entropy_before": entropy_before,
                "first_order_slope": s_r,
                "first_order_prediction": eta * s_r,
                "first_order_slope_conditional": s_r * 1.01,
                "curvature": c_r,
                "second_order_prediction": eta * s_r + 0.5 * eta**2 * c_r,
                "update_norm": 3.0,
                "grad_norm": 1.5,
                "mean_reward": 0.4,
                "duration_s": 0.1,
                "direction_seconds": 1.0,
            }
            if (eta, r) in fail:
                out.append({**base, "success": False, "error": "RuntimeError: CUDA OOM"})
                continue
            true = s_r * eta + 0.5 * c_r * eta**2
            mirror = -s_r * eta + 0.5 * c_r * eta**2
            if eta in noisy_etas:
                change = true + abs(true) * rng.standard_normal()
                negative = mirror + abs(true) * rng.standard_normal()
            else:
                change = true * (1 + rel_noise * rng.standard_normal())
                negative = mirror + abs(true) * rel_noise * rng.standard_normal()
            out.append(
                {
                    **base,
                    "success": True,
                    "entropy_after": entropy_before + change,
                    "entropy_change": change,
                    "entropy_change_conditional": change * 1.01,
                    "entropy_change_policy": change,
                    "entropy_change_negative": negative,
                    "ess": 63.5,
                    "quantized_fraction": 0.0,
                }
            )
    return out


def synthetic_meta(dtype: str = "fp64") -> dict:
    return {
        "checkpoint": {"path": "/ckpt/step_100", "format": "rl_practice", "digest": "sha256:ab"},
        "config": {"dtype": dtype, "reading": "policy", "learning_rates": GRID, "num_repeats": 4},
        "environment": {"python": "3.x", "device": "cpu", "dtype": dtype},
    }


def make_folder(path: Path, records: list[dict], meta: dict | None = None) -> ResultsFolder:
    folder = ResultsFolder(path)
    folder.write_meta(meta or synthetic_meta())
    for record in records:
        folder.write_record(record)
    return folder


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """One written report on linear data with a failed run, shared by the file tests."""
    path = tmp_path_factory.mktemp("results")
    records = synthetic_records(fail=((1e-6, 2),))
    folder = make_folder(path, records)
    analysis = report.write_report(path)
    return folder, analysis


# ---- store ---------------------------------------------------------------------------


def test_atomic_writes_leave_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "one")
    atomic_write_text(tmp_path / "a.txt", "two")
    atomic_write_json(tmp_path / "b.json", {"x": float("nan"), "y": [1.0, float("inf")]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json"]
    assert (tmp_path / "a.txt").read_text() == "two"
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": None, "y": [1.0, None]}


def test_atomic_write_cleans_up_on_failure(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "bad.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_eta_label_is_collision_free_and_readable():
    assert eta_label(1e-05) == "1e-05"
    assert eta_label(1.28e-05) == "1.28e-05"
    assert run_dir_name(1e-05, 0) != run_dir_name(1.28e-05, 0)
    etas = [1e-8, 1e-7, 1e-6, 1e-5, 1.28e-5, 1.2800001e-5, 3e-4, 1e-4]
    labels = [eta_label(e) for e in etas]
    assert len(set(labels)) == len(etas)
    assert all(float(lbl) == e for lbl, e in zip(labels, etas))


def test_new_results_dir_is_fresh(tmp_path):
    import datetime

    now = datetime.datetime(2025, 3, 4, 5, 6, 7)
    first = new_results_dir(tmp_path, now=now)
    second = new_results_dir(tmp_path, now=now)
    assert first.name == "entropy_lr_experiment_2025-03-04_05-06-07"
    assert second.name == "entropy_lr_experiment_2025-03-04_05-06-07_2"
    assert first.is_dir() and second.is_dir()


def test_results_folder_round_trip_and_resume(tmp_path):
    records = synthetic_records(etas=[1e-5, 1.28e-5], repeats=2, fail=((1.28e-5, 1),))
    folder = make_folder(tmp_path, list(reversed(records)))
    assert folder.records() == sorted(records, key=lambda r: (r["learning_rate"], r["repeat"]))
    assert folder.done_pairs() == {(1e-5, 0), (1e-5, 1), (1.28e-5, 0)}
    assert (tmp_path / "lr_1.28e-05_run_1" / "result.json").is_file()

    # a retried pair replaces the earlier record
    retry = {**records[-1], "success": True, "entropy_change": -1e-4}
    retry.pop("error")
    folder.write_record(retry)
    assert len(folder.records()) == 4
    assert (1.28e-5, 1) in folder.done_pairs()

    # raw_results.json lost (or a crash before it was rewritten): rebuilt from run folders
    (tmp_path / "raw_results.json").unlink()
    assert len(ResultsFolder(tmp_path).records()) == 4
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_results_folder_meta_config_eval_batch(tmp_path):
    folder = ResultsFolder(tmp_path)
    assert folder.read_meta() == {}
    env = environment_info("cpu", "fp64", {"tf32_matmul": False, "tf32_cudnn": False})
    assert env["device"] == "cpu" and env["tf32_matmul"] is False
    assert {"python", "torch", "transformers", "peft", "numpy", "scipy", "platform"} <= set(env)
    folder.write_meta(
        {"checkpoint": {"path": "x"}, "config": {"dtype": "fp64"}, "environment": env}
    )
    assert folder.read_meta()["environment"] == json.loads(json.dumps(env))
    folder.write_config({"dtype": "fp64", "learning_rates": (1e-6, 1e-5), "temperature": 1.0})
    assert folder.read_config()["learning_rates"] == [1e-6, 1e-5]
    batch = {
        "input_ids": np.array([[1, 2, 3]]),
        "attention_mask": [[1, 1, 1]],
        "response_mask": [[0, 1, 1]],
        "prompt_index": [0],
        "responses": ["42"],
    }
    folder.write_eval_batch(batch)
    assert folder.read_eval_batch()["input_ids"] == [[1, 2, 3]]


# ---- analysis ------------------------------------------------------------------------


def test_linear_data_is_linear():
    analysis = report.build_analysis(synthetic_records(), synthetic_meta())
    s = analysis["summary"]
    assert s["verdict"] == "linear", s["verdict_reason"]
    assert s["first_order_slope"]["n"] == 4
    assert s["checks"]["first_order"]["passed"] is True
    assert math.isclose(s["slope"], s["first_order_slope"]["mean"], rel_tol=0.01)
    assert s["r_squared"] > 0.99 and s["lack_of_fit"]["p_value"] is not None
    deciding = {name for name, c in s["checks"].items() if c["decides"]}
    deciding_names = {"resolvable_points", "r_squared", "nonlinearity", "first_order"}
    assert deciding == deciding_names | {"rl_signal"}  # rl_signal: not applicable here
    reported = {f"pooled_{n}" if n == "r_squared" else n for n in stats.CHECK_NAMES}
    assert set(s["checks"]) == deciding | reported
    assert s["linear_regime"]["eta_min"] == 1e-8
    assert s["linear_regime"]["eta_max"] == 1e-4  # measured: never beyond the grid
    assert s["linear_regime"]["eta_max_predicted"] > 1e-4
    assert list(analysis["per_learning_rate"]) == ["1e-08", "1e-07", "1e-06", "1e-05", "0.0001"]
    row = analysis["per_learning_rate"]["1e-05"]
    assert row["resolvable"] and row["in_window"] and row["n_samples"] == 4
    assert len(row["repeats"]) == 4 and row["status"] == "within"
    assert analysis["schema_version"] == 3
    assert analysis["thresholds"]["linearity"]["r2_min"] == 0.95
    json.dumps(analysis, allow_nan=False)


def test_curved_data_is_nonlinear_and_beyond_eta_max_points_are_fitted():
    records = synthetic_records(curvature=-2e6)  # η_max ≈ 2.5e-6
    s_all = report.build_analysis(records, synthetic_meta())
    s = s_all["summary"]
    assert s["verdict"] == "nonlinear", s["verdict_reason"]
    assert s["linear_regime"]["eta_max"] < 1e-5
    big = s_all["per_learning_rate"]["0.0001"]
    assert big["resolvable"] and big["status"] == "beyond" and not big["in_window"]
    assert 1e-4 in s["fitted_learning_rates"]
    # The small-η calibration is still right: curvature is no failed first order.
    assert s["checks"]["first_order"]["passed"] is True


def test_noisy_symmetric_small_eta_is_unresolvable_and_excluded():
    records = synthetic_records(noisy_etas=(1e-8,))
    analysis = report.build_analysis(records, synthetic_meta())
    row = analysis["per_learning_rate"]["1e-08"]
    assert row["resolvable"] is False
    assert any("ΔH(−η)" in reason for reason in row["unresolvable_reasons"])
    assert row["symmetric_residual"] > 0.02
    assert row["standardized_residual"] is None
    s = analysis["summary"]
    assert 1e-8 not in s["fitted_learning_rates"] and len(s["fitted_learning_rates"]) == 4
    assert s["linear_regime"]["eta_min"] == 1e-7
    assert s["verdict"] == "linear", s["verdict_reason"]


def test_failed_records_are_counted(reported):
    _, typed = reported
    analysis = typed.to_dict()
    s = analysis["summary"]
    assert s["n_failed"] == 1
    assert s["failures"] == [
        {"learning_rate": 1e-6, "repeat": 2, "error": "RuntimeError: CUDA OOM"}
    ]
    assert analysis["per_learning_rate"]["1e-06"]["n_samples"] == 3
    assert analysis["per_learning_rate"]["1e-06"]["n_failed"] == 1


def test_record_order_does_not_matter():
    records = synthetic_records()
    a = report.build_analysis(records, synthetic_meta())
    b = report.build_analysis(list(reversed(records)), synthetic_meta())
    assert json.dumps(a) == json.dumps(b)


# ---- files ---------------------------------------------------------------------------


def _no_plots(monkeypatch):
    """Plots are tested on the shared folder; skip re-rendering them elsewhere (speed)."""
    monkeypatch.setattr(report, "plot_summary", lambda analysis, path: Path(path))
    monkeypatch.setattr(report, "plot_raw_measurements", lambda records, analysis, path: Path(path))


def test_write_report_is_byte_identical(reported, monkeypatch):
    folder, _ = reported
    first = (folder.path / "analysis.json").read_bytes()
    _no_plots(monkeypatch)
    report.write_report(folder.path)
    assert (folder.path / "analysis.json").read_bytes() == first
    assert b"NaN" not in first and b"Infinity" not in first


def test_plots_are_png_files(reported):
    folder, _ = reported
    for name in (report.MAIN_PLOT, report.RAW_PLOT):
        data = (folder.path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    leftovers = [p.name for p in folder.path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_format_tables(reported):
    _, analysis = reported
    text = report.format_tables(analysis)
    assert "LINEARITY ANALYSIS" in text and "DETAILED RESULTS" in text
    assert "VERDICT: LINEAR" in text
    assert "failed run: η = 1e-06, repeat 2" in text
    for label in analysis.to_dict()["per_learning_rate"]:
        assert any(line.strip().startswith(label) for line in text.splitlines())
    # analysis.json's content (the pytest plugin's path) prints the same tables
    assert report.format_tables(analysis.to_dict()) == text


def test_analysis_json_reads_back_to_the_same_file(reported):
    """from_dict(to_dict(a)).to_dict() == to_dict(a), and the typed objects come back."""
    from entropy_lab.analysis import Analysis

    _, analysis = reported
    d = json.loads(json.dumps(analysis.to_dict(), allow_nan=False))
    back = Analysis.from_dict(d)
    assert json.dumps(back.to_dict()) == json.dumps(d)
    assert back.point(1e-5) == analysis.point(1e-5)
    assert back.repeats[0].measured_jet == analysis.repeats[0].measured_jet
    assert back.window == analysis.window and back.facts.failures == analysis.facts.failures
    assert back.records == [] and analysis.records  # analysis.json holds no records
    with pytest.raises(ValueError, match="schema"):
        Analysis.from_dict({**d, "schema_version": 2})


def test_report_on_unresolvable_and_mixed_sign_data(tmp_path):
    """Plots must not crash on unresolvable points, sign changes or a single η."""
    records = synthetic_records(noisy_etas=(1e-8, 1e-7), curvature=3e7)
    make_folder(tmp_path, records, synthetic_meta("fp32"))
    analysis = report.write_report(tmp_path)
    assert (tmp_path / report.MAIN_PLOT).read_bytes().startswith(PNG_MAGIC)
    assert analysis.verdict in {"nonlinear", "inconclusive"}
    assert analysis.window.note.startswith("empty")
    report.format_tables(analysis)

    only = tmp_path / "single"
    make_folder(only, synthetic_records(etas=[1e-5], repeats=2))
    single = report.write_report(only)
    assert single.verdict == "inconclusive"
    assert "N/A" in report.format_tables(single)


def test_write_report_needs_records(tmp_path):
    with pytest.raises(FileNotFoundError, match="no records"):
        report.write_report(tmp_path)


def test_folder_copied_without_meta_still_reports(tmp_path, monkeypatch):
    """The records say their dtype: the same verdict and window without run_meta.json."""
    _no_plots(monkeypatch)
    folder = make_folder(tmp_path, synthetic_records(repeats=3))
    full = report.write_report(folder.path).to_dict()
    os.remove(tmp_path / "run_meta.json")
    analysis = report.write_report(folder.path).to_dict()
    assert analysis["config"] == {} and analysis["summary"]["verdict"] == "linear"
    assert analysis["per_learning_rate"] == full["per_learning_rate"]


def test_measured_nonlinearity_caps_the_window_where_the_second_order_misses():
    """Planted third-order bend: ΔH/η is 20 % off at η = 1e-4 while c predicts 0.5 %."""
    grid = [1e-7, 1e-6, 1e-5, 1e-4]
    records = synthetic_records(etas=grid, curvature=-5e3)
    plain = report.build_analysis(records, synthetic_meta())
    assert plain["summary"]["linear_regime"]["eta_max"] == 1e-4
    assert all(row["in_window"] for row in plain["per_learning_rate"].values())
    bent = []
    for r in records:
        if r["learning_rate"] == 1e-4:
            r = {**r, "entropy_change": r["entropy_change"] * 0.8}
            r["entropy_change_negative"] = -r["entropy_change"] + 1e-8 * r["curvature"]
        bent.append(r)
    analysis = report.build_analysis(bent, synthetic_meta())
    regime = analysis["summary"]["linear_regime"]
    row = analysis["per_learning_rate"]["0.0001"]
    assert regime["eta_max"] == 1e-5, regime
    assert regime["eta_max_predicted"] > 5e-4  # the jet's edge, reported, not the window
    assert "beyond the largest grid point" in regime["predicted_edge"]
    assert row["resolvable"] and row["status"] == "beyond" and not row["in_window"]
    assert row["nonlinearity_mean_abs"] == pytest.approx(0.2, abs=0.01)
    assert abs(row["predicted_nonlinearity"]) < 0.01
    assert analysis["summary"]["verdict"] == "nonlinear"


def test_oracle_ratios_pair_each_repeat_with_its_own_jvp():
    """The identity missing in one repeat must not shift the others onto the wrong jvp."""
    records = [
        {**r, "identity_slope": r["first_order_slope_conditional"]} if r["repeat"] else r
        for r in synthetic_records()
    ]
    oracles = report.build_analysis(records, synthetic_meta())["summary"]["first_order_oracles"]
    assert oracles["identity"]["n"] == 3 and oracles["jvp_conditional"]["n"] == 4
    assert oracles["identity"]["ratio_to_jvp"] == pytest.approx(1.0, abs=1e-12)
