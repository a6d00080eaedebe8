"""A real TRL GRPOTrainer run of the tiny base on CPU (LoRA, arithmetic prompts, an exact-sum
reward): the fixture the TRL checkpoint and track tests share."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

REWARD_CODE = '''
def exact(completions, answer, **kwargs):
    """1 for the exact sum (what the tiny base was trained to write)."""
    return [float(c.strip() == str(a)) for c, a in zip(completions, answer)]
'''


# The tracked run (tests/test_track.py, benchmarks/track_cost.py): a checkpoint every step and
# a linear-decay schedule, so every step has its own lr.
TRACKED_RUN = {
    "save_steps": 1,
    "lr_scheduler_type": "linear",
    "max_completion_length": 4,
    "num_generations": 4,
    "temperature": 0.9,
    "loss_type": "dr_grpo",
    "scale_rewards": "group",
    "beta": 0.0,
}


def train_trl(tiny_checkpoint: Path, root: Path, **config: Any) -> Path:
    """``root`` gets prompts.jsonl, rewards.py (``exact``) and run/checkpoint-N from a
    GRPOTrainer given a peft_config; ``config`` are GRPOConfig fields (steps, schedule,
    trainer setup) over the common ones."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(1)
    (root / "rewards.py").write_text(REWARD_CODE)
    records = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(6)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = importlib.util.spec_from_file_location(f"rewards_{root.name}", root / "rewards.py")
    rewards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rewards)  # the same function the sweep imports from the file
    base = tiny_checkpoint / "base_model"
    args = GRPOConfig(
        output_dir=str(root / "run"),
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=0,
        disable_tqdm=True,
        logging_steps=1,
        **config,
    )
    GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(base),
        reward_funcs=rewards.exact,
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=AutoTokenizer.from_pretrained(base),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    ).train()
    return root
