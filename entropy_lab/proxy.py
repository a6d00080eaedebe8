"""A random Qwen2-shaped model with a LoRA adapter, and a random batch for it: a stand-in
for a user's model at a chosen vocabulary, hidden size and depth, where no checkpoint of
that size is at hand (benchmarks, ``entropy-lab bench``'s real-vocabulary section, the memory
forecast's tests)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from entropy_lab.rollout import SequenceBatch

QWEN25_VOCAB = 151_936  # Qwen2.5's vocabulary: the default real one


def build_proxy(
    vocab: int,
    hidden: int,
    layers: int,
    dtype: str,
    *,
    rank: int = 16,
    max_positions: int = 256,
    device: str = "cpu",
    seed: int = 0,
    faithful: bool = False,
) -> torch.nn.Module:
    """Qwen2 (tied embeddings, eager attention: forward-mode AD has no SDPA rule) with LoRA
    of ``rank`` on every projection, B drawn ≠ 0 as in a trained adapter. ``faithful``: fp64
    without the stock fp32 casts, as the sweep loads an fp64 checkpoint."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from entropy_lab.precision import make_faithful, torch_dtype
    from entropy_lab.tiny import LORA_TARGETS  # every projection, as the tiny checkpoint

    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(2.75 * hidden),
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch_dtype(dtype)).to(device).eval()
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS)
    model = get_peft_model(model, lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at 0; a trained adapter has B ≠ 0
            torch.nn.init.normal_(p, std=0.02)
    if faithful and dtype == "fp64":
        make_faithful(model)
    return model


def random_batch(
    vocab: int, rows: int, length: int, prompt_length: int, device: str = "cpu", seed: int = 0
) -> SequenceBatch:
    """``rows`` sequences of ``length`` random tokens, the first ``prompt_length`` of each the
    prompt; an error naming the problem when that leaves no response token."""
    import torch

    from entropy_lab.rollout import SequenceBatch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (rows, length), generator=gen)
    response = torch.zeros_like(ids)
    response[:, prompt_length:] = 1
    batch = SequenceBatch(ids, torch.ones_like(ids), response, torch.arange(rows))
    return batch.require_response_tokens("the proxy's batch").to(device)
