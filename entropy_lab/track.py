"""Across a run (DESIGN §11): the sweep at every saved checkpoint, and the run held against it.

run_checkpoints():  RUN (a run folder, training_state/, a TRL output_dir, or step folders)
                    → its checkpoints in training order.
trainer_learning_rates(): the lr the trainer used at each step, from its own records.
checkpoint_summary(): one sweep folder → H₀ ± SE, α ± CI, window, verdict, lr, α·lr.
history(): consecutive checkpoints → observed ΔH on the same E prompts against the summed
           first-order predictions of the training steps between them.
build_track(): all of it as track.json (versioned).

The sweeps themselves are ``cli.run_sweep_command``'s, one results folder per checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from entropy_lab.analysis import Analysis
from entropy_lab.checkpoint import resolve_layout, saved_step, step_folders
from entropy_lab.config import rl_practice_schedule
from entropy_lab.errors import CheckpointError, EntropyLabError
from entropy_lab.records import as_records, finite

TRACK_SCHEMA_VERSION = 1
TRACK_JSON = "track.json"
H0_SEQUENCES = "h0_sequences.json"
FINAL_STEP = "step_final"
# Two records of one lr (log_history, scheduler.pt, the rebuilt schedule) must agree this well.
LR_AGREEMENT = 1e-9

HISTORY_CANNOT_SEPARATE = (
    "each training step used its own update batch, not the sweep's U_r: a single step's "
    "slope scatters around α by τ (the spread over update directions), which the band "
    "includes only as far as the sweep's buffer matches the trainer's batch",
    "α is the slope at each checkpoint; between saved checkpoints it is interpolated "
    "linearly in the step, so curvature of α(step) between saves is not seen",
    "second and higher orders: α·lr is the first-order change; where lr lies above the "
    "window the prediction is known to miss",
    "the trainer's gradient clipping and its scheduler enter only through the recorded lr "
    "and the sweep's own clipping of U_r's gradient, not through the batch the trainer saw",
    "H₀ is scored on responses sampled at each checkpoint (same prompts, same seeds), so "
    "the observed ΔH carries sampling noise of E as well as the policy's change",
)


@dataclass(frozen=True)
class RunCheckpoint:
    """One saved checkpoint of a run: its training step and step folder."""

    step: int
    path: Path

    @property
    def label(self) -> str:
        return f"step_{self.step}"


@dataclass(frozen=True)
class RunCheckpoints:
    """A run's checkpoints in training order, and what was left out (and why)."""

    checkpoints: list[RunCheckpoint]
    skipped: list[str]


def run_checkpoints(paths: Sequence[str | Path]) -> RunCheckpoints:
    """The checkpoints of RUN ordered by training step. A path holding ``optimizer.pt`` is one
    checkpoint; any other is a run folder whose step folders are all taken. RL_Practice's
    ``step_final`` is dropped where it repeats a numbered step (the same global_step); two
    different folders of one step are an error."""
    folders: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a folder (pass a run folder or step folders)")
        if (path / "optimizer.pt").exists():
            folders.append(resolve_layout(path).root)
            continue
        run = path / "training_state" if (path / "training_state").is_dir() else path
        steps = step_folders(run)
        if not steps:
            raise CheckpointError(
                f"{path}: no step_N/, checkpoint-N/ or step_final/ folders (not a run folder)"
            )
        folders += steps
    found: dict[int, RunCheckpoint] = {}
    skipped: list[str] = []
    # numbered folders first, so step_final is the one dropped when it repeats a step
    for folder in sorted(set(folders), key=lambda f: f.name == FINAL_STEP):
        step = saved_step(resolve_layout(folder))
        if step is None:
            raise CheckpointError(f"{folder}: no training step (training_info / trainer_state)")
        if step in found:
            if folder.name == FINAL_STEP:
                skipped.append(f"{folder}: step {step}, the same as {found[step].path.name}")
                continue
            raise CheckpointError(f"{found[step].path} and {folder} were both saved at step {step}")
        found[step] = RunCheckpoint(step, folder)
    return RunCheckpoints([found[s] for s in sorted(found)], skipped)


# -- the trainer's learning rate -------------------------------------------------------


@dataclass(frozen=True)
class TrainerLearningRates:
    """lr used by each optimizer step s (θ_{s−1} → θ_s), as the trainer recorded it."""

    used: dict[int, float]
    source: str

    def at(self, step: int) -> float | None:
        return self.used.get(step)


def _scheduler_state(folder: Path) -> dict[str, Any] | None:
    path = folder / "scheduler.pt"
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state if isinstance(state, dict) and "_last_lr" in state else None


def _next_lr(folder: Path) -> float | None:
    """scheduler.pt's ``_last_lr``: what the scheduler set after the last step, i.e. the lr of
    the step the trainer would take next from this checkpoint (one value: all groups agree)."""
    state = _scheduler_state(folder)
    if state is None:
        return None
    rates = [float(v) for v in state["_last_lr"]]
    if any(not math.isclose(r, rates[0], rel_tol=LR_AGREEMENT) for r in rates):
        raise CheckpointError(f"{folder}/scheduler.pt: param groups at different lrs {rates}")
    return rates[0]


def _agree(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=LR_AGREEMENT, abs_tol=1e-300)


def trainer_learning_rates(checkpoints: list[RunCheckpoint]) -> TrainerLearningRates:
    """HF / TRL: trainer_state.json's log_history 'learning_rate' (logged before the scheduler
    steps: the lr of that step), and each checkpoint's scheduler.pt for step N+1.
    RL_Practice: its schedule rebuilt from the training config (transformers' constant or
    cosine schedule with int(0.05·total_steps) warmup, as its trainer builds it) and held to
    every scheduler.pt. A record that disagrees with another is an error."""
    last = resolve_layout(checkpoints[-1].path)
    if last.format == "rl_practice":
        return _rl_practice_rates(checkpoints)
    used: dict[int, float] = {}
    state_path = last.root / "trainer_state.json"
    if state_path.is_file():
        for entry in json.loads(state_path.read_text()).get("log_history", []):
            if "learning_rate" in entry and "step" in entry:
                used[int(entry["step"])] = float(entry["learning_rate"])
    for cp in checkpoints:
        following = _next_lr(cp.path)
        if following is None:
            continue
        logged = used.setdefault(cp.step + 1, following)
        if not _agree(logged, following):
            raise CheckpointError(
                f"{cp.path}/scheduler.pt sets lr {following!r} for step {cp.step + 1}; the "
                f"run's trainer_state.json logged {logged!r} for that step"
            )
    return TrainerLearningRates(used, "trainer_state.json log_history; scheduler.pt _last_lr")


def _rl_practice_rates(checkpoints: list[RunCheckpoint]) -> TrainerLearningRates:
    info = json.loads((checkpoints[-1].path / "training_info.json").read_text())
    cfg = info.get("training_config") or {}
    if "lr" not in cfg:
        raise CheckpointError(f"{checkpoints[-1].path}/training_info.json: no training_config.lr")
    used = rl_practice_schedule(cfg, checkpoints[-1].step + 1)
    for cp in checkpoints:
        state = _scheduler_state(cp.path)
        if state is None:
            continue
        following = _next_lr(cp.path)
        if int(state.get("last_epoch", -1)) != cp.step or not _agree(used[cp.step + 1], following):
            raise CheckpointError(
                f"{cp.path}/scheduler.pt (last_epoch {state.get('last_epoch')}, lr "
                f"{following!r}) does not match RL_Practice's schedule rebuilt from the training "
                f"config ({cfg.get('lr_scheduler')}, lr {cfg['lr']}, total_steps "
                f"{cfg.get('total_steps')}): step {cp.step} should set lr {used[cp.step + 1]!r}"
            )
    return TrainerLearningRates(
        used,
        f"RL_Practice schedule ({cfg.get('lr_scheduler')}, warmup int(0.05·total_steps)) "
        "held to each scheduler.pt _last_lr",
    )


# -- the entropy the trainer logged ------------------------------------------------------


def logged_entropy(checkpoints: list[RunCheckpoint]) -> tuple[dict[int, float], str | None]:
    """step → the 'entropy' the trainer logged for it, and what that number is."""
    last = checkpoints[-1].path
    if (last / "trainer_state.json").is_file():
        history = json.loads((last / "trainer_state.json").read_text()).get("log_history", [])
        values = {int(e["step"]): float(e["entropy"]) for e in history if "entropy" in e}
        return values, (
            "TRL's logged 'entropy': mean full-vocabulary token entropy at the sampling "
            "temperature of that step's own completions, before its update (θ_{s−1}), in "
            "the trainer's mode"
        )
    log = last.parent.parent / "logs" / "train_log.jsonl"
    if last.parent.name == "training_state" and log.is_file():
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        values = {int(r["step"]): float(r["entropy"]) for r in rows if "entropy" in r}
        return values, (
            "RL_Practice's logged 'entropy': −mean log π of the sampled tokens (a one-sample "
            "estimate, not the full-vocabulary entropy) on that step's own buffer, before "
            "its update (θ_{s−1}), in train mode with LoRA dropout"
        )
    return {}, None


# -- H₀ per sequence ---------------------------------------------------------------------


def h0_sequences(setup: Any) -> dict[str, Any]:
    """E's per-sequence sums at θ₀ and each row's prompt tokens (to pair rows across
    checkpoints: common random numbers give the same prompts in the same order)."""
    batch = setup.eval_batch.to("cpu")
    prompt_mask = batch.attention_mask.bool() & ~batch.response_mask.bool()
    prompts = [row[mask].tolist() for row, mask in zip(batch.input_ids, prompt_mask)]
    return {
        "entropy": setup.eval_sums.entropy.tolist(),
        "tokens": setup.eval_sums.tokens.tolist(),
        "prompt_tokens": prompts,
    }


@dataclass(frozen=True)
class Estimate:
    value: float
    stderr: float


def _linearized(seqs: Mapping[str, Any]) -> tuple[float, list[float]]:
    """H = Σh/ΣT and each sequence's first-order share of H's deviation (ratio estimator)."""
    h, t = seqs["entropy"], seqs["tokens"]
    total = sum(t)
    value = sum(h) / total
    return value, [(hi - value * ti) / total for hi, ti in zip(h, t)]


def entropy_estimate(seqs: Mapping[str, Any]) -> Estimate:
    """H₀ ± SE over E's sequences (delta method for the ratio Σh/ΣT)."""
    value, share = _linearized(seqs)
    n = len(share)
    return Estimate(value, math.sqrt(n / (n - 1) * sum(u * u for u in share)) if n > 1 else 0.0)


def paired_change(before: Mapping[str, Any], after: Mapping[str, Any]) -> Estimate:
    """H(after) − H(before) on the same prompts, its SE from the per-prompt paired shares."""
    if before["prompt_tokens"] != after["prompt_tokens"]:
        raise EntropyLabError(
            "the evaluation prompts differ between checkpoints (another seed, eval size or "
            "prompt set?): H₀ cannot be paired"
        )
    h_b, u_b = _linearized(before)
    h_a, u_a = _linearized(after)
    d = [a - b for a, b in zip(u_a, u_b)]
    n = len(d)
    return Estimate(h_a - h_b, math.sqrt(n / (n - 1) * sum(x * x for x in d)) if n > 1 else 0.0)


# -- one checkpoint's summary ------------------------------------------------------------


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def window_status(lr: float | None, eta_min: float | None, eta_max: float | None) -> str:
    """Where the trainer's lr lies against the measured window."""
    if lr is None:
        return "unknown (no lr recorded)"
    if lr == 0:
        return "no step (lr 0)"
    if eta_min is None or eta_max is None:
        return "no window"
    if lr > eta_max:
        return "above"
    if lr < eta_min:
        return "below"
    return "inside"


def _mean(values: list[float]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


def checkpoint_summary(
    folder: Path, cp: RunCheckpoint, rates: TrainerLearningRates, logged: dict[int, float]
) -> dict[str, Any]:
    """track.json's entry for one checkpoint, read from its sweep folder: the typed Analysis
    (analysis.json through ``Analysis.from_dict``) and the PointRecords."""
    analysis = Analysis.from_dict(_read(folder / "analysis.json"))
    records = as_records(_read(folder / "raw_results.json"))
    first_of = {}  # per repeat, its first successful record: the direction's own numbers
    for r in records:
        if r.success:
            first_of.setdefault(r.repeat, r)
    directions = []
    for rep in analysis.repeats:
        first = first_of.get(rep.repeat)
        directions.append(
            {
                "repeat": rep.repeat,
                "slope": rep.slope,
                "first_order_slope": first and first.first_order_slope,
                "identity_slope": first and first.identity_slope,
                "grad_norm": first and first.grad_norm,
                "update_norm": first and first.update_norm,
            }
        )
    fit, window, facts = analysis.mixed_model, analysis.window, analysis.facts
    alpha = fit.slope if fit else None
    lr_next = rates.at(cp.step + 1)
    return {
        "step": cp.step,
        "path": str(cp.path),
        "folder": folder.name,
        "digest": (analysis.meta.get("checkpoint") or {}).get("digest"),
        "h0": _estimate_dict(entropy_estimate(_read(folder / H0_SEQUENCES))),
        "alpha": {
            "value": alpha,
            "stderr": fit and fit.slope_se,
            "ci_low": fit and fit.slope_ci_low,
            "ci_high": fit and fit.slope_ci_high,
            "confidence": fit and fit.confidence,
            "tau": fit and fit.slope_sd,
            "source": "random-slope mixed model (REML) over the sweep's update directions",
        },
        "directions": directions,
        "first_order_slope": _finite_or_none(facts.first_order_slope.mean),
        "identity_slope": _finite_or_none(facts.oracles.identity.mean),  # conditional reading
        "first_order_slope_conditional": _finite_or_none(facts.oracles.jvp_conditional.mean),
        "grad_norm": _mean([d["grad_norm"] for d in directions]),
        "update_norm": _mean([d["update_norm"] for d in directions]),
        "window": {"eta_min": window.eta_min, "eta_max": window.eta_max},
        "eta_max_predicted": window.eta_max_predicted,
        "predicted_edge": window.predicted_edge,
        "verdict": analysis.verdict,
        "verdict_reason": analysis.verdict_reason,
        "lr": {"next_step": lr_next, "this_step": rates.at(cp.step), "source": rates.source},
        "alpha_times_lr": alpha * lr_next if alpha is not None and lr_next is not None else None,
        "lr_in_window": window_status(lr_next, window.eta_min, window.eta_max),
        "logged_entropy": {"value": logged.get(cp.step + 1), "step": cp.step + 1},
    }


def _estimate_dict(e: Estimate) -> dict[str, float]:
    return {"value": e.value, "stderr": e.stderr}


def _finite_or_none(value: float | None) -> float | None:
    return value if finite(value) else None


# -- held against the run's own history -------------------------------------------------


def predicted_change(
    a: Mapping[str, Any], b: Mapping[str, Any], rates: TrainerLearningRates
) -> tuple[Estimate | None, str | None]:
    """Σ over the steps s = N_a+1 … N_b of α(θ_{s−1})·lr_s, α linear in the step between the
    two checkpoints (α_a at N_a, α_b at N_b). SE: α's own SEs (the two sweeps independent)
    and, per step, τ (one step's direction scatters around α by τ)."""
    n_a, n_b = a["step"], b["step"]
    alpha_a, alpha_b = a["alpha"], b["alpha"]
    if alpha_a["value"] is None or alpha_b["value"] is None:
        return None, "no mixed-model α at one of the checkpoints"
    weight_a = weight_b = spread = 0.0
    for s in range(n_a + 1, n_b + 1):
        lr = rates.at(s)
        if lr is None:
            return None, f"the lr of step {s} is not recorded (log every step)"
        t = (s - 1 - n_a) / (n_b - n_a)
        weight_a += lr * (1 - t)
        weight_b += lr * t
        tau = (1 - t) * (alpha_a["tau"] or 0.0) + t * (alpha_b["tau"] or 0.0)
        spread += (lr * tau) ** 2
    value = weight_a * alpha_a["value"] + weight_b * alpha_b["value"]
    variance = (weight_a * (alpha_a["stderr"] or 0.0)) ** 2 + (
        weight_b * (alpha_b["stderr"] or 0.0)
    ) ** 2
    return Estimate(value, math.sqrt(variance + spread)), None


def history(
    checkpoints: list[dict[str, Any]],
    sequences: list[Mapping[str, Any]],
    rates: TrainerLearningRates,
) -> list[dict[str, Any]]:
    """Consecutive checkpoints: observed ΔH (paired on E's prompts) against the prediction."""
    rows = []
    for k in range(1, len(checkpoints)):
        a, b = checkpoints[k - 1], checkpoints[k]
        observed = paired_change(sequences[k - 1], sequences[k])
        predicted, why = predicted_change(a, b, rates)
        row: dict[str, Any] = {
            "from_step": a["step"],
            "to_step": b["step"],
            "observed": {"value": observed.value, "stderr": observed.stderr},
            "predicted": None,
            "ratio": None,
            "z": None,
            "note": why,
            "logged_entropy_change": _logged_change(a, b),
        }
        if predicted is not None:
            row["predicted"] = {"value": predicted.value, "stderr": predicted.stderr}
            joint = math.hypot(observed.stderr, predicted.stderr)
            row["z"] = (observed.value - predicted.value) / joint if joint > 0 else None
            if predicted.value != 0:
                ratio = observed.value / predicted.value
                rel = math.hypot(
                    observed.stderr / observed.value if observed.value else math.inf,
                    predicted.stderr / predicted.value,
                )
                row["ratio"] = {"value": ratio, "stderr": abs(ratio) * rel}
        rows.append(row)
    return rows


def _logged_change(a: Mapping[str, Any], b: Mapping[str, Any]) -> float | None:
    before, after = a["logged_entropy"]["value"], b["logged_entropy"]["value"]
    return after - before if before is not None and after is not None else None


# -- track.json ----------------------------------------------------------------------------


def setup_differences(folders: list[Path]) -> list[str]:
    """Effective settings that differ from the first checkpoint's (run_meta.json config)."""
    configs = [_read(f / "run_meta.json").get("config", {}) for f in folders]
    out = []
    for folder, cfg in zip(folders[1:], configs[1:]):
        for key in sorted(set(cfg) | set(configs[0])):
            if key != "checkpoint" and cfg.get(key) != configs[0].get(key):
                out.append(
                    f"{folder.name}: {key} = {cfg.get(key)!r} "
                    f"(at {folders[0].name}: {configs[0].get(key)!r})"
                )
    return out


def build_track(
    folder: Path,
    run: RunCheckpoints,
    settings: Mapping[str, Any],
    costs: Mapping[str, Any],
) -> dict[str, Any]:
    """track.json from the per-checkpoint sweep folders under ``folder``."""
    rates = trainer_learning_rates(run.checkpoints)
    logged, logged_what = logged_entropy(run.checkpoints)
    folders = [folder / cp.label for cp in run.checkpoints]
    entries = [checkpoint_summary(f, cp, rates, logged) for f, cp in zip(folders, run.checkpoints)]
    sequences = [_read(f / H0_SEQUENCES) for f in folders]
    return {
        "schema_version": TRACK_SCHEMA_VERSION,
        "settings": dict(settings),
        "skipped": list(run.skipped),
        "setup_differences": setup_differences(folders),
        "lr_meaning": (
            "lr.next_step: scheduler.pt's lr for step N+1, the step the trainer takes from "
            "this checkpoint (θ_N, S_N), which is what α is measured for; α·lr and the window "
            "check use it. lr.this_step: the lr of step N, which produced θ_N."
        ),
        "checkpoints": entries,
        "lr_outside_window": [
            e["step"] for e in entries if e["lr_in_window"] in ("above", "below", "no window")
        ],
        "history": {
            "intervals": history(entries, sequences, rates),
            "interpolation": (
                "α(θ_{s−1}) linear in the step between consecutive checkpoints (α_a at N_a, "
                "α_b at N_b); predicted ΔH = Σ_{s=N_a+1}^{N_b} α(θ_{s−1})·lr_s; SE from α's SEs "
                "and, per step, τ·lr_s (τ interpolated likewise)"
            ),
            "observed": (
                "H₀ at N_b − H₀ at N_a on E's prompts (the same prompts in the same order, "
                "responses sampled at each θ₀ with the same seeds); SE paired per prompt"
            ),
            "logged_entropy": logged_what,
            "cannot_separate": list(HISTORY_CANNOT_SEPARATE),
        },
        "costs": dict(costs),
    }


# -- the command ---------------------------------------------------------------------------

# Flags that must be the same when a track is resumed (the rest are how it runs, not what).
_NOT_SETTINGS = {"run", "resume", "output_dir", "no_progress", "threads", "debug", "command"}


def track_settings(args: Any) -> dict[str, Any]:
    """The track's flags that decide what is measured (recorded; checked on --resume)."""
    values = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    values["run"] = [str(Path(p).expanduser().resolve()) for p in args.run]
    return values


def _open_track_folder(args: Any, settings: Mapping[str, Any]) -> Path:
    from entropy_lab.store import new_results_dir

    if not args.resume:
        return new_results_dir(args.output_dir, prefix="entropy_track")
    folder = Path(args.resume)
    stored = folder / TRACK_JSON
    if not stored.is_file():
        raise EntropyLabError(f"--resume {folder}: no {TRACK_JSON} there (not a track folder)")
    before = _read(stored)["settings"]
    changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
    if changed:
        raise EntropyLabError(
            f"--resume {folder}: settings differ from the interrupted track "
            f"({', '.join(changed)}); use the same run and flags"
        )
    return folder


def _finished(folder: Path, cp: RunCheckpoint, args: Any) -> bool:
    """A checkpoint's sweep folder with every (η, repeat) measured, its analysis and H₀ —
    of this very checkpoint (its digest), else an error."""
    from entropy_lab.checkpoint import checkpoint_digest
    from entropy_lab.config import parse_learning_rates
    from entropy_lab.store import ResultsFolder

    results = ResultsFolder(folder)
    meta = results.read_meta()
    if not meta:
        return False
    digest = checkpoint_digest(resolve_layout(cp.path))
    if meta.get("checkpoint", {}).get("digest") != digest:
        raise EntropyLabError(
            f"{folder} was measured on another checkpoint than {cp.path} (digest differs): "
            "the run changed since the track started; start a new track"
        )
    grid = {
        (eta, r)
        for eta in parse_learning_rates(args.learning_rates)
        for r in range(args.num_repeats)
    }
    complete = grid <= results.done_pairs()
    return complete and (folder / "analysis.json").is_file() and (folder / H0_SEQUENCES).is_file()


def run_track_command(args: Any, run_sweep_command: Callable[..., Any]) -> Path:
    """``entropy-lab track RUN``: one sweep per checkpoint (resumable), then track.json, the
    printed tables and track.png. ``run_sweep_command`` is the CLI's sweep (passed in: the
    CLI imports this module, never the other way)."""
    import copy
    import time

    from tqdm.auto import tqdm

    from entropy_lab.config import check_num_repeats, parse_learning_rates
    from entropy_lab.report import format_track_tables, plot_track
    from entropy_lab.store import atomic_write_json

    parse_learning_rates(args.learning_rates)
    check_num_repeats(args.num_repeats)
    run = run_checkpoints(args.run)
    trainer_learning_rates(run.checkpoints)  # a disagreeing lr record stops the track up front
    settings = track_settings(args)
    folder = _open_track_folder(args, settings)
    atomic_write_json(
        folder / TRACK_JSON,
        {"schema_version": TRACK_SCHEMA_VERSION, "settings": settings, "checkpoints": []},
    )
    resume = f"entropy-lab track --resume {folder}"
    costs: dict[str, Any] = {
        "base_loads": 0,
        "adapter_swaps": 0,
        "kept": [],
        "load_seconds": {},
        "seconds": {},
    }
    reuse = None
    # Progress over checkpoints here; within each, the sweep's own bar over its points.
    bar = tqdm(run.checkpoints, disable=args.no_progress, unit="checkpoint", desc="track")
    for cp in bar:
        bar.set_postfix_str(cp.label)
        sub = folder / cp.label
        if _finished(sub, cp, args):
            costs["kept"].append(cp.step)
            continue
        started = time.perf_counter()
        sweep_args = copy.copy(args)
        sweep_args.checkpoint = str(cp.path)
        sweep_args.resume = str(sub) if (sub / "run_meta.json").is_file() else None
        seen: dict[str, Any] = {}

        def keep(setup: Any, sub: Path = sub, seen: dict[str, Any] = seen) -> None:
            seen["setup"] = setup
            atomic_write_json(sub / H0_SEQUENCES, h0_sequences(setup))

        def make(_: str, sub: Path = sub) -> Path:
            sub.mkdir(parents=True, exist_ok=True)
            return sub

        tqdm.write(f"\n=== {cp.label}: {cp.path}")  # above the bars, not through them
        run_sweep_command(
            sweep_args,
            quick=False,
            results_dir=make,
            reuse=reuse,
            on_setup=keep,
            resume_command=resume,
        )
        loaded = seen["setup"].checkpoint
        shared = loaded.metadata.get("base_load") != "loaded"
        costs["adapter_swaps" if shared else "base_loads"] += 1
        costs["load_seconds"][str(cp.step)] = loaded.load_seconds
        costs["seconds"][str(cp.step)] = time.perf_counter() - started
        reuse = loaded
    track = build_track(folder, run, settings, costs)
    atomic_write_json(folder / TRACK_JSON, track)
    plot_track(track, folder / "track.png")
    print("\n" + format_track_tables(track))
    print(f"\ntrack: {folder}")
    return folder
