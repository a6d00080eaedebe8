"""The README's architecture table (issues #15, #24): for each tiny random architecture of the
test matrix (``tiny.ARCHITECTURES``, and Cohere and Granite: ``tiny.MORE_ARCHITECTURES``),
the precision audit's findings before the rotary patches and after them, faithful fp64 H(θ₀)
against the stock fp32 model's on the same evaluation batch E, and in faithful fp64
ΔH/(η·∇H·v) at η = 1e-9 and 1e-7 with the symmetric residual |ΔH(η) + ΔH(−η)| / |ΔH(η)| at
1e-9; then what the load-time checks (the audit on its own too) cost against one evaluation
of E, on the tiny models and on the built-in tiny checkpoint at the quick run's E = 256.

python benchmarks/architectures.py                 # all architectures, E = 32
python benchmarks/architectures.py gemma2 cohere   # some
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from entropy_lab import checkpoint, precision
from entropy_lab.checkpoint import load_checkpoint
from entropy_lab.config import Measurement
from entropy_lab.entropy import EntropyScorer, routers_of
from entropy_lab.protocol import direction, measure_point, open_experiment
from entropy_lab.theory import check_forward_ad
from entropy_lab.tiny import (
    ARCHITECTURE_TASK,
    ARCHITECTURES,
    MORE_ARCHITECTURES,
    build_tiny_architecture,
    ensure_tiny_checkpoint,
)


def _setup(path, dtype: str, eval_size: int, task: str | None):
    flags = {"buffer_size": 4, "num_generations": 4, "prompts": task} if task else {}
    return open_experiment(
        path,
        [1e-9],
        measurement=Measurement(num_repeats=2, eval_size=eval_size, jet=1, identity_check=False),
        dtype=dtype,
        settings=flags,
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


def _audit_seconds(path) -> float:
    """Median over 5 faithful fp64 loads of the audit's own time (timed around the probe that
    runs it; the metadata keeps no timing, so a resumed sweep's analysis stays identical)."""
    times = []
    probe = checkpoint._audited_probe

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return probe(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - started)

    checkpoint._audited_probe = timed
    try:
        for _ in range(5):
            load_checkpoint(path, dtype="fp64")
    finally:
        checkpoint._audited_probe = probe
    return statistics.median(times)


def load_check_cost(path, setup) -> dict:
    """The load-time checks (fp32 and faithful fp64 loads; the precision audit inside the
    latter) and the sweep's jvp probe (third order), against one evaluation of E at θ₀
    (``scorer.measure``), medians of 5."""
    fp32 = _load_check_seconds(path, "fp32")
    fp64 = _load_check_seconds(path, "fp64")
    audit = _audit_seconds(path)
    policy = setup.checkpoint.policy
    probe = _median_seconds(lambda: check_forward_ad(policy, 3))
    evaluation = _median_seconds(
        lambda: setup.scorer.measure(setup.eval_batch, setup.reference_logprob)
    )
    return {
        "load_checks_fp32_s": fp32,
        "load_checks_fp64_s": fp64,
        "precision_audit_s": audit,
        "jvp_probe_order3_s": probe,
        "eval_of_E_fp64_s": evaluation,
    }


@contextlib.contextmanager
def before_the_rotary_patches(audit: bool):
    """Faithful fp64 as it was before the rotary patches; ``audit=False``: not refused for it."""
    make_faithful, entries = checkpoint.make_faithful, precision.PrecisionRecorder.entries
    checkpoint.make_faithful = lambda model: precision.make_faithful(model, rotary=False)
    if not audit:
        precision.PrecisionRecorder.entries = property(lambda self: [])
    try:
        yield
    finally:
        checkpoint.make_faithful = make_faithful
        precision.PrecisionRecorder.entries = entries


def before_patches(path, eval_size: int) -> dict:
    """What the precision audit lists before the rotary patches, and the resolution at 1e-9
    then (the same E: it is sampled before any step, with the same seed)."""
    with before_the_rotary_patches(audit=True):
        try:
            load_checkpoint(path, dtype="fp64")
            listed = "nothing"
        except checkpoint.CheckpointError as exc:
            listed = str(exc).split("the precision audit found ", 1)[-1].split("; run with")[0]
    with before_the_rotary_patches(audit=False):
        setup = _setup(path, "fp64", eval_size, ARCHITECTURE_TASK)
        at9 = resolution(setup, direction(setup, 0), 1e-9)
    return {"audit": listed, "fp64_1e-09": at9}


def resolution(setup, d, eta: float) -> dict:
    r = measure_point(setup, d, eta)
    change = r.entropy_change
    return {
        "ratio": change / r.first_order_prediction,
        "symmetric_residual": abs(change + r.entropy_change_negative) / abs(change),
        "routing_changed_fraction": r.routing_changed_fraction,
    }


# Granite divides its logits by 4: after the default 40 SFT steps no sampled answer scored,
# so the RL gradient (and ∇H·v) was 0; at 80 steps the rewards vary (0.31, 0.13).
BUILD = {"granite": {"sft_steps": 80}}


def measure(name: str, root: Path, eval_size: int) -> dict:
    path = build_tiny_architecture(name, root / name, **BUILD.get(name, {}))
    before = before_patches(path, eval_size)
    setup64 = _setup(path, "fp64", eval_size, ARCHITECTURE_TASK)
    stock = load_checkpoint(path, dtype="fp32").policy
    with torch.no_grad():
        sums = EntropyScorer(stock, setup64.cfg.temperature).global_sums(setup64.eval_batch)
    h32 = float(sums.entropy.sum() / sums.tokens.sum())
    h64 = setup64.baseline.conditional
    d = direction(setup64, 0)
    points = {f"{eta:g}": resolution(setup64, d, eta) for eta in (1e-9, 1e-7)}
    meta = setup64.checkpoint.metadata
    return {
        "architecture": meta["architecture"],
        "logits_transform": meta["logits_transform"],
        "before_rotary_patches": before,
        "audit_after": meta["faithful"]["precision_audit"]["summary"] or "nothing",
        "faithful": meta["faithful"]["formulas"],
        "native_norms": meta["faithful"]["native"],
        "moe_routers": len(routers_of(setup64.checkpoint.policy)),
        "h0": h64,
        "faithful_vs_stock_fp32": abs(h64 - h32) / abs(h32),
        "slope": d.derivatives.slope_policy,
        "fp64": points,
        "cost": load_check_cost(path, setup64),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=[*ARCHITECTURES, *MORE_ARCHITECTURES])
    parser.add_argument("--eval-size", type=int, default=32)
    parser.add_argument("--output", help="write the results as JSON")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.names:
            out[name] = row = measure(name, Path(tmp), args.eval_size)
            at9, at7 = row["fp64"]["1e-09"], row["fp64"]["1e-07"]
            print(
                f"{name:10s} {row['architecture']:22s} faithful−stock {row['faithful_vs_stock_fp32']:.1e}"
                f"  ratio@1e-9 {at9['ratio']:.7f} sym {at9['symmetric_residual']:.1e}"
                f"  @1e-7 {at7['ratio']:.7f}  ∇H·v {row['slope']:+.3f}  {row['cost']}\n"
                f"    before: {row['before_rotary_patches']}\n"
                f"    audit after: {row['audit_after']}",
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
