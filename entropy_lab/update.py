"""The RL update: Dr-GRPO gradient on an update batch, then a real AdamW step at lr = η.

The gradient does not depend on η, so it is computed once per repeat; each η then restores
θ₀ and the optimizer state S₀, sets lr to exactly η *after* ``load_state_dict`` (which would
otherwise restore the saved lr) and calls ``optimizer.step()``.
For one AdamW step Δθ = η·v exactly, with v fixed by (g, S₀); v is computed by the same torch
AdamW running at lr = 1 on an fp64 copy, so it carries no rounding of the runtime dtype.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from entropy_lab import distributed
from entropy_lab.entropy import decoder_and_head, token_statistics
from entropy_lab.rollout import SequenceBatch


@dataclass
class UpdateBatch:
    """U_r: sequences, their rewards and group advantages, and θ₀'s token log-probs."""

    sequences: SequenceBatch
    rewards: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N]
    num_generations: int
    max_new_tokens: int
    old_logprob: torch.Tensor | None = None  # per response token, at θ₀ (for steps > 1)
    # Over the whole U: data-parallel, this batch holds one rank's prompts only.
    mean_reward: float | None = None

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


def group_advantages(rewards: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
    """Dr-GRPO: reward minus the mean of its prompt's group (no std division)."""
    rewards = rewards.double()
    sums = torch.zeros(int(prompt_index.max()) + 1, dtype=torch.float64).index_add(
        0, prompt_index, rewards
    )
    counts = torch.bincount(prompt_index).double()
    return rewards - (sums / counts)[prompt_index]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


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
    ) -> None:
        self.model = causal_lm
        self.optimizer = optimizer
        self.params = trainable_parameters(causal_lm)
        if not self.params:
            raise ValueError("the policy has no trainable parameters")
        self.temperature = temperature
        self.clip_eps = clip_eps
        self.grad_clip = grad_clip
        self.microbatch_size = microbatch_size
        self.chunk_tokens = chunk_tokens
        self.theta0 = {n: p.detach().clone() for n, p in self.params.items()}
        self.state0 = copy.deepcopy(optimizer.state_dict())

    # -- gradient -----------------------------------------------------------------------
    def loss_on(self, micro: SequenceBatch, advantages: torch.Tensor, old_logprob, scale: float):
        decoder, head = decoder_and_head(self.model)
        logp, _, rows = token_statistics(
            decoder, head, micro, self.temperature, self.chunk_tokens, with_entropy=False
        )
        old = logp.detach() if old_logprob is None else old_logprob
        ratio = torch.exp(logp - old)  # = 1 on-policy; gradient = ∇log π
        adv = advantages[rows].to(logp.dtype)
        clipped = torch.clamp(ratio, 1 - self.clip_eps, 1 + self.clip_eps)
        token_loss = -torch.minimum(ratio * adv, clipped * adv)
        return token_loss.sum() * scale, logp.detach(), adv

    @torch.no_grad()
    def token_logprobs(self, seqs: SequenceBatch) -> torch.Tensor:
        """θ's log-prob of every response token, flat in row-major order."""
        decoder, head = decoder_and_head(self.model)
        device = next(iter(self.params.values())).device
        logp, _, _ = token_statistics(
            decoder, head, seqs.to(device), self.temperature, self.chunk_tokens, False
        )
        return logp

    def gradient(self, update: UpdateBatch) -> Gradient:
        """∇ of the Dr-GRPO loss over the whole buffer, micro-batched, then clipped.

        Data-parallel: ``update`` holds this rank's prompts (whole groups); the loss keeps the
        global normalisation and the per-rank gradients are summed before clipping.
        """
        local_prompts = len(torch.unique(update.sequences.prompt_index))
        num_prompts = round(distributed.sum_over_ranks(local_prompts))
        grads, loss, tokens = self.local_gradient(update, num_prompts)
        # DDP semantics: gradients are synchronised once, after the last micro-batch (DDP's
        # no_sync() on the others). A manual all-reduce (sum) of the accumulated gradients is
        # the same operation; the 1/num_prompts of the loss is already global, so no averaging.
        for name in sorted(grads):  # the same order on every rank
            distributed.all_reduce_sum_(grads[name])
        gradient = self._clipped(grads, distributed.sum_over_ranks(loss))
        gradient.token_logprob, gradient.token_advantage = tokens
        return gradient

    def local_gradient(
        self, update: UpdateBatch, num_prompts: int
    ) -> tuple[dict[str, torch.Tensor], float, tuple[torch.Tensor, torch.Tensor]]:
        """Accumulated gradient of this process's prompts, normalised by ``num_prompts``,
        its loss, and the (log-prob, advantage) of every response token the loss saw.

        Per prompt: sum over generations and tokens / (G · L_max); mean over all
        ``num_prompts`` prompts of the buffer (every rank's).
        """
        seqs = update.sequences
        device = next(iter(self.params.values())).device
        prompts = torch.unique(seqs.prompt_index).tolist()
        scale = 1.0 / (update.num_generations * update.max_new_tokens * num_prompts)
        for p in self.params.values():
            p.grad = None
        was_training = self.model.training
        self.model.eval()  # no dropout (LoRA dropout included): the gradient is deterministic
        total = 0.0
        logps, advs = [], []
        token_offsets = _token_offsets(seqs)
        try:
            for start in range(0, len(prompts), self.microbatch_size):
                group = set(prompts[start : start + self.microbatch_size])
                rows = [i for i, q in enumerate(seqs.prompt_index.tolist()) if q in group]
                micro = seqs.select(rows).to(device)
                old = None
                if update.old_logprob is not None:
                    old = torch.cat([update.old_logprob[token_offsets[i]] for i in rows]).to(device)
                adv = update.advantages[rows].to(device)
                loss, logp, token_adv = self.loss_on(micro, adv, old, scale)
                loss.backward()
                total += float(loss.detach())
                logps.append(logp)
                advs.append(token_adv)
        finally:
            self.model.train(was_training)
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
        self.restore()
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
    def quantized_fraction(self, update_vector: dict[str, torch.Tensor]) -> float:
        """Fraction of entries with v ≠ 0 that the current (stepped) θ left equal to θ₀."""
        moved = unchanged = 0
        for n, p in self.params.items():
            nonzero = update_vector[n] != 0
            moved += int(nonzero.sum())
            unchanged += int(((p == self.theta0[n]) & nonzero).sum())
        return unchanged / moved if moved else 1.0

    @torch.no_grad()
    def rounding_effect(
        self,
        eta: float,
        update_vector: dict[str, torch.Tensor],
        entropy_grad: dict[str, torch.Tensor],
    ) -> float:
        """∇H·(θ − θ₀ − η·v) in fp64 at the current (stepped) θ: the first-order effect on ΔH
        of storing θ₀ + η·v in the runtime dtype (0 when nothing is rounded)."""
        total = torch.zeros((), dtype=torch.float64)
        for n, p in self.params.items():
            offset = p.double() - self.theta0[n].double() - eta * update_vector[n]
            total += (entropy_grad[n] * offset).sum().cpu()
        return float(total)

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
