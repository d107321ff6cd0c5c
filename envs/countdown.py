"""Built-in verifiable task: Countdown, reach a target from given numbers with + - * /.

A row is {"numbers": [3, 5, 7], "target": 22}; the prompt shows both and the
model answers with an arithmetic expression such as `3*5+7`, then end of turn.

The rule (a decision, said in the system prompt): each given number may be used
at most once and not all need be used, as in the television game; at least one
must be. `use_all=True` asks for the stricter rule of the RL literature
(TinyZero): every number exactly once. A target never equals one of the numbers,
so copying a number never scores.

Scoring is safe: the message's last non-empty line is parsed with `ast` and only
integer literals, + - * / and parentheses are evaluated (no names, calls,
attributes, unary minus or `**`), in exact fractions, so `7/2*4` is 14 and a
division by zero is a wrong answer. The reward is 1 for an expression whose
value is the target and which ended its turn (a completion cut off at the length
limit scores 0); `success` equals it. A well-formed expression that follows the
rule but misses the target earns `format_reward` (0.1, as in TinyZero's
countdown; 0 turns it off), so that using the given numbers is learned before
reaching the target.

Rows ship as `envs/data/countdown.jsonl` (train) and `countdown_test.jsonl`
(test), written by `write_data`: each row's target is the value of a random
expression over its numbers, so every row is solvable. Train and test share no
puzzle (the same numbers, in any order, with the same target). Other difficulty
settings (`num_numbers`, `max_number`, `use_all`) write their files once under
`RLHUB_CACHE/envs/`.
"""

from __future__ import annotations

import ast
import random
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping, Sequence

from rlhub.data import load_split, task_files
from rlhub.envs.base import PARSE_LOCK, StepResult, ended_turn

DATA = Path(__file__).parent / "data"
SHIPPED = {"num_numbers": 3, "max_number": 9, "use_all": False}
"""The difficulty the shipped data files were written with."""
SIZES = {"train": 3000, "test": 300}
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_EXPRESSION_CHARS = re.compile(r"[0-9+\-*/() ]+")  # no `_` in literals (1_0), no names, no `.`
_MAX_CHARS = 200


def evaluate(text: str, numbers: Sequence[int], use_all: bool = False) -> Fraction | None:
    """The value of `text` as a Countdown answer over `numbers`, or None when it is not one.

    >>> evaluate("3*5+7", [3, 5, 7]), evaluate("7/2*4", [2, 4, 7])
    (Fraction(22, 1), Fraction(14, 1))
    >>> evaluate("3+3", [3, 5]), evaluate("5/(3-3)", [3, 3, 5]), evaluate("__import__('os')", [1])
    (None, None, None)
    """
    text = text.strip()
    if not text or len(text) > _MAX_CHARS or not _EXPRESSION_CHARS.fullmatch(text):
        return None
    try:
        with PARSE_LOCK:
            tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    used: list[int] = []
    value = _value(tree, used)
    if value is None:
        return None
    unused = Counter(numbers)
    unused.subtract(used)
    if any(n < 0 for n in unused.values()) or (use_all and any(unused.values())):
        return None
    return value


def _value(node: ast.AST, used: list[int]) -> Fraction | None:
    """Exact value of a whitelisted node, recording the literals it uses; None for anything else."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if not (isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS):
        return None
    left, right = _value(node.left, used), _value(node.right, used)
    if left is None or right is None:
        return None
    op = _AST_OPS[type(node.op)]
    if op == "/":
        return left / right if right else None
    return left + right if op == "+" else left - right if op == "-" else left * right


def random_expression(numbers: Sequence[int], rng: random.Random) -> tuple[str, Fraction] | None:
    """A random expression using each of `numbers` once, with its value; None when the draw
    went non-positive or divided unevenly (the caller draws again)."""
    items = [(str(n), Fraction(n), 3) for n in numbers]  # (text, value, precedence of its top operator)
    rng.shuffle(items)
    while len(items) > 1:
        (a, x, pa), (b, y, pb) = items.pop(rng.randrange(len(items))), items.pop(rng.randrange(len(items)))
        op = rng.choice("+-*/")
        if (op == "-" and x <= y) or (op == "/" and (y == 0 or x % y)):
            return None
        p = _PRECEDENCE[op]
        a = f"({a})" if pa < p else a
        b = f"({b})" if pb < p or (pb == p and op in "-/") else b
        value = x + y if op == "+" else x - y if op == "-" else x * y if op == "*" else x / y
        items.append((f"{a}{op}{b}", value, p))
    return items[0][0], items[0][1]


def make_rows(num_numbers: int, max_number: int, use_all: bool, sizes: Mapping[str, int] = SIZES, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """{"train", "test"} rows, each target the value of a random expression over its numbers (all of
    them under `use_all`, else two or more). A puzzle goes to test when the hash of its sorted numbers
    and target says so (a fifth of them), so the splits share none. Deterministic in `seed`."""
    rng = random.Random(seed)
    rows: dict[str, list[dict[str, Any]]] = {split: [] for split in sizes}
    seen: set[tuple[tuple[int, ...], int]] = set()
    for _ in range(50 * sum(sizes.values())):
        numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
        k = num_numbers if use_all else rng.randint(min(2, num_numbers), num_numbers)
        drawn = random_expression(rng.sample(numbers, k), rng)
        if drawn is None or drawn[1].denominator != 1 or drawn[1] in numbers:
            continue
        target = int(drawn[1])
        puzzle = f"{sorted(numbers)}={target}".encode()
        split = "test" if zlib.crc32(puzzle) % 5 == 0 else "train"
        if (tuple(numbers), target) in seen or len(rows[split]) >= sizes[split]:
            continue
        seen.add((tuple(numbers), target))
        rows[split].append({"numbers": numbers, "target": target})
        if all(len(rows[s]) >= sizes[s] for s in sizes):
            break
    return rows


def write_data(directory: Path = DATA, num_numbers: int = 3, max_number: int = 9, use_all: bool = False) -> tuple[Path, Path]:
    """Write countdown.jsonl and countdown_test.jsonl (the shipped files: `python -m rlhub.envs.countdown`)."""
    from rlhub.data import write_jsonl

    rows = make_rows(num_numbers, max_number, use_all)
    return write_jsonl(rows["train"], directory / "countdown.jsonl"), write_jsonl(rows["test"], directory / "countdown_test.jsonl")


@dataclass
class CountdownEnv:
    num_numbers: int = 3
    """Numbers per puzzle."""
    max_number: int = 9
    """Numbers are drawn from 1..max_number."""
    use_all: bool = False
    """Every number exactly once (False: each at most once)."""
    chat: bool = True
    """Prompts as chat messages (False: raw text ending in `Expression:`)."""
    system_prompt: str | None = None
    """The instructions; None: a sentence stating the rule ("" for none)."""
    format_reward: float = 0.1
    """Reward for a well-formed expression under the rule that misses the target (0 turns it off)."""
    row_fields = ("numbers", "target")

    def __post_init__(self) -> None:
        if self.num_numbers < 1 or self.max_number < 1:
            raise ValueError("env.kwargs.num_numbers and env.kwargs.max_number must be at least 1")
        if self.system_prompt is None:
            rule = "each exactly once" if self.use_all else "each at most once"
            self.system_prompt = f"Make the target from the numbers, {rule}, with + - * / and parentheses. Answer with the expression only."
        params = {"num_numbers": self.num_numbers, "max_number": self.max_number, "use_all": self.use_all}
        train, test = task_files("countdown", params, SHIPPED, lambda d: write_data(d, **params), DATA)
        self._splits = {"train": load_split(train), "test": load_split(test)}

    def dataset(self, split: str) -> Sequence[Mapping[str, Any]]:
        if split not in self._splits:
            raise KeyError(f"countdown has splits {sorted(self._splits)}, not {split!r}")
        return self._splits[split]

    def reset(self, row: Mapping[str, Any]) -> tuple[Any, Any]:
        numbers, target = [int(n) for n in row["numbers"]], int(row["target"])
        question = f"Numbers: {' '.join(map(str, numbers))}\nTarget: {target}"
        if not self.chat:
            return "\n".join(filter(None, [self.system_prompt, question, "Expression:"])), (numbers, target)
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": question}], (numbers, target)

    def step(self, state: Any, message: str) -> StepResult:
        """1 for an expression on the message's last non-empty line that reaches the target under the
        rule, followed by the end-of-turn token; `format_reward` for a valid expression under the rule
        that misses the target; 0 otherwise."""
        numbers, target = state
        lines = [line for line in message.splitlines() if line.strip()]
        value = evaluate(lines[-1], numbers, self.use_all) if lines else None
        ended = ended_turn(message)
        correct = ended and value == target
        reward = 1.0 if correct else self.format_reward if ended and value is not None else 0.0
        return StepResult(reward=reward, done=True, success=correct, info={"valid": value is not None})

    def format_examples(self, n: int, rng: random.Random) -> list[tuple[Any, str]]:
        """(prompt, answer) pairs whose answer is a random expression over random numbers, not the
        prompt's: it teaches the shape of an answer, not a solution."""
        rows = self._splits["train"]
        examples = []
        while len(examples) < n:
            numbers = [rng.randint(1, self.max_number) for _ in range(rng.randint(min(2, self.num_numbers), self.num_numbers))]
            drawn = random_expression(numbers, rng)
            if drawn is not None:
                examples.append((self.reset(rows[rng.randrange(len(rows))])[0], drawn[0]))
        return examples


def load_environment(**kwargs: Any) -> CountdownEnv:
    """Countdown: reach a target from a few small numbers with + - * / (each number at most once)."""
    return CountdownEnv(**kwargs)


if __name__ == "__main__":
    print(*write_data(), sep="\n")
