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

from dataclasses import dataclass

import torch
from torch import nn

from entropy_lab import distributed
from entropy_lab.rollout import SequenceBatch, filter_logits


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


def decoder_and_head(causal_lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer trunk (returns hidden states) and the output projection."""
    lm = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
    return lm.get_decoder(), lm.get_output_embeddings()


def token_statistics(
    decoder: nn.Module,
    head: nn.Module,
    batch: SequenceBatch,
    temperature: float,
    chunk_tokens: int = 1024,
    with_entropy: bool = True,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per response token: log π(token) and entropy (fp64), and the row each token belongs to.

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
        logits = filter_logits(logits, top_k, top_p)
        logp_all = torch.log_softmax(logits, dim=-1)
        tgt = targets[start : start + chunk_tokens, None]
        logps.append(logp_all.gather(-1, tgt).squeeze(-1))
        if with_entropy:
            p = logp_all.exp()
            # Σ p·log p with 0·(−inf) := 0 for truncated (top-k / top-p) entries.
            plogp = torch.where(p > 0, p * logp_all, torch.zeros_like(p))
            entropies.append(-plogp.sum(-1))
    logp = torch.cat(logps)
    entropy = torch.cat(entropies) if with_entropy else None
    return logp, entropy, rows


def sequence_sums(
    decoder: nn.Module,
    head: nn.Module,
    batch: SequenceBatch,
    temperature: float,
    chunk_tokens: int = 1024,
    top_k: int = 0,
    top_p: float = 1.0,
) -> SequenceSums:
    logp, entropy, rows = token_statistics(
        decoder, head, batch, temperature, chunk_tokens, True, top_k, top_p
    )
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
        top_k: int = 0,
        top_p: float = 1.0,
    ) -> None:
        super().__init__()
        self.lm = causal_lm
        self.temperature = temperature
        self.chunk_tokens = chunk_tokens
        self.max_rows = max_rows
        self.top_k = top_k
        self.top_p = top_p

    def forward(self, batch: SequenceBatch) -> SequenceSums:
        decoder, head = decoder_and_head(self.lm)
        n = len(batch)
        parts: list[tuple[torch.Tensor, SequenceSums]] = []
        for rows in batch.length_sorted_chunks(self.max_rows):
            sums = sequence_sums(
                decoder,
                head,
                batch.select(rows),
                self.temperature,
                self.chunk_tokens,
                self.top_k,
                self.top_p,
            )
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
        was_training = self.lm.training
        self.lm.eval()
        try:
            conditional, policy, ess = readings(self.global_sums(batch), reference_logprob)
        finally:
            self.lm.train(was_training)
        return EntropyReadings(float(conditional), float(policy), float(ess))
