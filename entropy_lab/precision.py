"""Runtime precision: dtype choice, TF32 off, and the faithful fp64 mode.

Stock HF models cast RMSNorm and the attention softmax to fp32 even when the model is fp64,
which caps the resolution of a small ΔH at fp32's. Faithful fp64 removes those casts:
RMSNorm modules compute in their input dtype, and attention goes through a registered
attention function (softmax in the query dtype) whose mask function is registered too, so
the causal and padding masks are kept.
"""

from __future__ import annotations

import types
import warnings
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


def _faithful_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **_):
    """Eager attention with the softmax kept in the query dtype."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
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


def _rms_norm_in_input_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def make_faithful(model: nn.Module) -> int:
    """Remove the fp32 casts from RMSNorm and attention; returns how many norms were patched."""
    register_faithful_attention()
    patched = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_in_input_dtype, module)
            patched += 1
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = FAITHFUL_ATTENTION
    return patched


def attention_for(dtype_name: str, device: str, faithful: bool) -> str:
    """Eager attention on CPU and for fp64 (forward-mode AD cannot go through SDPA kernels)."""
    if dtype_name == "fp64" and faithful:
        return FAITHFUL_ATTENTION
    return "eager"
