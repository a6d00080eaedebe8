"""Checkpoint loading: formats, optimizer-state mapping, clear errors, fp64.

Every optimizer check compares the loaded AdamW moments against the tensors in the saved
``optimizer.pt``, mapped by a ground truth that does not come from the loader (the names file
written at save time, or the parameter order of the optimizer that wrote the state).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
import yaml

from entropy_lab.checkpoint import load_checkpoint, resolve_base_model, resolve_layout
from entropy_lab.errors import CheckpointError
from entropy_lab.precision import FAITHFUL_ATTENTION

pytestmark = pytest.mark.cpu


# ----------------------------------------------------------------------------- helpers


def _saved_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _saved_ids(saved: dict) -> list[int]:
    return [i for g in saved["param_groups"] for i in g["params"]]


def _state_by_name(saved: dict, names: list[str]) -> dict[str, dict]:
    """Saved AdamW state keyed by parameter name: position k of the groups is names[k]."""
    ids = _saved_ids(saved)
    assert len(ids) == len(names)
    return {n: saved["state"][i] for n, i in zip(names, ids) if saved["state"].get(i)}


def _decay_by_name(saved: dict, names: list[str]) -> dict[str, float]:
    out, k = {}, 0
    for group in saved["param_groups"]:
        for _ in group["params"]:
            out[names[k]] = group["weight_decay"]
            k += 1
    return out


def _assert_moments_equal(ck, expected: dict[str, dict], decay: dict[str, float] | None = None):
    """The loaded optimizer covers exactly the trainable params, with the saved moments."""
    params = dict(ck.policy.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert set(expected) == trainable, "saved state must cover exactly the trainable params"
    in_optimizer = [p for g in ck.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in in_optimizer} == {id(params[n]) for n in trainable}
    assert len(in_optimizer) == len(trainable)
    group_of = {id(p): g for g in ck.optimizer.param_groups for p in g["params"]}
    for name, saved in expected.items():
        p = params[name]
        got = ck.optimizer.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            assert got[key].dtype == p.dtype, f"{name}.{key} not cast to the param dtype"
            assert got[key].shape == p.shape
            want = saved[key].to(got[key].dtype)
            assert torch.equal(got[key], want), f"{name}.{key} differs from the saved moment"
        assert float(got["step"]) == float(saved["step"]), name
        if decay is not None:
            assert group_of[id(p)]["weight_decay"] == decay[name], name


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _tiny_names(tiny: Path) -> list[str]:
    return json.loads((tiny / "optimizer_param_names.json").read_text())


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def tiny_expected(tiny_checkpoint):
    saved = _saved_state(tiny_checkpoint / "optimizer.pt")
    names = _tiny_names(tiny_checkpoint)
    return _state_by_name(saved, names), _decay_by_name(saved, names)


# ----------------------------------------------------------------------------- 1. build


# The real builder, with the recipe shortened (SFT and RL steps): a full second build cost
# ~37 s of CPU. The cached checkpoint is the full build (CI builds it in the session).
SHORT_RECIPE = {"sft_steps": 20, "rl_steps": 2}


@pytest.mark.slow
def test_tiny_build_is_deterministic(tmp_path):
    """Two independent builds are byte-identical (the digest hashes every file: one byte
    changed anywhere changes it)."""
    from entropy_lab.tiny import build_tiny_checkpoint, directory_digest

    torch.set_num_threads(1)
    info_a = build_tiny_checkpoint(tmp_path / "a", **SHORT_RECIPE)
    info_b = build_tiny_checkpoint(tmp_path / "b", **SHORT_RECIPE)
    assert info_a["digest"] == info_b["digest"] == directory_digest(tmp_path / "b")
    weights = tmp_path / "b" / "model" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # planted: one bit of the last adapter weight
    weights.write_bytes(bytes(data))
    assert directory_digest(tmp_path / "b") != info_a["digest"]
    config = json.loads((tmp_path / "a" / "model" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(config["target_modules"])  # not a set's order


def test_tiny_build_learned_and_saved_a_real_optimizer_state(tiny_checkpoint):
    """The full build (the cached one): it learned the task and its AdamW state is genuine."""
    info = json.loads((tiny_checkpoint / "training_info.json").read_text())
    assert info["rl_greedy_accuracy"] > 0.4  # it learned the task (chance is ≈ 0.02)
    saved = _saved_state(tiny_checkpoint / "optimizer.pt")
    names = _tiny_names(tiny_checkpoint)
    assert len(_saved_ids(saved)) == len(names)  # AdamW over all policy params
    assert all(g["weight_decay"] > 0 for g in saved["param_groups"])
    assert saved["state"], "no optimizer state saved"
    with_state = _state_by_name(saved, names)
    assert all("lora_" in n for n in with_state)  # frozen params never get state
    for name, st in with_state.items():
        assert float(st["step"]) > 1, name
        assert st["exp_avg"].abs().sum() > 0, name
        assert st["exp_avg_sq"].abs().sum() > 0, name


# ----------------------------------------------------------------------------- 2-4. rl_practice


def test_round_trip_rl_practice(loaded, tiny_checkpoint, tiny_expected):
    from safetensors.torch import load_file

    assert loaded.metadata["format"] == "rl_practice"
    assert loaded.metadata["optimizer_mapping"] == "param_names"
    assert loaded.metadata["adapter"] is True
    assert loaded.metadata["base_model"] == str((tiny_checkpoint / "base_model").resolve())
    info = json.loads((tiny_checkpoint / "training_info.json").read_text())
    assert loaded.metadata["optimizer_step"] == info["step"]
    assert loaded.metadata["trainable_parameters"] == info["trainable_parameters"]
    assert loaded.metadata["total_parameters"] == info["total_parameters"]
    assert loaded.metadata["attention"] == "eager"

    adapter = load_file(str(tiny_checkpoint / "model" / "adapter_model.safetensors"))
    trainable = {
        n.replace(".default.", "."): p
        for n, p in loaded.policy.named_parameters()
        if p.requires_grad
    }
    assert set(trainable) == set(adapter)
    for name, tensor in adapter.items():
        assert torch.equal(trainable[name].detach(), tensor), name

    expected, decay = tiny_expected
    _assert_moments_equal(loaded, expected, decay)
    saved_group = _saved_state(tiny_checkpoint / "optimizer.pt")["param_groups"][0]
    for group in loaded.optimizer.param_groups:
        for key in ("lr", "betas", "eps", "weight_decay"):
            assert group[key] == saved_group[key], key
    assert loaded.tokenizer("12+3=", add_special_tokens=False)["input_ids"]
    assert loaded.training_config["lr"] == pytest.approx(3e-4)


def test_without_names_file_maps_positionally_over_all_params(
    tiny_checkpoint, tmp_path, tiny_expected, loaded
):
    ck_dir = _copy(tiny_checkpoint, tmp_path / "ck")
    (ck_dir / "optimizer_param_names.json").unlink()
    ck = load_checkpoint(ck_dir)
    assert ck.metadata["optimizer_mapping"] == "positional_full"
    assert ck.metadata["format"] == "rl_practice"
    _assert_moments_equal(ck, *tiny_expected)
    assert ck.metadata["digest"] != loaded.metadata["digest"]  # the names file is part of it


def test_state_over_trainable_params_only(tiny_checkpoint, tmp_path, tiny_expected, loaded):
    ck_dir = _copy(tiny_checkpoint, tmp_path / "ck")
    (ck_dir / "optimizer_param_names.json").unlink()
    trainable_only = loaded.optimizer.state_dict()
    n_trainable = sum(p.requires_grad for p in loaded.policy.parameters())
    assert len(_saved_ids(trainable_only)) == n_trainable < len(_tiny_names(tiny_checkpoint))
    torch.save(trainable_only, ck_dir / "optimizer.pt")

    ck = load_checkpoint(ck_dir)
    assert ck.metadata["optimizer_mapping"] == "positional_trainable"
    _assert_moments_equal(ck, *tiny_expected)

    # the rebuilt optimizer is usable: one more step advances every state's step count
    for p in ck.policy.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    before = ck.metadata["optimizer_step"]
    ck.optimizer.step()
    assert {float(s["step"]) for s in ck.optimizer.state.values()} == {before + 1.0}


# ----------------------------------------------------------------------------- 5. HF Trainer


class _ArithmeticDataset(torch.utils.data.Dataset):
    def __init__(self, tokenizer, width: int = 8):
        self.rows = []
        for a in range(4):
            for b in range(3):
                ids = tokenizer(f"{a}+{b}={a + b}", add_special_tokens=False)["input_ids"]
                ids = ids + [tokenizer.eos_token_id]
                pad = width - len(ids)
                self.rows.append(
                    {
                        "input_ids": torch.tensor(ids + [tokenizer.pad_token_id] * pad),
                        "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
                        "labels": torch.tensor(ids + [-100] * pad),
                    }
                )

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


@pytest.fixture(scope="module", params=["none", "lora_only"])
def trainer_run(request, tiny_checkpoint, tmp_path_factory):
    """A real transformers.Trainer run (2 steps, saved at step 2) of a LoRA on the tiny base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    torch.set_num_threads(1)
    torch.manual_seed(0)
    base_dir = tiny_checkpoint / "base_model"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            bias=request.param,
            task_type="CAUSAL_LM",
        ),
    )
    out = tmp_path_factory.mktemp(f"trainer-{request.param}")
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=2,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        weight_decay=0.01,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_ArithmeticDataset(tokenizer))
    trainer.train()
    name_of = {id(p): n for n, p in model.named_parameters()}
    saved_order = [name_of[id(p)] for g in trainer.optimizer.param_groups for p in g["params"]]
    final = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return request.param, out, saved_order, final


def test_hf_trainer_layout(trainer_run, tiny_checkpoint):
    bias, run_dir, saved_order, final = trainer_run
    step_dir = run_dir / "checkpoint-2"
    for f in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt"):
        assert (step_dir / f).is_file(), f
    assert (step_dir / "trainer_state.json").is_file()
    adapter_cfg = json.loads((step_dir / "adapter_config.json").read_text())
    assert Path(adapter_cfg["base_model_name_or_path"]) == tiny_checkpoint / "base_model"

    saved = _saved_state(step_dir / "optimizer.pt")
    decay = _decay_by_name(saved, saved_order)
    ck = load_checkpoint(run_dir)  # the run folder: the loader picks checkpoint-2
    assert ck.metadata["path"] == str(step_dir.resolve())
    assert ck.metadata["format"] == "hf_trainer"
    assert ck.metadata["optimizer_step"] == 2
    if bias == "none":
        # Only LoRA weights train: all land in the Trainer's decay group and its no-decay
        # group is empty, so the saved order *is* the trainable parameters' order and the
        # first candidate that fits, positional_trainable, is the right mapping.
        assert [len(g["params"]) for g in saved["param_groups"]] == [len(final), 0]
        assert ck.metadata["optimizer_mapping"] == "positional_trainable"
    else:
        # Trainable biases go to the no-decay group: the saved order (decay, then no-decay)
        # differs from named_parameters order, and only the decay-group mapping fits.
        assert set(decay.values()) == {0.01, 0.0}
        assert all(("bias" in n) == (decay[n] == 0.0) for n in decay)
        assert ck.metadata["optimizer_mapping"] == "trainer_decay_groups"
    _assert_moments_equal(ck, _state_by_name(saved, saved_order), decay)
    params = dict(ck.policy.named_parameters())
    for name, value in final.items():
        assert torch.equal(params[name].detach(), value), name


def test_latest_step_folder_is_numeric(tmp_path):
    for step in (2, 10, 9):
        d = tmp_path / f"step_{step}"
        (d / "model").mkdir(parents=True)
        (d / "model" / "adapter_config.json").write_text("{}")
        (d / "optimizer.pt").write_bytes(b"")
    layout = resolve_layout(tmp_path)
    assert layout.root == tmp_path / "step_10"
    assert layout.format == "rl_practice" and layout.is_adapter
    assert layout.param_names_path is None and layout.config_path is None


# ----------------------------------------------------------------------------- 6. full model


@pytest.fixture(scope="module")
def full_model_dir(tiny_checkpoint, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("full")
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint / "base_model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint / "base_model")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    batch = _ArithmeticDataset(tokenizer)
    ids = torch.stack([r["input_ids"] for r in batch.rows])
    mask = torch.stack([r["attention_mask"] for r in batch.rows])
    labels = torch.stack([r["labels"] for r in batch.rows])
    model.train()
    for _ in range(2):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    torch.save(optimizer.state_dict(), out / "optimizer.pt")
    names = [n for n, _ in model.named_parameters()]
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out, names, final


def test_full_model(full_model_dir):
    path, names, final = full_model_dir
    ck = load_checkpoint(path)
    assert ck.metadata["format"] == "full_model"
    assert ck.metadata["adapter"] is False and ck.metadata["base_model"] is None
    assert ck.metadata["optimizer_mapping"] == "positional_full"
    assert ck.metadata["trainable_parameters"] == ck.metadata["total_parameters"]
    assert all(p.requires_grad for p in ck.policy.parameters())
    saved = _saved_state(path / "optimizer.pt")
    expected = _state_by_name(saved, names)
    assert len(expected) == len(names)  # every parameter got a gradient and a state
    _assert_moments_equal(ck, expected, _decay_by_name(saved, names))
    params = dict(ck.policy.named_parameters())
    for name, value in final.items():
        assert torch.equal(params[name].detach(), value), name


def test_full_model_without_tokenizer_is_an_error(full_model_dir, tmp_path):
    src = full_model_dir[0]
    dst = tmp_path / "no_tok"
    dst.mkdir()
    for f in src.iterdir():
        if "tokenizer" not in f.name:
            shutil.copy(f, dst / f.name)
    with pytest.raises(CheckpointError, match=r"no tokenizer files in .*no_tok"):
        load_checkpoint(dst)


# ----------------------------------------------------------------------------- 7. errors


def _first_trainable_with_state(tiny: Path) -> tuple[str, int]:
    saved = _saved_state(tiny / "optimizer.pt")
    for name, saved_id in zip(_tiny_names(tiny), _saved_ids(saved)):
        if saved["state"].get(saved_id):
            return name, saved_id
    raise AssertionError("no state")


def test_wrong_shape_names_parameter_and_shapes(tiny_checkpoint, tmp_path, loaded):
    ck_dir = _copy(tiny_checkpoint, tmp_path / "ck")
    name, saved_id = _first_trainable_with_state(ck_dir)
    saved = _saved_state(ck_dir / "optimizer.pt")
    saved["state"][saved_id]["exp_avg"] = torch.zeros(3, 3)
    torch.save(saved, ck_dir / "optimizer.pt")
    shape = tuple(dict(loaded.policy.named_parameters())[name].shape)
    message = f"first mismatch at {name}: state exp_avg shape (3, 3) vs parameter {shape}"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(ck_dir)


def test_missing_state_for_a_trainable_parameter(tiny_checkpoint, tmp_path):
    ck_dir = _copy(tiny_checkpoint, tmp_path / "ck")
    name, saved_id = _first_trainable_with_state(ck_dir)
    saved = _saved_state(ck_dir / "optimizer.pt")
    del saved["state"][saved_id]
    torch.save(saved, ck_dir / "optimizer.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"{name} has no optimizer state")) as e:
        load_checkpoint(ck_dir)
    assert "does not match the trainable parameters" in str(e.value)
    assert "\n" not in str(e.value)


def test_not_an_optimizer_state_dict(tiny_checkpoint, tmp_path):
    ck_dir = _copy(tiny_checkpoint, tmp_path / "ck")
    torch.save({"weights": torch.zeros(2)}, ck_dir / "optimizer.pt")
    with pytest.raises(CheckpointError, match="is not an optimizer state_dict"):
        load_checkpoint(ck_dir)


def test_missing_optimizer(tiny_checkpoint, tmp_path):
    ck_dir = _copy(tiny_checkpoint, tmp_path / "ck")
    (ck_dir / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="no optimizer.pt in .*AdamW state"):
        load_checkpoint(ck_dir)


def test_missing_folder_and_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "file.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="checkpoint must be a folder"):
        load_checkpoint(tmp_path / "file.pt")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "optimizer.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"has neither model/ \(RL_Practice layout\)"):
        load_checkpoint(tmp_path / "bare")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_code_carrying_pickle_is_refused(tiny_checkpoint, tmp_path):
    ck_dir = _copy(tiny_checkpoint, tmp_path / "ck")
    marker = tmp_path / "marker"
    torch.save({"state": _Payload(marker), "param_groups": []}, ck_dir / "optimizer.pt")
    assert not marker.exists()  # saving does not run the payload
    with pytest.raises(CheckpointError, match=r"torch\.load\(weights_only=True\)"):
        load_checkpoint(ck_dir)
    assert not marker.exists()


def test_unfindable_base_model_asks_for_base_model(tiny_checkpoint, tmp_path):
    ck_dir = tmp_path / "ck"
    ck_dir.mkdir()
    shutil.copytree(tiny_checkpoint / "model", ck_dir / "model")  # ../base_model is not there
    for f in ("optimizer.pt", "optimizer_param_names.json"):
        shutil.copy(tiny_checkpoint / f, ck_dir / f)
    with pytest.raises(CheckpointError, match=r"cannot load the base model .*pass --base-model"):
        load_checkpoint(ck_dir)
    # the remedy the message names works
    ck = load_checkpoint(ck_dir, base_model=str(tiny_checkpoint / "base_model"))
    assert ck.metadata["optimizer_mapping"] == "param_names"

    cfg_path = ck_dir / "model" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = None
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"names no base model: pass --base-model DIR"):
        load_checkpoint(ck_dir)


def test_uncached_hub_base_model_fails_offline_without_hub_lookups(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """local_files_only must reach every lookup: transformers' adapter probe used to send
    HEAD requests for the base model id (23 s of retries when offline)."""
    import huggingface_hub.file_download as hf_download

    ck_dir = _copy(tiny_checkpoint, tmp_path / "ck")
    _set_backbone(ck_dir, "entropy-lab-test/no-such-model")
    lookups = []

    def no_network(*args, **kwargs):
        raise socket.gaierror("network disabled in this test")

    def record_lookup(*args, **kwargs):
        lookups.append(kwargs.get("url") or args[:1])
        raise OSError("hub lookup attempted")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(hf_download, "get_hf_file_metadata", record_lookup)
    with pytest.raises(CheckpointError, match=r"no-such-model.*offline.*pass --base-model"):
        load_checkpoint(ck_dir)
    assert lookups == [], "an offline load must not query the hub"


def _set_backbone(ck_dir: Path, name: str) -> None:
    """The trainer's config names the base (read before the adapter's path)."""
    cfg = yaml.safe_load((ck_dir / "config.yaml").read_text())
    cfg["backbone"] = name
    (ck_dir / "config.yaml").write_text(yaml.safe_dump(cfg))


def test_base_model_source_order(tiny_checkpoint, tmp_path):
    """DESIGN §6: --base-model; the trainer's backbone (training_info.json's model_config, then
    config.yaml); the adapter's base_model_name_or_path."""
    ck_dir = _copy(tiny_checkpoint, tmp_path / "ck")
    base = str((ck_dir / "base_model").resolve())
    layout = resolve_layout(ck_dir)
    assert resolve_base_model(layout, None) == (base, "config.yaml: backbone")
    assert resolve_base_model(layout, "x") == ("x", "--base-model")
    info = json.loads((ck_dir / "training_info.json").read_text())
    info["model_config"] = {"backbone": "org/trained-base"}
    (ck_dir / "training_info.json").write_text(json.dumps(info))
    assert resolve_base_model(resolve_layout(ck_dir), None) == (
        "org/trained-base",
        "training_info.json: model_config.backbone",
    )
    (ck_dir / "training_info.json").write_text("{}")
    (ck_dir / "config.yaml").write_text("lr: 1.0e-6\n")
    assert resolve_base_model(resolve_layout(ck_dir), None)[1] == (
        "adapter_config.json: base_model_name_or_path"
    )


# ----------------------------------------------------------------------------- 8. fp64


def test_fp64_load(tiny_checkpoint, tiny_expected):
    ck = load_checkpoint(tiny_checkpoint, dtype="fp64")
    assert ck.metadata["dtype"] == "fp64"
    assert ck.metadata["attention"] == FAITHFUL_ATTENTION == "entropy_lab_faithful"
    assert ck.policy.config._attn_implementation == FAITHFUL_ATTENTION
    assert all(p.dtype == torch.float64 for p in ck.policy.parameters())
    for state in ck.optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float64
        assert state["exp_avg_sq"].dtype == torch.float64
    _assert_moments_equal(ck, *tiny_expected)  # fp32 -> fp64 is exact
    ids = torch.tensor([ck.tokenizer("12+3=", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = ck.policy(input_ids=ids).logits
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()
