"""The base model as the trainer's bitsandbytes quantization left it (DESIGN §6).

A QLoRA trainer's policy is the adapter on a *quantized* base: its function is that of the
dequantized weights, not of the checkpoint's full-precision base (on the tiny model the two
differ by 0.29 nats per token in log π). This module quantizes every weight that
transformers' bitsandbytes integration would quantize with bitsandbytes' own
``quantize_4bit`` and replaces it by ``dequantize_4bit``'s result, held in the measurement
dtype: the 4-bit code × absmax values are exact in fp32 and fp64, so the faithful fp64 mode
keeps differentiating the trainer's function. What transformers leaves unquantized
(lm_head, embeddings, norms) stays as it is.

``verify_against_bitsandbytes`` holds the result to a real bitsandbytes 4-bit model (compute
dtype fp32) with the same adapter, at load.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from entropy_lab.errors import CheckpointError, ConfigError

# bitsandbytes' 4-bit block size as transformers' Linear4bit uses it (not configurable there).
BLOCKSIZE = 64
# Logits of the dequantized model against bitsandbytes' own 4-bit forward, relative to the
# largest |logit| (compute dtype fp32: both sides are fp32 matmuls of the same weights).
TOLERANCE = 1e-5


@dataclass(frozen=True)
class Quantization:
    """How the trainer quantized its base: ``kind`` none / fp4 / nf4 / int8, double
    quantization of the absmax, and the dtype the weights had when they were quantized
    (the ``dtype`` the trainer passed to from_pretrained)."""

    kind: str = "none"
    double: bool = False
    load_dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, settings: dict[str, Any]) -> Quantization:
        """From the resolved settings (base_quantization, base_quant_double, base_load_dtype)."""
        kind = settings.get("base_quantization") or "none"
        if kind == "none":
            return cls()
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        return cls(
            kind,
            bool(settings.get("base_quant_double")),
            dtypes[settings.get("base_load_dtype") or "fp32"],
        )

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def describe(self) -> str:
        if not self.active:
            return "none"
        extra = ", double quant" if self.double else ""
        return f"bitsandbytes 4-bit {self.kind.upper()}{extra}, blocksize {BLOCKSIZE}"


def _bitsandbytes():
    try:
        import bitsandbytes.functional as functional
    except ImportError:
        raise ConfigError(
            "the checkpoint's base was trained quantized (base_quantization); reproducing it "
            "needs bitsandbytes: pip install 'entropy-lab[quantized]' (or pass "
            "--base-quantization none to measure the unquantized base)"
        ) from None
    return functional


def quantized_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linear layers transformers' bitsandbytes integration quantizes: every nn.Linear of
    the base except the output embedding (lm_head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and module is not head
    ]


@torch.no_grad()
def dequantized_weight(weight: torch.Tensor, quantization: Quantization) -> torch.Tensor:
    """``weight`` through bitsandbytes' quantize_4bit / dequantize_4bit, as the trainer's
    Linear4bit holds it, in ``weight``'s own dtype."""
    functional = _bitsandbytes()
    source = weight.detach().to(quantization.load_dtype).contiguous()
    packed, state = functional.quantize_4bit(
        source,
        blocksize=BLOCKSIZE,
        compress_statistics=quantization.double,
        quant_type=quantization.kind,
    )
    return dequantize_fp32(packed, state).to(weight.dtype)


def dequantize_fp32(packed: torch.Tensor, state) -> torch.Tensor:
    """code × absmax in fp32, as bitsandbytes' 4-bit forward dequantizes for an fp32 compute
    dtype (``dequantize_4bit`` on its own rounds to the dtype the weight was quantized from)."""
    state = copy.copy(state)
    state.dtype = torch.float32
    return _bitsandbytes().dequantize_4bit(packed, state)


def apply_quantization(base: nn.Module, quantization: Quantization) -> dict[str, Any]:
    """Replace the base's quantizable weights by their dequantized 4-bit values, in place
    (call before the adapter is attached). Returns what the metadata records."""
    if quantization.kind == "int8":
        raise ConfigError(
            "base_quantization int8: LLM.int8 splits each matmul by the activations' outliers "
            "(a function of the input, not of the weights), which this measurement does not "
            "reproduce; pass --base-quantization none to measure the unquantized base"
        )
    layers = quantized_linears(base)
    with torch.no_grad():
        # The trainer loaded the base in load_dtype: every weight holds that dtype's value
        # (peft's prepare_model_for_kbit_training then keeps the unquantized ones in fp32).
        for param in base.parameters():
            if param.is_floating_point():
                param.copy_(param.to(quantization.load_dtype))
        for _, layer in layers:
            layer.weight.copy_(dequantized_weight(layer.weight, quantization))
    return {
        "base_quantization": quantization.describe(),
        "quantized_layers": len(layers),
        "quantized_from": str(quantization.load_dtype).replace("torch.", ""),
    }


def verify_against_bitsandbytes(
    policy: nn.Module,
    base_source: str,
    adapter_dir: str | None,
    quantization: Quantization,
    batch,
    layers: int,
) -> dict[str, Any]:
    """Hold the dequantized base to a real bitsandbytes 4-bit model of the same base (and
    adapter), loaded as the trainer loads it: every quantized layer's weight must equal
    bitsandbytes' own dequantization exactly, and the logits on ``batch`` must agree to ``TOLERANCE`` (compute dtype fp32). Refuses otherwise."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _bitsandbytes()
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.kind,
        bnb_4bit_use_double_quant=quantization.double,
        bnb_4bit_compute_dtype=torch.float32,
    )
    reference = AutoModelForCausalLM.from_pretrained(
        base_source,
        quantization_config=config,
        dtype=quantization.load_dtype,
        attn_implementation="eager",
        local_files_only=True,
    )
    _unquantized_to_fp32(reference)
    theirs = {
        name: module
        for name, module in reference.named_modules()
        if hasattr(getattr(module, "weight", None), "quant_state")
    }
    base = _base_of(policy)
    if len(theirs) != layers:
        _refuse(quantization, f"bitsandbytes quantizes {len(theirs)} layers, this base {layers}")
    for name, module in theirs.items():
        ours = base.get_submodule(name)
        ours = getattr(ours, "base_layer", ours)  # under a LoRA wrapper
        expected = dequantize_fp32(module.weight.data, module.weight.quant_state)
        if not torch.equal(ours.weight.detach().cpu(), expected.to(ours.weight.dtype)):
            _refuse(quantization, f"{name}'s dequantized weight differs from bitsandbytes'")
    difference = _logits_difference(policy, reference, adapter_dir, batch)
    if not difference <= TOLERANCE:
        _refuse(quantization, f"logits differ by {difference:.2e} (relative, > {TOLERANCE:g})")
    return {"quantized_weights_equal": True, "quantized_logits_difference": difference}


def _unquantized_to_fp32(model: nn.Module) -> None:
    """The weights bitsandbytes leaves unquantized, in fp32 with their load-dtype values (as
    prepare_model_for_kbit_training holds them), so the 4-bit layers compute in fp32."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and not hasattr(param, "quant_state"):
                setattr(module, name, nn.Parameter(param.data.float(), requires_grad=False))


def _base_of(policy: nn.Module) -> nn.Module:
    return policy.get_base_model() if hasattr(policy, "get_base_model") else policy


def _logits_difference(policy, reference, adapter_dir, batch) -> float:
    if adapter_dir is not None:
        from peft import PeftModel

        reference = PeftModel.from_pretrained(reference, adapter_dir)
    reference.eval()
    device = next(policy.parameters()).device
    with torch.no_grad():
        expected = reference(
            input_ids=batch.input_ids.cpu(), attention_mask=batch.attention_mask.cpu()
        ).logits.double()
        got = (
            policy(
                input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
            )
            .logits.double()
            .cpu()
        )
    real = batch.attention_mask.cpu().bool()
    return float((got - expected)[real].abs().max() / expected[real].abs().max())


def _refuse(quantization: Quantization, reason: str) -> None:
    raise CheckpointError(
        f"the dequantized {quantization.describe()} base does not compute bitsandbytes' 4-bit "
        f"function: {reason}; check base_quantization / base_quant_double against the "
        "trainer's BitsAndBytesConfig"
    )
