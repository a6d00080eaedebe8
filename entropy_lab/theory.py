"""Theory oracles: what ΔH(η) should be, to hold the measurement against.

For one AdamW step θ₁ = θ₀ + η·v, so H(η) := H(θ₀ + η·v) and
- first order:  dH/dη at 0 = ∇H·v, by ``torch.func.jvp`` through ``functional_call``;
- independent identity (Cui et al. 2025, Lemma 1): for fixed prefixes
  dH_t/dη = −Cov_{a∼π_t}(log π_t(a), ż_t(a)), ż the jvp of the tempered logits along v;
- second order: c = vᵀ∇²H v by nested jvp; relative nonlinearity at η ≈ η·c / (2·∇H·v),
  so the linear window ends at η_max(tol) = 2·tol·|∇H·v| / |c|.
Forward-mode AD has no rule for SDPA / flash kernels: the model must use eager attention
(or the faithful fp64 attention function), which the checkpoint loader arranges.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.func import functional_call, jvp

from entropy_lab.entropy import EntropyScorer, decoder_and_head, readings
from entropy_lab.rollout import SequenceBatch, filter_logits


@dataclass(frozen=True)
class DirectionalDerivatives:
    """Derivatives of H along v at η = 0 (per unit η)."""

    slope_conditional: float  # ∇H_cond·v
    slope_policy: float  # ∇H_policy·v
    curvature_conditional: float | None  # vᵀ∇²H_cond v
    curvature_policy: float | None


class _SiLU(torch.nn.Module):
    """x·σ(x) from exp and division: aten's silu has no second-order forward-mode rule."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / (1 + torch.exp(-x))


@contextlib.contextmanager
def forward_ad_safe(model: torch.nn.Module) -> Iterator[None]:
    """Temporarily swap SiLU activations for a nested-jvp-safe equivalent."""
    swapped = []
    for module in model.modules():
        act = getattr(module, "act_fn", None)
        if isinstance(act, torch.nn.Module) and "silu" in type(act).__name__.lower():
            swapped.append((module, act))
            module.act_fn = _SiLU()
    try:
        yield
    finally:
        for module, act in swapped:
            module.act_fn = act


def _line_function(scorer: EntropyScorer, batch, reference_logprob, theta0, direction):
    """s ↦ (H_cond, H_policy) at θ₀ + s·v (s a 0-dim tensor)."""

    def h(s: torch.Tensor) -> torch.Tensor:
        params = _prefixed({n: theta0[n] + s * direction[n].to(theta0[n].dtype) for n in theta0})
        sums = functional_call(scorer, params, (batch,))
        conditional, policy, _ = readings(sums, reference_logprob)
        return torch.stack([conditional, policy])

    return h


def directional_derivatives(
    scorer: EntropyScorer,
    batch: SequenceBatch,
    reference_logprob: torch.Tensor,
    theta0: dict[str, torch.Tensor],
    direction: dict[str, torch.Tensor],
    second_order: bool = True,
) -> DirectionalDerivatives:
    """∇H·v and (optionally) vᵀ∇²H v for both readings, by (nested) forward-mode AD."""
    dtype = next(iter(theta0.values())).dtype
    zero = torch.zeros((), dtype=dtype, device=reference_logprob.device)
    one = torch.ones_like(zero)
    h = _line_function(scorer, batch, reference_logprob, theta0, direction)
    was_training = scorer.lm.training
    scorer.lm.eval()
    try:
        with torch.no_grad(), forward_ad_safe(scorer.lm):
            _, slope = jvp(h, (zero,), (one,))
            curvature = None
            if second_order:
                _, curvature = jvp(lambda s: jvp(h, (s,), (one,))[1], (zero,), (one,))
    finally:
        scorer.lm.train(was_training)
    return DirectionalDerivatives(
        float(slope[0]),
        float(slope[1]),
        float(curvature[0]) if curvature is not None else None,
        float(curvature[1]) if curvature is not None else None,
    )


def covariance_identity_slope(
    scorer: EntropyScorer,
    batch: SequenceBatch,
    theta0: dict[str, torch.Tensor],
    direction: dict[str, torch.Tensor],
) -> float:
    """dH_cond/dη from Cui et al.'s Lemma 1, token by token: −Cov_π(log π, ż) averaged.

    Independent of ``directional_derivatives``: it differentiates only the logits, and the
    entropy's derivative comes from the covariance formula, not from autodiff.
    """
    dtype = next(iter(theta0.values())).dtype
    zero = torch.zeros((), dtype=dtype)
    one = torch.ones_like(zero)
    total, tokens = 0.0, 0
    logits_module = ResponseLogits(scorer)
    for rows in batch.length_sorted_chunks(scorer.max_rows):
        part = batch.select(rows)

        def tempered_logits(s: torch.Tensor, part=part) -> torch.Tensor:
            params = {n: theta0[n] + s * direction[n].to(dtype) for n in theta0}
            return functional_call(logits_module, _prefixed(params), (part,))

        with torch.no_grad():
            z, z_dot = jvp(tempered_logits, (zero,), (one,))
        z, z_dot = z.double(), z_dot.double()
        logp = torch.log_softmax(z, dim=-1)
        p = logp.exp()
        finite = torch.isfinite(logp)
        logp0 = torch.where(finite, logp, torch.zeros_like(logp))
        zd = torch.where(finite, z_dot, torch.zeros_like(z_dot))
        cov = (p * logp0 * zd).sum(-1) - (p * logp0).sum(-1) * (p * zd).sum(-1)
        total += float(-cov.sum())
        tokens += z.shape[0]
    return total / tokens


def _prefixed(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"lm.{n}": t for n, t in params.items()}


class ResponseLogits(torch.nn.Module):
    """Tempered (and truncated, if configured) logits at every response position."""

    def __init__(self, scorer: EntropyScorer) -> None:
        super().__init__()
        self.lm = scorer.lm
        self.temperature = scorer.temperature
        self.top_k, self.top_p = scorer.top_k, scorer.top_p

    def forward(self, batch: SequenceBatch) -> torch.Tensor:
        decoder, head = decoder_and_head(self.lm)
        hidden = decoder(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        mask = batch.response_mask[:, 1:].bool()
        logits = head(hidden[:, :-1][mask]) / self.temperature
        return filter_logits(logits, self.top_k, self.top_p)


def predicted_nonlinearity(eta: float, slope: float, curvature: float | None) -> float | None:
    """Relative departure from linearity at η: η·c / (2·∇H·v)."""
    if curvature is None or slope == 0:
        return None
    return eta * curvature / (2 * slope)


def eta_max(slope: float, curvature: float | None, tol: float = 0.05) -> float | None:
    """Largest η whose predicted relative nonlinearity stays within tol."""
    if curvature is None or curvature == 0:
        return math.inf if curvature == 0 else None
    return 2 * tol * abs(slope) / abs(curvature)


# -- precision floor and linear window (pure functions of the records: `report` reuses them) --

EPS = {"fp32": 2.0**-23, "fp64": 2.0**-52, "bf16": 2.0**-7}


@dataclass(frozen=True)
class FloorThresholds:
    max_quantized_fraction: float = 0.01  # updated entries rounded away by fl(θ + η·v)
    min_signal_eps: float = 10.0  # |ΔH| ≥ this × eps(dtype) × H
    max_symmetric_residual: float = 0.02  # RMS(ΔH(η) + ΔH(−η) − η²c) / |mean ΔH(η)|
    nonlinearity_tol: float = 0.05  # η_max(tol)


@dataclass(frozen=True)
class PointStatus:
    learning_rate: float
    resolvable: bool
    within_eta_max: bool | None
    reasons: list[str]
    quantized_fraction: float | None
    symmetric_residual: float | None
    predicted_nonlinearity: float | None


def classify_points(
    records: list[dict], dtype: str, thresholds: FloorThresholds = FloorThresholds()
) -> dict[float, PointStatus]:
    """Per η: resolvable above the precision floor?  Within the curvature limit η_max?"""
    eps = EPS[dtype]
    by_eta: dict[float, list[dict]] = {}
    for r in records:
        if r.get("success"):
            by_eta.setdefault(float(r["learning_rate"]), []).append(r)
    out = {}
    for eta, rows in sorted(by_eta.items()):
        reasons = []
        qf = max(float(r.get("quantized_fraction") or 0.0) for r in rows)
        if qf > thresholds.max_quantized_fraction:
            reasons.append(
                f"{qf:.1%} of updated entries rounded away in {dtype} "
                f"(> {thresholds.max_quantized_fraction:.0%})"
            )
        mean_change = sum(r["entropy_change"] for r in rows) / len(rows)
        floor = thresholds.min_signal_eps * eps * abs(rows[0]["entropy_before"])
        if abs(mean_change) < floor:
            reasons.append(f"|ΔH| {abs(mean_change):.2e} below {floor:.2e} (eps×H floor)")
        slopes = [r.get("first_order_slope") for r in rows]
        curvs = [r.get("curvature") for r in rows]
        nonlin = within = None
        if all(s is not None for s in slopes) and all(c is not None for c in curvs):
            nonlin = max(
                abs(predicted_nonlinearity(eta, s, c) or 0.0) for s, c in zip(slopes, curvs)
            )
            within = nonlin <= thresholds.nonlinearity_tol
        sym = None
        sym_rows = [r for r in rows if r.get("entropy_change_negative") is not None]
        if sym_rows and within is not False:
            # Beyond η_max the even part holds η⁴ terms too: there it says nothing of noise.
            # Rounding noise, measured: the even part of ΔH beyond its η²c/2 prediction,
            # RMS over repeats, against the mean signal that the fit uses.
            residuals = [
                r["entropy_change"]
                + r["entropy_change_negative"]
                - eta**2 * (r.get("curvature") or 0.0)
                for r in sym_rows
            ]
            rms = math.sqrt(sum(x * x for x in residuals) / len(residuals))
            sym = rms / max(abs(mean_change), 1e-300)
            if sym > thresholds.max_symmetric_residual:
                reasons.append(
                    f"RMS of ΔH(η)+ΔH(−η)−η²c is {sym:.1%} of mean |ΔH| "
                    f"(> {thresholds.max_symmetric_residual:.0%}): rounding noise"
                )
        out[eta] = PointStatus(eta, not reasons, within, reasons, qf, sym, nonlin)
    return out


def linear_window(statuses: dict[float, PointStatus], records: list[dict], tol: float = 0.05):
    """[η_floor, η_max]: smallest resolvable η of the grid, and 2·tol·|∇H·v|/|c| (min over repeats)."""
    resolvable = [eta for eta, s in statuses.items() if s.resolvable]
    maxima = [
        eta_max(r["first_order_slope"], r.get("curvature"), tol)
        for r in records
        if r.get("success") and r.get("first_order_slope") is not None
    ]
    maxima = [m for m in maxima if m is not None]
    return {
        "eta_min": min(resolvable) if resolvable else None,
        "eta_max": min(maxima) if maxima else None,
        "tolerance": tol,
    }
