"""Theory oracles: what ΔH(η) should be, to hold the measurement against.

For one AdamW step θ₁ = θ₀ + η·v, so H(η) := H(θ₀ + η·v) and
- first order:  dH/dη at 0 = ∇H·v, by forward-mode AD (``torch.autograd.forward_ad``)
  through ``functional_call`` for the trunk; the head and the entropy's derivative then in
  closed form from z and ż per vocabulary block (``entropy.blocked_first_order``), which
  agrees with forward-mode AD through the entropy's ops to 1e-12 relative in fp64;
- independent identity (Cui et al. 2025, Lemma 1): for fixed prefixes
  dH_t/dη = −Cov_{a∼π_t}(log π_t(a), ż_t(a)), ż the jvp of the tempered logits along v;
- second and third order (``--jet 2|3``, cross-checks: by default the analysis reads them
  off the ±η pairs, ``analysis.MeasuredJet``): c = vᵀ∇²H v and ∇³H[v,v,v] by nested
  ``torch.func.jvp``; relative nonlinearity at η ≈ η·c / (2·∇H·v), so the jet predicts the
  window's upper edge near 2·tol·|∇H·v| / |c| (reported as ``eta_max_predicted``; the
  window itself is measured, in ``analysis``);
- ∇H itself by reverse mode, once per sweep: ∇H·(θ₁ − θ₀ − η·v) is the effect of the
  parameters' rounding at each point.
Forward-mode AD has no rule for SDPA / flash kernels: the model must use eager attention
(or the faithful fp64 attention function), which the checkpoint loader arranges.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, jvp

from entropy_lab import distributed
from entropy_lab.config import Reading
from entropy_lab.entropy import (
    EntropyScorer,
    ResponseStates,
    SequenceSums,
    TokenChunk,
    decoder_and_head,
    probe_batch,
    readings,
)
from entropy_lab.modes import eval_mode
from entropy_lab.rollout import SequenceBatch


@dataclass(frozen=True)
class DirectionalDerivatives:
    """Derivatives of H along v at η = 0 (per unit η)."""

    slope_conditional: float  # ∇H_cond·v
    slope_policy: float  # ∇H_policy·v
    curvature_conditional: float | None  # vᵀ∇²H_cond v
    curvature_policy: float | None
    third_conditional: float | None = None  # ∇³H_cond[v, v, v]
    third_policy: float | None = None

    def of(self, reading: Reading) -> ReadingJet:
        """The derivatives of the entropy that defines ΔH under ``reading``."""
        if reading is Reading.POLICY:
            return ReadingJet(self.slope_policy, self.curvature_policy, self.third_policy)
        return ReadingJet(
            self.slope_conditional, self.curvature_conditional, self.third_conditional
        )


@dataclass(frozen=True)
class ReadingJet:
    """One reading's derivatives along v at η = 0 (per unit η); None = not computed."""

    slope: float  # ∇H·v
    curvature: float | None  # vᵀ∇²H v
    third: float | None  # ∇³H[v, v, v]


class _SiLU(torch.nn.Module):
    """x·σ(x) from exp and division: aten's silu has no second-order forward-mode rule."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / (1 + torch.exp(-x))


class _Mish(torch.nn.Module):
    """x·tanh(softplus(x)) from its parts: aten's mish has no second-order forward-mode rule."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.tanh(torch.nn.functional.softplus(x))


def _unsafe_activation_types() -> dict[type, type]:
    """Activation module types whose aten kernel has no nested forward-mode rule, each with
    its safe equivalent (measured, torch 2.13: silu and mish fail at the second order; every
    GELU variant, ReLU, tanh and sigmoid pass): torch's classes and the classes transformers
    builds for ``hidden_act`` silu / swish / mish."""
    safe: dict[type, type] = {torch.nn.SiLU: _SiLU, torch.nn.Mish: _Mish}
    try:
        from transformers.activations import ACT2CLS
    except ImportError:
        return safe
    for name, replacement in (("silu", _SiLU), ("swish", _SiLU), ("mish", _Mish)):
        cls = ACT2CLS.get(name)
        cls = cls[0] if isinstance(cls, tuple) else cls
        if isinstance(cls, type):
            safe[cls] = replacement
    return safe


UNSAFE_ACTIVATIONS = _unsafe_activation_types()


# -- zero tangents ------------------------------------------------------------------------
#
# Forward-mode AD gives every input without a tangent (a frozen weight, a norm's weight,
# RoPE's cos/sin, a Python scalar) an all-zero ZeroTensor tangent, and each op's rule then
# multiplies and adds it like any tangent. torch's own ZeroTensor kernels get their output's
# shape from a Python meta function (torch._refs): measured on this CPU (torch 2.13, fp64,
# [64, 10, 176]) x·0 took 142 µs and x + 0 198 µs against 14-18 µs for x·x and x + x; mm has
# no ZeroTensor kernel at all, so x·Ẇ ran in full (243 µs for x·W's 231 µs). The kernels
# below give the same values from the shapes alone. They sit below autograd, so every
# nesting level of a jet sees exactly the values the stock kernels give (tested to the bit).


def _as_tensor(x, like: torch.Tensor) -> torch.Tensor:
    """A Python number (a wrapped scalar operand) as a 0-dim tensor of its promoted dtype."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.scalar_tensor(x, dtype=torch.result_type(like, x), device=like.device)


def _broadcast(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Size, torch.dtype, torch.device]:
    """Shape, dtype and device of a broadcasting binary op's result (a CPU 0-dim operand
    follows the other's device, as in torch)."""
    if a.shape == b.shape:
        shape = a.shape
    elif b.dim() == 0:
        shape = a.shape
    elif a.dim() == 0:
        shape = b.shape
    else:
        shape = torch.broadcast_shapes(a.shape, b.shape)
    dtype = a.dtype if a.dtype == b.dtype else torch.result_type(a, b)
    device = b.device if a.dim() == 0 and a.device.type == "cpu" else a.device
    return shape, dtype, device


def _zero(shape, dtype, device) -> torch.Tensor:
    return torch._efficientzerotensor(shape, dtype=dtype, device=device)


def _copy_of(t: torch.Tensor, shape, dtype, device, scale=1) -> torch.Tensor:
    """t broadcast to the result's shape and dtype, in fresh memory (as torch's kernels do:
    a result never aliases an operand), times ``scale``."""
    out = torch.empty(shape, dtype=dtype, device=device).copy_(t)
    return out if scale == 1 else out.mul_(scale)


def _mul_with_a_zero(a, b) -> torch.Tensor:
    a, b = _as_tensor(a, b), _as_tensor(b, a)
    return _zero(*_broadcast(a, b))


def _add_with_a_zero(a, b, *, alpha=1) -> torch.Tensor:
    a, b = _as_tensor(a, b), _as_tensor(b, a)
    result = _broadcast(a, b)
    if not a._is_zerotensor():
        return _copy_of(a, *result)
    return _zero(*result) if b._is_zerotensor() else _copy_of(b, *result, scale=alpha)


def _sub_with_a_zero(a, b, *, alpha=1) -> torch.Tensor:
    return _add_with_a_zero(a, b, alpha=-alpha)


def _mm_with_a_zero(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _zero((a.shape[0], b.shape[1]), torch.promote_types(a.dtype, b.dtype), a.device)


def _bmm_with_a_zero(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    shape = (a.shape[0], a.shape[1], b.shape[2])
    return _zero(shape, torch.promote_types(a.dtype, b.dtype), a.device)


ZERO_TANGENT_KERNELS = {
    "mul.Tensor": _mul_with_a_zero,
    "add.Tensor": _add_with_a_zero,
    "sub.Tensor": _sub_with_a_zero,
    "mm": _mm_with_a_zero,
    "bmm": _bmm_with_a_zero,
}


@contextlib.contextmanager
def zero_tangent_kernels() -> Iterator[None]:
    """While active, ZERO_TANGENT_KERNELS serve the ops with an all-zero (ZeroTensor) operand.

    Registered for the ZeroTensor dispatch key only, so no op without a ZeroTensor operand
    changes; on exit they are unregistered and torch's own kernels serve again.
    """
    library = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():  # "overriding a previously registered kernel"
            warnings.simplefilter("ignore", UserWarning)
            for op, kernel in ZERO_TANGENT_KERNELS.items():
                library.impl(op, kernel, "ZeroTensor")
        yield
    finally:
        library._destroy()  # unregisters ours: torch's own kernels are back


@contextlib.contextmanager
def forward_ad_safe(model: torch.nn.Module, order: int = 3) -> Iterator[None]:
    """What a jet of this order needs: for order ≥ 2, activations that nested forward-mode AD
    cannot pass (SiLU, Mish) swapped for equivalents computed from their parts, found by
    module type wherever they sit (``act_fn``, Phi-3's ``activation_fn``, an expert's
    ``act_fn``, …); aten's own kernels have first-order rules, so order 1 keeps them. And
    always the zero-tangent kernels above."""
    swapped = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if order >= 2 and type(child) in UNSAFE_ACTIVATIONS
    ]
    for parent, name, child in swapped:
        setattr(parent, name, UNSAFE_ACTIVATIONS[type(child)]())
    try:
        with zero_tangent_kernels():
            yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def check_forward_ad(causal_lm: torch.nn.Module, order: int) -> None:
    """A tiny jvp of the sweep's order (1: ∇H·v, 2: + vᵀ∇²H v, 3: + ∇³H) through the model on
    two short probe sequences, along a random direction of the trainable parameters: a model
    forward-mode AD cannot pass through is refused in one line before anything is sampled."""
    from entropy_lab.errors import EntropyLabError

    lm = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
    theta0 = {n: p.detach() for n, p in causal_lm.named_parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(0)
    direction = {
        n: torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.device)
        for n, p in theta0.items()
    }
    scorer = EntropyScorer(causal_lm, temperature=1.0)
    batch = probe_batch(causal_lm, rows=2, length=8)

    def failure(k: int) -> BaseException | None:
        try:
            sums_jet(scorer, batch, theta0, direction, k)
        except (NotImplementedError, RuntimeError) as exc:
            return exc
        return None

    exc = failure(order)
    if exc is None:
        return
    # The highest order that does pass decides the advice.
    passing = next((k for k in range(order - 1, 0, -1) if failure(k) is None), 0)
    fix = {
        2: "--jet 2",
        1: "--jet 1 (first order by jvp)",
        0: "--no-first-order (ΔH is still measured, without the jvp oracles)",
    }[passing]
    what = ("∇H·v", "vᵀ∇²H v", "∇³H[v,v,v]")[passing]
    first = (str(exc).strip().splitlines() or [""])[0][:120]
    raise EntropyLabError(
        f"forward-mode AD cannot pass through {type(lm).__name__} for {what} "
        f"({type(exc).__name__}: {first}); run with {fix}"
    ) from exc


def _sums_at(scorer: EntropyScorer, batch):
    """θ ↦ per-sequence sums [n, 3] (entropy, log-prob, tokens) at the trainable values θ."""

    def sums(params: dict[str, torch.Tensor]) -> torch.Tensor:
        out = functional_call(scorer, _prefixed(params), (batch,))
        return torch.stack([out.entropy, out.logprob, out.tokens], dim=1)

    return sums


def _first_derivative(f, tangent):
    """p ↦ (f, D f[t]) at p by torch's own (unnested) forward-mode AD: the same values as
    ``torch.func.jvp`` with less dispatch per op (measured on the tiny model: 10 % less)."""

    def g(p):
        with fwAD.dual_level():
            primal, derivative = fwAD.unpack_dual(
                f({n: fwAD.make_dual(p[n], tangent[n]) for n in p})
            )
        return primal, torch.zeros_like(primal) if derivative is None else derivative

    return g


def _derivatives_up_to(f, tangent, order: int, unnested: bool = False):
    """p ↦ (f, D f[t], …, Dᵏ f[t, …, t]) at p, by ``order`` nested forward-mode passes
    (``unnested``: order 1 by torch.autograd.forward_ad instead of torch.func)."""
    if order == 1 and unnested:
        return _first_derivative(f, tangent)
    if order == 0:
        return lambda p: (f(p),)
    inner = _derivatives_up_to(f, tangent, order - 1)

    def g(p):
        values, tangents = jvp(inner, (p,), (tangent,))
        return (*values, tangents[-1])  # tangents = (D f, …, Dᵏ f): only the last is new

    return g


def sums_jet(
    scorer: EntropyScorer,
    batch: SequenceBatch,
    theta0: dict[str, torch.Tensor],
    direction: dict[str, torch.Tensor],
    order: int = 2,
) -> torch.Tensor:
    """[n, 3, order + 1]: each sequence's sums (entropy, log-prob, tokens) × (value, d/ds, …,
    dᵏ/dsᵏ) along v at s = 0, by ``order`` nested forward-mode passes."""
    # θ₀ itself is the primal and v the tangent (rather than s ↦ θ₀ + s·v): the same
    # derivatives with one op fewer per parameter per forward-mode level.
    f = _sums_at(scorer, batch)
    tangent = {n: direction[n].to(theta0[n].dtype) for n in theta0}
    with eval_mode(scorer.lm), torch.no_grad(), forward_ad_safe(scorer.lm, order):
        terms = _derivatives_up_to(f, tangent, order, unnested=True)(dict(theta0))
    return torch.stack(terms, dim=2)


def readings_derivatives(jet: torch.Tensor, reference_logprob: torch.Tensor) -> list[torch.Tensor]:
    """[d/ds, …, dᵏ/dsᵏ] at 0 of (H_cond, H_policy), from the jets of *all* sequences of E
    (k = jet.shape[2] − 1).

    The readings are ratios over sequences (the policy one with weights normalised over E),
    so their derivatives are not sums of per-shard derivatives. By the chain rule the first
    k derivatives of R(S(s)) at 0 involve only S, S', …, S⁽ᵏ⁾ there; R composed with the
    Taylor polynomial P(s) = Σ sʲ/j!·S⁽ʲ⁾ has exactly the same ones. So the jets are
    computed per rank, gathered, and differentiated through R here: exact, not a sum.
    """
    order = jet.shape[2] - 1

    def h(s: torch.Tensor) -> torch.Tensor:
        poly = sum(s**j / math.factorial(j) * jet[..., j] for j in range(order + 1))
        entropy, logprob, tokens = poly.unbind(1)
        conditional, policy, _ = readings(SequenceSums(entropy, logprob, tokens), reference_logprob)
        return torch.stack([conditional, policy])

    zero = torch.zeros((), dtype=jet.dtype, device=jet.device)
    return list(_derivatives_up_to(h, torch.ones_like(zero), order)(zero)[1:])


def directional_derivatives(
    scorer: EntropyScorer,
    batch: SequenceBatch,
    reference_logprob: torch.Tensor,
    theta0: dict[str, torch.Tensor],
    direction: dict[str, torch.Tensor],
    second_order: bool = True,
    third_order: bool = False,
) -> DirectionalDerivatives:
    """∇H·v and, optionally, vᵀ∇²H v and ∇³H[v, v, v] for both readings, by nested
    forward-mode AD (one nesting level per order).

    Data-parallel, each rank differentiates its shard of E; the jets are gathered first.
    """
    order = 3 if third_order else 2 if second_order else 1
    local = sums_jet(scorer, scorer.shard_of(batch), theta0, direction, order)
    terms = readings_derivatives(distributed.all_gather_rows(local, len(batch)), reference_logprob)
    # (conditional, policy) per order; None for the orders not computed.
    pairs = [(float(t[0]), float(t[1])) for t in terms] + [(None, None)] * (3 - len(terms))
    return DirectionalDerivatives(*pairs[0], *pairs[1], *pairs[2])


def covariance_identity_slope(
    scorer: EntropyScorer,
    batch: SequenceBatch,
    theta0: dict[str, torch.Tensor],
    direction: dict[str, torch.Tensor],
) -> float:
    """dH_cond/dη from Cui et al.'s Lemma 1, token by token: −Cov_π(log π, ż) averaged.

    Independent of ``directional_derivatives``: it differentiates only the logits, and the
    entropy's derivative comes from the covariance formula, not from autodiff. The trunk's
    hidden states and their tangent come from one jvp per row chunk; the head then runs
    ``chunk_tokens`` positions at a time, so no tokens × vocab tensor is built in full.
    Data-parallel, each rank takes its shard of E's rows; the sums are added over ranks.
    """
    dtype = next(iter(theta0.values())).dtype
    zero = torch.zeros((), dtype=dtype)
    one = torch.ones_like(zero)
    trunk, head = ResponseHidden(scorer), ResponseLogits(scorer)

    def along(s: torch.Tensor) -> dict[str, torch.Tensor]:
        return _prefixed({n: theta0[n] + s * direction[n].to(dtype) for n in theta0})

    total, tokens = 0.0, 0
    local = scorer.shard_of(batch)
    with eval_mode(scorer.lm), torch.no_grad(), forward_ad_safe(scorer.lm, order=1):
        for rows in local.length_sorted_chunks(scorer.max_rows):
            part = local.select(rows)
            hidden, hidden_dot = jvp(
                lambda s, part=part: functional_call(trunk, along(s), (part,)), (zero,), (one,)
            )
            for start in range(0, hidden.shape[0], scorer.chunk_tokens):
                h = hidden[start : start + scorer.chunk_tokens]
                hd = hidden_dot[start : start + scorer.chunk_tokens]
                # The head's own parameters may move along v too.
                z, z_dot = jvp(
                    lambda s, h=h, hd=hd: functional_call(head, along(s), (h + s * hd,)),
                    (zero,),
                    (one,),
                )
                total += float(-_logit_covariance(z, z_dot).sum())
                tokens += z.shape[0]
    return distributed.sum_over_ranks(total) / distributed.sum_over_ranks(tokens)


def _logit_covariance(z: torch.Tensor, z_dot: torch.Tensor) -> torch.Tensor:
    """Per row, Cov_{a∼softmax(z)}(log π(a), ż(a)), fp64; truncated entries (−inf) carry no mass.

    log π = y − log s with y = z − max z and s = Σ exp y: the constant log s drops out of a
    covariance, so Cov(log π, ż) = Cov(y, ż) = (Σ e·y·ż − Σ e·y · Σ e·ż / s) / s with one exp
    (e = exp y) and z's fp64 cast inside the subtraction (no fp64 copy of z, no log_softmax).
    """
    y = z - z.amax(-1, keepdim=True).to(torch.float64)
    e = y.exp()
    finite = torch.isfinite(y)
    ey = e * torch.where(finite, y, 0.0)  # e = 0 where y = −inf, but 0·(−inf) is NaN
    zd = torch.where(finite, z_dot.to(torch.float64), 0.0)
    s = e.sum(-1)
    return ((ey * zd).sum(-1) - ey.sum(-1) * (e * zd).sum(-1) / s) / s


@dataclass(frozen=True)
class CrudeForecasts:
    """Cui et al.'s batch-level forecasts of dH/dη from the update batch U alone.

    With logits moving as ż = π·A (vanilla policy gradient on a tabular softmax) or ż = A
    (natural policy gradient), dH/dη ≈ −Cov(log π(y_t), π(y_t)·A_t) or −Cov(log π(y_t), A_t)
    over U's response tokens. They assume the logits themselves are the parameters; under
    Adam on LoRA weights the logits move otherwise, so they are reported for comparison only.
    """

    vanilla_pg: float
    natural_pg: float
    tokens: int


def crude_forecasts(token_logprob: torch.Tensor, token_advantage: torch.Tensor) -> CrudeForecasts:
    """The two forecasts from U's sampled-token log-probs and per-token advantages (θ₀)."""
    logp = token_logprob.double()
    adv = token_advantage.double().to(logp.device)

    def cov(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((a - a.mean()) * (b - b.mean())).mean())

    return CrudeForecasts(
        vanilla_pg=-cov(logp, logp.exp() * adv), natural_pg=-cov(logp, adv), tokens=logp.numel()
    )


def _prefixed(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"lm.{n}": t for n, t in params.items()}


class ResponseHidden(torch.nn.Module):
    """The trunk's last hidden state at every position that predicts a response token."""

    def __init__(self, scorer: EntropyScorer) -> None:
        super().__init__()
        self.lm = scorer.lm

    def forward(self, batch: SequenceBatch) -> torch.Tensor:
        decoder, _ = decoder_and_head(self.lm)
        hidden = decoder(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        return hidden[:, :-1][batch.response_mask[:, 1:].bool()]


class ResponseLogits(torch.nn.Module):
    """Tempered logits (the full softmax's) from response-position hidden states."""

    def __init__(self, scorer: EntropyScorer) -> None:
        super().__init__()
        self.lm = scorer.lm
        self.temperature = scorer.temperature

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        _, head = decoder_and_head(self.lm)
        return head(states) / self.temperature


def entropy_gradient(
    scorer: EntropyScorer,
    batch: SequenceBatch,
    params: dict[str, torch.nn.Parameter],
    baseline: float,
    reading: str,
) -> dict[str, torch.Tensor]:
    """∇_θ H(θ₀) of one reading on E, by reverse mode, one row chunk at a time (fp64).

    At θ₀ the importance weights are 1, so with N = Σh_i, D = ΣT_i, H = N/D:
    ∇H_cond = ∇N/D and ∇H_policy = ∇H_cond + Σ_i (h_i − H·T_i)·∇log π(seq_i)/D. Both are
    sums over rows: row chunks are back-propagated one at a time and the gradients added;
    within one, the head is differentiated a token chunk at a time (``ResponseStates``; the
    policy reading's weights h_i − H·T_i first, without autograd), so memory is one row
    chunk's trunk graph and one token chunk's logits. Used once per sweep: ∇H·(θ₁ − θ₀ − η·v) is then the
    first-order effect of the parameters' rounding at every (η, repeat), a dot product.
    Data-parallel, each rank takes its shard of E's rows and the gradients are summed.
    """
    local = scorer.shard_of(batch)
    tokens = distributed.sum_over_ranks(float(local.response_mask[:, 1:].sum()))
    grads = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    decoder, head = decoder_and_head(scorer.lm)
    with eval_mode(scorer.lm):
        for rows in local.length_sorted_chunks(scorer.max_rows):
            part = local.select(rows)
            states = ResponseStates(decoder, head, part, scorer.temperature, scorer.chunk_tokens)
            weight = _policy_weights(states, len(part), baseline) if reading == "policy" else None

            def objective(chunk: TokenChunk, weight=weight) -> torch.Tensor:
                total = chunk.entropy.sum()
                if weight is not None:
                    total = total + (weight[chunk.rows] * chunk.logp).sum()
                return total / tokens

            found = states.backward(objective, list(params.values())).grads
            for name, g in zip(params, found):
                if g is not None:
                    grads[name] += g.double()
    for name in sorted(grads):  # the same order on every rank
        distributed.all_reduce_sum_(grads[name])
    return grads


def _policy_weights(states: ResponseStates, rows: int, baseline: float) -> torch.Tensor:
    """Per row, h_i − H·T_i (the policy reading's weight on ∇log π(seq_i)), from the kept
    hidden states without autograd: it couples a row's tokens across token chunks, so it is
    known before any chunk is differentiated."""
    _, entropy = states.statistics()
    zeros = torch.zeros(rows, dtype=torch.float64, device=entropy.device)
    h = zeros.index_add(0, states.rows, entropy)
    return h - baseline * zeros.index_add(0, states.rows, torch.ones_like(entropy))
