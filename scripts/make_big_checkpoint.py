#!/usr/bin/env python
"""Build a checkpoint with a real model's shapes and random weights, in the RL_Practice layout.

For GPU checks on a machine without downloads (scripts/gpu_check.sh). The default preset has
Qwen2.5-1.5B's shapes (hidden 1536, 28 layers, 12 query / 2 key-value heads, intermediate
8960, vocabulary 151,936, tied embeddings) with random weights, a LoRA adapter (r = 64 on
q/k/v/o/gate/up/down) and an AdamW state from a few real AdamW steps; ``smoke`` is the same
with tiny shapes, for a CPU run of the whole check.

How it is made, so that its numbers are not degenerate: random weights; a short
supervised warm start on the arithmetic task (answer tokens and <eos>, bf16 autocast on
CUDA), enough to emit short numbers so that some rollouts earn a reward and the RL
gradient is not zero (with no reward at all, v would be AdamW's momentum alone and every
repeat of a sweep the same); then LoRA and a few real Dr-GRPO AdamW steps, as
``entropy_lab.tiny`` takes them. The tokenizer is entropy_lab's character tokenizer: its
ids are the first of the model's vocabulary; ids it does not know decode to nothing.
Timings and memory are those of a real checkpoint of this size; the entropies are not.

Layout, as ``entropy_lab.tiny`` writes it::

    base_model/   Qwen2ForCausalLM (saved in bf16, as Qwen2.5 ships) + tokenizer
    model/        PEFT adapter (adapter_config.json points at ../base_model) + tokenizer
    optimizer.pt  AdamW over all policy parameters (RL_Practice), state for the LoRA ones
    optimizer_param_names.json, scheduler.pt, training_info.json, config.yaml

Usage: python scripts/make_big_checkpoint.py DIR [--preset qwen2.5-1.5b|smoke] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from entropy_lab.tasks import ArithmeticTask
from entropy_lab.tiny import (
    LORA_TARGETS,
    TINY_TRAINING_CONFIG,
    _answer_batch,
    build_tokenizer,
    lora_config,
    save_rl_practice,
)

PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b": {
        "hidden_size": 1536,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "intermediate_size": 8960,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "lora_r": 64,
        "max_new_tokens": 16,
        # A 256-wide, 6-layer proxy with this vocabulary emits numbers after 60 steps at
        # 1e-3 (loss 12 → 1.4) and not at 1e-4 (12 → 7); 1536 wide learns faster per step.
        "sft_steps": 100,
        "sft_lr": 5e-4,
    },
    "smoke": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 160,
        "vocab_size": 1024,
        "max_position_embeddings": 256,
        "lora_r": 4,
        "max_new_tokens": 4,
        "sft_steps": 150,
        "sft_lr": 3e-3,
    },
}
SHAPE_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)


def model_config(spec: dict[str, Any]):
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=spec["vocab_size"],
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        tie_word_embeddings=True,  # as Qwen2.5-1.5B
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=1,  # the character tokenizer's <eos>
        pad_token_id=0,
    )
    config._attn_implementation = "eager"
    return config


def training_config(spec: dict[str, Any]) -> dict[str, Any]:
    """RL_Practice-style config; small rollouts so a GPU check stays within minutes."""
    r = spec["lora_r"]
    return {
        **TINY_TRAINING_CONFIG,
        "lr": 1e-6,
        "num_generations": 4,
        "max_new_tokens": spec["max_new_tokens"],
        "lora": {"r": r, "alpha": 2 * r, "dropout": 0.05, "target_modules": LORA_TARGETS},
    }


def build_random_checkpoint(
    out_dir: str | Path,
    preset: str = "qwen2.5-1.5b",
    *,
    device: str = "cpu",
    rl_steps: int = 3,
    seed: int = 0,
    **overrides: Any,
) -> dict[str, Any]:
    """Write the checkpoint to ``out_dir``; returns what was built and what it cost."""
    from peft import get_peft_model
    from transformers import Qwen2ForCausalLM

    started = time.perf_counter()
    spec = {**PRESETS[preset], **overrides}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    task = ArithmeticTask()
    with torch.device(device):  # random init on the device: seconds, not minutes, at 1.5B
        base = Qwen2ForCausalLM(model_config(spec))
    sft = warm_start(base, tokenizer, task, spec["sft_steps"], spec["sft_lr"], seed)
    # Saved in bf16, as Qwen2.5 ships; the RL steps run on exactly the saved values.
    base.to(torch.bfloat16).save_pretrained(out / "base_model", safe_serialization=True)
    base.to(torch.float32)
    tokenizer.save_pretrained(out / "base_model")

    cfg = training_config(spec)
    torch.manual_seed(seed + 1)
    policy = get_peft_model(base, lora_config(cfg["lora"]))
    # RL_Practice hands *all* policy parameters to AdamW; frozen ones never get state.
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg["lr"], weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    rl = rl_steps_(policy, optimizer, scheduler, tokenizer, task, cfg, rl_steps, seed)

    save_rl_practice(out, policy, tokenizer, optimizer, scheduler, cfg)
    info = {
        "step": rl_steps,
        "seed": seed,
        "preset": preset,
        "shapes": {k: spec[k] for k in SHAPE_KEYS},
        "lora_r": spec["lora_r"],
        "weights": "random init, short SFT warm start on arithmetic, LoRA + Dr-GRPO AdamW steps",
        **sft,
        **rl,
        "trainable_parameters": sum(p.numel() for p in policy.parameters() if p.requires_grad),
        "total_parameters": sum(p.numel() for p in policy.parameters()),
    }
    (out / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return {
        **info,
        "device": device,
        "seconds": time.perf_counter() - started,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
    }


def warm_start(
    model, tokenizer, task: ArithmeticTask, steps: int, lr: float, seed: int, batch: int = 128
):
    """Supervised steps on answer tokens (+ <eos>), so that rollouts can earn rewards."""
    device = next(model.parameters()).device
    ids, attn, target = (t.to(device) for t in _answer_batch(task.problems, tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warmup))
    generator = torch.Generator().manual_seed(seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    losses, tokens, started = [], 0, time.perf_counter()
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, len(task.problems), (batch,), generator=generator).to(device)
        with autocast:
            logits = model(input_ids=ids[rows], attention_mask=attn[rows]).logits[:, :-1]
        mask = target[rows, 1:].bool()
        loss = torch.nn.functional.cross_entropy(logits[mask].float(), ids[rows, 1:][mask])
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens += int(attn[rows].sum())
    model.eval()
    model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    return {
        "sft_steps": steps,
        "sft_loss_first_last": [losses[0], losses[-1]] if losses else None,
        "sft_tokens_per_s": tokens / seconds if steps else None,
    }


def rl_steps_(policy, optimizer, scheduler, tokenizer, task, cfg, steps: int, seed: int):
    """Real Dr-GRPO steps (entropy_lab's rollouts and gradient): a genuine AdamW state."""
    from entropy_lab.tiny import dr_grpo_steps

    started = time.perf_counter()
    rewards_per_step, tokens = dr_grpo_steps(
        policy, optimizer, scheduler, tokenizer, task, cfg, steps, seed
    )
    seconds = time.perf_counter() - started
    return {
        "rl_mean_reward_per_step": rewards_per_step,
        "rl_tokens_per_s": tokens / seconds if steps else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--preset", default="qwen2.5-1.5b", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rl-steps", type=int, default=3, help="Dr-GRPO AdamW steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the build summary to this file")
    args = parser.parse_args(argv)
    info = build_random_checkpoint(
        args.out_dir, args.preset, device=args.device, rl_steps=args.rl_steps, seed=args.seed
    )
    text = json.dumps(info, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
