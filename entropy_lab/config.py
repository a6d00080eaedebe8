"""Configuration: the user's training YAML (RL_Practice key style) and the experiment settings.

Data flow: training YAML -> validated dict -> experiment overrides -> ExperimentConfig.
The effective config (training keys after overrides + experiment settings) is what the
results folder records.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from entropy_lab.errors import ConfigError

# Keys of an RL_Practice training config (DESIGN §6). Anything else warns.
KNOWN_TRAINING_KEYS = frozenset(
    {
        "backbone",
        "lr",
        "buffer_size",
        "microbatch_size",
        "num_generations",
        "rollout_batch_size",
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "clip_eps",
        "grad_clip",
        "bf16",
        "gradient_checkpointing",
        "lr_scheduler",
        "total_steps",
        "save_every",
        "reward_fns",
        "scheduler",
        "simple_entropy_probe",
        "gns_probe",
        "entropy_probe",
        "weight_decay",
        "betas",
        "eps",
        "lora",
        "seed",
        "prompt_template",
    }
)

# Keys whose value must be a number, and whether it must be > 0 (True) or >= 0 (False).
_NUMERIC_KEYS = {
    "lr": True,
    "buffer_size": True,
    "microbatch_size": True,
    "num_generations": True,
    "rollout_batch_size": True,
    "max_new_tokens": True,
    "temperature": True,
    "clip_eps": False,
    "grad_clip": False,
    "total_steps": True,
    "save_every": True,
    "weight_decay": False,
    "top_k": False,
    "top_p": True,
}
_INTEGER_KEYS = {
    "buffer_size",
    "microbatch_size",
    "num_generations",
    "rollout_batch_size",
    "max_new_tokens",
    "total_steps",
    "save_every",
    "top_k",
}

# The seed experiment's overrides (DESIGN §6). buffer_size / microbatch_size may be changed.
EXPERIMENT_OVERRIDES: dict[str, Any] = {
    "total_steps": 2,
    "save_every": 1,
    "buffer_size": 128,
    "microbatch_size": 4,
    "entropy_probe": {"enabled": True},
    "simple_entropy_probe": {"enabled": False},
    "gns_probe": {"enabled": False},
}


def load_training_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a training YAML (always ``yaml.safe_load``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path} (pass an existing YAML with --base-config)"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"malformed YAML in {path}{where}: fix the syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of keys to values, not {type(data).__name__}"
        )
    return validate_training_config(data, source=str(path))


def validate_training_config(cfg: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """Check value types and ranges; warn (never fail) on unknown keys."""
    unknown = sorted(set(cfg) - KNOWN_TRAINING_KEYS)
    if unknown:
        warnings.warn(f"{source}: unknown keys ignored: {', '.join(unknown)}", stacklevel=2)
    out = dict(cfg)
    for key, positive in _NUMERIC_KEYS.items():
        if key not in out or out[key] is None:
            continue
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        try:
            number = float(value)  # YAML reads "1e-6" (no dot) as a string
        except ValueError:
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}") from None
        if not math.isfinite(number) or number < 0 or (positive and number == 0):
            bound = "> 0" if positive else ">= 0"
            raise ConfigError(f"{source}: {key} must be finite and {bound}, got {value!r}")
        if key in _INTEGER_KEYS:
            if number != int(number):
                raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
            out[key] = int(number)
        else:
            out[key] = number
    return out


def apply_experiment_overrides(
    cfg: Mapping[str, Any],
    learning_rate: float,
    buffer_size: int | None = None,
    microbatch_size: int | None = None,
) -> dict[str, Any]:
    """The training config as the experiment runs it: lr = η, two steps, entropy probe only."""
    out = dict(cfg)
    out.update(EXPERIMENT_OVERRIDES)
    out["lr"] = float(learning_rate)
    if buffer_size is not None:
        out["buffer_size"] = int(buffer_size)
    if microbatch_size is not None:
        out["microbatch_size"] = int(microbatch_size)
    return validate_training_config(out, source="overridden config")


def parse_learning_rates(text: str | Iterable[float]) -> list[float]:
    """Parse ``1e-8,1e-7`` (or a list) into a sorted list of distinct positive finite floats."""
    items = text.split(",") if isinstance(text, str) else list(text)
    etas: list[float] = []
    for item in items:
        raw = item.strip() if isinstance(item, str) else item
        if raw == "":
            continue
        try:
            eta = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(
                f"--learning-rates: {raw!r} is not a number (write e.g. 1e-8,1e-7,1e-6)"
            ) from None
        if not math.isfinite(eta) or eta <= 0:
            raise ConfigError(f"--learning-rates: {raw!r} must be a finite number > 0")
        etas.append(eta)
    if not etas:
        raise ConfigError("--learning-rates: give at least one value, e.g. 1e-8,1e-7,1e-6")
    if len(set(etas)) != len(etas):
        dup = sorted({e for e in etas if etas.count(e) > 1})
        raise ConfigError(f"--learning-rates: duplicate values {dup}: list each η once")
    return sorted(etas)


def check_num_repeats(num_repeats: int) -> int:
    """Refuse fewer than 2 repeats, everywhere (sweep, quick, pytest).

    With one repeat there is no standard error, so the residual, lack-of-fit and intercept
    checks could only ever be inconclusive: refusing up front is clearer than a run whose
    verdict is known to be "inconclusive" before it starts.
    """
    if num_repeats < 2:
        raise ConfigError(
            f"--num-repeats must be >= 2 (got {num_repeats}): "
            "standard errors and the lack-of-fit test need repeats"
        )
    return num_repeats


@dataclasses.dataclass
class ExperimentConfig:
    """Everything one sweep needs besides the checkpoint itself."""

    learning_rates: list[float]
    num_repeats: int = 3
    seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"
    eval_size: int = 64  # B_E: prompts in the evaluation batch, one response each
    buffer_size: int = 128  # prompts in each update batch U_r
    num_generations: int = 8  # G: responses per update prompt
    microbatch_size: int = 4  # prompts per micro-batch
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_k: int = 0  # 0 = off: full softmax
    top_p: float = 1.0  # 1.0 = off
    clip_eps: float = 0.2
    grad_clip: float = 1.0  # 0 = no clipping
    steps: int = 1  # k optimizer steps between the two measurements
    task: str = "arithmetic"  # "arithmetic" or a path to a GSM8K-style JSONL file
    prompt_template: str | None = None
    # Response tokens per fp64 entropy chunk: at V = 151,936 one chunk is 256·V·8 B ≈ 0.3 GB
    # and the scorer holds about 6 at once (measured by `entropy-lab bench`).
    eval_chunk_tokens: int = 256
    first_order: bool = True
    curvature: bool = True
    third_order: bool = True  # ∇³H[v,v,v] by a third nested jvp: η_max where c alone misleads
    identity_check: bool = True  # Cui et al.'s covariance identity: a second first-order oracle
    faithful_fp64: bool = True
    symmetric_check: bool = True  # also measure ΔH(−η): ΔH(η) + ΔH(−η) ≈ η²·c exposes noise
    # ∇H at θ₀ once per sweep (one backward pass over E): ∇H·(θ₁ − θ₀ − η·v) is the effect of
    # the parameters' rounding at each point, which the symmetric check cannot see.
    rounding_check: bool = True
    reading: str = "policy"  # which entropy reading defines entropy_change
    training_config: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.learning_rates = parse_learning_rates(self.learning_rates)
        check_num_repeats(self.num_repeats)
        if self.dtype not in ("fp32", "fp64", "bf16"):
            raise ConfigError(f"--dtype must be fp32, fp64 or bf16, got {self.dtype!r}")
        if self.reading not in ("policy", "conditional"):
            raise ConfigError(f"reading must be 'policy' or 'conditional', got {self.reading!r}")
        for name in (
            "eval_size",
            "buffer_size",
            "num_generations",
            "microbatch_size",
            "eval_chunk_tokens",
        ):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")

    @classmethod
    def from_training_config(
        cls, training: Mapping[str, Any], learning_rates: Iterable[float] | str, **settings: Any
    ) -> ExperimentConfig:
        """Take the sampling / update settings from the training config; explicit settings win."""
        mapped = {
            "num_generations": training.get("num_generations"),
            "microbatch_size": training.get("microbatch_size"),
            "buffer_size": training.get("buffer_size"),
            "max_new_tokens": training.get("max_new_tokens"),
            "temperature": training.get("temperature"),
            "top_k": training.get("top_k"),
            "top_p": training.get("top_p"),
            "clip_eps": training.get("clip_eps"),
            "grad_clip": training.get("grad_clip"),
            "prompt_template": training.get("prompt_template"),
        }
        # The seed experiment's buffer and micro-batch overrides, unless set explicitly.
        for key in ("buffer_size", "microbatch_size"):
            mapped[key] = EXPERIMENT_OVERRIDES[key]
        task = training.get("scheduler", {})
        if isinstance(task, dict) and task.get("dataset"):
            mapped["task"] = str(task["dataset"])
        kwargs = {k: v for k, v in mapped.items() if v is not None}
        kwargs.update({k: v for k, v in settings.items() if v is not None})
        return cls(learning_rates=learning_rates, training_config=dict(training), **kwargs)

    def sampling(self) -> dict[str, Any]:
        """The sampling distribution: rollouts and the scorer must share it exactly."""
        return {
            "temperature": self.temperature,
            "max_new_tokens": self.max_new_tokens,
            "top_k": self.top_k,
            "top_p": self.top_p,
        }

    def effective(self) -> dict[str, Any]:
        """The config as run: experiment settings plus the overridden training config."""
        out = dataclasses.asdict(self)
        out["training_config"] = apply_experiment_overrides(
            self.training_config,
            learning_rate=self.learning_rates[0],
            buffer_size=self.buffer_size,
            microbatch_size=self.microbatch_size,
        )
        out["training_config"]["lr"] = "η (each value of learning_rates)"
        return out

    def measurement_key(self) -> dict[str, Any]:
        """The settings that change a measurement at a given η (for caches and resume)."""
        out = dataclasses.asdict(self)
        for key in ("learning_rates", "num_repeats", "training_config"):
            out.pop(key)
        return out
