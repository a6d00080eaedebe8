"""From measured points to the verdict, with the repeat (one update direction) as the unit.

Imports neither torch nor transformers: ``report DIR`` rebuilds the analysis from
raw_results.json on any machine.

The sweep reuses each repeat's update batch U_r at every η (common random numbers), so the
repeats differ by their update direction v_r; on a real checkpoint the slopes ∇H·v_r of
different batches differ by 30–50 %. That spread says nothing about linearity, so nothing
here uses it as noise. Per repeat r and grid point η (DESIGN §4):

- f_r(η) = ΔH_r(η) / (η·s_r) − 1, s_r the repeat's first-order slope ∇H·v_r (without an
  oracle: its own ΔH_r/η at its smallest resolvable η);
- calibration c_r = f_r at the repeat's smallest resolvable η: an offset there is a failed
  first-order check, not nonlinearity;
- nonlinearity n_r(η) = (1 + f_r(η)) / (1 + c_r) − 1, the bend of ΔH_r/η from its own
  small-η value.

A grid point is *within* tolerance when the one-sided upper confidence bound of the mean
|n_r(η)| over repeats is ≤ tol, *beyond* when that mean itself exceeds tol, else
*undecided* (too few or too scattered repeats to bound it). The window is the longest
contiguous run of resolvable grid points within tol. The verdict:
LINEAR over the tested grid iff ≥ 3 resolvable η, every resolvable η within tol and in one
contiguous run, calibration within tol and every repeat's own R² > r2_min; NONLINEAR iff a
resolvable η is beyond tol; INCONCLUSIVE otherwise, with the reason.

Records without a noise estimate of their own (no ±η pair, no first-order oracle: another
tool's, the seed's format) are not judged on one noisy reference point (``NoiseModel``):
each repeat is fitted ΔH_r = s_r·η + q_r·η² with one absolute noise level pooled over the
repeats, s_r is the reference and n_r(η) the fitted bend q_r·η/s_r, which grows with η; an
offset of ΔH_r/η is s_r's. A grid point is beyond tol only when a bound of mean |bend| that
noise of either sign cannot raise exceeds it; where noise cannot be told from a bend, the
point is undecided and the verdict INCONCLUSIVE, with the reason.

The pooled statistics of the seed (raw-point R², weighted fit, lack of fit, intercept test,
standardized and relative residuals of the per-η means, log-log slope) are computed by
``stats``' named fits and checks and reported, never deciding: under common random numbers the
per-η means are correlated, so their spread is not the noise those tests assume.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from entropy_lab import stats
from entropy_lab.jsonio import eta_label, from_json, json_safe
from entropy_lab.records import EPS, RECORD_SCHEMA_VERSION, PointRecord, as_records
from entropy_lab.records import finite as _finite
from entropy_lab.stats import Check

__all__ = [
    "ANALYSIS_SCHEMA_VERSION",
    "EPS",
    "RECORD_SCHEMA_VERSION",
    "Analysis",
    "FloorThresholds",
    "PointRecord",
    "analyze",
    "eta_max",
    "predicted_nonlinearity",
]

# analysis.json's schema. 2: the paired verdict (per-repeat R², nonlinearity, window).
# 3: the jet from the ±η pairs (summary.jet, linear_regime.predicted_from, the curvature's
# and third derivative's source, repeats[].measured_jet); the rl_signal check; the update
# per repeat (grad_norm, momentum_share, groups kept/dropped); records without a noise
# estimate (summary.noise_model, repeats[].bend_fit, per-η nonlinearity_lower_bound and
# per-repeat bend/bend_stderr).
ANALYSIS_SCHEMA_VERSION = 3
DECIDING_CHECKS = ("resolvable_points", "r_squared", "nonlinearity", "first_order", "rl_signal")


# --------------------------------------------------------------------------------------
# Thresholds and the jet's predictions
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FloorThresholds:
    """When one (η, repeat) measurement is resolvable (above the precision floor)."""

    max_quantized_fraction: float = 0.01  # updated entries rounded away by fl(θ + η·v)
    min_signal_eps: float = 10.0  # |ΔH_r| ≥ this × eps(dtype) × H₀
    # |∇H·(θ₁ − θ₀ − η·v)| / |ΔH_r|: the first-order effect of the parameters' rounding.
    # Antisymmetric in η, so the symmetric check below cannot see it.
    max_rounding_effect: float = 0.01
    # |ΔH(η) + ΔH(−η) − η²c| / |ΔH(η)| estimates √2·σ, σ the relative forward-pass noise
    # of one ΔH; 0.5 % keeps 3σ ≈ 1 %, so a passing point is good to about 1 %.
    max_symmetric_residual: float = 0.005
    # The even part beyond η²c also holds η⁴ terms. A point whose ΔH/η is off ∇H·v by more
    # than the tolerance and this multiple of the even part is read as bent, not noisy
    # (tiny model, fp64 and fp32 alike, at η = 1e-3: odd part 21 %, even part 2.2 %).
    curvature_over_noise: float = 3.0
    # Forward-pass rounding noise of one ΔH is of the order of eps·H₀ (measured on the tiny
    # checkpoint in fp32: 0.3·eps·H₀ at 1e-6). Where no c is known (no nested jvp, and no
    # ±η pair of the repeat inside the tolerance to read it off, e.g. a grid far beyond the
    # window), an even part beyond this multiple of eps·H₀ is read as curvature or higher
    # orders, not noise.
    max_noise_eps: float = 1000.0


def predicted_nonlinearity(
    eta: float, slope: float, curvature: float | None, third: float | None = None
) -> float | None:
    """Relative departure from linearity at η: η·c/(2·∇H·v) + η²·d/(6·∇H·v), d = ∇³H[v,v,v]
    (the second term only when d is known)."""
    if curvature is None or slope == 0:
        return None
    return eta * curvature / (2 * slope) + (eta**2 * third / (6 * slope) if third else 0.0)


def eta_max(
    slope: float, curvature: float | None, tol: float = 0.05, third: float | None = None
) -> float | None:
    """Smallest η > 0 whose predicted relative nonlinearity reaches ±tol (inf: never)."""
    if curvature is None or slope == 0:
        return None
    a = curvature / (2 * slope)  # p(η) = a·η + b·η²
    b = third / (6 * slope) if third else 0.0
    roots = []
    for target in (tol, -tol):
        if b == 0:
            if a != 0:
                roots.append(target / a)
            continue
        disc = a * a + 4 * b * target
        if disc >= 0:
            roots += [(-a + sign * math.sqrt(disc)) / (2 * b) for sign in (1, -1)]
    positive = [r for r in roots if r > 0]
    return min(positive) if positive else math.inf


# --------------------------------------------------------------------------------------
# Result objects
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepeatPoint(stats._ToDict):
    """One (η, repeat): the floor's word on it and its place against the repeat's line."""

    learning_rate: float
    repeat: int
    entropy_change: float
    resolvable: bool
    reasons: list[str]
    relative_to_first_order: float | None  # f_r(η)
    nonlinearity: float | None  # n_r(η); None where unresolvable or without a reference
    symmetric_residual: float | None
    rounding_ratio: float | None  # |∇H·(θ₁ − θ₀ − η·v)| / |ΔH_r|
    quantized_fraction: float | None
    predicted_nonlinearity: float | None  # from the jet of this repeat
    # Records without a noise estimate (NoiseModel): the repeat's fitted bend q_r·η/s_r at
    # this η and its SE; ``nonlinearity`` is then the measured point against that s_r.
    bend: float | None = None
    bend_stderr: float | None = None


@dataclass(frozen=True)
class RepeatSummary(stats._ToDict):
    """One update direction across the grid."""

    repeat: int
    slope_reference: float | None  # s_r
    reference: str  # "first order" or "ΔH/η at the smallest resolvable η"
    eta_reference: float | None  # the repeat's smallest resolvable η
    calibration: float | None  # c_r (None without an oracle)
    r_squared: float | None  # OLS R² of its own line over its resolvable η (≥ 3)
    slope: float | None  # that line's slope
    intercept: float | None
    n_resolvable: int
    measured_jet: MeasuredJet | None = None
    bend_fit: stats.BendFit | None = None  # ΔH_r = s_r·η + q_r·η² (NoiseModel only)
    # The update itself (DESIGN §7): the RL gradient's norm, the momentum's share of ‖v_r‖,
    # and U's groups after the trainer's filters (None in records that lack them).
    grad_norm: float | None = None
    momentum_share: float | None = None
    groups_kept: int | None = None
    groups_dropped: int | None = None


@dataclass(frozen=True)
class MeasuredJet(stats._ToDict):
    """vᵀ∇²H v and ∇³H[v,v,v] of one repeat, read off its own ±η pairs (no extra evaluation).

    Per pair, the even part E(η) = ΔH(η) + ΔH(−η) = c·η² + O(η⁴) and the odd part
    O(η) = [ΔH(η) − ΔH(−η)]/2 = s·η + d·η³/6 + O(η⁵), with s = ∇H·v. Least squares over
    the pairs whose second- and third-order terms are each within the tolerance of the first
    (so the η⁴ and η⁵ terms are small), with equal absolute noise at every η (the forward
    pass's rounding does not scale with η): ĉ = ΣEη²/Ση⁴ and d̂/6 = Σ(O − sη)η³/Ση⁶. The
    largest such η dominates both (its weight is η⁴); ``leverage`` says by how much.
    """

    repeat: int
    curvature: float | None  # ĉ_r
    curvature_stderr: float | None  # from the even residuals (≥ 2 pairs)
    third_derivative: float | None  # d̂_r (needs the first-order slope s)
    third_derivative_stderr: float | None
    etas: list[float]  # the pairs fitted
    leverage: dict[float, float]  # η → η⁴/Ση⁴ over the fitted pairs
    noise: float | None  # RMS even residual of the pairs below the largest fitted η


@dataclass(frozen=True)
class PointSummary(stats._ToDict):
    """One grid point across repeats."""

    learning_rate: float
    n_repeats: int  # successful ones
    n_failed: int
    resolvable: bool
    reasons: list[str]
    nonlinearity_mean_abs: float | None  # mean over repeats of |n_r(η)|
    nonlinearity_bound: float | None  # one-sided upper confidence bound of that mean
    status: str  # within | beyond | undecided | unresolvable | failed
    in_window: bool
    predicted_nonlinearity: float | None  # max over repeats of |jet's prediction|
    # NoiseModel only: a lower bound of mean |bend| that noise of either sign cannot raise;
    # nonlinearity_mean_abs and _bound are then of the fitted bends.
    nonlinearity_lower_bound: float | None = None


@dataclass(frozen=True)
class Window(stats._ToDict):
    """The measured linear window: the longest contiguous run of grid points within tol."""

    eta_min: float | None
    eta_max: float | None
    n_points: int
    tolerance: float
    eta_max_predicted: float | None  # the jet's extrapolation, never the window
    predicted_edge: str  # where, against the grid, the jet puts the upper edge
    note: str


@dataclass(frozen=True)
class NoiseModel(stats._ToDict):
    """The noise of records that carry no estimate of their own (DESIGN §4, Noise).

    Sweep records carry one: the symmetric residuals of their ±η pairs, and an oracle ∇H·v to
    refer ΔH/η to. Records without either (another tool's, the seed's format) would be judged
    on one noisy point, each repeat's ΔH/η at its smallest η, where the noise of ΔH/η is
    largest: forward-pass noise is absolute, so ΔH/η's is σ/η. Instead each repeat is fitted
    ΔH_r = s_r·η + q_r·η² (least squares on ΔH: ΔH/η weighted by η²), σ pooled over the
    repeats' residuals. s_r is the reference; the bend q_r·η/s_r is what grows with η; an
    offset of ΔH_r/η moves s_r, not the bend. A grid point is beyond the tolerance only when
    a lower bound of mean |bend| that noise of either sign cannot raise exceeds it.
    """

    sigma: float | None  # of one ΔH, nats, the same at every η and repeat
    dof: int  # Σ over repeats of (resolvable η − 2)
    critical: float | None  # Student t of the repeats' simultaneous bend intervals
    confidence: float


@dataclass(frozen=True)
class RepeatMean(stats._ToDict):
    """Mean and SE over repeats of a per-direction quantity (NaN mean: no repeat has it)."""

    mean: float
    stderr: float
    n: int


@dataclass(frozen=True)
class JetTerm(RepeatMean):
    """summary.curvature / third_derivative: the source the analysis used."""

    source: str | None  # "jvp", "±η pairs" or None (neither)


@dataclass(frozen=True)
class JetSources(stats._ToDict):
    """One jet term from the nested jvps and from the ±η pairs, paired by repeat."""

    jvp: RepeatMean
    pairs: RepeatMean
    pairs_over_jvp: dict[str, float]  # repeat → pairs/jvp


@dataclass(frozen=True)
class Jet(stats._ToDict):
    source: str | None  # where the predicted edge came from
    curvature: JetSources
    third_derivative: JetSources
    per_repeat: dict[str, MeasuredJet]


@dataclass(frozen=True)
class Oracle(RepeatMean):
    """A conditional-reading slope over repeats and its ratio to the jvp, paired by repeat."""

    ratio_to_jvp: float | None


@dataclass(frozen=True)
class Oracles(stats._ToDict):
    jvp_conditional: RepeatMean
    identity: Oracle  # Cui et al.'s covariance identity: exact, must equal the jvp
    vanilla_pg_forecast: Oracle  # their crude forecasts
    natural_pg_forecast: Oracle


@dataclass(frozen=True)
class Failure(stats._ToDict):
    learning_rate: float
    repeat: int
    error: str


@dataclass(frozen=True)
class RecordFacts:
    """What analysis.json says of the records themselves, kept so that an Analysis read
    back from analysis.json (which holds no records) writes the same file."""

    n_records: int
    failures: list[Failure]
    first_order_slope: RepeatMean
    curvature: JetTerm
    third_derivative: JetTerm
    jet: Jet
    oracles: Oracles


@dataclass(frozen=True)
class Analysis:
    """Everything :func:`analyze` computed. ``to_dict()`` is analysis.json and
    ``from_dict`` reads it back (without the records: ``records`` is then empty)."""

    dtype: str
    reading: str
    points: list[RepeatPoint]
    repeats: list[RepeatSummary]
    per_eta: list[PointSummary]
    window: Window
    checks: dict[str, Check]
    verdict: str  # "linear" | "nonlinear" | "inconclusive"
    verdict_reason: str
    pooled: stats.PooledStatistics  # the seed's unpaired statistics (reported)
    mixed_model: stats.RandomSlopeFit | None
    records: list[PointRecord]
    thresholds: stats.Thresholds
    floor: FloorThresholds
    facts: RecordFacts
    meta: Mapping[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    noise: NoiseModel | None = None  # records without a noise estimate of their own

    def point(self, eta: float) -> PointSummary:
        for p in self.per_eta:
            if math.isclose(p.learning_rate, eta, rel_tol=1e-12, abs_tol=0.0):
                return p
        raise KeyError(f"η = {eta!r} is not on the grid {[p.learning_rate for p in self.per_eta]}")

    def repeat_point(self, eta: float, repeat: int) -> RepeatPoint:
        for p in self.points:
            if p.repeat == repeat and math.isclose(p.learning_rate, eta, rel_tol=1e-12):
                return p
        raise KeyError(f"no measured point at η = {eta!r}, repeat {repeat}")

    @property
    def fitted_learning_rates(self) -> list[float]:
        """The grid points the pooled statistics fitted."""
        return [s.learning_rate for s, f in zip(self.pooled.per_eta, self.pooled.resolvable) if f]

    @property
    def repeat_r_squared(self) -> list[float]:
        """Each repeat's own line's R², where it has one."""
        return [s.r_squared for s in self.repeats if s.r_squared is not None]

    @property
    def n_failed(self) -> int:
        return len(self.facts.failures)

    def grid(self) -> list[tuple[stats.EtaSummary, PointSummary]]:
        """Per grid point, ascending: its pooled summary (ΔH mean, SE) and the paired one."""
        return list(zip(self.pooled.per_eta, self.per_eta))

    def to_dict(self) -> dict[str, Any]:
        """analysis.json (DESIGN §5)."""
        out = {
            "schema_version": ANALYSIS_SCHEMA_VERSION,
            "checkpoint": dict(self.meta.get("checkpoint") or {}),
            "config": dict(self.meta.get("config") or {}),
            "environment": dict(self.meta.get("environment") or {}),
            "summary": self._summary_dict(),
            "per_learning_rate": self._per_eta_dict(),
            "thresholds": {
                "linearity": self.thresholds.to_dict(),
                "precision_floor": dataclasses.asdict(self.floor),
            },
        }
        return json_safe(out)

    def _summary_dict(self) -> dict[str, Any]:
        fits, facts, r2 = self.pooled.fits, self.facts, self.repeat_r_squared
        ols = fits.ols
        return {
            "dtype": self.dtype,
            "reading": self.reading,
            "slope": ols.slope if ols else None,
            "intercept": ols.intercept if ols else None,
            "r_squared": ols.r_squared if ols else None,
            "r_squared_per_repeat": {
                "min": min(r2) if r2 else None,
                "median": statistics.median(r2) if r2 else None,
                "values": {str(s.repeat): s.r_squared for s in self.repeats},
            },
            "mixed_model": self.mixed_model,
            "noise_model": self.noise,
            "ols": ols,
            "weighted": fits.weighted,
            "origin": fits.origin,
            "quadratic": fits.quadratic,
            "lack_of_fit": fits.lack_of_fit,
            "loglog_slope": fits.loglog,
            "first_order_slope": facts.first_order_slope,
            "curvature": facts.curvature,
            "third_derivative": facts.third_derivative,
            "jet": facts.jet,
            "first_order_oracles": facts.oracles,
            "repeats": list(self.repeats),
            "linear_regime": self._regime_dict(),
            "fitted_learning_rates": self.fitted_learning_rates,
            "checks": {name: _check_dict(c) for name, c in self.checks.items()},
            "verdict": self.verdict,
            "verdict_reason": self.verdict_reason,
            "notes": list(self.notes),
            "n_records": facts.n_records,
            "n_failed": self.n_failed,
            "failures": list(facts.failures),
        }

    def _regime_dict(self) -> dict[str, Any]:
        w = self.window
        regime = {
            "eta_min": w.eta_min,
            "eta_max": w.eta_max,
            "eta_max_from": "measured",
            "eta_max_predicted": w.eta_max_predicted,
            "predicted_edge": w.predicted_edge,
            "predicted_from": self.facts.jet.source,
            "n_points": w.n_points,
            "tolerance": w.tolerance,
        }
        if w.note:
            regime["note"] = w.note
        return regime

    def _per_eta_dict(self) -> dict[str, Any]:
        la = self.pooled
        out: dict[str, Any] = {}
        for summary, point, z, rel in zip(
            la.per_eta, self.per_eta, la.standardized_residual, la.relative_residual
        ):
            mine = [p for p in self.points if p.learning_rate == point.learning_rate]
            out[eta_label(point.learning_rate)] = {
                **summary.to_dict(),
                "n_failed": point.n_failed,
                "relative_residual": rel,
                "standardized_residual": z,
                "resolvable": point.resolvable,
                "unresolvable_reasons": list(point.reasons),
                "status": point.status,
                "in_window": point.in_window,
                "within_tolerance": {"within": True, "beyond": False}.get(point.status),
                "nonlinearity_mean_abs": point.nonlinearity_mean_abs,
                "nonlinearity_bound": point.nonlinearity_bound,
                "nonlinearity_lower_bound": point.nonlinearity_lower_bound,
                "predicted_nonlinearity": point.predicted_nonlinearity,
                "quantized_fraction": _max_or_none(p.quantized_fraction for p in mine),
                "symmetric_residual": _max_or_none(p.symmetric_residual for p in mine),
                "rounding_ratio": _max_or_none(p.rounding_ratio for p in mine),
                "repeats": [p.to_dict() for p in mine],
            }
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Analysis:
        """An analysis.json read back: ``from_dict(d).to_dict() == d``. It holds no records
        (``records`` is empty); a check's kind is deciding or reported (``decides``)."""
        if data.get("schema_version") != ANALYSIS_SCHEMA_VERSION:
            raise ValueError(
                f"analysis.json schema {data.get('schema_version')!r}, expected "
                f"{ANALYSIS_SCHEMA_VERSION}: rebuild it from the records (`entropy-lab report`)"
            )
        s = data["summary"]
        entries = list(data["per_learning_rate"].values())
        return cls(
            dtype=s["dtype"],
            reading=s["reading"],
            points=[from_json(RepeatPoint, p) for e in entries for p in e["repeats"]],
            repeats=from_json(list[RepeatSummary], s["repeats"]),
            per_eta=[_point_summary_from_json(e) for e in entries],
            window=_window_from_json(s["linear_regime"]),
            checks={name: _check_from_json(name, c) for name, c in s["checks"].items()},
            verdict=s["verdict"],
            verdict_reason=s["verdict_reason"],
            pooled=_pooled_from_json(s, entries),
            mixed_model=from_json(stats.RandomSlopeFit | None, s["mixed_model"]),
            records=[],
            thresholds=from_json(stats.Thresholds, data["thresholds"]["linearity"]),
            floor=from_json(FloorThresholds, data["thresholds"]["precision_floor"]),
            facts=RecordFacts(
                n_records=s["n_records"],
                failures=from_json(list[Failure], s["failures"]),
                first_order_slope=from_json(RepeatMean, s["first_order_slope"]),
                curvature=from_json(JetTerm, s["curvature"]),
                third_derivative=from_json(JetTerm, s["third_derivative"]),
                jet=from_json(Jet, s["jet"]),
                oracles=from_json(Oracles, s["first_order_oracles"]),
            ),
            meta={k: data[k] for k in ("checkpoint", "config", "environment")},
            notes=list(s["notes"]),
            noise=from_json(NoiseModel | None, s["noise_model"]),
        )


def _point_summary_from_json(entry: Mapping[str, Any]) -> PointSummary:
    return from_json(
        PointSummary,
        {**entry, "n_repeats": entry["n_samples"], "reasons": entry["unresolvable_reasons"]},
    )


def _window_from_json(regime: Mapping[str, Any]) -> Window:
    return from_json(Window, {"note": "", **regime})


def _check_from_json(name: str, c: Mapping[str, Any]) -> AnalysisCheck:
    kind = CheckKind.DECIDING if c["decides"] else CheckKind.REPORTED
    return AnalysisCheck(name, c["threshold"], c["value"], c["passed"], c["detail"], kind)


def _pooled_from_json(
    summary: Mapping[str, Any], entries: list[Mapping[str, Any]]
) -> stats.PooledStatistics:
    fitted = set(summary["fitted_learning_rates"])
    names = ("ols", "weighted", "origin", "quadratic", "lack_of_fit")
    fits = {name: summary[name] for name in names}
    return stats.PooledStatistics(
        per_eta=[from_json(stats.EtaSummary, e) for e in entries],
        resolvable=[e["learning_rate"] in fitted for e in entries],
        fits=from_json(stats.PooledFits, {**fits, "loglog": summary["loglog_slope"]}),
        standardized_residual=[e["standardized_residual"] for e in entries],
        relative_residual=[e["relative_residual"] for e in entries],
    )


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _max_or_none(values: Iterable[float | None]) -> float | None:
    kept = [abs(v) for v in values if v is not None and math.isfinite(v)]
    return max(kept) if kept else None


def _check_dict(check: Check) -> dict[str, Any]:
    return {
        "threshold": check.threshold,
        "value": check.value,
        "passed": check.passed,
        "detail": check.detail,
        "decides": decides(check),
    }


def _by_repeat(records: Iterable[PointRecord], name: str) -> dict[int, float]:
    """{repeat: its value of ``name``} (a property of v_r, shared by every η), in order."""
    values: dict[int, list[float]] = {}
    for r in records:
        value = getattr(r, name)
        if _finite(value):
            values.setdefault(int(r.repeat), []).append(float(value))
    return {rep: float(np.mean(v)) for rep, v in sorted(values.items())}


def _per_repeat_mean(records: Iterable[PointRecord], name: str) -> RepeatMean:
    """Mean and SE over repeats of a per-direction quantity."""
    m = stats.mean_stderr(list(_by_repeat(records, name).values()))
    return RepeatMean(m.mean, m.stderr, m.n)


def _jet_source(records: list[PointRecord], repeats: list[RepeatSummary]) -> str | None:
    if any(_finite(r.curvature) for r in records):
        return "jvp"
    if any(s.measured_jet and s.measured_jet.curvature is not None for s in repeats):
        return "±η pairs"
    return None


def _jet_sources(
    records: list[PointRecord], jets: dict[int, MeasuredJet], name: str
) -> tuple[JetSources, JetTerm]:
    """One jet term both ways, paired by repeat, and the one the analysis used (the jvps'
    where they ran)."""
    jvp = _by_repeat(records, name)
    pairs = {rep: getattr(j, name) for rep, j in jets.items() if getattr(j, name) is not None}
    from_pairs = stats.mean_stderr(list(pairs.values()))
    both = JetSources(
        jvp=_per_repeat_mean(records, name),
        pairs=RepeatMean(from_pairs.mean, from_pairs.stderr, from_pairs.n),
        pairs_over_jvp={str(rep): pairs[rep] / jvp[rep] for rep in pairs if jvp.get(rep)},
    )
    used = both.jvp if jvp else both.pairs
    source = "jvp" if jvp else "±η pairs" if pairs else None
    return both, JetTerm(used.mean, used.stderr, used.n, source)


def _jet_summary(
    records: list[PointRecord], repeats: list[RepeatSummary]
) -> tuple[JetTerm, JetTerm, Jet]:
    """summary.curvature and summary.third_derivative (mean ± SE over repeats) from the
    source the analysis used, and ``jet``: both sources side by side, paired by repeat."""
    jets = {s.repeat: s.measured_jet for s in repeats if s.measured_jet is not None}
    c_both, c_used = _jet_sources(records, jets, "curvature")
    d_both, d_used = _jet_sources(records, jets, "third_derivative")
    jet = Jet(
        source=_jet_source(records, repeats),
        curvature=c_both,
        third_derivative=d_both,
        per_repeat={str(rep): j for rep, j in jets.items()},
    )
    return c_used, d_used, jet


def _oracle_comparison(records: list[PointRecord]) -> Oracles:
    """The conditional-reading slope three ways: jvp, Cui et al.'s identity, their forecasts.

    The identity must equal the jvp (both exact at first order); the crude forecasts
    (ż ≈ π·A, ż ≈ A) are shown with their ratio to the jvp to say how far they miss.
    Paired by repeat: each oracle against the jvp of the same update direction.
    """
    jvp = _by_repeat(records, "first_order_slope_conditional")

    def oracle(key: str) -> Oracle:
        values = _by_repeat(records, key)
        m = _per_repeat_mean(records, key)
        ratios = [v / jvp[rep] for rep, v in values.items() if jvp.get(rep)]
        return Oracle(m.mean, m.stderr, m.n, stats.mean_stderr(ratios).mean if ratios else None)

    return Oracles(
        jvp_conditional=_per_repeat_mean(records, "first_order_slope_conditional"),
        identity=oracle("identity_slope"),
        vanilla_pg_forecast=oracle("cui_vanilla_pg_slope"),
        natural_pg_forecast=oracle("cui_natural_pg_slope"),
    )


def record_facts(data: Inputs, repeats: Repeats) -> RecordFacts:
    """What analysis.json says of the records themselves: failures, the first-order slope,
    the jet and the oracles, each a mean over repeats."""
    curvature, third, jet = _jet_summary(data.measured, repeats.summaries)
    return RecordFacts(
        n_records=len(data.rows),
        failures=[
            Failure(
                learning_rate=float(r.learning_rate),
                repeat=int(r.repeat),
                error=r.error or ("no finite entropy_change" if r.success else "unknown error"),
            )
            for r in data.rows
            if not r.measured
        ],
        first_order_slope=_per_repeat_mean(data.measured, "first_order_slope"),
        curvature=curvature,
        third_derivative=third,
        jet=jet,
        oracles=_oracle_comparison(data.measured),
    )


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


# --------------------------------------------------------------------------------------
# The precision floor, one (η, repeat) at a time
# --------------------------------------------------------------------------------------


def routing_reason(changed: float | None) -> str | None:
    """Why a point with changed MoE routing is not judged, or None.

    The jvp differentiates with every token's top-k experts held fixed (routing is
    discrete). When the step moves some token's experts, ΔH holds a jump the jet cannot
    see: agreement or disagreement with it is no evidence, so the point is never called
    resolvable (and so never within the tolerance) on the jet's word.
    """
    if not changed:
        return None
    return f"top-k routing changed for {changed:.2%} of E's tokens (the jet holds routing fixed)"


def _base_floor_reasons(
    r: PointRecord, run_dtype: str, floor: FloorThresholds
) -> tuple[list[str], float | None]:
    """Why this one measurement is below the floor, the symmetric check aside (rounding,
    the eps floor, MoE routing), with the rounding ratio. ``run_dtype`` is the sweep's, for
    a record that does not say its own."""
    change = float(r.entropy_change)  # type: ignore[arg-type]
    dtype = r.dtype or run_dtype
    reasons = []
    qf = r.quantized_fraction
    if qf is not None and qf > floor.max_quantized_fraction:
        reasons.append(
            f"{qf:.1%} of updated entries rounded away in {dtype} "
            f"(> {floor.max_quantized_fraction:.1%})"
        )
    routing = routing_reason(r.routing_changed_fraction)
    if routing:
        reasons.append(routing)
    eps = r.eps if r.eps is not None else EPS[dtype]
    signal_floor = floor.min_signal_eps * eps * abs(r.entropy_before or 0.0)
    if abs(change) < signal_floor:
        reasons.append(
            f"|ΔH| {abs(change):.2e} below {signal_floor:.2e} "
            f"({floor.min_signal_eps:g}·eps×H floor)"
        )
    rounding = None
    if r.rounding_effect is not None and change != 0:
        rounding = abs(r.rounding_effect) / abs(change)
        if rounding > floor.max_rounding_effect:
            reasons.append(
                f"parameter rounding moves ΔH by {rounding:.1%} "
                f"(> {floor.max_rounding_effect:.1%}; ∇H·(θ₁ − θ₀ − η·v))"
            )
    return reasons, rounding


# Above this share of ĉ, a pair's own even residual says nothing of its noise (ĉ was read
# off it); its noise is then the level the smaller η of its repeat show.
_SELF_FITTED_LEVERAGE = 0.9


def measured_jet(records: list[PointRecord], tol: float, usable: set[float]) -> MeasuredJet:
    """The MeasuredJet of one repeat's records; ``usable`` are the η whose pair is above the
    floor's other checks (a pair that rounds away says nothing of curvature)."""
    rep = int(records[0].repeat)
    s = records[0].first_order_slope
    pairs = []
    for r in records:
        eta = float(r.learning_rate)
        if r.entropy_change_negative is None or eta not in usable:
            continue
        plus, minus = float(r.entropy_change), float(r.entropy_change_negative)  # type: ignore[arg-type]
        even, odd = plus + minus, (plus - minus) / 2
        small = odd != 0 and abs(even) <= 2 * tol * abs(odd)  # |c·η/(2s)| ≤ tol
        if small and s:
            small = abs(odd / (eta * s) - 1) <= tol  # |d·η²/(6s)| ≤ tol
        pairs.append((eta, even, odd, small))
    fitted = [(e, ev, od) for e, ev, od, small in pairs if small]
    if not fitted:
        return MeasuredJet(rep, None, None, None, None, [], {}, None)
    etas = np.array([e for e, _, _ in fitted])
    even = np.array([ev for _, ev, _ in fitted])
    odd = np.array([od for _, _, od in fitted])
    w4, w6 = float(np.sum(etas**4)), float(np.sum(etas**6))
    c = float(np.sum(even * etas**2) / w4)
    resid = even - c * etas**2
    sigma = float(np.sqrt(np.sum(resid**2) / (len(etas) - 1))) if len(etas) >= 2 else None
    d = d_se = None
    if s:
        d = float(6 * np.sum((odd - s * etas) * etas**3) / w6)
        # Noise of O is half that of E (ε₊ − ε₋ over 2 against ε₊ + ε₋), hence 6/2.
        d_se = 3 * sigma / math.sqrt(w6) if sigma is not None else None
    top = float(etas.max())
    below = [ev - c * e**2 for e, ev, _, _ in pairs if e < top]
    noise = float(np.sqrt(np.mean(np.square(below)))) if below else None
    return MeasuredJet(
        repeat=rep,
        curvature=c,
        curvature_stderr=sigma / math.sqrt(w4) if sigma is not None else None,
        third_derivative=d,
        third_derivative_stderr=d_se,
        etas=[float(e) for e in etas],
        leverage={float(e): float(e**4 / w4) for e in etas},
        noise=noise,
    )


def jet_terms(r: PointRecord, jet: MeasuredJet | None) -> tuple[float | None, float | None, bool]:
    """(c, d, measured): the record's own jvp terms where the jvps ran, else its repeat's
    MeasuredJet (measured True)."""
    measured = r.curvature is None and jet is not None and jet.curvature is not None
    if not measured:
        return r.curvature, r.third_derivative, False
    third = r.third_derivative if r.third_derivative is not None else jet.third_derivative  # type: ignore[union-attr]
    return jet.curvature, third, True  # type: ignore[union-attr]


def _symmetric_reasons(
    r: PointRecord, run_dtype: str, tol: float, floor: FloorThresholds, jet: MeasuredJet | None
) -> tuple[list[str], float | None, float | None]:
    """The symmetric check of one measurement, with its symmetric residual and the jet's
    predicted nonlinearity. The jet is the jvps' where they ran (``--jet 2|3``), else the
    repeat's MeasuredJet."""
    eta = float(r.learning_rate)
    change = float(r.entropy_change)  # type: ignore[arg-type]
    slope = r.first_order_slope
    curvature, third, measured = jet_terms(r, jet)
    predicted = None
    if slope is not None and curvature is not None:
        predicted = predicted_nonlinearity(eta, slope, curvature, third)
    if r.entropy_change_negative is None or change == 0:
        return [], None, predicted
    even = change + r.entropy_change_negative - eta**2 * (curvature or 0.0)
    eps = r.eps if r.eps is not None else EPS[r.dtype or run_dtype]
    too_large_for_noise = curvature is None and abs(even) > floor.max_noise_eps * eps * abs(
        r.entropy_before or 0.0
    )
    sym: float | None = abs(even) / abs(change)
    if measured:
        h = jet.leverage.get(eta, 0.0)  # type: ignore[union-attr]
        if h > _SELF_FITTED_LEVERAGE:  # ĉ came from this pair: the smaller η's noise level
            sym = None if jet.noise is None else jet.noise / abs(change)  # type: ignore[union-attr]
        else:  # its residual from a fit it is part of is shrunk by √(1 − h)
            sym = sym / math.sqrt(1 - h)  # type: ignore[operator]
    if sym is None:
        return [], None, predicted
    # Beyond the jet's η_max the even part holds η⁴ terms: it says nothing of noise.
    far = predicted is not None and abs(predicted) > tol
    bent = bool(slope) and abs(change / (eta * slope) - 1) > max(  # type: ignore[operator]
        tol, floor.curvature_over_noise * sym
    )
    if sym <= floor.max_symmetric_residual or far or bent or too_large_for_noise:
        return [], sym, predicted
    cause = (
        "forward-pass noise"
        if curvature is not None
        else "noise or curvature (no vᵀ∇²H v: no pair within the tolerance to read it off)"
    )
    source = "c from the ±η pairs" if measured else "c"
    return (
        [
            f"ΔH(η)+ΔH(−η)−η²c is {sym:.1%} of |ΔH| "
            f"(> {floor.max_symmetric_residual:.1%}; {source}): {cause}"
        ],
        sym,
        predicted,
    )


# --------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------


def _run_dtype(records: list[PointRecord], meta: Mapping[str, Any]) -> str:
    dtypes = {r.dtype for r in records if r.dtype is not None}
    if len(dtypes) > 1:
        raise ValueError(f"records of several dtypes in one analysis: {sorted(dtypes)}")
    if dtypes:
        return dtypes.pop()
    config = meta.get("config") or {}
    environment = meta.get("environment") or {}
    dtype = config.get("dtype") or environment.get("dtype")
    if dtype is None:
        raise ValueError(
            "the records do not say their dtype (written before record schema 2) and there "
            "is no run_meta.json beside them: pass --dtype fp32|fp64|bf16 to `entropy-lab "
            "report`, the dtype the sweep ran in (the precision floor depends on it)"
        )
    if dtype not in EPS:
        raise ValueError(f"unknown dtype {dtype!r} in run_meta.json (expected {sorted(EPS)})")
    return str(dtype)


def _longest_run(flags: list[bool], etas: list[float]) -> tuple[int, int] | None:
    """[i, j] of the longest run of True (ties: the widest in η, then the lowest)."""
    best: tuple[int, float, int, int] | None = None
    i = 0
    while i < len(flags):
        if not flags[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(flags) and flags[j + 1]:
            j += 1
        key = (j - i + 1, etas[j] / etas[i], -i, j)
        if best is None or key[:3] > best[:3]:
            best = key
        i = j + 1
    return None if best is None else (-best[2], best[3])


def _predicted_edge(predicted: float | None, grid: list[float]) -> str:
    if predicted is None:
        return "no curvature data: the jet gives no upper edge"
    if math.isinf(predicted):
        return "zero curvature: the jet puts no upper edge"
    below = [e for e in grid if e <= predicted]
    above = [e for e in grid if e > predicted]
    if not below:
        return f"below the smallest grid point {grid[0]:.3g}"
    if not above:
        return f"beyond the largest grid point {grid[-1]:.3g} (extrapolated, not measured)"
    return f"between grid points {below[-1]:.3g} and {above[0]:.3g}"


def _without_noise_estimate(records: list[PointRecord]) -> bool:
    """No ±η pair and no first-order oracle in any record (another tool's, the seed's
    format): nothing says how noisy one ΔH is, nor what ΔH/η should be."""
    return not any(
        r.entropy_change_negative is not None or r.first_order_slope is not None for r in records
    )


def _noise_model(
    by_repeat: dict[int, list[PointRecord]], below: Floor, confidence: float
) -> tuple[NoiseModel, dict[int, stats.BendFit | None]]:
    """NoiseModel and each repeat's ΔH_r = s_r·η + q_r·η² over its resolvable η."""
    reps = sorted(by_repeat)
    groups = []
    for rep in reps:
        ok = below.resolvable(by_repeat[rep])
        groups.append(
            ([float(r.learning_rate) for r in ok], [float(r.entropy_change) for r in ok])  # type: ignore[arg-type]
        )
    pooled = stats.fit_bends(groups)
    fitted = sum(f is not None for f in pooled.fits)
    critical = stats.simultaneous_t(confidence, fitted, pooled.dof)
    noise = NoiseModel(
        sigma=pooled.sigma if math.isfinite(pooled.sigma) else None,
        dof=pooled.dof,
        critical=critical if math.isfinite(critical) else None,
        confidence=confidence,
    )
    return noise, dict(zip(reps, pooled.fits))


def _bend_at(
    fit: stats.BendFit | None, eta: float, noise: NoiseModel | None
) -> tuple[float | None, float | None]:
    """A repeat's fitted bend at η (∝ η) and its SE; None without a noise estimate, or while
    its slope is within noise of 0 (a ratio to it says nothing)."""
    if noise is None or fit is None or noise.critical is None:
        return None, None
    if not abs(fit.slope) > noise.critical * fit.slope_se:
        return None, None
    scale = eta / fit.x_top
    return fit.bend * scale, fit.bend_se * scale


def _point_status(
    points: list[RepeatPoint], tol: float, confidence: float, noise: NoiseModel | None
) -> tuple[float | None, float | None, float | None, str]:
    """(mean |n|, its upper bound, its lower bound, status) of one resolvable grid point.

    Within: the upper bound over repeats ≤ tol. Beyond, for sweep records (noise below the
    floor's 1 %): the mean itself > tol; for records without a noise estimate, the mean of
    |bend| is raised by noise of either sign, so only its noise-proof lower bound > tol.
    """
    if noise is None:
        values = [p.nonlinearity for p in points if p.nonlinearity is not None]
    else:
        values = [p.bend for p in points if p.bend is not None]
    if len(values) < len(points):  # a repeat without a reference slope or a resolved bend
        return None, None, None, "undecided"
    mean_abs = float(np.mean(np.abs(values)))
    bound = stats.upper_bound(np.abs(values), confidence)
    lower = None
    if noise is not None:
        se = [p.bend_stderr for p in points]
        lower = stats.mean_abs_lower_bound(values, se, noise.dof, confidence)  # type: ignore[arg-type]
    beyond = mean_abs > tol if lower is None else lower > tol
    status = "within" if bound <= tol else "beyond" if beyond else "undecided"
    return mean_abs, bound, lower, status


def _nonlinearity_check(
    per_eta: list[PointSummary],
    summaries: list[RepeatSummary],
    tol: float,
    thresholds: stats.Thresholds,
    noise: NoiseModel | None,
) -> AnalysisCheck:
    """The worst grid point's bound of mean |n_r(η)| against tol, and where it is beyond or
    undecided (for records without a noise estimate: why noise cannot be told from a bend)."""
    decided = [p for p in per_eta if p.resolvable]
    if not decided:
        return AnalysisCheck("nonlinearity", tol, None, None, "no resolvable η")
    worst = max(decided, key=lambda p: -1 if p.nonlinearity_bound is None else p.nonlinearity_bound)
    beyond = [p for p in decided if p.status == "beyond"]
    undecided = [p for p in decided if p.status == "undecided"]
    value = worst.nonlinearity_bound
    passed = False if beyond else None if undecided else True
    what = "|n_r(η)|" if noise is None else "|bend_r(η)|"
    detail = (
        f"max over resolvable η of the {thresholds.confidence:.0%} upper bound of mean "
        f"{what} = {_fmt(value)} at η = {worst.learning_rate:.3g} (tolerance {tol:g})"
    )
    if noise is not None:
        detail = (
            "no noise estimate in the records (no ±η pair, no first-order oracle): each "
            "repeat's fit ΔH_r = s_r·η + q_r·η² with one absolute noise σ = "
            f"{_fmt(noise.sigma)} nats ({noise.dof} residual dof pooled over the repeats), "
            f"bend_r(η) = q_r·η/s_r; " + detail
        )
    if beyond:
        detail += "; beyond tolerance at η = " + ", ".join(
            f"{p.learning_rate:.3g} (mean |n| {p.nonlinearity_mean_abs:.3g})"
            if noise is None
            else f"{p.learning_rate:.3g} (mean |bend| {p.nonlinearity_mean_abs:.3g}, "
            f"lower bound {p.nonlinearity_lower_bound:.3g})"
            for p in beyond
        )
    if undecided and noise is None:
        detail += "; undecided (bound > tol ≥ mean: more repeats) at η = " + ", ".join(
            f"{p.learning_rate:.3g}" for p in undecided
        )
    elif undecided:
        detail += "; " + _noise_undecided(undecided, summaries, noise)
    return AnalysisCheck("nonlinearity", tol, value, passed, detail)


def _noise_undecided(
    undecided: list[PointSummary], summaries: list[RepeatSummary], noise: NoiseModel
) -> str:
    """Why grid points of records without a noise estimate are undecided."""
    if noise.sigma is None:
        return (
            "undecided: no residual to estimate the noise from (a repeat's fit needs ≥ 3 "
            "resolvable η)"
        )
    unresolved = [s.repeat for s in summaries if s.bend_fit is None or s.slope_reference is None]
    unresolved += [
        s.repeat
        for s in summaries
        if s.bend_fit is not None
        and s.repeat not in unresolved
        and _bend_at(s.bend_fit, s.bend_fit.x_top, noise)[0] is None
    ]
    out = "noise cannot be told from a bend at η = " + ", ".join(
        f"{p.learning_rate:.3g} (mean |bend| {_fmt(p.nonlinearity_mean_abs)}, "
        f"{noise.confidence:.0%} bounds [{_fmt(p.nonlinearity_lower_bound)}, "
        f"{_fmt(p.nonlinearity_bound)}])"
        for p in undecided
    )
    out += ": more repeats, or a sweep's ±η pairs"
    if unresolved:
        out += f"; repeat(s) {sorted(unresolved)}: slope not resolved from the noise"
    return out


# The steps of :func:`analyze`, each returning a frozen result.


@dataclass(frozen=True)
class Inputs:
    """The records of one analysis, sorted and grouped."""

    rows: list[PointRecord]  # every record, sorted by (η, repeat)
    run_dtype: str
    reading: str
    grid: list[float]  # the distinct η, ascending
    measured: list[PointRecord]  # the successful ones
    by_repeat: dict[int, list[PointRecord]]  # measured, per repeat, sorted by η


@dataclass(frozen=True)
class FloorPoint:
    """The floor's word on one (η, repeat)."""

    reasons: list[str]  # why it is not resolvable (empty: resolvable)
    symmetric_residual: float | None
    rounding_ratio: float | None
    predicted_nonlinearity: float | None


@dataclass(frozen=True)
class Floor:
    """The precision floor of every measurement and each repeat's MeasuredJet."""

    points: dict[tuple[float, int], FloorPoint]  # (η, repeat) →
    jets: dict[int, MeasuredJet]

    def resolvable(self, records: list[PointRecord]) -> list[PointRecord]:
        return [
            r for r in records if not self.points[(float(r.learning_rate), int(r.repeat))].reasons
        ]


@dataclass(frozen=True)
class Repeats:
    """Every (η, repeat) against its repeat's reference, and each repeat's summary."""

    points: list[RepeatPoint]
    summaries: list[RepeatSummary]
    noise: NoiseModel | None  # records without a noise estimate of their own


@dataclass(frozen=True)
class WindowResult:
    """The grid points marked in or out of the window, the window, and the notes on it."""

    per_eta: list[PointSummary]
    window: Window
    notes: list[str]


@dataclass(frozen=True)
class MixedModel:
    """The random-slope fit over the resolvable points (None, with a note, if it failed)."""

    fit: stats.RandomSlopeFit | None
    note: str | None


class CheckKind(str, Enum):
    """What a check's state means for the verdict."""

    DECIDING = "deciding"  # failed or undecided: not LINEAR
    NOT_APPLICABLE = "not applicable"  # deciding, but nothing to check here: no bar
    REPORTED = "reported"  # the seed's pooled statistics: shown, never deciding


@dataclass(frozen=True)
class AnalysisCheck(Check):
    """A check of the analysis, with its kind."""

    kind: CheckKind = CheckKind.DECIDING


def analyze(
    records: Iterable[PointRecord | Mapping[str, Any]],
    meta: Mapping[str, Any] | None = None,
    thresholds: stats.Thresholds = stats.Thresholds(),  # noqa: B008 - frozen
    floor: FloorThresholds = FloorThresholds(),  # noqa: B008 - frozen
    dtype: str | None = None,
) -> Analysis:
    """The verdict on raw (η, repeat) records (PointRecords or their JSON dicts).

    ``meta`` is run_meta.json (checkpoint, config, environment: copied into analysis.json;
    its dtype is used only for records that lack their own). ``dtype`` overrides both for
    schema-1 records.
    """
    meta = dict(meta or {})
    data = gather(records, meta, dtype)
    tol = thresholds.tolerance
    below = precision_floor(data, tol, floor)
    repeats = repeat_summaries(data, below, thresholds.confidence)
    points = point_summaries(data, repeats, tol, thresholds.confidence)
    shown = linear_window(data, points, below, tol, repeats.noise)
    checks = deciding_checks(data, shown.per_eta, repeats, thresholds)
    pooled, reported = pooled_statistics(data.rows, shown.per_eta, thresholds)
    mixed = mixed_model(repeats.points, thresholds.confidence)
    checks.update(reported)
    verdict, reason = _verdict(shown.per_eta, checks)
    return Analysis(
        dtype=data.run_dtype,
        reading=data.reading,
        points=repeats.points,
        repeats=repeats.summaries,
        per_eta=shown.per_eta,
        window=shown.window,
        checks=checks,
        verdict=verdict,
        verdict_reason=reason,
        pooled=pooled,
        mixed_model=mixed.fit,
        records=data.rows,
        thresholds=thresholds,
        floor=floor,
        facts=record_facts(data, repeats),
        meta=meta,
        notes=shown.notes + ([mixed.note] if mixed.note else []),
        noise=repeats.noise,
    )


def gather(
    records: Iterable[PointRecord | Mapping[str, Any]], meta: Mapping[str, Any], dtype: str | None
) -> Inputs:
    """The records sorted, their dtype settled (DESIGN §5), the grid, and the measured ones
    grouped by repeat."""
    fallback = dtype or (meta.get("config") or {}).get("dtype")
    rows = as_records(records, dtype=fallback)
    if not rows:
        raise ValueError("no records to analyse")
    run_dtype = dtype or _run_dtype(rows, meta)
    grid = sorted({float(r.learning_rate) for r in rows})
    if not all(e > 0 for e in grid):
        raise ValueError("learning rates must be > 0")
    measured = [r for r in rows if r.measured]
    by_repeat: dict[int, list[PointRecord]] = {}
    for r in measured:
        by_repeat.setdefault(int(r.repeat), []).append(r)
    return Inputs(rows, run_dtype, rows[0].reading, grid, measured, by_repeat)


def precision_floor(data: Inputs, tol: float, floor: FloorThresholds) -> Floor:
    """The floor of every measurement. The symmetric check needs c, which (without the
    nested jvp) the repeat's own pairs give: the other checks first, then each repeat's
    MeasuredJet from the pairs they pass, then the symmetric check."""
    base = {(float(r.learning_rate), int(r.repeat)): _base_floor_reasons(r, data.run_dtype, floor)
            for r in data.measured}  # fmt: skip
    jets = {
        rep: measured_jet(
            mine, tol, {float(r.learning_rate) for r in mine if not base[(float(r.learning_rate), rep)][0]}
        )
        for rep, mine in data.by_repeat.items()
    }  # fmt: skip
    points = {}
    for r in data.measured:
        key = (float(r.learning_rate), int(r.repeat))
        reasons, rounding = base[key]
        more, sym, predicted = _symmetric_reasons(r, data.run_dtype, tol, floor, jets[key[1]])
        points[key] = FloorPoint(reasons + more, sym, rounding, predicted)
    return Floor(points, jets)


def repeat_summaries(data: Inputs, below: Floor, confidence: float) -> Repeats:
    """f, c and n of every (η, repeat) against its repeat's reference, and each repeat's own
    line; for records without a noise estimate, the references and bends of NoiseModel."""
    noise, bend_fits = None, {}
    if _without_noise_estimate(data.measured):
        noise, bend_fits = _noise_model(data.by_repeat, below, confidence)
    points: list[RepeatPoint] = []
    summaries: list[RepeatSummary] = []
    for rep, mine in sorted(data.by_repeat.items()):
        ok = below.resolvable(mine)
        ref = ok[0] if ok else None  # sorted by η: the smallest resolvable
        fit = bend_fits.get(rep)
        s_r, how = _reference(mine[0].first_order_slope, ref, fit, noise)
        calibration = None
        if ref is not None and s_r is not None and how == "first order":
            calibration = float(ref.entropy_change) / (float(ref.learning_rate) * s_r) - 1
        for r in mine:
            points.append(_repeat_point(r, below, ref, s_r, how, calibration, fit, noise))
        line = None
        if len({float(r.learning_rate) for r in ok}) >= 3:
            line = stats.fit_ols(
                [float(r.learning_rate) for r in ok],
                [float(r.entropy_change) for r in ok],  # type: ignore[arg-type]
            )
        summaries.append(
            RepeatSummary(
                repeat=rep,
                slope_reference=s_r,
                reference=how,
                eta_reference=float(ref.learning_rate) if ref else None,
                calibration=calibration,
                r_squared=line.r_squared if line else None,
                slope=line.slope if line else None,
                intercept=line.intercept if line else None,
                n_resolvable=len(ok),
                measured_jet=below.jets[rep],
                bend_fit=fit,
                grad_norm=mine[0].grad_norm,
                momentum_share=mine[0].momentum_share,
                groups_kept=mine[0].groups_kept,
                groups_dropped=mine[0].groups_dropped,
            )
        )
    return Repeats(points, summaries, noise)


def _reference(
    oracle: float | None,
    ref: PointRecord | None,
    fit: stats.BendFit | None,
    noise: NoiseModel | None,
) -> tuple[float | None, str]:
    """s_r and where it came from: the oracle ∇H·v; for records without a noise estimate
    the η → 0 slope of the repeat's fit; else its ΔH/η at its smallest resolvable η."""
    if oracle is not None and oracle != 0:
        return float(oracle), "first order"
    if noise is not None:
        if fit is not None and fit.slope != 0:
            return fit.slope, "η → 0 slope of its fit ΔH = s·η + q·η² (no noise estimate)"
        return None, "none"
    if ref is not None and ref.entropy_change != 0:
        return float(ref.entropy_change) / float(ref.learning_rate), (  # type: ignore[arg-type]
            "ΔH/η at the smallest resolvable η"
        )
    return None, "none"


def _repeat_point(
    r: PointRecord,
    below: Floor,
    ref: PointRecord | None,
    s_r: float | None,
    how: str,
    calibration: float | None,
    fit: stats.BendFit | None,
    noise: NoiseModel | None,
) -> RepeatPoint:
    """One measurement: the floor's word, f_r(η) and n_r(η) (and the fitted bend)."""
    eta = float(r.learning_rate)
    at = below.points[(eta, int(r.repeat))]
    f = None if s_r is None else float(r.entropy_change) / (eta * s_r) - 1  # type: ignore[arg-type]
    n = None
    if not at.reasons and ref is not None and f is not None:
        n = (1 + f) / (1 + (calibration or 0.0)) - 1
    bend, bend_se = _bend_at(fit, eta, noise) if not at.reasons else (None, None)
    return RepeatPoint(
        learning_rate=eta,
        repeat=int(r.repeat),
        entropy_change=float(r.entropy_change),  # type: ignore[arg-type]
        resolvable=not at.reasons,
        reasons=at.reasons,
        relative_to_first_order=f if how == "first order" else None,
        nonlinearity=n,
        symmetric_residual=at.symmetric_residual,
        rounding_ratio=at.rounding_ratio,
        quantized_fraction=r.quantized_fraction,
        predicted_nonlinearity=at.predicted_nonlinearity,
        bend=bend,
        bend_stderr=bend_se,
    )


def point_summaries(
    data: Inputs, repeats: Repeats, tol: float, confidence: float
) -> list[PointSummary]:
    """Per grid point: resolvable iff every successful repeat is (and ≥ 2 are); then the
    bounds of mean |n| and the status."""
    per_eta: list[PointSummary] = []
    for eta in data.grid:
        mine = [p for p in repeats.points if p.learning_rate == eta]
        n_failed = sum(1 for r in data.rows if float(r.learning_rate) == eta and not r.measured)
        reasons = [f"repeat {p.repeat}: {why}" for p in mine for why in p.reasons]
        if not mine:
            reasons = ["every run failed"]
        elif len(mine) < 2:
            reasons.append("fewer than 2 successful repeats")
        mean_abs = bound = lower = None
        status = "failed" if not mine else "unresolvable"
        if not reasons:
            mean_abs, bound, lower, status = _point_status(mine, tol, confidence, repeats.noise)
        per_eta.append(
            PointSummary(
                learning_rate=eta,
                n_repeats=len(mine),
                n_failed=n_failed,
                resolvable=not reasons,
                reasons=reasons,
                nonlinearity_mean_abs=mean_abs,
                nonlinearity_bound=bound,
                status=status,
                in_window=False,
                predicted_nonlinearity=_max_or_none(p.predicted_nonlinearity for p in mine),
                nonlinearity_lower_bound=lower,
            )
        )
    return per_eta


def linear_window(
    data: Inputs,
    per_eta: list[PointSummary],
    below: Floor,
    tol: float,
    noise: NoiseModel | None,
) -> WindowResult:
    """The longest contiguous run of grid points within tol, and the jet's predicted edge
    beside it (never the window)."""
    grid = data.grid
    run = _longest_run([p.status == "within" for p in per_eta], grid)
    if run is not None:
        per_eta = [
            dataclasses.replace(p, in_window=run[0] <= i <= run[1]) for i, p in enumerate(per_eta)
        ]
    maxima = []
    for r in data.measured:
        if r.first_order_slope is not None:
            c, d, _ = jet_terms(r, below.jets[int(r.repeat)])
            maxima.append(eta_max(r.first_order_slope, c, tol, d))
    maxima = [m for m in maxima if m is not None]
    predicted_max = min(maxima) if maxima else None
    notes = []
    if noise is not None:
        notes.append(
            "no ±η pair and no first-order oracle in the records: each grid point is judged by "
            "the repeats' fitted bends q_r·η/s_r (DESIGN §4, Noise)"
        )
    if not any(p.resolvable for p in per_eta):
        notes.append("no resolvable η: every point is below the precision floor or failed")
    elif run is None:
        notes.append("empty: no resolvable η is within the tolerance")
    window = Window(
        eta_min=grid[run[0]] if run else None,
        eta_max=grid[run[1]] if run else None,
        n_points=run[1] - run[0] + 1 if run else 0,
        tolerance=tol,
        eta_max_predicted=predicted_max,
        predicted_edge=_predicted_edge(predicted_max, grid),
        note="; ".join(notes),
    )
    return WindowResult(per_eta, window, notes)


def deciding_checks(
    data: Inputs,
    per_eta: list[PointSummary],
    repeats: Repeats,
    thresholds: stats.Thresholds,
) -> dict[str, Check]:
    """The checks that decide the verdict (DESIGN §4)."""
    grid = data.grid
    tol = thresholds.tolerance
    m = sum(p.resolvable for p in per_eta)
    need = thresholds.min_resolvable_points
    return {
        "resolvable_points": AnalysisCheck(
            "resolvable_points",
            need,
            m,
            m >= need,
            f"{m} resolvable η of {len(grid)} (need ≥ {need})",
        ),
        "r_squared": _r_squared_check(repeats.summaries, thresholds),
        "nonlinearity": _nonlinearity_check(
            per_eta, repeats.summaries, tol, thresholds, repeats.noise
        ),
        "first_order": _first_order_check(repeats, thresholds),
        "rl_signal": _rl_signal_check(data.by_repeat),
    }


def _rl_signal_check(by_repeat: Mapping[int, list[PointRecord]]) -> AnalysisCheck:
    """Every direction is an RL update: a repeat whose RL gradient is exactly 0 (no reward
    variance in any group) stepped on AdamW's momentum alone, which says nothing about the
    trainer's update. Records without the gradient's norm (another tool's): not applicable."""
    norms = {r: rows[0].grad_norm for r, rows in by_repeat.items() if rows}
    if not norms or any(v is None for v in norms.values()):
        return AnalysisCheck(
            "rl_signal", 0.0, None, None, "the records carry no RL gradient norm",
            CheckKind.NOT_APPLICABLE,
        )  # fmt: skip
    zero = sorted(r for r, v in norms.items() if not v > 0)
    detail = (
        f"repeat(s) {zero} had a zero RL gradient (no reward variance in any group): the step "
        "was AdamW's momentum alone, not an RL update"
        if zero
        else f"every repeat's RL gradient is nonzero (norm ≥ {min(norms.values()):.3g})"
    )
    return AnalysisCheck("rl_signal", 0.0, min(norms.values()), not zero, detail)


def _r_squared_check(summaries: list[RepeatSummary], thresholds: stats.Thresholds) -> AnalysisCheck:
    """Each repeat's own line ΔH_r = α_r·η + β_r: min and median R² > r2_min."""
    r2 = [(s.repeat, s.r_squared) for s in summaries]
    known = [v for _, v in r2 if v is not None]
    if not r2 or len(known) < len(r2):
        missing = [rep for rep, v in r2 if v is None]
        return AnalysisCheck(
            "r_squared",
            thresholds.r2_min,
            min(known) if known else None,
            None,
            f"repeat(s) {missing} have fewer than 3 resolvable η: no line of their own"
            if r2
            else "no measured repeat",
        )
    low, mid = min(known), statistics.median(known)
    ok = low > thresholds.r2_min and mid > thresholds.r2_min
    return AnalysisCheck(
        "r_squared",
        thresholds.r2_min,
        low,
        ok,
        f"each repeat's own line ΔH_r = α_r·η + β_r over its resolvable η: R² min "
        f"{low:.6f}, median {mid:.6f} {'>' if ok else 'not >'} {thresholds.r2_min}",
    )


def _first_order_check(repeats: Repeats, thresholds: stats.Thresholds) -> AnalysisCheck:
    """Calibration: c_r at each repeat's smallest resolvable η against tol; not applicable
    without a first-order oracle."""
    tol = thresholds.tolerance
    summaries = repeats.summaries
    calibrations = [s.calibration for s in summaries if s.calibration is not None]
    if not any(s.reference == "first order" for s in summaries):
        return AnalysisCheck(
            "first_order",
            tol,
            None,
            None,
            "no first-order oracle (first order disabled or steps > 1): each repeat's "
            + (
                "reference is the η → 0 slope of its own fit (no noise estimate in the records)"
                if repeats.noise is not None
                else "reference is its own ΔH/η at its smallest resolvable η"
            ),
            CheckKind.NOT_APPLICABLE,
        )
    if len(calibrations) < len(summaries) or len(calibrations) < 2:
        return AnalysisCheck(
            "first_order", tol, None, None, "some repeat has no resolvable η to calibrate at"
        )
    mean_abs = float(np.mean(np.abs(calibrations)))
    bound = stats.upper_bound(np.abs(calibrations), thresholds.confidence)
    passed = True if bound <= tol else False if mean_abs > tol else None
    return AnalysisCheck(
        "first_order",
        tol,
        bound,
        passed,
        "c_r = ΔH_r/(η·∇H·v_r) − 1 at each repeat's smallest resolvable η: "
        + ", ".join(f"{c:+.2e}" for c in calibrations)
        + f"; {thresholds.confidence:.0%} upper bound of mean |c_r| {bound:.3g}, "
        f"mean {mean_abs:.3g} (tolerance {tol:g})",
    )


# The seed's pooled checks, by their name in analysis.json and in stats.POOLED_CHECKS.
_REPORTED = {
    "pooled_r_squared": "r_squared",
    "standardized_residual": "standardized_residual",
    "relative_residual": "relative_residual",
    "lack_of_fit": "lack_of_fit",
    "intercept": "intercept",
    "loglog_slope": "loglog_slope",
}


def pooled_statistics(
    rows: list[PointRecord], per_eta: list[PointSummary], thresholds: stats.Thresholds
) -> tuple[stats.PooledStatistics, dict[str, Check]]:
    """The seed's unpaired statistics over the resolvable grid points (paired log-log
    slope: the repeats are known), and their checks, reported, never deciding."""
    first_order = None
    if any(_finite(r.first_order_prediction) for r in rows):
        first_order = [
            float(r.first_order_prediction) if _finite(r.first_order_prediction) else math.nan
            for r in rows
        ]
    points = stats.pooled_points(
        [float(r.learning_rate) for r in rows],
        [float(r.entropy_change) if r.measured else math.nan for r in rows],  # type: ignore[arg-type]
        first_order=first_order,
        resolvable={p.learning_rate: p.resolvable for p in per_eta},
        repeats=[int(r.repeat) for r in rows],
    )
    fits = stats.pooled_fits(points, thresholds.loglog_margin)
    residuals = stats.pooled_residuals(points, fits)
    checks = stats.pooled_checks(points, fits, residuals, thresholds)
    reported: dict[str, Check] = {}
    for name, source in _REPORTED.items():
        c = checks[source]
        detail = c.detail + " [reported, not deciding]"
        reported[name] = AnalysisCheck(
            name, c.threshold, c.value, c.passed, detail, CheckKind.REPORTED
        )
    return stats.PooledStatistics.of(points, fits, residuals), reported


def mixed_model(points: list[RepeatPoint], confidence: float) -> MixedModel:
    """The random-slope model over the resolvable points (≥ 2 repeats and 2 η)."""
    fit_points = [p for p in points if p.resolvable]
    if len({p.repeat for p in fit_points}) < 2 or len({p.learning_rate for p in fit_points}) < 2:
        return MixedModel(None, None)
    try:
        fit = stats.fit_random_slope(
            [p.learning_rate for p in fit_points],
            [p.entropy_change for p in fit_points],
            [p.repeat for p in fit_points],
            confidence,
        )
    except (ValueError, np.linalg.LinAlgError) as exc:
        return MixedModel(None, f"mixed model not fitted: {exc}")
    return MixedModel(fit, None)


def _verdict(per_eta: list[PointSummary], checks: Mapping[str, Check]) -> tuple[str, str]:
    """DESIGN §4: LINEAR over the tested grid, NONLINEAR, or INCONCLUSIVE with the reason."""
    if checks["rl_signal"].passed is False:  # no verdict about an update that did not happen
        return "inconclusive", f"rl_signal failed: {checks['rl_signal'].detail}"
    beyond = [p.learning_rate for p in per_eta if p.status == "beyond"]
    if beyond:
        first = min(beyond)
        inside = [p.learning_rate for p in per_eta if p.in_window]
        where = (
            f"linear within [{min(inside):.3g}, {max(inside):.3g}]"
            if inside
            else "no linear window"
        )
        return "nonlinear", (
            f"ΔH/η bends beyond the tolerance at η = {', '.join(f'{e:.3g}' for e in beyond)} "
            f"(first at {first:.3g}); {where}"
        )
    reasons = []
    resolvable = [p for p in per_eta if p.resolvable]
    if checks["resolvable_points"].passed is not True:
        reasons.append(checks["resolvable_points"].detail)
    if resolvable and not all(p.in_window for p in resolvable):
        outside = [p for p in resolvable if not p.in_window]
        reasons.append(
            "resolvable η outside the window: "
            + ", ".join(f"{p.learning_rate:.3g} ({p.status})" for p in outside)
        )
    for name in ("nonlinearity", "first_order", "r_squared"):
        c = checks[name]
        if _kind(c) is CheckKind.NOT_APPLICABLE:
            continue
        if c.passed is False:
            reasons.append(f"{name} failed: {c.detail}")
        elif c.passed is None:
            reasons.append(f"{name} undecided: {c.detail}")
    if reasons:
        return "inconclusive", "; ".join(reasons)
    lo, hi = resolvable[0].learning_rate, resolvable[-1].learning_rate
    reason = f"linear over the tested grid [{lo:.3g}, {hi:.3g}]: every decisive check passed"
    below = [p.learning_rate for p in per_eta if not p.resolvable]
    if below:
        reason += "; unresolvable (not judged): η = " + ", ".join(f"{e:.3g}" for e in below)
    return "linear", reason


def decides(check: Check) -> bool:
    """Whether a check decides the verdict (deciding or not applicable), or is only reported."""
    return _kind(check) is not CheckKind.REPORTED


def _kind(check: Check) -> CheckKind:
    """A check's kind (a plain stats.Check: by its name)."""
    if isinstance(check, AnalysisCheck):
        return check.kind
    return CheckKind.DECIDING if check.name in DECIDING_CHECKS else CheckKind.REPORTED
