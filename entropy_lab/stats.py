"""Statistics for the question "is ΔH linear in the learning rate η?".

The experiment measures the entropy change ΔH after one optimizer step at a
log-spaced grid of learning rates (for example 1e-8 … 1e-4) with several
repeats per η, and asks whether ΔH ≈ α·η + β.

The verdict is paired, one update direction per repeat, and lives in
``analysis.py``; this module holds the statistical tools it uses (mean and SE,
upper confidence bounds, straight-line fits, the random-slope mixed model) and
the original experiment's pooled statistics, which ``analysis`` reports but
never lets decide.

Why R² is not enough: on a log grid the largest η carries almost all of the
spread in x (its leverage is about 0.99), so a straight line through the
cluster of small-η points and the single large-η point fits almost anything
monotone.  ΔH ∝ η² still scores R² ≈ 0.99.  The pooled statistics are therefore
six checks (``POOLED_CHECKS``), each on the points, fits and residuals of
``pooled_points``, ``pooled_fits`` and ``pooled_residuals``, each looking at a
different way a curve can hide behind a high R²:

``r_squared``
    OLS R² on every raw (η, repeat) point — the original criterion, kept for
    comparison.
``standardized_residual``
    Each per-η mean against the weighted (1/SE²) line, in units of its own
    standard error.  Small-η points get a say because their SEs are small.
``relative_residual``
    (ȳ/η − α)/α against the slope α of a line through the origin.  A linear
    law means ΔH/η is the same at every η; curvature shows up as a trend.
``lack_of_fit``
    The classic replicate-based F test: does the spread of the per-η means
    around the line exceed what the spread of the repeats allows?
``intercept``
    ΔH(0) must be 0 (no step, no change), so a significant intercept of the
    weighted line means the data bend.
``loglog_slope``
    The slope of log|ΔH| against log η must be 1 for a linear law; its 95 %
    confidence interval must lie inside [1 − m, 1 + m] (an equivalence test).
    With repeat ids (the sweep's common-random-numbers design) it is paired:
    one slope per repeat, the interval from their spread.

Common random numbers: every η of a repeat reuses that repeat's update batch,
so the repeat-to-repeat spread (mostly the size of the update direction) is
shared by all η.  The SE-based checks on per-η means (standardized residual,
lack of fit, intercept) treat it as independent noise per η, so they are not
evidence: a 12 % bend is caught at 3 % direction spread and missed at 20 %.
That is why they are reported, not deciding (DESIGN §4), and why this module
gives no pooled verdict of its own.

Every result is a frozen dataclass; the ones written to analysis.json have a
``to_dict()`` returning JSON-safe built-in types (non-finite floats become
``None``, through ``jsonio.json_safe``).  Only numpy and scipy are used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats as sps

from entropy_lab.jsonio import json_safe

__all__ = [
    "CHECK_NAMES",
    "POOLED_CHECKS",
    "BendFit",
    "Check",
    "EtaSummary",
    "LackOfFit",
    "LinearFit",
    "LogLogSlope",
    "MeanSE",
    "OriginFit",
    "PooledBends",
    "PooledFits",
    "PooledPoints",
    "PooledResiduals",
    "PooledStatistics",
    "PooledThresholds",
    "QuadraticFit",
    "RandomSlopeFit",
    "Thresholds",
    "fit_bends",
    "fit_ols",
    "fit_origin",
    "fit_quadratic",
    "fit_random_slope",
    "fit_wls",
    "intercept_check",
    "lack_of_fit_check",
    "lack_of_fit_test",
    "loglog_check",
    "loglog_slope",
    "mean_abs_lower_bound",
    "mean_stderr",
    "paired_loglog_slope",
    "pooled_checks",
    "pooled_fits",
    "pooled_points",
    "pooled_residuals",
    "r_squared_check",
    "relative_residual_check",
    "relative_residuals",
    "simultaneous_t",
    "standardized_residual_check",
    "standardized_residuals",
    "summarize_by_eta",
    "upper_bound",
]

_NAN = float("nan")


class _ToDict:
    """Mixin giving dataclasses a JSON-safe ``to_dict``."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe built-ins (non-finite floats become None), nested results included."""
        return json_safe({f.name: getattr(self, f.name) for f in fields(self)})


# --------------------------------------------------------------------------------------
# Input helpers
# --------------------------------------------------------------------------------------


def _vector(name: str, values: npt.ArrayLike) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _finite_vector(name: str, values: npt.ArrayLike) -> np.ndarray:
    arr = _vector(name, values)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (drop failed runs first)")
    return arr


def _same_length(**arrays: np.ndarray) -> int:
    lengths = {name: arr.size for name, arr in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"lengths differ: {lengths}")
    return next(iter(lengths.values()))


def _two_sided_p(stat: float, dof: float | None) -> float:
    """Two-sided p-value of ``stat`` under t(dof), or the normal law if dof is None."""
    if math.isnan(stat):
        return _NAN
    if dof is None:
        return float(2.0 * sps.norm.sf(abs(stat)))
    if dof <= 0:
        return _NAN
    return float(2.0 * sps.t.sf(abs(stat), dof))


def _ratio(num: float, den: float) -> float:
    """num/den with 0/0 → NaN and x/0 → ±inf, without numpy warnings."""
    if den == 0 or math.isnan(den):
        if num == 0 or math.isnan(num) or math.isnan(den):
            return _NAN
        return math.copysign(math.inf, num)
    return num / den


# --------------------------------------------------------------------------------------
# Mean and standard error (the one routine every module uses)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeanSE(_ToDict):
    """Mean, sample SD (ddof = 1), standard error and count of some values.

    ``std`` and ``stderr`` are NaN (``None`` in ``to_dict``) for fewer than 2 values,
    ``mean`` for none.
    """

    mean: float
    std: float
    stderr: float
    n: int


def mean_stderr(values: npt.ArrayLike) -> MeanSE:
    """Mean, SD and SE of finite values (non-finite ones are dropped)."""
    arr = _vector("values", values)
    arr = arr[np.isfinite(arr)]
    n = int(arr.size)
    if n == 0:
        return MeanSE(_NAN, _NAN, _NAN, 0)
    # Shift by the first value: identical values then give an SD of exactly 0.
    std = float((arr - arr[0]).std(ddof=1)) if n >= 2 else _NAN
    return MeanSE(float(arr.mean()), std, std / math.sqrt(n) if n >= 2 else _NAN, n)


def upper_bound(values: npt.ArrayLike, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound of the mean: x̄ + t_{confidence, n−1}·SE.

    NaN for fewer than 2 finite values (no spread, no bound).
    """
    m = mean_stderr(values)
    if m.n < 2:
        return _NAN
    return m.mean + float(sps.t.ppf(confidence, m.n - 1)) * m.stderr


# --------------------------------------------------------------------------------------
# Thresholds and per-η summaries
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PooledThresholds(_ToDict):
    """Pass/fail limits of the six pooled checks (``POOLED_CHECKS``), reported, never
    deciding."""

    r2_min: float = 0.95  # also the paired verdict's, for each repeat's own line
    max_standardized_residual: float = 3.0
    max_relative_residual: float = 0.1
    lack_of_fit_alpha: float = 0.01  # pass if p > alpha
    intercept_alpha: float = 0.01  # intercept test: pass if p > alpha
    loglog_margin: float = 0.1  # CI of the log-log slope must lie in [1 - m, 1 + m]


@dataclass(frozen=True)
class Thresholds(PooledThresholds):
    """Every limit of the analysis, one flat record (run_meta.json and analysis.json's
    ``thresholds.linearity``): the six pooled ones (``PooledThresholds``, reported) and the
    paired verdict's (analysis.py, deciding): r2_min for each repeat's own line, the
    resolvable points needed, the tolerance and the confidence of its bounds."""

    min_resolvable_points: int = 3
    # The paired verdict: |ΔH_r/η| may bend by this much from its small-η value.
    tolerance: float = 0.05
    confidence: float = 0.95  # of the upper bounds over repeats


@dataclass(frozen=True)
class EtaSummary(_ToDict):
    """The successful repeats at one learning rate."""

    learning_rate: float
    n_samples: int
    mean_entropy_change: float  # NaN when n_samples == 0
    std_entropy_change: float  # sample SD (ddof=1); NaN when n_samples < 2
    stderr_entropy_change: float  # std / sqrt(n); NaN when n_samples < 2
    min_entropy_change: float
    max_entropy_change: float
    all_changes: list[float]
    first_order_prediction: float | None  # mean of the per-repeat predictions, if given


def summarize_by_eta(
    etas: npt.ArrayLike,
    changes: npt.ArrayLike,
    first_order: npt.ArrayLike | None = None,
) -> list[EtaSummary]:
    """Group raw (η, ΔH) pairs by η, sorted by η.

    Non-finite changes (failed runs) are dropped; an η whose runs all failed is
    still listed, with ``n_samples == 0`` and NaN statistics.  ``first_order``
    holds one prediction per raw pair; its entry is averaged over the repeats
    kept at that η (non-finite predictions are ignored; ``None`` if none left).
    """
    eta = _finite_vector("etas", etas)
    dh = _vector("changes", changes)
    pred = None if first_order is None else _vector("first_order", first_order)
    if pred is None:
        _same_length(etas=eta, changes=dh)
    else:
        _same_length(etas=eta, changes=dh, first_order=pred)

    out: list[EtaSummary] = []
    for value in np.unique(eta):
        rows = eta == value
        ok = rows & np.isfinite(dh)
        ys = dh[ok]
        n = int(ys.size)
        m = mean_stderr(ys)
        mean, std, stderr = m.mean, m.std, m.stderr
        first: float | None = None
        if pred is not None:
            kept = pred[ok]
            kept = kept[np.isfinite(kept)]
            first = float(kept.mean()) if kept.size else None
        out.append(
            EtaSummary(
                learning_rate=float(value),
                n_samples=n,
                mean_entropy_change=mean,
                std_entropy_change=std,
                stderr_entropy_change=stderr,
                min_entropy_change=float(ys.min()) if n else _NAN,
                max_entropy_change=float(ys.max()) if n else _NAN,
                all_changes=[float(v) for v in ys],
                first_order_prediction=first,
            )
        )
    return out


# --------------------------------------------------------------------------------------
# Straight-line fits
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearFit(_ToDict):
    """y = slope·x + intercept.

    ``residuals`` are the raw y − ŷ (not weighted).  ``leverage`` is the diagonal
    of the (weighted) hat matrix.  For OLS the parameter SEs use the residual
    variance SSE/(n − 2) and the intercept test is a t test with n − 2 degrees
    of freedom; ``chi2`` and ``reduced_chi2`` are ``None``.  For WLS see
    :func:`fit_wls`.
    """

    slope: float
    intercept: float
    slope_se: float
    intercept_se: float
    r_squared: float
    n: int
    dof: int
    residuals: list[float]
    leverage: list[float]
    intercept_t: float
    intercept_p: float
    chi2: float | None
    reduced_chi2: float | None
    method: str = "ols"  # "ols" or "wls"


def _check_line_inputs(x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    xa = _finite_vector("x", x)
    ya = _finite_vector("y", y)
    _same_length(x=xa, y=ya)
    if np.unique(xa).size < 2:
        raise ValueError("a straight-line fit needs at least two distinct x values")
    return xa, ya


@dataclass(frozen=True)
class _LineSums:
    """Centred weighted sums of a straight-line least-squares fit."""

    slope: float
    intercept: float
    sw: float  # Σw
    xm: float  # weighted mean of x
    dx: np.ndarray  # x − xm
    sxx: float  # Σw·dx²
    resid: np.ndarray  # y − ŷ
    wsse: float  # Σw·resid²
    wsst: float  # Σw·(y − ȳ_w)²


def _weighted_line(xa: np.ndarray, ya: np.ndarray, w: np.ndarray) -> _LineSums:
    """The fit shared by OLS (w = 1) and WLS: centred sums keep full precision for x on the
    1e-8 … 1e-4 scale."""
    sw = float(w.sum())
    xm = float(w @ xa) / sw
    ym = float(w @ ya) / sw
    dx = xa - xm
    dy = ya - ym
    sxx = float(w @ (dx * dx))
    slope = float(w @ (dx * dy)) / sxx
    resid = dy - slope * dx
    return _LineSums(
        slope=slope,
        intercept=ym - slope * xm,
        sw=sw,
        xm=xm,
        dx=dx,
        sxx=sxx,
        resid=resid,
        wsse=float(w @ (resid * resid)),
        wsst=float(w @ (dy * dy)),
    )


def fit_ols(x: npt.ArrayLike, y: npt.ArrayLike) -> LinearFit:
    """Ordinary least squares line through every point.

    Uses centred sums (slope = Sxy/Sxx), which keeps full precision for x on
    the 1e-8 … 1e-4 scale and reproduces the NIST StRD certified values.
    """
    xa, ya = _check_line_inputs(x, y)
    n = xa.size
    line = _weighted_line(xa, ya, np.ones_like(xa))
    dof = n - 2
    s2 = line.wsse / dof if dof > 0 else _NAN
    slope_se = math.sqrt(s2 / line.sxx)
    intercept_se = math.sqrt(s2 * (1.0 / n + line.xm * line.xm / line.sxx))
    t_stat = _ratio(line.intercept, intercept_se)
    return LinearFit(
        slope=line.slope,
        intercept=line.intercept,
        slope_se=slope_se,
        intercept_se=intercept_se,
        r_squared=1.0 - line.wsse / line.wsst if line.wsst > 0 else _NAN,
        n=n,
        dof=dof,
        residuals=[float(v) for v in line.resid],
        leverage=[float(v) for v in 1.0 / n + line.dx * line.dx / line.sxx],
        intercept_t=t_stat,
        intercept_p=_two_sided_p(t_stat, dof),
        chi2=None,
        reduced_chi2=None,
        method="ols",
    )


def fit_wls(x: npt.ArrayLike, y: npt.ArrayLike, sigma: npt.ArrayLike) -> LinearFit:
    """Weighted least squares line with weights 1/σ², σ = absolute 1σ errors.

    Parameter SEs come from (XᵀWX)⁻¹ *without* rescaling by the reduced χ²
    (the "absolute sigma" convention): σ is taken as the known error of each
    point, e.g. the standard error of a per-η mean.  ``chi2`` = Σ w·r² and
    ``reduced_chi2`` = χ²/(n − 2) report how well that assumption holds.

    The intercept test is a **z test** (standard normal reference), because
    with known σ the statistic β̂/SE(β̂) is normal under H0: β = 0 and no
    variance is estimated from the residuals.  When σ are SEs of means from
    only a few repeats the z test is somewhat liberal; a t reference would be
    no more correct, so the choice is stated rather than hidden.

    ``r_squared`` is the weighted R² (1 − χ²/Σw(y − ȳ_w)²), as statsmodels'
    WLS reports it.
    """
    xa, ya = _check_line_inputs(x, y)
    sig = _finite_vector("sigma", sigma)
    _same_length(x=xa, sigma=sig)
    if not np.all(sig > 0):
        raise ValueError("sigma must be > 0 everywhere for a weighted fit")
    n = xa.size
    # Normalise weights to max 1 (avoids overflow for tiny σ); undo in variances.
    smin = float(sig.min())
    w = (smin / sig) ** 2
    line = _weighted_line(xa, ya, w)
    chi2 = line.wsse / smin**2
    dof = n - 2
    slope_se = smin / math.sqrt(line.sxx)
    intercept_se = smin * math.sqrt(1.0 / line.sw + line.xm * line.xm / line.sxx)
    z_stat = _ratio(line.intercept, intercept_se)
    return LinearFit(
        slope=line.slope,
        intercept=line.intercept,
        slope_se=slope_se,
        intercept_se=intercept_se,
        r_squared=1.0 - line.wsse / line.wsst if line.wsst > 0 else _NAN,
        n=n,
        dof=dof,
        residuals=[float(v) for v in line.resid],
        leverage=[float(v) for v in w * (1.0 / line.sw + line.dx * line.dx / line.sxx)],
        intercept_t=z_stat,
        intercept_p=_two_sided_p(z_stat, None),
        chi2=chi2,
        reduced_chi2=chi2 / dof if dof > 0 else _NAN,
        method="wls",
    )


@dataclass(frozen=True)
class OriginFit(_ToDict):
    """y = slope·x (line forced through the origin: ΔH(0) = 0)."""

    slope: float
    slope_se: float
    r_squared: float  # uncentred: 1 − Σw r² / Σw y²
    n: int
    weighted: bool = False  # True: absolute-σ weights 1/σ², SE from (Σx²/σ²)^-1/2


def fit_origin(x: npt.ArrayLike, y: npt.ArrayLike, sigma: npt.ArrayLike | None = None) -> OriginFit:
    """Least-squares slope through the origin.

    Without ``sigma``: SE = sqrt(s²/Σx²) with s² = RSS/(n − 1).  With ``sigma``
    (absolute 1σ errors): weights 1/σ² and SE = (Σx²/σ²)^-1/2, not rescaled.
    """
    xa = _finite_vector("x", x)
    ya = _finite_vector("y", y)
    n = _same_length(x=xa, y=ya)
    if n < 1 or not np.any(xa != 0):
        raise ValueError("a fit through the origin needs at least one non-zero x")
    if sigma is None:
        w = np.ones_like(xa)
        scale = 1.0
    else:
        sig = _finite_vector("sigma", sigma)
        _same_length(x=xa, sigma=sig)
        if not np.all(sig > 0):
            raise ValueError("sigma must be > 0 everywhere for a weighted fit")
        scale = float(sig.min())
        w = (scale / sig) ** 2
    sxx = float(w @ (xa * xa))
    slope = float(w @ (xa * ya)) / sxx
    resid = ya - slope * xa
    wrss = float(w @ (resid * resid))
    wyy = float(w @ (ya * ya))
    if sigma is None:
        se = math.sqrt(wrss / (n - 1) / sxx) if n > 1 else _NAN
    else:
        se = scale / math.sqrt(sxx)
    return OriginFit(
        slope=slope,
        slope_se=se,
        r_squared=1.0 - wrss / wyy if wyy > 0 else _NAN,
        n=n,
        weighted=sigma is not None,
    )


@dataclass(frozen=True)
class QuadraticFit(_ToDict):
    """y = a1·x + a2·x² (no intercept: ΔH(0) = 0), ordinary least squares."""

    a1: float
    a2: float
    a1_se: float
    a2_se: float
    n: int


def fit_quadratic(x: npt.ArrayLike, y: npt.ArrayLike) -> QuadraticFit:
    """OLS fit of y = a1·x + a2·x²; SEs from s²(XᵀX)⁻¹ with s² = RSS/(n − 2).

    The columns are rescaled by max|x| and solved by QR, so x ≈ 1e-4 (x² ≈ 1e-8)
    causes no conditioning trouble.
    """
    xa = _finite_vector("x", x)
    ya = _finite_vector("y", y)
    n = _same_length(x=xa, y=ya)
    if np.unique(xa[xa != 0]).size < 2:
        raise ValueError("a quadratic through the origin needs two distinct non-zero x values")
    s = float(np.max(np.abs(xa)))
    u = xa / s
    design = np.column_stack([u, u * u])
    q, r = np.linalg.qr(design)
    coef = np.linalg.solve(r, q.T @ ya)
    resid = ya - design @ coef
    dof = n - 2
    s2 = float(resid @ resid) / dof if dof > 0 else _NAN
    r_inv = np.linalg.inv(r)
    cov = s2 * (r_inv @ r_inv.T)
    return QuadraticFit(
        a1=float(coef[0]) / s,
        a2=float(coef[1]) / s**2,
        a1_se=math.sqrt(cov[0, 0]) / s,
        a2_se=math.sqrt(cov[1, 1]) / s**2,
        n=n,
    )


# --------------------------------------------------------------------------------------
# Relative bends under equal absolute noise, pooled over groups (update directions)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BendFit(_ToDict):
    """One group's y = s·x + q·x² and its relative bend b = q·x_top/s at its largest x.

    ``bend_se`` is the delta-method SE of b with the noise σ pooled over the groups
    (:class:`PooledBends`): b is a ratio, so it is only meaningful while |s| is well
    above ``slope_se``.
    """

    slope: float  # s: y/x as x → 0
    slope_se: float
    quadratic: float  # q
    bend: float  # q·x_top/s
    bend_se: float
    x_top: float
    n: int
    rss: float  # residual sum of squares of this group's fit


@dataclass(frozen=True)
class PooledBends(_ToDict):
    """:func:`fit_bends`: one BendFit per group (None: fewer than 2 distinct x) and the
    pooled noise σ with its degrees of freedom (σ NaN when no group has a residual)."""

    fits: list[BendFit | None]
    sigma: float
    dof: int


def fit_bends(groups: list[tuple[npt.ArrayLike, npt.ArrayLike]]) -> PooledBends:
    """Per group (x, y), the least-squares y = s·x + q·x² through the origin, with one noise
    level σ for every point of every group: σ² = Σ RSS / Σ (n − 2).

    Equal absolute noise makes ordinary least squares on y the weighted fit of y/x = s + q·x
    with weights x² (the noise of y/x is σ/x). The bend b = q·x_top/s is the relative
    departure of y/x at the group's largest x from its x → 0 value s; a constant offset of
    y/x moves s, not b. Columns are scaled by x_top (x ≈ 1e-5 gives x² ≈ 1e-10).
    """
    parts = []
    for x, y in groups:
        xa = _finite_vector("x", x)
        ya = _finite_vector("y", y)
        _same_length(x=xa, y=ya)
        if np.unique(xa[xa != 0]).size < 2:
            parts.append(None)
            continue
        top = float(np.max(np.abs(xa)))
        u = xa / top
        q, r = np.linalg.qr(np.column_stack([u, u * u]))
        coef = np.linalg.solve(r, q.T @ ya)  # (s·x_top, q·x_top²)
        resid = ya - np.column_stack([u, u * u]) @ coef
        r_inv = np.linalg.inv(r)
        parts.append((coef, r_inv @ r_inv.T, top, int(xa.size), float(resid @ resid)))
    dof = sum(p[3] - 2 for p in parts if p is not None)
    rss = sum(p[4] for p in parts if p is not None)
    sigma = math.sqrt(rss / dof) if dof > 0 else _NAN
    fits: list[BendFit | None] = []
    for p in parts:
        if p is None:
            fits.append(None)
            continue
        (a, c), unscaled, top, n, part_rss = p
        cov = sigma**2 * unscaled
        bend = float(c / a) if a != 0 else _NAN
        # ∂b/∂a = −c/a², ∂b/∂c = 1/a
        grad = np.array([-c / a**2, 1 / a]) if a != 0 else np.array([_NAN, _NAN])
        fits.append(
            BendFit(
                slope=float(a) / top,
                slope_se=math.sqrt(cov[0, 0]) / top,
                quadratic=float(c) / top**2,
                bend=bend,
                bend_se=math.sqrt(float(grad @ cov @ grad)) if dof > 0 else _NAN,
                x_top=top,
                n=n,
                rss=part_rss,
            )
        )
    return PooledBends(fits=fits, sigma=sigma, dof=dof)


def simultaneous_t(confidence: float, k: int, dof: int) -> float:
    """Two-sided Student t quantile for k intervals that hold together at ``confidence``
    (Bonferroni); NaN without degrees of freedom."""
    if dof <= 0 or k <= 0:
        return _NAN
    return float(sps.t.ppf(1 - (1 - confidence) / (2 * k), dof))


def mean_abs_lower_bound(
    estimates: npt.ArrayLike, stderr: npt.ArrayLike, dof: int, confidence: float = 0.95
) -> float:
    """Lower confidence bound of the mean of |θ_g| over k groups, from independent estimates
    θ̂_g with standard errors (Student t with ``dof``).

    The mean of |θ̂_g| is raised by noise of either sign, so it is no evidence that the |θ_g|
    are large. Two bounds that noise cannot raise, holding together (Bonferroni):
    each |θ_g| ≥ max(0, |θ̂_g| − t·se_g), so their mean is at least the mean of those (for
    θ_g of either sign); and mean |θ_g| ≥ |mean θ_g| ≥ |mean θ̂_g| − t·√(Σse²)/k (for θ_g of
    one sign it is √k times tighter). The larger of the two; NaN if an SE is not finite.
    """
    est = _vector("estimates", estimates)
    se = _vector("stderr", stderr)
    k = _same_length(estimates=est, stderr=se)
    if k == 0 or not (np.all(np.isfinite(se)) and np.all(np.isfinite(est))):
        return _NAN
    each = simultaneous_t(confidence, 2 * k, dof)  # k intervals, half the error rate
    per_group = float(np.mean(np.maximum(np.abs(est) - each * se, 0.0)))
    pooled_t = simultaneous_t(confidence, 2, dof)  # one interval, the other half
    pooled = abs(float(np.mean(est))) - pooled_t * math.sqrt(float(se @ se)) / k
    return max(per_group, pooled, 0.0)


# --------------------------------------------------------------------------------------
# Random-slope mixed model: the population slope over update directions
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RandomSlopeFit(_ToDict):
    """y_rj = β + (α + a_r)·x_rj + ε_rj, a_r ~ N(0, τ²), ε ~ N(0, σ²), fitted by REML.

    One group r per update direction: α is the population slope over directions, τ the
    spread of the directions' slopes around it. ``slope_ci`` uses t with (groups − 1)
    degrees of freedom (the directions are the units). R² after Nakagawa & Schielzeth
    (2013), with Johnson's (2014) random-slope variance τ²·mean(x²): ``r2_marginal`` is the
    share of variance the fixed line explains, ``r2_conditional`` that of line + directions.
    """

    slope: float
    slope_se: float
    slope_ci_low: float
    slope_ci_high: float
    intercept: float
    intercept_se: float
    slope_sd: float  # τ
    residual_sd: float  # σ
    r2_marginal: float
    r2_conditional: float
    n: int
    n_groups: int
    converged_at_bound: bool  # λ = τ²/σ² at the edge searched: σ ≈ 0 or τ ≈ 0
    confidence: float = 0.95
    method: str = "reml"


def _random_slope_terms(groups: list[tuple[np.ndarray, np.ndarray]], lam: float):
    """(A, β̂, Q, Σ log(1 + λ·uᵀu)) of the GLS at λ = τ²/σ², where σ²·V_r⁻¹ =
    I − k·uuᵀ with k = λ/(1 + λ·uᵀu).

    Written with c = 1/(1 + λ·uᵀu) where a subtraction would cancel (as λ grows, V_r⁻¹
    projects the slope direction out): uᵀ(I − k·uuᵀ) = c·uᵀ, and the weighted residual
    sum is ‖r − (r·u/uᵀu)·u‖² + c·(r·u)²/uᵀu, a sum of non-negative terms.
    """
    a = np.zeros((2, 2))
    b = np.zeros(2)
    logdet = 0.0
    parts = []
    for u, y in groups:
        uu, su, sy, uy = float(u @ u), float(u.sum()), float(y.sum()), float(u @ y)
        c = 1.0 / (1.0 + lam * uu)
        k = lam * c
        a += np.array([[u.size - k * su * su, su * c], [su * c, uu * c]])
        b += np.array([sy - k * su * uy, uy * c])
        logdet += math.log1p(lam * uu)
        parts.append((u, y, uu, c))
    beta = np.linalg.solve(a, b)
    q = 0.0
    for u, y, uu, c in parts:
        r = y - beta[0] - beta[1] * u
        ru = float(r @ u)
        off = r - (ru / uu) * u
        q += float(off @ off) + c * ru * ru / uu
    return a, beta, q, logdet


def fit_random_slope(
    x: npt.ArrayLike, y: npt.ArrayLike, groups: npt.ArrayLike, confidence: float = 0.95
) -> RandomSlopeFit:
    """REML fit of a common intercept and slope with a random slope per group.

    x and y are rescaled to O(1) inside (η ≈ 1e-8 … 1e-4 otherwise wrecks the
    conditioning); the variance ratio λ = τ²/σ² is profiled and found by a bounded
    search over log λ, the edges included (exactly linear directions give σ → 0).
    """
    from scipy.optimize import minimize_scalar

    xa, ya = _check_line_inputs(x, y)
    ga = _vector("groups", groups)
    n = _same_length(x=xa, y=ya, groups=ga)
    labels = np.unique(ga)
    if labels.size < 2:
        raise ValueError("a random-slope model needs at least two groups")
    x_scale = float(np.max(np.abs(xa)))
    y_scale = float(np.std(ya)) or float(np.max(np.abs(ya))) or 1.0
    data = [(xa[ga == g] / x_scale, ya[ga == g] / y_scale) for g in labels]
    p = 2

    def objective(log_lam: float) -> float:
        lam = math.exp(log_lam)
        a, _, q, logdet = _random_slope_terms(data, lam)
        _, logdet_a = np.linalg.slogdet(a)
        return (n - p) * math.log(max(q, 1e-300) / (n - p)) + logdet + float(logdet_a)

    lo, hi = -30.0, 30.0
    best = minimize_scalar(objective, bounds=(lo, hi), method="bounded")
    candidates = [(float(best.fun), float(best.x)), (objective(lo), lo), (objective(hi), hi)]
    value, log_lam = min(candidates)
    lam = math.exp(log_lam)
    a, beta, q, _ = _random_slope_terms(data, lam)
    sigma2 = q / (n - p)
    cov = sigma2 * np.linalg.inv(a)
    tau2 = lam * sigma2
    at_top = abs(log_lam - hi) < 1e-3
    if at_top:
        # σ → 0 (exact lines): the profile's τ² = λ·σ² would divide the spread of the
        # directions by N − 2 residual dof. With no residual, the directions' own slopes are
        # the BLUPs: τ² is their sample variance, and Var(α̂) = τ²/groups.
        own = [float(u @ (y - beta[0])) / float(u @ u) for u, y in data]
        tau2 = float(np.var(own, ddof=1))
        cov[1, 1] = tau2 / labels.size + sigma2 / sum(float(u @ u) for u, _ in data)
    tq = float(sps.t.ppf(0.5 + confidence / 2.0, labels.size - 1))
    slope = float(beta[1]) * y_scale / x_scale
    slope_se = math.sqrt(max(float(cov[1, 1]), 0.0)) * y_scale / x_scale
    u_all = np.concatenate([u for u, _ in data])
    fixed = beta[0] + beta[1] * u_all
    var_fixed = float(np.var(fixed))
    var_random = tau2 * float(np.mean(u_all * u_all))
    total = var_fixed + var_random + sigma2
    return RandomSlopeFit(
        slope=slope,
        slope_se=slope_se,
        slope_ci_low=slope - tq * slope_se,
        slope_ci_high=slope + tq * slope_se,
        intercept=float(beta[0]) * y_scale,
        intercept_se=math.sqrt(max(float(cov[0, 0]), 0.0)) * y_scale,
        slope_sd=math.sqrt(tau2) * y_scale / x_scale,
        residual_sd=math.sqrt(sigma2) * y_scale,
        r2_marginal=var_fixed / total if total > 0 else _NAN,
        r2_conditional=(var_fixed + var_random) / total if total > 0 else _NAN,
        n=n,
        n_groups=int(labels.size),
        converged_at_bound=bool(abs(log_lam - lo) < 1e-3 or at_top),
        confidence=confidence,
    )


# --------------------------------------------------------------------------------------
# Lack of fit, log-log slope, residuals
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LackOfFit(_ToDict):
    """Replicate-based lack-of-fit F test of the OLS straight line.

    SS_residual = SS_lack_of_fit + SS_pure_error, where SS_pure_error is the
    scatter of repeats about their own η mean (df = n − m, m distinct η) and
    SS_lack_of_fit = Σ_η n_η (ȳ_η − ŷ_η)² (df = m − 2).
    F = (SS_lof/df_lof) / (SS_pe/df_pe).  The test assumes the same noise
    variance at every η.
    """

    f_statistic: float
    df_lack_of_fit: int
    df_pure_error: int
    p_value: float  # NaN when undefined (no replicates, < 3 distinct x, or SS_pe = 0)
    ss_lack_of_fit: float
    ss_pure_error: float


def lack_of_fit_test(x: npt.ArrayLike, y: npt.ArrayLike) -> LackOfFit:
    """Classic lack-of-fit F test for the OLS line fitted to all raw points."""
    xa, ya = _check_line_inputs(x, y)
    n = xa.size
    ux, first_index, inverse, counts = np.unique(
        xa, return_index=True, return_inverse=True, return_counts=True
    )
    m = ux.size
    group_mean = np.bincount(inverse, weights=ya) / counts
    # Deviations from the group mean, computed after shifting each group by its first
    # value so that identical repeats give a pure error of exactly 0 (not rounding noise).
    shifted = ya - ya[first_index][inverse]
    shifted_mean = np.bincount(inverse, weights=shifted) / counts
    within = shifted - shifted_mean[inverse]
    ss_pe = float(within @ within)
    xm = float(xa.mean())
    ym = float(ya.mean())
    dx = xa - xm
    slope = float(dx @ (ya - ym)) / float(dx @ dx)
    gap = group_mean - (ym + slope * (ux - xm))
    ss_lof = float(counts @ (gap * gap))
    df_lof = m - 2
    df_pe = n - m
    if df_lof <= 0 or df_pe <= 0 or ss_pe <= 0:
        f_stat = _NAN
        p = _NAN
    else:
        f_stat = (ss_lof / df_lof) / (ss_pe / df_pe)
        p = float(sps.f.sf(f_stat, df_lof, df_pe))
    return LackOfFit(
        f_statistic=f_stat,
        df_lack_of_fit=int(df_lof),
        df_pure_error=int(df_pe),
        p_value=p,
        ss_lack_of_fit=ss_lof,
        ss_pure_error=ss_pe,
    )


@dataclass(frozen=True)
class LogLogSlope(_ToDict):
    """Slope k of log|ΔH| = k·log η + c; a linear law has k = 1."""

    slope: float
    slope_se: float
    ci_low: float
    ci_high: float
    n: int
    margin: float
    within_margin: bool
    confidence: float = 0.95
    weighted: bool = False
    same_sign: bool = True  # all means share one non-zero sign (else no fit)
    note: str = ""
    paired: bool = False  # per-repeat slopes (common random numbers), CI across repeats
    n_repeats: int = 0  # repeats entering the paired estimate


def _no_loglog_fit(
    n: int, margin: float, confidence: float, note: str, same_sign: bool = True
) -> LogLogSlope:
    return LogLogSlope(
        slope=_NAN,
        slope_se=_NAN,
        ci_low=_NAN,
        ci_high=_NAN,
        n=n,
        margin=margin,
        within_margin=False,
        confidence=confidence,
        weighted=False,
        same_sign=same_sign,
        note=note,
    )


def loglog_slope(
    etas: npt.ArrayLike,
    mean_changes: npt.ArrayLike,
    stderr: npt.ArrayLike | None = None,
    margin: float = 0.1,
    confidence: float = 0.95,
) -> LogLogSlope:
    """Regress log|ΔH̄| on log η and test the slope against 1 ± margin.

    Requires every mean to have the same (non-zero) sign; otherwise no power
    law fits, ``within_margin`` is False and ``note`` says why.  With
    ``stderr`` the points are weighted by the first-order propagated error
    SE/|ΔH̄|; the covariance is scaled by max(1, χ²/(n − 2)) (Birge ratio), so
    scatter beyond the stated errors widens the interval but scatter below
    them does not narrow it.  Without ``stderr``: OLS with s² = RSS/(n − 2).
    The interval is ``slope ± t_{(1+confidence)/2, n-2} · SE``.
    """
    eta = _finite_vector("etas", etas)
    mean = _finite_vector("mean_changes", mean_changes)
    n = _same_length(etas=eta, mean_changes=mean)
    if not np.all(eta > 0):
        raise ValueError("learning rates must be > 0 for a log-log fit")
    se_arr = None if stderr is None else _vector("stderr", stderr)
    if se_arr is not None:
        _same_length(etas=eta, stderr=se_arr)

    if not (np.all(mean > 0) or np.all(mean < 0)):
        n_pos = int(np.sum(mean > 0))
        n_neg = int(np.sum(mean < 0))
        return _no_loglog_fit(
            n,
            margin,
            confidence,
            f"means are not all of one sign ({n_pos} positive, {n_neg} negative, "
            f"{n - n_pos - n_neg} zero): no power law fits",
            same_sign=False,
        )
    if n < 3 or np.unique(eta).size < 2:
        return _no_loglog_fit(
            n, margin, confidence, f"needs at least 3 points with 2 distinct η for a CI, got {n}"
        )

    lx = np.log(eta)
    ly = np.log(np.abs(mean))
    note = ""
    weighted = False
    if se_arr is not None and np.all(np.isfinite(se_arr)) and np.all(se_arr > 0):
        fit = fit_wls(lx, ly, se_arr / np.abs(mean))
        assert fit.reduced_chi2 is not None
        scale = max(1.0, fit.reduced_chi2)
        slope_se = fit.slope_se * math.sqrt(scale)
        weighted = True
    else:
        if se_arr is not None:
            note = "stderr not finite and > 0 everywhere: unweighted fit"
        fit = fit_ols(lx, ly)
        slope_se = fit.slope_se
    tq = float(sps.t.ppf(0.5 + confidence / 2.0, n - 2))
    lo = fit.slope - tq * slope_se
    hi = fit.slope + tq * slope_se
    within = bool(lo >= 1.0 - margin and hi <= 1.0 + margin)
    return LogLogSlope(
        slope=fit.slope,
        slope_se=slope_se,
        ci_low=lo,
        ci_high=hi,
        n=n,
        margin=margin,
        within_margin=within,
        confidence=confidence,
        weighted=weighted,
        same_sign=True,
        note=note,
    )


def _repeat_loglog_slopes(
    eta: np.ndarray, dh: np.ndarray, rep: np.ndarray, grid: np.ndarray
) -> tuple[list[float], list[int]]:
    """Each complete repeat's d log|ΔH_r|/d log η, and the repeats whose ΔH changes sign."""
    slopes: list[float] = []
    mixed: list[int] = []
    for r in np.unique(rep) if grid.size >= 2 else []:  # one η: no slope to fit
        mine = (rep == r) & np.isfinite(dh)
        if np.unique(eta[mine]).size != grid.size or mine.sum() != grid.size:
            continue  # incomplete (a failed point): its slope would cover other η
        y = dh[mine]
        if not (np.all(y > 0) or np.all(y < 0)):
            mixed.append(int(r))
            continue
        slopes.append(fit_ols(np.log(eta[mine]), np.log(np.abs(y))).slope)
    return slopes, mixed


def paired_loglog_slope(
    etas: npt.ArrayLike,
    changes: npt.ArrayLike,
    repeats: npt.ArrayLike,
    margin: float = 0.1,
    confidence: float = 0.95,
) -> LogLogSlope:
    """Log-log slope for a common-random-numbers design: one slope per repeat.

    In the sweep every η of repeat r reuses the same update batch, so the repeats differ
    mainly by the size of their update direction: ΔH_r(η) ≈ s_r·η with s_r varying from
    repeat to repeat. Across repeats that spread is shared by all η, so a fit to the
    per-η means, weighted by their SEs, sees huge errors that cancel in the shape and
    gives an interval far too wide to show anything. Here each repeat's own slope
    k_r = d log|ΔH_r|/d log η (OLS over the η it has) carries the shape, and the interval
    is mean(k) ± t_{(1+confidence)/2, R−1} · sd(k)/√R over the R repeats that have every η
    (so the k_r are comparable). Signs need only agree within a repeat.
    """
    eta = _finite_vector("etas", etas)
    dh = _vector("changes", changes)
    rep = _vector("repeats", repeats)
    _same_length(etas=eta, changes=dh, repeats=rep)
    if not np.all(eta > 0):
        raise ValueError("learning rates must be > 0 for a log-log fit")
    grid = np.unique(eta)
    slopes, mixed = _repeat_loglog_slopes(eta, dh, rep, grid)
    k = np.asarray(slopes)
    n_rep = k.size

    def result(slope: float, se: float, lo: float, hi: float, note: str) -> LogLogSlope:
        return LogLogSlope(
            slope=slope,
            slope_se=se,
            ci_low=lo,
            ci_high=hi,
            n=int(grid.size),
            margin=margin,
            within_margin=bool(lo >= 1.0 - margin and hi <= 1.0 + margin),
            confidence=confidence,
            weighted=False,
            same_sign=not mixed,
            note=note,
            paired=True,
            n_repeats=int(n_rep),
        )

    if mixed:
        return result(
            _NAN,
            _NAN,
            _NAN,
            _NAN,
            f"ΔH changes sign across η within repeat(s) {mixed}: no power law fits",
        )
    if grid.size < 2 or n_rep < 2:
        return result(
            _NAN,
            _NAN,
            _NAN,
            _NAN,
            f"needs ≥ 2 η and ≥ 2 complete repeats, got {grid.size} η, {n_rep} repeats",
        )
    m = mean_stderr(k)
    se, mean = m.stderr, m.mean
    tq = float(sps.t.ppf(0.5 + confidence / 2.0, n_rep - 1))
    return result(
        mean,
        se,
        mean - tq * se,
        mean + tq * se,
        f"paired: mean of {n_rep} per-repeat slopes over {grid.size} η",
    )


def standardized_residuals(
    means: npt.ArrayLike, stderrs: npt.ArrayLike, predicted: npt.ArrayLike
) -> np.ndarray:
    """Signed (ȳ − ŷ)/SE per point.

    SE = 0 gives ±inf where the residual is non-zero and 0 where it is zero;
    a NaN SE gives NaN.
    """
    m = _vector("means", means)
    se = _vector("stderrs", stderrs)
    p = _vector("predicted", predicted)
    _same_length(means=m, stderrs=se, predicted=p)
    r = m - p
    with np.errstate(divide="ignore", invalid="ignore"):
        z = r / se
    zero = se == 0
    z[zero] = np.where(r[zero] == 0, 0.0, np.copysign(np.inf, r[zero]))
    return z


def relative_residuals(etas: npt.ArrayLike, means: npt.ArrayLike, slope: float) -> np.ndarray:
    """Signed (ȳ/η − α)/α: the fractional deviation of ΔH/η from the slope α."""
    eta = _vector("etas", etas)
    m = _vector("means", means)
    _same_length(etas=eta, means=m)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (m / eta - slope) / slope


# --------------------------------------------------------------------------------------
# The seed's pooled statistics: each fit and test a named result (reported, never deciding)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check(_ToDict):
    """One linearity check.  ``passed`` is None when it cannot be decided."""

    name: str
    threshold: float | str
    value: float | None
    passed: bool | None
    detail: str

    @classmethod
    def undecided(cls, name: str, threshold: float | str, why: str) -> Check:
        return cls(name, threshold, None, None, why)


@dataclass(frozen=True)
class PooledPoints:
    """The raw (η, repeat) points grouped by η, and the ones the pooled fits use."""

    per_eta: list[EtaSummary]
    resolvable: list[bool]  # aligned with per_eta; False also when every run failed
    etas: np.ndarray  # the used η: resolvable, with ≥ 1 successful run
    means: np.ndarray  # their mean ΔH
    stderrs: np.ndarray
    x_raw: np.ndarray  # every successful run at a used η
    y_raw: np.ndarray
    few_repeats: list[float]  # used η with fewer than 2 successful runs: no SE
    zero_stderr: list[float]  # used η whose repeats are identical: SE = 0
    n_failed: int  # runs with a non-finite change
    all_etas: np.ndarray  # every run, failed ones included (the paired log-log slope)
    all_changes: np.ndarray
    repeats: np.ndarray | None  # one id per run: a common-random-numbers design

    @property
    def se_defined(self) -> bool:
        return self.etas.size > 0 and not self.few_repeats

    @property
    def se_positive(self) -> bool:
        return self.se_defined and not self.zero_stderr


def _lookup_resolvable(table: Mapping[float, bool] | None, eta: float) -> bool:
    if not table:
        return True
    if eta in table:
        return bool(table[eta])
    for key, flag in table.items():
        if math.isclose(float(key), eta, rel_tol=1e-9, abs_tol=0.0):
            return bool(flag)
    return True


def pooled_points(
    etas: npt.ArrayLike,
    changes: npt.ArrayLike,
    first_order: npt.ArrayLike | None = None,
    resolvable: Mapping[float, bool] | None = None,
    repeats: npt.ArrayLike | None = None,
) -> PooledPoints:
    """Group one entry per run by η (a non-finite change is a failed run, dropped and
    counted). ``resolvable`` maps η to False for points below the measurement floor: they
    stay in ``per_eta`` but out of every fit (η missing from the map count as resolvable).
    ``repeats`` (one id per run) marks a common-random-numbers design."""
    eta_all = _finite_vector("etas", etas)
    dh_all = _vector("changes", changes)
    _same_length(etas=eta_all, changes=dh_all)
    if not np.all(eta_all > 0):
        raise ValueError("learning rates must be > 0")
    rep_all = None if repeats is None else _vector("repeats", repeats)
    if rep_all is not None:
        _same_length(etas=eta_all, repeats=rep_all)
    per_eta = summarize_by_eta(eta_all, dh_all, first_order)
    flags = [_lookup_resolvable(resolvable, s.learning_rate) and s.n_samples > 0 for s in per_eta]
    used = [s for s, f in zip(per_eta, flags) if f]
    return PooledPoints(
        per_eta=per_eta,
        resolvable=flags,
        etas=np.array([s.learning_rate for s in used], dtype=float),
        means=np.array([s.mean_entropy_change for s in used], dtype=float),
        stderrs=np.array([s.stderr_entropy_change for s in used], dtype=float),
        x_raw=np.concatenate([np.full(s.n_samples, s.learning_rate) for s in used] or [[]]),
        y_raw=np.concatenate([np.asarray(s.all_changes, dtype=float) for s in used] or [[]]),
        few_repeats=[s.learning_rate for s in used if s.n_samples < 2],
        zero_stderr=[
            s.learning_rate for s in used if s.n_samples >= 2 and s.stderr_entropy_change <= 0
        ],
        n_failed=int(np.sum(~np.isfinite(dh_all))),
        all_etas=eta_all,
        all_changes=dh_all,
        repeats=rep_all,
    )


@dataclass(frozen=True)
class PooledFits(_ToDict):
    """The pooled fits over the used η (None where too few η for one)."""

    ols: LinearFit | None  # every raw point
    weighted: LinearFit | None  # WLS on the means (OLS on them if some SE is not > 0)
    origin: OriginFit | None  # through 0, on the means
    quadratic: QuadraticFit | None  # every raw point
    lack_of_fit: LackOfFit | None
    loglog: LogLogSlope | None  # paired (one slope per repeat) when repeats are known


def pooled_fits(points: PooledPoints, loglog_margin: float = 0.1) -> PooledFits:
    """OLS, the weighted line, the line through 0, the quadratic, lack of fit, log-log."""
    m = points.etas.size
    se = points.stderrs if points.se_positive else None
    weighted = None
    if m >= 2:
        weighted = (
            fit_wls(points.etas, points.means, points.stderrs)
            if points.se_positive
            else fit_ols(points.etas, points.means)
        )
    return PooledFits(
        ols=fit_ols(points.x_raw, points.y_raw) if m >= 2 else None,
        weighted=weighted,
        origin=fit_origin(points.etas, points.means, se) if m >= 1 else None,
        quadratic=fit_quadratic(points.x_raw, points.y_raw) if m >= 2 else None,
        lack_of_fit=lack_of_fit_test(points.x_raw, points.y_raw) if m >= 2 else None,
        loglog=_pooled_loglog(points, loglog_margin),
    )


def _pooled_loglog(points: PooledPoints, margin: float) -> LogLogSlope | None:
    """Per repeat (:func:`paired_loglog_slope`) when repeats are known, else on the means."""
    if points.etas.size == 0:
        return None
    if points.repeats is not None:
        keep = np.isin(points.all_etas, points.etas)
        return paired_loglog_slope(
            points.all_etas[keep], points.all_changes[keep], points.repeats[keep], margin=margin
        )
    se = points.stderrs if points.se_positive else None
    return loglog_slope(points.etas, points.means, se, margin=margin)


@dataclass(frozen=True)
class PooledResiduals:
    """Per used η: (ȳ − ŷ)/SE against the weighted line and (ȳ/η − α)/α against the line
    through 0 (NaN where that fit is missing)."""

    standardized: np.ndarray
    relative: np.ndarray

    def aligned(self, flags: list[bool]) -> tuple[list[float | None], list[float | None]]:
        """Both, aligned with ``per_eta`` (None at the η not used)."""
        used = iter(zip(self.standardized, self.relative))
        pairs = [next(used) if f else (None, None) for f in flags]
        return (
            [None if z is None else float(z) for z, _ in pairs],
            [None if r is None else float(r) for _, r in pairs],
        )


def pooled_residuals(points: PooledPoints, fits: PooledFits) -> PooledResiduals:
    m = points.etas.size
    z = np.full(m, np.nan)
    if fits.weighted is not None:
        predicted = fits.weighted.intercept + fits.weighted.slope * points.etas
        z = standardized_residuals(points.means, points.stderrs, predicted)
    rel = np.full(m, np.nan)
    if fits.origin is not None and fits.origin.slope != 0:
        rel = relative_residuals(points.etas, points.means, fits.origin.slope)
    return PooledResiduals(z, rel)


@dataclass(frozen=True)
class PooledStatistics(_ToDict):
    """The seed's pooled statistics: the per-η summaries, the fits and the residuals."""

    per_eta: list[EtaSummary]
    resolvable: list[bool]  # aligned with per_eta
    fits: PooledFits
    standardized_residual: list[float | None]  # aligned with per_eta
    relative_residual: list[float | None]  # aligned with per_eta

    @classmethod
    def of(
        cls, points: PooledPoints, fits: PooledFits, residuals: PooledResiduals
    ) -> PooledStatistics:
        z, rel = residuals.aligned(points.resolvable)
        return cls(points.per_eta, points.resolvable, fits, z, rel)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _argmax_abs(values: np.ndarray) -> int:
    return int(np.argmax(np.where(np.isnan(values), -np.inf, np.abs(values))))


def r_squared_check(
    points: PooledPoints, fits: PooledFits, residuals: PooledResiduals, th: PooledThresholds
) -> Check:
    """OLS R² of every raw point > r2_min: the original criterion, kept for comparison."""
    ols = fits.ols
    if ols is None or math.isnan(ols.r_squared):
        return Check.undecided(
            "r_squared",
            th.r2_min,
            f"no OLS fit ({points.etas.size} usable η, need ≥ 2)",
        )
    ok = ols.r_squared > th.r2_min
    return Check(
        "r_squared",
        th.r2_min,
        ols.r_squared,
        ok,
        f"OLS on {ols.n} raw points: R² = {ols.r_squared:.6f} "
        f"{'>' if ok else '≤'} {th.r2_min} (high leverage at the largest η; "
        "not evidence of linearity on its own)",
    )


def standardized_residual_check(
    points: PooledPoints, fits: PooledFits, residuals: PooledResiduals, th: PooledThresholds
) -> Check:
    """Every per-η mean within max_standardized_residual of its SE from the weighted line."""
    name, limit = "standardized_residual", th.max_standardized_residual
    if fits.weighted is None:
        return Check.undecided(name, limit, "no line fitted")
    if not points.se_defined:
        return Check.undecided(
            name,
            limit,
            "SE undefined: fewer than 2 successful repeats at η = "
            + ", ".join(f"{e:.3g}" for e in points.few_repeats),
        )
    if not points.se_positive:
        return Check.undecided(
            name,
            limit,
            "SE = 0 (identical repeats) at η = "
            + ", ".join(f"{e:.3g}" for e in points.zero_stderr)
            + "; WLS impossible, OLS on means used as fallback; residuals cannot be "
            "standardized",
        )
    z = residuals.standardized
    i = _argmax_abs(z)
    worst = float(abs(z[i]))
    ok = worst <= limit
    return Check(
        name,
        limit,
        _finite_or_none(worst),
        ok,
        f"max |ȳ − ŷ|/SE from the WLS line = {worst:.3g} at η = {points.etas[i]:.3g} "
        f"({'≤' if ok else '>'} {limit})",
    )


def relative_residual_check(
    points: PooledPoints, fits: PooledFits, residuals: PooledResiduals, th: PooledThresholds
) -> Check:
    """ΔH/η of every per-η mean within max_relative_residual of the slope through 0."""
    name, limit, origin = "relative_residual", th.max_relative_residual, fits.origin
    rel = residuals.relative
    if origin is None or origin.slope == 0 or not np.any(np.isfinite(rel)):
        return Check.undecided(name, limit, "no usable fit through the origin")
    i = _argmax_abs(rel)
    worst = float(abs(rel[i]))
    ok = worst <= limit
    return Check(
        name,
        limit,
        _finite_or_none(worst),
        ok,
        f"max |(ȳ/η − α)/α| = {worst:.3g} at η = {points.etas[i]:.3g} "
        f"(α = {origin.slope:.4g} from the {'weighted ' if origin.weighted else ''}"
        f"fit through 0; {'≤' if ok else '>'} {limit})",
    )


def lack_of_fit_check(
    points: PooledPoints, fits: PooledFits, residuals: PooledResiduals, th: PooledThresholds
) -> Check:
    """The replicate-based F test: p > lack_of_fit_alpha."""
    name, alpha, lof = "lack_of_fit", th.lack_of_fit_alpha, fits.lack_of_fit
    if lof is None or math.isnan(lof.p_value):
        if lof is None:
            why = f"{points.etas.size} usable η"
        elif lof.df_pure_error <= 0:
            why = "no replicates"
        elif lof.df_lack_of_fit <= 0:
            why = f"only {lof.df_lack_of_fit + 2} distinct η (need ≥ 3)"
        else:
            why = "zero pure error (all repeats identical)"
        return Check.undecided(name, alpha, f"F test undefined: {why}")
    ok = lof.p_value > alpha
    return Check(
        name,
        alpha,
        lof.p_value,
        ok,
        f"F({lof.df_lack_of_fit}, {lof.df_pure_error}) = {lof.f_statistic:.4g}, "
        f"p = {lof.p_value:.3g} ({'>' if ok else '≤'} {alpha})",
    )


def intercept_check(
    points: PooledPoints, fits: PooledFits, residuals: PooledResiduals, th: PooledThresholds
) -> Check:
    """ΔH(0) = 0: the weighted line's intercept test, p > intercept_alpha."""
    name, alpha, weighted = "intercept", th.intercept_alpha, fits.weighted
    if weighted is None or math.isnan(weighted.intercept_p):
        return Check.undecided(
            name,
            alpha,
            "intercept test undefined"
            + (
                ""
                if weighted is None
                else f" ({weighted.method.upper()} on {points.etas.size} means)"
            ),
        )
    ok = weighted.intercept_p > alpha
    how = (
        "WLS on means, z test"
        if weighted.method == "wls"
        else "OLS on means, t test (fallback: SE not > 0 at every η)"
    )
    return Check(
        name,
        alpha,
        weighted.intercept_p,
        ok,
        f"β = {weighted.intercept:.4g} ± {weighted.intercept_se:.3g} "
        f"(stat = {_fmt(weighted.intercept_t)}, p = {weighted.intercept_p:.3g} "
        f"{'>' if ok else '≤'} {alpha}; {how})",
    )


def loglog_check(
    points: PooledPoints, fits: PooledFits, residuals: PooledResiduals, th: PooledThresholds
) -> Check:
    """The log-log slope's CI inside [1 − loglog_margin, 1 + loglog_margin]."""
    name, margin, loglog = "loglog_slope", th.loglog_margin, fits.loglog
    if loglog is None:
        return Check.undecided(name, margin, "no usable η")
    if not loglog.same_sign:
        return Check(name, margin, None, False, loglog.note)
    if math.isnan(loglog.slope):
        return Check.undecided(name, margin, loglog.note)
    ok = loglog.within_margin
    return Check(
        name,
        margin,
        loglog.slope,
        ok,
        f"d log|ΔH|/d log η = {loglog.slope:.4f}, {loglog.confidence:.0%} CI "
        f"[{loglog.ci_low:.4f}, {loglog.ci_high:.4f}] "
        f"{'inside' if ok else 'not inside'} [{1 - margin:g}, "
        f"{1 + margin:g}]" + (f"; {loglog.note}" if loglog.note else ""),
    )


POOLED_CHECKS = {
    "r_squared": r_squared_check,
    "standardized_residual": standardized_residual_check,
    "relative_residual": relative_residual_check,
    "lack_of_fit": lack_of_fit_check,
    "intercept": intercept_check,
    "loglog_slope": loglog_check,
}
CHECK_NAMES: tuple[str, ...] = tuple(POOLED_CHECKS)


def pooled_checks(
    points: PooledPoints,
    fits: PooledFits,
    residuals: PooledResiduals,
    thresholds: PooledThresholds = PooledThresholds(),  # noqa: B008 - frozen, safe to share
) -> dict[str, Check]:
    """The six pooled checks, by name (their order in analysis.json)."""
    return {
        name: check(points, fits, residuals, thresholds) for name, check in POOLED_CHECKS.items()
    }
