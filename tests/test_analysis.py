"""The paired verdict (DESIGN §4) on planted records: every way the pooled analysis was
wrong on real checkpoints, whose update directions differ from batch to batch."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from entropy_lab.analysis import EPS, CheckKind, FloorThresholds, PointRecord, _verdict, analyze
from entropy_lab.report import build_analysis, write_report
from entropy_lab.stats import fit_random_slope, mean_stderr, upper_bound
from entropy_lab.store import ResultsFolder

pytestmark = pytest.mark.cpu

GRID = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4)


def planted(
    slopes,
    etas=GRID,
    kappa=0.0,
    bend=None,
    offset=0.0,
    dtype="fp64",
    h0=2.0,
    negative=True,
    jet=True,
):
    """Records of ΔH_r(η) = s_r·η·(1 + κη)·(1 + offset)·(1 + b_r(η)), with the fields a
    sweep writes. ``bend`` maps η to a relative bend (one value, or one per repeat); it is
    an odd one (ΔH(−η) = −ΔH(η)·(1 + b)), as odd orders of the Taylor series are, so the
    symmetric check reads it as curvature, not as noise."""
    out = []
    for r, s in enumerate(slopes):
        for eta in etas:
            b = (bend or {}).get(eta, 0.0)
            b = b[r] if isinstance(b, (list, tuple)) else b
            scale = (1 + offset) * (1 + b)
            record = dict(
                learning_rate=eta,
                repeat=r,
                seed=r,
                success=True,
                dtype=dtype,
                entropy_before=h0,
                entropy_change=s * eta * (1 + kappa * eta) * scale,
                quantized_fraction=0.0,
            )
            if negative:
                record["entropy_change_negative"] = -s * eta * (1 - kappa * eta) * scale
            if jet:
                record.update(
                    first_order_slope=s,
                    first_order_prediction=s * eta,
                    curvature=2 * s * kappa,
                    third_derivative=0.0,
                )
            out.append(record)
    return out


def spread(n, cv, seed=0, mixed=False):
    """n slopes around −2.7 with the given relative spread (some positive if ``mixed``)."""
    rng = np.random.default_rng(seed)
    s = -2.7 * (1 + cv * rng.uniform(-1, 1, n))
    if mixed:
        s[::2] *= -1
    return list(s)


# -- the cases under "Why" of issue 13, each one planted ---------------------------------------


def test_exactly_linear_directions_fifty_percent_apart_are_linear():
    """Pooled raw-point R² 0.81 said NONLINEAR; every repeat's ΔH/η is flat."""
    a = analyze(planted([-1.8, -2.7, -3.6, -2.2, -3.1]))
    assert a.checks["pooled_r_squared"].value < 0.95  # the seed's number, still reported
    assert a.verdict == "linear", a.verdict_reason
    assert a.checks["r_squared"].value > 1 - 1e-12
    assert (a.window.eta_min, a.window.eta_max) == (GRID[0], GRID[-1])


@pytest.mark.parametrize("cv", [0.03, 0.2, 0.5])
def test_a_twelve_percent_bend_at_the_top_is_caught_whatever_the_spread(cv):
    """The z tests on means caught it at 3 % spread (z = 7), missed it at 20 % (z = 0.95)."""
    a = analyze(planted(spread(5, cv), bend={1e-4: 0.12}))
    assert a.verdict == "nonlinear", a.verdict_reason
    assert a.point(1e-4).status == "beyond"
    assert a.point(1e-4).nonlinearity_mean_abs == pytest.approx(0.12, rel=1e-6)
    assert a.window.eta_max == 1e-5


def test_opposite_bends_in_different_repeats_do_not_cancel():
    """±30 % bends of opposite sign made the mean's relative residual 0 %."""
    a = analyze(planted([-2.0, -3.0, -2.5, -2.8], bend={1e-4: [0.3, -0.3, 0.3, -0.3]}))
    assert a.checks["relative_residual"].value < 0.1  # the pooled residual still misses it
    assert a.verdict == "nonlinear"
    assert a.point(1e-4).nonlinearity_mean_abs == pytest.approx(0.3, rel=1e-6)


def test_a_power_law_the_loglog_margin_admitted_is_nonlinear():
    """ΔH ∝ η^1.1 over four decades: ΔH/η changes 2.5-fold, inside the old 1 ± 0.1."""
    records = planted([-2.0, -2.6, -3.1])
    for r in records:
        r["entropy_change"] *= (r["learning_rate"] / 1e-8) ** 0.1
        r["entropy_change_negative"] *= (r["learning_rate"] / 1e-8) ** 0.1
    a = analyze(records)
    assert a.checks["loglog_slope"].passed is True  # reported, and misleading
    assert a.verdict == "nonlinear"
    assert a.window.eta_max == 1e-8  # 10^0.1 − 1 = 26 % at η = 1e-7 already


def test_a_measurement_off_its_own_oracle_fails_first_order():
    """1.3× its own ∇H·v at every η passed the combined-SE check in one case."""
    a = analyze(planted([-2.0, -2.9, -2.4], offset=0.3))
    assert a.checks["first_order"].passed is False
    assert a.checks["nonlinearity"].passed is True  # a constant offset is no bend
    assert a.verdict == "inconclusive"
    assert "first_order failed" in a.verdict_reason


def test_the_floor_is_per_repeat_not_on_the_mean_of_mixed_signs():
    """Directions of mixed sign put |mean ΔH| under eps×H at 4 of 5 η."""
    h0 = 2.0
    floor = 10 * EPS["fp32"] * h0  # 2.4e-6
    slopes = [16 * floor / 1e-8, -16 * floor / 1e-8, 15.5 * floor / 1e-8]
    records = planted(slopes, dtype="fp32", h0=h0)
    means = [
        abs(np.mean([r["entropy_change"] for r in records if r["learning_rate"] == e]))
        for e in GRID
    ]
    assert sum(m < floor * 1e8 * e / 1e-8 for m, e in zip(means, GRID)) >= 1  # the old trap
    a = analyze(records)
    assert all(p.resolvable for p in a.per_eta)
    assert a.verdict == "linear"


def test_the_window_never_holds_a_failing_point_and_is_contiguous():
    records = planted([-2.0, -2.5, -3.0], etas=GRID + (1e-3,), bend={1e-4: 0.2, 1e-3: 0.5})
    a = analyze(records)
    assert a.window.eta_max == 1e-5  # the old η_max was the first bent point itself
    assert not a.point(1e-4).in_window
    # An unresolvable point in the middle breaks the run: the window is the longer part.
    noisy = planted([-2.0, -2.5, -3.0], etas=(1e-9,) + GRID)
    for r in noisy:
        if r["learning_rate"] == 1e-7:
            r["entropy_change_negative"] += 0.05 * r["entropy_change"]  # 5 % forward noise
    b = analyze(noisy)
    assert not b.point(1e-7).resolvable
    assert (b.window.eta_min, b.window.eta_max) == (1e-6, 1e-4)
    assert b.verdict == "inconclusive" and "outside the window" in b.verdict_reason


def test_forward_noise_at_one_point_is_unresolvable_not_a_cap():
    """A noisy fp64 point was called "higher orders matter" and capped η_max there."""
    records = planted([-2.0, -2.5, -3.0], etas=(1e-10,) + GRID)
    for r in records:
        if r["learning_rate"] == 1e-10:
            r["entropy_change"] *= 1.03  # noise in ΔH(η) …
            r["entropy_change_negative"] *= 0.97  # … and, independently, in ΔH(−η)
    a = analyze(records)
    p = a.point(1e-10)
    assert not p.resolvable and "forward-pass noise" in " ".join(p.reasons)
    assert a.window.eta_max == 1e-4


def test_the_predicted_edge_is_reported_never_the_window():
    """quick printed [1e-7, 4.35e-4] having measured up to 1e-5."""
    a = analyze(planted([-2.0, -2.2, -2.4], etas=(1e-7, 1e-6, 1e-5), kappa=100.0))
    assert a.window.eta_max == 1e-5
    assert a.window.eta_max_predicted == pytest.approx(5e-4, rel=1e-9)
    assert "beyond the largest grid point" in a.window.predicted_edge
    b = analyze(planted([-2.0, -2.2, -2.4], kappa=1000.0))
    assert "between grid points 1e-05 and 0.0001" in b.window.predicted_edge


def test_parameter_rounding_is_seen_where_the_symmetric_check_is_blind():
    """Rounding errors of θ ± η·v are antisymmetric: ΔH(η) + ΔH(−η) cancels them."""
    records = planted([-2.0, -2.5, -3.0])
    for r in records:
        if r["learning_rate"] == 1e-8:
            r["entropy_change"] *= 1.04  # a rounded step moves ΔH by 4 % …
            r["entropy_change_negative"] *= 1.04  # … and antisymmetrically at −η
            r["rounding_effect"] = r["entropy_change"] * 0.04 / 1.04
        else:
            r["rounding_effect"] = r["entropy_change"] * 1e-6
    a = analyze(records)
    p = a.point(1e-8)
    assert all(q.symmetric_residual < 1e-12 for q in a.points if q.learning_rate == 1e-8)
    assert not p.resolvable and "parameter rounding" in " ".join(p.reasons)
    assert a.point(1e-7).resolvable
    assert a.verdict == "linear"  # over the resolvable grid 1e-7 … 1e-4


def test_a_point_with_changed_moe_routing_is_never_judged_on_the_jet():
    records = planted([-2.0, -2.5, -3.0])
    for r in records:
        r["routing_changed_fraction"] = 0.02 if r["learning_rate"] == 1e-4 else 0.0
    a = analyze(records)
    p = a.point(1e-4)
    assert not p.resolvable and not p.in_window
    assert "routing changed for 2.00%" in " ".join(p.reasons)
    assert a.point(1e-5).resolvable and a.window.eta_max == 1e-5


def test_without_an_oracle_each_repeat_is_its_own_reference():
    a = analyze(planted([-2.0, -3.0, -2.5], jet=False, negative=False))
    assert a.verdict == "linear" and a.checks["first_order"].passed is None
    b = analyze(planted([-2.0, -3.0, -2.5], jet=False, negative=False, bend={1e-4: 0.1}))
    assert b.verdict == "nonlinear"


def test_few_repeats_scattered_are_undecided_not_linear():
    records = planted([-2.0, -3.0], bend={1e-4: [0.01, 0.045]})
    a = analyze(records)
    p = a.point(1e-4)
    assert p.status == "undecided" and p.nonlinearity_mean_abs <= 0.05 < p.nonlinearity_bound
    assert a.verdict == "inconclusive"


def test_the_verdict_reads_a_checks_kind_not_its_text():
    """Without an oracle the first-order check has nothing to check: its kind, not the words
    "no first-order oracle" in its detail, keeps it from blocking LINEAR."""
    a = analyze(planted([-2.0, -3.0, -2.5], jet=False))
    c = a.checks["first_order"]
    assert c.kind is CheckKind.NOT_APPLICABLE and c.passed is None and a.verdict == "linear"
    reworded = dict(a.checks, first_order=dataclasses.replace(c, detail="calibration: n/a"))
    assert _verdict(a.per_eta, reworded)[0] == "linear"
    blocking = dict(a.checks, first_order=dataclasses.replace(c, kind=CheckKind.DECIDING))
    assert _verdict(a.per_eta, blocking)[0] == "inconclusive"
    decides = {k: v["decides"] for k, v in a.to_dict()["summary"]["checks"].items()}
    assert [k for k, v in decides.items() if v] == [
        "resolvable_points",
        "r_squared",
        "nonlinearity",
        "first_order",
        "rl_signal",
    ]


# -- report: the same analysis from a bare raw_results.json -------------------------------------


def test_a_bare_raw_results_gives_the_folder_analysis(tmp_path):
    records = planted(spread(3, 0.4))
    full = tmp_path / "full"
    full.mkdir()
    folder = ResultsFolder(full)
    for r in records:
        folder.write_record(r)
    folder.write_meta({"config": {"dtype": "fp64"}, "checkpoint": {}, "environment": {}})
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "raw_results.json").write_text((full / "raw_results.json").read_text())
    a, b = write_report(full).to_dict(), write_report(bare).to_dict()
    assert a["summary"] == b["summary"] and a["per_learning_rate"] == b["per_learning_rate"]


def test_a_schema_one_record_without_dtype_is_refused_not_assumed_fp32(tmp_path):
    old = [{k: v for k, v in r.items() if k != "dtype"} for r in planted(spread(3, 0.4))]
    (tmp_path / "raw_results.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="pass --dtype"):
        write_report(tmp_path)
    assert write_report(tmp_path, dtype="fp64").verdict == "linear"
    # In fp32 the same numbers are below the precision floor at η = 1e-8: dtype matters.
    fp32 = build_analysis(old, {}, dtype="fp32")["per_learning_rate"]
    assert fp32["1e-08"]["resolvable"] is False


def test_records_without_a_dtype_take_the_runs_not_fp32():
    """PointRecords that do not say their dtype are judged in the sweep's (run_meta)."""
    records = [
        PointRecord(**{k: v for k, v in r.items() if k != "dtype"})
        for r in planted([-2.0, -2.5, -3.0])
    ]
    a = analyze(records, {"config": {"dtype": "fp64"}})
    assert a.point(1e-8).resolvable  # |ΔH| 2e-8: above fp64's 10·eps·H, below fp32's
    assert not analyze(records, {"config": {"dtype": "fp32"}}).point(1e-8).resolvable


def test_records_round_trip_and_keep_unknown_fields():
    raw = planted([-2.0, -2.5])[0] | {"a_later_field": 0.0}
    record = PointRecord.from_dict(raw)
    assert record.eps == EPS["fp64"] and record.extra == {"a_later_field": 0.0}
    again = record.to_dict()
    assert {k: again[k] for k in raw} == raw


def test_the_analysis_imports_neither_torch_nor_transformers():
    code = (
        "import sys, entropy_lab.analysis, entropy_lab.report, entropy_lab.stats;"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- properties --------------------------------------------------------------------------------


grids = st.lists(
    st.sampled_from([1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3]), min_size=3, max_size=6, unique=True
).map(sorted)


@settings(max_examples=40)
@given(
    n=st.integers(2, 6),
    cv=st.floats(0.0, 0.8),
    mixed=st.booleans(),
    seed=st.integers(0, 10_000),
    grid=grids,
)
def test_exact_linearity_with_any_spread_is_linear(n, cv, mixed, seed, grid):
    a = analyze(planted(spread(n, cv, seed, mixed), etas=tuple(grid)))
    assert a.verdict == "linear", a.verdict_reason
    assert a.window.n_points == len(grid)


@settings(max_examples=40)
@given(
    n=st.integers(2, 6),
    cv=st.floats(0.0, 0.8),
    seed=st.integers(0, 10_000),
    grid=grids,
    where=st.integers(1, 5),
    size=st.floats(2.0, 10.0),
    sign=st.sampled_from([1.0, -1.0]),
)
def test_a_bend_of_twice_the_tolerance_is_nonlinear_below_it(n, cv, seed, grid, where, size, sign):
    eta = grid[min(where, len(grid) - 1)]
    bent = {e: sign * size * 0.05 for e in grid if e >= eta}
    a = analyze(planted(spread(n, cv, seed), etas=tuple(grid), bend=bent))
    assert a.verdict == "nonlinear"
    assert a.window.eta_max is not None and a.window.eta_max < eta
    assert all(not p.in_window for p in a.per_eta if p.learning_rate >= eta)


@settings(max_examples=40)
@given(
    n=st.integers(2, 6),
    seed=st.integers(0, 10_000),
    grid=grids,
    size=st.floats(0.1, 0.6),
)
def test_opposite_sign_bends_are_never_linear(n, seed, grid, size):
    signs = [size if r % 2 else -size for r in range(n)]
    a = analyze(planted(spread(n, 0.3, seed), etas=tuple(grid), bend={grid[-1]: signs}))
    assert a.verdict != "linear"


@settings(max_examples=40)
@given(n=st.integers(2, 6), seed=st.integers(0, 10_000), off=st.floats(0.1, 0.5), grid=grids)
def test_a_calibration_offset_of_twice_the_tolerance_fails_first_order(n, seed, off, grid):
    sign = 1 if seed % 2 else -1
    a = analyze(planted(spread(n, 0.4, seed), etas=tuple(grid), offset=sign * off))
    assert a.checks["first_order"].passed is False
    assert a.verdict != "linear"


@settings(max_examples=40)
@given(
    n=st.integers(2, 5),
    seed=st.integers(0, 10_000),
    grid=grids,
    bends=st.lists(st.floats(-0.3, 0.3), min_size=7, max_size=7),
)
def test_the_verdict_and_the_window_never_disagree(n, seed, grid, bends):
    a = analyze(planted(spread(n, 0.5, seed), etas=tuple(grid), bend=dict(zip(grid, bends))))
    resolvable = [p for p in a.per_eta if p.resolvable]
    if a.verdict == "linear":
        assert all(p.in_window for p in resolvable) and a.window.n_points == len(resolvable)
    if a.verdict == "nonlinear":
        assert any(p.status == "beyond" for p in resolvable)
    for p in a.per_eta:
        if p.in_window:
            assert p.status == "within"
    inside = [p.learning_rate for p in a.per_eta if p.in_window]
    assert inside == [
        e
        for e in grid
        if a.window.eta_min is not None and a.window.eta_min <= e <= a.window.eta_max
    ]


# -- statistics ---------------------------------------------------------------------------------


def test_mean_stderr_and_upper_bound():
    m = mean_stderr([1.0, 2.0, 3.0, math.nan])
    assert (m.mean, m.std, m.n) == (2.0, 1.0, 3) and m.stderr == pytest.approx(1 / math.sqrt(3))
    assert mean_stderr([5.0, 5.0]).std == 0.0
    # t_{0.95, 2} = 2.919986 (tables)
    assert upper_bound([1.0, 2.0, 3.0]) == pytest.approx(2.0 + 2.919986 / math.sqrt(3), rel=1e-6)
    assert math.isnan(upper_bound([1.0]))


def test_random_slope_model_matches_statsmodels_mixedlm():
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(7)
    etas = np.array(GRID)
    slopes = -2.7 * (1 + 0.4 * rng.standard_normal(6))
    x = np.tile(etas, slopes.size)
    g = np.repeat(np.arange(slopes.size), etas.size)
    y = np.repeat(slopes, etas.size) * x + 2e-7 * rng.standard_normal(x.size) + 5e-8
    ours = fit_random_slope(x, y, g)
    scale = 1e4  # statsmodels' optimiser wants O(1) columns too
    theirs = sm.MixedLM(y, sm.add_constant(x * scale), groups=g, exog_re=x * scale).fit(reml=True)
    assert ours.slope == pytest.approx(theirs.fe_params[1] * scale, rel=1e-8)
    assert ours.intercept == pytest.approx(theirs.fe_params[0], rel=1e-6)
    # Variance components and SEs to the optimisers' tolerance (ours reaches a REML
    # objective at least as low).
    assert ours.slope_se == pytest.approx(theirs.bse_fe[1] * scale, rel=2e-2)
    assert ours.slope_sd == pytest.approx(math.sqrt(theirs.cov_re[0, 0]) * scale, rel=2e-2)
    assert ours.residual_sd == pytest.approx(math.sqrt(theirs.scale), rel=2e-2)
    assert 0 < ours.r2_marginal < ours.r2_conditional <= 1


def test_random_slope_model_of_exact_lines_has_no_residual():
    x = np.tile(GRID, 3)
    g = np.repeat([0, 1, 2], len(GRID))
    y = np.repeat([-2.0, -3.0, -2.5], len(GRID)) * x
    fit = fit_random_slope(x, y, g)
    assert fit.slope == pytest.approx(-2.5, rel=1e-9)
    assert fit.slope_sd == pytest.approx(0.5, rel=0.05)
    assert fit.r2_conditional == pytest.approx(1.0, abs=1e-9)


def test_floor_thresholds_are_stored_and_reapplied():
    strict = FloorThresholds(max_symmetric_residual=1e-30)
    records = planted([-2.0, -2.5, -3.0])
    records[0]["entropy_change_negative"] *= 1 + 1e-9
    assert analyze(records).point(1e-8).resolvable
    assert not analyze(records, floor=strict).point(1e-8).resolvable


# -- records without a noise estimate (DESIGN §4, Noise) ----------------------------------------

# The anchor study's published ΔH_r(η), nats/token (RL_Practice, Qwen2.5-1.5B, fp32, 8 update
# directions × 5 η; no ±η pairs, no first-order oracle).
ANCHOR_ETAS = (8e-07, 1.6e-06, 3.2e-06, 6.4e-06, 1.28e-05)
ANCHOR = [
    [-5.214447e-04, -8.657510e-04, -1.662934e-03, -3.310597e-03, -6.701036e-03],
    [-5.785771e-04, -1.187066e-03, -2.152069e-03, -4.332933e-03, -9.027881e-03],
    [-5.454035e-04, -1.100831e-03, -2.233416e-03, -4.488396e-03, -8.963385e-03],
    [-5.837300e-04, -1.118656e-03, -2.322354e-03, -4.695378e-03, -9.837048e-03],
    [-6.200042e-04, -1.210663e-03, -2.332450e-03, -4.763110e-03, -9.766543e-03],
    [-4.723703e-04, -9.861312e-04, -1.996139e-03, -3.946860e-03, -8.248860e-03],
    [-5.092816e-04, -1.178816e-03, -2.452799e-03, -4.826280e-03, -9.850868e-03],
    [-6.786850e-04, -1.246795e-03, -2.378440e-03, -4.658191e-03, -9.362518e-03],
]


def unpaired(rows, etas=ANCHOR_ETAS, h0=None):
    """Records as another tool (or the seed) writes them: ΔH(η) per direction and η, no
    ΔH(−η), no first-order oracle, no dtype (``analyze(..., dtype="fp32")``)."""
    return [
        dict(learning_rate=eta, repeat=r, success=True, entropy_before=h0, entropy_change=dh)
        for r, row in enumerate(rows)
        for eta, dh in zip(etas, row)
    ]


def offset_noise_bend(n, etas, noise, seed, offset=0.0, bend=None):
    """n directions of ΔH_r = s_r·(1 + o_r)·η·(1 + bend_r(η)) + ε, |o_r| ≤ ``offset``, ε of one
    absolute size, ``noise`` × |ΔH| at the smallest η for s = −700 (its ΔH/η noise ∝ 1/η)."""
    rng = np.random.default_rng(seed)
    slopes = -700 * (1 + 0.3 * rng.uniform(-1, 1, n)) * (1 + offset * rng.uniform(-1, 1, n))
    sigma = noise * 700 * etas[0]
    return [
        [
            s * eta * (1 + (bend(r, eta) if bend else 0.0)) + sigma * rng.standard_normal()
            for eta in etas
        ]
        for r, s in enumerate(slopes)
    ]


@pytest.mark.parametrize("h0", [None, 0.6])
def test_the_anchor_studys_published_data_is_not_nonlinear(h0):
    """It was NONLINEAR, "bends beyond the tolerance at 1.6e-06 … 1.28e-05" (mean |n_r| 6.9 %,
    9.3 %, 8.9 %, 9.4 %): each direction's reference was its own smallest-η point, the
    noisiest (direction 0's n = −17 … −21 % above it is a constant offset), and mean |n_r|
    turned noise of either sign into nonlinearity. Its ΔH/η means are flat to 3 %, lack of
    fit p = 0.97. Fitted with its own noise (σ = 5.2e-5 nats, 9 % of ΔH at 8e-7), the bend at
    the top η is 4.1 % on average, its 95 % bounds [1.9 %, 6.3 %] straddle the 5 %."""
    a = analyze(unpaired(ANCHOR, h0=h0), dtype="fp32")
    assert a.verdict == "inconclusive", a.verdict_reason
    assert "noise cannot be told from a bend at η = 1.28e-05" in a.verdict_reason
    assert a.noise.sigma == pytest.approx(5.19e-5, rel=1e-2) and a.noise.dof == 8 * 3
    top = a.point(1.28e-5)
    assert top.status == "undecided"
    assert top.nonlinearity_lower_bound < 0.05 < top.nonlinearity_bound
    assert (a.window.eta_min, a.window.eta_max) == (8e-7, 6.4e-6)
    first = a.repeats[0]  # its offset is its slope, not a bend
    assert first.slope_reference == pytest.approx(-521.7, rel=1e-3)
    assert abs(first.bend_fit.bend) < 0.01
    summary = a.to_dict()["summary"]
    assert summary["noise_model"]["sigma"] == pytest.approx(a.noise.sigma)
    assert summary["checks"]["nonlinearity"]["passed"] is None


def test_a_bend_planted_in_the_anchor_data_is_nonlinear():
    """The same data with ΔH/η bent by 2 × the tolerance at the top η (∝ η, as curvature
    bends it): the bend stands out of the anchor's own noise."""
    top = ANCHOR_ETAS[-1]
    bent = [[dh * (1 + 0.1 * eta / top) for eta, dh in zip(ANCHOR_ETAS, row)] for row in ANCHOR]
    a = analyze(unpaired(bent), dtype="fp32")
    assert a.verdict == "nonlinear", a.verdict_reason
    assert a.point(top).nonlinearity_lower_bound > 0.05
    assert a.window.eta_max is not None and a.window.eta_max < top


def test_a_bend_in_noise_too_large_to_tell_is_inconclusive_with_the_reason():
    """ΔH/η bent by 10 % at the top, but ε is 60 % of ΔH at the smallest η (7× the anchor's)."""
    top = ANCHOR_ETAS[-1]
    rows = offset_noise_bend(4, ANCHOR_ETAS, 0.6, seed=3, bend=lambda r, eta: 0.1 * eta / top)
    a = analyze(unpaired(rows), dtype="fp32")
    assert a.verdict == "inconclusive", a.verdict_reason
    assert "noise cannot be told from a bend" in a.checks["nonlinearity"].detail
    # The same bend with the noise 100× smaller is told.
    quiet = offset_noise_bend(4, ANCHOR_ETAS, 0.006, seed=3, bend=lambda r, eta: 0.1 * eta / top)
    assert analyze(unpaired(quiet), dtype="fp32").verdict == "nonlinear"


doubling_grids = st.tuples(st.sampled_from([2.0, 3.0, 10.0]), st.integers(5, 6)).map(
    lambda g: tuple(1.28e-5 / g[0] ** k for k in reversed(range(g[1])))
)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(3, 8),
    seed=st.integers(0, 10_000),
    etas=doubling_grids,
    noise=st.floats(0.0, 0.15),
    offset=st.floats(0.0, 0.5),
    h0=st.sampled_from([None, 0.6]),
)
def test_an_offset_and_absolute_noise_are_never_nonlinear(n, seed, etas, noise, offset, h0):
    """A constant offset of each direction's ΔH/η plus absolute noise up to 15 % of |ΔH| at the
    smallest η (the anchor's: 9 %). Simulated at the worst corner (3 directions, 5 η
    doubling, 15 %): NONLINEAR in 0 of 50 000 draws."""
    rows = offset_noise_bend(n, etas, noise, seed, offset=offset)
    a = analyze(unpaired(rows, etas, h0), dtype="fp32")
    assert a.verdict != "nonlinear", a.verdict_reason


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(3, 8),
    seed=st.integers(0, 10_000),
    etas=doubling_grids,
    size=st.floats(2.0, 4.0),
    power=st.floats(1.0, 3.0),
    signs=st.lists(st.sampled_from([1.0, -1.0]), min_size=8, max_size=8),
    noise=st.floats(0.0, 0.02),
    offset=st.floats(0.0, 0.5),
)
def test_a_growing_bend_of_twice_the_tolerance_is_nonlinear_without_a_noise_estimate(
    n, seed, etas, size, power, signs, noise, offset
):
    """Every direction's ΔH/η bends by ±size × tol at the top η, growing as (η/η_top)^power,
    under an offset and absolute noise up to 2 % of |ΔH| at the smallest η."""
    top = etas[-1]

    def bend(r, eta):
        return signs[r] * size * 0.05 * (eta / top) ** power

    a = analyze(unpaired(offset_noise_bend(n, etas, noise, seed, offset, bend), etas), dtype="fp32")
    assert a.verdict == "nonlinear", a.verdict_reason
    assert a.window.eta_max is not None and a.window.eta_max < top


# -- the jet from the ±η pairs (issue 16): c and ∇³H without the nested jvps ------------------


def taylor(slopes, c, d, etas=GRID[1:], noise=0.0, quartic=0.0, seed=0, h0=2.0, dtype="fp64"):
    """Records of a sweep at --jet 1: ΔH_r(±η) = ±s_r·η + c·η²/2 ± d·η³/6 + q·η⁴/24 plus
    independent forward-pass noise of absolute size ``noise`` at each evaluation; the
    records carry ∇H·v only, as the default sweep writes them."""
    rng = np.random.default_rng(seed)
    out = []
    for r, s in enumerate(slopes):
        for eta in etas:
            plus, minus = (
                sign * s * eta + c * eta**2 / 2 + sign * d * eta**3 / 6 + quartic * eta**4 / 24
                for sign in (1, -1)
            )
            out.append(
                dict(
                    learning_rate=eta,
                    repeat=r,
                    seed=r,
                    success=True,
                    dtype=dtype,
                    entropy_before=h0,
                    entropy_change=plus + noise * rng.standard_normal(),
                    entropy_change_negative=minus + noise * rng.standard_normal(),
                    quantized_fraction=0.0,
                    first_order_slope=s,
                    first_order_prediction=s * eta,
                )
            )
    return out


def test_the_pairs_give_the_planted_curvature_and_third_derivative():
    records = taylor([-2.7, -3.1], c=200.0, d=3e6, quartic=1e8, noise=1e-15)
    a = analyze(records)
    for s in a.repeats:
        jet = s.measured_jet
        assert jet.etas == list(GRID[1:])  # every pair within the tolerance is fitted
        assert jet.curvature == pytest.approx(200.0, rel=1e-3)
        assert jet.third_derivative == pytest.approx(3e6, rel=1e-3)
        assert jet.leverage[1e-4] > 0.999
    summary = a.to_dict()["summary"]
    assert summary["curvature"]["source"] == "±η pairs"
    assert summary["curvature"]["mean"] == pytest.approx(200.0, rel=1e-3)
    assert summary["linear_regime"]["predicted_from"] == "±η pairs"


def test_a_bent_pair_is_not_fitted_for_the_curvature():
    """At 1e-2 the planted quadratic term is 37 % of the linear one and the quartic one
    moves its E/η² to 5× c: ĉ comes from the smaller η alone."""
    records = taylor([-2.7, -3.1], c=200.0, d=0.0, quartic=1e8, etas=(1e-6, 1e-5, 1e-4, 1e-2))
    for s in analyze(records).repeats:
        assert s.measured_jet.etas == [1e-6, 1e-5, 1e-4]
        assert s.measured_jet.curvature == pytest.approx(200.0, rel=1e-3)


def test_curvature_is_not_read_as_noise_without_the_nested_jvp(monkeypatch):
    """fp32, c·η/s = 4 % at 1e-4 (the bend c·η/2s = 2 % is inside the tolerance): the even
    part is 8× the symmetric check's 0.5 %, all of it η²c, and (1.1e-5) well inside what
    fp32 noise could be (1000·eps·H₀ = 6e-5). With ĉ from the pairs the point is resolvable
    and in the window; with no c (the default sweep before the measured jet) it was called
    noise."""
    records = taylor(spread(3, 0.3), c=1080.0, d=0.0, etas=GRID[2:], h0=0.5, dtype="fp32")
    a = analyze(records)
    assert a.verdict == "linear", a.verdict_reason
    assert a.point(1e-4).in_window
    from entropy_lab import analysis

    monkeypatch.setattr(
        analysis,
        "measured_jet",
        lambda records, tol, usable: analysis.MeasuredJet(
            int(records[0].repeat), None, None, None, None, [], {}, None
        ),
    )
    blind = analyze(records)
    assert not blind.point(1e-4).resolvable
    assert "noise or curvature" in " ".join(blind.point(1e-4).reasons)


def test_forward_noise_is_found_at_small_eta_without_the_nested_jvp():
    """Equal absolute noise at every η: 3e-9 is 1 % of |ΔH| at 1e-7 (> 0.5 %) and 1e-5 of it
    at 1e-4. The pairs say the same as the exact c would."""
    records = taylor([-2.7, -3.1, -2.9], c=200.0, d=3e6, noise=3e-9, seed=3)
    a = analyze(records)
    assert not a.point(1e-7).resolvable
    assert "forward-pass noise" in " ".join(a.point(1e-7).reasons)
    assert a.point(1e-5).resolvable and a.point(1e-4).resolvable
    exact = [dict(r, curvature=200.0, third_derivative=3e6) for r in records]
    b = analyze(exact)
    assert [p.resolvable for p in a.per_eta] == [p.resolvable for p in b.per_eta]


def test_noise_at_the_self_fitted_pair_is_judged_by_the_smaller_etas():
    """ĉ is read off the largest fitted pair, whose own even residual is then ≈ 0. Its noise
    is the level the smaller η show: 1 % of |ΔH| at the top fails it too."""
    noise = 0.01 * 2.7e-4 / math.sqrt(2)  # √2·σ relative to |ΔH(1e-4)| = 1 %
    records = taylor([-2.7, -3.1, -2.9], c=200.0, d=0.0, noise=noise, seed=5)
    a = analyze(records)
    top = a.point(1e-4)
    assert not top.resolvable, [p.symmetric_residual for p in a.points if p.learning_rate == 1e-4]
    assert "forward-pass noise" in " ".join(top.reasons)


def test_far_beyond_the_window_without_any_c_is_nonlinear_not_noise():
    """Shaped like the tiny checkpoint at 1e-2 … 1 (the suite's far grid): ΔH/η bending by
    20 % and 50 % and an even part half the size of |ΔH|. No pair is inside the tolerance, so no c
    can be read off; the even parts (≥ 1e-2) are 10¹³ eps·H₀ in fp64, curvature, not
    rounding noise: NONLINEAR. Read as noise (no cap: the check before), INCONCLUSIVE."""
    records = taylor([-2.7, -3.1], c=0.0, d=0.0, etas=(1e-2, 1e-1, 1.0))
    for r in records:
        bend = {1e-2: 0.0, 1e-1: 0.2, 1.0: 0.5}[r["learning_rate"]]
        plus = r["first_order_slope"] * r["learning_rate"] * (1 + bend)
        r["entropy_change"] = plus
        r["entropy_change_negative"] = -plus + 0.5 * abs(plus)
    a = analyze(records)
    assert all(s.measured_jet.curvature is None for s in a.repeats)
    assert a.verdict == "nonlinear", a.verdict_reason
    uncapped = analyze(records, floor=FloorThresholds(max_noise_eps=math.inf))
    assert uncapped.verdict == "inconclusive"
    assert "noise or curvature" in " ".join(uncapped.point(1e-2).reasons)


def test_a_zero_rl_gradient_is_not_an_rl_update():
    """A repeat whose RL gradient is exactly 0 (no reward variance) stepped on momentum alone:
    the verdict is INCONCLUSIVE with the reason, whatever its points look like."""
    records = planted([-2.0, -2.5, -3.0])
    for record in records:
        record["grad_norm"] = 0.4
    assert analyze(records).verdict == "linear"
    assert analyze(records).checks["rl_signal"].passed is True
    for record in records:
        if record["repeat"] == 1:
            record["grad_norm"] = 0.0  # planted: no RL signal in direction 1
    a = analyze(records)
    assert a.verdict == "inconclusive"
    assert "repeat(s) [1] had a zero RL gradient" in a.verdict_reason
    assert a.checks["rl_signal"].passed is False
    # another tool's records carry no gradient norm: the check does not apply
    plain = analyze(planted([-2.0, -2.5, -3.0]))
    assert plain.checks["rl_signal"].kind is CheckKind.NOT_APPLICABLE and plain.verdict == "linear"
