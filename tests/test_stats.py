"""Tests for entropy_lab.stats: fits, the lack-of-fit test, and the pooled checks."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from entropy_lab.stats import (
    POOLED_CHECKS,
    Check,
    PooledFits,
    PooledPoints,
    PooledStatistics,
    PooledThresholds,
    Thresholds,
    fit_bends,
    fit_ols,
    fit_origin,
    fit_quadratic,
    fit_wls,
    lack_of_fit_test,
    loglog_slope,
    mean_abs_lower_bound,
    paired_loglog_slope,
    pooled_checks,
    pooled_fits,
    pooled_points,
    pooled_residuals,
    relative_residuals,
    simultaneous_t,
    standardized_residuals,
    summarize_by_eta,
)

GRID = np.logspace(-8, -4, 5)
CHECK_KEYS = {
    "r_squared",
    "standardized_residual",
    "relative_residual",
    "lack_of_fit",
    "intercept",
    "loglog_slope",
}
SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


def experiment(
    *,
    alpha: float = 1.0,
    quad: float = 0.0,
    beta: float = 0.0,
    power: float = 1.0,
    reps: int = 5,
    rel_noise: float = 0.02,
    abs_noise: float = 0.0,
    seed: int = 0,
    grid: np.ndarray = GRID,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw (η, ΔH) pairs: ΔH = α·η^power + quad·η² + β + noise.

    The noise SD is rel_noise·|α·η| + abs_noise, i.e. mostly proportional to the
    signal, as for a gradient step whose size scales with η.
    """
    rng = np.random.default_rng(seed)
    eta = np.repeat(grid, reps)
    mean = alpha * eta**power + quad * eta**2 + beta
    sd = rel_noise * np.abs(alpha * eta) + abs_noise
    return eta, mean + sd * rng.standard_normal(eta.size)


def far(dof: int | None) -> float:
    """Half-width, in SEs, of a 1 − 1e-7 two-sided interval (t with dof, or normal).

    Property tests assert |estimate − truth| < far(dof)·SE, so a correct
    estimator fails an example with probability 1e-7 whatever the seed (a fixed
    "5 SE" would be a 1-in-10⁴ event at 18 degrees of freedom).  Every fit
    below that uses t has at least 18 degrees of freedom, where far() is about 8.
    """
    return float(sps.norm.isf(0.5e-7) if dof is None else sps.t.isf(0.5e-7, dof))


def rel_close(a: float, b: float, rel: float = 1e-8) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


# --------------------------------------------------------------------------------------
# Property tests: planted parameters are recovered
# --------------------------------------------------------------------------------------


@pytest.mark.cpu
@settings(deadline=None, max_examples=50)
@given(
    seed=SEEDS,
    alpha=st.floats(0.1, 100.0),
    sign=st.sampled_from([-1.0, 1.0]),
    beta_frac=st.floats(-1.0, 1.0),
    noise_frac=st.floats(1e-3, 0.3),
)
def test_ols_recovers_planted_line_within_5_se(seed, alpha, sign, beta_frac, noise_frac):
    rng = np.random.default_rng(seed)
    a = sign * alpha
    b = beta_frac * alpha * 1e-6
    x = np.repeat(GRID, 4)
    noise = noise_frac * alpha * 1e-5  # homoscedastic, about 10 % of the mid-grid signal
    y = a * x + b + noise * rng.standard_normal(x.size)
    fit = fit_ols(x, y)
    assert fit.dof == x.size - 2
    assert abs(fit.slope - a) < far(fit.dof) * fit.slope_se
    assert abs(fit.intercept - b) < far(fit.dof) * fit.intercept_se


@pytest.mark.cpu
@settings(deadline=None, max_examples=50)
@given(
    seed=SEEDS,
    alpha=st.floats(0.1, 100.0),
    sign=st.sampled_from([-1.0, 1.0]),
    beta_frac=st.floats(-1.0, 1.0),
    noise_frac=st.floats(1e-3, 0.3),
)
def test_wls_recovers_planted_line_within_5_se(seed, alpha, sign, beta_frac, noise_frac):
    rng = np.random.default_rng(seed)
    a = sign * alpha
    b = beta_frac * alpha * 1e-9
    sigma = noise_frac * alpha * GRID + 1e-3 * alpha * 1e-8  # heteroscedastic, known
    y = a * GRID + b + sigma * rng.standard_normal(GRID.size)
    fit = fit_wls(GRID, y, sigma)  # σ known: the errors are normal, not t
    assert abs(fit.slope - a) < far(None) * fit.slope_se
    assert abs(fit.intercept - b) < far(None) * fit.intercept_se


@pytest.mark.cpu
@settings(deadline=None, max_examples=10)
@given(seed=SEEDS)
def test_ols_and_wls_95_percent_intervals_have_nominal_coverage(seed):
    """Over 400 simulated data sets the 95 % CIs cover the truth 88.75–98.75 % of the time.

    With p = 0.95 and 400 trials the count of misses is Binomial(400, 0.05)
    (mean 20, SD 4.4); the accepted band of 5–45 misses is more than 3.4 SD wide
    on either side.
    """
    rng = np.random.default_rng(seed)
    x = np.repeat(GRID, 3)
    a, b, noise = 2.0, 3e-7, 4e-6
    sigma = 0.05 * GRID + 1e-9
    t_q = 2.160368656461013  # t_{0.975, 13}
    z_q = 1.959963984540054
    trials = 400
    hits = np.zeros(4, dtype=int)
    for _ in range(trials):
        y = a * x + b + noise * rng.standard_normal(x.size)
        o = fit_ols(x, y)
        hits[0] += abs(o.slope - a) <= t_q * o.slope_se
        hits[1] += abs(o.intercept - b) <= t_q * o.intercept_se
        yw = a * GRID + 1e-9 + sigma * rng.standard_normal(GRID.size)
        w = fit_wls(GRID, yw, sigma)
        hits[2] += abs(w.slope - a) <= z_q * w.slope_se
        hits[3] += abs(w.intercept - 1e-9) <= z_q * w.intercept_se
    coverage = hits / trials
    assert np.all(coverage >= 0.8875), coverage
    assert np.all(coverage <= 0.9875), coverage


@pytest.mark.cpu
@settings(deadline=None, max_examples=50)
@given(
    seed=SEEDS,
    a1=st.floats(0.1, 10.0),
    curv=st.floats(-3.0, 3.0),
    noise_frac=st.floats(1e-3, 0.2),
)
def test_origin_and_quadratic_fits_recover_planted_coefficients(seed, a1, curv, noise_frac):
    rng = np.random.default_rng(seed)
    x = np.repeat(GRID, 4)
    a2 = curv * a1 / 1e-4  # curvature term is |curv| times the linear one at η = 1e-4
    noise = noise_frac * a1 * 1e-5
    y = a1 * x + a2 * x**2 + noise * rng.standard_normal(x.size)
    q = fit_quadratic(x, y)
    assert abs(q.a1 - a1) < far(q.n - 2) * q.a1_se
    assert abs(q.a2 - a2) < far(q.n - 2) * q.a2_se

    sigma = noise_frac * a1 * GRID
    y_lin = a1 * GRID + sigma * rng.standard_normal(GRID.size)
    ow = fit_origin(GRID, y_lin, sigma)
    assert ow.weighted
    assert abs(ow.slope - a1) < far(None) * ow.slope_se
    y_raw = a1 * x + noise * rng.standard_normal(x.size)
    ou = fit_origin(x, y_raw)
    assert not ou.weighted
    assert abs(ou.slope - a1) < far(ou.n - 1) * ou.slope_se


@pytest.mark.cpu
@settings(deadline=None, max_examples=50)
@given(
    seed=SEEDS,
    power=st.floats(0.5, 2.0),
    rel_se=st.floats(1e-3, 0.1),
    sign=st.sampled_from([-1.0, 1.0]),
)
def test_loglog_slope_recovers_planted_power(seed, power, rel_se, sign):
    rng = np.random.default_rng(seed)
    grid = np.logspace(-8, -4, 21)
    mean = sign * 3.0 * grid**power
    se = rel_se * np.abs(mean)
    observed = mean * np.exp(rel_se * rng.standard_normal(grid.size))
    ll = loglog_slope(grid, observed, se)
    assert ll.weighted and ll.same_sign
    assert abs(ll.slope - power) < far(ll.n - 2) * ll.slope_se
    assert ll.ci_low < ll.slope < ll.ci_high
    ll_u = loglog_slope(grid, observed)
    assert not ll_u.weighted
    assert abs(ll_u.slope - power) < far(ll_u.n - 2) * ll_u.slope_se


# --------------------------------------------------------------------------------------
# Agreement with statsmodels and NIST
# --------------------------------------------------------------------------------------


@pytest.mark.cpu
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ols_matches_statsmodels(seed):
    sm = pytest.importorskip("statsmodels.api")
    x, y = experiment(alpha=1.5, quad=2e3, beta=1e-8, abs_noise=3e-7, seed=seed, reps=4)
    fit = fit_ols(x, y)
    ref = sm.OLS(y, sm.add_constant(x)).fit()
    assert rel_close(fit.intercept, ref.params[0])
    assert rel_close(fit.slope, ref.params[1])
    assert rel_close(fit.intercept_se, ref.bse[0])
    assert rel_close(fit.slope_se, ref.bse[1])
    assert rel_close(fit.r_squared, ref.rsquared)
    assert rel_close(fit.intercept_t, ref.tvalues[0])
    assert rel_close(fit.intercept_p, ref.pvalues[0])
    np.testing.assert_allclose(fit.residuals, ref.resid, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(
        fit.leverage, ref.get_influence().hat_matrix_diag, rtol=1e-8, atol=1e-14
    )
    assert fit.chi2 is None and fit.reduced_chi2 is None and fit.method == "ols"


@pytest.mark.cpu
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wls_matches_statsmodels_with_absolute_sigma(seed):
    sm = pytest.importorskip("statsmodels.api")
    x, y = experiment(alpha=1.5, quad=2e3, beta=1e-8, rel_noise=0.05, seed=seed, reps=1)
    sigma = 0.05 * 1.5 * GRID + 1e-10
    fit = fit_wls(x, y, sigma)
    exog = sm.add_constant(x)
    ref = sm.WLS(y, exog, weights=1.0 / sigma**2).fit(cov_type="fixed scale")
    assert rel_close(fit.intercept, ref.params[0])
    assert rel_close(fit.slope, ref.params[1])
    assert rel_close(fit.intercept_se, ref.bse[0])
    assert rel_close(fit.slope_se, ref.bse[1])
    assert rel_close(fit.r_squared, ref.rsquared)
    assert rel_close(fit.chi2, ref.ssr)  # statsmodels' WLS ssr is the weighted one
    assert rel_close(fit.reduced_chi2, ref.ssr / ref.df_resid)
    assert not ref.use_t  # fixed scale → normal reference, as fit_wls documents
    assert rel_close(fit.intercept_p, ref.pvalues[0])
    np.testing.assert_allclose(fit.residuals, ref.resid, rtol=1e-8, atol=1e-16)
    # Weighted hat matrix computed directly: H = W½ X (XᵀWX)⁻¹ Xᵀ W½.
    wx = exog / sigma[:, None]
    hat = wx @ np.linalg.solve(wx.T @ wx, wx.T)
    np.testing.assert_allclose(fit.leverage, np.diag(hat), rtol=1e-8)


@pytest.mark.cpu
def test_origin_and_quadratic_match_statsmodels():
    sm = pytest.importorskip("statsmodels.api")
    x, y = experiment(alpha=2.0, quad=-4e3, abs_noise=2e-7, seed=7)
    q = fit_quadratic(x, y)
    ref = sm.OLS(y, np.column_stack([x, x**2])).fit()
    assert rel_close(q.a1, ref.params[0]) and rel_close(q.a2, ref.params[1])
    assert rel_close(q.a1_se, ref.bse[0]) and rel_close(q.a2_se, ref.bse[1])

    o = fit_origin(x, y)
    ref_o = sm.OLS(y, x[:, None]).fit()
    assert rel_close(o.slope, ref_o.params[0])
    assert rel_close(o.slope_se, ref_o.bse[0])
    assert rel_close(o.r_squared, ref_o.rsquared)  # no constant → uncentred R²

    sigma = 0.02 * 2.0 * x + 1e-9
    ow = fit_origin(x, y, sigma)
    ref_w = sm.WLS(y, x[:, None], weights=1 / sigma**2).fit(cov_type="fixed scale")
    assert rel_close(ow.slope, ref_w.params[0])
    assert rel_close(ow.slope_se, ref_w.bse[0])
    assert rel_close(ow.r_squared, ref_w.rsquared)


@pytest.mark.cpu
@pytest.mark.parametrize("quad", [0.0, 3e3])
def test_lack_of_fit_matches_anova_of_nested_models(quad):
    """Lack-of-fit F equals the F test of the line against the cell-means model."""
    pytest.importorskip("statsmodels.api")
    import statsmodels.api as sm
    from statsmodels.stats.anova import anova_lm

    x, y = experiment(alpha=1.0, quad=quad, abs_noise=2e-6, seed=3, reps=4)
    lof = lack_of_fit_test(x, y)
    line = sm.OLS(y, sm.add_constant(x)).fit()
    levels, idx = np.unique(x, return_inverse=True)
    cells = sm.OLS(y, np.eye(levels.size)[idx]).fit()  # η as a categorical factor
    table = anova_lm(line, cells)
    assert lof.df_lack_of_fit == int(table["df_diff"][1]) == 3
    assert lof.df_pure_error == int(cells.df_resid) == x.size - levels.size
    assert rel_close(lof.ss_pure_error, cells.ssr)
    assert rel_close(lof.ss_lack_of_fit, table["ss_diff"][1])
    assert rel_close(lof.f_statistic, table["F"][1])
    assert rel_close(lof.p_value, table["Pr(>F)"][1])


# NIST/ITL Statistical Reference Datasets (StRD), linear least squares, "Norris"
# (Norris, J., NIST, "Calibration of Ozone Monitors"; lower level of difficulty),
# https://www.itl.nist.gov/div898/strd/lls/data/Norris.shtml  (data file Norris.dat).
# Data and certified values transcribed from Norris.dat.
NORRIS_Y = [
    0.1, 338.8, 118.1, 888.0, 9.2, 228.1, 668.5, 998.5, 449.1, 778.9, 559.2, 0.3,
    0.1, 778.1, 668.8, 339.3, 448.9, 10.8, 557.7, 228.3, 998.0, 888.8, 119.6, 0.3,
    0.6, 557.6, 339.3, 888.0, 998.5, 778.9, 10.2, 117.6, 228.9, 668.4, 449.2, 0.2,
]  # fmt: skip
NORRIS_X = [
    0.2, 337.4, 118.2, 884.6, 10.1, 226.5, 666.3, 996.3, 448.6, 777.0, 558.2, 0.4,
    0.6, 775.5, 666.9, 338.0, 447.5, 11.6, 556.0, 228.1, 995.8, 887.6, 120.2, 0.3,
    0.3, 556.8, 339.1, 887.2, 999.0, 779.0, 11.1, 118.3, 229.2, 669.1, 448.9, 0.5,
]  # fmt: skip
NORRIS_CERTIFIED = {
    "B0": -0.262323073774029,
    "B0_sd": 0.232818234301152,
    "B1": 1.00211681802045,
    "B1_sd": 0.429796848199937e-03,
    "residual_sd": 0.884796396144373,
    "r_squared": 0.999993745883712,
    "residual_ss": 26.6173985294224,
}


@pytest.mark.cpu
def test_ols_reproduces_nist_strd_norris_certified_values():
    fit = fit_ols(NORRIS_X, NORRIS_Y)
    c = NORRIS_CERTIFIED
    resid = np.asarray(fit.residuals)
    assert fit.n == 36 and fit.dof == 34
    assert rel_close(fit.intercept, c["B0"])
    assert rel_close(fit.intercept_se, c["B0_sd"])
    assert rel_close(fit.slope, c["B1"])
    assert rel_close(fit.slope_se, c["B1_sd"])
    assert rel_close(math.sqrt(resid @ resid / fit.dof), c["residual_sd"])
    assert rel_close(float(resid @ resid), c["residual_ss"])
    assert rel_close(fit.r_squared, c["r_squared"])


# --------------------------------------------------------------------------------------
# The pooled checks (reported by the analysis, never deciding)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pooled:
    points: PooledPoints
    fits: PooledFits
    stats: PooledStatistics
    checks: dict[str, Check]

    def __getattr__(self, name):  # the fits and summaries by name: result.ols, result.per_eta
        for part in (self.fits, self.stats, self.points):
            if hasattr(part, name):
                return getattr(part, name)
        raise AttributeError(name)


def pooled(etas, changes, *, first_order=None, resolvable=None, thresholds=None, repeats=None):
    """The pooled statistics and their six checks, composed as analysis.pooled_statistics
    composes them."""
    th = thresholds or PooledThresholds()
    points = pooled_points(etas, changes, first_order, resolvable, repeats)
    fits = pooled_fits(points, th.loglog_margin)
    residuals = pooled_residuals(points, fits)
    stats = PooledStatistics.of(points, fits, residuals)
    return Pooled(points, fits, stats, pooled_checks(points, fits, residuals, th))


@pytest.mark.cpu
def test_curved_data_with_high_r_squared_fails_the_other_checks():
    # ΔH = η + 5000·η²: the quadratic term adds 50 % at η = 1e-4.
    eta, dh = experiment(alpha=1.0, quad=5e3, rel_noise=0.02, seed=11)
    result = pooled(eta, dh)
    assert result.ols is not None and result.ols.r_squared >= 0.99
    assert result.checks["r_squared"].passed is True  # R² alone would call it linear
    failed = {k for k, c in result.checks.items() if c.passed is False}
    assert {"standardized_residual", "relative_residual", "lack_of_fit"} <= failed
    assert result.quadratic is not None
    assert abs(result.quadratic.a2 - 5e3) < far(result.quadratic.n - 2) * result.quadratic.a2_se


@pytest.mark.cpu
def test_pure_quadratic_scores_high_r_squared_but_fails_loglog():
    eta, dh = experiment(alpha=1e4, power=2.0, rel_noise=0.0, abs_noise=0.0, seed=0)
    dh = dh * (1 + 0.01 * np.random.default_rng(5).standard_normal(dh.size))
    result = pooled(eta, dh)
    assert result.ols is not None and result.ols.r_squared >= 0.97
    assert result.checks["loglog_slope"].passed is False
    assert result.loglog is not None and abs(result.loglog.slope - 2.0) < 0.05


@pytest.mark.cpu
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_linear_noisy_data_passes_every_check(seed):
    eta, dh = experiment(alpha=-0.8, rel_noise=0.03, seed=seed)
    result = pooled(eta, dh)
    assert set(result.checks) == CHECK_KEYS
    assert all(c.passed is True for c in result.checks.values())
    assert result.weighted is not None and result.weighted.method == "wls"
    assert result.origin is not None and abs(result.origin.slope + 0.8) < 0.02
    assert result.n_failed == 0


@pytest.mark.cpu
def test_too_few_resolvable_points_leave_lack_of_fit_undecided():
    eta, dh = experiment(alpha=1.0, seed=4)
    flags = {1e-8: False, 1e-7: False, 1e-6: False}
    result = pooled(eta, dh, resolvable=flags)
    assert result.resolvable == [False, False, False, True, True]
    assert result.checks["lack_of_fit"].passed is None
    assert "only 2 distinct η" in result.checks["lack_of_fit"].detail


@pytest.mark.cpu
def test_single_repeat_at_a_used_eta_leaves_the_se_checks_undecided():
    eta, dh = experiment(alpha=1.0, seed=4)
    dh[5:9] = np.nan  # η = 1e-7 keeps one successful repeat
    result = pooled(eta, dh)
    assert result.per_eta[1].n_samples == 1
    assert math.isnan(result.per_eta[1].stderr_entropy_change)
    assert result.checks["standardized_residual"].passed is None
    assert result.weighted is not None and result.weighted.method == "ols"  # fallback
    assert "fallback" in result.checks["intercept"].detail
    assert result.n_failed == 4


@pytest.mark.cpu
def test_identical_repeats_make_se_checks_undecidable():
    eta = np.repeat(GRID, 3)
    result = pooled(eta, 2.0 * eta)  # deterministic runs: SE = 0 everywhere
    assert result.checks["standardized_residual"].passed is None
    assert "SE = 0" in result.checks["standardized_residual"].detail
    assert result.checks["lack_of_fit"].passed is None


def _bad_case(check: str) -> tuple[np.ndarray, np.ndarray]:
    if check == "r_squared":  # linear but very noisy
        return experiment(alpha=1.0, rel_noise=0.6, seed=2)
    if check == "standardized_residual":  # one mean 5 % high, far outside its tiny SE
        eta, dh = experiment(alpha=1.0, rel_noise=0.005, seed=2)
        dh[eta == 1e-6] *= 1.05
        return eta, dh
    if check == "relative_residual":  # the smallest-η mean 30 % high
        eta, dh = experiment(alpha=1.0, rel_noise=0.01, seed=2)
        dh[eta == 1e-8] *= 1.3
        return eta, dh
    if check == "lack_of_fit":  # curvature with homoscedastic noise
        return experiment(alpha=1.0, quad=3e3, rel_noise=0.0, abs_noise=1e-6, seed=2)
    if check == "intercept":  # ΔH(0) = 5e-8 ≠ 0
        return experiment(alpha=1.0, beta=5e-8, rel_noise=0.01, seed=2)
    if check == "loglog_slope":  # ΔH ∝ η^1.3
        return experiment(alpha=1.0, power=1.3, rel_noise=0.01, seed=2)
    raise AssertionError(check)


@pytest.mark.cpu
@pytest.mark.parametrize("check", sorted(CHECK_KEYS))
def test_each_check_fails_on_its_planted_defect(check):
    eta, dh = _bad_case(check)
    result = pooled(eta, dh)
    c = result.checks[check]
    assert c.passed is False, c.detail
    assert c.value is not None and c.detail


@pytest.mark.cpu
def test_loglog_fails_when_means_change_sign():
    eta, dh = experiment(alpha=1.0, beta=-3e-8, rel_noise=0.01, seed=2)
    result = pooled(eta, dh)
    ll = result.loglog
    assert ll is not None and not ll.same_sign and not ll.within_margin
    assert "sign" in ll.note
    check = result.checks["loglog_slope"]
    assert check.passed is False and check.value is None


@pytest.mark.cpu
def test_check_records_threshold_value_and_detail():
    th = PooledThresholds(r2_min=0.9, loglog_margin=0.2)
    eta, dh = experiment(alpha=1.0, seed=0)
    result = pooled(eta, dh, thresholds=th)
    assert result.checks["r_squared"].threshold == 0.9
    assert result.checks["loglog_slope"].threshold == 0.2
    for key, c in result.checks.items():
        assert isinstance(c, Check) and c.name == key
        assert "\n" not in c.detail and c.detail


@pytest.mark.cpu
def test_the_pooled_thresholds_are_the_six_checks_limits():
    """PooledThresholds holds one limit per pooled check, each read by its check; Thresholds
    adds the paired verdict's and stays one flat record (run_meta.json, analysis.json)."""
    eta, dh = experiment(alpha=1.0, seed=0)
    names = [f.name for f in dataclasses.fields(PooledThresholds)]
    assert len(names) == len(POOLED_CHECKS) == 6
    for i, name in enumerate(names):
        sentinel = 0.123 + i / 1000
        result = pooled(eta, dh, thresholds=PooledThresholds(**{name: sentinel}))
        assert [c.name for c in result.checks.values() if c.threshold == sentinel], name
    flat = Thresholds().to_dict()
    assert list(flat)[:6] == names
    assert list(flat)[6:] == ["min_resolvable_points", "tolerance", "confidence"]


# --------------------------------------------------------------------------------------
# Bookkeeping: unresolvable η, failed runs, summaries, residual helpers
# --------------------------------------------------------------------------------------


@pytest.mark.cpu
def test_unresolvable_eta_is_reported_but_not_fitted():
    eta, dh = experiment(alpha=1.0, seed=5)
    dh[eta == 1e-8] = 7e-6 + 1e-8 * np.arange(5)  # garbage far above the 1e-8 signal
    result = pooled(eta, dh, resolvable={1e-8: False})
    assert [s.learning_rate for s in result.per_eta] == pytest.approx(list(GRID))
    assert result.per_eta[0].mean_entropy_change == pytest.approx(7.02e-6)
    assert result.resolvable == [False, True, True, True, True]
    assert result.ols is not None and result.ols.n == 20
    assert result.weighted is not None and result.weighted.n == 4
    assert result.loglog is not None and result.loglog.n == 4
    assert result.lack_of_fit is not None and result.lack_of_fit.df_pure_error == 16
    assert result.standardized_residual[0] is None and result.relative_residual[0] is None
    assert all(v is not None for v in result.standardized_residual[1:])
    assert all(c.passed is True for c in result.checks.values())
    # Without the flag the garbage point is fitted and fails the checks.
    assert any(c.passed is False for c in pooled(eta, dh).checks.values())


@pytest.mark.cpu
def test_failed_runs_are_dropped_and_counted():
    eta, dh = experiment(alpha=1.0, reps=6, seed=6)
    dh[[0, 7, 20]] = np.nan
    dh[24:30] = np.nan  # every run at η = 1e-4 failed
    result = pooled(eta, dh)
    assert result.n_failed == 9
    assert [s.n_samples for s in result.per_eta] == [5, 5, 6, 5, 0]
    assert result.resolvable == [True, True, True, True, False]
    assert math.isnan(result.per_eta[4].mean_entropy_change)
    assert result.ols is not None and result.ols.n == 21
    assert all(c.passed is True for c in result.checks.values())


@pytest.mark.cpu
def test_summarize_by_eta_groups_sorts_and_averages_predictions():
    etas = [1e-5, 1e-6, 1e-5, 1e-6, 1e-5]
    changes = [3.0, 1.0, 5.0, np.nan, 4.0]
    first = [2.0, 9.0, 4.0, 100.0, np.nan]
    out = summarize_by_eta(etas, changes, first)
    assert [s.learning_rate for s in out] == [1e-6, 1e-5]
    lo, hi = out
    assert lo.n_samples == 1 and lo.all_changes == [1.0]
    assert math.isnan(lo.std_entropy_change) and math.isnan(lo.stderr_entropy_change)
    assert lo.first_order_prediction == 9.0  # the failed run's prediction is dropped
    assert hi.n_samples == 3 and hi.mean_entropy_change == pytest.approx(4.0)
    assert hi.std_entropy_change == pytest.approx(1.0)
    assert hi.stderr_entropy_change == pytest.approx(1.0 / math.sqrt(3))
    assert (hi.min_entropy_change, hi.max_entropy_change) == (3.0, 5.0)
    assert hi.first_order_prediction == pytest.approx(3.0)
    assert summarize_by_eta([1e-5], [1.0])[0].first_order_prediction is None


@pytest.mark.cpu
def test_residual_helpers_edge_cases():
    z = standardized_residuals([1.0, 2.0, 3.0, 4.0], [0.5, 0.0, 0.0, np.nan], [0.0, 2.0, 4.0, 4.0])
    assert z[0] == 2.0 and z[1] == 0.0 and z[2] == -math.inf and math.isnan(z[3])
    rel = relative_residuals([1e-6, 1e-5], [1.1e-6, 0.9e-5], 1.0)
    np.testing.assert_allclose(rel, [0.1, -0.1])


@pytest.mark.cpu
def test_lack_of_fit_without_replicates_is_nan():
    lof = lack_of_fit_test(GRID, 2.0 * GRID + 1e-9 * np.arange(5))
    assert lof.df_pure_error == 0 and math.isnan(lof.p_value)
    assert lof.to_dict()["p_value"] is None


@pytest.mark.cpu
def test_invalid_inputs_raise():
    with pytest.raises(ValueError):
        fit_ols([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError):
        fit_wls([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 0.0, 1.0])
    with pytest.raises(ValueError):
        pooled([1e-6, -1e-6], [1.0, 2.0])
    with pytest.raises(ValueError):
        pooled([1e-6, 1e-5], [1.0])


# --------------------------------------------------------------------------------------
# JSON safety
# --------------------------------------------------------------------------------------


def _only_builtins(obj) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _only_builtins(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_only_builtins(v) for v in obj)
    return obj is None or type(obj) in (str, int, float, bool)


def _analyses() -> list[Pooled]:
    eta, dh = experiment(alpha=1.0, seed=0)
    bad = dh.copy()
    bad[5:9] = np.nan
    bad[20:25] = np.nan
    eta3 = np.repeat(GRID, 3)
    return [
        pooled(eta, dh, first_order=0.99 * eta),
        pooled(eta, bad, resolvable={1e-8: False}),
        pooled(eta3, 2.0 * eta3),
        pooled(eta[:5], dh[:5]),  # one η only
    ]


@pytest.mark.cpu
def test_to_dict_round_trips_through_strict_json():
    for result in _analyses():
        d = result.stats.to_dict()
        assert _only_builtins(d)
        text = json.dumps(d, allow_nan=False)
        assert json.loads(text) == d
        assert set(result.checks) == CHECK_KEYS
        for check in result.checks.values():
            assert _only_builtins(check.to_dict())
        assert len(d["per_eta"]) == len(d["resolvable"]) == len(d["standardized_residual"])
    sub = [
        fit_ols(GRID, GRID),
        fit_wls(GRID, GRID, GRID),
        fit_origin(GRID, GRID),
        fit_quadratic(GRID, GRID),
        loglog_slope(GRID, -GRID * np.array([1, 1, -1, 1, 1])),
    ]
    for obj in sub:
        d = obj.to_dict()
        assert _only_builtins(d)
        json.dumps(d, allow_nan=False)


# --------------------------------------------------------------------------------------
# Common random numbers: the paired log-log slope
# --------------------------------------------------------------------------------------


def crn_experiment(
    *,
    grid: np.ndarray,
    power: float = 1.0,
    quad: float = 0.0,
    reps: int = 3,
    slope_spread: float = 0.3,
    noise: float = 1e-4,
    seed: int = 0,
    signs: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sweep's design: repeat r has its own direction size s_r, shared by all its η.

    ΔH_r(η) = s_r·(η^power + quad·η²)·(1 + noise·ε), s_r = ±(1 + slope_spread·z_r).
    """
    rng = np.random.default_rng(seed)
    s = 1.0 + slope_spread * rng.standard_normal(reps)
    if signs is not None:
        s = s * signs
    eta = np.tile(grid, reps)
    rep = np.repeat(np.arange(reps), grid.size)
    dh = s[rep] * (eta**power + quad * eta**2) * (1 + noise * rng.standard_normal(eta.size))
    return eta, dh, rep


@pytest.mark.cpu
def test_paired_loglog_resolves_what_the_means_cannot():
    # The quick run's shape: 3 η × 3 repeats, directions 30 % apart, ΔH/η flat to 0.3 %.
    grid = np.array([1e-7, 1e-6, 1e-5])
    eta, dh, rep = crn_experiment(grid=grid, quad=300.0, seed=4)
    unpaired = pooled(eta, dh)
    paired = pooled(eta, dh, repeats=rep)
    assert not unpaired.loglog.paired and unpaired.checks["loglog_slope"].passed is False
    assert paired.loglog.paired and paired.loglog.n_repeats == 3
    assert paired.checks["loglog_slope"].passed is True, paired.checks["loglog_slope"].detail
    assert abs(paired.loglog.slope - 1.0) < 0.01


@pytest.mark.cpu
@pytest.mark.parametrize("power", [0.85, 1.2, 2.0])
def test_paired_loglog_fails_a_planted_power_law(power):
    grid = np.array([1e-7, 1e-6, 1e-5])
    eta, dh, rep = crn_experiment(grid=grid, power=power, seed=4)
    result = pooled(eta, dh, repeats=rep)
    assert result.checks["loglog_slope"].passed is False
    assert abs(result.loglog.slope - power) < 1e-3


@pytest.mark.cpu
@settings(deadline=None, max_examples=30)
@given(seed=SEEDS, power=st.floats(0.5, 2.0), noise=st.floats(1e-4, 0.05))
def test_paired_loglog_recovers_planted_power(seed, power, noise):
    eta, dh, rep = crn_experiment(grid=GRID, power=power, reps=5, noise=noise, seed=seed)
    ll = paired_loglog_slope(eta, dh, rep)
    assert ll.paired and ll.n_repeats == 5 and ll.n == GRID.size
    assert abs(ll.slope - power) < far(ll.n_repeats - 1) * ll.slope_se
    assert ll.ci_low < ll.slope < ll.ci_high


@pytest.mark.cpu
def test_paired_loglog_signs_only_need_to_agree_within_a_repeat():
    grid = np.array([1e-7, 1e-6, 1e-5])
    signs = np.array([1.0, -1.0, 1.0])
    eta, dh, rep = crn_experiment(grid=grid, seed=1, signs=signs)
    ll = paired_loglog_slope(eta, dh, rep)
    assert ll.same_sign and ll.within_margin
    dh[(rep == 1) & (eta == 1e-6)] *= -1  # a sign flip inside repeat 1
    ll = paired_loglog_slope(eta, dh, rep)
    assert not ll.same_sign and not ll.within_margin and "repeat(s) [1]" in ll.note
    check = pooled(eta, dh, repeats=rep).checks["loglog_slope"]
    assert check.passed is False


@pytest.mark.cpu
def test_paired_loglog_skips_incomplete_repeats():
    grid = np.array([1e-7, 1e-6, 1e-5])
    eta, dh, rep = crn_experiment(grid=grid, reps=4, seed=2)
    dh[(rep == 3) & (eta == 1e-6)] = np.nan  # a failed point
    ll = paired_loglog_slope(eta, dh, rep)
    assert ll.n_repeats == 3
    eta2, dh2, rep2 = crn_experiment(grid=grid, reps=2, seed=2)
    dh2[rep2 == 1] = np.nan
    ll = paired_loglog_slope(eta2, dh2, rep2)
    assert ll.n_repeats == 1 and math.isnan(ll.slope) and "≥ 2 complete repeats" in ll.note


# ---- relative bends under equal absolute noise (records without a noise estimate) -------------


def bent_groups(bends, grids, sigma, seed=0, slope=-700.0):
    """(x, y) per group: y = s_g·x·(1 + b_g·x/x_top) + N(0, σ²), one absolute σ for all."""
    rng = np.random.default_rng(seed)
    out = []
    for g, (b, x) in enumerate(zip(bends, grids)):
        x = np.asarray(x, dtype=float)
        s = slope * (1 + 0.1 * g)
        out.append((x, s * x * (1 + b * x / x.max()) + sigma * rng.standard_normal(x.size)))
    return out


@pytest.mark.cpu
def test_fit_bends_matches_statsmodels_on_the_stacked_design():
    """One OLS over all groups (a block of [x, x²] per group, no constant) has the same
    coefficients, the pooled σ² as its scale, and the delta-method SE of q·x_top/s."""
    sm = pytest.importorskip("statsmodels.api")
    grids = [1e-6 * 2.0 ** np.arange(5), 1e-6 * 2.0 ** np.arange(4), [1e-7, 1e-6, 1e-5]]
    groups = bent_groups([0.03, -0.1, 0.0], grids, sigma=3e-5, seed=4)
    fit = fit_bends(groups)
    blocks = []
    for g, (x, _) in enumerate(groups):
        cols = np.zeros((len(x), 2 * len(groups)))
        cols[:, 2 * g], cols[:, 2 * g + 1] = x, x**2
        blocks.append(cols)
    design, y = np.vstack(blocks), np.concatenate([y for _, y in groups])
    scale = 1e5  # statsmodels wants O(1) columns
    design[:, 0::2] *= scale
    design[:, 1::2] *= scale**2
    ref = sm.OLS(y, design).fit()
    assert fit.dof == ref.df_resid == 3 + 2 + 1
    assert fit.sigma == pytest.approx(math.sqrt(ref.scale), rel=1e-8)
    cov = ref.cov_params()
    for g, (x, _) in enumerate(groups):
        s, q = ref.params[2 * g] * scale, ref.params[2 * g + 1] * scale**2
        top = max(x)
        b = fit.fits[g]
        assert b.slope == pytest.approx(s, rel=1e-8) and b.quadratic == pytest.approx(q, rel=1e-6)
        assert b.bend == pytest.approx(q * top / s, rel=1e-6)
        assert b.slope_se == pytest.approx(math.sqrt(cov[2 * g, 2 * g]) * scale, rel=1e-6)
        grad = np.array([-q * top / s**2 * scale, top / s * scale**2])
        sub = cov[2 * g : 2 * g + 2, 2 * g : 2 * g + 2]
        assert b.bend_se == pytest.approx(math.sqrt(grad @ sub @ grad), rel=1e-6)


@pytest.mark.cpu
def test_fit_bends_reads_an_offset_as_slope_and_a_bend_as_bend():
    """ΔH/η 20 % off at every η is a different slope, not a bend; 12 % at the top is one."""
    grid = 1e-6 * 2.0 ** np.arange(5)
    flat = fit_bends([(grid, -700 * 1.2 * grid), (grid, -700 * grid)])
    assert [b.bend for b in flat.fits] == pytest.approx([0.0, 0.0], abs=1e-9)
    assert flat.fits[0].slope == pytest.approx(-840.0, rel=1e-9)
    bent = fit_bends(bent_groups([0.12, 0.12], [grid, grid], sigma=0.0))
    assert [b.bend for b in bent.fits] == pytest.approx([0.12, 0.12], rel=1e-9)
    assert fit_bends([(grid[:1], [-1e-3])]).fits == [None] and math.isnan(
        fit_bends([(grid[:2], -700 * grid[:2])]).sigma
    )  # no second η: no fit; no third: no residual


@pytest.mark.cpu
def test_bend_intervals_have_nominal_coverage():
    """The delta-method t intervals of the bends cover the planted ones about 95 % of the
    time at the anchor study's noise (σ ≈ 9 % of ΔH at the smallest η)."""
    grid = 1e-6 * 2.0 ** np.arange(5)
    bends = [0.0, 0.04, -0.08, 0.12]
    hits = total = 0
    for seed in range(600):
        fit = fit_bends(bent_groups(bends, [grid] * 4, sigma=6e-5, seed=seed))
        t = sps.t.ppf(0.975, fit.dof)
        for b, f in zip(bends, fit.fits):
            hits += abs(f.bend - b) <= t * f.bend_se
            total += 1
    assert 0.93 <= hits / total <= 0.97


@pytest.mark.cpu
def test_mean_abs_lower_bound_is_not_raised_by_noise():
    """Noise of either sign raises mean |θ̂| past the tolerance; the bound stays below it."""
    estimates = np.array([0.06, -0.07, 0.05, -0.06, 0.08, -0.05])  # about 1 SE each
    assert np.mean(np.abs(estimates)) > 0.05  # a tolerance of 5 % "exceeded"
    assert mean_abs_lower_bound(estimates, np.full(6, 0.05), dof=18) == 0.0
    # Planted large |θ| of either sign: each direction carries it.
    mixed = np.array([0.2, -0.2, 0.2, -0.2])
    assert mean_abs_lower_bound(mixed, np.full(4, 0.01), dof=12) > 0.15
    # One sign: the bound of |mean θ| is √k tighter than the per-group ones.
    same = np.full(8, 0.1)
    wide = np.full(8, 0.02)
    each = 0.1 - simultaneous_t(0.95, 16, 24) * 0.02
    assert mean_abs_lower_bound(same, wide, dof=24) > each + 0.02
    assert math.isnan(mean_abs_lower_bound([0.1, 0.2], [0.01, math.nan], dof=3))


@pytest.mark.cpu
def test_mean_abs_lower_bound_covers_at_the_confidence():
    """P(bound > mean |θ|) ≤ 5 %, for θ of mixed signs and of one sign, t-distributed noise
    (σ estimated with 10 dof)."""
    rng = np.random.default_rng(1)
    for theta in (np.array([0.0, 0.03, -0.05, 0.02, 0.0]), np.full(5, 0.04)):
        misses = 0
        for _ in range(3000):
            scale = math.sqrt(rng.chisquare(10) / 10)  # σ̂/σ with 10 dof, shared
            estimates = theta + 0.03 * rng.standard_normal(theta.size)
            misses += mean_abs_lower_bound(estimates, np.full(5, 0.03 * scale), 10) > np.mean(
                np.abs(theta)
            )
        assert misses / 3000 <= 0.05
