"""A real TRL ``GRPOTrainer`` run on the tiny base (CPU, LoRA, Dr-GRPO) writes checkpoint-N;
``entropy-lab sweep`` on it takes the trainer's setup from its training_args.bin and says so."""

from __future__ import annotations

import json
import re

import pytest

from entropy_lab.cli import main
from tests.trl_runs import train_trl

pytestmark = [pytest.mark.cpu, pytest.mark.xdist_group("trl_run")]  # one TRL run

TRAINER = {
    "max_completion_length": 4,
    "num_generations": 4,
    "temperature": 0.9,
    "loss_type": "dr_grpo",
    "scale_rewards": "group",
    "beta": 0.04,
}


@pytest.fixture(scope="module")
def trl_run(tiny_checkpoint, tmp_path_factory):
    root = train_trl(
        tiny_checkpoint, tmp_path_factory.mktemp("trl"), max_steps=2, save_steps=2, **TRAINER
    )
    return root / "run" / "checkpoint-2", root / "prompts.jsonl", f"{root / 'rewards.py'}:exact"


SWEEP = [
    "--learning-rates", "1e-6,1e-5", "--num-repeats", "2", "--eval-size", "8",
    "--buffer-size", "4", "--no-progress", "--threads", "1",
]  # fmt: skip


def test_sweep_takes_the_trainer_setup_from_training_args(trl_run, tmp_path, capsys):
    checkpoint, prompts, reward = trl_run
    assert (checkpoint / "training_args.bin").is_file()
    argv = ["sweep", "--checkpoint", str(checkpoint), "--prompts", str(prompts)]
    argv += ["--reward", reward, "--output-dir", str(tmp_path), *SWEEP]
    # β > 0 and nothing in the checkpoint says which model TRL held as the KL reference
    assert main(argv) == 2
    assert "no source for kl_reference (--kl-reference)" in capsys.readouterr().err
    argv += ["--kl-reference", "base"]  # the run handed GRPOTrainer a peft_config
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 3:
            rows[cells[0]] = (cells[1], cells[2])
    expected = {
        "max_new_tokens": ("4", "training_args.bin: max_completion_length"),
        "num_generations": ("4", "training_args.bin: num_generations"),
        "temperature": ("0.9", "training_args.bin: temperature"),
        "loss_type": ("dr_grpo", "training_args.bin: loss_type"),
        "scale_rewards": ("group", "training_args.bin: scale_rewards"),
        "kl_beta": ("0.04", "training_args.bin: beta"),
        "kl_reference": ("base", "--kl-reference"),
        "sampling_mode": (
            "train",
            "training_args.bin: disable_dropout False (TRL samples and takes its loss in train mode)",
        ),
        "top_k": ("0", "training_args.bin: top_k"),
        "prompts": (str(prompts), "--prompts"),
        "reward": (reward, "--reward"),
    }
    for name, row in expected.items():
        assert rows[name] == row, name
    (folder,) = tmp_path.glob("entropy_lr_experiment_*")
    meta = json.loads((folder / "run_meta.json").read_text())
    config = meta["config"]
    assert (config["max_new_tokens"], config["num_generations"]) == (4, 4)
    assert (config["loss_type"], config["scale_rewards"], config["kl_beta"]) == (
        "dr_grpo",
        "group",
        0.04,
    )
    assert config["temperature"] == pytest.approx(0.9)
    assert meta["setup_sources"]["loss_type"] == "training_args.bin: loss_type"
    records = json.loads((folder / "raw_results.json").read_text())
    assert all(r["success"] for r in records)


def test_trl_checkpoint_without_prompts_or_reward_is_an_error(trl_run, tmp_path, capsys):
    checkpoint, _, _ = trl_run
    argv = ["sweep", "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path), *SWEEP]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert re.fullmatch(
        r"entropy-lab: error: no source for kl_reference \(--kl-reference\), prompts "
        r"\(--prompts\), reward \(--reward\): .*",
        err[0],
    )
