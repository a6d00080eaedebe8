"""Configuration: the user's training YAML (RL_Practice key style) and the experiment settings.

Data flow: training YAML -> validated dict -> experiment overrides -> ExperimentConfig.
The effective config (training keys after overrides + experiment settings) is what the
results folder records.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import pickle
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
        # RL_Practice's trainer (DESIGN §6)
        "kl_beta",
        'cfg["kl_beta"]',
        "ent_coef",
        "clip_+",
        "ppo_epochs",
        "tf_micro_batch",
        "reward_var_thresh",
        "reject_all_zero",
        "reject_all_max",
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
    data = read_yaml_mapping(path, hint="pass an existing YAML with --base-config")
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


# `quick`'s grid and repeats. On the tiny model fp32 resolves ΔH only from η ≈ 1e-5 (window
# [1e-5, 4.4e-4]), so the quick run on it uses faithful fp64, where the window spans
# [1e-10, 4.4e-4] (measured, README).
QUICK_LEARNING_RATES = "1e-7,1e-6,1e-5"
QUICK_REPEATS = 3

# The --jet flag of the CLI and of the pytest plugin.
JET_OPTION: dict[str, Any] = {
    "type": int,
    "choices": [1, 2, 3],
    "default": 1,
    "help": "derivatives along v by jvp: 1 = ∇H·v (default; vᵀ∇²H v and ∇³H[v,v,v] come from "
    "the ±η pairs), 2 = + vᵀ∇²H v by nested jvp, 3 = + ∇³H[v,v,v] (cross-checks)",
}


class Reading(enum.Enum):
    """Which entropy defines ΔH (``--reading``): the policy's (E reweighted by π_θ/π_θ₀) or
    the conditional one on E's fixed tokens. Each record type reads its own field for it
    (``EntropyReadings.of``, ``DirectionalDerivatives.of``)."""

    POLICY = "policy"
    CONDITIONAL = "conditional"


@dataclasses.dataclass(frozen=True)
class Measurement:
    """The measurement's own settings (not the trainer's, not the load's); None = the
    ExperimentConfig default, except ``eval_size``: None = 256 on the built-in tiny
    checkpoint, else 64 (protocol.configure)."""

    num_repeats: int | None = None
    seed: int | None = None
    eval_size: int | None = None
    eval_chunk_tokens: int | None = None
    steps: int | None = None
    reading: str | None = None
    first_order: bool | None = None
    jet: int | None = None
    identity_check: bool | None = None
    symmetric_check: bool | None = None
    rounding_check: bool | None = None
    faithful_fp64: bool = True

    def given(self) -> dict[str, Any]:
        """The settings given (not None), as ExperimentConfig fields."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


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
    stop_after: str | None = None  # a response ends after this text's tokens
    clip_eps: float = 0.2
    grad_clip: float = 1.0  # 0 = no clipping
    steps: int = 1  # k optimizer steps between the two measurements
    # The trainer's loss (DESIGN §7): entropy_lab.update.Objective
    loss_type: str = "dr_grpo"
    scale_rewards: str = "none"
    kl_beta: float = 0.0
    kl_bias_correction: bool = False
    entropy_coef: float = 0.0
    clip_eps_high: float | None = None  # None: = clip_eps
    prompts: str = "arithmetic"  # "arithmetic[:N]", a prompt file or folder, a data set name
    prompts_split: str | None = None
    prompt_template: str | None = None
    reward: str = "exact_answer"  # comma-separated reward functions (tasks.load_rewards)
    reward_weights: str | None = None
    # The trainer's group filters (RL_Practice): drop such groups and draw new prompts.
    reject_all_zero: bool = False
    reject_all_max: bool = False
    reward_var_thresh: float = 0.0
    # The trainer's modes: sampling U and the loss's backward pass (E is scored in eval mode).
    sampling_mode: str = "eval"
    gradient_mode: str = "eval"
    # The base's weights as the trainer's bitsandbytes quantization left them.
    base_quantization: str = "none"
    base_quant_double: bool = False
    base_load_dtype: str = "fp32"
    kl_reference: str = "base"  # a LoRA policy's KL reference (Setting "kl_reference")
    reference_model: str | None = None  # the KL reference of a full fine-tune
    # Response tokens per fp64 entropy chunk: at V = 151,936 one chunk is 256·V·8 B ≈ 0.3 GB
    # and the scorer holds about 6 at once (measured by `entropy-lab bench`).
    eval_chunk_tokens: int = 256
    first_order: bool = True
    # Derivatives along v by jvp: 1 = ∇H·v only (the ±η pairs give c and ∇³H; see
    # analysis.MeasuredJet), 2 = + vᵀ∇²H v by a nested jvp, 3 = + ∇³H[v,v,v] (cross-checks).
    jet: int = 1
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
        if self.jet not in (1, 2, 3):
            raise ConfigError(f"--jet must be 1, 2 or 3, got {self.jet!r}")
        if self.dtype not in ("fp32", "fp64", "bf16"):
            raise ConfigError(f"--dtype must be fp32, fp64 or bf16, got {self.dtype!r}")
        if self.reading not in {r.value for r in Reading}:
            raise ConfigError(f"reading must be 'policy' or 'conditional', got {self.reading!r}")
        for name in ("eval_size", "eval_chunk_tokens", "steps"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in SETTING_NAMES:  # the training setup: checked by its one declaration
            if name in _FIELDS:
                setattr(self, name, _checked(name, getattr(self, name), "config"))

    @classmethod
    def from_setup(
        cls,
        setup: TrainingSetup,
        learning_rates: Iterable[float] | str,
        training_config: Mapping[str, Any] | None = None,
        **measurement: Any,
    ) -> ExperimentConfig:
        """The resolved training setup plus the measurement's own settings (grid, repeats,
        seed, device, dtype, B_E, …)."""
        values = {k: v for k, v in setup.values.items() if k in _FIELDS and v is not None}
        values["prompts_split"] = setup.prompts_split
        values.update({k: v for k, v in measurement.items() if v is not None})
        return cls(
            learning_rates=learning_rates, training_config=dict(training_config or {}), **values
        )

    @property
    def entropy_reading(self) -> Reading:
        """``reading`` as the typed accessor of the entropy that defines ΔH."""
        return Reading(self.reading)

    @property
    def multi_step(self) -> bool:
        """k > 1 optimizer steps leave the line θ₀ + η·v: the oracles along it (the jvp, the
        ±η pair, the rounding check) are off, and later steps clip against θ₀'s log-probs."""
        return self.steps > 1

    @property
    def reference_adapter(self) -> str | None:
        """The starting adapter's folder when it is the KL reference, else None (base)."""
        return None if self.kl_reference in ("base", RL_PRACTICE_REFERENCE) else self.kl_reference

    def sampling(self) -> dict[str, Any]:
        """The sampling distribution: rollouts and the scorer must share it exactly."""
        return {
            "temperature": self.temperature,
            "max_new_tokens": self.max_new_tokens,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "stop_after": self.stop_after,
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


# -- training_args.bin: a pickled TrainingArguments / GRPOConfig, read without running it ------

# Modules whose argument classes may be rebuilt (as plain field records, never imported).
_ARGUMENT_MODULES = ("transformers.", "trl.", "accelerate.", "peft.")
_ARGUMENT_SUFFIXES = ("Arguments", "Config", "State")
# Enums and value types inside the arguments: rebuilt as their plain value.
_VALUE_CLASSES = frozenset(
    {
        ("torch", "device"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("collections", "OrderedDict"),
    }
)
_ENUM_SUFFIXES = ("Strategy", "Type", "Names", "Mode", "Precision", "Kind")


class FieldRecord(dict):
    """An argument object rebuilt as its fields only (no class of the user's file is run)."""

    type_name = ""

    def __setstate__(self, state: Any) -> None:  # pickle's BUILD
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{self.type_name}: a state that is not a mapping")
        self.update(state)


def _record_class(qualified: str) -> type:
    return type("FieldRecord", (FieldRecord,), {"type_name": qualified})


def _plain_value(qualified: str):
    """Stand-in for an enum or value type: called by pickle's REDUCE, returns plain data."""

    def rebuild(*args: Any) -> Any:
        if qualified in ("builtins.set", "builtins.frozenset"):
            return sorted(args[0], key=repr) if args else []
        if qualified == "collections.OrderedDict":
            return dict(*args)
        return args[0] if len(args) == 1 else list(args)

    return rebuild


class _ArgumentsUnpickler(pickle.Unpickler):
    """Rebuilds argument classes as :class:`FieldRecord`, their enums as values; refuses every
    other global. Nothing from the file is imported or called."""

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if (module, name) in _VALUE_CLASSES:
            return _plain_value(qualified)
        if module.startswith(_ARGUMENT_MODULES) and "." not in name:
            if name.endswith(_ARGUMENT_SUFFIXES):
                return _record_class(qualified)
            if name.endswith(_ENUM_SUFFIXES):
                return _plain_value(qualified)
        raise pickle.UnpicklingError(f"refused global {qualified}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a tensor (persistent id): not an argument object")


def read_training_args(path: str | Path) -> dict[str, Any]:
    """The fields of a pickled ``TrainingArguments`` / ``GRPOConfig`` (``training_args.bin``),
    read by a restricted unpickler that runs no code of the file; anything that is not an
    argument object is refused in one line."""
    import io
    import zipfile

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not names:
                raise ConfigError(f"{path}: a zip file without data.pkl (not a torch.save file)")
            payload = archive.read(names[0])
    except zipfile.BadZipFile:
        payload = path.read_bytes()  # the legacy (non-zip) format is one plain pickle
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({type(exc).__name__})") from None
    try:
        value = _ArgumentsUnpickler(io.BytesIO(payload)).load()
    except pickle.UnpicklingError as exc:
        raise ConfigError(
            f"{path} is not a training-arguments object ({exc}); refused without running it"
        ) from None
    except Exception as exc:  # truncated or not a pickle at all
        raise ConfigError(
            f"{path} cannot be read as pickled training arguments ({type(exc).__name__}): "
            "the file is damaged or not a training_args.bin"
        ) from None
    if not isinstance(value, FieldRecord):
        raise ConfigError(
            f"{path} holds a {type(value).__name__}, not a training-arguments object "
            "(TrainingArguments / GRPOConfig)"
        )
    out = dict(value)
    out["__class__"] = value.type_name
    return out


# -- the training setup: every setting that changes the update or the sampling, with its source --

LOSS_TYPE_NAMES = ("dr_grpo", "dr_grpo_rl_practice", "grpo", "dapo", "bnpo")
SCALE_REWARDS_NAMES = ("none", "group", "batch")


def _boolean(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _optional_float(text: Any) -> float | None:
    return None if text is None or str(text).lower() in ("none", "") else float(text)


# RL_Practice's reference model: the base quantized NF4 with the starting adapter.
RL_PRACTICE_REFERENCE = "nf4 base + starting adapter"
_NONE = object()  # "no such source" (None is a real value: e.g. clip_eps_high = clip_eps)
# A sampler setting its trainer leaves to HF ``generate``: the model's generation_config.json,
# else transformers' global default (top_k 50, top_p 1).
GENERATE = "generate"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting of the training setup, declared once: the sweep flag, the pytest option,
    the validation, the sources it is read from, the setup table and run_meta.json all come
    from this (TRL's GRPOConfig, cleanrl's Args)."""

    name: str
    parse: Any  # str -> value
    help: str
    choices: tuple[Any, ...] | None = None
    # When the setting must have a source on a checkpoint other than the built-in tiny one:
    # "always", "steps>1" (only a clipped ratio ≠ 1 sees it), "kl" (only with kl_beta ≠ 0),
    # "rewards>1" (several reward functions), "quantized" (a quantized base), or "never".
    required: str = "always"
    lowest: float | None = 0.0  # numbers: the least valid value (None: no bound)
    above_lowest: bool = False  # numbers: strictly above ``lowest``
    tiny: Any = _NONE  # what the built-in tiny checkpoint's trainer (entropy_lab.tiny) did
    rl_practice: tuple[str, ...] = ()  # keys of an RL_Practice config.yaml
    rl_practice_code: Any = _NONE  # RL_Practice's trainer when its config is silent
    trl: str | None = None  # the GRPOConfig field
    unset: str | None = None  # the table's text for a value left unset (None)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "max_new_tokens",
        int,
        "tokens sampled per response (TRL: max_completion_length)",
        lowest=1,
        rl_practice=("max_new_tokens",),
        trl="max_completion_length",
    ),
    Setting(
        "num_generations",
        int,
        "G: responses per update prompt",
        lowest=1,
        rl_practice=("num_generations",),
        trl="num_generations",
    ),
    Setting(
        "temperature",
        float,
        "sampling temperature (the loss and H use it too)",
        above_lowest=True,
        rl_practice=("temperature",),
        trl="temperature",
    ),
    Setting(
        "top_p",
        float,
        "nucleus sampling (1 = off); H stays the full softmax's",
        above_lowest=True,
        tiny=1.0,
        rl_practice=("top_p",),
        rl_practice_code=GENERATE,
        trl="top_p",
    ),
    Setting(
        "top_k",
        int,
        "top-k sampling (0 = off); H stays the full softmax's",
        tiny=0,
        rl_practice=("top_k",),
        rl_practice_code=GENERATE,
        trl="top_k",
    ),
    Setting(
        "stop_after",
        str,
        "a text that ends a response when sampled (RL_Practice: </answer>); unset = EOS only",
        required="never",
        tiny=None,
        rl_practice_code="</answer>",
        unset="not set: responses end at EOS or max_new_tokens",
    ),
    Setting(
        "loss_type",
        str,
        "the trainer's loss aggregation",
        LOSS_TYPE_NAMES,
        tiny="dr_grpo",  # tiny.dr_grpo_steps: ÷ (rows · max_new_tokens)
        rl_practice=("loss_type",),
        rl_practice_code="dr_grpo_rl_practice",
        trl="loss_type",
    ),
    Setting(
        "scale_rewards",
        str,
        "advantage ÷ (std + 1e-4) of the",
        SCALE_REWARDS_NAMES,
        tiny="none",
        rl_practice=("scale_rewards",),
        rl_practice_code="none",
        trl="scale_rewards",
    ),
    Setting(
        "kl_beta",
        float,
        "β of the k3 KL to the reference (TRL: beta)",
        tiny=0.0,
        rl_practice=("kl_beta",),
        rl_practice_code=0.0,
        trl="beta",
    ),
    Setting(
        "kl_bias_correction",
        _boolean,
        "KL × ρ (TRL: use_bias_correction_kl)",
        required="kl",
        tiny=False,
        rl_practice_code=False,
        trl="use_bias_correction_kl",
    ),
    Setting(
        "kl_reference",
        str,
        "the KL reference of a LoRA policy: base (adapter disabled; TRL given a peft_config) "
        "or the starting adapter's folder (TRL given a PeftModel)",
        required="kl",
        tiny="base",
        rl_practice_code=RL_PRACTICE_REFERENCE,
    ),
    Setting(
        "entropy_coef",
        float,
        "entropy bonus coefficient (RL_Practice: ent_coef)",
        lowest=None,
        tiny=0.0,
        rl_practice=("ent_coef", "entropy_coef"),  # read for the built-in trainer only
        rl_practice_code=0.0,
        trl="entropy_coef",
    ),
    Setting(
        "clip_eps",
        float,
        "PPO clip ε (TRL: epsilon)",
        required="steps>1",
        rl_practice=("clip_eps",),
        trl="epsilon",
    ),
    Setting(
        "clip_eps_high",
        _optional_float,
        "upper clip ε (RL_Practice: clip_+)",
        required="steps>1",
        tiny=None,
        rl_practice=("clip_+",),
        trl="epsilon_high",
        unset="not set: = clip_eps",
    ),
    Setting(
        "grad_clip",
        float,
        "gradient-norm clip, 0 = off (TRL: max_grad_norm)",
        rl_practice=("grad_clip",),
        trl="max_grad_norm",
    ),
    Setting(
        "buffer_size",
        int,
        "update prompts per repeat (the measurement's U)",
        required="never",
        lowest=1,
    ),
    Setting("microbatch_size", int, "prompts per micro-batch", required="never", lowest=1),
    Setting(
        "reject_all_zero",
        _boolean,
        "drop groups whose rewards are all 0 and draw new prompts (RL_Practice)",
        tiny=False,
        rl_practice=("reject_all_zero",),
    ),
    Setting(
        "reject_all_max",
        _boolean,
        "drop groups whose rewards are all the maximum and draw new prompts (RL_Practice)",
        tiny=False,
        rl_practice=("reject_all_max",),
    ),
    Setting(
        "reward_var_thresh",
        float,
        "drop groups whose reward variance is below this and draw new prompts (RL_Practice)",
        tiny=0.0,
        rl_practice=("reward_var_thresh",),
    ),
    Setting(
        "sampling_mode",
        str,
        "the policy's mode while sampling U: eval (no dropout) or train (LoRA dropout on)",
        ("eval", "train"),
        tiny="eval",
        rl_practice_code="eval",
    ),
    Setting(
        "gradient_mode",
        str,
        "the policy's mode in the loss's backward pass: eval or train (dropout seeded per repeat)",
        ("eval", "train"),
        tiny="eval",
        rl_practice_code="train",
    ),
    Setting(
        "base_quantization",
        str,
        "the base as the trainer quantized it (bitsandbytes): none, fp4, nf4 or int8",
        ("none", "fp4", "nf4", "int8"),
        tiny="none",
        rl_practice_code="fp4",
    ),
    Setting(
        "base_quant_double",
        _boolean,
        "bitsandbytes double quantization of the 4-bit base's absmax",
        required="quantized",
        tiny=False,
        rl_practice_code=True,
    ),
    Setting(
        "base_load_dtype",
        str,
        "the dtype the trainer loaded its quantized base in (its weights hold that dtype's values)",
        ("fp32", "bf16", "fp16"),
        required="quantized",
        tiny="fp32",
        rl_practice_code="bf16",
    ),
    Setting(
        "prompts",
        str,
        "prompt file (JSONL/JSON/CSV/Parquet) or arithmetic[:N]",
        tiny="arithmetic",
    ),
    Setting(
        "prompt_template",
        str,
        "file with a {question} slot, or r1 (RL_Practice's gsm8k_r1_template wrapper)",
        required="never",
        tiny=None,
        rl_practice=("prompt_template",),
        unset="not set: each record's own prompt",
    ),
    Setting(
        "reward",
        str,
        "FILE.py:NAME or module:NAME or a built-in, comma-separated",
        tiny="exact_answer",
    ),
    Setting(
        "reward_weights",
        str,
        "comma-separated weights, one per reward",
        required="rewards>1",
        tiny=None,
        rl_practice=("reward_weights",),
        rl_practice_code=None,
        trl="reward_weights",
        unset="not set: each reward 1",
    ),
)
SETTING_NAMES = tuple(s.name for s in SETTINGS)
_BY_NAME = {s.name: s for s in SETTINGS}

# The built-in tiny checkpoint's trainer (entropy_lab.tiny): what its config.yaml leaves unsaid.
TINY_DEFAULTS: dict[str, Any] = {s.name: s.tiny for s in SETTINGS if s.tiny is not _NONE}
# The measurement's update batch (DESIGN §6: the seed experiment's overrides).
MEASUREMENT_BATCH = {"buffer_size": 128, "microbatch_size": 4}

# RL_Practice config keys -> settings.
_RL_PRACTICE_KEYS = {key: s.name for s in SETTINGS for key in s.rl_practice}
# Keys RL_Practice configs carry that its trainer never reads (its generate call passes no
# top_k / top_p; its loss has no entropy term; ``cfg["kl_beta"]`` is a literal key, while
# the code reads cfg.get("kl_beta", 0.0)): noted, never applied.
_RL_PRACTICE_UNREAD = ("top_k", "top_p", "ent_coef", "entropy_coef", 'cfg["kl_beta"]')
# Why RL_Practice's trainer has each value its config does not set (its rl_runner.py).
_RL_PRACTICE_WHY = {
    "top_p": "HF generate's default",
    "top_k": "HF generate's default",
    "loss_type": "Dr-GRPO: ÷ G·longest of the group",
    "scale_rewards": "Dr-GRPO: no std division",
    "kl_beta": "cfg.get('kl_beta', 0.0)",
    "kl_bias_correction": "plain k3",
    "kl_reference": "its ref_model",
    "entropy_coef": "no entropy term in its DRGRPO loss",
    "sampling_mode": "samples in eval mode",
    "stop_after": "StopAfterAnswer: pad forced after </answer>",
    "gradient_mode": "loss in train mode: LoRA dropout on",
    "base_quantization": "bitsandbytes 4-bit, quant type unset: FP4",
    "base_quant_double": "bnb_4bit_use_double_quant=True",
    "base_load_dtype": "from_pretrained(torch_dtype=torch.bfloat16)",
    "reward_weights": "reward_fns summed: each weight 1",
}
_RL_PRACTICE_UNUSED = {
    "backbone": "the checkpoint names its base model",
    "lr": "η replaces it",
    "total_steps": "a training-run length",
    "save_every": "a training-run setting",
    "bf16": "--dtype decides",
    "gradient_checkpointing": "changes memory, not the gradient",
    "rollout_batch_size": "generation batching, memory only",
    "tf_micro_batch": "teacher-forcing micro-batch, memory only",
    "weight_decay": "in the saved optimizer state",
    "betas": "in the saved optimizer state",
    "eps": "in the saved optimizer state",
    "lora": "the adapter folder holds it",
    "seed": "--seed decides",
    "buffer_size": "the measurement's U is buffer_size below",
    "microbatch_size": "memory only: the losses are normalised globally",
}
_UNUSED_WORDS = ("vllm", "eval", "probe", "wandb", "log", "save", "checkpoint", "output", "hub")

# TRL GRPOConfig fields -> settings.
_TRL_KEYS = {s.trl: s.name for s in SETTINGS if s.trl}
# GRPOConfig fields whose non-default value makes an update the measurement cannot take.
_TRL_UNSUPPORTED = {
    "importance_sampling_level": ("token",),
    "top_entropy_quantile": (1.0,),
    "mask_truncated_completions": (False,),
    "delta": (None,),
    "off_policy_mask_threshold": (None,),
    "use_adaptive_entropy": (False,),
    "multi_objective_aggregation": ("sum_then_normalize",),
    "repetition_penalty": (1.0,),
    "min_p": (None, 0.0),
}
_TRL_MARKERS = (
    "max_completion_length",
    "loss_type",
    "beta",
    "epsilon",
    "per_device_train_batch_size",
)


@dataclasses.dataclass
class TrainingSetup:
    """The resolved setup: effective values, where each came from, and what was not used."""

    values: dict[str, Any]
    sources: dict[str, str]
    not_used: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    prompts_split: str | None = None
    # The RL_Practice YAML the setup read last (--base-config over the checkpoint's own).
    training_config_path: Path | None = None

    def table(self) -> str:
        """``setting | value | from``, one row per setting, then the notes."""
        rows = [
            (n, _show(self.values.get(n)), self.sources.get(n, _UNSET.get(n, "not set")))
            for n in SETTING_NAMES
        ]
        widths = [max(len(r[i]) for r in rows + [("setting", "value", "from")]) for i in range(2)]
        lines = ["TRAINING SETUP", f"{'setting':<{widths[0]}} | {'value':<{widths[1]}} | from"]
        lines.append("-" * (widths[0] + widths[1] + 10))
        lines += [f"{n:<{widths[0]}} | {v:<{widths[1]}} | {src}" for n, v, src in rows]
        if self.not_used:
            lines.append("not used by the measurement: " + ", ".join(self.not_used))
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


_UNSET = {s.name: s.unset for s in SETTINGS if s.unset}


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def find_training_config(step_dir: Path) -> Path | None:
    """RL_Practice's ``config.yaml`` beside the step folder or up to two folders above it."""
    for folder in (step_dir, step_dir.parent, step_dir.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def check_setting(name: str, value: Any) -> Any:
    """A flag's value parsed and checked (the error names the flag)."""
    return _checked(name, value, _BY_NAME[name].flag)


def _checked(name: str, value: Any, where: str) -> Any:
    """``value`` parsed and checked against the setting's declaration; the error names the
    source and the flag."""
    setting = _BY_NAME[name]
    if value is None:
        return None
    try:
        parsed = setting.parse(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name} = {value!r} is not a valid {setting.flag}") from None
    if setting.choices is not None and parsed not in setting.choices:
        kind = "loss type" if name == "loss_type" else name
        raise ConfigError(
            f"{where}: unknown {kind} {parsed!r} ({setting.flag}): one of "
            + ", ".join(str(c) for c in setting.choices)
        )
    if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
        low = setting.lowest
        if not math.isfinite(parsed) or (
            low is not None and (parsed < low or (setting.above_lowest and parsed == low))
        ):
            bound = "" if low is None else f" and {'>' if setting.above_lowest else '>='} {low:g}"
            raise ConfigError(
                f"{where}: {name} must be finite{bound}, got {value!r} ({setting.flag})"
            )
    return parsed


def _rl_practice_layer(cfg: Mapping[str, Any], label: str, implied: bool, step: int | None):
    """(values, sources, not used, notes) of an RL_Practice training config."""
    values, sources, unused, notes = {}, {}, [], []
    if implied:  # what RL_Practice's trainer does where its config is silent (DESIGN §6)
        for setting in SETTINGS:
            if setting.rl_practice_code is not _NONE:
                values[setting.name] = setting.rl_practice_code
                sources[setting.name] = f"RL_Practice's trainer ({_RL_PRACTICE_WHY[setting.name]})"
    for key, value in cfg.items():
        if implied and key in _RL_PRACTICE_UNREAD:
            notes.append(f"{label}: {key} = {value!r} is not read by RL_Practice's trainer")
        elif key in _RL_PRACTICE_KEYS:
            name = _RL_PRACTICE_KEYS[key]
            values[name] = _checked(name, value, f"{label}: {key}")
            sources[name] = label if key == name else f"{label}: {key}"
        elif key == "reward_fns":
            names = [value] if isinstance(value, str) else list(value or [])
            if names:
                values["reward"] = ",".join(str(n) for n in names)
                sources["reward"] = f"{label}: reward_fns"
        elif key == "scheduler" and isinstance(value, Mapping):
            dataset = value.get("dataset_name") or value.get("dataset")
            if dataset:
                values["prompts"] = str(dataset)
                if implied and str(dataset).endswith("_r1_template"):  # its prompt wrapper
                    values["prompt_template"] = "r1"
                    sources["prompt_template"] = f"{label}: scheduler.dataset_name {dataset}"
                sources["prompts"] = f"{label}: scheduler." + (
                    "dataset_name" if value.get("dataset_name") else "dataset"
                )
                if value.get("split"):
                    values["_split"] = str(value["split"])
            other = sorted(set(value) - {"dataset_name", "dataset", "split"})
            if other:
                unused.append("scheduler." + "/".join(other) + " (prompt order in training)")
        elif key == "ppo_epochs":
            if int(value) > 1:
                notes.append(
                    f"{label}: ppo_epochs = {value}: the trainer takes {value} optimizer steps per "
                    "buffer; the measurement takes --steps (see steps in the config)"
                )
            else:
                unused.append("ppo_epochs (1)")
        elif key == "lr_scheduler":
            notes.append(_schedule_note(cfg, label, step))
        elif key in _RL_PRACTICE_UNUSED:
            unused.append(f"{key} ({_RL_PRACTICE_UNUSED[key]})")
        elif any(word in key.lower() for word in _UNUSED_WORDS):
            unused.append(key)
        elif key not in KNOWN_TRAINING_KEYS:
            warnings.warn(f"{label}: unknown key ignored: {key}", stacklevel=3)
    return values, sources, unused, notes


def _schedule_note(cfg: Mapping[str, Any], label: str, step: int | None) -> str:
    """The lr factor RL_Practice's scheduler held at the saved step (its scheduler.pt: the
    factor of step N+1, the step the measurement stands for); reported, not applied: the
    measured step runs at lr = η exactly."""
    kind = cfg.get("lr_scheduler")
    total = cfg.get("total_steps")
    if not isinstance(total, (int, float)) or step is None or total <= 0:
        return f"{label}: lr_scheduler = {kind} (lr = η is set exactly; no factor applied)"
    scheduler = rl_practice_scheduler(cfg, one_parameter_adamw(1.0))
    if scheduler is None:
        return (
            f"{label}: lr_scheduler = {kind}: no scheduler in RL_Practice's trainer (constant lr)"
        )
    factor = float(scheduler.lr_lambdas[0](step))
    return (
        f"{label}: lr_scheduler = {kind} with warmup int(0.05·{total}) = "
        f"{int(0.05 * total)} steps: factor {factor:.3g} after step {step} of {total} "
        "(reported, not applied: the measured step runs at lr = η exactly)"
    )


def one_parameter_adamw(lr: float):
    """A stand-in optimizer to rebuild a trainer's scheduler on (schedules ignore params)."""
    import torch

    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def rl_practice_scheduler(cfg: Mapping[str, Any], optimizer: Any) -> Any:
    """RL_Practice's scheduler as its DRGRPO builds it (warmup int(0.05·total_steps),
    transformers' constant or cosine schedule), or None (no scheduler: the constant lr)."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    kind, total = cfg.get("lr_scheduler"), int(cfg.get("total_steps") or 0)
    warmup = int(0.05 * total)
    if kind in ("const", "constant"):
        return get_constant_schedule_with_warmup(optimizer, warmup)
    if kind == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total)
    return None


def rl_practice_schedule(cfg: Mapping[str, Any], steps: int) -> dict[int, float]:
    """lr of RL_Practice's optimizer steps 1..steps: its scheduler (DG:66-87) rebuilt with
    transformers' own functions on a one-parameter AdamW; no scheduler → the constant lr."""
    base_lr = float(cfg["lr"])
    optimizer = one_parameter_adamw(base_lr)
    scheduler = rl_practice_scheduler(cfg, optimizer)
    if scheduler is None:
        return {s: base_lr for s in range(1, steps + 1)}
    used = {}
    for s in range(1, steps + 1):
        used[s] = float(scheduler.get_last_lr()[0])  # the lr this step runs at
        optimizer.step()
        scheduler.step()
    return used


def _trl_layer(args: Mapping[str, Any], label: str):
    """(values, sources, not used, notes) of a TRL GRPOConfig (training_args.bin or YAML)."""
    values, sources, unused, notes = {}, {}, [], []
    for key, allowed in _TRL_UNSUPPORTED.items():
        if key in args and args[key] not in allowed:
            raise ConfigError(
                f"{label}: {key} = {args[key]!r} makes an update this measurement does not "
                f"reproduce (supported: {allowed[0]!r})"
            )
    for key, name in _TRL_KEYS.items():
        if key not in args:
            continue
        value = args[key]
        where = f"{label}: {key}"
        if key == "scale_rewards" and isinstance(value, bool):  # TRL < 0.22: True = group
            value = "group" if value else "none"
        if key in ("top_k", "top_p") and value is None:  # generate's own resolution
            value = GENERATE
            values[name], sources[name] = GENERATE, f"{where} None: HF generate's default"
            continue
        if key == "reward_weights" and value is not None:
            value = ",".join(f"{float(w):g}" for w in value)
        values[name] = _checked(name, value, where)
        sources[name] = where
    if "loss_type" in args:  # a GRPOConfig: what its trainer does beyond the listed fields
        _trl_trainer_layer(args, label, values, sources)
    if "beta" in args and "use_bias_correction_kl" not in args:
        values["kl_bias_correction"] = False
        sources["kl_bias_correction"] = f"{label} (a TRL without use_bias_correction_kl: plain k3)"
    if "entropy_coef" not in args and "loss_type" in args:
        values["entropy_coef"] = 0.0
        sources["entropy_coef"] = f"{label} (a TRL without entropy_coef: no bonus)"
    if values.get("clip_eps_high") is None and "epsilon" in args:
        sources["clip_eps_high"] = f"{label}: epsilon_high None (= epsilon)"
        values["clip_eps_high"] = None
    if "reward_weights" in args and args["reward_weights"] is None:
        sources["reward_weights"] = f"{label}: reward_weights None (each 1)"
    iterations = args.get("num_iterations", 1)
    if iterations and int(iterations) > 1:
        notes.append(
            f"{label}: num_iterations = {iterations}: the trainer steps {iterations}× per "
            "generation batch; the measurement takes --steps"
        )
    rows = args.get("per_device_train_batch_size")
    accumulation = args.get("gradient_accumulation_steps", 1)
    if rows and args.get("num_generations"):
        notes.append(
            f"{label}: the trainer's step sees {rows} × {accumulation} rows per process "
            f"({rows * accumulation / args['num_generations']:g} prompts × "
            f"{args['num_generations']}); the measurement's U is buffer_size prompts"
        )
    if args.get("lr_scheduler_type") not in (None, "constant"):
        notes.append(
            f"{label}: lr_scheduler_type = {args.get('lr_scheduler_type')} (not applied: the "
            "measured step runs at lr = η exactly)"
        )
    used = set(_TRL_KEYS) | set(_TRL_UNSUPPORTED) | {"num_iterations", "__class__"}
    if "__class__" in args:
        unused.append(
            f"{len(set(args) - used)} other {args['__class__'].rsplit('.', 1)[-1]} fields"
        )
    else:
        unused += sorted(set(args) - used)
    return values, sources, unused, notes


def _trl_trainer_layer(args: Mapping[str, Any], label: str, values: dict, sources: dict) -> None:
    """GRPOTrainer's modes, group handling and base quantization from its GRPOConfig."""
    off = bool(args.get("disable_dropout", False))
    mode = "eval" if off else "train"  # every dropout p = 0 is eval mode's function
    for name in ("sampling_mode", "gradient_mode"):
        values[name] = mode
        sources[name] = f"{label}: disable_dropout {off} (TRL " + (
            "zeroes every dropout)" if off else "samples and takes its loss in train mode)"
        )
    for name, keep_all in (
        ("reject_all_zero", False),
        ("reject_all_max", False),
        ("reward_var_thresh", 0.0),
    ):
        values[name], sources[name] = keep_all, f"{label} (GRPOTrainer keeps every group)"
    quantization = (args.get("model_init_kwargs") or {}).get("quantization_config")
    kind, double = quantization_of(quantization)
    values["base_quantization"] = kind
    sources["base_quantization"] = f"{label}: model_init_kwargs.quantization_config" + (
        "" if quantization else " not set"
    )
    if kind != "none":
        values["base_quant_double"] = double
        sources["base_quant_double"] = f"{label}: bnb_4bit_use_double_quant"
        init = args.get("model_init_kwargs") or {}
        dtype = str(init.get("dtype") or init.get("torch_dtype") or "float32").replace("torch.", "")
        values["base_load_dtype"] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(
            dtype, dtype
        )
        sources["base_load_dtype"] = f"{label}: model_init_kwargs.dtype"


def quantization_of(config: Any) -> tuple[str, bool]:
    """(kind, double quant) of a BitsAndBytesConfig (a mapping or its fields), as
    bitsandbytes reads it: 4-bit with no quant type is FP4."""
    if not config:
        return "none", False
    fields = config if isinstance(config, Mapping) else vars(config)
    if fields.get("load_in_4bit") or fields.get("_load_in_4bit"):
        kind = str(fields.get("bnb_4bit_quant_type") or "fp4").lower()
        return kind, bool(fields.get("bnb_4bit_use_double_quant", False))
    if fields.get("load_in_8bit") or fields.get("_load_in_8bit"):
        return "int8", False
    return "none", False


def _is_trl_yaml(data: Mapping[str, Any]) -> bool:
    return any(key in data for key in _TRL_MARKERS)


def read_yaml_mapping(path: str | Path, hint: str = "pass an existing YAML") -> dict[str, Any]:
    """A YAML file holding a mapping (``yaml.safe_load``), without RL_Practice validation."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} ({hint})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"malformed YAML in {path}{where}: fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of keys to values, not {type(data).__name__}"
        )
    return data


def resolve_training_setup(
    step_dir: str | Path,
    *,
    tiny: bool = False,
    base_config: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    steps: int = 1,
    generation_config: Mapping[str, Any] | None = None,
) -> TrainingSetup:
    """Every setting from its highest source: defaults (built-in tiny checkpoint only) < the
    checkpoint's training config (RL_Practice ``config.yaml`` beside or above the step; TRL's
    ``training_args.bin``) < ``--base-config`` (RL_Practice or TRL YAML) < the measurement's
    batch (buffer_size, microbatch_size; DESIGN §6) < flags. A setting that changes the update
    or the sampling and has no source is an error naming its flag."""
    step_dir = Path(step_dir)
    layers: list[tuple[dict, dict, list, list]] = []
    if tiny:
        layers.append(
            (dict(TINY_DEFAULTS), dict.fromkeys(TINY_DEFAULTS, "default (built-in tiny)"), [], [])
        )
    yaml_path = rl_practice_yaml = find_training_config(step_dir)
    if yaml_path is not None:
        cfg = load_training_config_quietly(yaml_path)
        label = _label(yaml_path, step_dir)
        layers.append(_rl_practice_layer(cfg, label, not tiny, _step_number(step_dir)))
    args_path = step_dir / "training_args.bin"
    if args_path.is_file():
        layers.append(_trl_layer(read_training_args(args_path), "training_args.bin"))
    if base_config:
        data = read_yaml_mapping(base_config)
        label = f"--base-config {Path(base_config).name}"
        if _is_trl_yaml(data):
            layers.append(_trl_layer(data, label))
        else:
            data = validate_training_config_quietly(data, label)
            rl_practice_yaml = Path(base_config)
            layers.append(_rl_practice_layer(data, label, not tiny, _step_number(step_dir)))
    layers.append(
        (
            dict(MEASUREMENT_BATCH),
            dict.fromkeys(MEASUREMENT_BATCH, "measurement (DESIGN §6)"),
            [],
            [],
        )
    )
    flag_values = {k: v for k, v in (flags or {}).items() if v is not None}
    layers.append(
        (
            {k: _checked(k, v, _BY_NAME[k].flag) for k, v in flag_values.items()},
            {k: _BY_NAME[k].flag for k in flag_values},
            [],
            [],
        )
    )
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    not_used: list[str] = []
    notes: list[str] = []
    split = None
    for layer_values, layer_sources, unused, layer_notes in layers:
        split = layer_values.pop("_split", split) if "prompts" in layer_values else split
        values.update(layer_values)
        sources.update(layer_sources)
        not_used += [u for u in unused if u not in not_used]
        notes += layer_notes
    _resolve_generate(values, sources, generation_config or {})
    _require_sources(values, sources, steps)
    for name in SETTING_NAMES:
        values.setdefault(name, None)
    return TrainingSetup(values, sources, not_used, notes, split, rl_practice_yaml)


# transformers' GenerationConfig defaults for what neither the caller nor the model sets.
GENERATE_DEFAULTS = {"top_k": 50, "top_p": 1.0}


def _resolve_generate(values: dict, sources: dict, generation_config: Mapping[str, Any]) -> None:
    """Sampler settings left to HF ``generate``: the model's generation_config.json, else
    transformers' global default (top_k 50)."""
    for name, default in GENERATE_DEFAULTS.items():
        if values.get(name) != GENERATE:
            continue
        own = generation_config.get(name)
        values[name] = _checked(name, own if own is not None else default, "generation_config")
        sources[name] += (
            " → the model's generation_config.json"
            if own is not None
            else f" → transformers' default {default:g}"
        )


def _required(setting: Setting, values: Mapping[str, Any], steps: int) -> bool:
    rule = setting.required
    if rule == "always":
        return True
    if rule == "steps>1":
        return steps > 1
    if rule == "kl":
        return bool(values.get("kl_beta"))
    if rule == "quantized":
        return values.get("base_quantization") not in (None, "none")
    if rule == "rewards>1":
        return "," in str(values.get("reward") or "")
    return False


def _require_sources(values: Mapping[str, Any], sources: Mapping[str, str], steps: int) -> None:
    missing = [s for s in SETTINGS if s.name not in sources and _required(s, values, steps)]
    if missing:
        names = ", ".join(f"{s.name} ({s.flag})" for s in missing)
        raise ConfigError(
            f"no source for {names}: the checkpoint's training config does not set "
            f"{'it' if len(missing) == 1 else 'them'}; pass "
            + " ".join(f"{s.flag} …" for s in missing)
            + " or --base-config YAML (only the built-in tiny checkpoint has defaults)"
        )


def _label(path: Path, step_dir: Path) -> str:
    return path.name if path.parent == step_dir else f"{path.parent.name}/{path.name}"


def _step_number(step_dir: Path) -> int | None:
    tail = step_dir.name.rsplit("_", 1)[-1].rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def load_training_config_quietly(path: str | Path) -> dict[str, Any]:
    """``load_training_config`` without its unknown-key warning (the setup lists them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_training_config(path)


def validate_training_config_quietly(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return validate_training_config(data, source=source)


_FIELDS = {f.name for f in dataclasses.fields(ExperimentConfig)}
