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
from torch import nn

from entropy_lab import distributed
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


def token_statistics(
    decoder: nn.Module,
    head: Callable[[torch.Tensor], torch.Tensor],
    batch: SequenceBatch,
    temperature: float,
    chunk_tokens: int = 1024,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per response token: log π(token) and entropy (fp64), and the row each token belongs to.

    Both from the full softmax at temperature T, also when the sampler truncates (top-k /
    top-p): a truncated reading would jump when a token crosses the boundary, and the full
    one is what the trainer's loss and TRL / verl's logged entropy use (DESIGN §2.5).
    Differentiable (reverse and forward mode) with respect to the model parameters.
    """
    hidden = decoder(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask
    ).last_hidden_state
    # Token t is predicted by the logits at t − 1.
    target_mask = batch.response_mask[:, 1:].bool()
    rows = torch.nonzero(target_mask, as_tuple=True)[0]
    states = hidden[:, :-1][target_mask]
    targets = batch.input_ids[:, 1:][target_mask]
    logps, entropies = [], []
    for start in range(0, states.shape[0], chunk_tokens):
        logits = head(states[start : start + chunk_tokens]).double() / temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        tgt = targets[start : start + chunk_tokens, None]
        logps.append(logp_all.gather(-1, tgt).squeeze(-1))
        if with_entropy:
            entropies.append(-(logp_all.exp() * logp_all).sum(-1))
    logp = torch.cat(logps)
    entropy = torch.cat(entropies) if with_entropy else None
    return logp, entropy, rows


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
