"""analysis.json, the printed tables and the plots: formatting only.

The numbers come from ``analysis.analyze`` (torch-free): ``report DIR`` rebuilds everything
from raw_results.json and run_meta.json on any machine, with no checkpoint and no model.
The verdict is paired (one update direction per repeat, DESIGN §4); the seed's pooled
statistics are printed beside it, marked as reported, not deciding.

Tables and plots read the typed ``Analysis`` (and ``PointRecord``); analysis.json is
written by ``Analysis.to_dict`` and, where a caller holds only that file's content, read
back by ``Analysis.from_dict``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from entropy_lab import stats
from entropy_lab.analysis import (
    Analysis,
    FloorThresholds,
    Jet,
    JetTerm,
    Oracles,
    RepeatSummary,
    Window,
    analyze,
    decides,
)
from entropy_lab.jsonio import eta_label
from entropy_lab.records import PointRecord, as_records, finite
from entropy_lab.store import ResultsFolder, atomic_write_json

__all__ = [
    "ANALYSIS_FILE",
    "MAIN_PLOT",
    "RAW_PLOT",
    "build_analysis",
    "format_tables",
    "plot_raw_measurements",
    "plot_summary",
    "thresholds_from_meta",
    "write_report",
]

ANALYSIS_FILE = "analysis.json"  # its schema: analysis.ANALYSIS_SCHEMA_VERSION
MAIN_PLOT = "entropy_vs_learning_rate.png"
RAW_PLOT = "raw_measurements.png"


def _typed(analysis: Analysis | Mapping[str, Any]) -> Analysis:
    """The typed analysis; a mapping is analysis.json's content, read back."""
    return analysis if isinstance(analysis, Analysis) else Analysis.from_dict(analysis)


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


def _known(value: Any) -> bool:
    """A number to print or draw (NaN and ±inf are written as null in analysis.json)."""
    try:
        return value is not None and not isinstance(value, bool) and math.isfinite(value)
    except TypeError:
        return False


def _g(value: Any, spec: str = ".4g") -> str:
    return format(value, spec) if _known(value) else "n/a"


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


def _update_part(rep: RepeatSummary) -> str:
    """‖g‖, the momentum's share of ‖v‖ and U's groups, where the records have them."""
    parts = []
    if _known(rep.grad_norm):
        parts.append(f"‖g‖ = {_g(rep.grad_norm, '.3g')}")
    if _known(rep.momentum_share):
        parts.append(f"‖v(g=0)‖/‖v‖ = {rep.momentum_share:.2f}")
    if rep.groups_dropped:
        parts.append(f"groups {rep.groups_kept} kept, {rep.groups_dropped} dropped")
    return ", " + ", ".join(parts) if parts else ""


def _oracle_line(oracles: Oracles) -> str:
    """Conditional reading: identity/jvp, and the crude forecasts' ratio to the jvp."""
    if oracles.jvp_conditional.n == 0:
        return "n/a"
    parts = [f"jvp (conditional) {_g(oracles.jvp_conditional.mean, '.6g')}"]
    for oracle, label, spec in (
        (oracles.identity, "Cui identity", ".6g"),
        (oracles.vanilla_pg_forecast, "π·A forecast", ".3g"),
        (oracles.natural_pg_forecast, "A forecast", ".3g"),
    ):
        if _known(oracle.ratio_to_jvp):
            parts.append(f"{label} ×{oracle.ratio_to_jvp:{spec}}")
    return "; ".join(parts) + "  (ratio to the jvp)"


def _jet_line(term: JetTerm) -> str:
    """A jet term, mean ± SE over repeats, and where it came from."""
    if not term.n:
        return "n/a"
    source = {"jvp": " (nested jvp)", "±η pairs": " (from the ±η pairs)"}.get(term.source, "")
    return f"{_g(term.mean, '.4g')} ± {_g(term.stderr, '.2g')}{source}"


def _jet_cross_check(jet: Jet) -> str | None:
    """The ±η pairs' c and d against the nested jvps', where both exist (--jet 2|3)."""
    parts = []
    for sources, label in ((jet.curvature, "c"), (jet.third_derivative, "d")):
        ratios = list(sources.pairs_over_jvp.values())
        if ratios:
            worst = max(ratios, key=lambda x: abs(x - 1))
            parts.append(
                f"{label} pairs/jvp {min(ratios):.6f} … {max(ratios):.6f} (worst {worst - 1:+.1e})"
            )
    return "; ".join(parts) if parts else None


def _window_line(window: Window) -> str:
    if window.eta_min is None:
        measured = "empty"
    else:
        measured = (
            f"[{_g(window.eta_min, '.3g')}, {_g(window.eta_max, '.3g')}] "
            f"({_plural(window.n_points, 'grid point')} within {window.tolerance:.0%})"
        )
    return (
        f"{measured}; the jet's {window.tolerance:.0%} edge: "
        f"{_g(window.eta_max_predicted, '.3g')}, {window.predicted_edge or 'n/a'}"
        + (f"; {window.note}" if window.note else "")
    )


def _mixed_line(mixed: stats.RandomSlopeFit | None) -> str:
    if mixed is None:
        return "n/a (needs ≥ 2 repeats with resolvable points)"
    return (
        f"α = {_g(mixed.slope, '.6g')} ± {_g(mixed.slope_se, '.2g')} "
        f"({mixed.confidence:.0%} CI [{_g(mixed.slope_ci_low, '.5g')}, "
        f"{_g(mixed.slope_ci_high, '.5g')}], {mixed.n_groups} directions); "
        f"slope SD across directions {_g(mixed.slope_sd, '.3g')}; "
        f"R² marginal {_g(mixed.r2_marginal, '.4f')}, conditional "
        f"{_g(mixed.r2_conditional, '.6f')}"
    )


def _repeats_line(repeats: list[RepeatSummary]) -> str:
    return "; ".join(
        f"r{rep.repeat}: s = {_g(rep.slope_reference, '.5g')}, "
        f"c = {_g(rep.calibration, '+.1e')}, R² = {_g(rep.r_squared, '.5f')}" + _update_part(rep)
        for rep in repeats
    )


def _summary_lines(a: Analysis) -> list[str]:
    """The LINEARITY ANALYSIS block's key: value lines."""
    fo, facts, r2, ols = a.facts.first_order_slope, a.facts, a.repeat_r_squared, a.pooled.fits.ols
    lines = [
        (
            "resolvable points",
            f"{len(a.fitted_learning_rates)} η × {_plural(len(a.repeats), 'repeat')} "
            f"(update directions), {_plural(a.n_failed, 'failed run')}",
        ),
        (
            "per-repeat R²",
            f"min {_g(min(r2) if r2 else None, '.6f')}, "
            f"median {_g(statistics.median(r2) if r2 else None, '.6f')} "
            "(each direction's own line)",
        ),
        ("mixed model", _mixed_line(a.mixed_model)),
        (
            "first-order ∇H·v",
            f"{_g(fo.mean, '.6g')} ± {_g(fo.stderr, '.2g')} (SE over {_plural(fo.n, 'repeat')})",
        ),
        ("curvature vᵀ∇²H v", _jet_line(facts.curvature)),
        ("third order ∇³H[v,v,v]", _jet_line(facts.third_derivative)),
        ("first-order oracles", _oracle_line(facts.oracles)),
        *([("jet cross-check", cross)] if (cross := _jet_cross_check(facts.jet)) else []),
        ("linear window", _window_line(a.window)),
        (
            "pooled (reported)",
            f"OLS α = {_g(ols.slope if ols else None, '.6g')}, "
            f"β = {_g(ols.intercept if ols else None, '.3g')}, "
            f"R² = {_g(ols.r_squared if ols else None, '.6f')} over all raw points",
        ),
    ]
    if a.repeats:
        lines.append(("per repeat", _repeats_line(a.repeats)))
    width = max(len(k) for k, _ in lines)
    return [f"  {k.ljust(width)}  {v}" for k, v in lines]


def _check_lines(a: Analysis) -> list[str]:
    """The checks (deciding, then reported), the verdict and the failed runs."""
    out: list[str] = []
    name_w = max((len(n) for n in a.checks), default=0)
    for title, deciding in (("checks (decide the verdict):", True), ("reported:", False)):
        out += ["", f"  {title}"]
        for name, c in a.checks.items():
            if decides(c) == deciding:
                out.append(f"    {name.ljust(name_w)}  {_status(c.passed).ljust(4)}  {c.detail}")
    out += ["", f"  VERDICT: {a.verdict.upper()} — {a.verdict_reason}"]
    for f in a.facts.failures:
        out.append(f"  failed run: η = {f.learning_rate:.3g}, repeat {f.repeat}: {f.error}")
    return out


def _detail_lines(a: Analysis) -> list[str]:
    """The DETAILED RESULTS table, one row per grid point."""
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
    for summary, point in a.grid():
        eta, mean, pred = (
            point.learning_rate,
            summary.mean_entropy_change,
            summary.first_order_prediction,
        )
        rows.append(
            [
                eta_label(eta),
                str(summary.n_samples),
                _g(mean, "+.4e"),
                _g(summary.stderr_entropy_change, ".2e"),
                _g(mean / eta, "+.5g"),
                _g(None if pred is None else pred / eta, "+.5g"),
                _g(point.nonlinearity_mean_abs, ".2e"),
                _g(point.nonlinearity_bound, ".2e"),
                (point.status or "?") + (" (window)" if point.in_window else ""),
                "" if point.resolvable else "; ".join(point.reasons),
            ]
        )
    return ["  " + line for line in _table(headers, rows, left={0, 8, 9})]


def format_tables(analysis: Analysis | Mapping[str, Any]) -> str:
    """The "LINEARITY ANALYSIS" and "DETAILED RESULTS" blocks as plain text (of an
    Analysis, or of analysis.json's content)."""
    a = _typed(analysis)
    bar = "=" * 78
    out = [bar, "LINEARITY ANALYSIS  (ΔH in nats; η = learning rate)", bar]
    out += _summary_lines(a)
    out += _check_lines(a)
    out += ["", bar, "DETAILED RESULTS", bar]
    out += _detail_lines(a)
    out.append(
        "  n_r(η): the bend of ΔH_r/η from the repeat's own small-η value; bound: the "
        f"one-sided {a.thresholds.confidence:.0%} upper bound of mean |n_r| over repeats."
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


def _new_figure(width: float, height: float, rows: int, title_lines: int = 1) -> Any:
    """A figure of ``rows`` stacked panels (each with a title) under a suptitle of
    ``title_lines`` lines, margins fixed in inches. Not a layout engine: matplotlib's
    constrained layout re-measured every tick label on each draw, 45 % of write_report
    (3.1 → 1.8 s for the two PNGs, measured), and every run writes them."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    # the suptitle sits 2 % of the height down; its lines and a panel title above the top
    top = 0.02 * height + 0.22 * title_lines + 0.45
    bottom, left, right, gap = 0.55, 1.05, 0.2, 0.6
    panel = (height - top - bottom - gap * (rows - 1)) / rows
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(  # (matplotlib 3.11 ignores Figure(subplotpars=...))
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        hspace=gap / panel,
    )
    return fig


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


def _run_labels(meta: Mapping[str, Any]) -> tuple[str, str, str]:
    """(checkpoint name, dtype, reading) as run_meta.json states them, "?" where it does not
    (a folder copied without it)."""
    ckpt = meta.get("checkpoint") or {}
    name = Path(str(ckpt.get("path") or "")).name or "checkpoint ?"
    cfg = meta.get("config") or {}
    dtype = cfg.get("dtype") or (meta.get("environment") or {}).get("dtype") or "?"
    return name, dtype, cfg.get("reading") or "?"


def _title_line(a: Analysis) -> str:
    name, dtype, reading = _run_labels(a.meta)
    return (
        f"ΔH(η) after one optimizer step — verdict: {a.verdict.upper()}\n"
        f"{name} · {dtype} · {reading} reading · {len(a.fitted_learning_rates)} "
        f"fitted η · {_plural(a.n_failed, 'failed run')}"
    )


def _no_data(fig: Any, path: str | os.PathLike[str]) -> Path:
    ax = fig.subplots()
    ax.text(0.5, 0.5, "no successful measurements", ha="center", va="center", fontsize=14)
    ax.set_axis_off()
    return _save(fig, Path(path))


@dataclasses.dataclass(frozen=True)
class _Shown:
    """The grid points with a successful run, as panels (a) and (b) draw them."""

    eta: np.ndarray
    mean: np.ndarray
    se0: np.ndarray  # SE, 0 where undefined
    ok: np.ndarray  # resolvable
    beyond: np.ndarray  # resolvable, beyond the tolerance or undecided
    inside: np.ndarray
    grid: np.ndarray  # the x of the drawn lines


def _shown(rows: list[tuple[stats.EtaSummary, Any]]) -> _Shown:
    eta = np.array([e.learning_rate for e, _ in rows])
    ok = np.array([p.resolvable for _, p in rows])
    beyond = np.array([p.status in ("beyond", "undecided") for _, p in rows]) & ok
    se = np.array([e.stderr_entropy_change for e, _ in rows], dtype=float)
    return _Shown(
        eta=eta,
        mean=np.array([e.mean_entropy_change for e, _ in rows]),
        se0=np.nan_to_num(se, nan=0.0),
        ok=ok,
        beyond=beyond,
        inside=ok & ~beyond,
        grid=np.geomspace(eta.min() / 1.6, eta.max() * 1.6, 300),
    )


def _theory_label(a: Analysis) -> str:
    d3 = a.facts.third_derivative.mean
    label = "theory η·∇H·v + η²c/2 + η³d/6" if _known(d3) and d3 else "second order η·∇H·v + η²c/2"
    if a.facts.curvature.source == "±η pairs":
        label += " (c, d from the ±η pairs)"
    return label


def _panel_means(ax: Any, a: Analysis, shown: _Shown) -> None:
    """(a) the means ± SE, the pooled fit (reported) and the jet's prediction."""
    eta, mean, se0, ok, grid = shown.eta, shown.mean, shown.se0, shown.ok, shown.grid
    mode = _y_mode(list(mean[ok]) if ok.any() else list(mean))
    sign = _apply_y_mode(ax, mode, list(mean), "ΔH")
    ols, fo, curv = a.pooled.fits.ols, a.facts.first_order_slope.mean, a.facts.curvature.mean
    d3 = a.facts.third_derivative.mean if _known(a.facts.third_derivative.mean) else 0.0
    if ols is not None and _known(ols.slope):
        ax.plot(
            grid,
            sign * (ols.slope * grid + ols.intercept),
            color="black",
            lw=1.3,
            label=f"pooled OLS fit (reported): α = {ols.slope:.4g}, β = {ols.intercept:.2g}",
        )
    if _known(fo):
        ax.plot(
            grid,
            sign * fo * grid,
            color=_THEORY,
            ls="--",
            lw=1.3,
            label=f"first order η·∇H·v (∇H·v = {fo:.4g})",
        )
        if _known(curv):
            ax.plot(
                grid,
                sign * (fo * grid + 0.5 * curv * grid**2 + d3 * grid**3 / 6),
                color=_THEORY,
                ls=":",
                lw=1.3,
                label=_theory_label(a),
            )
    for mask, style, label in (
        (shown.inside, dict(fmt="o", color=_OK, ms=7), "mean ± SE (within tolerance)"),
        (
            shown.beyond,
            dict(fmt="D", color=_BEYOND, ms=7),
            "mean ± SE, beyond tolerance or undecided",
        ),
        (~ok, dict(fmt="o", color=_UNRES, mfc="white", ms=7), "unresolvable (not fitted)"),
    ):
        if mask.any():
            ax.errorbar(
                eta[mask], sign * mean[mask], yerr=se0[mask], capsize=3, label=label, **style
            )
    if mode != "symlog":  # keep the data in view; a fitted line may dive towards 0
        shown_a = sign * mean
        positive = shown_a > 0
        if positive.any():
            lows = np.where(shown_a - se0 > 0, shown_a - se0, shown_a)[positive]
            ax.set_ylim(lows.min() / 3, (shown_a + se0)[positive].max() * 3)
    ax.set_title("(a) mean entropy change per learning rate")


def _panel_bounds(ax: Any, rows: list[tuple[stats.EtaSummary, Any]], tol: float) -> None:
    """(b) the deciding statistic: mean |n_r(η)| over repeats and its upper bound."""
    ax.axhspan(0, tol, color="#2e8b57", alpha=0.12, label=f"within tolerance ({tol:.0%})")
    shown = [
        (p.learning_rate, p.nonlinearity_mean_abs, p.nonlinearity_bound)
        for _, p in rows
        if _known(p.nonlinearity_mean_abs)
    ]
    if shown:
        xs = [e for e, _, _ in shown]
        bottom = tol * 1e-6  # smaller bends are drawn at the axis floor
        means = [max(m, bottom) for _, m, _ in shown]
        tops = [max(b if _known(b) else m, bottom) for _, m, b in shown]
        ax.vlines(xs, means, tops, color=_OK, lw=2, label="upper confidence bound")
        ax.plot(xs, means, "o", color=_OK, ms=7, label="mean |n_r(η)| over repeats")
        ax.set_yscale("log")
        ax.set_ylim(bottom / 3, max(max(tops), tol) * 3)
    else:
        ax.text(0.5, 0.5, "no resolvable point", transform=ax.transAxes, ha="center")
    ax.axhline(tol, color="#2e8b57", lw=1.0)
    ax.set_ylabel("|ΔH_r/η bend| (relative)")
    ax.set_title("(b) nonlinearity per η: paired over repeats (decides the verdict)")
    ax.legend(fontsize=8, loc="best")


def _window_marks(axes: tuple[Any, Any, Any], window: Window, grid: np.ndarray) -> None:
    """The measured window (shaded) and the jet's predicted edge (dotted) on every panel."""
    lo, hi = window.eta_min, window.eta_max
    if lo is not None and hi is not None:
        for ax in axes:
            ax.axvspan(
                lo / 1.3,
                hi * 1.3,
                color="#2e8b57",
                alpha=0.08,
                label=f"measured window [{lo:.2g}, {hi:.2g}]" if ax is axes[2] else None,
            )
    predicted = window.eta_max_predicted
    if _known(predicted) and grid.min() < predicted < grid.max():  # type: ignore[operator]
        for ax in axes:
            ax.axvline(
                predicted,
                color=_THEORY,
                ls=":",
                lw=1.2,
                label=f"jet's predicted edge {predicted:.2g} (not measured)"
                if ax is axes[2]
                else None,
            )


def _per_repeat_curves(
    a: Analysis, rows: list[tuple[stats.EtaSummary, Any]]
) -> dict[int, list[tuple[float, float, bool]]]:
    """Per repeat, (η, f_r(η) or else n_r(η), resolvable) over the drawn grid points."""
    out: dict[int, list[tuple[float, float, bool]]] = {}
    for summary, _ in rows:
        for rp in a.points:
            if rp.learning_rate != summary.learning_rate:
                continue
            value = rp.relative_to_first_order
            if not _known(value):
                value = rp.nonlinearity
            if _known(value):
                out.setdefault(rp.repeat, []).append((rp.learning_rate, value, rp.resolvable))  # type: ignore[arg-type]
    return out


def _panel_repeats(ax: Any, a: Analysis, rows: list[tuple[stats.EtaSummary, Any]]) -> None:
    """(c) each repeat's f_r(η) = ΔH_r/(η·∇H·v_r) − 1 against the tolerance band."""
    from matplotlib import colormaps

    tol = a.window.tolerance
    ax.axhspan(-tol, tol, color="#2e8b57", alpha=0.12, label=f"±{tol:.0%}")
    ax.axhline(0.0, color="black", lw=0.8)
    per_repeat = _per_repeat_curves(a, rows)
    cmap = colormaps["tab10"]
    values: list[float] = []
    for i, (rep, curve) in enumerate(sorted(per_repeat.items())):
        values += [v for _, v, ok in curve if ok]
        ax.plot(
            [e for e, _, _ in curve],
            [v for _, v, _ in curve],
            lw=0.8,
            color=cmap(i % 10),
            label=f"repeat {rep}",
        )
        ax.plot(
            [e for e, _, ok in curve if ok],
            [v for _, v, ok in curve if ok],
            "o",
            ms=5,
            color=cmap(i % 10),
        )
        ax.plot(
            [e for e, _, ok in curve if not ok],
            [v for _, v, ok in curve if not ok],
            "o",
            ms=5,
            mfc="white",
            color=_UNRES,
        )
    if any(not ok for curve in per_repeat.values() for _, _, ok in curve):
        ax.plot([], [], "o", mfc="white", color=_UNRES, label="unresolvable (not judged)")
    big = max([abs(v) for v in values] + [tol])
    ax.set_yscale("symlog", linthresh=tol / 10)
    ax.set_ylim(-3 * big, 3 * big)


def plot_summary(analysis: Analysis | Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """entropy_vs_learning_rate.png: (a) means ± SE with the fit and the jet, (b) the paired
    nonlinearity per η against the tolerance, (c) each repeat's ΔH/η against its own first
    order, with the measured window (shaded) and the jet's predicted edge (dotted)."""
    a = _typed(analysis)
    rows = [(e, p) for e, p in a.grid() if e.n_samples > 0]
    title = _title_line(a)
    fig = _new_figure(9.0, 12.0, rows=3, title_lines=title.count("\n") + 1)
    fig.suptitle(title, fontsize=12)
    if not rows:
        return _no_data(fig, path)
    ax_a, ax_b, ax_c = fig.subplots(3, 1, sharex=True)
    shown = _shown(rows)
    _panel_means(ax_a, a, shown)
    _panel_bounds(ax_b, rows, a.window.tolerance)
    _window_marks((ax_a, ax_b, ax_c), a.window, shown.grid)
    _panel_repeats(ax_c, a, rows)
    ax_a.legend(fontsize=8, loc="best")
    ax_c.set_ylabel("ΔH_r/(η·s_r) − 1")
    ax_c.set_title("(c) each repeat's ΔH/η against its own first-order slope")
    ax_c.legend(fontsize=8, loc="best", ncol=2)
    ax_c.set_xscale("log")
    ax_c.set_xlim(shown.grid.min(), shown.grid.max())
    ax_c.set_xlabel("learning rate η")
    for ax in (ax_a, ax_b, ax_c):
        ax.grid(True, which="major", alpha=0.3)
    return _save(fig, Path(path))


def _raw_colors(repeats: list[int]) -> tuple[dict[int, Any], dict[int, float]]:
    """Each repeat's colour, and its multiplicative x offset (repeats do not hide each other)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(repeats) <= 10 else "viridis"]
    color = {
        rep: cmap(i if len(repeats) <= 10 else i / max(len(repeats) - 1, 1))
        for i, rep in enumerate(repeats)
    }
    spread = 0.05
    offset = {rep: 1 + spread * (i - (len(repeats) - 1) / 2) for i, rep in enumerate(repeats)}
    return color, offset


def _raw_legends(
    ax_a: Any, ax_b: Any, unresolvable: list[float], slopes: list[float], off_scale: int
) -> None:
    for e in unresolvable:
        for ax in (ax_a, ax_b):
            ax.axvspan(e / 1.25, e * 1.25, color=_UNRES, alpha=0.18, lw=0)
    if unresolvable:
        ax_a.plot(
            [], [], marker="s", ls="none", color=_UNRES, alpha=0.4, ms=10,
            label="unresolvable η (not fitted)",
        )  # fmt: skip
    if slopes:
        ax_b.plot([], [], ls="--", color="black", label="∇H·v of each repeat (same colour)")
    if off_scale:
        ax_b.plot([], [], marker="^", ls="none", color="black", label="▲▼ off scale (at the edge)")
    if slopes or off_scale:
        ax_b.legend(fontsize=8, loc="best")


def plot_raw_measurements(
    records: Iterable[PointRecord | Mapping[str, Any]],
    analysis: Analysis | Mapping[str, Any],
    path: str | os.PathLike[str],
) -> Path:
    """raw_measurements.png: every (η, repeat) ΔH and ΔH/η, coloured by repeat."""
    a = _typed(analysis)
    rows = [r for r in as_records(records) if r.measured]
    fig = _new_figure(9.0, 9.0, rows=2)
    fig.suptitle(
        f"Raw measurements: {len(rows)} successful runs"
        + (f", {a.n_failed} failed (not shown)" if a.n_failed else ""),
        fontsize=12,
    )
    if not rows:
        return _no_data(fig, path)
    ax_a, ax_b = fig.subplots(2, 1, sharex=True)
    repeats = sorted({int(r.repeat) for r in rows})
    color, offset = _raw_colors(repeats)
    unresolvable = [p.learning_rate for p in a.per_eta if not p.resolvable]
    etas = [float(r.learning_rate) for r in rows]
    changes = [float(r.entropy_change) for r in rows]  # type: ignore[arg-type]
    mode = _y_mode(changes)  # every raw value must stay visible: symlog if signs differ
    sign = _apply_y_mode(ax_a, mode, changes, "ΔH")
    ratios_ok = [c / e for e, c in zip(etas, changes) if e not in set(unresolvable)]
    slopes = [float(r.first_order_slope) for r in rows if finite(r.first_order_slope)]  # type: ignore[arg-type]
    limits = _padded(ratios_ok + slopes)
    if limits:
        ax_b.set_ylim(*limits)
    off_scale = 0
    for rep in repeats:
        mine = [r for r in rows if int(r.repeat) == rep]
        x = [float(r.learning_rate) * offset[rep] for r in mine]
        y = [float(r.entropy_change) for r in mine]  # type: ignore[arg-type]
        seed = mine[0].seed
        label = f"repeat {rep}" + (f" (seed {seed})" if seed is not None else "")
        ax_a.plot(x, [sign * v for v in y], marker="o", ms=5, lw=0.8, color=color[rep], label=label)
        ratio = [v / float(r.learning_rate) for v, r in zip(y, mine)]
        off_scale += _clip_to_ylim(ax_b, x, ratio, marker="o", ms=5, color=color[rep])
        fo = [float(r.first_order_slope) for r in mine if finite(r.first_order_slope)]  # type: ignore[arg-type]
        if fo:
            ax_b.axhline(float(np.mean(fo)), color=color[rep], ls="--", lw=1.0)
    _raw_legends(ax_a, ax_b, unresolvable, slopes, off_scale)
    ax_a.set_title("(a) ΔH of every run (x slightly offset per repeat)")
    ax_a.legend(fontsize=8, loc="best", ncol=2 if len(repeats) > 5 else 1)
    ax_b.set_ylabel("ΔH/η (nats per unit η)")
    ax_b.set_title("(b) ΔH/η of every run against its first-order slope")
    ax_b.set_xscale("log")
    ax_b.set_xlim(min(etas) / 1.6, max(etas) * 1.6)
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
) -> Analysis:
    """Rebuild analysis.json and both plots from the folder's records and run_meta.json;
    returns the analysis (``to_dict()`` is the analysis.json written).

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
    analysis = analyze(
        records, meta, thresholds or stored_thresholds, floor or stored_floor, dtype=dtype
    )
    atomic_write_json(results.path / ANALYSIS_FILE, analysis.to_dict())
    plot_summary(analysis, results.path / MAIN_PLOT)
    plot_raw_measurements(analysis.records, analysis, results.path / RAW_PLOT)
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


def _track_window_panel(ax_w: Any, entries: list[Mapping[str, Any]]) -> None:
    """The window's edges and the jet's predicted edge against the step, with the trainer's
    lr through them (steps whose lr leaves the window circled)."""
    for key, style, label in (
        ("eta_min", "v-", "window low edge"),
        ("eta_max", "^-", "window high edge"),
    ):
        pts = [(e["step"], e["window"][key]) for e in entries if finite(e["window"][key])]
        if pts:
            ax_w.plot(*zip(*pts), style, label=label)
    pred = [(e["step"], e["eta_max_predicted"]) for e in entries if finite(e["eta_max_predicted"])]
    if pred:
        ax_w.plot(*zip(*pred), ":", color="gray", label="predicted edge (jet)")
    lr = [
        (e["step"], e["lr"]["next_step"])
        for e in entries
        if finite(e["lr"]["next_step"]) and e["lr"]["next_step"] > 0
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


def plot_track(track: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Against the training step: H₀ ± SE (and the trainer's logged entropy), α with its CI
    band and each direction's slope, the window's edges with the trainer's lr through them
    (steps whose lr leaves the window marked), observed against predicted ΔH."""
    entries = track["checkpoints"]
    steps = [e["step"] for e in entries]
    fig = _new_figure(7.5, 10.5, rows=4)
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
    if all(finite(v) for v in low + high):
        ax_a.fill_between(steps, low, high, alpha=0.25, label="95% CI")
    ax_a.plot(steps, alpha, "o-", label="α (mixed model)")
    for e in entries:
        slopes = [d["slope"] for d in e["directions"] if finite(d["slope"])]
        ax_a.plot([e["step"]] * len(slopes), slopes, "x", color="gray", ms=4)
    ax_a.axhline(0, color="black", lw=0.5)
    ax_a.set_ylabel("α = dH/dη")
    ax_a.legend(fontsize=8)
    _track_window_panel(ax_w, entries)
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
