"""The measurement protocol (DESIGN §2), top to bottom.

configure(): checkpoint → training setup → loaded model → experiment config (cheap; the CLI
             prints the setup table and the memory forecast, then opens its results folder).
memory_forecast(): the predicted peak memory (entropy_lab.memory); on CUDA refused when it
             does not fit the free memory. prepare() takes the CLI's or makes its own.
prepare():  task → disjoint prompts → evaluation batch E sampled once at θ₀ → H(θ₀) cached,
             and ∇H(θ₀) by one backward pass (the rounding check). open_experiment() is
             prepare(configure(...)).
direction(): per repeat r, update batch U_r sampled at θ₀ with seed r → Dr-GRPO gradient →
             update vector v_r → theory along v_r.
measure_point(): per η, from (θ₀, S₀): real AdamW step(s) at lr = η → H(θ₁) on E → ΔH;
             the same U_r (common random numbers) for every η of a repeat. Returns one
             ``records.PointRecord`` (a raw_results.json record).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from entropy_lab import distributed
from entropy_lab.checkpoint import LoadedCheckpoint
from entropy_lab.config import RL_PRACTICE_REFERENCE, ExperimentConfig, Measurement, Reading
from entropy_lab.entropy import EntropyReadings, EntropyScorer, SequenceSums, readings
from entropy_lab.errors import CheckpointError, ConfigError, EntropyLabError, release_after_oom
from entropy_lab.memory import MemoryForecast, check_fits, forecast_for, longest_prompt
from entropy_lab.phases import Phase, phase_mark
from entropy_lab.records import EPS, PointRecord
from entropy_lab.rollout import SequenceBatch, sample_responses
from entropy_lab.tasks import Problem, Task, load_task
from entropy_lab.theory import (
    CrudeForecasts,
    DirectionalDerivatives,
    check_forward_ad,
    covariance_identity_slope,
    crude_forecasts,
    directional_derivatives,
    entropy_gradient,
)
from entropy_lab.update import (
    Gradient,
    GroupCounts,
    Objective,
    PolicyUpdate,
    UpdateBatch,
    group_advantages,
)

if TYPE_CHECKING:
    from entropy_lab.config import TrainingSetup


def set_threads(threads: int | None, total_parameters: int) -> None:
    """torch's CPU threads, set in this one place: ``threads``, or for a model of fewer than
    5 M parameters one thread (tiny matmuls run slower on several, and thrash under xdist)."""
    if threads is None:
        threads = 1 if total_parameters < 5_000_000 else torch.get_num_threads()
    torch.set_num_threads(max(1, threads))


def repeat_seed(seed: int, repeat: int) -> int:
    return seed + 1000 * (repeat + 1)


# The phases prepare() times: once per sweep, before any direction.
PREPARE_PHASES = (Phase.SAMPLE_E, Phase.SCORE_E, Phase.ENTROPY_GRADIENT)


class PhaseCosts:
    """Seconds per phase of the sweep (this process) by ``clock`` (wall time unless the
    caller, e.g. bench, passes another), and how many times each ran; ``to_dict`` also states
    each in evaluations of E (one eval = scoring E at θ₀)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.seconds: dict[Phase, float] = {}
        self.calls: dict[Phase, int] = {}
        self.labels: dict[Phase, str] = {}

    @contextlib.contextmanager
    def phase(self, phase: Phase, **detail: Any) -> Iterator[None]:
        if not isinstance(phase, Phase):  # a free-text name would escape bench's totals
            raise TypeError(f"PhaseCosts times protocol.Phase members, not {phase!r}")
        self.labels[phase] = phase.label.format(**detail)
        started = self.clock()
        try:
            with phase_mark(phase.mark):  # a profile (memory.peak_allocated) shows it
                yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + self.clock() - started
            self.calls[phase] = self.calls.get(phase, 0) + 1

    def seconds_of(self, *phases: Phase) -> float:
        """Total seconds of these phases; one that never ran is a KeyError naming it."""
        missing = [p.name for p in phases if p not in self.seconds]
        if missing:
            raise KeyError(f"phase(s) {', '.join(missing)} were not recorded")
        return sum(self.seconds[p] for p in phases)

    def only(self, phases: Iterable[Phase]) -> PhaseCosts:
        """A new ledger holding these phases' entries (those recorded) and nothing else."""
        out = PhaseCosts(self.clock)
        for p in phases:
            if p in self.seconds:
                out.seconds[p], out.calls[p], out.labels[p] = (
                    self.seconds[p],
                    self.calls[p],
                    self.labels[p],
                )
        return out

    def to_dict(self) -> dict[str, dict[str, float]]:
        unit = self.seconds.get(Phase.SCORE_E)
        return {
            self.labels[phase]: {
                "seconds": total,
                "calls": self.calls[phase],
                "evals_of_E": total / unit if unit else None,
            }
            for phase, total in self.seconds.items()
        }

    def table(self) -> str:
        rows = self.to_dict()
        width = max((len(n) for n in rows), default=5)
        lines = ["COST PER PHASE  (this process; 1 eval of E = scoring E at θ₀ once)"]
        for name, row in rows.items():
            evals = "" if row["evals_of_E"] is None else f"{row['evals_of_E']:9.1f} evals of E"
            lines.append(
                f"  {name.ljust(width)}  {row['seconds']:8.2f} s  ×{row['calls']:<4d} {evals}"
            )
        return "\n".join(lines)


@dataclass
class Setup:
    """Everything fixed for a whole sweep, built once by ``prepare``."""

    cfg: ExperimentConfig
    checkpoint: LoadedCheckpoint
    training: TrainingSetup  # where each setting came from
    kl_reference: torch.nn.Module | None  # a full fine-tune's KL reference model
    task: Task
    update_pool: list[Problem]
    eval_batch: SequenceBatch
    scorer: EntropyScorer
    updater: PolicyUpdate
    reference_logprob: torch.Tensor  # log π_θ₀(seq_i) for E
    baseline: EntropyReadings  # H(θ₀)
    entropy_grad: dict[str, torch.Tensor] | None  # ∇H(θ₀) of the reading (rounding)
    costs: PhaseCosts
    # Per-sequence sums of E at θ₀: H₀'s standard error, and ΔH paired across checkpoints.
    eval_sums: SequenceSums
    memory_forecast: MemoryForecast | None = None  # the peak predicted before sampling


@dataclass(frozen=True)
class Configured:
    """The cheap half of opening an experiment (``configure``): the config, the loaded
    checkpoint, where each setting came from and the KL reference. A caller prints the
    setup table or opens its results folder here, before ``prepare`` samples."""

    cfg: ExperimentConfig
    checkpoint: LoadedCheckpoint
    training: TrainingSetup
    kl_reference: torch.nn.Module | None


def open_experiment(*args: Any, costs: PhaseCosts | None = None, **kwargs: Any) -> Setup:
    """The one way in, for a caller with nothing to do between the two steps:
    ``prepare(configure(...), costs=costs)``, with configure's arguments."""
    return prepare(configure(*args, **kwargs), costs=costs)


def configure(
    checkpoint: str | Any | None = None,
    learning_rates: Iterable[float] | str = (1e-6,),
    *,
    measurement: Measurement | None = None,
    base_config: str | None = None,
    base_model: str | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    settings: dict[str, Any] | None = None,
    reference_model: str | None = None,
    threads: int | None = None,
    reuse: LoadedCheckpoint | None = None,
) -> Configured:
    """Checkpoint → training setup → loaded model and CPU threads → experiment config.

    ``checkpoint`` None means the built-in tiny one (built on first use), in faithful fp64
    with B_E = 256; a given one defaults to fp32 and B_E = 64. ``settings`` are the flag
    values of config.SETTINGS (None = not given). ``threads``: torch's CPU threads (None =
    ``set_threads``' choice). ``measurement`` None: every default. ``reuse`` is a checkpoint loaded before (``track``): when this
    one is an adapter of the same base, its weights and optimizer state are swapped into it.
    """
    from entropy_lab.checkpoint import generation_config_of, load_checkpoint, resolve_layout
    from entropy_lab.config import resolve_training_setup
    from entropy_lab.quantization import Quantization
    from entropy_lab.tiny import TINY_EVAL_SIZE, ensure_tiny_checkpoint, is_tiny_checkpoint

    measurement = measurement or Measurement()
    builtin = checkpoint is None
    if builtin:
        checkpoint = ensure_tiny_checkpoint(verbose=True)
    layout = resolve_layout(checkpoint)
    dtype = dtype or ("fp64" if builtin else "fp32")
    if measurement.eval_size is None:
        default = TINY_EVAL_SIZE if builtin else 64
        measurement = dataclasses.replace(measurement, eval_size=default)
    training = resolve_training_setup(
        layout.root,
        tiny=is_tiny_checkpoint(layout.root),  # a copy too: the setup's defaults apply
        base_config=base_config,
        flags=settings,
        steps=measurement.steps or 1,
        generation_config=generation_config_of(layout, base_model),
    )
    loaded = load_checkpoint(
        layout.root,
        dtype=dtype,
        device=device,
        base_model=base_model,
        faithful_fp64=measurement.faithful_fp64,
        training_config_path=training.training_config_path,
        quantization=Quantization.of(training.values),
        reuse=reuse,
    )
    set_threads(threads, loaded.metadata["total_parameters"])
    cfg = ExperimentConfig.from_setup(
        training,
        learning_rates,
        loaded.training_config,
        dtype=dtype,
        device=device,
        reference_model=reference_model,
        **measurement.given(),
    )
    return Configured(cfg, loaded, training, _kl_reference_of(cfg, loaded))


def _kl_reference_of(cfg: ExperimentConfig, loaded: LoadedCheckpoint):
    """The KL reference model the loss needs (None without a KL term or for a LoRA policy)."""
    if not cfg.kl_beta:
        return None
    if cfg.kl_reference == RL_PRACTICE_REFERENCE:
        raise ConfigError(
            "kl_beta > 0 with RL_Practice's KL reference (an NF4 copy of the base with the "
            "starting adapter) is not reproduced by this measurement"
        )
    return _kl_reference(loaded, cfg.reference_model, cfg.dtype, cfg.device)


def _kl_reference(loaded: LoadedCheckpoint, reference_model: str | None, dtype, device):
    """The KL reference: None for a LoRA policy (its adapter is disabled instead); a full
    fine-tune needs --reference-model DIR."""
    if loaded.metadata.get("adapter"):
        if reference_model:
            raise ConfigError(
                "--reference-model: a LoRA policy's reference is its base model with the "
                "adapter disabled; drop --reference-model"
            )
        return None
    if not reference_model:
        raise ConfigError(
            "kl_beta > 0 on a full fine-tune needs the KL reference: pass --reference-model DIR "
            "(the model the run started from)"
        )
    from transformers import AutoModelForCausalLM

    from entropy_lab.precision import make_faithful, torch_dtype

    try:
        model = AutoModelForCausalLM.from_pretrained(
            reference_model,
            dtype=torch_dtype(dtype),
            attn_implementation="eager",  # forward-mode AD has no SDPA kernels
            local_files_only=True,
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"--reference-model {reference_model}: cannot load it offline ({type(exc).__name__})"
        ) from None
    model.to(device)
    if dtype == "fp64":
        make_faithful(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


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
    identity_slope: float | None = None  # dH_cond/dη by the covariance identity
    forecasts: CrudeForecasts | None = None  # Cui et al.'s π·A and A forecasts from U
    update_norm: float | None = None  # ‖v_r‖
    # ‖v_r with a zero RL gradient‖ / ‖v_r‖: 1 = the step is AdamW's momentum alone.
    momentum_share: float | None = None


def memory_forecast(
    configured: Configured, problems: list[Problem] | None = None, check: bool = True
) -> MemoryForecast:
    """The sweep's memory forecast (``entropy_lab.memory``) for the longest prompt of the
    task's ``problems`` (default: E's and U's, as ``prepare`` splits them); with ``check``, on
    CUDA, an error with advice when its peak does not fit the free memory."""
    if problems is None:
        _, eval_problems, pool = _split_prompts(configured.cfg, configured.checkpoint.tokenizer)
        problems = eval_problems + pool
    tokens = longest_prompt(configured.checkpoint.tokenizer, [p.prompt for p in problems])
    prediction = forecast_for(configured, tokens)
    if check:
        check_fits(prediction, configured.cfg.device)
    return prediction


def prepare(
    configured: Configured,
    forecast: MemoryForecast | None = None,
    costs: PhaseCosts | None = None,
) -> Setup:
    """The slow half: task → disjoint prompts → the memory forecast (checked on CUDA, unless
    the caller passes the ``forecast`` it checked) → E sampled once at θ₀ → H(θ₀) cached,
    and ∇H(θ₀) by one backward pass (the rounding check). ``costs``: the ledger the sweep's
    phases go to (default: a new one on wall time)."""
    cfg, checkpoint = configured.cfg, configured.checkpoint
    policy, tokenizer = checkpoint.policy, checkpoint.tokenizer
    task, eval_problems, pool = _split_prompts(cfg, tokenizer)
    if forecast is None:  # before sampling: refuse what would run out of memory halfway
        forecast = memory_forecast(configured, eval_problems + pool)
    if cfg.first_order and not cfg.multi_step:  # before sampling: a jvp the sweep could not take
        check_forward_ad(policy, jet_order(cfg))
    device = next(policy.parameters()).device
    costs = PhaseCosts() if costs is None else costs
    # Data-parallel, each rank samples its shard of E; every rank then holds all of E.
    with costs.phase(Phase.SAMPLE_E):
        eval_shard = sample_responses(
            policy,
            tokenizer,
            eval_problems,
            1,
            seed=cfg.seed,
            **cfg.sampling(),
            rows=distributed.shard(cfg.eval_size),
        )
        eval_batch = _gather_batch(eval_shard).to(device)
    # The reward functions called once on E's completions: one that fails, returns the
    # wrong length or a non-finite value stops the run here, before any point is measured.
    task.rewards(eval_batch.responses, [eval_problems[int(i)] for i in eval_batch.prompt_index])
    # H and log π from the full tempered softmax; the sampler's top-k / top-p decide only
    # which responses E and U hold (DESIGN §2.5).
    scorer = EntropyScorer(policy, cfg.temperature, cfg.eval_chunk_tokens)
    updater = PolicyUpdate(
        policy,
        checkpoint.optimizer,
        temperature=cfg.temperature,
        clip_eps=cfg.clip_eps,
        grad_clip=cfg.grad_clip,
        microbatch_size=cfg.microbatch_size,
        chunk_tokens=cfg.eval_chunk_tokens,
        objective=_objective(cfg),
        gradient_mode=cfg.gradient_mode,
    )
    policy.eval()
    with torch.no_grad(), costs.phase(Phase.SCORE_E):
        sums = with_oom_retry(
            "scoring E at θ₀", lambda: scorer.global_sums(eval_batch), updater, scorer
        )
    scorer.record_reference_routing(eval_batch)  # MoE: θ₀'s experts per token of E
    conditional, policy_h, ess = readings(sums, sums.logprob)
    baseline = EntropyReadings(float(conditional), float(policy_h), float(ess))
    if not (math.isfinite(baseline.conditional) and math.isfinite(baseline.policy)):
        raise CheckpointError(
            f"H(θ₀) on the evaluation batch is not finite (conditional {baseline.conditional}, "
            f"policy {baseline.policy}): the logits overflow in {cfg.dtype}; try --dtype fp32"
        )
    entropy_grad = None
    if cfg.rounding_check and not cfg.multi_step:
        with costs.phase(Phase.ENTROPY_GRADIENT):
            entropy_grad = _entropy_grad(cfg, scorer, eval_batch, updater, baseline)
    return Setup(
        cfg,
        checkpoint,
        configured.training,
        configured.kl_reference,
        task,
        pool,
        eval_batch,
        scorer,
        updater,
        sums.logprob.detach(),
        baseline,
        entropy_grad,
        costs,
        SequenceSums(*(t.detach().cpu() for t in (sums.entropy, sums.logprob, sums.tokens))),
        forecast,
    )


def _objective(cfg: ExperimentConfig) -> Objective:
    """The loss the update takes, from the trainer's settings (built here, where the config
    meets the update: the config imports no later module)."""
    return Objective(
        loss_type=cfg.loss_type,
        clip_eps=cfg.clip_eps,
        clip_eps_high=cfg.clip_eps_high,
        kl_beta=cfg.kl_beta,
        kl_bias_correction=cfg.kl_bias_correction,
        entropy_coef=cfg.entropy_coef,
    )


def _split_prompts(cfg: ExperimentConfig, tokenizer) -> tuple[Task, list[Problem], list[Problem]]:
    """The task, E's prompts and the disjoint pool U is drawn from; enough of each, and for
    every process, or an error before anything is sampled."""
    from entropy_lab.tasks import load_rewards

    task = load_task(
        cfg.prompts,
        cfg.prompt_template,
        tokenizer=tokenizer,
        rewards=load_rewards(cfg.reward, cfg.reward_weights),
        split=cfg.prompts_split,
    )
    eval_problems, pool = task.split(cfg.eval_size, seed=cfg.seed)
    if len(eval_problems) < cfg.eval_size or len(pool) < cfg.buffer_size:
        raise ConfigError(
            f"prompts {cfg.prompts!r} have {len(task.problems)} records; the sweep needs at least "
            f"eval_size + buffer_size = {cfg.eval_size + cfg.buffer_size} (lower --eval-size "
            "or buffer_size, or give a larger prompt file)"
        )
    if distributed.world_size() > min(cfg.eval_size, cfg.buffer_size):
        raise ConfigError(
            f"{distributed.world_size()} processes need eval_size and buffer_size >= "
            f"{distributed.world_size()} (got {cfg.eval_size} and {cfg.buffer_size})"
        )
    return task, eval_problems, pool


def _entropy_grad(cfg, scorer, eval_batch, updater, baseline) -> dict[str, torch.Tensor]:
    return with_oom_retry(
        "∇H at θ₀ (the rounding check)",
        lambda: entropy_gradient(
            scorer,
            eval_batch,
            updater.params,
            baseline.of(cfg.entropy_reading),
            cfg.reading,
        ),
        updater,
        scorer,
    )


def _gather_batch(shard: SequenceBatch) -> SequenceBatch:
    """Every rank's shard of a batch, concatenated in rank (= global row) order."""
    if distributed.world_size() == 1:
        return shard
    parts = distributed.all_gather_objects(shard.to("cpu").to_dict())
    return SequenceBatch.concat([SequenceBatch.from_dict(p) for p in parts])


# Prompts a group filter may draw to fill U, in buffer sizes, before the run stops
# (RL_Practice's own refill loop is unbounded).
MAX_FILL_DRAWS = 16


@dataclass
class _Round:
    """One round of U's sampling: this rank's groups, their rewards, and which groups (of
    every rank, in the round's prompt order) the trainer's filters keep."""

    seqs: SequenceBatch
    rewards: torch.Tensor
    keep: list[bool]
    varied: int  # groups (all ranks) whose rewards are not all equal
    kept_varied: int  # of those, the groups that enter U


def sample_update_batch(setup: Setup, repeat: int) -> UpdateBatch:
    """U_r at θ₀ with seed r: buffer_size prompts × G responses in the trainer's sampling
    mode, rewards, the trainer's group filters (dropped groups replaced by fresh prompts,
    seeded and bounded), group advantages."""
    cfg = setup.cfg
    seed = repeat_seed(cfg.seed, repeat)
    rng = random.Random(seed)
    remaining = list(setup.update_pool)
    rounds: list[_Round] = []
    counts = GroupCounts()
    varied = 0  # groups drawn (all rounds) whose rewards are not all equal
    while counts.kept < cfg.buffer_size:
        need = cfg.buffer_size - counts.kept
        # Round 0 draws buffer_size prompts (the seed's own draw, so a run without filters is
        # what it was); refills draw for the acceptance rate seen so far, as many as are left.
        draw = (
            need
            if not rounds
            else min(len(remaining), -(-need * counts.drawn // max(counts.kept, 1)))
        )
        if counts.drawn >= MAX_FILL_DRAWS * cfg.buffer_size or draw < need:
            if repeat == 0 and varied == 0:
                raise ConfigError(_no_reward_variance(cfg, counts.drawn))
            raise ConfigError(_unfilled_buffer(cfg, counts))
        prompts = rng.sample(remaining, draw)
        chosen = {id(p) for p in prompts}
        remaining = [p for p in remaining if id(p) not in chosen]
        rounds.append(_sample_round(setup, prompts, seed + 7919 * len(rounds), need))
        varied += rounds[-1].varied
        kept = sum(rounds[-1].keep)
        counts = GroupCounts(counts.drawn + draw, counts.kept + kept, counts.dropped + draw - kept)
    # The pre-check on the first repeat, once U is filled: a round without reward variance is
    # no refusal while the filters still draw fresh prompts (RL_Practice refills its buffer;
    # at a low acceptance rate its first prompts often all fail), only a U whose kept groups
    # all have equal rewards, whose RL gradient is exactly 0.
    if repeat == 0 and not any(r.kept_varied for r in rounds):
        raise ConfigError(_no_reward_variance(cfg, counts.drawn))
    seqs, rewards = _kept_groups(rounds, cfg.num_generations)
    update = UpdateBatch(
        seqs,
        rewards,
        group_advantages(rewards, seqs.prompt_index, cfg.scale_rewards),
        cfg.num_generations,
        cfg.max_new_tokens,
        mean_reward=distributed.sum_over_ranks(float(rewards.sum()))
        / distributed.sum_over_ranks(len(rewards)),
        dropout_seed=seed if cfg.gradient_mode == "train" else None,
        groups=counts,
    )
    if cfg.multi_step:  # later steps use the clipped ratio against θ₀'s log-probs
        update.old_logprob = setup.updater.token_logprobs(seqs)
    if cfg.kl_beta:  # the reference's log-probs, once per U (they do not depend on θ)
        update.ref_logprob = setup.updater.reference_logprobs(
            seqs, setup.kl_reference, cfg.reference_adapter
        )
    return update


def _sample_round(setup: Setup, prompts: list[Problem], seed: int, need: int) -> _Round:
    """One round's groups; the first ``need`` groups the filters keep (in draw order, as the
    trainer fills its buffer) enter U."""
    cfg = setup.cfg
    g = cfg.num_generations
    # Data-parallel, each rank samples (and later back-propagates) whole groups of its prompts.
    rows = [p * g + k for p in distributed.shard(len(prompts)) for k in range(g)]
    seqs = sample_responses(
        setup.checkpoint.policy,
        setup.checkpoint.tokenizer,
        prompts,
        g,
        seed=seed,
        **cfg.sampling(),
        rows=rows,
        mode=cfg.sampling_mode,
    )
    rewards = torch.tensor(
        setup.task.rewards(seqs.responses, [prompts[int(i)] for i in seqs.prompt_index]),
        dtype=torch.float64,
    )
    groups = {int(i): rewards[seqs.prompt_index == i] for i in seqs.prompt_index.unique()}
    local = {i: (keep_group(r, cfg), bool((r != r[0]).any())) for i, r in groups.items()}
    of = {}
    for part in distributed.all_gather_objects(local):
        of.update(part)
    keep = [of[i][0] for i in range(len(prompts))]
    keep = [k and sum(keep[: i + 1]) <= need for i, k in enumerate(keep)]
    varied = [of[i][1] for i in range(len(prompts))]
    return _Round(seqs, rewards, keep, sum(varied), sum(k and v for k, v in zip(keep, varied)))


def keep_group(rewards: torch.Tensor, cfg: ExperimentConfig) -> bool:
    """Whether the trainer's filters keep a group with these rewards, as RL_Practice's
    collector decides: variance (population) below ``reward_var_thresh``, all rewards 0
    (``reject_all_zero``), all rewards equal to the group's largest (``reject_all_max``)."""
    if float(rewards.var(unbiased=False)) < cfg.reward_var_thresh:
        return False
    if cfg.reject_all_zero and bool((rewards == 0).all()):
        return False
    if cfg.reject_all_max and bool((rewards == rewards.max()).all()):
        return False
    return True


def _kept_groups(rounds: list[_Round], g: int) -> tuple[SequenceBatch, torch.Tensor]:
    """This rank's kept groups of every round, prompt indices numbered across rounds in draw
    order (one round without filters: U as sampled)."""
    if len(rounds) == 1 and all(rounds[0].keep):
        return rounds[0].seqs, rounds[0].rewards
    parts, rewards, offset = [], [], 0
    for rnd in rounds:
        rows = [r for r, i in enumerate(rnd.seqs.prompt_index.tolist()) if rnd.keep[i]]
        part = rnd.seqs.select(rows)
        part.prompt_index = part.prompt_index + offset
        parts.append(part)
        rewards.append(rnd.rewards[rows])
        offset += len(rnd.keep)
    return SequenceBatch.concat(parts), torch.cat(rewards)


def _no_reward_variance(cfg: ExperimentConfig, prompts: int) -> str:
    """The pre-check (U of the first repeat): with no reward variance in any group every
    advantage is 0, the RL gradient is exactly 0 and the step would be AdamW momentum alone."""
    return (
        f"no reward variance: under reward {cfg.reward!r} no group of the first update batch "
        f"({prompts} prompts drawn, {cfg.num_generations} responses per prompt) got unequal "
        "rewards, so every advantage and the RL gradient are 0 and the step would be the "
        "optimizer's momentum alone; check --reward against the prompts and the model's answers"
    )


def _unfilled_buffer(cfg: ExperimentConfig, counts: GroupCounts) -> str:
    filters = [
        name
        for name, on in (
            ("reject_all_zero", cfg.reject_all_zero),
            ("reject_all_max", cfg.reject_all_max),
            (f"reward_var_thresh {cfg.reward_var_thresh:g}", cfg.reward_var_thresh > 0),
        )
        if on
    ]
    return (
        f"the update buffer cannot be filled: {counts.kept} of {cfg.buffer_size} groups kept "
        f"after drawing {counts.drawn} prompts ({counts.dropped} dropped by "
        f"{', '.join(filters)}); the reward {cfg.reward!r} gives too few groups with reward "
        "variance on these prompts: check the reward, or lower buffer_size"
    )


def jet_order(cfg: ExperimentConfig) -> int:
    """How many derivatives along v the config asks for: 1 (∇H·v), 2 (+ vᵀ∇²H v), 3 (+ ∇³H)."""
    return cfg.jet


def sweep_phases(cfg: ExperimentConfig) -> tuple[Phase, ...]:
    """The phases a working sweep under ``cfg`` records, as prepare(), direction() and
    measure_point() gate them (bench judges theory against measurement over these)."""
    along_v = not cfg.multi_step  # the oracles along θ₀ + η·v, and the ±η pair
    gated = {
        Phase.ENTROPY_GRADIENT: cfg.rounding_check and along_v,
        Phase.JET: cfg.first_order and along_v,
        Phase.IDENTITY: cfg.first_order and along_v and cfg.identity_check,
        Phase.STEP_MINUS: cfg.symmetric_check and along_v,
    }
    return tuple(p for p in Phase if gated.get(p, True))


def jet_along(setup: Setup, vector: dict[str, torch.Tensor]) -> DirectionalDerivatives:
    """The theory along v_r on E, to the order the config asks for."""
    order = jet_order(setup.cfg)
    return directional_derivatives(
        setup.scorer,
        setup.eval_batch,
        setup.reference_logprob,
        setup.updater.theta0,
        vector,
        second_order=order >= 2,
        third_order=order >= 3,
    )


def direction(setup: Setup, repeat: int) -> Direction:
    started = time.perf_counter()
    cfg, costs = setup.cfg, setup.costs
    with costs.phase(Phase.SAMPLE_U):
        update = sample_update_batch(setup, repeat)
    with costs.phase(Phase.GRADIENT):
        gradient = setup.updater.gradient(update)
    with costs.phase(Phase.UPDATE_VECTOR):
        vector = setup.updater.update_vector(gradient)
        momentum = setup.updater.update_vector(gradient.zero())
    derivatives = identity = forecasts = None
    if cfg.first_order and not cfg.multi_step:
        with costs.phase(Phase.JET, order=jet_order(cfg)):
            derivatives = jet_along(setup, vector)
        if cfg.identity_check:
            with costs.phase(Phase.IDENTITY):
                identity = covariance_identity_slope(
                    setup.scorer, setup.eval_batch, setup.updater.theta0, vector
                )
        forecasts = _crude_forecasts(gradient)
    return Direction(
        repeat,
        repeat_seed(cfg.seed, repeat),
        update,
        gradient,
        vector,
        derivatives,
        time.perf_counter() - started,
        identity,
        forecasts,
        setup.updater.update_norm(vector),
        _share(setup.updater.update_norm(momentum), setup.updater.update_norm(vector)),
    )


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


def _crude_forecasts(gradient: Gradient) -> CrudeForecasts:
    """Cui et al.'s forecasts from U's tokens at θ₀, as the gradient pass scored them."""
    # Data-parallel: covariances over all of U's tokens, not over this rank's share.
    return crude_forecasts(
        distributed.cat_over_ranks(gradient.token_logprob.cpu()),
        distributed.cat_over_ranks(gradient.token_advantage.cpu()),
    )


@dataclass
class FailedDirection:
    """A repeat whose update direction is unusable (non-finite loss, gradient or v_r).

    Every η of that repeat becomes a failed record (``success: false`` with the reason) and
    the sweep goes on; the analysis counts the failures.
    """

    repeat: int
    seed: int
    error: str
    seconds: float


def direction_or_failure(setup: Setup, repeat: int) -> Direction | FailedDirection:
    """``direction()``, retried on CUDA out-of-memory, with bad numbers turned into a failure."""
    started = time.perf_counter()
    try:
        d = with_oom_retry(
            f"the update direction of repeat {repeat}",
            lambda: direction(setup, repeat),
            setup.updater,
            setup.scorer,
        )
        bad = [name for name, v in d.vector.items() if not bool(torch.isfinite(v).all())]
        if bad:  # e.g. a state whose exp_avg_sq is negative: sqrt gives NaN
            raise FloatingPointError(f"non-finite update vector v at {bad[0]}")
        return d
    except FloatingPointError as exc:
        return FailedDirection(
            repeat,
            repeat_seed(setup.cfg.seed, repeat),
            f"{type(exc).__name__}: {exc} (update direction of repeat {repeat})",
            time.perf_counter() - started,
        )


def _halve_memory_knobs(updater: PolicyUpdate, scorer: EntropyScorer) -> str | None:
    """Halve micro-batch, logits-chunk and scoring-row sizes; None when all are already 1."""
    knobs = [
        (updater, "microbatch_size"),
        (updater, "chunk_tokens"),
        (scorer, "chunk_tokens"),
        (scorer, "max_rows"),
    ]
    if all(getattr(owner, name) <= 1 for owner, name in knobs):
        return None
    for owner, name in knobs:
        setattr(owner, name, max(1, getattr(owner, name) // 2))
    return (
        f"microbatch_size {updater.microbatch_size}, eval_chunk_tokens {scorer.chunk_tokens}, "
        f"scoring rows {scorer.max_rows}"
    )


def with_oom_retry(what: str, call: Callable[[], Any], updater, scorer) -> Any:
    """``call()``; on CUDA out-of-memory halve the memory knobs and retry, down to 1.

    The knobs only change how the work is batched, not what is computed: the result is the
    same up to floating-point summation order. The halved sizes are kept for the rest of
    the sweep (each later call would otherwise run out of memory first).
    """
    while True:
        try:
            return call()
        except torch.OutOfMemoryError as exc:
            if distributed.active():  # a retry on this rank alone would desynchronise the
                raise  # collectives of the ranks: fail the run (torchrun stops them all)
            first = release_after_oom(exc)
            sizes = _halve_memory_knobs(updater, scorer)
            if sizes is None:
                raise EntropyLabError(
                    f"CUDA out of memory in {what} even at microbatch_size (--microbatch-size) "
                    f"1 and eval_chunk_tokens (--eval-chunk-tokens) 1 ({first}): lower "
                    "max_new_tokens or num_generations in --base-config, or --buffer-size, "
                    "or use a GPU with more memory"
                ) from exc
            warnings.warn(f"CUDA out of memory in {what}: retrying with {sizes}", RuntimeWarning, 2)


def _record_head(setup: Setup, d: Direction | FailedDirection, eta: float) -> PointRecord:
    """The fields every (η, repeat) record starts with; ``success`` until proven."""
    return PointRecord(
        learning_rate=eta,
        repeat=d.repeat,
        seed=d.seed,
        success=False,
        reading=setup.cfg.reading,
        dtype=setup.cfg.dtype,
        eps=EPS[setup.cfg.dtype],
        entropy_before=setup.baseline.of(setup.cfg.entropy_reading),
    )


def _failed_direction_record(setup: Setup, d: FailedDirection, eta: float) -> PointRecord:
    record = _record_head(setup, d, eta)
    record.error = d.error
    record.duration_s = 0.0
    return record


@dataclass(frozen=True)
class _After:
    """H(θ₁) and what the stepped θ₁ says about rounding."""

    readings: EntropyReadings
    quantized_fraction: float
    rounding_effect: float | None


def _entropy_after(setup: Setup, d: Direction, eta: float) -> _After:
    """H(θ₁) after real step(s) at lr = η, the fraction of entries the step left equal, and
    ∇H·(θ₁ − θ₀ − η·v) (one step only: later steps leave the line θ₀ + η·v)."""
    try:
        setup.updater.steps(eta, d.gradient, d.update, setup.cfg.steps)
        one_step = setup.entropy_grad is not None and not setup.cfg.multi_step
        quantized, rounding = setup.updater.rounding(
            eta, d.vector, setup.entropy_grad if one_step else None
        )
        readings_after = setup.scorer.measure(setup.eval_batch, setup.reference_logprob)
        return _After(readings_after, quantized, rounding)
    finally:
        setup.updater.restore()


def _jet_fields(d: Direction, eta: float, reading: Reading) -> dict[str, Any]:
    """The theory along v_r, per unit η, and its predictions at η."""
    jet = d.derivatives.of(reading)
    slope, curvature, third = jet.slope, jet.curvature, jet.third
    second = eta * slope + 0.5 * eta**2 * curvature if curvature is not None else None
    return dict(
        first_order_slope=slope,
        first_order_prediction=eta * slope,
        first_order_slope_conditional=d.derivatives.slope_conditional,
        curvature=curvature,
        second_order_prediction=second,
        third_derivative=third,
        third_order_prediction=second + eta**3 * third / 6
        if second is not None and third is not None
        else None,
        identity_slope=d.identity_slope,
        cui_vanilla_pg_slope=d.forecasts.vanilla_pg if d.forecasts else None,
        cui_natural_pg_slope=d.forecasts.natural_pg if d.forecasts else None,
    )


def measure_point(setup: Setup, d: Direction | FailedDirection, eta: float) -> PointRecord:
    """One (η, repeat) record with the fields of raw_results.json."""
    if isinstance(d, FailedDirection):
        return _failed_direction_record(setup, d, eta)
    started = time.perf_counter()
    cfg = setup.cfg
    reading, baseline = cfg.entropy_reading, setup.baseline
    before = baseline.of(reading)
    record = _record_head(setup, d, eta)
    record.update_norm = d.update_norm
    record.grad_norm = d.gradient.grad_norm
    record.momentum_share = d.momentum_share
    record.mean_reward = d.update.mean_reward
    if d.update.groups is not None:
        record.groups_kept, record.groups_dropped = d.update.groups.kept, d.update.groups.dropped
    if d.derivatives is not None:
        for name, value in _jet_fields(d, eta, reading).items():
            setattr(record, name, value)
    try:
        with setup.costs.phase(Phase.STEP_PLUS):
            after = with_oom_retry(
                f"the step at η={eta!r}",
                lambda: _entropy_after(setup, d, eta),
                setup.updater,
                setup.scorer,
            )
        record.routing_changed_fraction = setup.scorer.routing_changed_fraction()
        change = after.readings.of(reading) - before
        if not math.isfinite(change):
            raise FloatingPointError(f"non-finite entropy after the step ({change})")
        record.quantized_fraction = after.quantized_fraction
        record.rounding_effect = after.rounding_effect
        record.entropy_after = after.readings.of(reading)
        record.entropy_change = change
        record.entropy_change_conditional = after.readings.conditional - baseline.conditional
        record.entropy_change_policy = after.readings.policy - baseline.policy
        record.ess = after.readings.ess
        if cfg.symmetric_check and not cfg.multi_step:
            with setup.costs.phase(Phase.STEP_MINUS):
                mirrored = with_oom_retry(
                    f"the step at η={-eta!r}",
                    lambda: _entropy_after(setup, d, -eta),
                    setup.updater,
                    setup.scorer,
                )
            record.entropy_change_negative = mirrored.readings.of(reading) - before
        record.success = True
    except (FloatingPointError, RuntimeError) as exc:
        if distributed.active() and not isinstance(exc, FloatingPointError):
            # Possibly this rank's alone (e.g. out of memory): the others would wait for it in
            # the next collective. Fail the whole run instead (FloatingPointErrors come from
            # gathered values, so every rank raises them alike and records the point).
            raise
        record.error = f"{type(exc).__name__}: {exc}"
        setup.updater.restore()
    record.duration_s = time.perf_counter() - started
    return record


def run_sweep(
    setup: Setup,
    repeats: Iterable[int] | None = None,
    etas: Iterable[float] | None = None,
    done: set[tuple[float, int]] | None = None,
    on_record: Callable[[PointRecord], None] | None = None,
    progress: bool = True,
) -> list[PointRecord]:
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
            d = direction_or_failure(setup, repeat)
            for eta in repeat_etas:
                record = measure_point(setup, d, eta)
                record.direction_seconds = d.seconds
                records.append(record)
                if on_record is not None:
                    on_record(record)
                change = record.entropy_change if record.entropy_change is not None else math.nan
                bar.set_postfix_str(f"η={eta:.1e} r={repeat} ΔH={change:+.3e}")
                bar.update(1)
    finally:
        bar.close()
    return records
