"""What `entropy-lab track` costs per checkpoint against a standalone `entropy-lab sweep` of
each checkpoint with the same settings (issue #22, item 5: target ≤ 1.1×).

Each command runs in its own process (as a user runs it); the figure is the process CPU
time (user + system, children included: robust on a shared machine), with wall time beside
it. The track loads the base once and swaps adapters; each standalone sweep starts Python,
imports and loads the base itself, so the ratio is also given without that start-up
(an interpreter importing what the sweep imports, timed alone). Each standalone sweep's α is
held to the track's (the same measurement: equal to 1e-12 in fp64).

python benchmarks/track_cost.py                      # a real TRL GRPOTrainer run of the tiny
                                                     # base, 4 checkpoints (~3 min on 2 cores)
python benchmarks/track_cost.py --steps 6 --output track_cost.json
python benchmarks/track_cost.py --run RUN -- --prompts P --reward R   # any run, its flags
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The settings of tests/test_track.py's track (fp64, two η, two repeats, one thread).
FLAGS = [
    "--dtype", "fp64", "--learning-rates", "1e-6,1e-5", "--num-repeats", "2",
    "--eval-size", "8", "--buffer-size", "4", "--no-progress", "--threads", "1",
]  # fmt: skip
CLI = "import sys; from entropy_lab.cli import main; sys.exit(main(sys.argv[1:]))"
# What a sweep imports before it measures anything: the start-up every process pays.
STARTUP = (
    "import entropy_lab.cli, entropy_lab.protocol, entropy_lab.report, peft; "
    "from transformers import AutoModelForCausalLM, AutoTokenizer"
)


def timed(command: list[str]) -> dict[str, float]:
    """CPU seconds (user + system of the child and its children) and wall seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[:4])} … failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cpu": cpu, "wall": wall}


def trl_run(root: Path, steps: int) -> tuple[Path, list[str]]:
    """A GRPOTrainer run of the tiny base saving every step (the suite's own builder)."""
    root.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from entropy_lab.tiny import ensure_tiny_checkpoint
    from tests.trl_runs import TRACKED_RUN, train_trl

    train_trl(
        ensure_tiny_checkpoint(),
        root,
        max_steps=steps,
        **TRACKED_RUN,
    )
    return root / "run", [
        "--prompts",
        str(root / "prompts.jsonl"),
        "--reward",
        f"{root}/rewards.py:exact",
    ]


def alpha(folder: Path) -> float:
    analysis = json.loads((folder / "analysis.json").read_text())
    return analysis["summary"]["mixed_model"]["slope"]


def measure(run: Path, flags: list[str], out: Path) -> dict:
    python = [sys.executable, "-c"]
    startup = min(timed([*python, STARTUP])["cpu"] for _ in range(2))
    track = timed([*python, CLI, "track", str(run), *flags, "--output-dir", str(out / "track")])
    (folder,) = (out / "track").glob("entropy_track_*")
    data = json.loads((folder / "track.json").read_text())
    rows = []
    for entry in data["checkpoints"]:
        sweep_out = out / f"sweep_{entry['step']}"
        argv = [CLI, "sweep", "--checkpoint", entry["path"], *flags, "--output-dir", str(sweep_out)]
        cost = timed([*python, *argv])
        (alone,) = sweep_out.glob("entropy_lr_experiment_*")
        mine, theirs = entry["alpha"]["value"], alpha(alone)
        rows.append(
            {
                "step": entry["step"],
                "sweep_cpu": cost["cpu"],
                "sweep_wall": cost["wall"],
                "track_in_process_wall": data["costs"]["seconds"][str(entry["step"])],
                "track_load_seconds": data["costs"]["load_seconds"][str(entry["step"])],
                "alpha_relative_difference": abs(mine - theirs) / abs(theirs),
            }
        )
    return {"startup_cpu": startup, "track": track, "checkpoints": rows, "costs": data["costs"]}


def summary(result: dict) -> dict:
    n = len(result["checkpoints"])
    sweep = {k: sum(r[f"sweep_{k}"] for r in result["checkpoints"]) / n for k in ("cpu", "wall")}
    track = {k: result["track"][k] / n for k in ("cpu", "wall")}
    s = result["startup_cpu"]
    return {
        "checkpoints": n,
        "track_per_checkpoint": track,
        "sweep_per_checkpoint": sweep,
        "ratio_cpu": track["cpu"] / sweep["cpu"],
        "ratio_wall": track["wall"] / sweep["wall"],
        # each process's interpreter start and imports taken off (once for the track)
        "ratio_cpu_without_startup": (result["track"]["cpu"] - s) / n / (sweep["cpu"] - s),
    }


def table(result: dict, figures: dict) -> str:
    lines = [
        f"{'step':>5} {'sweep CPU s':>12} {'sweep wall s':>13} {'track wall s':>13} "
        f"{'load/swap s':>12} {'|Δα|/α':>9}",
    ]
    for r in result["checkpoints"]:
        lines.append(
            f"{r['step']:>5} {r['sweep_cpu']:>12.2f} {r['sweep_wall']:>13.2f} "
            f"{r['track_in_process_wall']:>13.2f} {r['track_load_seconds']:>12.2f} "
            f"{r['alpha_relative_difference']:>9.1e}"
        )
    t, s = figures["track_per_checkpoint"], figures["sweep_per_checkpoint"]
    lines += [
        "",
        f"per checkpoint ({figures['checkpoints']}):  track {t['cpu']:.2f} s CPU, {t['wall']:.2f} s "
        f"wall;  standalone sweep {s['cpu']:.2f} s CPU, {s['wall']:.2f} s wall",
        f"track / sweep: {figures['ratio_cpu']:.2f}× CPU, {figures['ratio_wall']:.2f}× wall "
        f"(target ≤ 1.1×);  {figures['ratio_cpu_without_startup']:.2f}× CPU without each "
        f"process's start-up ({result['startup_cpu']:.2f} s CPU)",
        f"track: base loaded {result['costs']['base_loads']}×, adapters swapped "
        f"{result['costs']['adapter_swaps']}×  (track wall = in-process, load or swap included)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a run folder (default: build a TRL run of the tiny base)")
    parser.add_argument("--steps", type=int, default=4, help="steps of the built TRL run")
    parser.add_argument("--output", help="write the figures as JSON here")
    parser.add_argument("extra", nargs="*", help="after --: the run's data flags (--prompts …)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="track_cost_") as tmp:
        root = Path(tmp)
        if args.run:
            run, data_flags = Path(args.run), list(args.extra)
        else:
            run, data_flags = trl_run(root / "trl", args.steps)
        result = measure(run, [*data_flags, *FLAGS], root / "out")
    figures = summary(result)
    print(table(result, figures))
    if args.output:
        Path(args.output).write_text(json.dumps({**result, "summary": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
