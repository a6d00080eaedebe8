"""The measurement protocol (DESIGN §2), top to bottom.

prepare():  task → disjoint prompts → evaluation batch E sampled once at θ₀ → H(θ₀) cached.
direction(): per repeat r, update batch U_r sampled at θ₀ with seed r → Dr-GRPO gradient →
             update vector v_r → theory along v_r.
measure_point(): per η, from (θ₀, S₀): real AdamW step(s) at lr = η → H(θ₁) on E → ΔH;
             the same U_r (common random numbers) for every η of a repeat.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from entropy_lab.checkpoint import LoadedCheckpoint
from entropy_lab.config import ExperimentConfig
from entropy_lab.entropy import EntropyReadings, EntropyScorer, readings
from entropy_lab.errors import ConfigError
from entropy_lab.rollout import SequenceBatch, sample_responses
from entropy_lab.tasks import Problem, Task, load_task
from entropy_lab.theory import DirectionalDerivatives, directional_derivatives
from entropy_lab.update import Gradient, PolicyUpdate, UpdateBatch, group_advantages


def repeat_seed(seed: int, repeat: int) -> int:
    return seed + 1000 * (repeat + 1)


@dataclass
class Setup:
    """Everything fixed for a whole sweep."""

    cfg: ExperimentConfig
    checkpoint: LoadedCheckpoint
    task: Task
    update_pool: list[Problem]
    eval_batch: SequenceBatch
    scorer: EntropyScorer
    updater: PolicyUpdate
    reference_logprob: torch.Tensor  # log π_θ₀(seq_i) for E
    baseline: EntropyReadings  # H(θ₀)


@dataclass
class Direction:
    """One repeat: U_r, its gradient, v_r and the theory along v_r."""

    repeat: int
    seed: int
    update: UpdateBatch
    gradient: Gradient
    vector: dict[str, torch.Tensor]
    derivatives: DirectionalDerivatives | None
    seconds: float


def prepare(cfg: ExperimentConfig, checkpoint: LoadedCheckpoint) -> Setup:
    policy, tokenizer = checkpoint.policy, checkpoint.tokenizer
    task = load_task(cfg.task, cfg.prompt_template)
    eval_problems, pool = task.split(cfg.eval_size, seed=cfg.seed)
    if len(eval_problems) < cfg.eval_size or len(pool) < cfg.buffer_size:
        raise ConfigError(
            f"task {cfg.task!r} has {len(task.problems)} prompts; the sweep needs at least "
            f"eval_size + buffer_size = {cfg.eval_size + cfg.buffer_size} (lower --eval-size "
            "or buffer_size, or give a larger prompt file)"
        )
    device = next(policy.parameters()).device
    eval_batch = sample_responses(
        policy,
        tokenizer,
        eval_problems,
        1,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
    ).to(device)
    scorer = EntropyScorer(
        policy, cfg.temperature, cfg.eval_chunk_tokens, top_k=cfg.top_k, top_p=cfg.top_p
    )
    updater = PolicyUpdate(
        policy,
        checkpoint.optimizer,
        temperature=cfg.temperature,
        clip_eps=cfg.clip_eps,
        grad_clip=cfg.grad_clip,
        microbatch_size=cfg.microbatch_size,
        chunk_tokens=cfg.eval_chunk_tokens,
    )
    policy.eval()
    with torch.no_grad():
        sums = scorer(eval_batch)
    conditional, policy_h, ess = readings(sums, sums.logprob)
    baseline = EntropyReadings(float(conditional), float(policy_h), float(ess))
    return Setup(
        cfg, checkpoint, task, pool, eval_batch, scorer, updater, sums.logprob.detach(), baseline
    )


def sample_update_batch(setup: Setup, repeat: int) -> UpdateBatch:
    cfg = setup.cfg
    seed = repeat_seed(cfg.seed, repeat)
    prompts = random.Random(seed).sample(setup.update_pool, cfg.buffer_size)
    seqs = sample_responses(
        setup.checkpoint.policy,
        setup.checkpoint.tokenizer,
        prompts,
        cfg.num_generations,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        seed=seed,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
    )
    rewards = torch.tensor(
        [setup.task.reward(r, prompts[int(i)]) for r, i in zip(seqs.responses, seqs.prompt_index)],
        dtype=torch.float64,
    )
    update = UpdateBatch(
        seqs,
        rewards,
        group_advantages(rewards, seqs.prompt_index),
        cfg.num_generations,
        cfg.max_new_tokens,
    )
    if cfg.steps > 1:  # later steps use the clipped ratio against θ₀'s log-probs
        update.old_logprob = setup.updater.token_logprobs(seqs)
    return update


def direction(setup: Setup, repeat: int) -> Direction:
    started = time.perf_counter()
    cfg = setup.cfg
    update = sample_update_batch(setup, repeat)
    gradient = setup.updater.gradient(update)
    vector = setup.updater.update_vector(gradient)
    derivatives = None
    if cfg.first_order and cfg.steps == 1:
        derivatives = directional_derivatives(
            setup.scorer,
            setup.eval_batch,
            setup.reference_logprob,
            setup.updater.theta0,
            vector,
            second_order=cfg.curvature,
        )
    return Direction(
        repeat,
        repeat_seed(cfg.seed, repeat),
        update,
        gradient,
        vector,
        derivatives,
        time.perf_counter() - started,
    )


def _entropy_after(setup: Setup, d: Direction, eta: float) -> tuple[EntropyReadings, float]:
    """H(θ₁) after real step(s) at lr = η, and the fraction of entries the step left equal."""
    try:
        setup.updater.steps(eta, d.gradient, d.update, setup.cfg.steps)
        quantized = setup.updater.quantized_fraction(d.vector)
        return setup.scorer.measure(setup.eval_batch, setup.reference_logprob), quantized
    finally:
        setup.updater.restore()


def measure_point(setup: Setup, d: Direction, eta: float) -> dict[str, Any]:
    """One (η, repeat) record with the fields of raw_results.json."""
    started = time.perf_counter()
    cfg = setup.cfg
    key = "policy" if cfg.reading == "policy" else "conditional"
    before = setup.baseline
    record: dict[str, Any] = {
        "learning_rate": eta,
        "repeat": d.repeat,
        "seed": d.seed,
        "success": False,
        "reading": cfg.reading,
        "entropy_before": getattr(before, key),
        "update_norm": setup.updater.update_norm(d.vector),
        "grad_norm": d.gradient.grad_norm,
        "mean_reward": float(d.update.rewards.mean()),
    }
    if d.derivatives is not None:
        slope = getattr(d.derivatives, f"slope_{key}")
        curvature = getattr(d.derivatives, f"curvature_{key}")
        record.update(
            first_order_slope=slope,
            first_order_prediction=eta * slope,
            first_order_slope_conditional=d.derivatives.slope_conditional,
            curvature=curvature,
            second_order_prediction=eta * slope + 0.5 * eta**2 * curvature
            if curvature is not None
            else None,
        )
    else:
        record.update(first_order_prediction=None, first_order_slope=None, curvature=None)
    try:
        after, record["quantized_fraction"] = _entropy_after(setup, d, eta)
        change = getattr(after, key) - getattr(before, key)
        if not math.isfinite(change):
            raise FloatingPointError(f"non-finite entropy after the step ({change})")
        record.update(
            entropy_after=getattr(after, key),
            entropy_change=change,
            entropy_change_conditional=after.conditional - before.conditional,
            entropy_change_policy=after.policy - before.policy,
            ess=after.ess,
        )
        if cfg.symmetric_check and cfg.steps == 1:
            mirrored, _ = _entropy_after(setup, d, -eta)
            record["entropy_change_negative"] = getattr(mirrored, key) - getattr(before, key)
        record["success"] = True
    except (FloatingPointError, RuntimeError) as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        setup.updater.restore()
    record["duration_s"] = time.perf_counter() - started
    return record


def run_sweep(
    setup: Setup,
    repeats: Iterable[int] | None = None,
    etas: Iterable[float] | None = None,
    done: set[tuple[float, int]] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """All (η, repeat) records; pairs in ``done`` are skipped (resume)."""
    from tqdm.auto import tqdm

    cfg = setup.cfg
    repeats = list(range(cfg.num_repeats) if repeats is None else repeats)
    etas = list(cfg.learning_rates if etas is None else etas)
    done = done or set()
    todo = [(r, [e for e in etas if (e, r) not in done]) for r in repeats]
    todo = [(r, es) for r, es in todo if es]
    records = []
    bar = tqdm(total=sum(len(es) for _, es in todo), disable=not progress, unit="point")
    try:
        for repeat, repeat_etas in todo:
            d = direction(setup, repeat)
            for eta in repeat_etas:
                record = measure_point(setup, d, eta)
                record["direction_seconds"] = d.seconds
                records.append(record)
                if on_record is not None:
                    on_record(record)
                bar.set_postfix_str(
                    f"η={eta:.1e} r={repeat} ΔH={record.get('entropy_change', float('nan')):+.3e}"
                )
                bar.update(1)
    finally:
        bar.close()
    return records
