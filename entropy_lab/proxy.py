"""Random Qwen2-shaped proxies of a real model, built in memory (no download).

A proxy has the architecture and, where it matters for cost, the shapes of a user's model
(Qwen2.5's vocabulary of 151,936 by default) with random weights and a LoRA adapter on every
projection whose B is nonzero (as a trained adapter's is). Used by
``benchmarks/jvp_scaling.py`` and the memory forecast's tests (``entropy_lab.memory``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from entropy_lab.rollout import SequenceBatch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QWEN25_VOCAB = 151_936


@dataclass(frozen=True)
class ProxySpec:
    """The proxy's shapes; heads follow the hidden size as Qwen2.5's do (64 per head)."""

    vocab: int = QWEN25_VOCAB
    hidden: int = 512
    layers: int = 4
    rank: int = 16
    dtype: str = "fp32"
    device: str = "cpu"
    seed: int = 0
    max_positions: int = 256

    @property
    def intermediate(self) -> int:
        return int(2.75 * self.hidden)


def qwen2_proxy(spec: ProxySpec) -> torch.nn.Module:
    """A PEFT LoRA model on a random Qwen2 of ``spec``'s shapes, eager attention (forward-mode
    AD has no SDPA rule), in eval mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from entropy_lab.precision import torch_dtype

    config = Qwen2Config(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=max(1, spec.hidden // 64),
        num_key_value_heads=max(1, spec.hidden // 256),
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(config).to(torch_dtype(spec.dtype)).to(spec.device).eval()
    lora = LoraConfig(r=spec.rank, lora_alpha=2 * spec.rank, target_modules=LORA_TARGETS)
    model = get_peft_model(model, lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at 0; a trained adapter has B ≠ 0
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def random_batch(
    vocab: int, rows: int, length: int, prompt_length: int, seed: int = 0, device: str = "cpu"
) -> SequenceBatch:
    """``rows`` random sequences of ``length`` tokens, the last ``length − prompt_length`` of
    each a response; row i answers prompt i."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (rows, length), generator=gen)
    response = torch.zeros_like(ids)
    response[:, prompt_length:] = 1
    batch = SequenceBatch(ids, torch.ones_like(ids), response, torch.arange(rows))
    return batch.require_response_tokens("the proxy's batch").to(device)
