"""scripts/gpu_check.sh and its helpers, on the CPU with tiny shapes (no GPU here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parents[1]
QWEN25_15B_PARAMETERS = 1_543_714_304  # Qwen/Qwen2.5-1.5B's published parameter count
LORA_R64_PARAMETERS = 28 * 64 * (2 * (1536 + 1536) + 2 * (1536 + 256) + 3 * (1536 + 8960))


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_preset_has_qwen25_15b_shapes():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    builder = _script("make_big_checkpoint")
    spec = builder.PRESETS["qwen2.5-1.5b"]
    with torch.device("meta"):  # shapes only, no memory
        model = Qwen2ForCausalLM(builder.model_config(spec))
    assert sum(p.numel() for p in model.parameters()) == QWEN25_15B_PARAMETERS
    lora = builder.training_config(spec)["lora"]
    policy = get_peft_model(
        model,
        LoraConfig(r=lora["r"], target_modules=lora["target_modules"], task_type="CAUSAL_LM"),
    )
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert trainable == LORA_R64_PARAMETERS
    # planted: untied embeddings (another model) would not have Qwen2.5-1.5B's count
    untied = builder.model_config(spec)
    untied.tie_word_embeddings = False
    with torch.device("meta"):
        assert sum(p.numel() for p in Qwen2ForCausalLM(untied).parameters()) != (
            QWEN25_15B_PARAMETERS
        )


def _adam_state_is_genuine(checkpoint, steps: int) -> bool:
    """Every trainable parameter has AdamW moments from ``steps`` real steps."""
    state = checkpoint.optimizer.state
    params = [p for p in checkpoint.policy.parameters() if p.requires_grad]
    return all(
        p in state and int(state[p]["step"]) == steps and bool((state[p]["exp_avg_sq"] > 0).any())
        for p in params
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    builder = _script("make_big_checkpoint")
    out = tmp_path_factory.mktemp("big") / "ckpt"
    info = builder.build_random_checkpoint(out, "smoke", rl_steps=2, sft_steps=40)
    return out, info


def test_builder_writes_a_loadable_rl_practice_checkpoint(built):
    from entropy_lab.checkpoint import load_checkpoint

    out, info = built
    for name in ("optimizer.pt", "optimizer_param_names.json", "scheduler.pt", "config.yaml"):
        assert (out / name).is_file(), name
    assert json.loads((out / "base_model" / "config.json").read_text())["dtype"] == "bfloat16"
    ck = load_checkpoint(out)
    assert ck.metadata["format"] == "rl_practice" and ck.metadata["adapter"]
    assert ck.metadata["optimizer_mapping"] == "param_names"
    assert ck.policy.config.vocab_size == 1024 and info["lora_r"] == 4
    assert ck.training_config["lora"]["r"] == 4
    assert _adam_state_is_genuine(ck, steps=2)
    assert not _adam_state_is_genuine(ck, steps=3)  # planted: not the steps that were taken
    assert ck.metadata["trainable_parameters"] == info["trainable_parameters"]
    assert info["sft_loss_first_last"][1] < info["sft_loss_first_last"][0]


def test_a_fresh_optimizer_is_not_a_genuine_state(tmp_path):
    from entropy_lab.checkpoint import load_checkpoint

    builder = _script("make_big_checkpoint")
    builder.build_random_checkpoint(tmp_path / "ckpt", "smoke", rl_steps=0, sft_steps=1)
    from entropy_lab.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(tmp_path / "ckpt")  # the loader refuses it too


def test_compare_runs_agrees_and_differs(tmp_path):
    compare = _script("compare_runs")

    def write(name: str, change: float, identity: float | None = -1.0) -> Path:
        folder = tmp_path / name / "entropy_lr_experiment_2026-01-01_00-00-00"
        folder.mkdir(parents=True)
        records = [
            {
                "learning_rate": eta,
                "repeat": r,
                "success": True,
                "entropy_change": change * eta,
                "first_order_prediction": -eta,
                "identity_slope": identity,
            }
            for eta in (1e-7, 1e-6)
            for r in (0, 1)
        ]
        (folder / "raw_results.json").write_text(json.dumps(records))
        return tmp_path / name

    one, same, off = write("one", -1.0), write("same", -1.0), write("off", -1.00001)
    assert compare.main([str(one), str(same), "--rtol", "1e-6"]) == 0
    assert compare.main([str(one), str(off), "--rtol", "1e-6"]) == 1  # planted: 1e-5 off
    identity_off = write("identity_off", -1.0, identity=-1.00001)
    assert compare.main([str(one), str(identity_off), "--rtol", "1e-6"]) == 1
    # runs without the identity check (null identity) compare on the other fields
    plain, plain_too = write("plain", -1.0, None), write("plain_too", -1.0, None)
    assert compare.main([str(plain), str(plain_too), "--rtol", "1e-6"]) == 0


def test_gpu_check_script_parses():
    result = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")])
    assert result.returncode == 0
