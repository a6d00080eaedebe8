"""Does the jvp's cost relative to a forward pass shrink with the model? (issue #8)

A random Qwen2-shaped model of the given size with LoRA on every projection, a random
batch, and the same timings as ``entropy-lab bench``'s jvp section: bare forward, entropy
evaluation, jvp to first, second and third order, and the trunk alone (forward vs jvp),
plus a matmul against an all-zero tangent at the MLP's shape.

python benchmarks/jvp_scaling.py                                # hidden 512, 4 layers, CPU
python benchmarks/jvp_scaling.py --hidden 1536 --layers 28 --vocab 151936 --device cuda
python benchmarks/jvp_scaling.py --stock-mm       # with torch's own ZeroTensor kernels
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch
from torch.func import functional_call, jvp

from entropy_lab import theory
from entropy_lab.bench import bare_forward, interleaved_medians, zero_tangent_matmuls
from entropy_lab.entropy import EntropyScorer
from entropy_lab.proxy import build_proxy, random_batch
from entropy_lab.rollout import SequenceBatch
from entropy_lab.theory import ResponseHidden, _prefixed, directional_derivatives, forward_ad_safe


def build(args) -> tuple[torch.nn.Module, SequenceBatch]:
    model = build_proxy(
        args.vocab,
        args.hidden,
        args.layers,
        args.dtype,
        rank=args.rank,
        max_positions=args.length,
        device=args.device,
        seed=args.seed,
    )
    return model, random_batch(
        args.vocab, args.rows, args.length, args.prompt_length, args.device, args.seed
    )


def measure(args) -> dict:
    model, batch = build(args)
    scorer = EntropyScorer(model, 1.0, args.chunk_tokens)
    theta0 = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator(device=args.device).manual_seed(args.seed + 1)
    v = {n: torch.randn(p.shape, generator=gen, device=p.device).to(p) for n, p in theta0.items()}
    with torch.no_grad():
        reference = scorer(batch).logprob
    trunk = ResponseHidden(scorer)

    def derivatives(order: int):
        return lambda: directional_derivatives(
            scorer, batch, reference, theta0, v, order >= 2, order >= 3
        )

    def trunk_jvp():
        with torch.no_grad(), forward_ad_safe(model):
            jvp(lambda p: functional_call(trunk, _prefixed(p), (batch,)), (theta0,), (v,))

    def trunk_forward():
        with torch.no_grad():
            trunk(batch)

    _, matmuls = zero_tangent_matmuls(model, batch.num_response_tokens)
    fns = {
        "forward": lambda: bare_forward(model, batch),
        "eval": lambda: scorer.measure(batch, reference),
        "jvp": derivatives(1),
        "nested_jvp": derivatives(2),
        "third_order_jvp": derivatives(3),
        "trunk_forward": trunk_forward,
        "trunk_jvp": trunk_jvp,
        **matmuls,
    }
    if args.no_third_order:
        del fns["third_order_jvp"]
    seconds = interleaved_medians(fns, args.repeats, args.device)
    ratios = {
        f"{k}_over_forward": seconds[k] / seconds["forward"]
        for k in ("eval", "jvp", "nested_jvp", "third_order_jvp")
        if k in seconds
    }
    ratios["jvp_over_eval"] = seconds["jvp"] / seconds["eval"]
    ratios["trunk_jvp_over_trunk_forward"] = seconds["trunk_jvp"] / seconds["trunk_forward"]
    ratios["zero_tangent_mm_over_mm"] = seconds["zero_tangent_mm"] / seconds["mm"]
    return {"settings": vars(args), "threads": torch.get_num_threads(), "seconds": seconds,
            "ratios": ratios}  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=192)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp64", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-third-order", action="store_true")
    parser.add_argument(
        "--stock-mm",
        action="store_true",
        help="torch's own ZeroTensor kernels (x·Ẇ in full for all-zero Ẇ)",
    )
    parser.add_argument("--output", default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    if not 0 <= args.prompt_length < args.length:
        parser.error(
            f"--prompt-length {args.prompt_length} leaves no response tokens in --length "
            f"{args.length} (it must be below {args.length})"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stock_mm:
        theory.zero_tangent_kernels = contextlib.nullcontext
    result = measure(args)
    for key, value in result["seconds"].items():
        print(f"{key:18} {value * 1e3:10.1f} ms")
    for key, value in result["ratios"].items():
        print(f"{key:30} {value:6.2f}×")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
