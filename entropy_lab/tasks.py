"""Tasks: prompts plus a reward function.

Two kinds are built in: the tiny arithmetic task the built-in checkpoint is trained on, and
GSM8K-style JSONL files (``question``/``answer`` records, or a single ``text`` field holding
the question followed by ``<think>…</think><answer>…</answer>``).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from entropy_lab.errors import ConfigError

# R1-style default: the user's own training template should be passed instead when known,
# because the prompt must reproduce the training prompt exactly.
DEFAULT_TEMPLATE = (
    "The user asks a question and the assistant solves it. The assistant first works the "
    "problem out step by step inside <think> </think> tags, then writes only the final "
    "number inside <answer> </answer> tags.\nUser: {question}\nAssistant: <think>"
)

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str  # the gold answer as text (a number for both built-in tasks)


class Task:
    """A fixed, ordered list of problems and a reward for a response to one of them."""

    name: str = "task"

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems

    def reward(self, response: str, problem: Problem) -> float:
        raise NotImplementedError

    def split(self, eval_size: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
        """Disjoint evaluation prompts and update-prompt pool (U and E never share a prompt)."""
        order = list(range(len(self.problems)))
        random.Random(seed).shuffle(order)
        eval_problems = [self.problems[i] for i in order[:eval_size]]
        update_pool = [self.problems[i] for i in order[eval_size:]]
        return eval_problems, update_pool


class ArithmeticTask(Task):
    """``a+b=`` with operands below ``max_operand``; exact-answer reward."""

    name = "arithmetic"

    def __init__(self, max_operand: int = 30) -> None:
        problems = [
            Problem(prompt=f"{a}+{b}=", answer=str(a + b))
            for a in range(max_operand)
            for b in range(max_operand)
        ]
        super().__init__(problems)

    def reward(self, response: str, problem: Problem) -> float:
        return float(response.strip() == problem.answer)


def _parse_number(text: str) -> float | None:
    match = _NUMBER.search(text)
    if match is None:
        return None
    try:
        return float(match.group(0).replace(",", ""))
    except ValueError:
        return None


def answer_tag_reward(response: str, gold: str) -> float:
    """1 iff the response has exactly one <answer> block whose number equals the gold number."""
    blocks = _ANSWER_BLOCK.findall(response)
    if len(blocks) != 1:
        return 0.0
    got, want = _parse_number(blocks[0]), _parse_number(gold)
    return float(got is not None and want is not None and abs(got - want) < 1e-9)


class JsonlTask(Task):
    """GSM8K-style JSONL: ``{"question", "answer"}`` or ``{"text"}`` records."""

    name = "jsonl"

    def __init__(self, path: str | Path, template: str | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"prompt file not found: {path}")
        template = template or DEFAULT_TEMPLATE
        if "{question}" not in template:
            raise ConfigError("prompt_template must contain the placeholder {question}")
        try:  # filled with str.format: other braces must be doubled ({{ }})
            template.format(question="")
        except (IndexError, KeyError, ValueError) as exc:
            raise ConfigError(
                f"prompt_template cannot be filled with str.format ({type(exc).__name__}: {exc}):"
                " write literal braces as {{ and }}"
            ) from None
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"cannot read prompt file {path} as UTF-8 text ({type(exc).__name__}): "
                "give a JSONL file with one JSON object per line"
            ) from exc
        problems = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"{path}:{lineno}: not valid JSON") from None
            question, answer = _question_and_answer(record, f"{path}:{lineno}")
            problems.append(Problem(prompt=template.format(question=question), answer=answer))
        if not problems:
            raise ConfigError(f"prompt file {path} holds no records")
        super().__init__(problems)

    def reward(self, response: str, problem: Problem) -> float:
        # The template opens <think>; the response is scored as written after it.
        return answer_tag_reward(response, problem.answer)


def _question_and_answer(record: object, where: str) -> tuple[str, str]:
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: each line must be a JSON object")
    if "question" in record and "answer" in record:
        answer = str(record["answer"])
        # GSM8K writes the worked solution, then "#### 72".
        gold = answer.rsplit("####", 1)[-1].strip() if "####" in answer else answer.strip()
        return str(record["question"]).strip(), gold
    if "text" in record:
        text = str(record["text"])
        blocks = _ANSWER_BLOCK.findall(text)
        if len(blocks) != 1 or "<think>" not in text:
            raise ConfigError(
                f"{where}: a 'text' record must hold the question, then <think>…</think>"
                "<answer>…</answer> with exactly one answer block"
            )
        return text.split("<think>", 1)[0].strip(), blocks[0].strip()
    raise ConfigError(f"{where}: record needs 'question' and 'answer' fields, or a 'text' field")


def load_task(spec: str, template: str | None = None) -> Task:
    """``arithmetic`` (optionally ``arithmetic:N`` for operands below N) or a JSONL path."""
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
        return ArithmeticTask(max_operand)
    return JsonlTask(spec, template)
