#!/usr/bin/env python
"""Compare two sweeps point by point, e.g. ``torchrun`` against one process.

Each argument is a results folder or an output dir holding one ``entropy_lr_experiment_*``.
Prints the largest relative difference of each field over the (η, repeat) points both have;
exits 1 when the points differ or a difference exceeds ``--rtol``.

Usage: python scripts/compare_runs.py ONE TWO [--rtol 1e-6]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FIELDS = ("entropy_change", "first_order_prediction", "identity_slope")


def records(path: str | Path) -> dict[tuple[float, int], dict]:
    path = Path(path)
    if not (path / "raw_results.json").is_file():
        (path,) = path.glob("entropy_lr_experiment_*")
    raw = json.loads((path / "raw_results.json").read_text())
    return {(r["learning_rate"], r["repeat"]): r for r in raw}


def max_relative_differences(one: dict, two: dict, fields=FIELDS) -> dict[str, float]:
    out = {}
    for field in fields:
        pairs = [(one[k].get(field), two[k].get(field)) for k in one]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if pairs:  # a field neither run computed (e.g. the identity check off) is skipped
            out[field] = max(abs(b - a) / max(abs(a), 1e-300) for a, b in pairs)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("one")
    parser.add_argument("two")
    parser.add_argument("--rtol", type=float, default=1e-6)
    args = parser.parse_args(argv)
    one, two = records(args.one), records(args.two)
    if one.keys() != two.keys():
        print(f"different points: {sorted(one)} vs {sorted(two)}")
        return 1
    failed = sorted({k for run in (one, two) for k, r in run.items() if not r.get("success")})
    if failed:
        print(f"failed points: {failed}")
        return 1
    diffs = max_relative_differences(one, two)
    for field, value in diffs.items():
        print(f"{field}: max relative difference {value:.3g} over {len(one)} points")
    ok = all(v <= args.rtol for v in diffs.values())
    print("agree" if ok else f"DIFFER (rtol {args.rtol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
