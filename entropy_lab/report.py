"""From raw records to the verdict: analysis.json, the printed tables and the plots.

Everything here is a pure function of the records and ``run_meta.json``: ``report DIR``
rebuilds the analysis on any machine, with no checkpoint and no model.

Which points are fitted: ``theory.classify_points`` marks an η *unresolvable* when the
measurement sits below the precision floor (update rounded away, |ΔH| under eps·H, or
ΔH(η) + ΔH(−η) far from η²c).  Only those are left out of the fits.  A resolvable η
beyond the curvature limit η_max stays in: whether such points still lie on the line is
exactly what the fit tests.

The verdict is the linearity verdict of ``stats.analyze_linearity`` (six checks).  The
extra ``first_order`` check compares the measured slope with ∇H·v from the theory; it is
reported beside the verdict, not folded into it, because it tests the measurement and the
oracle against each other rather than the shape of ΔH(η).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from entropy_lab import stats, theory
from entropy_lab.store import ResultsFolder, atomic_write_json, eta_label, json_safe

__all__ = [
    "ANALYSIS_FILE",
    "MAIN_PLOT",
    "RAW_PLOT",
    "SCHEMA_VERSION",
    "build_analysis",
    "format_tables",
    "plot_raw_measurements",
    "plot_summary",
    "thresholds_from_meta",
    "write_report",
]

SCHEMA_VERSION = 1
ANALYSIS_FILE = "analysis.json"
MAIN_PLOT = "entropy_vs_learning_rate.png"
RAW_PLOT = "raw_measurements.png"

_NAN = float("nan")


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_float(value: Any) -> float:
    return float(value) if _finite(value) else _NAN


def _key(record: Mapping[str, Any]) -> tuple[float, int]:
    return float(record["learning_rate"]), int(record["repeat"])


def _is_measured(record: Mapping[str, Any]) -> bool:
    return bool(record.get("success")) and _finite(record.get("entropy_change"))


def _mean_stderr(values: Sequence[float]) -> dict[str, Any]:
    """Mean, SE (ddof = 1) and n of a list of floats; None where undefined."""
    n = len(values)
    if n == 0:
        return {"mean": None, "stderr": None, "n": 0}
    arr = np.asarray(values, dtype=float)
    mean = float(arr.mean())
    stderr = float(arr.std(ddof=1) / math.sqrt(n)) if n >= 2 else None
    return {"mean": mean, "stderr": stderr, "n": n}


def _by_repeat(records: Iterable[Mapping[str, Any]], field: str) -> dict[int, float]:
    """{repeat: its value of ``field``} (a property of v_r, shared by every η), in order."""
    by_repeat: dict[int, list[float]] = {}
    for r in records:
        if _finite(r.get(field)):
            by_repeat.setdefault(int(r["repeat"]), []).append(float(r[field]))
    return {rep: float(np.mean(v)) for rep, v in sorted(by_repeat.items())}


def _per_repeat(records: Iterable[Mapping[str, Any]], field: str) -> list[float]:
    """One value of ``field`` per repeat that has it."""
    return list(_by_repeat(records, field).values())


def _check_dict(check: stats.Check) -> dict[str, Any]:
    return {
        "threshold": check.threshold,
        "value": check.value,
        "passed": check.passed,
        "detail": check.detail,
    }


def _oracle_comparison(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The conditional-reading slope three ways: jvp, Cui et al.'s identity, their forecasts.

    The identity must equal the jvp (both exact at first order); the crude forecasts
    (ż ≈ π·A, ż ≈ A) are shown with their ratio to the jvp to say how far they miss.
    """
    jvp = _by_repeat(rows, "first_order_slope_conditional")
    out: dict[str, Any] = {"jvp_conditional": _mean_stderr(list(jvp.values()))}
    for name, field in (
        ("identity", "identity_slope"),
        ("vanilla_pg_forecast", "cui_vanilla_pg_slope"),
        ("natural_pg_forecast", "cui_natural_pg_slope"),
    ):
        values = _by_repeat(rows, field)
        entry = _mean_stderr(list(values.values()))
        # Paired by repeat: each oracle against the jvp of the same update direction.
        ratios = [v / jvp[rep] for rep, v in values.items() if jvp.get(rep)]
        entry["ratio_to_jvp"] = _mean_stderr(ratios)["mean"] if ratios else None
        out[name] = entry
    return out


def _first_order_check(ols: stats.LinearFit | None, first: Mapping[str, Any]) -> dict[str, Any]:
    """|OLS slope − mean ∇H·v| ≤ max(3·combined SE, 5 % of |∇H·v|)."""
    if first["n"] == 0:
        return {
            "threshold": None,
            "value": None,
            "passed": None,
            "detail": "no first-order data (first_order disabled or no repeat succeeded)",
        }
    if ols is None:
        return {
            "threshold": None,
            "value": None,
            "passed": None,
            "detail": "no OLS slope (fewer than 2 resolvable η)",
        }
    fo_mean = float(first["mean"])
    fo_se = float(first["stderr"]) if first["stderr"] is not None else 0.0
    ols_se = ols.slope_se if math.isfinite(ols.slope_se) else 0.0
    combined = math.hypot(ols_se, fo_se)
    tolerance = max(3.0 * combined, 0.05 * abs(fo_mean))
    diff = abs(ols.slope - fo_mean)
    passed = diff <= tolerance
    return {
        "threshold": tolerance,
        "value": diff,
        "passed": passed,
        "detail": (
            f"|α_OLS − ∇H·v| = |{ols.slope:.6g} − {fo_mean:.6g}| = {diff:.3g} "
            f"{'≤' if passed else '>'} max(3·{combined:.3g}, 0.05·{abs(fo_mean):.3g}) = "
            f"{tolerance:.3g} (combined SE of the OLS slope and of ∇H·v over "
            f"{first['n']} repeat{'s' if first['n'] != 1 else ''})"
        ),
    }


# --------------------------------------------------------------------------------------
# analysis.json
# --------------------------------------------------------------------------------------


def build_analysis(
    records: Iterable[Mapping[str, Any]],
    meta: Mapping[str, Any],
    thresholds: stats.Thresholds = stats.Thresholds(),  # noqa: B008 - frozen
    floor: theory.FloorThresholds = theory.FloorThresholds(),  # noqa: B008 - frozen
) -> dict[str, Any]:
    """The content of analysis.json (DESIGN §5), deterministic in the records.

    ``meta`` is ``run_meta.json``: {checkpoint, config, environment}; ``config.dtype``
    sets the precision floor (fp32 when absent).  Records may come in any order.
    """
    rows = sorted((dict(r) for r in records), key=_key)
    measured = [r for r in rows if _is_measured(r)]
    failed = [r for r in rows if not _is_measured(r)]
    config = dict(meta.get("config") or {})
    environment = dict(meta.get("environment") or {})
    dtype = str(config.get("dtype") or environment.get("dtype") or "fp32")
    if dtype not in theory.EPS:
        raise ValueError(
            f"unknown dtype {dtype!r} in run_meta.json (expected {sorted(theory.EPS)})"
        )

    statuses = theory.classify_points(measured, dtype, floor)
    window = theory.linear_window(statuses, measured, floor.nonlinearity_tol)

    etas = [float(r["learning_rate"]) for r in rows]
    changes = [_as_float(r.get("entropy_change")) if _is_measured(r) else _NAN for r in rows]
    predictions = [_as_float(r.get("first_order_prediction")) for r in rows]
    has_first_order = any(math.isfinite(p) for p in predictions)
    la = stats.analyze_linearity(
        etas,
        changes,
        first_order=predictions if has_first_order else None,
        resolvable={eta: s.resolvable for eta, s in statuses.items()},
        thresholds=thresholds,
        n_failed=0,  # failed records enter as NaN changes and are counted there
        repeats=[int(r["repeat"]) for r in rows],  # common random numbers: pair by repeat
    )

    first = _mean_stderr(_per_repeat(rows, "first_order_slope"))
    curvature = _mean_stderr(_per_repeat(rows, "curvature"))
    third = _mean_stderr(_per_repeat(rows, "third_derivative"))
    checks = {name: _check_dict(c) for name, c in la.checks.items()}
    checks["first_order"] = _first_order_check(la.ols, first)

    regime = {
        "eta_min": window["eta_min"],
        "eta_max": window["eta_max"],
        "eta_max_predicted": window["eta_max_predicted"],
        "eta_max_from": window["eta_max_from"],
        "tolerance": window["tolerance"],
    }
    notes = []
    if window["eta_min"] is None:
        notes.append("no resolvable η: every point is below the precision floor or failed")
    elif window["eta_max"] is not None and window["eta_min"] > window["eta_max"]:
        notes.append("empty: the smallest resolvable η already exceeds η_max")
    if window["eta_max_from"] == "measured":
        notes.append(
            f"η_max capped by measurement: at η = {window['eta_max']:.3g} ΔH/η is already more "
            f"than {window['tolerance']:.0%} off ∇H·v (the theory predicted "
            f"{_g(window['eta_max_predicted'], '.3g')}; higher orders matter)"
        )
    elif window["eta_max"] is not None and math.isinf(window["eta_max"]):
        notes.append("zero measured curvature: no upper limit from theory")
    elif window["eta_max"] is None:
        notes.append("no curvature data: upper limit unknown")
    if notes:
        regime["note"] = "; ".join(notes)

    reason = la.verdict_reason
    if checks["first_order"]["passed"] is False:
        reason += "; note: measured slope disagrees with the first-order prediction ∇H·v"

    failures = [
        {
            "learning_rate": float(r["learning_rate"]),
            "repeat": int(r["repeat"]),
            "error": r.get("error")
            or ("no finite entropy_change" if r.get("success") else "unknown error"),
        }
        for r in failed
    ]

    per_eta: dict[str, Any] = {}
    for summary, flag, z, rel in zip(
        la.per_eta, la.resolvable, la.standardized_residual, la.relative_residual
    ):
        eta = summary.learning_rate
        status = statuses.get(eta)
        entry = summary.to_dict()
        entry.update(
            n_failed=sum(1 for r in failed if float(r["learning_rate"]) == eta),
            relative_residual=rel,
            standardized_residual=z,
            resolvable=bool(flag),
            unresolvable_reasons=list(status.reasons) if status else ["every run failed"],
            within_eta_max=status.within_eta_max if status else None,
            predicted_nonlinearity=status.predicted_nonlinearity if status else None,
            measured_nonlinearity=status.measured_nonlinearity if status else None,
            quantized_fraction=status.quantized_fraction if status else None,
            symmetric_residual=status.symmetric_residual if status else None,
        )
        per_eta[eta_label(eta)] = entry

    analysis = {
        "schema_version": SCHEMA_VERSION,
        "checkpoint": dict(meta.get("checkpoint") or {}),
        "config": config,
        "environment": environment,
        "summary": {
            "slope": la.ols.slope if la.ols else None,
            "intercept": la.ols.intercept if la.ols else None,
            "r_squared": la.ols.r_squared if la.ols else None,
            "ols": la.ols.to_dict() if la.ols else None,
            "weighted": la.weighted.to_dict() if la.weighted else None,
            "origin": la.origin.to_dict() if la.origin else None,
            "quadratic": la.quadratic.to_dict() if la.quadratic else None,
            "lack_of_fit": la.lack_of_fit.to_dict() if la.lack_of_fit else None,
            "loglog_slope": la.loglog.to_dict() if la.loglog else None,
            "first_order_slope": first,
            "curvature": curvature,
            "third_derivative": third,
            "first_order_oracles": _oracle_comparison(rows),
            "linear_regime": regime,
            "fitted_learning_rates": [
                s.learning_rate for s, f in zip(la.per_eta, la.resolvable) if f
            ],
            "checks": checks,
            "verdict": la.verdict,
            "verdict_reason": reason,
            "n_records": len(rows),
            "n_failed": len(failed),
            "failures": failures,
        },
        "per_learning_rate": per_eta,
        "thresholds": {
            "linearity": thresholds.to_dict(),
            "precision_floor": dataclasses.asdict(floor),
        },
    }
    return json_safe(analysis)


def default_thresholds(**linearity: Any) -> dict[str, Any]:
    """The {linearity, precision_floor} block stored in run_meta.json["thresholds"]."""
    return {
        "linearity": stats.Thresholds(**linearity).to_dict(),
        "precision_floor": dataclasses.asdict(theory.FloorThresholds()),
    }


def thresholds_from_meta(
    meta: Mapping[str, Any],
) -> tuple[stats.Thresholds, theory.FloorThresholds]:
    """Thresholds stored in run_meta.json["thresholds"] ({linearity, precision_floor}),
    defaults for anything missing; unknown names are ignored."""
    stored = meta.get("thresholds") or {}

    def pick(cls: type, values: Mapping[str, Any] | None) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in names})

    return (
        pick(stats.Thresholds, stored.get("linearity")),
        pick(theory.FloorThresholds, stored.get("precision_floor")),
    )


# --------------------------------------------------------------------------------------
# Printed tables
# --------------------------------------------------------------------------------------


def _g(value: Any, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _status(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "N/A"}[passed]


def _table(headers: list[str], rows: list[list[str]], left: set[int]) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: list[str]) -> str:
        out = []
        for i, (cell, w) in enumerate(zip(cells, widths)):
            out.append(cell.ljust(w) if i in left else cell.rjust(w))
        return "  ".join(out).rstrip()

    rule = "-" * len(line([*("-" * w for w in widths[:-1]), headers[-1]]))
    return [line(headers), rule, *(line(r) for r in rows)]


def _oracle_line(oracles: Mapping[str, Any]) -> str:
    """Conditional reading: identity/jvp, and the crude forecasts' ratio to the jvp."""
    if not oracles or oracles.get("jvp_conditional", {}).get("n", 0) == 0:
        return "n/a"
    parts = [f"jvp (conditional) {_g(oracles['jvp_conditional']['mean'], '.6g')}"]
    for key, label in (
        ("identity", "Cui identity"),
        ("vanilla_pg_forecast", "π·A forecast"),
        ("natural_pg_forecast", "A forecast"),
    ):
        ratio = (oracles.get(key) or {}).get("ratio_to_jvp")
        if ratio is not None:
            parts.append(f"{label} ×{ratio:.6g}" if key == "identity" else f"{label} ×{ratio:.3g}")
    return "; ".join(parts) + "  (ratio to the jvp)"


def format_tables(analysis: Mapping[str, Any]) -> str:
    """The "LINEARITY ANALYSIS" and "DETAILED RESULTS" blocks as plain text."""
    s = analysis["summary"]
    checks = s["checks"]
    th = analysis["thresholds"]["linearity"]
    bar = "=" * 78
    out = [bar, "LINEARITY ANALYSIS  (ΔH in nats; η = learning rate)", bar]

    r2_check = checks.get("r_squared", {})
    wls = s.get("weighted") or {}
    lof = s.get("lack_of_fit") or {}
    ll = s.get("loglog_slope") or {}
    fo = s["first_order_slope"]
    cv = s["curvature"]
    d3 = s.get("third_derivative") or {}
    regime = s["linear_regime"]
    fitted = s.get("fitted_learning_rates") or []

    lines = [
        (
            "fitted points",
            f"{len(fitted)} resolvable η, {_plural(s['n_failed'], 'failed run')}",
        ),
        ("OLS slope α", f"{_g(s['slope'], '.6g')} nats per unit η"),
        ("OLS intercept β", f"{_g(s['intercept'], '.4g')} nats"),
        (
            "R² (OLS, raw points)",
            f"{_g(s['r_squared'], '.6f')}  {_status(r2_check.get('passed'))} "
            f"(> {th['r2_min']:g} required)",
        ),
        (
            "WLS on means",
            f"α = {_g(wls.get('slope'), '.6g')}, χ²/dof = {_g(wls.get('reduced_chi2'), '.3g')} "
            f"(dof {_g(wls.get('dof'), 'd')})"
            if wls.get("method") == "wls"
            else "n/a (SE not > 0 at every η)"
            if wls
            else "n/a",
        ),
        (
            "lack of fit",
            f"F({_g(lof.get('df_lack_of_fit'), 'd')}, {_g(lof.get('df_pure_error'), 'd')}) = "
            f"{_g(lof.get('f_statistic'), '.3g')}, p = {_g(lof.get('p_value'), '.3g')}"
            if lof
            else "n/a",
        ),
        (
            "log-log slope",
            f"{_g(ll.get('slope'), '.4f')}  95% CI [{_g(ll.get('ci_low'), '.4f')}, "
            f"{_g(ll.get('ci_high'), '.4f')}]  (1 ± {th['loglog_margin']:g} required)"
            if ll and ll.get("slope") is not None
            else (ll.get("note") or "n/a")
            if ll
            else "n/a",
        ),
        (
            "first-order ∇H·v",
            f"{_g(fo['mean'], '.6g')} ± {_g(fo['stderr'], '.2g')} "
            f"(SE over {_plural(fo['n'], 'repeat')})",
        ),
        ("curvature vᵀ∇²H v", f"{_g(cv['mean'], '.4g')} ± {_g(cv['stderr'], '.2g')}"),
        (
            "third order ∇³H[v,v,v]",
            f"{_g(d3['mean'], '.4g')} ± {_g(d3['stderr'], '.2g')}" if d3.get("n") else "n/a",
        ),
        ("first-order oracles", _oracle_line(s.get("first_order_oracles") or {})),
        (
            "linear window",
            f"[{_g(regime['eta_min'], '.3g')}, {_g(regime['eta_max'], '.3g')}]  "
            f"(η_min: smallest resolvable η; η_max: {regime['tolerance']:.0%} nonlinearity, "
            f"{regime.get('eta_max_from') or 'second order'})"
            + (f"; {regime['note']}" if regime.get("note") else ""),
        ),
    ]
    width = max(len(k) for k, _ in lines)
    out += [f"  {k.ljust(width)}  {v}" for k, v in lines]

    out += ["", "  checks:"]
    name_w = max((len(n) for n in checks), default=0)
    for name, c in checks.items():
        out.append(f"    {name.ljust(name_w)}  {_status(c['passed']).ljust(4)}  {c['detail']}")
    out += ["", f"  VERDICT: {s['verdict'].upper()} — {s.get('verdict_reason', '')}"]
    for f in s["failures"]:
        out.append(
            f"  failed run: η = {f['learning_rate']:.3g}, repeat {f['repeat']}: {f['error']}"
        )

    out += ["", bar, "DETAILED RESULTS", bar]
    headers = [
        "η",
        "n",
        "mean ΔH",
        "std",
        "SE",
        "ΔH/η",
        "1st-order ΔH/η",
        "rel.res",
        "std.res",
        "resolvable / why not",
    ]
    rows = []
    for label, p in analysis["per_learning_rate"].items():
        eta = p["learning_rate"]
        mean = p["mean_entropy_change"]
        pred = p["first_order_prediction"]
        if p["resolvable"]:
            why = "yes" if p["within_eta_max"] is not False else "yes (beyond η_max)"
        else:
            why = "no: " + "; ".join(p["unresolvable_reasons"])
        rows.append(
            [
                label,
                str(p["n_samples"]),
                _g(mean, "+.4e"),
                _g(p["std_entropy_change"], ".2e"),
                _g(p["stderr_entropy_change"], ".2e"),
                _g(None if mean is None else mean / eta, "+.5g"),
                _g(None if pred is None else pred / eta, "+.5g"),
                _g(p["relative_residual"], "+.2e"),
                _g(p["standardized_residual"], "+.2f"),
                why,
            ]
        )
    out += ["  " + line for line in _table(headers, rows, left={0, 9})]
    out.append(bar)
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------

_OK = "#1f5fa8"
_BEYOND = "#e07b00"
_UNRES = "#9a9a9a"
_THEORY = "#c0392b"


def _save(fig: Any, path: Path) -> Path:
    """fig.savefig to a temporary name in the same folder, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(width, height), layout="constrained")


def _y_mode(values: Sequence[float]) -> str:
    """How to draw ΔH on a y axis: 'log' (all > 0), 'neglog' (all < 0) or 'symlog'."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if vals and all(v > 0 for v in vals):
        return "log"
    if vals and all(v < 0 for v in vals):
        return "neglog"
    return "symlog"


def _apply_y_mode(ax: Any, mode: str, values: Sequence[float], what: str) -> float:
    """Set the y scale; returns the sign to multiply ΔH by before plotting."""
    if mode == "log":
        ax.set_yscale("log")
        ax.set_ylabel(f"{what} (nats)")
        return 1.0
    if mode == "neglog":
        ax.set_yscale("log")
        ax.set_ylabel(f"−{what} (nats)   [ΔH < 0: entropy falls]")
        return -1.0
    nonzero = [abs(v) for v in values if v is not None and math.isfinite(v) and v != 0]
    linthresh = min(nonzero) if nonzero else 1e-12
    ax.set_yscale("symlog", linthresh=linthresh)
    _symlog_decade_ticks(ax, linthresh, max(nonzero) if nonzero else 1.0)
    ax.set_ylabel(f"{what} (nats; symlog: linear within ±{linthresh:.1g})")
    return 1.0


def _symlog_decade_ticks(ax: Any, linthresh: float, vmax: float) -> None:
    """±10^k ticks outside the linear band and 0, thinned to at most ~5 per side."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    lo = math.ceil(math.log10(linthresh))
    hi = math.ceil(math.log10(vmax)) + 1
    exps = list(range(lo, hi + 1))
    stride = max(1, math.ceil(len(exps) / 5))
    exps = exps[::-1][::stride][::-1]
    ticks = [-(10.0**k) for k in exps[::-1]] + [0.0] + [10.0**k for k in exps]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())

    def label(v: float, _: Any) -> str:
        if v == 0:
            return "0"
        k = round(math.log10(abs(v)))
        return f"${'-' if v < 0 else ''}10^{{{k}}}$"

    ax.yaxis.set_major_formatter(FuncFormatter(label))


def _clip_to_ylim(ax: Any, xs: Sequence[float], ys: Sequence[float], **style: Any) -> int:
    """Draw points; those outside the current y limits sit on the edge as triangles.

    Returns how many were off scale."""
    lo, hi = ax.get_ylim()
    inside = [(x, y) for x, y in zip(xs, ys) if lo <= y <= hi]
    above = [x for x, y in zip(xs, ys) if y > hi]
    below = [x for x, y in zip(xs, ys) if y < lo]
    label = style.pop("label", None)
    if inside:
        ax.plot(*zip(*inside), linestyle="none", label=label, **style)
        label = None
    edge = {k: v for k, v in style.items() if k != "marker"}
    if above:
        ax.plot(above, [hi] * len(above), ls="none", marker="^", clip_on=False, label=label, **edge)
        label = None
    if below:
        ax.plot(below, [lo] * len(below), ls="none", marker="v", clip_on=False, label=label, **edge)
    ax.set_ylim(lo, hi)
    return len(above) + len(below)


def _padded(values: Sequence[float], pad: float = 0.15) -> tuple[float, float] | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    lo, hi = min(vals), max(vals)
    span = hi - lo or abs(hi) or 1.0
    return lo - pad * span, hi + pad * span


def _title_line(analysis: Mapping[str, Any]) -> str:
    s = analysis["summary"]
    ckpt = analysis.get("checkpoint") or {}
    name = Path(str(ckpt.get("path") or "")).name or "checkpoint ?"
    cfg = analysis.get("config") or {}
    dtype = cfg.get("dtype") or (analysis.get("environment") or {}).get("dtype") or "?"
    reading = cfg.get("reading") or "?"
    return (
        f"ΔH(η) after one optimizer step — verdict: {s['verdict'].upper()}\n"
        f"{name} · {dtype} · {reading} reading · {len(s.get('fitted_learning_rates') or [])} "
        f"fitted η · {_plural(s['n_failed'], 'failed run')}"
    )


def plot_summary(analysis: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """entropy_vs_learning_rate.png: (a) means ± SE with fit and first order,
    (b) standardized residuals, (c) ΔH/η with the first-order band and the linear window."""
    s = analysis["summary"]
    points = [p for p in analysis["per_learning_rate"].values() if p["n_samples"] > 0]
    fig = _new_figure(9.0, 12.0)
    fig.suptitle(_title_line(analysis), fontsize=12)
    if not points:
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no successful measurements", ha="center", va="center", fontsize=14)
        ax.set_axis_off()
        return _save(fig, Path(path))

    ax_a, ax_b, ax_c = fig.subplots(3, 1, sharex=True)
    eta = np.array([p["learning_rate"] for p in points])
    mean = np.array([p["mean_entropy_change"] for p in points])
    se = np.array([_as_float(p["stderr_entropy_change"]) for p in points])
    se0 = np.nan_to_num(se, nan=0.0)
    ok = np.array([p["resolvable"] for p in points])
    beyond = np.array([p["within_eta_max"] is False for p in points]) & ok
    inside = ok & ~beyond
    grid = np.geomspace(eta.min() / 1.6, eta.max() * 1.6, 300)
    fo = s["first_order_slope"]
    curv = s["curvature"]
    d3 = (s.get("third_derivative") or {}).get("mean") or 0.0  # older folders lack it
    if d3:
        theory_label, ratio_label = "theory η·∇H·v + η²c/2 + η³d/6", "theory ∇H·v + ηc/2 + η²d/6"
    else:
        theory_label, ratio_label = "second order η·∇H·v + η²c/2", "second order ∇H·v + ηc/2"
    regime = s["linear_regime"]

    # (a) means ± SE -------------------------------------------------------------------
    mode = _y_mode(list(mean[ok]) if ok.any() else list(mean))
    sign = _apply_y_mode(ax_a, mode, list(mean), "ΔH")
    if s["slope"] is not None:
        ax_a.plot(
            grid,
            sign * (s["slope"] * grid + s["intercept"]),
            color="black",
            lw=1.3,
            label=f"OLS fit: α = {s['slope']:.4g}, β = {s['intercept']:.2g}",
        )
    if fo["mean"] is not None:
        ax_a.plot(
            grid,
            sign * fo["mean"] * grid,
            color=_THEORY,
            ls="--",
            lw=1.3,
            label=f"first order η·∇H·v (∇H·v = {fo['mean']:.4g})",
        )
        if curv["mean"] is not None:
            ax_a.plot(
                grid,
                sign * (fo["mean"] * grid + 0.5 * curv["mean"] * grid**2 + d3 * grid**3 / 6),
                color=_THEORY,
                ls=":",
                lw=1.3,
                label=theory_label,
            )
    for mask, style, label in (
        (inside, dict(fmt="o", color=_OK, ms=7), "mean ± SE (fitted)"),
        (beyond, dict(fmt="D", color=_BEYOND, ms=7), "mean ± SE, beyond η_max (fitted)"),
        (
            ~ok,
            dict(fmt="o", color=_UNRES, mfc="white", ms=7),
            "unresolvable (not fitted)",
        ),
    ):
        if mask.any():
            ax_a.errorbar(
                eta[mask], sign * mean[mask], yerr=se0[mask], capsize=3, label=label, **style
            )
    if mode != "symlog":  # keep the data in view; a fitted line may dive towards 0
        shown_a = sign * mean
        positive = shown_a > 0
        if positive.any():
            lows = np.where(shown_a - se0 > 0, shown_a - se0, shown_a)[positive]
            ax_a.set_ylim(lows.min() / 3, (shown_a + se0)[positive].max() * 3)
    ax_a.set_title("(a) mean entropy change per learning rate")

    # (b) standardized residuals --------------------------------------------------------
    z = [p["standardized_residual"] for p in points]
    zy = [v for v in z if v is not None]
    zmax = analysis["thresholds"]["linearity"]["max_standardized_residual"]
    ax_b.axhspan(-zmax, zmax, color="#2e8b57", alpha=0.12, label=f"|z| ≤ {zmax:g}")
    ax_b.axhline(0.0, color="black", lw=0.8)
    if zy:
        for flag, style, label in (
            (False, dict(marker="o", color=_OK), "(ȳ − ŷ_WLS)/SE"),
            (True, dict(marker="D", color=_BEYOND), "beyond η_max"),
        ):
            xs = [e for e, v, b in zip(eta, z, beyond) if v is not None and b == flag]
            ys = [v for v, b in zip(z, beyond) if v is not None and b == flag]
            if xs:
                ax_b.plot(xs, ys, ls="none", ms=7, zorder=3, label=label, **style)
        biggest = max(abs(v) for v in zy)
        if biggest > 10 * zmax:  # keep ±threshold readable next to huge residuals
            from matplotlib.ticker import FixedLocator, FuncFormatter

            ax_b.set_yscale("symlog", linthresh=zmax)
            nice = (10, 30, 100, 300, 1e3, 3e3, 1e4, 3e4, 1e5, 3e5, 1e6)
            steps = [zmax] + [t for t in nice if 1.5 * zmax < t <= 3 * biggest]
            ax_b.yaxis.set_major_locator(FixedLocator([-t for t in steps[::-1]] + [0] + steps))
            ax_b.yaxis.set_minor_locator(FixedLocator([]))
            ax_b.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    else:
        ax_b.text(
            0.5,
            0.5,
            "no residuals (fewer than 2 fitted η)",
            transform=ax_b.transAxes,
            ha="center",
            va="center",
        )
    ax_b.set_ylabel("standardized residual (SE units)")
    ax_b.set_title("(b) residuals of the means from the weighted line")
    ax_b.legend(fontsize=8, loc="best")

    # (c) ΔH/η -------------------------------------------------------------------------
    ratio = mean / eta
    ratio_se = se0 / eta
    window_lo = regime["eta_min"] if regime["eta_min"] is not None else None
    if window_lo is not None:
        window_hi = regime["eta_max"] if regime["eta_max"] is not None else grid.max()
        if window_hi > window_lo:
            ax_c.axvspan(
                window_lo,
                window_hi,
                color="#2e8b57",
                alpha=0.10,
                label=f"linear window [{window_lo:.2g}, {window_hi:.2g}]",
            )
        if regime["eta_max"] is not None and regime["eta_max"] < grid.max():
            for ax in (ax_a, ax_b, ax_c):
                ax.axvline(
                    regime["eta_max"],
                    color="#2e8b57",
                    ls="-.",
                    lw=1.0,
                    label=f"η_max ({regime['tolerance']:.0%} predicted nonlinearity)"
                    if ax is ax_a
                    else None,
                )
    band: list[float] = []
    if fo["mean"] is not None:
        half = 2 * fo["stderr"] if fo["stderr"] is not None else 0.0
        band = [fo["mean"] - half, fo["mean"] + half]
        if half > 0:
            ax_c.axhspan(*band, color=_THEORY, alpha=0.15, label="∇H·v, mean ± 2 SE over repeats")
        ax_c.axhline(
            fo["mean"], color=_THEORY, ls="--", lw=1.2, label=f"first order ∇H·v = {fo['mean']:.4g}"
        )
        if curv["mean"] is not None:
            ax_c.plot(
                grid,
                fo["mean"] + 0.5 * curv["mean"] * grid + d3 * grid**2 / 6,
                color=_THEORY,
                ls=":",
                lw=1.2,
                label=ratio_label,
            )
    if s["slope"] is not None:
        ax_c.axhline(s["slope"], color="black", lw=1.0, label=f"OLS slope α = {s['slope']:.4g}")
    shown = list(ratio[ok] - ratio_se[ok]) + list(ratio[ok] + ratio_se[ok]) + band
    if s["slope"] is not None:
        shown.append(s["slope"])
    limits = _padded(shown or list(ratio))
    if limits:
        ax_c.set_ylim(*limits)
    for mask, style, label in (
        (inside, dict(fmt="o", color=_OK, ms=7), "ΔH/η ± SE/η (fitted)"),
        (beyond, dict(fmt="D", color=_BEYOND, ms=7), "beyond η_max (fitted)"),
    ):
        if mask.any():
            ax_c.errorbar(
                eta[mask], ratio[mask], yerr=ratio_se[mask], capsize=3, label=label, **style
            )
    if (~ok).any():
        _clip_to_ylim(
            ax_c,
            list(eta[~ok]),
            list(ratio[~ok]),
            marker="o",
            color=_UNRES,
            mfc="white",
            ms=7,
            label="unresolvable (▲▼ at the edge: off scale)",
        )
    ax_a.legend(fontsize=8, loc="best")
    ax_c.set_ylabel("ΔH/η (nats per unit η)")
    ax_c.set_title("(c) ΔH/η: flat inside the linear window if ΔH is linear")
    ax_c.legend(fontsize=8, loc="best")

    ax_c.set_xscale("log")
    ax_c.set_xlim(grid.min(), grid.max())
    ax_c.set_xlabel("learning rate η")
    for ax in (ax_a, ax_b, ax_c):
        ax.grid(True, which="major", alpha=0.3)
    return _save(fig, Path(path))


def plot_raw_measurements(
    records: Iterable[Mapping[str, Any]],
    analysis: Mapping[str, Any],
    path: str | os.PathLike[str],
) -> Path:
    """raw_measurements.png: every (η, repeat) ΔH and ΔH/η, coloured by repeat."""
    rows = sorted((r for r in records if _is_measured(r)), key=_key)
    n_failed = analysis["summary"]["n_failed"]
    fig = _new_figure(9.0, 9.0)
    fig.suptitle(
        f"Raw measurements: {len(rows)} successful runs"
        + (f", {n_failed} failed (not shown)" if n_failed else ""),
        fontsize=12,
    )
    if not rows:
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no successful measurements", ha="center", va="center", fontsize=14)
        ax.set_axis_off()
        return _save(fig, Path(path))

    from matplotlib import colormaps

    ax_a, ax_b = fig.subplots(2, 1, sharex=True)
    repeats = sorted({int(r["repeat"]) for r in rows})
    cmap = colormaps["tab10" if len(repeats) <= 10 else "viridis"]
    color = {
        rep: cmap(i if len(repeats) <= 10 else i / max(len(repeats) - 1, 1))
        for i, rep in enumerate(repeats)
    }
    spread = 0.05  # multiplicative x offset per repeat so repeats do not hide each other
    offset = {rep: 1 + spread * (i - (len(repeats) - 1) / 2) for i, rep in enumerate(repeats)}
    unresolvable = [
        p["learning_rate"] for p in analysis["per_learning_rate"].values() if not p["resolvable"]
    ]
    etas = [float(r["learning_rate"]) for r in rows]
    changes = [float(r["entropy_change"]) for r in rows]
    unres_set = set(unresolvable)

    mode = _y_mode(changes)  # every raw value must stay visible: symlog if signs differ
    sign = _apply_y_mode(ax_a, mode, changes, "ΔH")
    ratios_ok = [c / e for e, c in zip(etas, changes) if e not in unres_set]
    slopes = [float(r["first_order_slope"]) for r in rows if _finite(r.get("first_order_slope"))]
    limits = _padded(ratios_ok + slopes)
    if limits:
        ax_b.set_ylim(*limits)

    off_scale = 0
    for rep in repeats:
        mine = [r for r in rows if int(r["repeat"]) == rep]
        x = [float(r["learning_rate"]) * offset[rep] for r in mine]
        y = [float(r["entropy_change"]) for r in mine]
        seed = mine[0].get("seed")
        label = f"repeat {rep}" + (f" (seed {seed})" if seed is not None else "")
        ax_a.plot(x, [sign * v for v in y], marker="o", ms=5, lw=0.8, color=color[rep], label=label)
        ratio = [v / float(r["learning_rate"]) for v, r in zip(y, mine)]
        off_scale += _clip_to_ylim(ax_b, x, ratio, marker="o", ms=5, color=color[rep])
        fo = [float(r["first_order_slope"]) for r in mine if _finite(r.get("first_order_slope"))]
        if fo:
            ax_b.axhline(float(np.mean(fo)), color=color[rep], ls="--", lw=1.0)
    for e in unresolvable:
        for ax in (ax_a, ax_b):
            ax.axvspan(e / 1.25, e * 1.25, color=_UNRES, alpha=0.18, lw=0)
    if unresolvable:
        ax_a.plot(
            [],
            [],
            marker="s",
            ls="none",
            color=_UNRES,
            alpha=0.4,
            ms=10,
            label="unresolvable η (not fitted)",
        )
    if slopes:
        ax_b.plot([], [], ls="--", color="black", label="∇H·v of each repeat (same colour)")
    if off_scale:
        ax_b.plot([], [], marker="^", ls="none", color="black", label="▲▼ off scale (at the edge)")
    if slopes or off_scale:
        ax_b.legend(fontsize=8, loc="best")
    ax_a.set_title("(a) ΔH of every run (x slightly offset per repeat)")
    ax_a.legend(fontsize=8, loc="best", ncol=2 if len(repeats) > 5 else 1)
    ax_b.set_ylabel("ΔH/η (nats per unit η)")
    ax_b.set_title("(b) ΔH/η of every run against its first-order slope")
    ax_b.set_xscale("log")
    lo, hi = min(etas), max(etas)
    ax_b.set_xlim(lo / 1.6, hi * 1.6)
    ax_b.set_xlabel("learning rate η")
    for ax in (ax_a, ax_b):
        ax.grid(True, which="major", alpha=0.3)
    return _save(fig, Path(path))


# --------------------------------------------------------------------------------------
# The whole report
# --------------------------------------------------------------------------------------


def write_report(
    folder: str | os.PathLike[str],
    thresholds: stats.Thresholds | None = None,
    floor: theory.FloorThresholds | None = None,
) -> dict[str, Any]:
    """Rebuild analysis.json and both plots from the folder's records and run_meta.json.

    Thresholds not given come from run_meta.json["thresholds"] (what the sweep used),
    else the defaults.  Needs no checkpoint and no model.
    """
    results = ResultsFolder(folder)
    records = results.records()
    if not records:
        raise FileNotFoundError(
            f"no records in {results.path}: expected raw_results.json or "
            "lr_<η>_run_<r>/result.json (is this a results folder?)"
        )
    meta = results.read_meta()
    stored_thresholds, stored_floor = thresholds_from_meta(meta)
    analysis = build_analysis(records, meta, thresholds or stored_thresholds, floor or stored_floor)
    atomic_write_json(results.path / ANALYSIS_FILE, analysis)
    plot_summary(analysis, results.path / MAIN_PLOT)
    plot_raw_measurements(records, analysis, results.path / RAW_PLOT)
    return analysis
