#!/usr/bin/env python
"""Wall time, tokens/s and peak device memory of each phase of one sweep, on one checkpoint.

The phases of DESIGN §2 in order: load + prepare (sample E and score it at θ₀), sample U_r,
the trainer's-loss gradient, the update vector v_r, the jvp oracles (to the order of --jet),
the covariance identity, then one
point per η (a real AdamW step, E scored again, and the mirrored step −η). Tokens are the
response tokens the phase generates or processes. Peak memory is
``torch.cuda.max_memory_allocated`` within the phase (None on the CPU).

Usage: python scripts/profile_phases.py [--checkpoint DIR] [--device cuda] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch


class PhaseTimer:
    def __init__(self, device: str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self.rows: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time a phase; the body may set ``row["tokens"]``."""
        row: dict[str, Any] = {"phase": name, "tokens": None}
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        yield row
        if self.cuda:
            torch.cuda.synchronize(self.device)
        row["seconds"] = time.perf_counter() - started
        row["tokens_per_s"] = row["tokens"] / row["seconds"] if row["tokens"] else None
        row["peak_memory_bytes"] = (
            torch.cuda.max_memory_allocated(self.device) if self.cuda else None
        )
        self.rows.append(row)
        print(format_row(row), flush=True)


def format_row(row: dict[str, Any]) -> str:
    tps = f"{row['tokens_per_s']:>10.0f}" if row["tokens_per_s"] else f"{'-':>10}"
    mem = row["peak_memory_bytes"]
    mem_text = f"{mem / 2**30:>8.2f}" if mem is not None else f"{'-':>8}"
    return f"  {row['phase']:<24} {row['seconds']:>8.2f} s  {tps} tok/s  {mem_text} GiB peak"


def profile(
    checkpoint: str | None, device: str, dtype: str | None, etas: list[float], **kw
) -> dict:
    """The sweep's own phases, opened as the sweep opens them (configure + prepare: the same
    training setup, seed, oracles: the jet's order and the covariance identity included)."""
    from entropy_lab.config import Measurement
    from entropy_lab.protocol import (
        Direction,
        _crude_forecasts,
        configure,
        jet_along,
        measure_point,
        prepare,
        repeat_seed,
        sample_update_batch,
    )
    from entropy_lab.theory import covariance_identity_slope

    timer = PhaseTimer(device)
    settings = {k: kw.pop(k) for k in ("buffer_size", "num_generations") if k in kw}
    started = time.perf_counter()
    with timer.phase("load + prepare (E)") as row:
        configured = configure(
            checkpoint,
            etas,
            measurement=Measurement(**kw),
            dtype=dtype,
            device=device,
            settings=settings,
        )
        load_s = time.perf_counter() - started  # the load ends here; prepare starts
        print(configured.training.table())
        setup = prepare(configured)
        row["tokens"] = setup.eval_batch.num_response_tokens
    cfg = setup.cfg
    repeat = 0
    with timer.phase("sample U") as row:
        update = sample_update_batch(setup, repeat)
        row["tokens"] = update.sequences.num_response_tokens
    with timer.phase("gradient") as row:
        gradient = setup.updater.gradient(update)
        row["tokens"] = update.sequences.num_response_tokens
    with timer.phase("update vector"):
        vector = setup.updater.update_vector(gradient)
    with timer.phase(f"jvp to order {cfg.jet}") as row:
        derivatives = jet_along(setup, vector)
        row["tokens"] = setup.eval_batch.num_response_tokens
    identity = None
    if cfg.identity_check:
        with timer.phase("covariance identity") as row:
            identity = covariance_identity_slope(
                setup.scorer, setup.eval_batch, setup.updater.theta0, vector
            )
            row["tokens"] = setup.eval_batch.num_response_tokens
    direction = Direction(
        repeat=repeat,
        seed=repeat_seed(cfg.seed, repeat),
        update=update,
        gradient=gradient,
        vector=vector,
        derivatives=derivatives,
        seconds=0.0,
        identity_slope=identity,
        forecasts=_crude_forecasts(gradient),
    )
    for eta in etas:
        with timer.phase(f"η={eta:g} (step, score, −η)") as row:
            measure_point(setup, direction, eta)
            row["tokens"] = 2 * setup.eval_batch.num_response_tokens
    ck = setup.checkpoint
    return {
        "checkpoint": ck.metadata["path"],
        "device": device,
        "dtype": cfg.dtype,
        "eval_size": cfg.eval_size,
        "buffer_size": cfg.buffer_size,
        "num_generations": cfg.num_generations,
        "max_new_tokens": cfg.max_new_tokens,
        "load_s": load_s,
        "trainable_parameters": ck.metadata["trainable_parameters"],
        "total_parameters": ck.metadata["total_parameters"],
        "phases": timer.rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="default: the built-in tiny one")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp64", "bf16"])
    parser.add_argument("--learning-rates", default="1e-6,1e-5")
    parser.add_argument("--eval-size", type=int, default=None)
    parser.add_argument("--buffer-size", type=int, default=32)
    parser.add_argument("--num-generations", type=int, default=None, help="G (default: config)")
    parser.add_argument(
        "--target-s", type=float, default=None, help="print the measurement time against this"
    )
    parser.add_argument(
        "--jet", type=int, choices=[1, 2, 3], default=1, help="jvp order (as the sweep's --jet)"
    )
    parser.add_argument("--json", help="also write the profile to this file")
    args = parser.parse_args(argv)
    etas = [float(x) for x in args.learning_rates.split(",")]
    print(f"phases on {args.device} ({args.dtype}):")
    result = profile(
        args.checkpoint,
        args.device,
        args.dtype,
        etas,
        eval_size=args.eval_size,
        buffer_size=args.buffer_size,
        jet=args.jet,
        **({"num_generations": args.num_generations} if args.num_generations else {}),
    )
    # The measurement itself: everything after loading the checkpoint.
    phases = result["phases"]
    result["measurement_s"] = sum(r["seconds"] for r in phases) - (result["load_s"] or 0.0)
    line = (
        f"measurement (E {result['eval_size']} × 1, U {result['buffer_size']} × "
        f"{result['num_generations']}, {len(etas)} η, true + oracles): "
        f"{result['measurement_s']:.1f} s"
    )
    if args.target_s:
        result["target_s"] = args.target_s
        verdict = "met" if result["measurement_s"] <= args.target_s else "MISSED"
        line += f"  (target ≤ {args.target_s:g} s: {verdict})"
    print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
