"""Built-in verifiable task: small-integer arithmetic, scored by exact answer.

Prompts look like `3+4=` or `max(3,7)=`; the answer is the decimal result,
then end of turn. The reward is 1 for the exact answer ended by the end-of-turn
token and 0 otherwise (a completion cut off at the length limit scores 0), so a
constant output cannot collect reward; `success` equals the exact match.

`format_examples` gives answers of the right shape that ignore the prompt: a
short supervised warm start on them teaches a random-init model to answer with
a number and stop, without teaching any answer, so what the success rate gains
afterwards is learned by RL.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from rlhub.envs.base import StepResult, ended_turn

_OPS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "max": max,
    "min": min,
}


def render(a: int, op: str, b: int) -> str:
    return f"{a}{op}{b}=" if len(op) == 1 else f"{op}({a},{b})="


_INTEGER = re.compile(r"-?\d+")
_WORDS = {"+": "{a} + {b}", "-": "{a} - {b}", "*": "{a} * {b}", "max": "the larger of {a} and {b}", "min": "the smaller of {a} and {b}"}


def question(a: int, op: str, b: int, modulus: int | None) -> str:
    """The task in words, for a chat prompt."""
    task = _WORDS[op].format(a=a, b=b)
    mod = f" modulo {modulus}" if modulus else ""
    return f"What is {task}{mod}? Reply with the number only."


@dataclass
class ArithmeticEnv:
    ops: tuple[str, ...] | list[str] | str = ("max",)
    """Operations, from + - * max min (a string like "+-" names single-character ones)."""
    max_operand: int = 9
    """Operands are drawn from 0..max_operand."""
    modulus: int | None = None
    """When set, answers are taken modulo this (modulus 10 keeps answers one digit)."""
    test_fraction: float = 0.2
    seed: int = 0
    chat: bool = False
    """Ask in words as a chat message ("What is 3 + 4? Reply with the number only.") instead of the raw
    `3+4=`: for pretrained chat models (the model's chat template renders it)."""
    system_prompt: str | None = None
    """chat only: a system message first (None: none, and the template may add its own default)."""
    match: str = "exact"
    """exact: the reply is the number itself; last_number: the last integer in the reply is the answer
    ("3 + 4 = 7"), for chat models that state the sum. Either way the reply must end its turn."""

    def __post_init__(self) -> None:
        self.ops = tuple(self.ops) if not isinstance(self.ops, str) else ((self.ops,) if self.ops in _OPS else tuple(self.ops))
        unknown = [op for op in self.ops if op not in _OPS]
        if unknown or not self.ops:
            raise ValueError(f"env.kwargs.ops: unknown operations {unknown}; use some of {sorted(_OPS)}")
        if self.match not in ("exact", "last_number"):
            raise ValueError(f"env.kwargs.match={self.match!r}: use exact or last_number")
        if self.max_operand < 1:
            raise ValueError("env.kwargs.max_operand must be at least 1")
        rows = [
            {"prompt": render(a, op, b), "question": question(a, op, b, self.modulus), "answer": str(self._answer(a, op, b))}
            for op in self.ops
            for a in range(self.max_operand + 1)
            for b in range(self.max_operand + 1)
        ]
        random.Random(self.seed).shuffle(rows)
        n_test = int(len(rows) * self.test_fraction)
        self._splits = {"test": rows[:n_test], "train": rows[n_test:] if n_test < len(rows) else rows}
        self._answers = sorted({r["answer"] for r in rows}, key=lambda s: (len(s), s))

    def _answer(self, a: int, op: str, b: int) -> int:
        value = _OPS[op](a, b)
        return value % self.modulus if self.modulus else value

    def dataset(self, split: str) -> Sequence[Mapping[str, Any]]:
        if split not in self._splits:
            raise KeyError(f"arithmetic has splits {sorted(self._splits)}, not {split!r}")
        return self._splits[split]

    def reset(self, row: Mapping[str, Any]) -> tuple[Any, Any]:
        if self.chat:
            system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
            return [*system, {"role": "user", "content": row["question"]}], row["answer"]
        return row["prompt"], row["answer"]

    def step(self, state: Any, message: str) -> StepResult:
        """1 for the exact answer followed by the end-of-turn token; a completion cut off at the
        length limit scores 0 even when its text is the answer."""
        if self.match == "last_number":
            numbers = _INTEGER.findall(message)
            correct = ended_turn(message) and bool(numbers) and numbers[-1] == state
        else:
            correct = ended_turn(message) and message.strip() == state
        return StepResult(reward=1.0 if correct else 0.0, done=True, success=correct)

    def format_examples(self, n: int, rng: random.Random) -> list[tuple[str, str]]:
        """(prompt, answer) pairs whose answer is drawn at random from the task's answers, not computed."""
        rows = self._splits["train"]
        return [(rng.choice(rows)["prompt"], rng.choice(self._answers)) for _ in range(n)]


def load_environment(**kwargs: Any) -> ArithmeticEnv:
    return ArithmeticEnv(**kwargs)
