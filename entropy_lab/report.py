"""analysis.json, the printed tables and the plots: formatting only.

The numbers come from ``analysis.analyze`` (torch-free): ``report DIR`` rebuilds everything
from raw_results.json and run_meta.json on any machine, with no checkpoint and no model.
The verdict is paired (one update direction per repeat, DESIGN §4); the seed's pooled
statistics are printed beside it, marked as reported, not deciding.
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

from entropy_lab import stats
from entropy_lab.analysis import FloorThresholds, PointRecord, analyze
from entropy_lab.store import ResultsFolder, atomic_write_json

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


def build_analysis(
    records: Iterable[Mapping[str, Any] | PointRecord],
    meta: Mapping[str, Any],
    thresholds: stats.Thresholds = stats.Thresholds(),  # noqa: B008 - frozen
    floor: FloorThresholds = FloorThresholds(),  # noqa: B008 - frozen
    dtype: str | None = None,
) -> dict[str, Any]:
    """The content of analysis.json (DESIGN §5): ``analysis.analyze(...).to_dict()``."""
    return analyze(records, meta, thresholds, floor, dtype=dtype).to_dict()


def default_thresholds(**linearity: Any) -> dict[str, Any]:
    """The {linearity, precision_floor} block stored in run_meta.json["thresholds"]."""
    return {
        "linearity": stats.Thresholds(**linearity).to_dict(),
        "precision_floor": dataclasses.asdict(FloorThresholds()),
    }


def thresholds_from_meta(
    meta: Mapping[str, Any],
) -> tuple[stats.Thresholds, FloorThresholds]:
    """Thresholds stored in run_meta.json["thresholds"] ({linearity, precision_floor}),
    defaults for anything missing; unknown names are ignored."""
    stored = meta.get("thresholds") or {}

    def pick(cls: type, values: Mapping[str, Any] | None) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in names})

    linearity = dict(stored.get("linearity") or {})
    floor = dict(stored.get("precision_floor") or {})
    if "tolerance" not in linearity and "nonlinearity_tol" in floor:  # schema-1 run_meta
        linearity["tolerance"] = floor["nonlinearity_tol"]
    return pick(stats.Thresholds, linearity), pick(FloorThresholds, floor)


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


def _update_part(rep: dict) -> str:
    """‖g‖, the momentum's share of ‖v‖ and U's groups, where the records have them."""
    parts = []
    if rep.get("grad_norm") is not None:
        parts.append(f"‖g‖ = {_g(rep['grad_norm'], '.3g')}")
    if rep.get("momentum_share") is not None:
        parts.append(f"‖v(g=0)‖/‖v‖ = {rep['momentum_share']:.2f}")
    if rep.get("groups_dropped"):
        parts.append(f"groups {rep['groups_kept']} kept, {rep['groups_dropped']} dropped")
    return ", " + ", ".join(parts) if parts else ""


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


def _source(term: Mapping[str, Any]) -> str:
    """Where a jet term came from (nothing for folders written before the measured jet)."""
    return {"jvp": " (nested jvp)", "±η pairs": " (from the ±η pairs)"}.get(term.get("source"), "")


def _jet_cross_check(jet: Mapping[str, Any] | None) -> str | None:
    """The ±η pairs' c and d against the nested jvps', where both exist (--jet 2|3)."""
    if not jet:
        return None
    parts = []
    for name, label in (("curvature", "c"), ("third_derivative", "d")):
        ratios = list(((jet.get(name) or {}).get("pairs_over_jvp") or {}).values())
        if ratios:
            worst = max(ratios, key=lambda x: abs(x - 1))
            parts.append(
                f"{label} pairs/jvp {min(ratios):.6f} … {max(ratios):.6f} (worst {worst - 1:+.1e})"
            )
    return "; ".join(parts) if parts else None


def _window_line(regime: Mapping[str, Any]) -> str:
    if regime.get("eta_min") is None:
        measured = "empty"
    else:
        measured = (
            f"[{_g(regime['eta_min'], '.3g')}, {_g(regime['eta_max'], '.3g')}] "
            f"({_plural(regime.get('n_points') or 0, 'grid point')} within "
            f"{regime['tolerance']:.0%})"
        )
    predicted = regime.get("eta_max_predicted")
    return (
        f"{measured}; the jet's {regime['tolerance']:.0%} edge: {_g(predicted, '.3g')}, "
        f"{regime.get('predicted_edge') or 'n/a'}"
        + (f"; {regime['note']}" if regime.get("note") else "")
    )


def _mixed_line(mixed: Mapping[str, Any] | None) -> str:
    if not mixed:
        return "n/a (needs ≥ 2 repeats with resolvable points)"
    return (
        f"α = {_g(mixed['slope'], '.6g')} ± {_g(mixed['slope_se'], '.2g')} "
        f"({mixed['confidence']:.0%} CI [{_g(mixed['slope_ci_low'], '.5g')}, "
        f"{_g(mixed['slope_ci_high'], '.5g')}], {mixed['n_groups']} directions); "
        f"slope SD across directions {_g(mixed['slope_sd'], '.3g')}; "
        f"R² marginal {_g(mixed['r2_marginal'], '.4f')}, conditional "
        f"{_g(mixed['r2_conditional'], '.6f')}"
    )


def format_tables(analysis: Mapping[str, Any]) -> str:
    """The "LINEARITY ANALYSIS" and "DETAILED RESULTS" blocks as plain text."""
    s = analysis["summary"]
    checks = s["checks"]
    bar = "=" * 78
    out = [bar, "LINEARITY ANALYSIS  (ΔH in nats; η = learning rate)", bar]

    fo = s["first_order_slope"]
    cv = s["curvature"]
    d3 = s.get("third_derivative") or {}
    r2 = s.get("r_squared_per_repeat") or {}
    fitted = s.get("fitted_learning_rates") or []
    reps = s.get("repeats") or []
    lines = [
        (
            "resolvable points",
            f"{len(fitted)} η × {_plural(len(reps), 'repeat')} (update directions), "
            f"{_plural(s['n_failed'], 'failed run')}",
        ),
        (
            "per-repeat R²",
            f"min {_g(r2.get('min'), '.6f')}, median {_g(r2.get('median'), '.6f')} "
            "(each direction's own line)",
        ),
        ("mixed model", _mixed_line(s.get("mixed_model"))),
        (
            "first-order ∇H·v",
            f"{_g(fo['mean'], '.6g')} ± {_g(fo['stderr'], '.2g')} "
            f"(SE over {_plural(fo['n'], 'repeat')})",
        ),
        (
            "curvature vᵀ∇²H v",
            f"{_g(cv['mean'], '.4g')} ± {_g(cv['stderr'], '.2g')}{_source(cv)}"
            if cv.get("n")
            else "n/a",
        ),
        (
            "third order ∇³H[v,v,v]",
            f"{_g(d3['mean'], '.4g')} ± {_g(d3['stderr'], '.2g')}{_source(d3)}"
            if d3.get("n")
            else "n/a",
        ),
        ("first-order oracles", _oracle_line(s.get("first_order_oracles") or {})),
        *([("jet cross-check", cross)] if (cross := _jet_cross_check(s.get("jet"))) else []),
        ("linear window", _window_line(s["linear_regime"])),
        (
            "pooled (reported)",
            f"OLS α = {_g(s['slope'], '.6g')}, β = {_g(s['intercept'], '.3g')}, "
            f"R² = {_g(s['r_squared'], '.6f')} over all raw points",
        ),
    ]
    if reps:
        lines.append(
            (
                "per repeat",
                "; ".join(
                    f"r{rep['repeat']}: s = {_g(rep['slope_reference'], '.5g')}, "
                    f"c = {_g(rep['calibration'], '+.1e')}, R² = {_g(rep['r_squared'], '.5f')}"
                    + _update_part(rep)
                    for rep in reps
                ),
            )
        )
    width = max(len(k) for k, _ in lines)
    out += [f"  {k.ljust(width)}  {v}" for k, v in lines]

    name_w = max((len(n) for n in checks), default=0)
    for title, deciding in (("checks (decide the verdict):", True), ("reported:", False)):
        out += ["", f"  {title}"]
        for name, c in checks.items():
            if bool(c.get("decides")) == deciding:
                out.append(
                    f"    {name.ljust(name_w)}  {_status(c['passed']).ljust(4)}  {c['detail']}"
                )
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
        "SE",
        "ΔH/η",
        "1st-order ΔH/η",
        "mean|n_r|",
        "bound",
        "status",
        "why not resolvable",
    ]
    rows = []
    for label, p in analysis["per_learning_rate"].items():
        eta = p["learning_rate"]
        mean = p["mean_entropy_change"]
        pred = p["first_order_prediction"]
        status = p.get("status") or "?"
        if p.get("in_window"):
            status += " (window)"
        rows.append(
            [
                label,
                str(p["n_samples"]),
                _g(mean, "+.4e"),
                _g(p["stderr_entropy_change"], ".2e"),
                _g(None if mean is None else mean / eta, "+.5g"),
                _g(None if pred is None else pred / eta, "+.5g"),
                _g(p.get("nonlinearity_mean_abs"), ".2e"),
                _g(p.get("nonlinearity_bound"), ".2e"),
                status,
                "" if p["resolvable"] else "; ".join(p["unresolvable_reasons"]),
            ]
        )
    out += ["  " + line for line in _table(headers, rows, left={0, 8, 9})]
    out.append(
        "  n_r(η): the bend of ΔH_r/η from the repeat's own small-η value; bound: the "
        f"one-sided {analysis['thresholds']['linearity'].get('confidence', 0.95):.0%} upper "
        "bound of mean |n_r| over repeats."
    )
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
    """entropy_vs_learning_rate.png: (a) means ± SE with the fit and the jet, (b) the paired
    nonlinearity per η against the tolerance, (c) each repeat's ΔH/η against its own first
    order, with the measured window (shaded) and the jet's predicted edge (dotted)."""
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
    beyond = np.array([p.get("status") in ("beyond", "undecided") for p in points]) & ok
    inside = ok & ~beyond
    grid = np.geomspace(eta.min() / 1.6, eta.max() * 1.6, 300)
    fo = s["first_order_slope"]
    curv = s["curvature"]
    d3 = (s.get("third_derivative") or {}).get("mean") or 0.0  # older folders lack it
    if d3:
        theory_label = "theory η·∇H·v + η²c/2 + η³d/6"
    else:
        theory_label = "second order η·∇H·v + η²c/2"
    if (curv or {}).get("source") == "±η pairs":
        theory_label += " (c, d from the ±η pairs)"
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
            label=f"pooled OLS fit (reported): α = {s['slope']:.4g}, β = {s['intercept']:.2g}",
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
        (inside, dict(fmt="o", color=_OK, ms=7), "mean ± SE (within tolerance)"),
        (beyond, dict(fmt="D", color=_BEYOND, ms=7), "mean ± SE, beyond tolerance or undecided"),
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

    # (b) the deciding statistic: mean |n_r(η)| over repeats and its upper bound ----------
    tol = regime["tolerance"]
    ax_b.axhspan(0, tol, color="#2e8b57", alpha=0.12, label=f"within tolerance ({tol:.0%})")
    bounds = [
        (p["learning_rate"], p.get("nonlinearity_mean_abs"), p.get("nonlinearity_bound"))
        for p in points
    ]
    shown_b = [(e, m, b) for e, m, b in bounds if m is not None]
    if shown_b:
        xs = [e for e, _, _ in shown_b]
        bottom = tol * 1e-6  # smaller bends are drawn at the axis floor
        means = [max(m, bottom) for _, m, _ in shown_b]
        tops = [max(b if b is not None and math.isfinite(b) else m, bottom) for _, m, b in shown_b]
        ax_b.vlines(xs, means, tops, color=_OK, lw=2, label="upper confidence bound")
        ax_b.plot(xs, means, "o", color=_OK, ms=7, label="mean |n_r(η)| over repeats")
        ax_b.set_yscale("log")
        ax_b.set_ylim(bottom / 3, max(max(tops), tol) * 3)
    else:
        ax_b.text(0.5, 0.5, "no resolvable point", transform=ax_b.transAxes, ha="center")
    ax_b.axhline(tol, color="#2e8b57", lw=1.0)
    ax_b.set_ylabel("|ΔH_r/η bend| (relative)")
    ax_b.set_title("(b) nonlinearity per η: paired over repeats (decides the verdict)")
    ax_b.legend(fontsize=8, loc="best")

    # (c) each repeat's f_r(η) = ΔH_r/(η·∇H·v_r) − 1 with the band and the window -------
    lo, hi = regime.get("eta_min"), regime.get("eta_max")
    if lo is not None and hi is not None:
        for ax in (ax_a, ax_b, ax_c):
            ax.axvspan(
                lo / 1.3,
                hi * 1.3,
                color="#2e8b57",
                alpha=0.08,
                label=f"measured window [{lo:.2g}, {hi:.2g}]" if ax is ax_c else None,
            )
    predicted = regime.get("eta_max_predicted")
    if predicted is not None and math.isfinite(predicted) and grid.min() < predicted < grid.max():
        for ax in (ax_a, ax_b, ax_c):
            ax.axvline(
                predicted,
                color=_THEORY,
                ls=":",
                lw=1.2,
                label=f"jet's predicted edge {predicted:.2g} (not measured)"
                if ax is ax_c
                else None,
            )
    ax_c.axhspan(-tol, tol, color="#2e8b57", alpha=0.12, label=f"±{tol:.0%}")
    ax_c.axhline(0.0, color="black", lw=0.8)
    from matplotlib import colormaps

    per_repeat: dict[int, list[tuple[float, float, bool]]] = {}
    for p in points:
        for rp in p.get("repeats") or []:
            value = rp.get("relative_to_first_order")
            if value is None:
                value = rp.get("nonlinearity")
            if value is not None:
                per_repeat.setdefault(int(rp["repeat"]), []).append(
                    (p["learning_rate"], value, bool(rp["resolvable"]))
                )
    cmap = colormaps["tab10"]
    values_c: list[float] = []
    for i, (rep, rows_c) in enumerate(sorted(per_repeat.items())):
        xs = [e for e, _, _ in rows_c]
        ys = [v for _, v, _ in rows_c]
        values_c += [v for _, v, ok_c in rows_c if ok_c]
        ax_c.plot(xs, ys, lw=0.8, color=cmap(i % 10), label=f"repeat {rep}")
        ax_c.plot(
            [e for e, _, ok_c in rows_c if ok_c],
            [v for _, v, ok_c in rows_c if ok_c],
            "o",
            ms=5,
            color=cmap(i % 10),
        )
        ax_c.plot(
            [e for e, _, ok_c in rows_c if not ok_c],
            [v for _, v, ok_c in rows_c if not ok_c],
            "o",
            ms=5,
            mfc="white",
            color=_UNRES,
        )
    if any(not ok_c for r in per_repeat.values() for _, _, ok_c in r):
        ax_c.plot([], [], "o", mfc="white", color=_UNRES, label="unresolvable (not judged)")
    big = max([abs(v) for v in values_c] + [tol])
    ax_c.set_yscale("symlog", linthresh=tol / 10)
    ax_c.set_ylim(-3 * big, 3 * big)
    ax_a.legend(fontsize=8, loc="best")
    ax_c.set_ylabel("ΔH_r/(η·s_r) − 1")
    ax_c.set_title("(c) each repeat's ΔH/η against its own first-order slope")
    ax_c.legend(fontsize=8, loc="best", ncol=2)

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
    floor: FloorThresholds | None = None,
    dtype: str | None = None,
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
    analysis = build_analysis(
        records, meta, thresholds or stored_thresholds, floor or stored_floor, dtype=dtype
    )
    atomic_write_json(results.path / ANALYSIS_FILE, analysis)
    plot_summary(analysis, results.path / MAIN_PLOT)
    plot_raw_measurements(records, analysis, results.path / RAW_PLOT)
    return analysis


# --------------------------------------------------------------------------------------
# Across a run (track.json)
# --------------------------------------------------------------------------------------

TRACK_PLOT = "track.png"


def _pm(estimate: Mapping[str, Any] | None, spec: str = ".4g") -> str:
    if not estimate or estimate.get("value") is None:
        return "n/a"
    return f"{_g(estimate['value'], spec)} ± {_g(estimate.get('stderr'), '.2g')}"


def _ci(alpha: Mapping[str, Any]) -> str:
    if alpha.get("value") is None:
        return "n/a"
    return f"{_g(alpha['value'])} [{_g(alpha['ci_low'], '.3g')}, {_g(alpha['ci_high'], '.3g')}]"


def format_track_tables(track: Mapping[str, Any]) -> str:
    """The printed ACROSS THE RUN and HELD AGAINST THE RUN'S HISTORY tables."""
    rows = []
    for e in track["checkpoints"]:
        window = e["window"]
        outside = e["lr_in_window"] in ("above", "below", "no window")
        flag = "  <-- lr outside the window" if outside else ""
        rows.append(
            [
                str(e["step"]),
                _pm(e["h0"]),
                _ci(e["alpha"]),
                _g(e["alpha"].get("tau"), ".3g"),
                _g(e["identity_slope"], ".4g"),
                f"[{_g(window['eta_min'], '.2g')}, {_g(window['eta_max'], '.2g')}]",
                e["verdict"].upper(),
                _g(e["lr"]["next_step"], ".3g"),
                _g(e["alpha_times_lr"], ".3g"),
                e["lr_in_window"] + flag,
            ]
        )
    lines = [
        "ACROSS THE RUN  (α: mixed-model slope dH/dη [95% CI] of the sweep's reading, τ its "
        "spread over directions; Cui (cond.): the identity's slope of the conditional reading; "
        "lr: the trainer's next step from this checkpoint)",
        *_table(
            [
                "step",
                "H₀ ± SE",
                "α [CI]",
                "τ",
                "Cui (cond.)",
                "window",
                "verdict",
                "lr",
                "α·lr",
                "lr",
            ],
            rows,
            left={6, 9},
        ),
    ]
    for note in track.get("skipped", []):
        lines.append(f"  skipped: {note}")
    diffs = track.get("setup_differences") or []
    lines.append(
        "  setup: the same at every checkpoint"
        if not diffs
        else "  setup differs between checkpoints:\n    " + "\n    ".join(diffs)
    )
    hist = track["history"]
    rows = []
    for h in hist["intervals"]:
        ratio = h["ratio"]
        rows.append(
            [
                f"{h['from_step']}→{h['to_step']}",
                _pm(h["observed"], ".3e"),
                _pm(h["predicted"], ".3e") if h["predicted"] else h["note"] or "n/a",
                _pm(ratio, ".3g") if ratio else "n/a",
                _g(h["z"], ".2f"),
                _g(h["logged_entropy_change"], ".3e"),
            ]
        )
    lines += [
        "",
        "HELD AGAINST THE RUN'S HISTORY  (observed ΔH₀ on the same E prompts; predicted "
        "Σ α·lr over the steps between)",
        *_table(
            ["steps", "observed ΔH ± SE", "Σ α·lr ± SE", "ratio ± SE", "z", "logged ΔH"],
            rows,
            left=set(),
        ),
        f"  α between checkpoints: {hist['interpolation']}",
    ]
    if hist.get("logged_entropy"):
        lines.append(f"  logged ΔH: {hist['logged_entropy']} (step N+1's value at checkpoint N)")
    lines.append("  what this comparison cannot separate:")
    lines += [f"   - {why}" for why in hist["cannot_separate"]]
    return "\n".join(lines)


def plot_track(track: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Against the training step: H₀ ± SE (and the trainer's logged entropy), α with its CI
    band and each direction's slope, the window's edges with the trainer's lr through them
    (steps whose lr leaves the window marked), observed against predicted ΔH."""
    entries = track["checkpoints"]
    steps = [e["step"] for e in entries]
    fig = _new_figure(7.5, 10.5)
    ax_h, ax_a, ax_w, ax_d = fig.subplots(4, 1, sharex=True)
    h0 = [e["h0"]["value"] for e in entries]
    ax_h.errorbar(
        steps, h0, [e["h0"]["stderr"] for e in entries], fmt="o-", capsize=3, label="H₀ on E"
    )
    logged = [(e["step"], e["logged_entropy"]["value"]) for e in entries]
    logged = [(s, v) for s, v in logged if v is not None]
    if logged:
        ax_h.plot(*zip(*logged), "s--", color="gray", label="trainer's logged entropy (step N+1)")
    ax_h.set_ylabel("entropy (nats/token)")
    ax_h.legend(fontsize=8)
    alpha = [e["alpha"].get("value") for e in entries]
    low = [e["alpha"].get("ci_low") for e in entries]
    high = [e["alpha"].get("ci_high") for e in entries]
    if all(_finite(v) for v in low + high):
        ax_a.fill_between(steps, low, high, alpha=0.25, label="95% CI")
    ax_a.plot(steps, alpha, "o-", label="α (mixed model)")
    for e in entries:
        slopes = [d["slope"] for d in e["directions"] if _finite(d["slope"])]
        ax_a.plot([e["step"]] * len(slopes), slopes, "x", color="gray", ms=4)
    ax_a.axhline(0, color="black", lw=0.5)
    ax_a.set_ylabel("α = dH/dη")
    ax_a.legend(fontsize=8)
    for key, style, label in (
        ("eta_min", "v-", "window low edge"),
        ("eta_max", "^-", "window high edge"),
    ):
        pts = [(e["step"], e["window"][key]) for e in entries if _finite(e["window"][key])]
        if pts:
            ax_w.plot(*zip(*pts), style, label=label)
    pred = [(e["step"], e["eta_max_predicted"]) for e in entries if _finite(e["eta_max_predicted"])]
    if pred:
        ax_w.plot(*zip(*pred), ":", color="gray", label="predicted edge (jet)")
    lr = [
        (e["step"], e["lr"]["next_step"])
        for e in entries
        if _finite(e["lr"]["next_step"]) and e["lr"]["next_step"] > 0
    ]
    if lr:
        ax_w.plot(*zip(*lr), "k*-", ms=9, label="trainer's lr (next step)")
    out = [
        (e["step"], e["lr"]["next_step"])
        for e in entries
        if e["lr_in_window"] in ("above", "below", "no window")
    ]
    if out:
        ax_w.plot(
            *zip(*out), "o", mfc="none", mec="red", ms=16, mew=2, label="lr outside the window"
        )
    ax_w.set_yscale("log")
    ax_w.set_ylabel("η")
    ax_w.legend(fontsize=8)
    intervals = track["history"]["intervals"]
    mid = [(h["from_step"] + h["to_step"]) / 2 for h in intervals]
    ax_d.errorbar(
        mid,
        [h["observed"]["value"] for h in intervals],
        [h["observed"]["stderr"] for h in intervals],
        fmt="o",
        capsize=3,
        label="observed ΔH₀",
    )
    have = [(m, h["predicted"]) for m, h in zip(mid, intervals) if h["predicted"]]
    if have:
        ax_d.errorbar(
            [m for m, _ in have],
            [p["value"] for _, p in have],
            [p["stderr"] for _, p in have],
            fmt="s",
            capsize=3,
            label="Σ α·lr",
        )
    ax_d.axhline(0, color="black", lw=0.5)
    ax_d.set_ylabel("ΔH between checkpoints")
    ax_d.set_xlabel("training step")
    ax_d.legend(fontsize=8)
    fig.suptitle("entropy-lab track", fontsize=10)
    return _save(fig, Path(path))
