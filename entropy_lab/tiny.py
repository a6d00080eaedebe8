"""The built-in tiny checkpoint: a Qwen2-architecture model that really learned a task, with a
LoRA adapter and an AdamW state from genuine Dr-GRPO steps, saved in the RL_Practice layout.

Nothing is downloaded: the tokenizer is character-level and built here, the base model is
trained here on ``a+b=`` problems. Deterministic for a given seed.

Layout written to DIR::

    base_model/             Qwen2ForCausalLM + tokenizer (cannot be fetched from a hub)
    model/                  PEFT adapter (adapter_config.json points at ../base_model) + tokenizer
    optimizer.pt            AdamW over *all* policy parameters, as RL_Practice builds it
    optimizer_param_names.json
    scheduler.pt
    training_info.json
    config.yaml             the training config, RL_Practice key style
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from entropy_lab.tasks import ArithmeticTask

TINY_SEED = 1234
TINY_EVAL_SIZE = 256  # B_E on the tiny checkpoint (the cpu suite's and quick's)
# The spread fixture: the same checkpoint, with update batches of 8 prompts (× 8 responses)
# instead of 128, so that directions differ as on a real RL checkpoint. Measured (fp64,
# E = 256, seed 0): ∇H·v of repeats 0–4 = −3.29, −2.16, −2.83, −2.68, −3.21 (52 % between
# the extremes of the suite's three repeats; CV 16 %). With 128 prompts: −2.76 ± 3 %.
SPREAD_BUFFER_SIZE = 8
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

TINY_TRAINING_CONFIG: dict[str, Any] = {
    "backbone": "base_model",
    "lr": 3e-4,
    "weight_decay": 0.01,
    "buffer_size": 16,
    "microbatch_size": 4,
    "num_generations": 8,
    "rollout_batch_size": 16,
    "max_new_tokens": 4,
    "temperature": 1.0,
    "clip_eps": 0.2,
    "grad_clip": 1.0,
    "bf16": False,
    "gradient_checkpointing": False,
    "lr_scheduler": "constant",
    "total_steps": 12,
    "save_every": 12,
    "reward_fns": ["exact_answer"],
    "scheduler": {"dataset": "arithmetic"},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": LORA_TARGETS},
    "entropy_probe": {"enabled": False},
    "simple_entropy_probe": {"enabled": False},
    "gns_probe": {"enabled": False},
}


def build_tokenizer():
    """Character-level tokenizer over printable ASCII (plus newline and tab)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n", "\t"] + [chr(i) for i in range(32, 127)]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def lora_config(lora: dict[str, Any], **extra: Any):
    """A training config's ``lora`` block (r, alpha, dropout, target_modules) as peft's
    LoraConfig for a causal LM; ``extra`` are further LoraConfig fields."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        task_type="CAUSAL_LM",
        **extra,
    )


def tiny_model_config(vocab_size: int = 128):
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,  # as Qwen2.5-1.5B
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )
    config._attn_implementation = "eager"
    return config


def _answer_batch(problems, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+answer+eos, with a mask over answer tokens (the SFT targets)."""
    seqs, masks = [], []
    for p in problems:
        prompt = tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(p.answer, add_special_tokens=False)["input_ids"] + [1]
        seqs.append(prompt + answer)
        masks.append([0] * len(prompt) + [1] * len(answer))
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    target = torch.zeros_like(ids)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        target[i, : len(s)] = torch.tensor(m)
    return ids, attn, target


def answer_accuracy(model, problems, tokenizer) -> float:
    """Greedy exact-match accuracy (argmax at every answer position, EOS included)."""
    ids, attn, target = _answer_batch(problems, tokenizer)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    hit = (logits.argmax(-1) == ids[:, 1:]) | (target[:, 1:] == 0)
    return float(hit.all(1).double().mean())


def _in_fp64(model):
    """Faithful fp64 (no fp32 casts inside): the build then does not depend on the CPU's
    vector width. In fp32, summation-order differences between instruction sets grow over
    hundreds of training steps until sampled tokens differ, and the checkpoint with them."""
    from entropy_lab.precision import make_faithful

    model.double()
    # RoPE angles as transformers computes them (fp32): the v5 checkpoint was built so, and
    # fp64 angles would train a different one (every number measured on it would change).
    report = make_faithful(model, rotary=False)
    if not report.complete:
        raise RuntimeError(f"tiny build: faithful fp64 incomplete ({report.reason()})")
    return model


def _save_fp32(model, path: Path) -> None:
    """Saved as an fp32 checkpoint with stock attention, as a training run would save it."""
    model.float()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = "eager"
    model.save_pretrained(path, safe_serialization=True)


def train_base_model(tokenizer, task: ArithmeticTask, steps: int, seed: int):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = _in_fp64(Qwen2ForCausalLM(tiny_model_config()))
    problems = task.problems
    ids, attn, target = _answer_batch(problems, tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, len(problems), (128,), generator=gen)
        logits = model(input_ids=ids[rows], attention_mask=attn[rows]).logits[:, :-1]
        mask = target[rows, 1:].bool()
        loss = torch.nn.functional.cross_entropy(logits[mask], ids[rows, 1:][mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.zero_grad(set_to_none=True)  # stale grads would let AdamW move frozen weights later
    return model


def build_tiny_checkpoint(
    out_dir: str | Path,
    seed: int = TINY_SEED,
    sft_steps: int = 350,
    rl_steps: int = 12,
    verbose: bool = False,
) -> dict[str, Any]:
    """Build the tiny checkpoint into ``out_dir``; returns its training info.

    Trained in faithful fp64 and saved in fp32, so the same checkpoint comes out on any x86
    CPU: built with AVX2 kernels instead of AVX-512, the RL rewards of every step were
    identical and the saved weights differed only in fp32 rounding (the fp32 build it
    replaces diverged from the first RL step). 350 SFT steps leave it mid-training (greedy
    accuracy ≈ 0.6, sampled reward ≈ 0.4), as an RL checkpoint is, and with update
    directions that agree: on the cpu suite's evaluation batch (256 prompts) ∇H·v of four
    update batches was −2.76 ± 3 % (policy reading). That agreement is a property of this
    checkpoint and of its 128-prompt update batches, not of RL: fp32 builds at 300–600 steps
    varied 6–48 %. The analysis is paired (one update direction per repeat) and must not
    depend on it: the suite also runs the spread fixture (``SPREAD_BUFFER_SIZE``).
    """

    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster and never thrashes
    try:
        return _build(Path(out_dir), seed, sft_steps, rl_steps, verbose, started)
    finally:
        torch.set_num_threads(threads)


def dr_grpo_steps(
    policy, optimizer, scheduler, tokenizer, task, cfg: dict[str, Any], steps: int, seed: int
) -> tuple[list[float], int]:
    """Genuine Dr-GRPO AdamW steps with entropy_lab's own rollouts and gradient, so the saved
    optimizer state is a real one. Returns the mean reward per step and the response tokens."""
    from entropy_lab.rollout import sample_responses
    from entropy_lab.update import PolicyUpdate, UpdateBatch, group_advantages

    updater = PolicyUpdate(
        policy,
        optimizer,
        temperature=cfg["temperature"],
        clip_eps=cfg["clip_eps"],
        grad_clip=cfg["grad_clip"],
        microbatch_size=cfg["microbatch_size"],
    )
    _, pool = task.split(eval_size=0, seed=seed)
    mean_rewards, tokens = [], 0
    for step in range(steps):
        prompts = pool[step * cfg["buffer_size"] : (step + 1) * cfg["buffer_size"]]
        seqs = sample_responses(
            policy,
            tokenizer,
            prompts,
            cfg["num_generations"],
            temperature=cfg["temperature"],
            max_new_tokens=cfg["max_new_tokens"],
            seed=seed + 100 + step,
        )
        rewards = torch.tensor(
            [task.reward(r, prompts[int(i)]) for r, i in zip(seqs.responses, seqs.prompt_index)]
        )
        batch = UpdateBatch(
            seqs,
            rewards,
            group_advantages(rewards, seqs.prompt_index),
            cfg["num_generations"],
            cfg["max_new_tokens"],
        )
        grad = updater.gradient(batch)
        for name, p in updater.params.items():
            p.grad = grad.grads[name]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        mean_rewards.append(float(rewards.mean()))
        tokens += seqs.num_response_tokens
    return mean_rewards, tokens


def _build(out: Path, seed: int, sft_steps: int, rl_steps: int, verbose: bool, started: float):
    from peft import get_peft_model

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    task = ArithmeticTask()
    base = train_base_model(tokenizer, task, sft_steps, seed)
    sft_accuracy = answer_accuracy(base, task.problems, tokenizer)
    if verbose:
        print(
            f"tiny base model: greedy accuracy {sft_accuracy:.3f} on {len(task.problems)} problems"
        )
    _save_fp32(base, out / "base_model")
    tokenizer.save_pretrained(out / "base_model")
    _in_fp64(base)  # RL starts from the saved (fp32-rounded) base, as a loader will see it

    cfg = TINY_TRAINING_CONFIG
    torch.manual_seed(seed + 1)
    policy = get_peft_model(base, lora_config(cfg["lora"]))
    # RL_Practice hands *all* policy parameters to AdamW; frozen ones never get state.
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"]
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    mean_rewards, _ = dr_grpo_steps(
        policy, optimizer, scheduler, tokenizer, task, cfg, rl_steps, seed
    )
    policy.eval()
    rl_accuracy = answer_accuracy(policy, task.problems, tokenizer)

    save_rl_practice(out, policy, tokenizer, optimizer, scheduler, cfg)
    info = {
        "step": rl_steps,
        "seed": seed,
        "task": "arithmetic a+b=, operands 0-29",
        "sft_steps": sft_steps,
        "sft_greedy_accuracy": sft_accuracy,
        "rl_greedy_accuracy": rl_accuracy,
        "rl_mean_reward_per_step": mean_rewards,
        "trainable_parameters": sum(p.numel() for p in policy.parameters() if p.requires_grad),
        "total_parameters": sum(p.numel() for p in policy.parameters()),
    }
    (out / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
    info["build_seconds"] = time.perf_counter() - started
    info["digest"] = directory_digest(out)
    return info


def save_rl_practice(out: Path, policy, tokenizer, optimizer, scheduler, cfg: dict) -> None:
    """The RL_Practice step layout beside ``out/base_model``: adapter (fp32), AdamW state over
    all policy parameters with its names file, scheduler, training config."""
    _save_fp32(policy, out / "model")
    tokenizer.save_pretrained(out / "model")
    _point_adapter_at(out / "model" / "adapter_config.json", "../base_model")
    torch.save(_state_in_fp32(optimizer.state_dict()), out / "optimizer.pt")
    torch.save(scheduler.state_dict(), out / "scheduler.pt")
    names = [name for name, _ in policy.named_parameters()]
    (out / "optimizer_param_names.json").write_text(json.dumps(names, indent=1) + "\n")
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def _state_in_fp32(state: dict[str, Any]) -> dict[str, Any]:
    """The AdamW moments in the saved parameters' dtype (the step counters as they are)."""
    return {
        **state,
        "state": {
            index: {
                k: v.float() if k != "step" and torch.is_floating_point(v) else v
                for k, v in entries.items()
            }
            for index, entries in state["state"].items()
        },
    }


def _point_adapter_at(config_path: Path, base: str) -> None:
    data = json.loads(config_path.read_text())
    data["base_model_name_or_path"] = base
    if isinstance(data.get("target_modules"), list):  # PEFT keeps a set: order varies by process
        data["target_modules"] = sorted(data["target_modules"])
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def directory_digest(path: str | Path) -> str:
    """sha256 over every file's relative path and bytes (sorted)."""
    root = Path(path)
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(root)).encode())
        h.update(hashlib.sha256(file.read_bytes()).digest())
    return h.hexdigest()


def is_tiny_checkpoint(step_dir: str | Path) -> bool:
    """Whether ``step_dir`` is a build of this module (a copy included): its training_info.json
    records the tiny task and SFT steps. Only such a checkpoint gets the setup's defaults."""
    try:
        info = json.loads((Path(step_dir) / "training_info.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(info, dict)
        and "sft_steps" in info
        and str(info.get("task", "")).startswith("arithmetic a+b=")
    )


def default_cache_dir() -> Path:
    base = os.environ.get("ENTROPY_LAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "entropy_lab"
    )
    return Path(base)


def ensure_tiny_checkpoint(cache_dir: str | Path | None = None, verbose: bool = False) -> Path:
    """The tiny checkpoint, built on first use and cached (safe under concurrent callers)."""
    from filelock import FileLock

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    # v3: rollouts sample per row by inverse CDF (data-parallel reproducible), which changes
    # the RL steps of the build; a v2 cache would no longer be what this code builds.
    target = root / f"tiny-qwen2-seed{TINY_SEED}-v5"  # v5: built in fp64
    with FileLock(str(root / (target.name + ".lock"))):
        if (target / "training_info.json").is_file():
            return target
        staging = root / (target.name + ".partial")
        if staging.exists():
            import shutil

            shutil.rmtree(staging)
        build_tiny_checkpoint(staging, verbose=verbose)
        staging.rename(target)
    return target


# -- tiny random models of other architectures (the test matrix, DESIGN §9) ----------------
#
# The transformers way: a tiny config of the *same architecture* (hidden 64, 2 layers, the
# built-in 128-token vocabulary), briefly taught the format of arithmetic:6 (so that rewards
# vary and the RL gradient is not zero), then LoRA on attention and MLP and a few genuine
# Dr-GRPO AdamW steps, saved in the RL_Practice layout like the built-in checkpoint.

_ATTENTION_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_SMALL = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "bos_token_id": None,
    "eos_token_id": 1,
    "pad_token_id": 0,
}
# name: (config class, model class, config overrides, LoRA targets)
ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any], list[str]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, _ATTENTION_MLP),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}, _ATTENTION_MLP),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}, _ATTENTION_MLP),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}, _ATTENTION_MLP),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        # both softcaps small enough to matter at these logit sizes; a window of 4 tokens
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "sliding_window": 4,
            "final_logit_softcapping": 3.0,
            "attn_logit_softcapping": 5.0,
        },
        _ATTENTION_MLP,
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
            "final_logit_softcapping": 3.0,
        },
        _ATTENTION_MLP,
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {},
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    ),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, _ATTENTION_MLP),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {"num_key_value_heads": None},
        ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64, "n_inner": 128},
        ["c_attn", "c_proj", "c_fc"],  # Conv1D: LoRA with fan_in_fan_out
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        # two MoE layers, four experts, top-2. LoRA on attention only: PEFT maps MLP targets
        # (gate_proj, …) of Qwen3-MoE onto the fused expert tensors through a parametrization
        # that torch.func.functional_call cannot pass (the load-time jvp refuses it)
        {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
        ["q_proj", "k_proj", "v_proj", "o_proj"],
    ),
}
# Built by benchmarks/architectures.py, outside the cpu suite's matrix (their load checks and
# faithful fp64 are tested on random models in tests/test_architectures.py).
MORE_ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any], list[str]]] = {
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}, _ATTENTION_MLP),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}, _ATTENTION_MLP),
}
ARCHITECTURE_TASK = "arithmetic:6"


def _architecture(name: str) -> tuple[str, str, dict[str, Any], list[str]]:
    return ARCHITECTURES[name] if name in ARCHITECTURES else MORE_ARCHITECTURES[name]


def tiny_architecture_config(name: str):
    import transformers

    config_class, _, overrides, _ = _architecture(name)
    settings = {**_SMALL, **overrides}
    if name == "gpt2":  # GPT-2 names its sizes itself
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
            settings.pop(key)
        for key in ("intermediate_size", "num_key_value_heads", "max_position_embeddings"):
            settings.pop(key)
    settings = {k: v for k, v in settings.items() if v is not None or k == "bos_token_id"}
    config = getattr(transformers, config_class)(**settings)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    return config


def build_tiny_architecture(
    name: str, out_dir: str | Path, sft_steps: int = 40, rl_steps: int = 2, seed: int = 0
) -> Path:
    """A tiny random ``name`` checkpoint (``ARCHITECTURES``, ``MORE_ARCHITECTURES``) in the
    RL_Practice layout."""
    import transformers
    from peft import get_peft_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        tokenizer = build_tokenizer()
        task = ArithmeticTask(max_operand=6)
        model = getattr(transformers, _architecture(name)[1])(tiny_architecture_config(name))
        ids, attn, target = _answer_batch(task.problems, tokenizer)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(sft_steps):  # the answer format: digits, then <eos>
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
            mask = target[:, 1:].bool()
            loss = torch.nn.functional.cross_entropy(logits[mask], ids[:, 1:][mask])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.zero_grad(set_to_none=True)
        model.eval()
        model.save_pretrained(out / "base_model", safe_serialization=True)
        tokenizer.save_pretrained(out / "base_model")
        cfg = {
            **TINY_TRAINING_CONFIG,
            "buffer_size": 4,
            "num_generations": 4,
            "total_steps": rl_steps,
            "save_every": rl_steps,
            "scheduler": {"dataset": ARCHITECTURE_TASK},
            "lora": {**TINY_TRAINING_CONFIG["lora"], "target_modules": _architecture(name)[3]},
        }
        policy = get_peft_model(model, lora_config(cfg["lora"], fan_in_fan_out=name == "gpt2"))
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg["lr"], weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        rewards, _ = dr_grpo_steps(
            policy, optimizer, scheduler, tokenizer, task, cfg, rl_steps, seed
        )
        policy.eval()
        save_rl_practice(out, policy, tokenizer, optimizer, scheduler, cfg)
        info = {
            "architecture": name,
            "step": rl_steps,
            # A build of this module: the setup's tiny defaults apply (is_tiny_checkpoint).
            "task": "arithmetic a+b=, operands 0-5",  # ArithmeticTask(max_operand=6)
            "sft_steps": sft_steps,
            "rl_mean_reward_per_step": rewards,
        }
        (out / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
    finally:
        torch.set_num_threads(threads)
    return out


def write_rl_practice_run(step_dir: str | Path, out: str | Path, steps: tuple[int, ...] = (2,)):
    """The built-in checkpoint laid out as RL_Practice's RLRunner writes a run (DESIGN §6): the
    training YAML two levels above the steps, ``training_state/step_N`` for each of ``steps``
    and ``step_final`` (copies of ``step_dir``), a ``step_latest`` symlink to step_final, the
    names file as one list per param group, training_info.json with ``model_config``, and
    the adapter still naming the path it was trained from (which does not resolve from the
    step: the base comes from ``backbone``). Each step's scheduler.pt is RL_Practice's
    scheduler after that many steps and ``logs/train_log.jsonl`` has a row per step, as its
    trainer writes them (the rows' numbers are placeholders: every step folder holds the same
    adapter). A layout fixture, not a training run."""
    step_dir, run = Path(step_dir), Path(out)  # not marked tiny: RL_Practice's own rules apply
    state = run / "training_state"
    state.mkdir(parents=True)
    cfg = yaml.safe_load((step_dir / "config.yaml").read_text())
    cfg["backbone"] = str((step_dir / "base_model").resolve())
    # RL_Practice's own keys, as its configs (cfg/h100_dual_gns_64step.yaml) spell them
    cfg.update(
        {
            "reward_var_thresh": 0.01,
            "reject_all_zero": True,
            "reject_all_max": True,
            'cfg["kl_beta"]': 0.0,
            "ent_coef": 0.0,
            "clip_+": 0.2,
            "ppo_epochs": 1,
        }
    )
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    names = json.loads((step_dir / "optimizer_param_names.json").read_text())
    for name in [f"step_{n}" for n in steps] + ["step_final"]:
        target = state / name
        target.mkdir()
        shutil.copytree(step_dir / "model", target / "model")
        shutil.copy2(step_dir / "optimizer.pt", target / "optimizer.pt")
        (target / "optimizer_param_names.json").write_text(json.dumps([names]))
        number = steps[-1] if name == "step_final" else int(name.split("_")[1])
        record = {
            "step": number,
            "global_step": number,
            "epoch": 0,
            "model_config": {"backbone": cfg["backbone"], "eval_backbone": cfg["backbone"]},
            "training_config": cfg,
            "distributed_info": {"world_size": 1, "rank": 0, "local_rank": 0},
        }
        (target / "training_info.json").write_text(json.dumps(record, indent=1))
        torch.save(_rl_practice_scheduler_state(cfg, number), target / "scheduler.pt")
    (state / "step_latest").symlink_to("step_final")
    (run / "logs").mkdir()
    rows = [{"step": s, "loss": 0.0, "entropy": 1.0 + s / 100} for s in range(1, steps[-1] + 1)]
    (run / "logs" / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _rl_practice_scheduler_state(cfg: dict[str, Any], steps: int) -> dict[str, Any]:
    """scheduler.pt as RL_Practice saves it after ``steps`` optimizer steps."""
    from entropy_lab.config import one_parameter_adamw, rl_practice_scheduler

    optimizer = one_parameter_adamw(float(cfg["lr"]))
    scheduler = rl_practice_scheduler(cfg, optimizer)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return scheduler.state_dict()
