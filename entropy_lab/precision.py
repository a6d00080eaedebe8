"""Runtime precision: dtype choice, TF32 off, and the faithful fp64 mode.

Stock HF models cast RMSNorm, MoE routers and the attention softmax to fp32 even when the
model is fp64, which caps the resolution of a small ΔH at fp32's. Faithful fp64 removes those
casts: each norm computes its own formula (w·x̂, or (1 + w)·x̂ in Gemma) in its input dtype,
routers their softmax, and attention goes through a registered attention function (softmax
in the query dtype, softcap and scaling kept) whose mask function is registered too, so the
causal, padding and sliding-window masks are kept.
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

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


def make_faithful(model: nn.Module) -> FaithfulReport:
    """Remove the fp32 casts from norms, MoE routers and attention; returns what was patched.

    Every module whose class name ends in ``Norm`` is either torch's own (kept), or patched
    with the formula it is found to compute, or listed in ``refused`` with the reason; the
    caller decides what an incomplete report means (the loader refuses faithful mode).
    """
    register_faithful_attention()
    report = FaithfulReport()
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
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = FAITHFUL_ATTENTION
    return report


def attention_for(dtype_name: str, device: str, faithful: bool) -> str:
    """Eager attention on CPU and for fp64 (forward-mode AD cannot go through SDPA kernels)."""
    if dtype_name == "fp64" and faithful:
        return FAITHFUL_ATTENTION
    return "eager"
