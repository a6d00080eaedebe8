"""The trainer's loss (DESIGN §7): entropy_lab's gradient against TRL's ``GRPOTrainer``, the
RL_Practice Dr-GRPO formula against a hand computation, and global normalisation.

TRL's side runs TRL's own code from the prompts on: ``_generate_and_score_completions`` (with
only the sampler replaced by the fixed completions below) computes the rewards, advantages,
token mask, token count and, for β > 0, the reference log-probs with the adapter disabled;
``compute_loss`` then gives the loss whose gradient is compared. Both sides run on one fp64
model (faithful: no fp32 casts inside).

TRL's fused LM-head kernel (trl/kernels/chunked_logprob.py) accumulates the log-softmax in
fp32 even for an fp64 model, and TRL keeps rewards in fp32. The ≤ 1e-6 comparison therefore
swaps only that kernel for the exact fp64 log-softmax of the same logits (everything else,
the loss included, is TRL's); a second test runs TRL's kernel as it ships, within what fp32
log-probs allow.
"""

from __future__ import annotations

import math

import pytest
import torch

from entropy_lab.rollout import SequenceBatch
from entropy_lab.update import (
    LOSS_TYPES,
    Objective,
    PolicyUpdate,
    UpdateBatch,
    group_advantages,
)

pytestmark = pytest.mark.cpu

G = 4
MAX_COMPLETION = 4
PROMPTS = ["12+30=", "21+17=", "15+14="]  # equal token lengths: TRL left-pads prompts
# Completion token texts per row (prompt-major, G per prompt): lengths 1–4, EOS or truncated.
COMPLETIONS = [
    ["42<eos>", "4", "41<eos>", "4217"],
    ["38<eos>", "3<eos>", "<eos>", "38"],
    ["29<eos>", "2", "291<eos>", "9<eos>"],
]
REWARDS = [[1.0, 0.0, 0.0, 0.5], [1.0, 0.25, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]]
TEMPERATURE = 0.9


def _token_ids(tokenizer, text: str) -> list[int]:
    eos = "<eos>"
    ids = tokenizer(text.replace(eos, ""), add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if text.endswith(eos) else [])


@pytest.fixture
def tiny_lora(tiny_checkpoint):
    """A fresh tiny base in fp64 (PEFT wraps it in place), a LoRA config, the tokenizer."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from entropy_lab.precision import make_faithful

    base_dir = tiny_checkpoint / "base_model"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float64, attn_implementation="eager"
    )
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"]
    )
    return base, config, tokenizer, make_faithful


def _exact_logprobs(trainer):
    """TRL's ``_get_per_token_logps_and_entropies`` without the fp32 kernel: fp64 log-softmax
    of the model's own logits at the trainer's temperature."""

    def per_token(model, input_ids, attention_mask, logits_to_keep, compute_entropy=False, **_):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        logits = logits[:, -logits_to_keep - 1 : -1].double() / trainer.temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        targets = input_ids[:, -logits_to_keep:]
        logps = logp_all.gather(-1, targets[..., None]).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1) if compute_entropy else None
        return logps, entropy, None

    trainer._get_per_token_logps_and_entropies = per_token


def _trl_trainer(tiny_lora, tmp_path, loss_type, scale_rewards, beta, entropy_coef=0.0, exact=True):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    base, config, tokenizer, make_faithful = tiny_lora
    flat_rewards = [r for group in REWARDS for r in group]

    def fixed_reward(completions, **_):
        assert len(completions) == len(flat_rewards)
        return list(flat_rewards)

    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(PROMPTS) * G,
        num_generations=G,
        max_completion_length=MAX_COMPLETION,
        temperature=TEMPERATURE,
        loss_type=loss_type,
        scale_rewards=scale_rewards,
        beta=beta,
        entropy_coef=entropy_coef,
        use_cpu=True,
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        report_to=[],
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=base,
        reward_funcs=fixed_reward,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
        processing_class=tokenizer,
        peft_config=config,
    )
    model = trainer.model
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)  # an adapter that has trained: policy ≠ reference
    make_faithful(model)
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    if exact:
        _exact_logprobs(trainer)
    return trainer


def _fixed_completions(trainer, tokenizer):
    completion_ids = [_token_ids(tokenizer, c) for group in COMPLETIONS for c in group]

    def generate(prompt_ids, images, multimodal_fields, num_generations, **_):
        assert len(prompt_ids) == len(completion_ids)
        return [list(ids) for ids in completion_ids], None

    trainer._generate_single_turn = generate
    return completion_ids


def _trl_gradient(trainer, tokenizer):
    completion_ids = _fixed_completions(trainer, tokenizer)
    inputs = [{"prompt": p} for p in PROMPTS for _ in range(G)]
    batch = trainer._generate_and_score_completions(inputs)
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads, batch, completion_ids


def _sequence_batch(tokenizer, completion_ids) -> SequenceBatch:
    rows = []
    for i, completion in enumerate(completion_ids):
        prompt = tokenizer(PROMPTS[i // G], add_special_tokens=False)["input_ids"]
        rows.append((i // G, prompt, completion))
    width = max(len(p) + len(c) for _, p, c in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    response = torch.zeros_like(ids)
    for r, (_, p, c) in enumerate(rows):
        ids[r, : len(p) + len(c)] = torch.tensor(p + c)
        attention[r, : len(p) + len(c)] = 1
        response[r, len(p) : len(p) + len(c)] = 1
    index = torch.tensor([q for q, _, _ in rows])
    return SequenceBatch(ids, attention, response, index)


def _entropy_lab_gradient(model, seqs, objective, scale_rewards, microbatch_size=8):
    rewards = torch.tensor([r for group in REWARDS for r in group], dtype=torch.float64)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    updater = PolicyUpdate(
        model,
        optimizer,
        temperature=TEMPERATURE,
        microbatch_size=microbatch_size,
        objective=objective,
    )
    update = UpdateBatch(
        seqs,
        rewards,
        group_advantages(rewards, seqs.prompt_index, scale_rewards),
        G,
        MAX_COMPLETION,
    )
    if objective.kl_beta:
        update.ref_logprob = updater.reference_logprobs(seqs)
    grads, _, _ = updater.local_gradient(update, updater.normalisers(update))
    return grads, update


def _relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    num = math.sqrt(sum(float(((a[n] - b[n]) ** 2).sum()) for n in b))
    return num / math.sqrt(sum(float((g**2).sum()) for g in b.values()))


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("scale_rewards", ["none", "group"])
@pytest.mark.parametrize("loss_type", ["dr_grpo", "grpo", "dapo", "bnpo"])
def test_gradient_equals_trl_compute_loss(tiny_lora, tmp_path, loss_type, scale_rewards, beta):
    tokenizer = tiny_lora[2]
    trainer = _trl_trainer(tiny_lora, tmp_path, loss_type, scale_rewards, beta)
    expected, batch, completion_ids = _trl_gradient(trainer, tokenizer)
    assert batch["completion_mask"].sum(1).tolist() == [len(c) for c in completion_ids]
    objective = Objective(
        loss_type=loss_type,
        kl_beta=beta,
        kl_bias_correction=trainer.args.use_bias_correction_kl,
    )
    seqs = _sequence_batch(tokenizer, completion_ids)
    got, update = _entropy_lab_gradient(trainer.model, seqs, objective, scale_rewards)
    # The same advantages as TRL's (group mean, Bessel std + 1e-4)
    torch.testing.assert_close(
        update.advantages, batch["advantages"].double(), rtol=1e-6, atol=1e-6
    )
    rel = _relative(got, expected)
    print(f"{loss_type} scale_rewards={scale_rewards} beta={beta}: relative {rel:.2e}")
    assert rel <= 1e-6
    # Planted: the other loss types' aggregation is measurably different on this batch.
    for other in ("dr_grpo", "dapo", "grpo"):
        if other != loss_type and not (loss_type == "bnpo" and other == "dapo"):
            wrong, _ = _entropy_lab_gradient(
                trainer.model, seqs, Objective(other, kl_beta=beta), scale_rewards
            )
            assert _relative(wrong, expected) > 1e-3, other


def test_entropy_bonus_and_bias_free_kl_match_trl(tiny_lora, tmp_path):
    """entropy_coef (TRL: minus coef × the token-mean entropy) with the k3 KL of β > 0."""
    tokenizer = tiny_lora[2]
    trainer = _trl_trainer(tiny_lora, tmp_path, "dapo", "group", 0.04, entropy_coef=0.05)
    expected, _, completion_ids = _trl_gradient(trainer, tokenizer)
    seqs = _sequence_batch(tokenizer, completion_ids)
    objective = Objective("dapo", kl_beta=0.04, kl_bias_correction=True, entropy_coef=0.05)
    got, _ = _entropy_lab_gradient(trainer.model, seqs, objective, "group")
    assert _relative(got, expected) <= 1e-6
    planted, _ = _entropy_lab_gradient(
        trainer.model, seqs, Objective("dapo", kl_beta=0.04, kl_bias_correction=True), "group"
    )
    assert _relative(planted, expected) > 1e-4  # without the bonus: measurably different


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_gradient_near_trl_with_its_fp32_kernel(tiny_lora, tmp_path, beta):
    """TRL as it ships (fp32 log-softmax kernel): within fp32 rounding of the log-probs."""
    tokenizer = tiny_lora[2]
    trainer = _trl_trainer(tiny_lora, tmp_path, "dr_grpo", "group", beta, exact=False)
    expected, _, completion_ids = _trl_gradient(trainer, tokenizer)
    seqs = _sequence_batch(tokenizer, completion_ids)
    objective = Objective("dr_grpo", kl_beta=beta, kl_bias_correction=True)
    got, _ = _entropy_lab_gradient(trainer.model, seqs, objective, "group")
    rel = _relative(got, expected)
    print(f"TRL's fp32 kernel, beta={beta}: relative {rel:.2e}")
    assert rel <= (1e-6 if beta == 0 else 1e-4)


@pytest.fixture
def lora_policy(tiny_lora):
    """The tiny base with a trained-looking LoRA (non-zero B), in faithful fp64."""
    from peft import get_peft_model

    base, config, tokenizer, make_faithful = tiny_lora
    model = get_peft_model(base, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    make_faithful(model)
    model.eval()
    seqs = _sequence_batch(tokenizer, [_token_ids(tokenizer, c) for g in COMPLETIONS for c in g])
    return model, seqs


def test_rl_practice_dr_grpo_against_a_hand_computation(lora_policy, tiny_lora):
    """Each prompt's sum over its G responses and tokens ÷ (G · its longest response), mean
    over prompts; on-policy, so the loss is −Σ A_i·log π(seq_i) with those weights."""
    model, seqs = lora_policy
    got, update = _entropy_lab_gradient(model, seqs, Objective("dr_grpo_rl_practice"), "none")

    logits = model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask).logits
    logp_all = torch.log_softmax(logits[:, :-1].double() / TEMPERATURE, dim=-1)
    token_logp = logp_all.gather(-1, seqs.input_ids[:, 1:, None]).squeeze(-1)
    mask = seqs.response_mask[:, 1:].double()
    loss = 0.0
    for prompt, group in enumerate(COMPLETIONS):
        rewards = REWARDS[prompt]
        mean = sum(rewards) / len(rewards)
        longest = max(len(_token_ids(tiny_lora[2], c)) for c in group)
        for k in range(G):
            row = prompt * G + k
            sequence_logp = (token_logp[row] * mask[row]).sum()
            loss = loss - (rewards[k] - mean) * sequence_logp / (G * longest)
    loss = loss / len(COMPLETIONS)
    model.zero_grad(set_to_none=True)
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    assert _relative(got, expected) <= 1e-12
    # Planted: TRL's constant (÷ rows · max_completion_length) is another gradient here.
    trl_form, _ = _entropy_lab_gradient(model, seqs, Objective("dr_grpo"), "none")
    assert _relative(trl_form, expected) > 1e-2


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_micro_batching_keeps_the_global_normalisation(lora_policy, loss_type):
    """One micro-batch per prompt vs the whole batch at once: the same gradient, except for
    bnpo, whose normaliser is by definition the micro-batch's own token count."""
    model, seqs = lora_policy
    objective = Objective(loss_type, kl_beta=0.04, entropy_coef=0.01)
    whole, _ = _entropy_lab_gradient(model, seqs, objective, "group", microbatch_size=8)
    split, _ = _entropy_lab_gradient(model, seqs, objective, "group", microbatch_size=1)
    rel = _relative(split, whole)
    if loss_type == "bnpo":
        assert rel > 1e-3
    else:
        # (the entropy bonus is a per-micro-batch token mean, as TRL's: turned off here)
        plain = Objective(loss_type, kl_beta=0.04)
        whole, _ = _entropy_lab_gradient(model, seqs, plain, "group", microbatch_size=8)
        split, _ = _entropy_lab_gradient(model, seqs, plain, "group", microbatch_size=1)
        assert _relative(split, whole) <= 1e-12


def test_advantages_scale_by_the_bessel_std_plus_1e4():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    index = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    first = [1.0, 0.0, 0.0, 0.5]
    mean = sum(first) / 4
    std = math.sqrt(sum((r - mean) ** 2 for r in first) / 3)  # ddof = 1
    want_group = [(r - mean) / (std + 1e-4) for r in first] + [0.0] * 4
    torch.testing.assert_close(
        group_advantages(rewards, index, "group"), torch.tensor(want_group, dtype=torch.float64)
    )
    centred = [r - mean for r in first] + [0.0] * 4
    all_mean = float(rewards.mean())
    batch_std = math.sqrt(sum((float(r) - all_mean) ** 2 for r in rewards) / 7)
    torch.testing.assert_close(
        group_advantages(rewards, index, "batch"),
        torch.tensor([c / (batch_std + 1e-4) for c in centred], dtype=torch.float64),
    )
    torch.testing.assert_close(
        group_advantages(rewards, index), torch.tensor(centred, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rewards, index, "std")
