"""Rollouts: sample responses at θ₀ from the full tempered softmax, with a KV cache.

A hand-written loop instead of HF ``generate``: ``generate`` silently applies top_k = 50 and
whatever a model's generation_config.json asks for (top_p, repetition penalty), and the
scorer must use exactly the distribution that sampled. Batches come back right-padded
(prompt, response, pad), so a plain forward with default position ids scores them.

Tokens are drawn by inverse CDF (fp64) from uniforms pre-drawn per global row, not by one
generator shared by the batch: a row's tokens then do not depend on which other rows share
its batch, so data-parallel ranks that sample disjoint row subsets reproduce the
single-process batch (up to fp rounding of the logits, which changes no token in practice).
"""

from __future__ import annotations

import hashlib
import inspect
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from entropy_lab.errors import EntropyLabError, release_after_oom
from entropy_lab.modes import trainer_mode
from entropy_lab.tasks import Problem


@dataclass
class SequenceBatch:
    """Right-padded sequences; ``response_mask[t] = 1`` where token t is a response token.

    The entropy and log-prob of token t are taken from the logits at position t − 1.
    """

    input_ids: torch.Tensor  # [N, L] long
    attention_mask: torch.Tensor  # [N, L] long
    response_mask: torch.Tensor  # [N, L] long
    prompt_index: torch.Tensor  # [N] long: which prompt each sequence answers
    responses: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    def require_response_tokens(self, what: str) -> SequenceBatch:
        """This batch, or one line naming the problem if no token after a first position is
        a response token (e.g. every sequence is prompt only): there is nothing to score."""
        if not bool(self.response_mask[:, 1:].any()):
            raise EntropyLabError(
                f"{what} has no response tokens ({len(self)} sequences of "
                f"{self.input_ids.shape[1]} positions, all prompt or padding): nothing to score"
            )
        return self

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.response_mask.to(device),
            self.prompt_index.to(device),
            list(self.responses),
        )

    def select(self, rows: torch.Tensor | list[int]) -> SequenceBatch:
        """A sub-batch, trimmed of columns that are padding in every selected row."""
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        mask = self.attention_mask[rows_t]
        width = int(mask.sum(1).max()) if len(rows_t) else 0
        return SequenceBatch(
            self.input_ids[rows_t, :width],
            mask[:, :width],
            self.response_mask[rows_t, :width],
            self.prompt_index[rows_t],
            [self.responses[i] for i in rows_t.tolist()] if self.responses else [],
        )

    @classmethod
    def concat(cls, parts: list[SequenceBatch]) -> SequenceBatch:
        """Rows of ``parts`` in order, right-padded to the widest (as one batch packs them)."""
        width = max(p.input_ids.shape[1] for p in parts)

        def cat(name: str) -> torch.Tensor:
            tensors = [getattr(p, name) for p in parts]
            return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors])

        return cls(
            cat("input_ids"),
            cat("attention_mask"),
            cat("response_mask"),
            torch.cat([p.prompt_index for p in parts]),
            [text for p in parts for text in p.responses],
        )

    def length_sorted_chunks(self, max_rows: int) -> list[torch.Tensor]:
        """Row indices grouped by length, so each chunk carries little padding."""
        order = torch.argsort(self.attention_mask.sum(1), descending=True, stable=True)
        return list(order.split(max_rows))

    def to_dict(self) -> dict[str, list]:
        return {
            "input_ids": self.input_ids.tolist(),
            "attention_mask": self.attention_mask.tolist(),
            "response_mask": self.response_mask.tolist(),
            "prompt_index": self.prompt_index.tolist(),
            "responses": list(self.responses),
        }

    @classmethod
    def from_dict(cls, data: dict[str, list]) -> SequenceBatch:
        return cls(
            torch.tensor(data["input_ids"], dtype=torch.long),
            torch.tensor(data["attention_mask"], dtype=torch.long),
            torch.tensor(data["response_mask"], dtype=torch.long),
            torch.tensor(data["prompt_index"], dtype=torch.long),
            list(data.get("responses", [])),
        )


# Token ids of prompt texts per tokenizer object (while it lives): a track samples the same E
# prompts at every checkpoint with the one tokenizer its adapter swaps share, so each prompt
# is tokenized once per track. The text carries the chat template (applied when the task was
# loaded); the tokenizer's size is in the key so added tokens invalidate the entry.
_PROMPT_IDS: weakref.WeakKeyDictionary[object, dict[tuple[int, str], list[int]]] = (
    weakref.WeakKeyDictionary()
)


def prompt_token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Each text's token ids (no special tokens added), tokenized once per tokenizer; the
    lists are shared with later calls: read them, do not change them."""
    try:
        cache = _PROMPT_IDS.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: no cache
        cache = {}
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else -1
    out = []
    for text in texts:
        ids = cache.get((size, text))
        if ids is None:
            ids = cache[(size, text)] = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append(ids)
    return out


def _cache_kwarg(model: torch.nn.Module) -> str:
    # transformers 5 renamed past_key_values to cache.
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k / nucleus truncation (both off by default); the scorer must use the same."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def row_seed(seed: int, row: int) -> int:
    """A 63-bit seed for global row ``row`` of a batch sampled with ``seed``."""
    digest = hashlib.sha256(f"entropy_lab/row/{int(seed)}/{int(row)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def row_uniforms(seed: int, rows: Sequence[int], steps: int) -> torch.Tensor:
    """[len(rows), steps] fp64 uniforms in [0, 1): row r's stream depends on (seed, r) only."""
    out = torch.empty((len(rows), steps), dtype=torch.float64)
    for i, row in enumerate(rows):
        generator = torch.Generator().manual_seed(row_seed(seed, row))
        out[i] = torch.rand(steps, generator=generator, dtype=torch.float64)
    return out


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row: the first index whose cumulative probability exceeds u·total.

    ``right=True`` never picks a zero-probability (truncated) token; u·total rounding up to
    the total falls back to the last token with positive probability.
    """
    cdf = probs.cumsum(-1)
    target = uniforms[:, None].to(cdf) * cdf[:, -1:]
    token = torch.searchsorted(cdf, target, right=True).squeeze(1)
    vocab = probs.shape[-1]
    last_positive = vocab - 1 - torch.argmax((probs.flip(-1) > 0).to(torch.uint8), dim=-1)
    return torch.where(token >= vocab, last_positive, token)


@torch.no_grad()
def sample_responses(
    model: torch.nn.Module,
    tokenizer,
    problems: list[Problem],
    num_samples: int,
    *,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_rows: int = 256,
    rows: Sequence[int] | None = None,
    mode: str = "eval",
    stop_after: str | None = None,
) -> SequenceBatch:
    """``num_samples`` responses per problem; rows ordered problem-major.

    Global row r answers problem r // num_samples; ``mode`` is the model's mode while
    sampling (the trainer's); ``stop_after`` a text after whose tokens a response ends. Each row draws its tokens by inverse CDF
    from its own uniform stream (seeded by (seed, r)), so sampling a subset ``rows`` (one
    rank's shard) gives exactly the tokens those rows get in the full batch.
    """
    if hasattr(model, "get_base_model"):  # PEFT: LoRA layers live inside the base model
        model = model.get_base_model()
    device = next(model.parameters()).device
    prompt_ids = prompt_token_ids(tokenizer, [p.prompt for p in problems])
    if rows is None:
        rows = range(len(problems) * num_samples)
    rows = list(rows)
    uniforms = row_uniforms(seed, rows, max_new_tokens)
    eos_id = tokenizer.eos_token_id
    # RL_Practice's StopAfterAnswer: nothing is sampled after the tag's tokens.
    stop = prompt_token_ids(tokenizer, [stop_after])[0] if stop_after else []
    sequences: list[tuple[int, list[int], list[int]]] = []
    start = 0
    # The trainer's mode ("train": LoRA dropout in generate too, as TRL samples), dropout
    # seeded by ``seed``; the tokens' own draws come from the per-row uniforms either way.
    with trainer_mode(model, mode, seed):
        while start < len(rows):
            chunk = [row // num_samples for row in rows[start : start + batch_rows]]
            try:
                responses = _sample_chunk(
                    model,
                    [prompt_ids[i] for i in chunk],
                    eos_id,
                    temperature,
                    max_new_tokens,
                    top_k,
                    top_p,
                    uniforms[start : start + len(chunk)].to(device),
                    device,
                    stop,
                )
            except torch.OutOfMemoryError as exc:
                batch_rows = _fewer_rows(batch_rows, max_new_tokens, exc)
                continue  # the same rows again, fewer at a time: a row's tokens do not change
            sequences += [(i, prompt_ids[i], resp) for i, resp in zip(chunk, responses)]
            start += len(chunk)
    return _pack(sequences, tokenizer)


def _fewer_rows(batch_rows: int, max_new_tokens: int, exc: torch.OutOfMemoryError) -> int:
    """Half as many rows per generation batch after an out-of-memory error; at 1, an error.

    Rows draw from their own uniform streams, so the batch size changes no token. No
    collective runs while sampling, so a data-parallel rank may retry on its own.
    """
    first = release_after_oom(exc)
    if batch_rows <= 1:
        raise EntropyLabError(
            f"CUDA out of memory sampling responses even one row at a time ({first}): lower "
            f"max_new_tokens (now {max_new_tokens}) in --base-config, or use a GPU with more "
            "memory"
        ) from exc
    batch_rows //= 2
    warnings.warn(
        f"CUDA out of memory sampling responses: retrying with {batch_rows} rows per batch",
        RuntimeWarning,
        3,
    )
    return batch_rows


def _sample_chunk(
    model, prompts, eos_id, temperature, max_new_tokens, top_k, top_p, uniforms, device, stop=()
) -> list[list[int]]:
    pad_id = 0
    width = max(len(p) for p in prompts)
    # Left-pad prompts for generation; positions count real tokens only.
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, device=device)
        mask[row, width - len(p) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache_kw = _cache_kwarg(model)
    cache = None
    step_ids, step_pos = ids, positions
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    out = torch.full((len(prompts), max_new_tokens), -1, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        result = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=step_pos,
            use_cache=True,
            **{cache_kw: cache},
        )
        cache = getattr(result, cache_kw, None) or result.past_key_values
        logits = result.logits[:, -1, :].double() / temperature
        probs = torch.softmax(filter_logits(logits, top_k, top_p), dim=-1)
        token = inverse_cdf_sample(probs, uniforms[:, t])
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out[:, t] = torch.where(done, torch.full_like(token, -1), token)
        done = done | (token == eos_id)
        if stop and t + 1 >= len(stop):  # the trainer's stop sequence ends the response
            tail = out[:, t + 1 - len(stop) : t + 1]
            done = done | (tail == torch.tensor(stop, device=device)).all(-1)
        if bool(done.all()):
            break
        step_ids = token[:, None]
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return [[tok for tok in row if tok >= 0] for row in out.tolist()]


def _pack(sequences: list[tuple[int, list[int], list[int]]], tokenizer) -> SequenceBatch:
    width = max(len(p) + len(r) for _, p, r in sequences)
    n = len(sequences)
    input_ids = torch.zeros((n, width), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros_like(input_ids)
    for row, (_, prompt, response) in enumerate(sequences):
        total = len(prompt) + len(response)
        input_ids[row, :total] = torch.tensor(prompt + response)
        attention_mask[row, :total] = 1
        response_mask[row, len(prompt) : total] = 1
    texts = [tokenizer.decode(r, skip_special_tokens=True) for _, _, r in sequences]
    prompt_index = torch.tensor([i for i, _, _ in sequences], dtype=torch.long)
    return SequenceBatch(input_ids, attention_mask, response_mask, prompt_index, texts)
