"""The README's architecture table (issue #15): for each tiny random architecture of the test
matrix (``tiny.ARCHITECTURES``), faithful fp64 H(θ₀) against the stock fp32 model's on the
same evaluation batch E, and ΔH/(η·∇H·v) in faithful fp64 at η = 1e-9 and 1e-7; then what the
load-time checks cost against one evaluation of E, on the tiny models and on the built-in
tiny checkpoint at the quick run's E = 256.

python benchmarks/architectures.py                 # all architectures, E = 32
python benchmarks/architectures.py gemma2 phi3     # some
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from entropy_lab import checkpoint
from entropy_lab.checkpoint import load_checkpoint
from entropy_lab.entropy import EntropyScorer, routers_of
from entropy_lab.protocol import direction, measure_point, open_experiment
from entropy_lab.theory import check_forward_ad
from entropy_lab.tiny import (
    ARCHITECTURE_TASK,
    ARCHITECTURES,
    build_tiny_architecture,
    ensure_tiny_checkpoint,
)


def _setup(path, dtype: str, eval_size: int, task: str | None):
    flags = {"buffer_size": 4, "num_generations": 4, "prompts": task} if task else {}
    return open_experiment(
        path,
        [1e-9],
        dtype=dtype,
        settings=flags,
        num_repeats=2,
        eval_size=eval_size,
        jet=1,
        identity_check=False,
        symmetric_check=False,
    )


def _median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _load_check_seconds(path, dtype: str) -> float:
    """Median over 5 loads of the time ``verify_model_function`` takes inside the load."""
    times = []
    verify = checkpoint.verify_model_function

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return verify(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - started)

    checkpoint.verify_model_function = timed
    try:
        for _ in range(5):
            load_checkpoint(path, dtype=dtype)
    finally:
        checkpoint.verify_model_function = verify
    return statistics.median(times)


def load_check_cost(path, setup) -> dict:
    """The load-time checks (fp32 and faithful fp64 loads) and the sweep's jvp probe (third
    order), against one evaluation of E at θ₀ (``scorer.measure``), medians of 5."""
    fp32 = _load_check_seconds(path, "fp32")
    fp64 = _load_check_seconds(path, "fp64")
    policy = setup.checkpoint.policy
    probe = _median_seconds(lambda: check_forward_ad(policy, 3))
    evaluation = _median_seconds(
        lambda: setup.scorer.measure(setup.eval_batch, setup.reference_logprob)
    )
    return {
        "load_checks_fp32_s": fp32,
        "load_checks_fp64_s": fp64,
        "jvp_probe_order3_s": probe,
        "eval_of_E_fp64_s": evaluation,
    }


def measure(name: str, root: Path, eval_size: int) -> dict:
    path = build_tiny_architecture(name, root / name)
    setup64 = _setup(path, "fp64", eval_size, ARCHITECTURE_TASK)
    stock = load_checkpoint(path, dtype="fp32").policy
    with torch.no_grad():
        sums = EntropyScorer(stock, setup64.cfg.temperature).global_sums(setup64.eval_batch)
    h32 = float(sums.entropy.sum() / sums.tokens.sum())
    h64 = setup64.baseline.conditional
    d = direction(setup64, 0)
    ratios = {}
    for eta in (1e-9, 1e-7):
        r = measure_point(setup64, d, eta)
        ratios[f"{eta:g}"] = r["entropy_change"] / r["first_order_prediction"]
        routing = r["routing_changed_fraction"]
    meta = setup64.checkpoint.metadata
    return {
        "architecture": meta["architecture"],
        "logits_transform": meta["logits_transform"],
        "faithful": meta["faithful"]["formulas"],
        "native_norms": meta["faithful"]["native"],
        "moe_routers": len(routers_of(setup64.checkpoint.policy)),
        "h0": h64,
        "faithful_vs_stock_fp32": abs(h64 - h32) / abs(h32),
        "slope": d.derivatives.slope_policy,
        "fp64_ratio": ratios,
        "routing_changed_fraction": routing,
        "cost": load_check_cost(path, setup64),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(ARCHITECTURES))
    parser.add_argument("--eval-size", type=int, default=32)
    parser.add_argument("--output", help="write the results as JSON")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.names:
            out[name] = row = measure(name, Path(tmp), args.eval_size)
            print(
                f"{name:10s} {row['architecture']:22s} faithful−stock {row['faithful_vs_stock_fp32']:.1e}"
                f"  ratio@1e-9 {row['fp64_ratio']['1e-09']:.7f}  @1e-7 {row['fp64_ratio']['1e-07']:.7f}"
                f"  ∇H·v {row['slope']:+.3f}  {row['cost']}",
                flush=True,
            )
    tiny = ensure_tiny_checkpoint()
    setup = _setup(tiny, "fp64", 256, None)
    out["builtin_tiny_E256"] = cost = load_check_cost(tiny, setup)
    print("built-in tiny checkpoint, E = 256:", cost)
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
