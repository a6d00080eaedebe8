"""Load a checkpoint: policy (base + adapter), tokenizer, AdamW with its state, metadata.

Formats (DESIGN §6):
- ``rl_practice``: ``model/`` (PEFT adapter or full model), ``optimizer.pt``, optional
  ``optimizer_param_names.json``, ``scheduler.pt``, ``training_info.json``, ``config.yaml``;
  a run folder holding ``step_N/`` folders means its latest step.
- ``hf_trainer``: ``checkpoint-N/`` with ``adapter_model.safetensors`` (or a full model),
  ``optimizer.pt`` with decay / no-decay groups, ``trainer_state.json``.
- a plain full model (``config.json`` + weights) with ``optimizer.pt`` beside it.

The optimizer state must cover every trainable parameter with matching shapes; a state that
does not is an error naming the first mismatch, never a silent fresh optimizer.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from entropy_lab.config import (
    find_training_config,
    load_training_config_quietly,
    read_yaml_mapping,
)
from entropy_lab.entropy import probe_batch
from entropy_lab.errors import CheckpointError
from entropy_lab.precision import (
    FAITHFUL_ATTENTION,
    FaithfulReport,
    PrecisionRecorder,
    attention_for,
    describe_below_fp64,
    disable_tf32,
    make_faithful,
    torch_dtype,
    warn_if_low_precision,
)
from entropy_lab.quantization import Quantization, apply_quantization, verify_against_bitsandbytes
from entropy_lab.tiny import directory_digest

_STEP_DIR = re.compile(r"^(?:step_|checkpoint-)(\d+)$")
# RL_Practice's last save of a run (its step_latest symlink points here).
_FINAL_STEP = "step_final"
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass
class LoadedCheckpoint:
    policy: nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    training_config: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    load_seconds: float | None = None  # wall time of this load (a swap: of the swap)
    # What make_faithful patched on the loaded base (a swap re-runs the checks on it).
    faithful_report: FaithfulReport | None = None


@dataclass(frozen=True)
class CheckpointLayout:
    root: Path  # the step folder
    format: str  # rl_practice | hf_trainer | full_model
    model_dir: Path  # adapter or full model
    is_adapter: bool
    optimizer_path: Path
    param_names_path: Path | None
    config_path: Path | None


def resolve_layout(path: str | Path) -> CheckpointLayout:
    """The step folder to measure: ``path`` itself when it holds ``optimizer.pt``; else, in a
    run folder (RL_Practice's ``run_*/`` or its ``training_state/``, a TRL ``output_dir``),
    RL_Practice's ``step_final`` when present, else the highest numbered step."""
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"checkpoint not found: {root} (pass an existing folder)")
    if not root.is_dir():
        raise CheckpointError(f"checkpoint must be a folder, got the file {root}")
    if root.is_symlink():  # step_latest: say which step it is
        root = root.resolve()
    if not (root / "optimizer.pt").exists():
        root = _step_of_run(root)
    optimizer_path = root / "optimizer.pt"
    if not optimizer_path.is_file():
        raise CheckpointError(
            f"no optimizer.pt in {root}: the experiment needs the AdamW state saved with the "
            "adapter (save the optimizer state_dict next to the model)"
        )
    if (root / "model").is_dir():
        model_dir, fmt = root / "model", "rl_practice"
    elif (root / "adapter_config.json").is_file() or (root / "trainer_state.json").is_file():
        model_dir, fmt = root, "hf_trainer"
    elif (root / "config.json").is_file():
        model_dir, fmt = root, "full_model"
    else:
        raise CheckpointError(
            f"{root} has neither model/ (RL_Practice layout), adapter_config.json "
            "(HF Trainer layout) nor config.json (full model)"
        )
    is_adapter = (model_dir / "adapter_config.json").is_file()
    if not is_adapter and not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir} holds neither adapter_config.json nor config.json")
    if is_adapter:
        _read_json(model_dir / "adapter_config.json")  # a damaged one is named before any load
    names = root / "optimizer_param_names.json"
    return CheckpointLayout(
        root=root,
        format=fmt,
        model_dir=model_dir,
        is_adapter=is_adapter,
        optimizer_path=optimizer_path,
        param_names_path=names if names.is_file() else None,
        config_path=find_training_config(root),
    )


def step_folders(run: Path) -> list[Path]:
    """The saved steps of a run folder in training order (``step_final`` last; the
    ``step_latest`` symlink is an alias, not a step)."""
    numbered = sorted(
        (int(m.group(1)), p)
        for p in run.iterdir()
        if p.is_dir() and not p.is_symlink() and (m := _STEP_DIR.match(p.name))
    )
    final = [run / _FINAL_STEP] if (run / _FINAL_STEP).is_dir() else []
    return [p for _, p in numbered] + final


def _step_of_run(run: Path) -> Path:
    """A run's last saved step (RL_Practice keeps its steps under ``training_state/``)."""
    if (run / "training_state").is_dir():
        run = run / "training_state"
    steps = step_folders(run)
    return steps[-1] if steps else run


def saved_step(layout: CheckpointLayout) -> int | None:
    """The training step the checkpoint was saved at: training_info.json's ``global_step`` /
    ``step`` (RL_Practice), trainer_state.json's ``global_step`` (HF), else the folder's number."""
    for name, keys in (
        ("training_info.json", ("global_step", "step")),
        ("trainer_state.json", ("global_step",)),
    ):
        path = layout.root / name
        if path.is_file():
            data = _read_json(path)
            for key in keys:
                value = data.get(key) if isinstance(data, dict) else None
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
    match = _STEP_DIR.match(layout.root.name)
    return int(match.group(1)) if match else None


def resolve_base_model(layout: CheckpointLayout, base_model: str | None) -> tuple[str, str]:
    """(base model, where it came from), in DESIGN §6's order: ``--base-model``; the base the
    trainer loaded (its config's ``backbone``, training_info.json's ``model_config``); the
    adapter's ``base_model_name_or_path``. A path is tried as given and relative to the
    adapter, step and config folders; anything else is a hub id (loaded offline, so cached)."""
    if base_model:
        return base_model, "--base-model"
    named = _trainer_backbone(layout) or _adapter_base(layout)
    if named is None:
        raise CheckpointError(
            f"{layout.model_dir}/adapter_config.json names no base model: pass --base-model DIR"
        )
    name, source = named
    folders = [layout.model_dir, layout.root]
    if layout.config_path is not None:
        folders.append(layout.config_path.parent)
    for candidate in [Path(name)] + [folder / name for folder in folders]:
        if (candidate / "config.json").is_file():
            return str(candidate.resolve()), source
    return name, source


def _trainer_backbone(layout: CheckpointLayout) -> tuple[str, str] | None:
    """The base RL_Practice's trainer loaded: training_info.json's model_config.backbone, else
    its config.yaml's ``backbone``."""
    info_path = layout.root / "training_info.json"
    info = _read_json(info_path) if info_path.is_file() else None
    model_config = info.get("model_config") if isinstance(info, dict) else None
    if isinstance(model_config, dict) and isinstance(model_config.get("backbone"), str):
        return model_config["backbone"], "training_info.json: model_config.backbone"
    if layout.config_path is not None:
        backbone = read_yaml_mapping(layout.config_path).get("backbone")
        if isinstance(backbone, str) and backbone:
            return backbone, f"{layout.config_path.name}: backbone"
    return None


def _adapter_base(layout: CheckpointLayout) -> tuple[str, str] | None:
    adapter_cfg = _read_json(layout.model_dir / "adapter_config.json")
    name = adapter_cfg.get("base_model_name_or_path") if isinstance(adapter_cfg, dict) else None
    return (name, "adapter_config.json: base_model_name_or_path") if name else None


def load_checkpoint(
    path: str | Path,
    *,
    dtype: str = "fp32",
    device: str = "cpu",
    base_model: str | None = None,
    faithful_fp64: bool = True,
    training_config_path: str | Path | None = None,
    quantization: Quantization | None = None,
    reuse: LoadedCheckpoint | None = None,
) -> LoadedCheckpoint:
    """The checkpoint at ``path``. With ``reuse`` (a checkpoint loaded before, e.g. the
    previous step of a run) whose base, dtype, device, quantization and adapter shape are the
    same, the base is not loaded again: this adapter's weights are copied into it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    precision = disable_tf32()
    warn_if_low_precision(dtype)
    layout = resolve_layout(path)
    torch_dt = torch_dtype(dtype)
    attn = attention_for(dtype, device, faithful_fp64)
    load_attn = "eager" if attn != "eager" else attn
    base_name, base_source = (
        resolve_base_model(layout, base_model) if layout.is_adapter else (None, None)
    )
    model_source = base_name if layout.is_adapter else str(layout.model_dir)
    quantization = quantization or Quantization()
    share_key = _shared_base_key(layout, base_name, dtype, device, faithful_fp64, quantization)
    if reuse is not None and share_key is not None:
        if reuse.metadata.get("shared_base_key") == share_key:
            swapped = _swap_adapter(reuse, layout, training_config_path, precision, quantization)
            swapped.load_seconds = time.perf_counter() - started
            return swapped
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_source,
            dtype=torch_dt,
            attn_implementation=load_attn,
            # MoE experts as plain per-expert matmuls: the grouped kernels take no fp64 and
            # have no forward-mode AD (dense models ignore it)
            experts_implementation="eager",
            local_files_only=True,
            # the Auto class's adapter probe does not inherit local_files_only (transformers 5)
            adapter_kwargs={"local_files_only": True},
        )
    except _LOAD_ERRORS as exc:
        if Path(model_source).is_dir():  # found, but unreadable: asking for --base-model misleads
            raise CheckpointError(
                f"cannot load the model in {model_source} ({_first_line(exc)}): its files are "
                "corrupt or incomplete; re-save it with save_pretrained"
            ) from exc
        raise CheckpointError(
            f"cannot load the base model {model_source!r} offline ({type(exc).__name__}): "
            "pass --base-model with a local folder or a cached hub id"
        ) from None
    quantized = apply_quantization(model, quantization) if quantization.active else {}
    if layout.is_adapter:
        try:
            policy = PeftModel.from_pretrained(model, str(layout.model_dir), is_trainable=True)
        except _LOAD_ERRORS as exc:
            raise CheckpointError(
                f"cannot load the adapter in {layout.model_dir} ({_first_line(exc)}): its files "
                "are corrupt or incomplete, or made for another base model; re-save the adapter"
            ) from exc
    else:
        policy = model
        for p in policy.parameters():
            p.requires_grad_(True)
    policy.to(device=device, dtype=torch_dt)
    if layout.is_adapter:
        _check_adapter_tensors(policy, layout, _adapter_weights(layout))
    _check_finite_weights(policy, layout)
    policy.eval()  # no dropout, LoRA dropout included
    load_checks, faithful_report = _verify(policy, dtype, dtype == "fp64" and faithful_fp64)
    if quantization.active:
        quantized.update(
            verify_against_bitsandbytes(
                policy,
                model_source,
                str(layout.model_dir) if layout.is_adapter else None,
                quantization,
                probe_batch(policy),
                quantized["quantized_layers"],
            )
        )

    tokenizer_dir = layout.model_dir
    if not (tokenizer_dir / "tokenizer_config.json").is_file() and base_name:
        tokenizer_dir = Path(base_name)
    if tokenizer_dir.is_dir() and not any(
        (tokenizer_dir / f).is_file() for f in _TOKENIZER_FILES
    ):  # AutoTokenizer would silently build an empty-vocabulary tokenizer
        raise CheckpointError(
            f"no tokenizer files in {tokenizer_dir}: save the tokenizer next to the model "
            "(tokenizer.save_pretrained)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except _LOAD_ERRORS as exc:
        raise CheckpointError(
            f"cannot load the tokenizer in {tokenizer_dir} ({_first_line(exc)}): "
            "re-save it with tokenizer.save_pretrained"
        ) from exc

    loaded = LoadedCheckpoint(policy, tokenizer, None, {}, faithful_report=faithful_report)
    loaded.metadata = {
        "base_model": base_name,
        "base_model_source": base_source,
        "dtype": dtype,
        "device": device,
        "attention": attention_for(dtype, device, faithful_fp64),
        "base_load": "loaded",
        "shared_base_key": share_key,
        **load_checks,
        **quantized,
        **precision,
    }
    loaded = _with_state(loaded, layout, training_config_path)
    loaded.load_seconds = time.perf_counter() - started  # not in metadata: analysis.json
    return loaded


def _with_state(
    loaded: LoadedCheckpoint, layout: CheckpointLayout, training_config_path
) -> LoadedCheckpoint:
    """``loaded`` with this checkpoint's optimizer state, training config and metadata."""
    policy = loaded.policy
    optimizer, mapping = load_optimizer(policy, layout)
    cfg_path = training_config_path or layout.config_path
    loaded.optimizer = optimizer
    loaded.training_config = load_training_config_quietly(cfg_path) if cfg_path else {}
    fresh = {  # this checkpoint's own: they replace a reused checkpoint's
        "path": str(layout.root.resolve()),
        "format": layout.format,
        "adapter": layout.is_adapter,
        "step": layout.root.name,
        "saved_step": saved_step(layout),
        "digest": checkpoint_digest(layout),
        "trainable_parameters": sum(p.numel() for p in policy.parameters() if p.requires_grad),
        "total_parameters": sum(p.numel() for p in policy.parameters()),
        "optimizer_mapping": mapping,
        "optimizer_step": _optimizer_step(optimizer),
    }
    loaded.metadata = {
        **fresh,
        **{k: v for k, v in loaded.metadata.items() if k not in fresh},
    }
    return loaded


# Adapter settings that do not change the function the weights compute.
_ADAPTER_BOOKKEEPING = {"base_model_name_or_path", "inference_mode", "revision"}


def _shared_base_key(layout, base_name, dtype, device, faithful, quantization) -> str | None:
    """What two checkpoints must share for one to reuse the other's loaded base: the base,
    how it was loaded, and the adapter's shape (its config); None for a full model."""
    if not layout.is_adapter:
        return None
    adapter = _read_json(layout.model_dir / "adapter_config.json")
    shape = {k: v for k, v in adapter.items() if k not in _ADAPTER_BOOKKEEPING}
    key = [base_name, dtype, device, faithful, quantization.describe(), shape]
    return json.dumps(key, sort_keys=True, default=str)


def _adapter_weights(layout: CheckpointLayout) -> dict[str, torch.Tensor]:
    from peft.utils import load_peft_weights

    try:
        return load_peft_weights(str(layout.model_dir), device="cpu")
    except _LOAD_ERRORS as exc:
        raise CheckpointError(
            f"cannot load the adapter in {layout.model_dir} ({_first_line(exc)}): its files "
            "are corrupt or incomplete; re-save the adapter"
        ) from exc


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal values, NaN included: a damaged file's NaN is the NaN check's to
    name, not a load mismatch."""
    return torch.equal(a, b) or torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)


def _check_adapter_tensors(
    policy: nn.Module, layout: CheckpointLayout, weights: dict[str, torch.Tensor]
) -> None:
    """The policy's adapter tensors are the adapter file's, tensor by tensor (each file
    tensor in the policy's dtype, as loading casts it): the same names, the same values."""
    from peft.utils import get_peft_model_state_dict

    # save_embedding_layers "auto" would look the base up (on the hub, if not a folder): the
    # file itself says whether it carries the embedding layers
    held = get_peft_model_state_dict(policy, save_embedding_layers=False)
    if set(weights) - set(held):
        held = get_peft_model_state_dict(policy, save_embedding_layers=True)
    for name in sorted(set(held) ^ set(weights)):
        where = "the adapter file" if name in held else "the policy"
        raise CheckpointError(f"{layout.model_dir}: adapter tensor {name} is missing from {where}")
    for name in sorted(weights):
        mine, saved = held[name].detach(), weights[name]
        if mine.shape != saved.shape or not _same_values(mine.cpu(), saved.to(dtype=mine.dtype)):
            raise CheckpointError(
                f"{layout.model_dir}: the policy's adapter tensor {name} differs from the "
                "adapter file's (the adapter was not loaded as saved)"
            )


def _swap_adapter(
    reuse: LoadedCheckpoint,
    layout: CheckpointLayout,
    training_config_path,
    precision,
    quantization: Quantization,
) -> LoadedCheckpoint:
    """This checkpoint's adapter weights copied into ``reuse``'s policy (same base and
    adapter shape), checked as a fresh load checks it: every adapter tensor the file's, all
    finite, the scorer's logits the model's own; faithful fp64's audit and its H against the
    stock fp32 model (a copy with the base's patches taken off); a quantized base held to
    bitsandbytes' 4-bit model with this adapter."""
    from peft.utils import set_peft_model_state_dict

    policy = reuse.policy
    weights = _adapter_weights(layout)
    result = set_peft_model_state_dict(policy, weights)
    if result.unexpected_keys:
        raise CheckpointError(
            f"{layout.model_dir}: adapter tensor {result.unexpected_keys[0]} has no place in "
            f"the adapter loaded from {reuse.metadata['path']} (another adapter shape?)"
        )
    # A LoRA tensor missing from this adapter would silently keep the previous step's value.
    missing = set(result.missing_keys)
    kept = [n for n, p in policy.named_parameters() if p.requires_grad and n in missing]
    if kept:
        raise CheckpointError(f"{layout.model_dir}: the adapter has no tensor for {kept[0]}")
    _check_adapter_tensors(policy, layout, weights)
    _check_finite_weights(policy, layout)
    policy.eval()
    dtype = reuse.metadata["dtype"]
    checks, _ = _verify(policy, dtype, reuse.faithful_report is not None, reuse.faithful_report)
    metadata = {k: v for k, v in reuse.metadata.items()}
    metadata.update(checks)
    if quantization.active:
        metadata.update(
            verify_against_bitsandbytes(
                policy,
                reuse.metadata["base_model"],
                str(layout.model_dir),
                quantization,
                probe_batch(policy),
                reuse.metadata["quantized_layers"],
            )
        )
    metadata["base_load"] = f"shared with {Path(reuse.metadata['path']).name} (adapter swapped)"
    metadata.update(precision)
    loaded = LoadedCheckpoint(
        policy, reuse.tokenizer, None, {}, metadata, faithful_report=reuse.faithful_report
    )
    return _with_state(loaded, layout, training_config_path)


# -- the model's own function, checked at load -------------------------------------------

# Scorer logits against model(...).logits, relative to the largest |logit| (DESIGN §9).
LOGITS_TOLERANCE = {"fp32": 1e-6, "fp64": 1e-10, "bf16": 1e-2}
FAITHFUL_TOLERANCE = 1e-6  # faithful fp64 H against the stock fp32 model's, relative


def verify_model_function(policy: nn.Module, dtype: str, faithful: bool) -> dict[str, Any]:
    """``_verify``'s checks of a freshly loaded policy (what they found, for the metadata)."""
    return _verify(policy, dtype, faithful)[0]


def _stock_copy(policy: nn.Module, patched: FaithfulReport) -> nn.Module:
    """A copy of a policy ``make_faithful`` patched, computing as the stock model: the
    patched forwards (instance attributes) removed, the eager attention it was loaded with."""
    stock = copy.deepcopy(policy)
    for name in patched.patched:
        stock.get_submodule(name).__dict__.pop("forward", None)
    for module in stock.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == FAITHFUL_ATTENTION:
            config._attn_implementation = "eager"
    return stock


def _verify(
    policy: nn.Module, dtype: str, faithful: bool, patched: FaithfulReport | None = None
) -> tuple[dict[str, Any], FaithfulReport | None]:
    """Checks, on a few probe sequences, that entropy_lab computes the model's own function.

    1. The scorer's logits (trunk, then ``ModelLogits``: projection and final transform)
       equal ``model(...).logits``; else an error naming the architecture and the first
       module whose output differs.
    2. Faithful fp64 (``faithful``): every norm / router / rotary embedding patched, no op
       below fp64 in one forward and one first-order jvp (the precision audit), and H equal
       to the stock fp32 model's; else faithful mode is refused with the reason.
    ``patched``: what make_faithful did to this policy's base before (an adapter swapped in):
    not patched again; the stock model is a copy with those patches taken off.
    Returns what was checked and measured, for the run's metadata, and make_faithful's report.
    """
    from entropy_lab.entropy import decoder_and_head

    lm = _causal_lm(policy)
    architecture = type(lm).__name__
    out: dict[str, Any] = {"architecture": architecture}
    report = patched
    stock32 = None
    if faithful:
        stock32 = (
            copy.deepcopy(policy) if patched is None else _stock_copy(policy, patched)
        ).float()
        report = make_faithful(policy) if patched is None else patched
        out["faithful"] = report.summary()
        if not report.complete:
            _refuse_faithful(architecture, report.reason())
    batch = probe_batch(policy)
    out["logits_check"] = _check_logits(policy, batch, dtype)
    if faithful:
        h_faithful, audit = _audited_probe(policy, batch)
        out["faithful"]["precision_audit"] = audit
        if audit["below_fp64"]:
            _refuse_faithful(architecture, f"the precision audit found {audit['summary']}")
        h_stock = _probe_entropy(stock32, batch.to(next(stock32.parameters()).device))
        del stock32
        difference = abs(h_faithful - h_stock) / abs(h_stock)
        out["faithful"]["entropy_vs_stock_fp32"] = difference
        if not difference <= FAITHFUL_TOLERANCE:
            _refuse_faithful(
                architecture,
                f"its H on probe sequences differs from the stock fp32 model's by "
                f"{difference:.1e} (relative, > {FAITHFUL_TOLERANCE:g})",
            )
    out["logits_transform"] = decoder_and_head(policy)[1].steps
    return out, report if faithful else None


def _causal_lm(policy: nn.Module) -> nn.Module:
    return policy.get_base_model() if hasattr(policy, "get_base_model") else policy


def _refuse_faithful(architecture: str, reason: str) -> None:
    raise CheckpointError(
        f"faithful fp64 refused for {architecture}: {reason}; run with --dtype fp32, or "
        "--dtype fp64 --no-faithful (stock fp64, its fp32 casts kept)"
    )


def _audited_probe(policy: nn.Module, batch) -> tuple[float, dict[str, Any]]:
    """H of the probe sequences, and the precision audit: that forward and one first-order jvp
    of H (two short sequences, a random direction of the trainable parameters) under
    ``PrecisionRecorder``, which lists every op that computed below fp64 and where. The H
    check's and the norm probes' tolerances cannot see an fp32 round trip inside an fp64
    model; this can. A jvp forward-mode AD cannot pass leaves the forward audited alone (the
    sweep's own jvp probe refuses such a model, or --no-first-order does without it)."""
    architecture = type(_causal_lm(policy)).__name__
    # (no timing in the metadata: a resumed sweep's analysis equals the uninterrupted one's;
    # benchmarks/architectures.py times the audit)
    with PrecisionRecorder(policy) as recorder:
        try:
            h = _probe_entropy(policy, batch)
        except (NotImplementedError, RuntimeError) as exc:
            _refuse_faithful(architecture, f"its forward fails ({_first_line(exc)})")
        jvp = _probe_jvp(policy)
    below = recorder.entries
    return h, {
        "below_fp64": [e.to_dict() for e in below],
        "summary": describe_below_fp64(below) if below else "",
        "ops_seen": recorder.ops_seen,
        "jvp": jvp,
    }


def _probe_jvp(policy: nn.Module) -> str:
    """'passed', or why the audit's first-order jvp could not run."""
    from entropy_lab.entropy import EntropyScorer
    from entropy_lab.theory import sums_jet

    theta0 = {n: p.detach() for n, p in policy.named_parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(0)
    direction = {
        n: torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.device)
        for n, p in theta0.items()
    }
    batch = probe_batch(policy, rows=2, length=8)
    try:
        sums_jet(EntropyScorer(policy, temperature=1.0), batch, theta0, direction, 1)
    except (NotImplementedError, RuntimeError) as exc:
        return f"failed ({_first_line(exc)})"
    return "passed"


@torch.no_grad()
def _probe_entropy(policy: nn.Module, batch) -> float:
    """H (conditional reading, T = 1) of the probe sequences, by the scorer's own path."""
    from entropy_lab.entropy import decoder_and_head, sequence_sums

    decoder, head = decoder_and_head(policy)
    sums = sequence_sums(decoder, head, batch, temperature=1.0)
    return float(sums.entropy.sum() / sums.tokens.sum())


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    scale = float(b.double().abs().max()) or 1.0
    return float((a.double() - b.double()).abs().max()) / scale


class _OutputRecorder:
    """The first tensor each module returns, per call, keyed by module name."""

    def __init__(self, model: nn.Module) -> None:
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.order: list[tuple[str, int]] = []
        self.handles = [
            module.register_forward_hook(self._hook(name))
            for name, module in model.named_modules()
            if name
        ]

    def _hook(self, name: str):
        def hook(module, args, output) -> None:
            tensor = output if torch.is_tensor(output) else None
            if tensor is None and isinstance(output, (tuple, list)):
                tensor = next((t for t in output if torch.is_tensor(t)), None)
            if tensor is None and hasattr(output, "to_tuple"):
                tensor = next((t for t in output.to_tuple() if torch.is_tensor(t)), None)
            if tensor is not None and tensor.is_floating_point():
                calls = self.outputs.setdefault(name, [])
                self.order.append((name, len(calls)))
                calls.append(tensor.detach())

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def _check_logits(policy: nn.Module, batch, dtype: str) -> float:
    """Scorer logits vs ``model(...).logits`` at the probe's response positions; returns the
    relative difference, or raises naming the first module whose output differs."""
    from entropy_lab.entropy import decoder_and_head

    lm = _causal_lm(policy)
    target = batch.response_mask[:, 1:].bool()
    stock_rec = _OutputRecorder(lm)
    try:
        stock = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    finally:
        stock_rec.remove()
    decoder, head = decoder_and_head(policy)
    ours_rec = _OutputRecorder(lm)
    try:
        hidden = decoder(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        ours = head(hidden[:, :-1][target])
    finally:
        ours_rec.remove()
    reference = stock[:, :-1][target]
    if not bool(torch.isfinite(reference).all()):
        first = next(
            (
                name
                for name, call in stock_rec.order
                if not bool(torch.isfinite(stock_rec.outputs[name][call]).all())
            ),
            "?",
        )
        raise CheckpointError(
            f"{type(lm).__name__} in {dtype}: model(...).logits are not finite on probe "
            f"sequences (first non-finite output: {_strip(first)}); try --dtype fp32"
            + (" or faithful fp64" if dtype == "fp64" else "")
        )
    difference = _relative_difference(ours, reference)
    tolerance = LOGITS_TOLERANCE[dtype]
    if difference <= tolerance:
        return difference
    projection = head.projection
    head_name = next((n for n, m in lm.named_modules() if m is projection), "the output head")
    culprit = (
        f"after {_strip(head_name)}: {type(lm).__name__}.forward transforms the logits further"
    )
    real = batch.attention_mask.bool()
    for name, call in stock_rec.order:
        a = stock_rec.outputs[name][call]
        mine = ours_rec.outputs.get(name, [])
        if call >= len(mine):
            culprit = f"{_strip(name)} (not run by the scorer)"
            break
        b = mine[call]
        if name == head_name:
            a = a[:, :-1][target]
        elif a.dim() >= 2 and a.shape[:2] == real.shape == b.shape[:2]:
            a, b = a[real], b[real]  # padding positions carry no meaning
        if _relative_difference(b, a) > tolerance:
            culprit = _strip(name)
            break
    applied = ", ".join(head.steps) or "the projection alone"
    raise CheckpointError(
        f"{type(lm).__name__}: the scorer's logits differ from model(...).logits by "
        f"{difference:.1e} (relative, > {tolerance:g} in {dtype}); first difference at "
        f"{culprit} (the scorer applies {applied}); this architecture is not supported yet"
    )


def _check_finite_weights(policy: nn.Module, layout: CheckpointLayout) -> None:
    """NaN/inf in θ₀ would make every measurement NaN: say which tensor, up front."""
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise CheckpointError(
                    f"{layout.root}: parameter {_strip(name)} holds NaN or inf "
                    "(a diverged or damaged checkpoint); use an earlier step"
                )


def checkpoint_digest(layout: CheckpointLayout) -> str:
    """Digest of what defines θ₀ and S₀: the model folder, the optimizer and names files."""
    import hashlib

    h = hashlib.sha256(directory_digest(layout.model_dir).encode())
    for f in (layout.optimizer_path, layout.param_names_path):
        if f is not None:
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _optimizer_step(optimizer: torch.optim.Optimizer) -> int | None:
    steps = [float(s["step"]) for s in optimizer.state.values() if "step" in s]
    return int(max(steps)) if steps else None


def _strip(name: str) -> str:
    """A parameter name without PEFT / wrapper prefixes, for matching saved names."""
    for prefix in ("module.", "base_model.model.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def _decay_split(policy: nn.Module, trainable: list[tuple[str, nn.Parameter]]):
    """Trainable params in ``Trainer.create_optimizer`` order: decay group, then no-decay."""
    norm_params = set()
    for module in policy.modules():
        if isinstance(module, nn.LayerNorm) or "Norm" in type(module).__name__:
            norm_params.update(id(p) for p in module.parameters(recurse=False))
    decay = [(n, p) for n, p in trainable if "bias" not in n and id(p) not in norm_params]
    no_decay = [(n, p) for n, p in trainable if "bias" in n or id(p) in norm_params]
    return decay, no_decay


def _first_line(exc: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message`` (library messages run to many lines)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:limit]}" if text else type(exc).__name__


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"cannot read {path} as JSON ({_first_line(exc)}): fix or re-create the file"
        ) from exc


def _load_optimizer_file(path: Path) -> Any:
    """``torch.load(weights_only=True)``, with its two failure kinds told apart."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: (GLOBAL \S+)", str(exc))
        if refused:  # the file would run code (or build foreign objects) when unpickled
            raise CheckpointError(
                f"{path} was refused by torch.load(weights_only=True): it references "
                f"{refused.group(1)}, not only tensors; re-save optimizer.state_dict() with "
                "torch.save (never load an untrusted file with weights_only=False)"
            ) from exc
        reason = type(exc).__name__  # its message is advice about weights_only=False
    except Exception as exc:  # empty, truncated, not a torch.save file, unreadable
        reason = _first_line(exc, 80)
    raise CheckpointError(
        f"cannot read {path} with torch.load(weights_only=True) ({reason}): the file is "
        "empty, truncated or not a torch.save file; re-save optimizer.state_dict()"
    )


def load_optimizer(policy: nn.Module, layout: CheckpointLayout):
    """AdamW over the trainable parameters with the saved state mapped onto them."""
    saved = _load_optimizer_file(layout.optimizer_path)
    if not isinstance(saved, dict) or "state" not in saved or "param_groups" not in saved:
        raise CheckpointError(f"{layout.optimizer_path} is not an optimizer state_dict")
    saved_ids = [i for g in saved["param_groups"] for i in g["params"]]
    all_params = list(policy.named_parameters())
    trainable = [(n, p) for n, p in all_params if p.requires_grad]

    candidates: list[tuple[str, list[tuple[str, nn.Parameter]]]] = []
    if layout.param_names_path is not None:
        names = _param_names(layout.param_names_path, saved["param_groups"])
        by_name = {_strip(n): (n, p) for n, p in all_params}
        missing = [n for n in names if _strip(n) not in by_name]
        if missing:
            raise CheckpointError(
                f"{layout.param_names_path.name}: parameter {missing[0]!r} is not in the policy "
                "(wrong base model or adapter?)"
            )
        candidates.append(("param_names", [by_name[_strip(n)] for n in names]))
    else:
        decay, no_decay = _decay_split(policy, trainable)
        candidates += [
            ("positional_full", all_params),
            ("positional_trainable", trainable),
            ("trainer_decay_groups", decay + no_decay),
        ]
    errors = []
    for label, params in candidates:
        problem = _mapping_problem(saved, saved_ids, params, trainable)
        if problem is None:
            return _build_optimizer(saved, saved_ids, params), label
        errors.append(f"{label}: {problem}")
    raise CheckpointError(
        f"optimizer state in {layout.optimizer_path} does not match the trainable parameters "
        f"({len(trainable)} trainable, {len(saved_ids)} in the state) — " + "; ".join(errors)
    )


def _param_names(path: Path, saved_groups: list[dict[str, Any]]) -> list[str]:
    """The names file as one flat list in the state's order: a flat list, or one list per
    param group (RL_Practice writes ``[[names of group 0], …]``), each group's length checked
    against the saved group."""
    names = _read_json(path)
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return names
    if not (
        isinstance(names, list)
        and all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in names)
    ):
        raise CheckpointError(
            f"{path} must be a JSON list of parameter names, or one such list per param group"
        )
    if len(names) != len(saved_groups):
        raise CheckpointError(
            f"{path.name} lists {len(names)} param groups, the optimizer state has "
            f"{len(saved_groups)}"
        )
    for k, (group_names, group) in enumerate(zip(names, saved_groups)):
        if len(group_names) != len(group["params"]):
            raise CheckpointError(
                f"{path.name}: group {k} names {len(group_names)} parameters, the optimizer "
                f"state's group {k} has {len(group['params'])}"
            )
    return [n for group_names in names for n in group_names]


def _mapping_problem(saved, saved_ids, params, trainable) -> str | None:
    """Why mapping saved position k -> params[k] fails, or None if it works."""
    if len(params) != len(saved_ids):
        return f"{len(params)} parameters vs {len(saved_ids)} state entries"
    covered = set()
    for k, (name, p) in enumerate(params):
        state = saved["state"].get(saved_ids[k])
        if not state:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                return f"{name}: state has no {key} (not an AdamW state?)"
            if not torch.is_tensor(state[key]) or not state[key].is_floating_point():
                kind = state[key].dtype if torch.is_tensor(state[key]) else type(state[key])
                return f"{name}: state {key} has dtype {kind}, not a floating-point type"
            if tuple(state[key].shape) != tuple(p.shape):
                return (
                    f"first mismatch at {name}: state {key} shape {tuple(state[key].shape)} "
                    f"vs parameter {tuple(p.shape)}"
                )
        if not p.requires_grad:
            return f"{name} is frozen but has optimizer state"
        covered.add(id(p))
    uncovered = [n for n, p in trainable if id(p) not in covered]
    if uncovered:
        return f"trainable parameter {uncovered[0]} has no optimizer state"
    return None


def _build_optimizer(saved, saved_ids, params) -> torch.optim.Optimizer:
    """AdamW over the trainable members of each saved group, state renumbered to match."""
    groups, state = [], {}
    flat = 0
    for group in saved["param_groups"]:
        members = []
        for saved_id in group["params"]:
            _, p = params[flat]
            flat += 1
            if p.requires_grad:
                state[len(state)] = saved["state"][saved_id]
                members.append(p)
        if members:
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": members})
    optimizer = torch.optim.AdamW(groups)
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)  # casts moments to each parameter's dtype and device
    return optimizer


def generation_config_of(layout: CheckpointLayout, base_model: str | None) -> dict[str, Any]:
    """The sampler settings of the model's own generation_config.json (what HF ``generate``
    applies where its caller is silent): the base's for an adapter, else the model's; {} when
    there is none."""
    from transformers import GenerationConfig

    source = resolve_base_model(layout, base_model)[0] if layout.is_adapter else layout.model_dir
    if not Path(source).is_dir() and not _in_hub_cache(str(source)):
        raise CheckpointError(
            f"cannot load the base model {str(source)!r} offline (OSError): pass --base-model "
            "with a local folder or a cached hub id"
        )
    try:
        config = GenerationConfig.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError):
        return {}
    return {"top_k": config.top_k, "top_p": config.top_p}


def _in_hub_cache(name: str) -> bool:
    """Whether a hub id's config.json is in the local cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False
