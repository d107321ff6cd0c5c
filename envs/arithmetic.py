"""Built-in verifiable task: small-integer arithmetic, scored by exact answer.

Prompts look like `3+4=`; the answer is the decimal result, then end of turn.
The reward is 1 for the exact answer and 0 otherwise, so a constant output
cannot collect reward; `success` equals the exact match.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from rlhub.envs.base import StepResult

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass
class ArithmeticEnv:
    max_operand: int = 9
    """Operands are drawn from 0..max_operand."""
    ops: str = "+"
    """Operators to use, from + - *."""
    modulus: int | None = None
    """When set, answers are taken modulo this (keeps answers one digit for modulus 10)."""
    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.ops) - set(_OPS)
        if unknown:
            raise ValueError(f"env.kwargs.ops: unknown operators {sorted(unknown)}; use some of {sorted(_OPS)}")
        if self.max_operand < 1:
            raise ValueError("env.kwargs.max_operand must be at least 1")
        rows = [
            {"prompt": f"{a}{op}{b}=", "answer": str(self._answer(a, op, b))}
            for op in self.ops
            for a in range(self.max_operand + 1)
            for b in range(self.max_operand + 1)
        ]
        random.Random(self.seed).shuffle(rows)
        n_test = int(len(rows) * self.test_fraction)
        self._splits = {"test": rows[:n_test], "train": rows[n_test:] if n_test < len(rows) else rows}

    def _answer(self, a: int, op: str, b: int) -> int:
        value = _OPS[op](a, b)
        return value % self.modulus if self.modulus else value

    def dataset(self, split: str) -> Sequence[Mapping[str, Any]]:
        if split not in self._splits:
            raise KeyError(f"arithmetic has splits {sorted(self._splits)}, not {split!r}")
        return self._splits[split]

    def reset(self, row: Mapping[str, Any]) -> tuple[str, Any]:
        return row["prompt"], row["answer"]

    def step(self, state: Any, message: str) -> StepResult:
        correct = message.strip() == state
        return StepResult(reward=1.0 if correct else 0.0, done=True, success=correct)


def load_environment(**kwargs: Any) -> ArithmeticEnv:
    return ArithmeticEnv(**kwargs)
