"""Reverse mode through the head a token chunk at a time (``entropy.ResponseStates``): ∇H
(theory.entropy_gradient) and the RL loss's gradient (update.PolicyUpdate) equal, within
1e-12 relative in fp64, the same objectives differentiated in one backward over every
token's logits (the code before the chunking, kept here as the reference), on the tiny
checkpoint and on a random Qwen2 whose vocabulary spans several chunks; with the tied
head trainable too (its gradient then comes from the chunks and from the embedding)."""

from __future__ import annotations

import math

import pytest
import torch

from entropy_lab import entropy
from entropy_lab.entropy import EntropyScorer, TokenChunk, decoder_and_head, readings
from entropy_lab.modes import eval_mode
from entropy_lab.rollout import SequenceBatch
from entropy_lab.theory import entropy_gradient
from entropy_lab.update import (
    LOSS_TYPES,
    Objective,
    PolicyUpdate,
    UpdateBatch,
    chunk_loss,
    group_advantages,
)

pytestmark = pytest.mark.cpu

RTOL = 1e-12
CHUNK = 7  # response tokens per logits chunk: several per row chunk on both models
G = 3


def _relative(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    num = math.sqrt(sum(float(((got[n].double() - want[n].double()) ** 2).sum()) for n in want))
    return num / math.sqrt(sum(float((g.double() ** 2).sum()) for g in want.values()))


def _tiny(tiny_checkpoint):
    """The tiny base in faithful fp64 with a trained-looking LoRA (B ≠ 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from entropy_lab.precision import make_faithful

    base = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint / "base_model", dtype=torch.float64, attn_implementation="eager"
    )
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    make_faithful(model)
    return model.eval()


def _proxy():
    """A random Qwen2 (V = 3,000, 28 tokens' logits per 8 MiB block: CHUNK bounds the chunk)."""
    from entropy_lab.proxy import build_proxy

    return build_proxy(3000, 64, 2, "fp64", rank=4, faithful=True)


def _batch(vocab: int, rows: int = 2 * G) -> SequenceBatch:
    """Rows of different lengths (right-padded), prompts of 4 tokens, G rows per prompt."""
    gen = torch.Generator().manual_seed(11)
    width = 20
    ids = torch.randint(2, vocab, (rows, width), generator=gen)
    attention, response = torch.zeros_like(ids), torch.zeros_like(ids)
    for r in range(rows):
        n = width - 3 * (r % 3)
        attention[r, :n] = 1
        response[r, 4:n] = 1
    return SequenceBatch(ids * attention, attention, response, torch.arange(rows) // G)


@pytest.fixture(scope="module", params=["tiny", "proxy"])
def model_and_batch(request, tiny_checkpoint):
    model = _tiny(tiny_checkpoint) if request.param == "tiny" else _proxy()
    vocab = int(model.get_input_embeddings().weight.shape[0])
    return model, _batch(vocab)


@pytest.fixture(params=[False, True], ids=["lora", "lora+tied-head"])
def trainable_head(request, model_and_batch):
    """The tied embedding / head trainable too (a full fine-tune's head), or LoRA alone."""
    model, _ = model_and_batch
    weight = model.get_input_embeddings().weight
    weight.requires_grad_(request.param)
    yield request.param
    weight.requires_grad_(False)


# -- ∇H -----------------------------------------------------------------------------------


def _one_backward_entropy_gradient(scorer, batch, params, baseline, reading):
    """theory.entropy_gradient before the token chunks: every token's logits kept until one
    backward per row chunk."""
    tokens = float(batch.response_mask[:, 1:].sum())
    grads = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    decoder, head = decoder_and_head(scorer.lm)
    with eval_mode(scorer.lm):
        for rows in batch.length_sorted_chunks(scorer.max_rows):
            sums = entropy.sequence_sums(
                decoder, head, batch.select(rows), scorer.temperature, scorer.chunk_tokens
            )
            objective = sums.entropy.sum()
            if reading == "policy":
                weight = (sums.entropy - baseline * sums.tokens).detach()
                objective = objective + (weight * sums.logprob).sum()
            found = torch.autograd.grad(
                objective / tokens, list(params.values()), allow_unused=True
            )
            for name, g in zip(params, found):
                if g is not None:
                    grads[name] += g.double()
    return grads


def _entropy_gradients(model, batch, reading):
    scorer = EntropyScorer(model, 0.8, CHUNK, max_rows=4)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad(), eval_mode(model):
        sums = scorer(batch)
    _, policy, _ = readings(sums, sums.logprob)
    got = entropy_gradient(scorer, batch, params, float(policy), reading)
    want = _one_backward_entropy_gradient(scorer, batch, params, float(policy), reading)
    return got, want


@pytest.mark.parametrize("reading", ["conditional", "policy"])
def test_entropy_gradient_equals_one_backward(model_and_batch, trainable_head, reading):
    model, batch = model_and_batch
    got, want = _entropy_gradients(model, batch, reading)
    if trainable_head:
        assert float(want["base_model.model.model.embed_tokens.weight"].abs().max()) > 0
    assert _relative(got, want) <= RTOL


def test_a_lost_token_chunk_is_caught(model_and_batch, monkeypatch):
    """Planted: the last token chunk of each row chunk skipped in the backward."""
    model, batch = model_and_batch
    spans = entropy.ResponseStates.spans
    monkeypatch.setattr(entropy.ResponseStates, "spans", lambda self: spans(self)[:-1])
    got, want = _entropy_gradients(model, batch, "conditional")
    assert _relative(got, want) > 1e-3


# -- the RL loss ----------------------------------------------------------------------------


def _one_backward_gradient(updater: PolicyUpdate, update: UpdateBatch, norm) -> dict:
    """The loss of each micro-batch over all its tokens at once, one ``backward`` each (the
    gradient pass before the token chunks)."""
    decoder, head = decoder_and_head(updater.model)
    for p in updater.params.values():
        p.grad = None
    offsets = torch.cumsum(update.sequences.response_mask[:, 1:].sum(1), 0).tolist()
    starts = [0, *offsets[:-1]]

    def tokens_of(values, rows):
        if values is None:
            return None
        return torch.cat([values[starts[i] : offsets[i]] for i in rows])

    for rows in updater._microbatches(update.sequences):
        micro = update.sequences.select(rows)
        logp, ent, token_rows = entropy.token_statistics(
            decoder, head, micro, updater.temperature, updater.chunk_tokens
        )
        whole = TokenChunk(logp, ent, token_rows, slice(None))
        old, ref = tokens_of(update.old_logprob, rows), tokens_of(update.ref_logprob, rows)
        adv = update.advantages[rows]
        chunk_loss(updater.objective, whole, micro, norm, adv, old, ref).backward()
    grads = {n: p.grad.clone() for n, p in updater.params.items() if p.grad is not None}
    for p in updater.params.values():
        p.grad = None
    return grads


def _update(model, batch: SequenceBatch, objective: Objective):
    """(chunked, one-backward) gradients of ``objective`` on ``batch``, off-policy (θ_old ≠ θ:
    the ratios move and some clip) with a KL reference."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    updater = PolicyUpdate(
        model,
        optimizer,
        temperature=0.8,
        microbatch_size=1,
        chunk_tokens=CHUNK,
        objective=objective,
    )
    rewards = torch.arange(len(batch), dtype=torch.float64) % 2
    update = UpdateBatch(
        batch, rewards, group_advantages(rewards, batch.prompt_index, "group"), G, 16
    )
    logp = updater.token_logprobs(batch)
    gen = torch.Generator().manual_seed(5)
    update.old_logprob = logp + 0.3 * torch.randn(logp.shape, generator=gen, dtype=logp.dtype)
    update.ref_logprob = logp - 0.2 * torch.rand(logp.shape, generator=gen, dtype=logp.dtype)
    norm = updater.normalisers(update)
    got, _, _ = updater.local_gradient(update, norm)
    return got, _one_backward_gradient(updater, update, norm)


OBJECTIVES = {
    "dr_grpo_rl_practice+kl+entropy": Objective(
        "dr_grpo_rl_practice", kl_beta=0.04, kl_bias_correction=True, entropy_coef=0.01
    ),
    "grpo+kl": Objective("grpo", kl_beta=0.04),
    "bnpo+entropy": Objective("bnpo", entropy_coef=0.01),
}


@pytest.mark.parametrize("objective", OBJECTIVES.values(), ids=OBJECTIVES.keys())
def test_loss_gradient_equals_one_backward(model_and_batch, trainable_head, objective):
    model, batch = model_and_batch
    got, want = _update(model, batch, objective)
    assert _relative(got, want) <= RTOL


def test_a_chunk_local_normaliser_is_caught(model_and_batch, monkeypatch):
    """Planted: bnpo dividing by the chunk's own token count (not the micro-batch's): the
    per-token terms no longer add up to the micro-batch's loss."""
    model, batch = model_and_batch

    def chunk_mean(token_loss, rows, micro, norm):
        return token_loss.sum() / token_loss.numel() / norm.microbatches

    monkeypatch.setitem(LOSS_TYPES, "bnpo", chunk_mean)
    got, want = _update(model, batch, Objective("bnpo"))
    assert _relative(got, want) > 1e-3
