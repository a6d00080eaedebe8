"""The measurement core and the theory oracles on the tiny checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch

from entropy_lab.analysis import analyze
from entropy_lab.config import Reading
from entropy_lab.protocol import PhaseCosts, direction, measure_point
from entropy_lab.theory import covariance_identity_slope

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def dir64(setup64):
    return direction(setup64, 0)


@pytest.fixture(scope="module")
def dir32(setup32):
    return direction(setup32, 0)


def test_real_step_equals_theta0_plus_eta_v(setup64, dir64):
    upd = setup64.updater
    for eta in (1e-8, 1e-5, 1e-2, 0.3):
        upd.step(eta, dir64.gradient)
        for name, p in upd.params.items():
            expected = upd.theta0[name] + eta * dir64.vector[name]
            step = (expected - upd.theta0[name]).norm()
            err = (p.detach() - expected).norm()
            assert err <= 1e-6 * step + 1e-300, (name, eta, float(err / step))
        upd.restore()
    # and the restore really restores θ₀ and S₀
    for name, p in upd.params.items():
        assert torch.equal(p.detach(), upd.theta0[name])


def test_zero_step_is_exactly_zero_and_ess_full(setup32, dir32):
    readings = setup32.scorer.measure(setup32.eval_batch, setup32.reference_logprob)
    assert readings.policy - setup32.baseline.policy == 0.0
    assert readings.conditional - setup32.baseline.conditional == 0.0
    assert readings.ess == len(setup32.eval_batch)
    record = measure_point(setup32, dir32, 0.0)
    assert record.entropy_change == 0.0 and record.ess == len(setup32.eval_batch)


def test_planted_unpaired_batch_is_caught(setup32, tiny_checkpoint):
    """Scoring a different batch after the step (the original bug) breaks ΔH(0) == 0."""
    from tests.conftest import make_setup

    other = make_setup(tiny_checkpoint, dtype="fp32", eval_size=256, seed=7)
    unpaired = setup32.scorer.measure(other.eval_batch, other.reference_logprob)
    assert abs(unpaired.policy - setup32.baseline.policy) > 1e-4


def test_same_seed_twice_identical(setup32, dir32):
    again = direction(setup32, 0)
    a = measure_point(setup32, dir32, 1e-5)
    b = measure_point(setup32, again, 1e-5)
    assert a.entropy_change == b.entropy_change
    assert a.first_order_prediction == b.first_order_prediction


def test_fp64_resolves_tiny_steps_linearly(setup64, dir64):
    low = measure_point(setup64, dir64, 1e-10)
    high = measure_point(setup64, dir64, 1e-9)
    ratio = high.entropy_change / low.entropy_change
    assert abs(ratio - 10) <= 0.05, ratio
    # and it matches the jvp first order to 1 %
    for r in (low, high):
        rel = abs(r.entropy_change - r.first_order_prediction) / abs(r.first_order_prediction)
        assert rel <= 0.01, rel


def test_fp32_flags_tiny_steps_unresolvable(setup32, dir32):
    records = [measure_point(setup32, dir32, eta) for eta in (1e-10, 1e-5)]
    tiny_step = analyze(records).repeat_point(1e-10, dir32.repeat)
    assert not tiny_step.resolvable and tiny_step.reasons
    assert tiny_step.quantized_fraction > 0.5


def test_cui_identity_agrees_with_jvp_in_fp64(setup64, dir64):
    cui = covariance_identity_slope(
        setup64.scorer, setup64.eval_batch, setup64.updater.theta0, dir64.vector
    )
    jvp_slope = dir64.derivatives.slope_conditional
    assert abs(cui - jvp_slope) <= 1e-6 * abs(jvp_slope), (cui, jvp_slope)


def test_second_order_predicts_nonlinearity(setup64, dir64):
    from entropy_lab.analysis import eta_max

    d = dir64.derivatives
    top = eta_max(d.slope_policy, d.curvature_policy, tol=0.05)
    r = measure_point(setup64, dir64, top)
    measured = r.entropy_change / r.first_order_prediction - 1
    predicted = top * d.curvature_policy / (2 * d.slope_policy)
    assert abs(predicted) == pytest.approx(0.05)
    assert abs(measured - predicted) <= 0.2 * abs(predicted), (measured, predicted)


def test_first_order_matches_finite_difference(setup64, dir64):
    """An oracle for the oracle: central difference of the real sweep in fp64."""
    eta = 1e-7
    r = measure_point(setup64, dir64, eta)
    central = (r.entropy_change - r.entropy_change_negative) / (2 * eta)
    assert math.isclose(central, dir64.derivatives.slope_policy, rel_tol=1e-5)


def test_faithful_fp64_computes_the_stock_function(tiny_checkpoint, setup32):
    from tests.conftest import make_setup

    stock = setup32.baseline.conditional
    faithful = make_setup(tiny_checkpoint, dtype="fp64", eval_size=256).baseline.conditional
    assert abs(faithful - stock) <= 1e-6 * abs(stock)


def _plain_entropy(tiny_checkpoint, batch: dict, dtype: torch.dtype, faithful: bool) -> float:
    """H(θ₀) from the saved batch with plain transformers + peft and full logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        str(tiny_checkpoint / "base_model"), dtype=dtype, attn_implementation="eager"
    )
    model = PeftModel.from_pretrained(base, str(tiny_checkpoint / "model")).eval()
    if faithful:
        from entropy_lab.precision import make_faithful

        make_faithful(model)
    ids = torch.tensor(batch["input_ids"])
    mask = torch.tensor(batch["response_mask"])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"])).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    ent = -(logp.exp() * logp).sum(-1)
    target = mask[:, 1:].bool()
    return float(ent[target].sum() / target.sum())


def test_independent_recomputation_of_entropy_before(tiny_checkpoint, setup64, setup32):
    """No entropy_lab code on the scoring path: fp64 (faithful) to 1e-9, stock fp32 to 1e-6."""
    h64 = _plain_entropy(tiny_checkpoint, setup64.eval_batch.to_dict(), torch.float64, True)
    assert abs(h64 - setup64.baseline.conditional) <= 1e-9 * h64
    h32 = _plain_entropy(tiny_checkpoint, setup32.eval_batch.to_dict(), torch.float32, False)
    assert abs(h32 - setup32.baseline.conditional) <= 1e-6 * h32


# -- fp32 in its window, the window itself, bf16, k steps, the oracles in the records -------


def test_fp32_decade_ratio_inside_the_window(setup32, dir32):
    """A decade apart inside fp32's window on this checkpoint (its floor is ≈ 1e-5: the
    symmetric check finds ≈ 10 % noise at 1e-6 and ≈ 1 % at 1e-5; η_max ≈ 5e-4)."""
    points = {eta: measure_point(setup32, dir32, eta) for eta in (1e-5, 1e-4)}
    assert analyze(list(points.values())).repeat_point(1e-4, dir32.repeat).resolvable
    ratio = points[1e-4].entropy_change / points[1e-5].entropy_change
    assert abs(ratio - 10) <= 0.5, ratio


def test_fp32_matches_the_oracle_where_the_floor_says_resolvable(setup32, dir32):
    """The precision floor is calibrated: where it passes a point, the measured ΔH agrees
    with the theory to 1 % (first order, plus the predicted curvature term); the points
    it rejects are ones that miss."""
    second = direction(setup32, 1)
    grid = (1e-7, 1e-6, 1e-5, 3e-5)
    records = [measure_point(setup32, d, eta) for d in (dir32, second) for eta in grid]
    a = analyze(records)
    inside = [p.learning_rate for p in a.per_eta if p.status == "within"]
    assert 1e-7 not in inside and 3e-5 in inside, [(p.learning_rate, p.status) for p in a.per_eta]
    for r in records:
        if r.learning_rate in inside:
            second_order = abs(r.entropy_change / r.second_order_prediction - 1)
            first_order = abs(r.entropy_change / r.first_order_prediction - 1)
            bend = a.point(r.learning_rate).predicted_nonlinearity
            assert second_order <= 0.01, (r.learning_rate, r.repeat, second_order)
            assert first_order <= 0.01 + bend, (r.learning_rate, r.repeat, first_order)
    rejected = [r for r in records if r.learning_rate == 1e-7]
    assert max(abs(r.entropy_change / r.first_order_prediction - 1) for r in rejected) > 0.01


def test_wide_grid_window_excludes_both_ends(setup32, dir32):
    """1e-10 … 1 in fp32: the low end is below the precision floor, the high end bent."""
    from entropy_lab.report import build_analysis

    grid = (1e-10, 1e-8, 1e-6, 1e-5, 3e-5, 1e-3, 1e-2, 1.0)
    second = direction(setup32, 1)
    records = [measure_point(setup32, d, eta) for d in (dir32, second) for eta in grid]
    analysis = build_analysis(records, {"config": {"dtype": "fp32"}})
    window = analysis["summary"]["linear_regime"]
    per_eta = analysis["per_learning_rate"]
    assert 1e-10 < window["eta_min"] <= 3e-5 <= window["eta_max"] < 1e-3, window
    assert not per_eta["1e-10"]["resolvable"]
    assert any("rounded away" in why for why in per_eta["1e-10"]["unresolvable_reasons"])
    assert per_eta["1.0"]["in_window"] is False
    # At 1e-3 ΔH/η is ≈ 20 % off (the second order alone predicts a few per cent; with the
    # third order the prediction matches). The point is resolvable and bent, not noise.
    row = per_eta["0.001"]
    assert row["resolvable"] and row["status"] == "beyond"
    assert row["nonlinearity_mean_abs"] > 0.1
    assert row["predicted_nonlinearity"] == pytest.approx(row["nonlinearity_mean_abs"], rel=0.3)
    # The jet's edge lies between the last point inside and the first one outside.
    assert window["eta_max"] < window["eta_max_predicted"] < 1e-3
    assert analysis["summary"]["verdict"] == "nonlinear"


def test_bf16_floor_lies_far_above_fp32s(tiny_checkpoint, setup32, dir32):
    from tests.conftest import make_setup

    setup16 = make_setup(tiny_checkpoint, dtype="bf16", eval_size=64)
    d16 = direction(setup16, 0)
    eta = 1e-4
    point16 = analyze([measure_point(setup16, d16, eta)]).repeat_point(eta, d16.repeat)
    point32 = analyze([measure_point(setup32, dir32, eta)]).repeat_point(eta, dir32.repeat)
    assert point32.resolvable, point32.reasons
    assert not point16.resolvable and point16.quantized_fraction > 0.1, point16


def test_the_rounding_term_predicts_what_rounding_does(setup64, dir64):
    """∇H·(θ₁ − θ₀ − η·v), against the change of H that storing θ₀ + η·v in fp32 makes,
    measured in fp64 (no forward-pass noise): equal to 1 % (measured: 1e-5 … 1.2e-3)."""
    up, scorer, batch = setup64.updater, setup64.scorer, setup64.eval_batch
    for eta in (1e-8, 1e-6):
        readings = []
        for rounded in (False, True):
            with torch.no_grad():
                for name, p in up.params.items():
                    exact = up.theta0[name] + eta * dir64.vector[name]
                    p.copy_(exact.float().double() if rounded else exact)
            readings.append(scorer.measure(batch, setup64.reference_logprob).policy)
            if rounded:
                predicted = up.rounding(eta, dir64.vector, setup64.entropy_grad)[1]
        up.restore()
        measured = readings[1] - readings[0]
        assert measured != 0.0 and predicted == pytest.approx(measured, rel=0.01), eta


def test_the_reverse_mode_gradient_agrees_with_the_jvp(setup64, dir64):
    """∇H from one backward pass, dotted with v, is the jvp's ∇H·v (policy reading)."""
    grad = setup64.entropy_grad
    gv = sum(float((grad[n] * dir64.vector[n]).sum()) for n in grad)
    assert gv == pytest.approx(dir64.derivatives.slope_policy, rel=1e-10)


def test_records_carry_both_first_order_oracles(setup64, dir64):
    r = measure_point(setup64, dir64, 1e-8)
    jvp_slope = r.first_order_slope_conditional
    assert abs(r.identity_slope - jvp_slope) <= 1e-6 * abs(jvp_slope)
    # Cui et al.'s crude forecasts are in other units (logit steps): finite, reported, not equal.
    for key in ("cui_vanilla_pg_slope", "cui_natural_pg_slope"):
        assert math.isfinite(getattr(r, key)) and abs(getattr(r, key) - jvp_slope) > 0.01 * abs(
            jvp_slope
        )


def test_identity_check_catches_a_wrong_direction(setup64, dir64):
    """Planted bug: the identity evaluated along another repeat's v must disagree."""
    other = direction(setup64, 1)
    cui = covariance_identity_slope(
        setup64.scorer, setup64.eval_batch, setup64.updater.theta0, other.vector
    )
    jvp_slope = dir64.derivatives.slope_conditional
    assert abs(cui - jvp_slope) > 1e-3 * abs(jvp_slope)


def test_k_steps_between_the_measurements(tiny_checkpoint):
    from tests.conftest import make_setup

    one = make_setup(tiny_checkpoint, dtype="fp64", eval_size=32)
    two = make_setup(tiny_checkpoint, dtype="fp64", eval_size=32, steps=2)
    d1, d2 = direction(one, 0), direction(two, 0)
    r1 = {eta: measure_point(one, d1, eta) for eta in (1e-8, 1e-7)}
    r2 = {eta: measure_point(two, d2, eta) for eta in (1e-8, 1e-7)}
    # The oracles along θ₀ + η·v are for one step (cfg.multi_step): the jvp, ∇H (rounding)
    # and the ±η pair; k > 1 clips later steps against θ₀'s log-probs.
    assert (one.cfg.multi_step, two.cfg.multi_step) == (False, True)
    assert d1.derivatives is not None and d2.derivatives is None
    assert one.entropy_grad is not None and two.entropy_grad is None
    assert r1[1e-7].entropy_change_negative is not None
    assert r2[1e-7].entropy_change_negative is None and r2[1e-7].rounding_effect is None
    assert d1.update.old_logprob is None and d2.update.old_logprob is not None
    k1 = {eta: r.entropy_change for eta, r in r1.items()}
    k2 = {eta: r.entropy_change for eta, r in r2.items()}
    # Still linear in η, and the second Adam step (moments updated, ratio ρ ≈ 1) moves H
    # about as far again as the first: a k = 2 that silently stepped once gives ≈ 1.
    assert abs(k2[1e-7] / k2[1e-8] - 10) <= 0.05
    assert 1.5 <= k2[1e-7] / k1[1e-7] <= 2.5, k2[1e-7] / k1[1e-7]
    for name, p in two.updater.params.items():  # θ₀ restored after the k steps
        assert torch.equal(p.detach(), two.updater.theta0[name])


@pytest.fixture(scope="module")
def setup64_e256(tiny_checkpoint):
    from tests.conftest import make_setup

    return make_setup(tiny_checkpoint, dtype="fp64", eval_size=256, jet=3)


def test_third_order_predicts_where_the_second_order_misses(setup64_e256):
    """On this evaluation batch c is small against ∇³H[v,v,v]: the second-order η_max is
    3× too far out, the third-order one is right (within 20 % of the tolerance)."""
    from entropy_lab.analysis import eta_max, predicted_nonlinearity

    d = direction(setup64_e256, 0)
    dd = d.derivatives
    top2 = eta_max(dd.slope_policy, dd.curvature_policy, 0.05)
    top3 = eta_max(dd.slope_policy, dd.curvature_policy, 0.05, dd.third_policy)
    assert top3 < top2 / 2
    for eta in (top3, top2):
        r = measure_point(setup64_e256, d, eta)
        measured = r.entropy_change / r.first_order_prediction - 1
        predicted = predicted_nonlinearity(
            eta, dd.slope_policy, dd.curvature_policy, dd.third_policy
        )
        second = predicted_nonlinearity(eta, dd.slope_policy, dd.curvature_policy)
        if eta == top3:
            assert abs(measured - predicted) <= 0.2 * 0.05, (measured, predicted)
        assert abs(measured - second) > 3 * abs(measured - predicted), (eta, measured, second)


def test_third_derivative_matches_finite_differences(setup64_e256):
    """The oracle's oracle for ∇³H[v,v,v]: a central difference of real steps at ±η, ±2η."""
    d = direction(setup64_e256, 1)
    eta = 2e-5
    one = measure_point(setup64_e256, d, eta)
    two = measure_point(setup64_e256, d, 2 * eta)
    third = (
        two.entropy_change
        - 2 * one.entropy_change
        + 2 * one.entropy_change_negative
        - two.entropy_change_negative
    ) / (2 * eta**3)
    assert math.isclose(third, d.derivatives.third_policy, rel_tol=0.01), (
        third,
        d.derivatives.third_policy,
    )


def test_eta_max_solves_the_cubic_model():
    from entropy_lab.analysis import eta_max, predicted_nonlinearity

    for slope, c, d in [(-2.7, 190.0, 2.9e6), (1.0, -50.0, 1e5), (1.0, 80.0, -4e5)]:
        top = eta_max(slope, c, 0.05, d)
        assert abs(abs(predicted_nonlinearity(top, slope, c, d)) - 0.05) < 1e-12
        below = [abs(predicted_nonlinearity(f * top, slope, c, d)) for f in (0.25, 0.5, 0.9)]
        assert max(below) < 0.05
    assert eta_max(1.0, 0.0, 0.05) == math.inf and eta_max(1.0, None, 0.05) is None


@pytest.mark.parametrize("order", [1, 2, 3])
def test_zero_tangent_kernels_change_no_bit(setup64, dir64, monkeypatch, order):
    """The ZeroTensor kernels only skip work: the jet is bit-identical to torch's kernels'."""
    from entropy_lab import theory

    def jet():
        return theory.sums_jet(
            setup64.scorer, setup64.eval_batch, setup64.updater.theta0, dir64.vector, order
        )

    fast = jet()
    monkeypatch.setattr(theory, "zero_tangent_kernels", contextlib.nullcontext)
    assert torch.equal(fast, jet())


def test_first_order_path_agrees_with_the_nested_jet(setup64, dir64):
    """Order 1 runs unnested (torch.autograd.forward_ad) with aten's own SiLU; the nested jet
    (torch.func, SiLU from its parts) gives the same ∇H·v to 1e-12 relative."""
    from entropy_lab.theory import directional_derivatives

    args = (setup64.scorer, setup64.eval_batch, setup64.reference_logprob)
    args += (setup64.updater.theta0, dir64.vector)
    first = directional_derivatives(*args, second_order=False)
    nested = directional_derivatives(*args, third_order=True)
    for reading in ("slope_conditional", "slope_policy"):
        a, b = getattr(first, reading), getattr(nested, reading)
        assert abs(a - b) <= 1e-12 * abs(b), (reading, a, b)


def test_closed_form_first_order_matches_forward_mode_ad_on_the_model(setup64, dir64, monkeypatch):
    """Order 1 takes the closed form (entropy.blocked_first_order: no dual numbers through the
    entropy's elementwise ops); its per-sequence jet and ∇H_cond·v equal forward-mode AD's
    through logit_statistics within 1e-12 relative in fp64."""
    from entropy_lab import entropy, theory

    args = (setup64.scorer, setup64.eval_batch, setup64.updater.theta0, dir64.vector)
    calls = []
    real = entropy.blocked_first_order
    monkeypatch.setattr(entropy, "blocked_first_order", lambda *a: calls.append(1) or real(*a))
    closed = theory.sums_jet(*args, 1)
    first = theory.directional_derivatives(
        args[0], args[1], setup64.reference_logprob, *args[2:], second_order=False
    )
    monkeypatch.setattr(entropy, "first_order_tangents", lambda *a: None)
    before = len(calls)
    forward_ad = theory.sums_jet(*args, 1)
    old = theory.directional_derivatives(
        args[0], args[1], setup64.reference_logprob, *args[2:], second_order=False
    )
    assert calls and len(calls) == before  # the closed form served, then forward-mode AD
    assert bool(((closed - forward_ad).abs() <= 1e-12 * forward_ad.abs()).all())
    assert abs(first.slope_conditional - old.slope_conditional) <= 1e-12 * abs(
        old.slope_conditional
    )


def test_zero_tangent_kernels_match_torch_and_are_registered_only_inside():
    from entropy_lab.theory import ZERO_TANGENT_KERNELS, zero_tangent_kernels

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 4, 5, generator=g, dtype=torch.float64), torch.randn(5, 2)
    zero = torch._efficientzerotensor((3, 4, 5), dtype=torch.float64)
    cases = {
        "x·0": lambda: x * zero,
        "0·2.5": lambda: zero * 2.5,
        "x + 0": lambda: x + zero,
        "0 + row (broadcast, fp32 → fp64)": lambda: zero + torch.ones(5),
        "0 + 2·x": lambda: torch.add(zero, x, alpha=2),
        "x − 0": lambda: x - zero,
        "0 − x": lambda: zero - x,
        "0 + 1e-6": lambda: zero + 1e-6,
        "x0·W": lambda: zero[0] @ w.double(),
        "x·0 (mm)": lambda: x[0] @ torch._efficientzerotensor((5, 2), dtype=torch.float64),
        "bmm": lambda: torch.bmm(x, torch._efficientzerotensor((3, 5, 2), dtype=torch.float64)),
    }
    stock = {name: f() for name, f in cases.items()}
    with zero_tangent_kernels():
        for name, f in cases.items():
            ours = f()
            assert ours.shape == stock[name].shape and ours.dtype == stock[name].dtype, name
            assert torch.equal(ours, stock[name]), name
        assert not (x + zero).data_ptr() == x.data_ptr()  # a result never aliases an operand
    # Outside, torch's own kernels serve again (mm has none: x·0 is a full product).
    assert not (x[0] @ torch._efficientzerotensor((5, 2), dtype=torch.float64))._is_zerotensor()
    assert set(ZERO_TANGENT_KERNELS) == {"mul.Tensor", "add.Tensor", "sub.Tensor", "mm", "bmm"}


def test_the_pairs_give_the_nested_jvps_curvature_and_third_derivative(setup64, dir64):
    """The tiny checkpoint, faithful fp64: c and ∇³H[v,v,v] read off the ±η pairs of quick's
    grid equal the nested jvps' (measured: 3e-5 and 8e-6 relative, the η⁴ and η⁵ terms at
    1e-5), and the analysis without the jvp terms gives the same verdict and window."""
    directions = (dir64, direction(setup64, 1))
    records = [measure_point(setup64, d, eta) for d in directions for eta in (1e-7, 1e-6, 1e-5)]
    a = analyze(records)
    for summary, d in zip(a.repeats, directions):
        jet, jvp = summary.measured_jet, d.derivatives
        assert jet.curvature == pytest.approx(jvp.curvature_policy, rel=2e-4)
        assert jet.third_derivative == pytest.approx(jvp.third_policy, rel=2e-4)
    first_only = [dataclasses.replace(r, curvature=None, third_derivative=None) for r in records]
    b = analyze(first_only)
    assert b.to_dict()["summary"]["linear_regime"]["predicted_from"] == "±η pairs"
    assert (b.verdict, b.window.eta_min, b.window.eta_max) == (
        a.verdict,
        a.window.eta_min,
        a.window.eta_max,
    )
    assert b.window.eta_max_predicted == pytest.approx(a.window.eta_max_predicted, rel=1e-3)


def test_eval_mode_switches_exactly_as_eval_then_train_did(monkeypatch):
    """eval inside; after, every module in the root's former mode; no switch (and no walk
    that sets flags) when no module is training."""
    from entropy_lab.modes import eval_mode

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    model.train()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert all(m.training for m in model.modules())
    model.eval()
    model[1].train()  # a stray training child: switched, then set as model.train(False) would
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert not any(m.training for m in model.modules())
    calls = []
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: calls.append(mode))
    with eval_mode(model):
        pass
    assert calls == []


@pytest.mark.parametrize("reading", list(Reading), ids=lambda r: r.value)
def test_each_reading_is_read_from_its_own_fields(setup64, dir64, reading):
    """--reading picks the entropy that defines ΔH, H₀ and the jet: each from that reading's
    own fields of the readings and of the derivatives along v (a swapped accessor fails)."""
    cfg = dataclasses.replace(setup64.cfg, reading=reading.value)
    record = measure_point(dataclasses.replace(setup64, cfg=cfg, costs=PhaseCosts()), dir64, 1e-5)
    jet, h0 = dir64.derivatives, setup64.baseline
    policy = reading is Reading.POLICY
    assert record.reading == reading.value
    assert record.entropy_before == (h0.policy if policy else h0.conditional)
    assert record.entropy_change == (
        record.entropy_change_policy if policy else record.entropy_change_conditional
    )
    assert record.entropy_change_policy != record.entropy_change_conditional
    assert record.first_order_slope == (jet.slope_policy if policy else jet.slope_conditional)
    assert record.curvature == (jet.curvature_policy if policy else jet.curvature_conditional)
    assert record.third_derivative == (jet.third_policy if policy else jet.third_conditional)
    assert jet.curvature_policy != jet.curvature_conditional
