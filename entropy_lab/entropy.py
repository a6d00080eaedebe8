"""Token entropy of the policy on a fixed evaluation batch.

H(θ) = Σ_i h_i / Σ_i T_i over response tokens, with h_i the sum over positions of the
full-vocabulary (Rao-Blackwell) entropy of softmax(z/T). Logits are formed only at response
positions and only ``chunk_tokens`` rows at a time, then cast to fp64, so no B×L×V fp64 (or
even fp32) tensor ever exists.

Two readings of H(θ₁), both from the same per-sequence sums:
- conditional: the same prefixes, new next-token distributions;
- policy: self-normalised importance weights w_i = π_θ₁(seq_i)/π_θ₀(seq_i) on numerator and
  denominator, so H estimates the entropy of the updated policy's own sequences.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from entropy_lab import distributed
from entropy_lab.config import Reading
from entropy_lab.modes import eval_mode
from entropy_lab.rollout import SequenceBatch


@dataclass
class SequenceSums:
    """Per-sequence sums over response tokens (fp64)."""

    entropy: torch.Tensor  # h_i
    logprob: torch.Tensor  # log π(seq_i) at temperature T
    tokens: torch.Tensor  # T_i


@dataclass(frozen=True)
class EntropyReadings:
    conditional: float
    policy: float
    ess: float  # effective sample size of the importance weights (= B_E at θ₀)

    def of(self, reading: Reading) -> float:
        """The entropy that defines ΔH under ``reading``."""
        return self.policy if reading is Reading.POLICY else self.conditional


class ModelLogits:
    """The model's own logits from its last hidden states: the output projection (tied or
    untied) followed by whatever the architecture's ``forward`` applies after it.

    The steps after the projection come from the model's config and module, per family:
    Gemma 2/3's ``final_logit_softcapping`` (z ↦ c·tanh(z/c)), Cohere's ``logit_scale``
    (z ↦ s·z) and Granite's ``logits_scaling`` (z ↦ z/s). Any other architecture is taken to
    use the projection alone; ``checkpoint.load_checkpoint`` verifies the result against
    ``model(...).logits`` on a few sequences, so an architecture that does something else is
    refused at load, not measured wrongly. Position-wise, so the scorer can apply it to a
    chunk of response positions at a time.
    """

    def __init__(self, causal_lm: nn.Module) -> None:
        self.projection = causal_lm.get_output_embeddings()
        config = causal_lm.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        scale = getattr(causal_lm, "logit_scale", None)  # Cohere keeps it on the module
        self.scale = float(scale) if isinstance(scale, (int, float)) else None
        divisor = getattr(config, "logits_scaling", None)  # Granite
        self.divisor = float(divisor) if divisor not in (None, 1, 1.0) else None

    @property
    def vocab_size(self) -> int:
        out = getattr(self.projection, "out_features", None)  # also LoRA / 4-bit wrappers
        return int(out) if out is not None else int(self.projection.weight.shape[0])

    @property
    def steps(self) -> list[str]:
        """The steps after the projection, in order, for messages and records."""
        out = []
        if self.scale is not None:
            out.append(f"logit_scale {self.scale:g}")
        if self.divisor is not None:
            out.append(f"logits_scaling {self.divisor:g}")
        if self.softcap is not None:
            out.append(f"final_logit_softcapping {self.softcap:g}")
        return out

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        logits = self.projection(states)
        if self.scale is not None:
            logits = logits * self.scale
        if self.divisor is not None:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def writes_into(self, states: torch.Tensor) -> bool:
        """Whether ``block`` may serve: a plain ``nn.Linear`` projection (not LoRA- or
        quantization-wrapped, whose weight alone is not the projection) and no autograd or
        functorch transform watching (out= ops have no derivative rules)."""
        return type(self.projection) is nn.Linear and is_plain(states, self.projection.weight)

    def block(self, states: torch.Tensor, start: int, stop: int, out: torch.Tensor):
        """The logits of vocabulary entries [start, stop), written into ``out``: the rows of
        the weight (and bias) for that slice, then the same steps as ``__call__``, in place."""
        weight = self.projection.weight[start:stop]
        if self.projection.bias is None:
            logits = torch.mm(states, weight.t(), out=out)
        else:
            logits = torch.addmm(self.projection.bias[start:stop], states, weight.t(), out=out)
        if self.scale is not None:
            logits.mul_(self.scale)
        if self.divisor is not None:
            logits.div_(self.divisor)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def block_tangent(
        self,
        states: torch.Tensor,
        tangents: PlainTangents,
        logits: torch.Tensor,
        start: int,
        stop: int,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """ż of the vocabulary entries [start, stop), written into ``out``, given their
        ``logits`` from ``block``: ḣ·Wᵀ (+ h·Ẇᵀ + ḃ where the projection moves), then the
        steps' own derivatives (softcap: (1 − tanh²)·ż, tanh read back from the logits)."""
        weight = self.projection.weight[start:stop]
        dot = torch.mm(tangents.states, weight.t(), out=out)
        # ḃ + ḣ·Wᵀ + h·Ẇᵀ in this order, as forward-mode AD's rules for addmm / mm: the same
        # rounding in fp32
        if tangents.bias is not None:
            dot.add_(tangents.bias[start:stop])
        if tangents.weight is not None:
            dot.add_(torch.mm(states, tangents.weight[start:stop].t()))
        if self.scale is not None:
            dot.mul_(self.scale)
        if self.divisor is not None:
            dot.div_(self.divisor)
        if self.softcap is not None:
            dot.mul_(1 - (logits / self.softcap).square())
        return dot


@dataclass(frozen=True)
class PlainTangents:
    """The forward-mode tangents (plain tensors) of the head's inputs: the states' and, where
    the projection itself moves along v, its weight's and bias's (None where it does not)."""

    states: torch.Tensor
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> PlainTangents:
        """Those of the states' rows [start, stop) (the weight's and bias's are shared)."""
        return PlainTangents(self.states[start:stop], self.weight, self.bias)


def is_plain(*tensors: torch.Tensor) -> bool:
    """No autograd graph (grad mode on and a tensor requiring grad), forward-mode tangent or
    torch.func wrapper on any of ``tensors``: out= and in-place buffer reuse are allowed."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return not any(
        torch._C._functorch.is_functorch_wrapped_tensor(t)
        or fwAD.unpack_dual(t).tangent is not None
        for t in tensors
    )


def decoder_and_head(causal_lm: nn.Module) -> tuple[nn.Module, ModelLogits]:
    """The transformer trunk (returns hidden states) and the model's own logits from them
    (projection and final transform: ``ModelLogits``)."""
    lm = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
    return lm.get_decoder(), ModelLogits(lm)


def probe_batch(causal_lm: nn.Module, rows: int = 3, length: int = 16) -> SequenceBatch:
    """A few fixed random sequences for load-time checks: one row right-padded, responses
    from position 4 on (so the scorer's selection of response positions is exercised)."""
    lm = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
    vocab = int(lm.get_input_embeddings().weight.shape[0])
    device = next(lm.parameters()).device
    generator = torch.Generator().manual_seed(15)
    input_ids = torch.randint(0, vocab, (rows, length), generator=generator)
    lengths = [length] * (rows - 1) + [max(6, length - 5)]
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        attention_mask[row, :n] = 1
        response_mask[row, 4:n] = 1
    input_ids = input_ids * attention_mask  # padding id 0, as the rollouts pack
    batch = SequenceBatch(input_ids, attention_mask, response_mask, torch.arange(rows))
    return batch.to(device)


# Measured at V = 151,936, d = 768 on one CPU thread: the head's mm runs 15-20 % slower per
# token at 64 tokens a chunk than from 128 on (each chunk reads the whole V×d weight).
MIN_CHUNK_TOKENS = 128
# Bytes of one vocabulary block's fp64 logits in the blocked paths: in cache between the
# block's mm and its reductions. Measured on a shared 2-core EPYC (L2 1 MiB a core, one
# thread, V = 151,936, fp32): blocked_statistics took 293 ms at 2 MiB against 371 at 8 MiB
# (d = 256, 128 tokens) and 1,895 against 2,146 (d = 768, 384 tokens); 1-8 MiB within 5 %
# in fp64.
BLOCK_BYTES = 2 * 2**20
# In fp64 mode z is y (no fp32 buffer, no copy): 8 MiB blocks measured 3-4 % faster there
# than 2 MiB (d = 256, 128 tokens, two runs), so fp64 takes this many times BLOCK_BYTES.
FP64_BLOCK_FACTOR = 4


def block_width(tokens: int, vocab: int, element_size: int, cuda: bool) -> int:
    """Vocabulary entries per block of the blocked paths for ``tokens`` rows whose logits
    have ``element_size`` bytes: the whole vocabulary on CUDA, else as many as keep the
    block's fp64 logits within BLOCK_BYTES (× FP64_BLOCK_FACTOR in fp64 mode)."""
    if cuda:
        return vocab
    budget = BLOCK_BYTES * (FP64_BLOCK_FACTOR if element_size == 8 else 1)
    return max(256, budget // (8 * max(tokens, 1)))


def chunk_step(head: Callable[..., torch.Tensor], states: torch.Tensor, cap: int) -> int:
    """Tokens per logits chunk for ``head`` on these hidden ``states``: ``chunk_tokens_for``
    the model's own head, ``cap`` for any other callable."""
    if not isinstance(head, ModelLogits):
        return cap
    return chunk_tokens_for(head.vocab_size, states.shape[-1], states.element_size(), cap)


def chunk_tokens_for(vocab: int, hidden: int, weight_bytes: int, cap: int) -> int:
    """Response tokens per logits chunk, never more than ``cap``: any number whose fp64
    logits fit BLOCK_BYTES (a small vocabulary: per-chunk overhead is then what costs);
    otherwise as many as keep one chunk's fp64 logits (V × 8 bytes a token) no larger than
    the head's own weight (V × hidden × weight_bytes), so memory grows with the model rather
    than with the batch, but at least MIN_CHUNK_TOKENS for the matmul's speed."""
    fits = BLOCK_BYTES // (8 * vocab)
    return max(1, min(cap, max(MIN_CHUNK_TOKENS, hidden * weight_bytes // 8, fits)))


def logit_statistics(
    z: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row of logits z: log softmax(z/T)[target] and the entropy of softmax(z/T), fp64.

    One exp per logit: y = (z − max z)/T in fp64 (z's cast happens inside the subtraction,
    no fp64 copy of z), s = Σ exp y, log π = y_target − log s, H = log s − Σ exp(y)·y / s.
    In the shifted frame both terms of H are ≥ 0, so a nearly deterministic token's tiny H
    is not the difference of two large numbers. The max is a constant shift (H and log π do
    not depend on it), so it is detached: no derivative flows through it.
    """
    y = z - z.detach().amax(-1, keepdim=True).to(torch.float64)
    if temperature != 1.0:
        y = y / temperature
    e = y.exp()
    s = e.sum(-1)
    log_s = s.log()
    logp = y.gather(-1, targets[:, None]).squeeze(-1) - log_s
    if not with_entropy:
        return logp, None
    weighted = torch.bmm(e[:, None, :], y[:, :, None]).view(-1)  # Σ exp(y)·y, no temporary
    return logp, log_s - weighted / s


def blocked_statistics(
    head: ModelLogits,
    states: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``logit_statistics`` of ``head(states)`` without its tokens × V logits: the head runs
    one vocabulary block at a time into a cache-sized buffer, reused, and each block keeps
    its own shift m_b, s_b = Σ exp y_b and t_b = Σ exp(y_b)·y_b (y_b = (z − m_b)/T). They
    merge at the end with δ_b = (m_b − m)/T ≤ 0: s = Σ e^δ_b·s_b, t = Σ e^δ_b·(t_b + δ_b·s_b),
    every term ≤ 0, so no cancellation. Plain tensors only (``ModelLogits.writes_into``).

    Why: at V = 151,936 fresh tokens × V tensors cost more in page faults than the entropy's
    arithmetic, and each elementwise pass over them reads memory, not cache.
    """
    n, vocab = states.shape[0], head.vocab_size
    width = block_width(n, vocab, states.element_size(), states.is_cuda)
    fp64 = torch.float64
    flat_z = torch.empty(n * min(width, vocab), dtype=states.dtype, device=states.device)
    flat_y = flat_z if states.dtype == fp64 else torch.empty_like(flat_z, dtype=fp64)
    flat_e = torch.empty_like(flat_y)
    shifts, sums, dots = [], [], []
    target_y = torch.zeros(n, dtype=fp64, device=states.device)  # in its block's frame
    for start in range(0, vocab, width):
        w = min(width, vocab - start)
        z = head.block(states, start, start + w, out=flat_z[: n * w].view(n, w))
        shift = z.amax(-1, keepdim=True).to(fp64)
        # copy_ then sub_: measured 3× faster than one mixed-dtype sub in fp32 mode.
        y = flat_y[: n * w].view(n, w).copy_(z).sub_(shift)
        if temperature != 1.0:
            y.div_(temperature)
        e = torch.exp(y, out=flat_e[: n * w].view(n, w))
        shifts.append(shift.squeeze(-1) / temperature)
        sums.append(e.sum(-1))
        if with_entropy:  # in cache, e·y in place then a sum beats bmm's dot (measured)
            dots.append(e.mul_(y).sum(-1))
        local = (targets - start).clamp(0, w - 1)[:, None]
        here = (targets >= start) & (targets < start + w)
        target_y = torch.where(here, y.gather(-1, local).squeeze(-1), target_y)
    shift = torch.stack(shifts, -1)
    delta = shift - shift.amax(-1, keepdim=True)  # δ_b ≤ 0
    s, means = merge_blocks(delta, sums, [], dots, [])
    log_s = s.log()
    logp = target_y + delta.gather(-1, (targets // width)[:, None]).squeeze(-1) - log_s
    if not with_entropy:
        return logp, None
    return logp, log_s - means.y


def first_order_tangents(head, states: torch.Tensor) -> PlainTangents | None:
    """The tangents for ``blocked_first_order`` when it may serve: ``states`` carry an
    (unnested) ``torch.autograd.forward_ad`` tangent, the head is a plain ``nn.Linear``
    projection (its weight and bias may carry tangents too), no reverse-mode graph and no
    torch.func transform watches (nested jets keep forward-mode AD). None otherwise."""
    if not isinstance(head, ModelLogits) or type(head.projection) is not nn.Linear:
        return None
    weight, bias = head.projection.weight, head.projection.bias
    tensors = [t for t in (states, weight, bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return None

    def tangent(t: torch.Tensor | None) -> torch.Tensor | None:
        dot = None if t is None else fwAD.unpack_dual(t).tangent
        return None if dot is None or dot._is_zerotensor() else dot

    if tangent(states) is None:
        return None
    return PlainTangents(tangent(states), tangent(weight), tangent(bias))


@dataclass
class FirstOrder:
    """Per token: log π(target) and H (fp64), and their derivatives along v."""

    logp: torch.Tensor
    logp_dot: torch.Tensor
    entropy: torch.Tensor | None
    entropy_dot: torch.Tensor | None


def blocked_first_order(
    head: ModelLogits,
    states: torch.Tensor,
    tangents: PlainTangents,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool = True,
) -> FirstOrder:
    """``blocked_statistics`` and its directional derivative in closed form, from z and ż one
    vocabulary block at a time (no tokens × V dual tensors, no forward-mode AD through the
    entropy's elementwise ops).

    With y = z/T (any shift), ẏ = ż/T, p = softmax(y): d log π(a) = ẏ_a − E_p ẏ and
    dH = −Cov_p(y, ẏ) = −(E_p[y·ẏ] − E_p y · E_p ẏ). Each block keeps, beside s_b and t_b,
    a_b = Σ e·ẏ and c_b = Σ e·y·ẏ in its own frame y_b = y − m_b/T; with δ_b as in
    ``blocked_statistics`` they merge as A = Σ e^δ_b·a_b and C = Σ e^δ_b·(c_b + δ_b·a_b)
    (y = y_b + δ_b in the common frame); E_p ẏ = A/s, E_p[y·ẏ] = C/s, E_p y = t/s.
    """
    n, vocab = states.shape[0], head.vocab_size
    width = block_width(n, vocab, states.element_size(), states.is_cuda)
    fp64 = torch.float64
    flat_z = torch.empty(n * min(width, vocab), dtype=states.dtype, device=states.device)
    flat_zd = torch.empty_like(flat_z)
    flat_y = flat_z if states.dtype == fp64 else torch.empty_like(flat_z, dtype=fp64)
    flat_yd = flat_zd if states.dtype == fp64 else torch.empty_like(flat_z, dtype=fp64)
    flat_e = torch.empty_like(flat_y)
    shifts, sums, dots, slopes, cross = [], [], [], [], []
    target_y = torch.zeros(n, dtype=fp64, device=states.device)  # in its block's frame
    target_yd = torch.zeros(n, dtype=fp64, device=states.device)
    for start in range(0, vocab, width):
        w = min(width, vocab - start)
        z = head.block(states, start, start + w, out=flat_z[: n * w].view(n, w))
        zd = head.block_tangent(states, tangents, z, start, start + w, flat_zd[: n * w].view(n, w))
        shift = z.amax(-1, keepdim=True).to(fp64)
        y = flat_y[: n * w].view(n, w).copy_(z).sub_(shift)
        yd = flat_yd[: n * w].view(n, w).copy_(zd)
        if temperature != 1.0:
            y.div_(temperature)
            yd.div_(temperature)
        e = torch.exp(y, out=flat_e[: n * w].view(n, w))
        shifts.append(shift.squeeze(-1) / temperature)
        sums.append(e.sum(-1))
        slopes.append(torch.bmm(e[:, None, :], yd[:, :, None]).view(-1))  # Σ e·ẏ
        if with_entropy:
            ey = e.mul_(y)
            dots.append(ey.sum(-1))
            cross.append(torch.bmm(ey[:, None, :], yd[:, :, None]).view(-1))  # Σ e·y·ẏ
        local = (targets - start).clamp(0, w - 1)[:, None]
        here = (targets >= start) & (targets < start + w)
        target_y = torch.where(here, y.gather(-1, local).squeeze(-1), target_y)
        target_yd = torch.where(here, yd.gather(-1, local).squeeze(-1), target_yd)
    shift = torch.stack(shifts, -1)
    delta = shift - shift.amax(-1, keepdim=True)  # δ_b ≤ 0
    s, means = merge_blocks(delta, sums, slopes, dots, cross)
    log_s = s.log()
    logp = target_y + delta.gather(-1, (targets // width)[:, None]).squeeze(-1) - log_s
    logp_dot = target_yd - means.yd
    if not with_entropy:
        return FirstOrder(logp, logp_dot, None, None)
    return FirstOrder(logp, logp_dot, log_s - means.y, -(means.y_yd - means.y * means.yd))


@dataclass(frozen=True)
class BlockMeans:
    """E_p ẏ, E_p y and E_p[y·ẏ] per token, y in the common frame (None: not summed)."""

    yd: torch.Tensor | None
    y: torch.Tensor | None
    y_yd: torch.Tensor | None


def merge_blocks(delta, sums, slopes, dots, cross) -> tuple[torch.Tensor, BlockMeans]:
    """s = Σ e^δ_b·s_b and the means whose per-block sums were kept (an empty list: not), from
    each block's s_b, a_b, t_b, c_b in its own frame (y = y_b + δ_b):
    Σ e·ẏ = Σ e^δ_b·a_b, Σ e·y = Σ e^δ_b·(t_b + δ_b·s_b), Σ e·y·ẏ = Σ e^δ_b·(c_b + δ_b·a_b)."""
    scale, block_sums = delta.exp(), torch.stack(sums, -1)
    s = (scale * block_sums).sum(-1)
    block_slopes = torch.stack(slopes, -1) if slopes else None
    mean_yd = (scale * block_slopes).sum(-1) / s if slopes else None
    mean_y = (scale * (torch.stack(dots, -1) + delta * block_sums)).sum(-1) / s if dots else None
    mean_y_yd = (
        (scale * (torch.stack(cross, -1) + delta * block_slopes)).sum(-1) / s if cross else None
    )
    return s, BlockMeans(mean_yd, mean_y, mean_y_yd)


def response_positions(
    decoder: nn.Module, batch: SequenceBatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The trunk's hidden states at the positions that predict a response token (token t is
    predicted by the logits at t − 1), each one's row and its target token, row-major."""
    hidden = decoder(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask
    ).last_hidden_state
    target_mask = batch.response_mask[:, 1:].bool()
    rows = torch.nonzero(target_mask, as_tuple=True)[0]
    return rows, hidden[:, :-1][target_mask], batch.input_ids[:, 1:][target_mask]


def token_statistics(
    decoder: nn.Module,
    head: Callable[..., torch.Tensor],
    batch: SequenceBatch,
    temperature: float,
    chunk_tokens: int = 1024,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per response token: log π(token) and entropy (fp64), and the row each token belongs to.

    Both from the full softmax at temperature T, also when the sampler truncates (top-k /
    top-p): a truncated reading would jump when a token crosses the boundary, and the full
    one is what the trainer's loss and TRL / verl's logged entropy use (DESIGN §2.5).
    Differentiable (reverse and forward mode) with respect to the model parameters. At most
    ``chunk_tokens`` tokens' logits at a time, fewer at a large vocabulary (``chunk_tokens_for``).
    """
    rows, states, targets = response_positions(decoder, batch)
    step = chunk_step(head, states, chunk_tokens)
    plain = isinstance(head, ModelLogits) and head.writes_into(states)
    tangents = None if plain else first_order_tangents(head, states)
    if tangents is not None:  # blocked_first_order works on the primals
        states = fwAD.unpack_dual(states).primal
    logps, entropies = [], []
    for start in range(0, states.shape[0], step):
        chunk, tgt = states[start : start + step], targets[start : start + step]
        if plain:
            logp, entropy = blocked_statistics(head, chunk, tgt, temperature, with_entropy)
        elif tangents is not None:
            logp, entropy = _dual_statistics(
                head, chunk, tangents.rows(start, start + step), tgt, temperature, with_entropy
            )
        else:
            logp, entropy = logit_statistics(head(chunk), tgt, temperature, with_entropy)
        logps.append(logp)
        if with_entropy:
            entropies.append(entropy)
    if not logps:  # a row chunk without response tokens (the batch has them elsewhere)
        logps = entropies = [torch.zeros(0, dtype=torch.float64, device=states.device)]
    logp = torch.cat(logps)
    entropy = torch.cat(entropies) if with_entropy else None
    return logp, entropy, rows


def _dual_statistics(head, states, tangents, targets, temperature, with_entropy):
    """``blocked_first_order``'s values as forward-mode dual tensors (the current level's),
    so the sums after it carry the derivative as forward-mode AD would have."""
    out = blocked_first_order(head, states, tangents, targets, temperature, with_entropy)
    logp = fwAD.make_dual(out.logp, out.logp_dot)
    if not with_entropy:
        return logp, None
    return logp, fwAD.make_dual(out.entropy, out.entropy_dot)


def sequence_sums(
    decoder: nn.Module,
    head: Callable[[torch.Tensor], torch.Tensor],
    batch: SequenceBatch,
    temperature: float,
    chunk_tokens: int = 1024,
) -> SequenceSums:
    logp, entropy, rows = token_statistics(decoder, head, batch, temperature, chunk_tokens)
    n = len(batch)
    zeros = torch.zeros(n, dtype=torch.float64, device=logp.device)
    return SequenceSums(
        entropy=zeros.index_add(0, rows, entropy),
        logprob=zeros.index_add(0, rows, logp),
        tokens=zeros.index_add(0, rows, torch.ones_like(logp)),
    )


@dataclass
class TokenChunk:
    """One token chunk of a batch inside ``ResponseStates.backward``: log π and entropy
    (fp64, differentiable with respect to the chunk's hidden states and the head's own
    parameters), the row of each token, and the chunk's place in the batch's flat token
    order (row-major, the order ``token_statistics`` returns)."""

    logp: torch.Tensor
    entropy: torch.Tensor | None
    rows: torch.Tensor
    span: slice


@dataclass
class TokenBackward:
    """What ``ResponseStates.backward`` leaves: the gradient of the summed objective with
    respect to each input (None: not reached, or added into ``.grad``), the objective's
    value, and every token's log π and entropy (detached) with its row."""

    grads: list[torch.Tensor | None]
    value: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor | None
    rows: torch.Tensor


class ResponseStates:
    """The trunk run once over a batch, its graph kept: the hidden states at every position
    that predicts a response token, for reverse mode through the head a token chunk at a time.

    Why: a loss built from every token's log π and entropy keeps, until its backward, each
    token's logits and their fp64 softmax terms, tokens × V values (at V = 151,936 and 64
    rows of 512 response tokens, 77 GB in fp64). Here each chunk's head and statistics are
    differentiated as soon as they are built, into the chunk's hidden states (and the head's
    parameters), and the trunk is back-propagated once with the gathered hidden-state
    gradient: the same gradient (the chain rule split at the hidden states), with one
    chunk's logits alive at a time. The objective must be a sum of per-chunk terms; whatever
    couples tokens across chunks (a row's entropy in an importance weight, a micro-batch's
    token count) is a constant computed before (``statistics``, or from the batch).
    """

    def __init__(
        self,
        decoder: nn.Module,
        head: Callable[[torch.Tensor], torch.Tensor],
        batch: SequenceBatch,
        temperature: float,
        chunk_tokens: int,
    ) -> None:
        self.rows, self.states, self.targets = response_positions(decoder, batch)
        self.head, self.temperature = head, temperature
        self.step = chunk_step(head, self.states, chunk_tokens)  # as token_statistics chunks

    def spans(self) -> list[slice]:
        n = self.states.shape[0]
        return [slice(start, start + self.step) for start in range(0, n, self.step)]

    @torch.no_grad()
    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token's log π and entropy without autograd, from the kept hidden states (the
        trunk does not run again) by the formula ``backward`` differentiates, so the values
        are bit for bit those its chunks see: the head's blocked path rounds otherwise, and
        the policy reading's weights h_i − H·T_i cancel enough to show it (1e-12 measured)."""
        states = self.states.detach()
        empty = torch.zeros(0, dtype=torch.float64, device=states.device)
        logps, entropies = [empty], [empty]
        for span in self.spans():
            logp, entropy = logit_statistics(
                self.head(states[span]), self.targets[span], self.temperature
            )
            logps.append(logp)
            entropies.append(entropy)
        return torch.cat(logps), torch.cat(entropies)

    def backward(
        self,
        objective: Callable[[TokenChunk], torch.Tensor],
        inputs: list[torch.Tensor],
        with_entropy: bool = True,
        accumulate: bool = False,
    ) -> TokenBackward:
        """d/d``inputs`` of Σ over token chunks of ``objective(chunk)`` (a scalar each): per
        chunk, its logits, statistics and objective, back-propagated at once into the chunk's
        hidden states and any input the head uses; then the trunk's backward, once, from
        the gathered hidden-state gradient. ``accumulate``: added into each input's ``.grad``
        (as ``Tensor.backward``), else returned. Once per ``ResponseStates``: the trunk's
        graph is freed by it."""
        grad_states = torch.zeros_like(self.states)
        grads: list[torch.Tensor | None] = [None] * len(inputs)
        value = torch.zeros((), dtype=torch.float64, device=self.states.device)
        logps, entropies = [value.new_zeros(0)], [value.new_zeros(0)]
        for span in self.spans():
            piece = self.states[span].detach().requires_grad_()
            logits = self.head(piece)
            logp, entropy = logit_statistics(
                logits, self.targets[span], self.temperature, with_entropy
            )
            term = objective(TokenChunk(logp, entropy, self.rows[span], span))
            if term.requires_grad:
                grad_piece, found = _backward(term, piece, inputs, accumulate)
                if grad_piece is not None:
                    grad_states[span] = grad_piece
                grads = _added(grads, found)
            value = value + term.detach()
            logps.append(logp.detach())
            if with_entropy:
                entropies.append(entropy.detach())
        if self.states.requires_grad:  # else no trainable parameter in the trunk
            if accumulate:
                torch.autograd.backward(self.states, grad_states, inputs=inputs)
            else:
                found = torch.autograd.grad(self.states, inputs, grad_states, allow_unused=True)
                grads = _added(grads, list(found))
        entropy = torch.cat(entropies) if with_entropy else None
        return TokenBackward(grads, value, torch.cat(logps), entropy, self.rows)


def _backward(term: torch.Tensor, piece: torch.Tensor, inputs: list[torch.Tensor], accumulate):
    """(d term/d piece, d term/d inputs): one backward pass through one chunk's head; with
    ``accumulate`` the inputs' share goes into their ``.grad`` (and None is returned)."""
    if accumulate:
        torch.autograd.backward(term, inputs=[piece, *inputs])
        return piece.grad, [None] * len(inputs)
    grad_piece, *found = torch.autograd.grad(term, [piece, *inputs], allow_unused=True)
    return grad_piece, found


def _added(total: list[torch.Tensor | None], more: list[torch.Tensor | None]):
    return [m if t is None else t if m is None else t.add_(m) for t, m in zip(total, more)]


def gather_sums(local: SequenceSums, n: int) -> SequenceSums:
    """Every rank's per-sequence sums in global row order (the sums themselves with one process).

    The readings are ratios (and the policy reading normalises its weights over all of E), so
    ranks exchange per-sequence sums, never per-rank readings.
    """
    if distributed.world_size() == 1:
        return local
    stacked = torch.stack([local.entropy, local.logprob, local.tokens], dim=1)
    entropy, logprob, tokens = distributed.all_gather_rows(stacked, n).unbind(1)
    return SequenceSums(entropy, logprob, tokens)


def readings(sums: SequenceSums, reference_logprob: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(H_conditional, H_policy, ESS) as tensors (differentiable)."""
    conditional = sums.entropy.sum() / sums.tokens.sum()
    log_w = sums.logprob - reference_logprob
    w = torch.exp(log_w - log_w.max().detach())  # self-normalised: the shift cancels
    policy = (w * sums.entropy).sum() / (w * sums.tokens).sum()
    ess = w.sum() ** 2 / (w**2).sum()
    return conditional, policy, ess


def routers_of(causal_lm: nn.Module) -> list[nn.Module]:
    """The model's top-k MoE routers, in layer order (none for a dense model)."""
    from entropy_lab.precision import is_router

    return [m for m in causal_lm.modules() if is_router(m)]


@dataclass
class Routing:
    """The top-k experts every router picked for every token of a batch: sorted expert ids,
    [routers, rows, positions, k] (−1 at padding), and the batch's attention mask."""

    experts: torch.Tensor
    attention_mask: torch.Tensor

    def changed_tokens(self, other: Routing) -> tuple[int, int]:
        """(tokens whose top-k set differs at any router, real tokens), this process's rows."""
        if self.experts.shape != other.experts.shape:
            raise ValueError("routing of different batches cannot be compared")
        real = self.attention_mask.bool()
        changed = (self.experts != other.experts).any(-1).any(0) & real
        return int(changed.sum()), int(real.sum())


class _RoutingRecorder:
    """While active, each router's chosen experts are placed at their (row, position)."""

    def __init__(self, routers: list[nn.Module], batch: SequenceBatch, top_k: int) -> None:
        n, width = batch.input_ids.shape
        self.routers = routers
        self.experts = torch.full((len(routers), n, width, top_k), -1, dtype=torch.int32)
        self.attention_mask = batch.attention_mask.cpu()
        self.rows: torch.Tensor | None = None  # the rows of the chunk being scored
        self.calls: list[torch.Tensor] = []

    def hook(self, module, args, output) -> None:
        index = next(t for t in output if torch.is_tensor(t) and not t.is_floating_point())
        self.calls.append(index.sort(-1).values.cpu().to(torch.int32))

    def place(self) -> None:
        """The router outputs of the chunk just scored, into the batch's coordinates."""
        rows = self.rows.cpu()
        for r, chosen in enumerate(self.calls):
            chosen = chosen.reshape(len(rows), -1, chosen.shape[-1])
            self.experts[r, rows, : chosen.shape[1]] = chosen
        self.calls = []


class EntropyScorer(nn.Module):
    """Scores an evaluation batch; a Module so ``torch.func.functional_call`` can swap θ.

    Parameter names are those of the causal LM prefixed by ``lm.``.
    """

    def __init__(
        self,
        causal_lm: nn.Module,
        temperature: float,
        chunk_tokens: int = 1024,
        max_rows: int = 64,
    ) -> None:
        super().__init__()
        self.lm = causal_lm
        self.temperature = temperature
        self.chunk_tokens = chunk_tokens
        self.max_rows = max_rows
        # MoE: routing is discrete and the jvp holds it fixed, so ``measure`` records which
        # experts each token of E went to, against ``reference_routing`` (θ₀).
        self.routers = routers_of(causal_lm)
        self.reference_routing: Routing | None = None
        self.last_routing: Routing | None = None
        self._recorder: _RoutingRecorder | None = None

    def forward(self, batch: SequenceBatch) -> SequenceSums:
        batch.require_response_tokens("the batch to score")
        decoder, head = decoder_and_head(self.lm)
        n = len(batch)
        parts: list[tuple[torch.Tensor, SequenceSums]] = []
        for rows in batch.length_sorted_chunks(self.max_rows):
            if self._recorder is not None:
                self._recorder.rows = rows
            sums = sequence_sums(
                decoder,
                head,
                batch.select(rows),
                self.temperature,
                self.chunk_tokens,
            )
            if self._recorder is not None:
                self._recorder.place()
            parts.append((rows, sums))
        # Back to the batch's row order.
        device = batch.input_ids.device
        out = SequenceSums(
            torch.zeros(n, dtype=torch.float64, device=device),
            torch.zeros(n, dtype=torch.float64, device=device),
            torch.zeros(n, dtype=torch.float64, device=device),
        )
        for rows, sums in parts:
            rows = rows.to(device)
            out = SequenceSums(
                out.entropy.index_add(0, rows, sums.entropy),
                out.logprob.index_add(0, rows, sums.logprob),
                out.tokens.index_add(0, rows, sums.tokens),
            )
        return out

    def shard_of(self, batch: SequenceBatch) -> SequenceBatch:
        """The rows this process scores (all of them with one process)."""
        if distributed.world_size() == 1:
            return batch
        return batch.select(list(distributed.shard(len(batch))))

    def global_sums(self, batch: SequenceBatch) -> SequenceSums:
        """Per-sequence sums of the whole batch; data-parallel, each rank scores its shard."""
        return gather_sums(self(self.shard_of(batch)), len(batch))

    @torch.no_grad()
    def measure(self, batch: SequenceBatch, reference_logprob: torch.Tensor) -> EntropyReadings:
        """The readings at the current θ; for an MoE model, its routing into ``last_routing``."""
        with eval_mode(self.lm), self._recording(batch):
            sums = self.global_sums(batch)
        conditional, policy, ess = readings(sums, reference_logprob)
        return EntropyReadings(float(conditional), float(policy), float(ess))

    @contextlib.contextmanager
    def _recording(self, batch: SequenceBatch):
        """Records the routing of this process's rows of ``batch`` (MoE only; else a no-op)."""
        if not self.routers:
            yield
            return
        top_k = max(int(r.top_k) for r in self.routers)
        local = self.shard_of(batch)
        self._recorder = recorder = _RoutingRecorder(self.routers, local, top_k)
        handles = [r.register_forward_hook(recorder.hook) for r in self.routers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._recorder = None
        self.last_routing = Routing(recorder.experts, recorder.attention_mask)

    @torch.no_grad()
    def record_reference_routing(self, batch: SequenceBatch) -> None:
        """θ₀'s routing of E (call at θ₀; a no-op for a dense model)."""
        if not self.routers:
            return
        with eval_mode(self.lm), self._recording(batch):
            self.global_sums(batch)
        self.reference_routing = self.last_routing

    def routing_changed_fraction(self) -> float | None:
        """Fraction of E's real tokens (prompt and response) whose top-k experts, at any MoE
        layer, differ between θ₀ (``reference_routing``) and the last ``measure``; None for a
        dense model. Data-parallel, the counts are summed over ranks."""
        if not self.routers or self.reference_routing is None or self.last_routing is None:
            return None
        changed, real = self.last_routing.changed_tokens(self.reference_routing)
        total = distributed.sum_over_ranks(real)
        return distributed.sum_over_ranks(changed) / total if total else 0.0
