"""Tasks: prompts plus reward functions, as TRL's ``GRPOTrainer`` takes them.

Prompts: the built-in arithmetic task of the tiny checkpoint, or a data set read locally —
a JSONL / JSON / CSV / Parquet file (JSON, CSV and Parquet through ``datasets``), a folder
saved with ``save_to_disk``, or a data set name already in the offline ``datasets`` cache.
Columns: ``prompt`` (TRL: text, or chat messages that go through the tokenizer's chat
template with the generation prompt, as TRL does), ``question`` + ``answer`` (filled into the
training template's ``{question}`` slot), or RL_Practice's single ``text`` field (the question
followed by ``<think>…</think><answer>…</answer>``; the prompt is the text up to and including
``<think>``, or the question filled into the template when one is given).

Rewards follow TRL's reward_funcs convention: ``fn(completions=…, prompts=…, **columns) →
list[float]``, one float per completion, the other columns of each completion's record passed
by name. Built in: ``exact_answer`` (arithmetic), ``tag_pref`` (RL_Practice's: 0.5 for exactly
one ``<answer>…</answer>`` block, + 0.5 when its content verifies against the gold answer with
math-verify) and ``accuracy`` (math-verify on the whole completion). Several are summed with
their weights (TRL's ``reward_weights``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from entropy_lab.errors import ConfigError

# Kept for users' own templates; never applied silently (a question record needs the
# user's training template, --prompt-template).
DEFAULT_TEMPLATE = (
    "The user asks a question and the assistant solves it. The assistant first works the "
    "problem out step by step inside <think> </think> tags, then writes only the final "
    "number inside <answer> </answer> tags.\nUser: {question}\nAssistant: <think>"
)

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass(frozen=True)
class Problem:
    prompt: str  # the text the model continues (after template / chat template)
    answer: str  # the gold answer as text
    # The record's columns, passed to reward functions by name (TRL's reward kwargs).
    columns: dict[str, Any] = field(default_factory=dict, hash=False)


# -- rewards ---------------------------------------------------------------------------------


def gold_answer(answer: Any) -> str:
    """GSM8K writes the worked solution, then ``#### 72``: the gold is what follows ``####``."""
    text = str(answer)
    return text.rsplit("####", 1)[-1].strip() if "####" in text else text.strip()


def _verifies(gold: str, candidate: str) -> bool:
    from math_verify import parse, verify

    # (math-verify's signal-based timeouts need the main thread; tiny inputs need none)
    target = parse(candidate, parsing_timeout=None)
    return bool(target) and verify(parse(gold, parsing_timeout=None), target, timeout_seconds=None)


def exact_answer(completions: Sequence[str], answer: Sequence[Any], **_: Any) -> list[float]:
    """1 iff the completion, stripped, is the answer (the arithmetic task's reward)."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


# RL_Practice's tag_pref weights (rewards/tag_pref.py): the tag alone earns nothing.
TAG_PREF_WEIGHTS = {"tag": 0.0, "answer": 1.0}


def tag_pref(completions: Sequence[str], answer: Sequence[Any], **_: Any) -> list[float]:
    """RL_Practice's ``tag_pref``: W_TAG (0) for exactly one ``<answer>…</answer>`` block, plus
    W_ANS (1) when that block's content verifies against the gold answer (math-verify); 0
    without exactly one block."""
    out = []
    for completion, gold in zip(completions, answer):
        blocks = _ANSWER_BLOCK.findall(completion)
        if len(blocks) != 1:
            out.append(0.0)
            continue
        correct = _verifies(gold_answer(gold), blocks[0].strip())
        out.append(TAG_PREF_WEIGHTS["tag"] + TAG_PREF_WEIGHTS["answer"] * correct)
    return out


def accuracy(completions: Sequence[Any], answer: Sequence[Any], **_: Any) -> list[float]:
    """1 iff math-verify finds the gold answer in the completion."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(_verifies(gold_answer(g), t)) for t, g in zip(texts, answer)]


BUILTIN_REWARDS: dict[str, Callable[..., list[float]]] = {
    "exact_answer": exact_answer,
    "tag_pref": tag_pref,
    "accuracy": accuracy,
}


def _import_reward(spec: str) -> Callable[..., list[float]]:
    """``exact_answer`` (a built-in), ``FILE.py:NAME`` or ``module:NAME``."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ConfigError(
            f"--reward {spec!r}: write FILE.py:NAME, module:NAME or one of "
            + ", ".join(BUILTIN_REWARDS)
        )
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise ConfigError(f"--reward {spec!r}: file {path} not found")
            module_spec = importlib.util.spec_from_file_location(f"_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)  # the user's own reward code, as TRL runs it
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"--reward {spec!r} does not import ({type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:120]})"
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"--reward {spec!r}: {where} has no callable {name!r}")
    if _parameter_names(fn)[:2] == ["prompt_id", "answers"]:
        return rl_practice_reward(fn, module)
    return fn


def _parameter_names(fn: Callable[..., Any]) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def rl_practice_prompt_id(prompt: str) -> int:
    """A stable id per prompt text (RL_Practice keys its gold answers by prompt id)."""
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") >> 1


def rl_practice_reward(fn: Callable[..., Any], module: Any) -> Callable[..., list[float]]:
    """RL_Practice's reward interface, ``reward_fn(prompt_id, answers) -> Tensor[G]`` with the
    gold answers in its ``PROMPT2GOLD`` map (its scheduler fills it; here, before each call),
    as a TRL-style reward: its code is run as the trainer runs it, one group at a time."""

    def reward(completions: Sequence[str], prompts: Sequence[str], answer, **_: Any):
        groups: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(str(prompt), []).append(i)
        out = [0.0] * len(completions)
        registries = _gold_registries(module)  # once per call, not per group
        for prompt, rows in groups.items():
            pid = rl_practice_prompt_id(prompt)
            for registry in registries:
                registry[pid] = str(answer[rows[0]])
            values = fn(pid, [completions[i] for i in rows])
            values = values.tolist() if hasattr(values, "tolist") else list(values)
            for i, value in zip(rows, values):
                out[i] = float(value)
        return out

    return reward


def _gold_registries(module: Any) -> list[dict]:
    """RL_Practice's prompt → gold maps: the reward module's own and its tag_pref's."""
    import sys

    found = [module] + [
        m for name, m in list(sys.modules.items()) if name.endswith("rewards.tag_pref")
    ]
    return [m.PROMPT2GOLD for m in found if isinstance(getattr(m, "PROMPT2GOLD", None), dict)]


@dataclass
class RewardFunctions:
    """TRL-style reward functions and their weights; called on a whole batch at once."""

    names: list[str]
    functions: list[Callable[..., list[float]]]
    weights: list[float]

    def __call__(self, completions: list[str], problems: list[Problem]) -> list[float]:
        columns: dict[str, list[Any]] = {}
        for key in sorted({k for p in problems for k in p.columns}):
            columns[key] = [p.columns.get(key) for p in problems]
        columns.setdefault("answer", [p.answer for p in problems])
        prompts = [p.columns.get("prompt", p.prompt) for p in problems]
        totals = [0.0] * len(completions)
        for name, fn, weight in zip(self.names, self.functions, self.weights):
            try:
                values = fn(completions=completions, prompts=prompts, **columns)
            except Exception as exc:
                raise ConfigError(
                    f"reward {name!r} raised {type(exc).__name__}: "
                    f"{(str(exc).splitlines() or [''])[0][:120]}"
                ) from None
            values = list(values) if values is not None else []
            if len(values) != len(completions):
                raise ConfigError(
                    f"reward {name!r} returned {len(values)} values for {len(completions)} "
                    "completions: return one float per completion"
                )
            for i, value in enumerate(values):
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ConfigError(
                        f"reward {name!r} returned {value!r} for completion {i}: every reward "
                        "must be a finite number"
                    )
                totals[i] += weight * float(value)
        return totals


def load_rewards(spec: str, weights: str | Sequence[float] | None = None) -> RewardFunctions:
    """``a,b`` reward specs with optional weights ``1,0.5`` (default: each 1, as TRL)."""
    names = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not names:
        raise ConfigError("--reward: give at least one reward function")
    if weights is None or weights == "":
        values = [1.0] * len(names)
    else:
        items = weights.split(",") if isinstance(weights, str) else list(weights)
        try:
            values = [float(w) for w in items]
        except ValueError:
            raise ConfigError(f"--reward-weights {weights!r}: comma-separated numbers") from None
        if len(values) != len(names) or not all(math.isfinite(v) for v in values):
            raise ConfigError(
                f"--reward-weights {weights!r}: one finite weight per reward ({len(names)})"
            )
    functions = [_import_reward(n) for n in names]
    for name, fn in zip(names, functions):
        _check_signature(name, fn)
    return RewardFunctions(names, functions, values)


def _check_signature(name: str, fn: Callable[..., Any]) -> None:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    keyword = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
    if "completions" not in parameters and not keyword:
        raise ConfigError(
            f"reward {name!r} takes no 'completions' argument: write it as TRL's reward "
            "functions, fn(completions, prompts, **columns) -> list[float]"
        )


# -- prompts ---------------------------------------------------------------------------------


class Task:
    """A fixed, ordered list of problems and the reward functions for completions of them."""

    name: str = "task"

    def __init__(self, problems: list[Problem], rewards: RewardFunctions | None = None) -> None:
        self.problems = problems
        self.reward_functions = rewards

    def rewards(self, completions: list[str], problems: list[Problem]) -> list[float]:
        if self.reward_functions is None:
            raise ConfigError("no reward function: pass --reward")
        return self.reward_functions(completions, problems)

    def reward(self, response: str, problem: Problem) -> float:
        return self.rewards([response], [problem])[0]

    def split(self, eval_size: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
        """Disjoint evaluation prompts and update-prompt pool (U and E never share a prompt)."""
        order = list(range(len(self.problems)))
        random.Random(seed).shuffle(order)
        eval_problems = [self.problems[i] for i in order[:eval_size]]
        update_pool = [self.problems[i] for i in order[eval_size:]]
        return eval_problems, update_pool


class ArithmeticTask(Task):
    """``a+b=`` with operands below ``max_operand`` (the tiny checkpoint's task)."""

    name = "arithmetic"

    def __init__(self, max_operand: int = 30, rewards: RewardFunctions | None = None) -> None:
        problems = [
            Problem(prompt=f"{a}+{b}=", answer=str(a + b))
            for a in range(max_operand)
            for b in range(max_operand)
        ]
        super().__init__(
            problems, rewards or RewardFunctions(["exact_answer"], [exact_answer], [1.0])
        )


# Named prompt wrappers of the trainers' data sets, as their code builds the prompt.
# "r1": RL_Practice's gsm8k_r1_template (rlp_datasets/gsm8k_r1_template.py).
NAMED_TEMPLATES = {
    "r1": (
        "You are solving math problems. Respond by reasoning through the problem then "
        "providing a final answer. Enclose the reasoning process within <think> </think> and "
        "the answer within <answer> </answer> tags, i.e., <think> reasoning process here "
        "</think> <answer> answer here </answer>.\nQuestion: {question}\nResponse: <think>"
    ),
}


def read_template(template: str | None) -> str | None:
    """A template file (``--prompt-template FILE``), a template's own text, or a named
    wrapper (``r1``: RL_Practice's gsm8k_r1_template)."""
    if template is None:
        return None
    if template in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[template]
    path = Path(template)
    if "{question}" not in template and path.is_file():
        template = path.read_text(encoding="utf-8")
    elif "{question}" not in template and len(template) < 300 and path.suffix:
        raise ConfigError(f"--prompt-template: file not found: {path}")
    if "{question}" not in template:
        raise ConfigError("prompt_template must contain the placeholder {question}")
    try:  # filled with str.format: other braces must be doubled ({{ }})
        template.format(question="")
    except (IndexError, KeyError, ValueError) as exc:
        raise ConfigError(
            f"prompt_template cannot be filled with str.format ({type(exc).__name__}: {exc}):"
            " write literal braces as {{ and }}"
        ) from None
    return template


class PromptTask(Task):
    """Records of a local data set (see the module docstring for the columns)."""

    name = "prompts"

    def __init__(
        self,
        records: list[dict[str, Any]],
        source: str,
        template: str | None = None,
        tokenizer=None,
        rewards: RewardFunctions | None = None,
    ) -> None:
        template = read_template(template)
        problems = [
            _problem(record, f"{source}:{i + 1}", template, tokenizer)
            for i, record in enumerate(records)
        ]
        if not problems:
            raise ConfigError(f"prompt file {source} holds no records")
        super().__init__(problems, rewards)


JsonlTask = PromptTask  # the earlier name


def _problem(record: Any, where: str, template: str | None, tokenizer) -> Problem:
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: each record must be a JSON object")
    if "prompt" in record:
        prompt = record["prompt"]
        answer = record.get("answer", record.get("solution", ""))
        columns = {k: v for k, v in record.items() if k != "prompt"}
        if isinstance(prompt, list):  # chat messages: the tokenizer's chat template, as TRL
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ConfigError(
                    f"{where}: a chat-format prompt needs a tokenizer with a chat template"
                )
            columns["prompt"] = prompt
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            return Problem(prompt=text, answer=gold_answer(answer), columns=columns)
        return Problem(prompt=str(prompt), answer=gold_answer(answer), columns=columns)
    if "question" in record and "answer" in record:
        if template is None:
            raise ConfigError(
                f"{where}: a question record needs the training prompt's template: pass "
                "--prompt-template FILE (with a {question} slot), or give a 'prompt' column"
            )
        question = str(record["question"]).strip()
        columns = {k: v for k, v in record.items()}
        return Problem(
            prompt=template.format(question=question),
            answer=gold_answer(record["answer"]),
            columns=columns,
        )
    if "text" in record:
        text = str(record["text"])
        blocks = _ANSWER_BLOCK.findall(text)
        if len(blocks) != 1 or "<think>" not in text:
            raise ConfigError(
                f"{where}: a 'text' record must hold the question, then <think>…</think>"
                "<answer>…</answer> with exactly one answer block"
            )
        head = text.split("<think>", 1)[0]
        prompt = template.format(question=head.strip()) if template else head + "<think>"
        return Problem(
            prompt=prompt, answer=blocks[0].strip(), columns={"text": text, "answer": blocks[0]}
        )
    raise ConfigError(
        f"{where}: record needs a 'prompt' column, 'question' and 'answer' fields, or a 'text' field"
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read prompt file {path} as UTF-8 text ({type(exc).__name__}): "
            "give a JSONL file with one JSON object per line"
        ) from exc
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{path}:{lineno}: not valid JSON") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{lineno}: each line must be a JSON object")
        records.append(record)
    return records


_DATASET_KINDS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _read_dataset(spec: str, split: str | None) -> list[dict[str, Any]]:
    """JSON / CSV / Parquet files, ``save_to_disk`` folders and offline-cached data set names,
    through ``datasets`` (never downloading)."""
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    path = Path(spec)
    try:
        if path.is_file():
            kind = _DATASET_KINDS.get(path.suffix.lower())
            if kind is None:
                raise ConfigError(
                    f"prompt file {path}: unknown format (use .jsonl, .json, .csv or .parquet)"
                )
            data = datasets.load_dataset(kind, data_files=str(path), split="train")
        elif path.is_dir():
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                data = data[split or "train"]
        else:
            import huggingface_hub.constants as hub

            saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
            datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True  # the cache only
            try:
                data = datasets.load_dataset(spec, split=split or "train")
            finally:
                datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"the data set {spec!r}{f' (split {split})' if split else ''} cannot be loaded "
            f"offline ({type(exc).__name__}): pass --prompts FILE with its records "
            "(JSONL/JSON/CSV/Parquet)"
        ) from None
    return [dict(row) for row in data]


def load_task(
    spec: str,
    template: str | None = None,
    *,
    tokenizer=None,
    rewards: RewardFunctions | None = None,
    split: str | None = None,
) -> Task:
    """``arithmetic`` (optionally ``arithmetic:N`` for operands below N), a prompt file or
    folder, or an offline-cached data set name."""
    if spec == "arithmetic" or spec.startswith("arithmetic:"):
        _, _, bound = spec.partition(":")
        try:
            max_operand = int(bound) if bound else 30
        except ValueError:
            max_operand = 0
        if max_operand < 1:
            raise ConfigError(
                f"task {spec!r}: write arithmetic or arithmetic:N with an integer N >= 1"
            )
        return ArithmeticTask(max_operand, rewards)
    path = Path(spec)
    looks_like_file = path.suffix.lower() in (".jsonl", *_DATASET_KINDS)
    if looks_like_file and not path.exists():
        raise ConfigError(f"prompt file not found: {path} (--prompts)")
    if path.suffix.lower() == ".jsonl":
        records = _read_jsonl(path)
    else:
        records = _read_dataset(spec, split)
    return PromptTask(records, str(path), template, tokenizer, rewards)
