"""Runtime precision: dtype choice, TF32 off, and the faithful fp64 mode.

Stock HF models cast RMSNorm, MoE routers, the attention softmax, RoPE angles (and Cohere
its rotated queries and keys) to fp32 even when the model is fp64, which caps the resolution
of a small ΔH at fp32's. Faithful fp64 removes those casts: each norm computes its own formula
(w·x̂, or (1 + w)·x̂ in Gemma) in its input dtype, routers their softmax, rotary embeddings
their angles, a rotary application that casts gets its rotation in fp64, and attention goes
through a registered attention function (softmax in the query dtype, softcap and scaling
kept) whose mask function is registered too, so the causal, padding and sliding-window masks
are kept. ``PrecisionRecorder`` is the audit that checks the result op by op.
"""

from __future__ import annotations

import inspect
import re
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}
FAITHFUL_ATTENTION = "entropy_lab_faithful"


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


def disable_tf32() -> dict[str, Any]:
    """TF32 matmuls silently drop to a 10-bit mantissa: turn them off and say so."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return {
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def warn_if_low_precision(dtype_name: str) -> None:
    if dtype_name == "bf16":
        warnings.warn(
            "bf16 keeps 8 mantissa bits: updates with η below about 1e-3 × |θ|/|v| round away "
            "entirely and are reported as unresolvable; use fp32 or fp64 for small η",
            stacklevel=2,
        )


def _faithful_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs
):
    """Eager attention with the softmax kept in the query dtype.

    As the stock eager functions do: grouped-query heads repeated (GQA), scores scaled by the
    module's ``scaling`` (Gemma's query_pre_attn_scalar is folded into it), then Gemma 2's
    ``softcap`` (c·tanh(s/c)), then the mask, which carries the causal, padding and sliding-
    window structure (the registered mask function builds it per layer type).
    """
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise NotImplementedError("attention sinks have no faithful fp64 attention here")
    if scaling is None:
        scaling = module.head_dim**-0.5
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = torch.softmax(scores, dim=-1)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def register_faithful_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(FAITHFUL_ATTENTION, _faithful_attention)
    try:  # transformers >= 4.53 builds masks per attention implementation
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        AttentionMaskInterface.register(FAITHFUL_ATTENTION, eager_mask)
    except ImportError:  # older versions build the eager-style 4D mask for any name
        pass


# -- norms: patched by formula, the formula picked by what the module computes -------------
#
# Stock RMSNorm-style modules cast to fp32 inside. Each is replaced by the same formula in its
# input dtype; which formula a module computes is decided by evaluating it (stock, in fp32
# inside) against each candidate on probe inputs, so a family is recognised by what it
# computes, not by its class or attribute names. torch's own norms (nn.LayerNorm, nn.RMSNorm,
# nn.GroupNorm) compute in the input dtype and stay as they are.

_NATIVE_NORMS = tuple(
    t for t in (nn.LayerNorm, getattr(nn, "RMSNorm", None), nn.GroupNorm) if t is not None
)


def _rms_norm_in_input_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """w·x̂ (Llama, Qwen, Mistral, Phi-3, OLMo 2, Mixtral, …)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.faithful_eps))


def _offset_rms_norm_in_input_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """(1 + w)·x̂ (Gemma, Gemma 2, Gemma 3)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return (hidden_states * torch.rsqrt(variance + self.faithful_eps)) * (1.0 + self.weight)


def _centered_norm_in_input_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """w·(x − μ)/σ without a bias (Cohere's LayerNorm)."""
    mean = hidden_states.mean(-1, keepdim=True)
    variance = (hidden_states - mean).pow(2).mean(-1, keepdim=True)
    return self.weight * ((hidden_states - mean) * torch.rsqrt(variance + self.faithful_eps))


NORM_FORMULAS = {
    "w·x̂": _rms_norm_in_input_dtype,
    "(1 + w)·x̂": _offset_rms_norm_in_input_dtype,
    "w·(x − μ)/σ": _centered_norm_in_input_dtype,
}
# Agreement a stock module (fp32 inside) and its formula (fp64) reach on the probe inputs.
_PROBE_TOLERANCE = 1e-5


def _probe_inputs(width: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
    """Unit-scale rows, and rows of scale 1e-3 where ε matters (mean x² ≈ 1e-6): a wrong ε
    shows. Own generator: the caller's random stream is left as it was."""
    generator = torch.Generator().manual_seed(20240615)
    x = torch.randn(4, width, generator=generator, dtype=torch.float64)
    return [x.to(device=device, dtype=dtype), (1e-3 * x).to(device=device, dtype=dtype)]


def _close(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> bool:
    scale = float(b.abs().max()) or 1.0
    return a.shape == b.shape and float((a - b).abs().max()) <= tolerance * scale


def _norm_eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _faithful_norm_formula(module: nn.Module) -> tuple[str | None, str]:
    """(formula name, '') for the candidate that computes what ``module`` does, else
    (None, why not)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None, "no 1-D weight"
    if getattr(module, "bias", None) is not None:
        return None, "has a bias (no faithful formula for it)"
    eps = _norm_eps(module)
    if eps is None:
        return None, "no eps / variance_epsilon attribute"
    module.faithful_eps = eps
    probes = _probe_inputs(weight.shape[0], weight.dtype, weight.device)
    with torch.no_grad():
        stock = [module(x) for x in probes]
        for name, formula in NORM_FORMULAS.items():
            if all(_close(formula(module, x), s, _PROBE_TOLERANCE) for x, s in zip(probes, stock)):
                return name, ""
    return None, f"computes none of {', '.join(NORM_FORMULAS)} (ε = {eps:g})"


# -- MoE routers: softmax over experts, top-k, optionally renormalised -----------------------


def _topk_router_in_input_dtype(self, hidden_states: torch.Tensor):
    hidden_states = hidden_states.reshape(-1, self.weight.shape[-1])
    logits = nn.functional.linear(hidden_states, self.weight)
    top_value, top_index = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
    if self.faithful_renormalise:
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
    return logits, top_value, top_index


def is_router(module: nn.Module) -> bool:
    """A top-k MoE router: a ``*Router`` module with ``top_k`` and an experts × hidden weight
    (Mixtral, Qwen2-MoE, Qwen3-MoE in transformers ≥ 5)."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("Router")
        and isinstance(getattr(module, "top_k", None), int)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
    )


def _faithful_router(module: nn.Module) -> tuple[bool, str]:
    """Set the renormalisation this router uses (by probing it); (False, why) if it computes
    neither variant."""
    probes = _probe_inputs(module.weight.shape[-1], module.weight.dtype, module.weight.device)
    with torch.no_grad():
        stock = [module(x) for x in probes]
        for renormalise in (True, False):
            module.faithful_renormalise = renormalise
            ok = True
            for x, s in zip(probes, stock):
                logits, value, index = _topk_router_in_input_dtype(module, x)
                ok &= (
                    isinstance(s, tuple)
                    and len(s) == 3
                    and torch.equal(index, s[2])
                    and _close(value, s[1].to(value.dtype), _PROBE_TOLERANCE)
                )
            if ok:
                return True, ""
    return False, "computes no softmax-top-k routing (with or without renormalising)"


# -- rotary embeddings: angles, and rotations applied in fp32 ---------------------------------
#
# Stock rotary embeddings compute their angles position·inv_freq, cos and sin in fp32 and cast
# the result to the model dtype. The patch computes them in the input dtype from the module's
# own inv_freq (its values are constants of the model: the stock fp32 model uses the same), in
# the layout the module is found to compute, by probing as for norms.


def _cat_layout(freqs: torch.Tensor) -> torch.Tensor:
    """[f₀ … fₙ, f₀ … fₙ] (Llama, Qwen, Gemma, Phi-3, GPT-NeoX, …)."""
    return torch.cat((freqs, freqs), dim=-1)


def _interleaved_layout(freqs: torch.Tensor) -> torch.Tensor:
    """[f₀, f₀, f₁, f₁, …] (Cohere)."""
    return torch.repeat_interleave(freqs, 2, dim=-1)


ROTARY_LAYOUTS = {"cat": _cat_layout, "interleaved": _interleaved_layout}


def _rotary_prefix(layer_type: str | None) -> str:
    """Gemma 3 keeps one inv_freq per layer type: ``{layer_type}_inv_freq``."""
    return f"{layer_type}_" if layer_type is not None else ""


def _rotary_angles_in_input_dtype(self, x, position_ids, layer_type=None):
    prefix = _rotary_prefix(layer_type)
    inv_freq = getattr(self, prefix + "inv_freq").to(device=x.device, dtype=x.dtype)
    scaling = getattr(self, prefix + "attention_scaling")
    emb = ROTARY_LAYOUTS[self.faithful_layout](position_ids[..., None].to(x.dtype) * inv_freq)
    return emb.cos() * scaling, emb.sin() * scaling


def _rotary_forward() -> Callable:
    """The patched forward, behind transformers' own dynamic-RoPE update where it exists (it
    recomputes inv_freq for dynamic and long RoPE before the angles are taken)."""
    try:
        from transformers.modeling_rope_utils import dynamic_rope_update
    except ImportError:
        return _rotary_angles_in_input_dtype
    return dynamic_rope_update(_rotary_angles_in_input_dtype)


def is_rotary_embedding(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RotaryEmbedding") and any(
        name.endswith("inv_freq") for name, _ in module.named_buffers(recurse=False)
    )


def _faithful_rotary_layout(module: nn.Module) -> tuple[str | None, str]:
    """(layout, '') for the layout whose angles match the stock module's, else (None, why)."""
    layer_types = getattr(module, "layer_types", None) or [None]
    inv_freq = getattr(module, _rotary_prefix(layer_types[0]) + "inv_freq")
    x = torch.zeros(1, dtype=torch.float64, device=inv_freq.device)
    positions = torch.arange(32, device=inv_freq.device)[None]
    try:
        with torch.no_grad():
            stock = [
                module(x, positions, **({"layer_type": t} if t is not None else {}))
                for t in layer_types
            ]
            for layout in ROTARY_LAYOUTS:
                module.faithful_layout = layout
                ours = [_rotary_angles_in_input_dtype(module, x, positions, t) for t in layer_types]
                if all(
                    _close(a, b.to(a.dtype), _PROBE_TOLERANCE)
                    for pair in zip(ours, stock)
                    for a, b in zip(*pair)
                ):
                    return layout, ""
    except (TypeError, AttributeError, RuntimeError) as exc:
        return None, f"cannot be probed ({type(exc).__name__}: {exc})"
    return None, f"computes none of the angle layouts {', '.join(ROTARY_LAYOUTS)}"


# A rotary application (``apply_rotary_pos_emb``, transformers' name for it in every RoPE family)
# that casts q and k to fp32 (Cohere) is swapped for the rotation it is found to compute, in the
# input dtype, inside the forward of each module that calls it (no other model is touched).
ROTARY_APPLICATION = "apply_rotary_pos_emb"


def _rotate_halves(x: torch.Tensor) -> torch.Tensor:
    """(x₁, x₂) ↦ (−x₂, x₁) over the two halves (Llama, Qwen, …)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x₀, x₁, x₂, x₃, …) ↦ (−x₁, x₀, −x₃, x₂, …) (Cohere)."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


ROTATIONS = {"halves": _rotate_halves, "pairs": _rotate_pairs}


def _rotary_application_in_input_dtype(original: Callable, rotation: str) -> Callable:
    """x·cos + rotate(x)·sin over the first cos.shape[-1] dims (the rest passes: partial
    rotary), with ``original``'s signature (its ``unsqueeze_dim`` and any other arguments)."""
    signature = inspect.signature(original)
    rotate = ROTATIONS[rotation]

    def rotary_application(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        q, k, cos, sin = (bound.arguments[n] for n in list(signature.parameters)[:4])
        dim = bound.arguments.get("unsqueeze_dim", 1)
        cos, sin = cos.unsqueeze(dim), sin.unsqueeze(dim)

        def rotated(x: torch.Tensor) -> torch.Tensor:
            width = cos.shape[-1]
            part = x[..., :width] * cos + rotate(x[..., :width]) * sin
            return torch.cat((part, x[..., width:]), dim=-1) if width < x.shape[-1] else part

        return rotated(q), rotated(k)

    return rotary_application


def _innermost(function: Callable) -> Callable:
    while hasattr(function, "__wrapped__"):
        function = function.__wrapped__
    return function


def rotary_application_of(module: nn.Module) -> Callable | None:
    """The rotary application ``module``'s forward calls, if it calls one."""
    forward = _innermost(type(module).forward)
    code = getattr(forward, "__code__", None)
    if code is None or ROTARY_APPLICATION not in code.co_names:
        return None
    return forward.__globals__.get(ROTARY_APPLICATION)


def _faithful_rotation(application: Callable) -> tuple[str | None, str]:
    """('', '') if ``application`` already computes in fp64; (rotation, '') for the rotation
    it computes below fp64; (None, why) if it computes neither."""
    # Any even width shows the rotation (a partial-rotary one rotates cos.shape[-1] dims).
    generator = torch.Generator().manual_seed(20240615)
    q, k = torch.randn(2, 1, 2, 3, 8, generator=generator, dtype=torch.float64)
    cos, sin = torch.randn(2, 1, 3, 8, generator=generator, dtype=torch.float64)
    recorder = PrecisionRecorder()
    with torch.no_grad():
        with recorder:
            stock = application(q, k, cos, sin)
        if not recorder.entries:
            return "", ""
        for rotation in ROTATIONS:
            ours = _rotary_application_in_input_dtype(application, rotation)(q, k, cos, sin)
            if all(_close(a, b.to(a.dtype), _PROBE_TOLERANCE) for a, b in zip(ours, stock)):
                return rotation, ""
    return None, f"its {ROTARY_APPLICATION} computes below fp64 and neither rotation"


def _with_global(function: Callable, name: str, value: Any) -> Callable:
    """A copy of ``function`` whose body sees the global ``name`` as ``value``, its decorators
    (functools.wraps wrappers holding the inner function in a closure) kept."""
    inner = getattr(function, "__wrapped__", None)
    if inner is None:
        copy = types.FunctionType(
            function.__code__,
            {**function.__globals__, name: value},
            function.__name__,
            function.__defaults__,
            function.__closure__,
        )
    else:
        new_inner = _with_global(inner, name, value)
        cells = function.__closure__ or ()
        holds = [_cell_holds(cell, inner) for cell in cells]
        if not any(holds):
            raise TypeError(f"{function.__qualname__} wraps its function in no closure cell")
        closure = tuple(types.CellType(new_inner) if h else c for c, h in zip(cells, holds))
        copy = types.FunctionType(
            function.__code__,
            function.__globals__,
            function.__name__,
            function.__defaults__,
            closure,
        )
        copy.__wrapped__ = new_inner
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__ = function.__qualname__
    return copy


def _cell_holds(cell, value) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False


def _patch_rotary_application(module: nn.Module, application: Callable, rotation: str) -> None:
    replacement = _rotary_application_in_input_dtype(application, rotation)
    forward = _with_global(type(module).forward, ROTARY_APPLICATION, replacement)
    module.forward = types.MethodType(forward, module)


# -- the audit: every op that computes below fp64 --------------------------------------------


@dataclass(frozen=True)
class BelowFp64:
    """Ops of one kind in one module that read or wrote floating values below fp64."""

    module: str  # the innermost module the op ran in ('' for the caller's own code)
    module_type: str
    op: str  # aten name, e.g. aten._to_copy.default
    dtypes: tuple[str, ...]  # the floating dtypes among its inputs and outputs
    count: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "module_type": self.module_type,
            "op": self.op,
            "dtypes": list(self.dtypes),
            "count": self.count,
        }


class PrecisionRecorder(TorchDispatchMode):
    """While active, records every op (below autograd, so forward-mode tangents too) whose
    floating inputs or outputs are not fp64, with the innermost module of ``model`` it ran in.

    Views and metadata queries are left out: they compute nothing, and the op that made the
    tensor they look at is listed already.
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__()
        self._counts: dict[tuple[str, str, str, tuple[str, ...]], int] = {}
        self.ops_seen = 0  # every op dispatched: an audit that saw none checked nothing
        self._stack: list[tuple[str, str]] = []
        self._handles = []
        if model is not None:
            for name, module in model.named_modules():
                name = _strip_wrapper(name)
                self._handles.append(module.register_forward_pre_hook(self._enter(name)))
                self._handles.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, name: str):
        def hook(module, args) -> None:
            self._stack.append((name, type(module).__name__))

        return hook

    def _leave(self, module, args, output) -> None:
        self._stack.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops_seen += 1
        if func.is_view:
            return out
        produced = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not any(t.is_floating_point() for t in produced):
            return out
        dtypes = {
            t.dtype
            for t in tree_leaves((args, kwargs)) + produced
            if isinstance(t, torch.Tensor) and t.is_floating_point()
        }
        if dtypes - {torch.float64}:
            module, module_type = self._stack[-1] if self._stack else ("", "")
            key = (module, module_type, str(func), tuple(sorted(str(d)[6:] for d in dtypes)))
            self._counts[key] = self._counts.get(key, 0) + 1
        return out

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    @property
    def entries(self) -> list[BelowFp64]:
        return [BelowFp64(*key, count) for key, count in self._counts.items()]


def describe_below_fp64(entries: list[BelowFp64]) -> str:
    """One line: the modules (layer indices as *) and the ops each ran below fp64."""
    by_module: dict[str, list[str]] = {}
    for e in entries:
        where = re.sub(r"\.\d+(?=\.|$)", ".*", e.module) or "outside the model's modules"
        where += f" [{e.module_type}]" if e.module_type else ""
        op = e.op.removeprefix("aten.").rsplit(".", 1)[0]
        ops = by_module.setdefault(where, [])
        if op not in ops:
            ops.append(op)
    total = sum(e.count for e in entries)
    parts = "; ".join(f"{where}: {', '.join(ops)}" for where, ops in by_module.items())
    return f"{total} ops ran below fp64 ({parts})"


def _strip_wrapper(name: str) -> str:
    return name.removeprefix("base_model.model.")  # PEFT's wrapper prefix


@dataclass
class FaithfulReport:
    """What ``make_faithful`` did: every norm-like module and MoE router, patched or not."""

    patched: dict[str, str] = field(default_factory=dict)  # module name → formula
    native: list[str] = field(default_factory=list)  # torch norms, already in input dtype
    refused: dict[str, str] = field(default_factory=dict)  # module name → why not

    @property
    def complete(self) -> bool:
        return not self.refused

    def reason(self) -> str:
        """The first unpatched module and why, for a one-line refusal."""
        if self.complete:
            return ""
        name, why = next(iter(self.refused.items()))
        name = name.removeprefix("base_model.model.")  # PEFT's wrapper prefix
        more = f" (and {len(self.refused) - 1} more)" if len(self.refused) > 1 else ""
        return f"{name} was not patched: {why}{more}"

    def summary(self) -> dict[str, Any]:
        formulas: dict[str, int] = {}
        for formula in self.patched.values():
            formulas[formula] = formulas.get(formula, 0) + 1
        return {"patched": len(self.patched), "formulas": formulas, "native": len(self.native)}


def _is_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Norm") or isinstance(module, _NATIVE_NORMS)


def make_faithful(model: nn.Module, rotary: bool = True) -> FaithfulReport:
    """Remove the fp32 casts from norms, MoE routers, rotary embeddings and attention; returns
    what was patched.

    Every module whose class name ends in ``Norm`` is either torch's own (kept), or patched
    with the formula it is found to compute, or listed in ``refused`` with the reason; so is
    every ``*RotaryEmbedding`` (its angles) and every module whose forward applies the rotary
    embedding below fp64. The caller decides what an incomplete report means (the loader
    refuses faithful mode). ``rotary=False`` leaves RoPE as transformers computes it (the
    built-in tiny checkpoint was trained so).
    """
    register_faithful_attention()
    report = FaithfulReport()
    rotations: dict[int, tuple[str | None, str]] = {}  # per rotary application, probed once
    for name, module in model.named_modules():
        if _is_norm(module):
            if isinstance(module, _NATIVE_NORMS):
                report.native.append(name)
                continue
            formula, why = _faithful_norm_formula(module)
            if formula is None:
                report.refused[name] = f"{type(module).__name__} {why}"
            else:
                module.forward = types.MethodType(NORM_FORMULAS[formula], module)
                report.patched[name] = formula
        elif is_router(module):
            ok, why = _faithful_router(module)
            if ok:
                module.forward = types.MethodType(_topk_router_in_input_dtype, module)
                report.patched[name] = "top-k router"
            else:
                report.refused[name] = f"{type(module).__name__} {why}"
        elif rotary and is_rotary_embedding(module):
            layout, why = _faithful_rotary_layout(module)
            if layout is None:
                report.refused[name] = f"{type(module).__name__} {why}"
            else:
                module.forward = types.MethodType(_rotary_forward(), module)
                report.patched[name] = f"RoPE angles ({layout})"
        elif rotary and (application := rotary_application_of(module)) is not None:
            _patch_rotation(name, module, application, rotations, report)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = FAITHFUL_ATTENTION
    return report


def _patch_rotation(name, module, application, rotations, report: FaithfulReport) -> None:
    if id(application) not in rotations:
        rotations[id(application)] = _faithful_rotation(application)
    rotation, why = rotations[id(application)]
    if rotation == "":  # already computes in fp64
        return
    try:
        if rotation is None:
            raise TypeError(why)
        _patch_rotary_application(module, application, rotation)
    except TypeError as exc:
        report.refused[name] = f"{type(module).__name__} {exc}"
        return
    report.patched[name] = f"rotary application ({rotation})"


def attention_for(dtype_name: str, device: str, faithful: bool) -> str:
    """Eager attention on CPU and for fp64 (forward-mode AD cannot go through SDPA kernels)."""
    if dtype_name == "fp64" and faithful:
        return FAITHFUL_ATTENTION
    return "eager"
