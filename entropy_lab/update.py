"""The RL update: the trainer's own loss on an update batch, then a real AdamW step at lr = η.

The gradient does not depend on η, so it is computed once per repeat; each η then restores
θ₀ and the optimizer state S₀, sets lr to exactly η *after* ``load_state_dict`` (which would
otherwise restore the saved lr) and calls ``optimizer.step()``.
For one AdamW step Δθ = η·v exactly, with v fixed by (g, S₀); v is computed by the same torch
AdamW running at lr = 1 on an fp64 copy, so it carries no rounding of the runtime dtype.

The loss (DESIGN §7): advantages A = r − group mean, optionally ÷ (std + 1e-4) of the group or
the batch (``scale_rewards``); token loss −min(ρA, clip(ρ, 1 − ε, 1 + ε_high)·A) + β·k3 KL to
the reference; aggregated by ``loss_type`` (one small function each below); minus
``entropy_coef`` × the token-mean entropy of each micro-batch. Every normaliser is global: it
counts the rows, prompts, tokens and micro-batches of the whole update batch over all ranks.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from entropy_lab import distributed
from entropy_lab.entropy import ResponseStates, TokenChunk, decoder_and_head, token_statistics
from entropy_lab.modes import trainer_mode
from entropy_lab.rollout import SequenceBatch

SCALE_REWARDS = ("none", "group", "batch")
STD_EPS = 1e-4  # TRL's: A / (std + 1e-4)


@dataclass(frozen=True)
class GroupCounts:
    """Prompts drawn for U, groups kept, groups the trainer's filters dropped."""

    drawn: int = 0
    kept: int = 0
    dropped: int = 0


@dataclass
class UpdateBatch:
    """U_r: sequences, their rewards and group advantages, and θ₀'s token log-probs."""

    sequences: SequenceBatch
    rewards: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N]
    num_generations: int
    max_new_tokens: int  # = TRL's max_completion_length: the dr_grpo constant
    old_logprob: torch.Tensor | None = None  # per response token, at θ₀ (for steps > 1)
    # Over the whole U: data-parallel, this batch holds one rank's prompts only.
    mean_reward: float | None = None
    ref_logprob: torch.Tensor | None = None  # per response token, the reference (kl_beta > 0)
    dropout_seed: int | None = None  # the loss's dropout masks (gradient_mode "train")
    groups: GroupCounts | None = None  # the trainer's group filters on U

    def __post_init__(self) -> None:
        if self.mean_reward is None:
            self.mean_reward = float(self.rewards.double().mean())


@dataclass
class Gradient:
    grads: dict[str, torch.Tensor]
    loss: float
    grad_norm: float  # before clipping
    clipped: bool
    # This process's sampled response tokens, as the loss saw them: log π(token) at the
    # parameters of the gradient, and the token's advantage (any order, for statistics).
    token_logprob: torch.Tensor | None = None
    token_advantage: torch.Tensor | None = None

    def zero(self) -> Gradient:
        """No RL signal: what AdamW's step is from its state alone (momentum, decay)."""
        return Gradient({n: torch.zeros_like(g) for n, g in self.grads.items()}, 0.0, 0.0, False)


def group_advantages(
    rewards: torch.Tensor, prompt_index: torch.Tensor, scale_rewards: str = "none"
) -> torch.Tensor:
    """Reward minus the mean of its prompt's group; ``scale_rewards`` ``group`` / ``batch``
    divides by (std + 1e-4) of the group / of the whole batch, the std with Bessel's correction
    (TRL's ``nanstd``). Data-parallel, ``batch`` takes the std over every rank's rewards."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    rewards = rewards.double()
    groups = int(prompt_index.max()) + 1
    counts = torch.bincount(prompt_index, minlength=groups).double()
    sums = torch.zeros(groups, dtype=torch.float64).index_add(0, prompt_index, rewards)
    centred = rewards - (sums / counts)[prompt_index]
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        squares = torch.zeros(groups, dtype=torch.float64).index_add(0, prompt_index, centred**2)
        std = torch.sqrt(squares / (counts - 1))[prompt_index]  # G = 1: NaN, as TRL
    else:
        n = distributed.sum_over_ranks(len(rewards))
        mean = distributed.sum_over_ranks(float(rewards.sum())) / n
        squares = distributed.sum_over_ranks(float(((rewards - mean) ** 2).sum()))
        std = torch.full_like(rewards, math.sqrt(squares / (n - 1)) if n > 1 else math.nan)
    return torch.nan_to_num(centred / (std + STD_EPS), nan=0.0)


@dataclass(frozen=True)
class Objective:
    """The trainer's loss: what it aggregates and which terms it adds (DESIGN §7)."""

    loss_type: str = "dr_grpo"
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # None: = clip_eps (symmetric clipping)
    kl_beta: float = 0.0
    kl_bias_correction: bool = False  # TRL's use_bias_correction_kl: k3 · ρ (∇ gains k3·∇log π)
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"loss_type must be one of {tuple(LOSS_TYPES)}, got {self.loss_type!r}"
            )

    @property
    def upper_clip(self) -> float:
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high


@dataclass(frozen=True)
class Normalisers:
    """Counts over the whole update batch (every rank's share): the losses divide by these."""

    rows: int  # sequences
    prompts: int
    tokens: int  # response tokens
    microbatches: int
    num_generations: int  # G
    max_completion_length: int  # dr_grpo's L (the sampling cap, max_new_tokens)


def _row_lengths(micro: SequenceBatch) -> torch.Tensor:
    return micro.response_mask[:, 1:].sum(1)


def _micro_tokens(micro: SequenceBatch) -> int:
    """The micro-batch's response tokens (at least 1): a token mean's divisor."""
    return max(int(_row_lengths(micro).sum()), 1)


# Each aggregation takes the per-token losses of a chunk of a micro-batch's response tokens
# (the whole micro-batch, or one token chunk of it: ``chunk_loss``) with each token's row in
# the micro-batch; their sum over the chunks is the micro-batch's share of the loss.


def dr_grpo_loss(token_loss, rows, micro, norm: Normalisers) -> torch.Tensor:
    """TRL's Dr-GRPO: the sum over every token ÷ (rows · max_completion_length)."""
    return token_loss.sum() / (norm.rows * norm.max_completion_length)


def dr_grpo_rl_practice_loss(token_loss, rows, micro, norm: Normalisers) -> torch.Tensor:
    """RL_Practice's Dr-GRPO: each prompt's sum over its G responses and their tokens ÷
    (G · the longest response of that group), then the mean over prompts."""
    lengths = _row_lengths(micro).double()
    index = micro.prompt_index
    longest = torch.zeros(int(index.max()) + 1, dtype=torch.float64, device=lengths.device)
    longest = longest.scatter_reduce(0, index, lengths, reduce="amax")
    divisor = (norm.num_generations * longest[index]).clamp(min=1.0)
    return (token_loss / divisor[rows].to(token_loss)).sum() / norm.prompts


def grpo_loss(token_loss, rows, micro, norm: Normalisers) -> torch.Tensor:
    """GRPO: the token mean of each sequence, then the mean over sequences."""
    lengths = _row_lengths(micro).clamp(min=1).to(token_loss)
    return (token_loss / lengths[rows]).sum() / norm.rows


def dapo_loss(token_loss, rows, micro, norm: Normalisers) -> torch.Tensor:
    """DAPO (TRL's default): the sum ÷ the active tokens of the whole accumulated batch."""
    return token_loss.sum() / max(norm.tokens, 1)


def bnpo_loss(token_loss, rows, micro, norm: Normalisers) -> torch.Tensor:
    """BNPO: the sum ÷ the active tokens of this micro-batch, averaged over micro-batches (as
    TRL divides each micro-batch's loss by the accumulation steps)."""
    return token_loss.sum() / _micro_tokens(micro) / norm.microbatches


LOSS_TYPES: dict[str, Callable[..., torch.Tensor]] = {
    "dr_grpo": dr_grpo_loss,
    "dr_grpo_rl_practice": dr_grpo_rl_practice_loss,
    "grpo": grpo_loss,
    "dapo": dapo_loss,
    "bnpo": bnpo_loss,
}


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π‖π_ref): exp(r) − r − 1 with r = log π_ref − log π."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def chunk_loss(
    objective: Objective,
    chunk: TokenChunk,
    micro: SequenceBatch,
    norm: Normalisers,
    advantages: torch.Tensor,
    old_logprob: torch.Tensor | None,
    ref_logprob: torch.Tensor | None,
) -> torch.Tensor:
    """One token chunk's share of a micro-batch's loss: every term is per token, and every
    normaliser comes from the micro-batch or the whole update batch, not from the chunk."""
    logp = chunk.logp
    old = logp.detach() if old_logprob is None else old_logprob[chunk.span]
    ratio = torch.exp(logp - old)  # = 1 on-policy; gradient = ∇log π
    adv = advantages[chunk.rows].to(logp.dtype)
    clipped = torch.clamp(ratio, 1 - objective.clip_eps, 1 + objective.upper_clip)
    token_loss = -torch.minimum(ratio * adv, clipped * adv)
    if objective.kl_beta != 0.0:
        kl = k3_kl(logp, ref_logprob[chunk.span].to(logp))
        if objective.kl_bias_correction:
            kl = kl * ratio
        token_loss = token_loss + objective.kl_beta * kl
    loss = LOSS_TYPES[objective.loss_type](token_loss, chunk.rows, micro, norm)
    if objective.entropy_coef != 0.0:  # TRL: the token mean of each micro-batch, ÷ accumulation
        bonus = chunk.entropy.sum() / _micro_tokens(micro) / norm.microbatches
        loss = loss - objective.entropy_coef * bonus
    return loss


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# Entries per group in PolicyUpdate.rounding: 2^25 fp64 values are 256 MiB per temporary.
ROUNDING_GROUP_ELEMENTS = 2**25


class PolicyUpdate:
    """Owns θ₀ and S₀ for one checkpoint; applies real AdamW steps from them."""

    def __init__(
        self,
        causal_lm: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        temperature: float,
        clip_eps: float = 0.2,
        grad_clip: float = 0.0,
        microbatch_size: int = 4,
        chunk_tokens: int = 1024,
        objective: Objective | None = None,
        gradient_mode: str = "eval",
    ) -> None:
        self.model = causal_lm
        self.gradient_mode = gradient_mode  # the trainer's mode in its loss's backward pass
        self.optimizer = optimizer
        self.params = trainable_parameters(causal_lm)
        if not self.params:
            raise ValueError("the policy has no trainable parameters")
        self.temperature = temperature
        self.objective = objective or Objective(clip_eps=clip_eps)
        self.clip_eps = self.objective.clip_eps
        self.grad_clip = grad_clip
        self.microbatch_size = microbatch_size
        self.chunk_tokens = chunk_tokens
        self.theta0 = {n: p.detach().clone() for n, p in self.params.items()}
        self._stepped = True  # whether θ may have left θ₀ since the last restore()
        self.state0 = copy.deepcopy(optimizer.state_dict())

    # -- gradient -----------------------------------------------------------------------
    def backward_on(
        self,
        micro: SequenceBatch,
        advantages: torch.Tensor,
        old_logprob,
        norm: Normalisers,
        ref_logprob: torch.Tensor | None = None,
    ):
        """This micro-batch's share of the loss (already globally normalised), added into the
        parameters' ``.grad`` a token chunk of the head at a time (``entropy.ResponseStates``:
        the loss is a sum of per-token terms whose normalisers are fixed by the batch); the
        loss, θ's token log-probs and the tokens' advantages."""
        if self.objective.kl_beta != 0.0 and ref_logprob is None:
            raise ValueError("kl_beta > 0 needs the reference log-probs of the update batch")
        decoder, head = decoder_and_head(self.model)
        with_entropy = self.objective.entropy_coef != 0.0
        states = ResponseStates(decoder, head, micro, self.temperature, self.chunk_tokens)

        def objective(chunk: TokenChunk) -> torch.Tensor:
            return chunk_loss(
                self.objective, chunk, micro, norm, advantages, old_logprob, ref_logprob
            )

        done = states.backward(objective, list(self.params.values()), with_entropy, True)
        return float(done.value), done.logp, advantages[done.rows].to(done.logp.dtype)

    @torch.no_grad()
    def token_logprobs(self, seqs: SequenceBatch, model: nn.Module | None = None) -> torch.Tensor:
        """θ's (or ``model``'s) log-prob of every response token, flat in row-major order."""
        decoder, head = decoder_and_head(self.model if model is None else model)
        device = next(iter(self.params.values())).device
        logp, _, _ = token_statistics(
            decoder, head, seqs.to(device), self.temperature, self.chunk_tokens, False
        )
        return logp

    @torch.no_grad()
    def reference_logprobs(
        self,
        seqs: SequenceBatch,
        reference: nn.Module | None = None,
        reference_adapter: str | None = None,
    ) -> torch.Tensor:
        """The KL reference's log-prob of every response token: ``reference`` (a full
        fine-tune's reference model); for a LoRA policy, the starting adapter in
        ``reference_adapter`` (TRL handed a PeftModel keeps a frozen copy of it), else the
        same model with its adapter disabled (TRL handed a peft_config). No second model in
        memory: the starting adapter's weights are swapped in and θ restored after."""
        if reference is not None:
            return self.token_logprobs(seqs, reference)
        if not hasattr(self.model, "disable_adapter"):
            raise ValueError("kl_beta > 0 on a full fine-tune needs a reference model")
        if reference_adapter is None:
            with self.model.disable_adapter():
                return self.token_logprobs(seqs)
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        current = {n: p.detach().clone() for n, p in self.params.items()}
        try:
            set_peft_model_state_dict(self.model, load_peft_weights(reference_adapter, "cpu"))
            return self.token_logprobs(seqs)
        finally:
            with torch.no_grad():
                for name, value in current.items():
                    self.params[name].copy_(value)

    def _microbatches(self, seqs: SequenceBatch) -> list[list[int]]:
        """Rows of each micro-batch: ``microbatch_size`` whole prompt groups at a time."""
        prompts = torch.unique(seqs.prompt_index).tolist()
        index = seqs.prompt_index.tolist()
        out = []
        for start in range(0, len(prompts), self.microbatch_size):
            group = set(prompts[start : start + self.microbatch_size])
            out.append([i for i, q in enumerate(index) if q in group])
        return out

    def normalisers(self, update: UpdateBatch) -> Normalisers:
        """The loss's counts over the whole update batch (summed over data-parallel ranks)."""
        seqs = update.sequences
        counts = [
            len(seqs),
            len(torch.unique(seqs.prompt_index)),
            int(seqs.response_mask[:, 1:].sum()),
            len(self._microbatches(seqs)),
        ]
        rows, prompts, tokens, micro = (round(distributed.sum_over_ranks(c)) for c in counts)
        if tokens == 0:  # the loss's token means would be 0/0
            seqs.require_response_tokens("the update batch")
        return Normalisers(
            rows, prompts, tokens, micro, update.num_generations, update.max_new_tokens
        )

    def gradient(self, update: UpdateBatch) -> Gradient:
        """∇ of the trainer's loss over the whole buffer, micro-batched, then clipped.

        Data-parallel: ``update`` holds this rank's prompts (whole groups); the loss keeps the
        global normalisation and the per-rank gradients are summed before clipping.
        """
        grads, loss, tokens = self.local_gradient(update, self.normalisers(update))
        # DDP semantics: gradients are synchronised once, after the last micro-batch (DDP's
        # no_sync() on the others). A manual all-reduce (sum) of the accumulated gradients is
        # the same operation; the loss's normalisers are already global, so no averaging.
        for name in sorted(grads):  # the same order on every rank
            distributed.all_reduce_sum_(grads[name])
        gradient = self._clipped(grads, distributed.sum_over_ranks(loss))
        gradient.token_logprob, gradient.token_advantage = tokens
        return gradient

    def local_gradient(
        self, update: UpdateBatch, norm: Normalisers
    ) -> tuple[dict[str, torch.Tensor], float, tuple[torch.Tensor, torch.Tensor]]:
        """Accumulated gradient of this process's prompts under the global normalisers
        ``norm``, its loss, and the (log-prob, advantage) of every response token it saw."""
        seqs = update.sequences
        device = next(iter(self.params.values())).device
        for p in self.params.values():
            p.grad = None
        total = 0.0
        logps, advs = [], []
        token_offsets = _token_offsets(seqs)

        def tokens_of(values: torch.Tensor | None, rows: list[int]) -> torch.Tensor | None:
            if values is None:
                return None
            return torch.cat([values[token_offsets[i]] for i in rows]).to(device)

        # In the trainer's mode: eval (no dropout), or train with dropout seeded per repeat
        # (and per rank, as each DDP process draws its own masks).
        seed = None if update.dropout_seed is None else update.dropout_seed + distributed.rank()
        with trainer_mode(self.model, self.gradient_mode, seed):
            for rows in self._microbatches(seqs):
                micro = seqs.select(rows).to(device)
                adv = update.advantages[rows].to(device)
                loss, logp, token_adv = self.backward_on(
                    micro,
                    adv,
                    tokens_of(update.old_logprob, rows),
                    norm,
                    tokens_of(update.ref_logprob, rows),
                )
                total += loss
                logps.append(logp)
                advs.append(token_adv)
        grads = {n: p.grad.detach().clone() for n, p in self.params.items() if p.grad is not None}
        for n in self.params:  # e.g. lora_A while lora_B == 0: a genuine zero gradient
            if n not in grads:
                grads[n] = torch.zeros_like(self.params[n])
        for p in self.params.values():
            p.grad = None
        return grads, total, (torch.cat(logps), torch.cat(advs))

    def _clipped(self, grads: dict[str, torch.Tensor], loss: float) -> Gradient:
        """Clip on the (global) norm, as ``torch.nn.utils.clip_grad_norm_`` does."""
        norm = float(
            torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads.values()]))
        )
        if not math.isfinite(loss) or not math.isfinite(norm):
            raise FloatingPointError(f"non-finite loss ({loss}) or gradient norm ({norm})")
        clipped = False
        if self.grad_clip and norm > self.grad_clip:
            factor = self.grad_clip / (norm + 1e-6)  # clip_grad_norm_'s rule
            grads = {n: g * factor for n, g in grads.items()}
            clipped = True
        return Gradient(grads, loss, norm, clipped)

    # -- steps --------------------------------------------------------------------------
    @torch.no_grad()
    def restore(self) -> None:
        """θ ← θ₀, optimizer state ← S₀."""
        for n, p in self.params.items():
            p.copy_(self.theta0[n])
            p.grad = None
        if not self._copy_state_in_place():
            self.optimizer.load_state_dict(copy.deepcopy(self.state0))
        self._stepped = False

    @torch.no_grad()
    def _copy_state_in_place(self) -> bool:
        """S₀ copied into the live state tensors: what ``load_state_dict(deepcopy(S₀))`` does,
        without re-allocating every moment tensor per η. False (nothing touched) when the
        live state does not have S₀'s exact structure, e.g. before the first step."""
        live = self.optimizer.state
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        saved = self.state0["state"]
        if len(saved) != len(live) or len(self.state0["param_groups"]) != len(
            self.optimizer.param_groups
        ):
            return False
        pairs = []
        for index, entries in saved.items():
            current = live.get(params[index]) if index < len(params) else None
            if current is None or current.keys() != entries.keys():
                return False
            for key, value in entries.items():
                if not (
                    isinstance(value, torch.Tensor)
                    and isinstance(current[key], torch.Tensor)
                    and value.shape == current[key].shape
                ):
                    return False
                pairs.append((current[key], value))
        for target, value in pairs:
            target.copy_(value)
        for group, saved_group in zip(self.optimizer.param_groups, self.state0["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        return True

    def _set_lr(self, optimizer: torch.optim.Optimizer, lr: float) -> None:
        for group in optimizer.param_groups:  # after load_state_dict, never before
            group["lr"] = lr

    def step(self, eta: float, gradient: Gradient) -> None:
        """From (θ₀, S₀): one real AdamW step at lr = η with the given gradient."""
        if self._stepped:  # else θ is at θ₀ already
            self.restore()
        self._stepped = True
        self._set_lr(self.optimizer, eta)
        for n, p in self.params.items():
            p.grad = gradient.grads[n].to(p.dtype)
        self.optimizer.step()
        for p in self.params.values():
            p.grad = None

    def steps(self, eta: float, gradient: Gradient, update: UpdateBatch, k: int) -> None:
        """k real steps; each after the first recomputes the clipped-ratio gradient on U."""
        self.step(eta, gradient)
        for _ in range(k - 1):
            g = self.gradient(update)
            self._set_lr(self.optimizer, eta)
            for n, p in self.params.items():
                p.grad = g.grads[n].to(p.dtype)
            self.optimizer.step()
            for p in self.params.values():
                p.grad = None

    def update_vector(self, gradient: Gradient) -> dict[str, torch.Tensor]:
        """v = (θ₁ − θ₀)/η in fp64, from the same AdamW at lr = 1 on an fp64 copy."""
        names = list(self.params)
        shadow = {n: self.theta0[n].to(torch.float64).clone() for n in names}
        position = {id(p): n for n, p in self.params.items()}
        groups = []
        for group in self.optimizer.param_groups:
            hyper = {k: v for k, v in group.items() if k != "params"}
            hyper.update(foreach=False, fused=None, capturable=False, differentiable=False)
            groups.append({**hyper, "params": [shadow[position[id(p)]] for p in group["params"]]})
        shadow_opt = type(self.optimizer)(groups)
        shadow_opt.load_state_dict(copy.deepcopy(self.state0))
        self._set_lr(shadow_opt, 1.0)
        for n in names:
            shadow[n].grad = gradient.grads[n].to(torch.float64)
        shadow_opt.step()
        return {n: (shadow[n].detach() - self.theta0[n].to(torch.float64)) for n in names}

    @torch.no_grad()
    def rounding(
        self,
        eta: float,
        update_vector: dict[str, torch.Tensor],
        entropy_grad: dict[str, torch.Tensor] | None = None,
    ) -> tuple[float, float | None]:
        """What storing θ₀ + η·v in the runtime dtype did, at the current (stepped) θ:

        - the fraction of entries with v ≠ 0 that θ left equal to θ₀ (rounded away);
        - with ``entropy_grad``, ∇H·(θ − θ₀ − η·v) in fp64: the first-order effect of that
          rounding on ΔH (0 when nothing is rounded).
        One pass over the parameters, one device sync.
        """
        totals = []  # per group of parameters: [moved, unchanged, effect]
        for names in self._groups_of(ROUNDING_GROUP_ELEMENTS):

            def flat(tensors, names=names) -> torch.Tensor:
                return torch.cat([tensors[n].detach().reshape(-1) for n in names])

            offset = flat(self.params).double() - flat(self.theta0).double()  # exact in fp64
            v = flat(update_vector)
            nonzero = v != 0
            effect = torch.zeros((), dtype=torch.float64, device=v.device)
            if entropy_grad is not None:
                effect = torch.dot(flat(entropy_grad), offset - eta * v)
            totals.append(torch.stack([nonzero.sum(), ((offset == 0) & nonzero).sum(), effect]))
        moved, unchanged, effect = torch.stack(totals).sum(0).tolist()  # the one sync
        fraction = unchanged / moved if moved else 1.0
        return fraction, effect if entropy_grad is not None else None

    def _groups_of(self, elements: int) -> Iterator[list[str]]:
        """The parameter names in consecutive groups of about ``elements`` entries (a full
        fine-tune's fp64 temporaries stay bounded; a LoRA adapter is one group)."""
        group, size = [], 0
        for name, p in self.params.items():
            group.append(name)
            size += p.numel()
            if size >= elements:
                yield group
                group, size = [], 0
        if group:
            yield group

    def update_norm(self, update_vector: dict[str, torch.Tensor]) -> float:
        return float(torch.sqrt(sum((v**2).sum() for v in update_vector.values())))


def _token_offsets(seqs: SequenceBatch) -> list[torch.Tensor]:
    """For each row, the indices of its response tokens in the flat token order."""
    counts = seqs.response_mask[:, 1:].sum(1).tolist()
    offsets, start = [], 0
    for c in counts:
        offsets.append(torch.arange(start, start + c))
        start += c
    return offsets
