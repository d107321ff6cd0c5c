"""Built-in verifiable task: short word problems in the style of GSM8K, answers checked by math-verify.

A row is {"question": "Ann has 3 apples. She buys 4 more. How many apples does
Ann have now?", "answer": "7"}, generated from templates: a start amount, then
`steps` operations (default one, + or -, numbers up to 9), so a small model can
learn it; `steps`, `max_number` and `ops` ("+-*") make it harder.

The final answer is read from the message (decisions): the last `\\boxed{...}`
if there is one, else what follows the last `####` on its line, else the last
number in the message (the usual lenient GSM8K reading; a message with no
number scores 0). It is compared with the row's answer by `math_verify` (parse
and verify), so `7.0`, `14/2` and `\\frac{14}{2}` all equal 7. The reward is 1
for an equal answer followed by the end-of-turn token (a completion cut off at
the length limit scores 0); `success` equals it.

Safety and cost: math-verify's timeouts use `signal.alarm`, which works only in
the main thread, and the platform calls `step` from worker threads, so both
calls run with the timeout off (`parsing_timeout=None`, `timeout_seconds=None`).
What would need one is refused before sympy sees it: an answer longer than 40
characters, or holding a power, a factorial, a subscript or a LaTeX command
other than \\frac (`9^9^9^9` never terminates). One step takes about a
millisecond after math-verify's first import (about 1 s, on first use).

Rows ship as `envs/data/gsm8k_style.jsonl` (train) and `gsm8k_style_test.jsonl`
(test), written by `write_data`; the test split holds only problems whose
arithmetic (start amount and operations) appears in no training problem.
"""

from __future__ import annotations

import functools
import logging
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from rlhub.envs.base import PARSE_LOCK, StepResult, ended_turn
from rlhub.data import load_split, task_files
from rlhub.envs.countdown import DATA

SHIPPED = {"steps": 1, "max_number": 9, "ops": "+-"}
"""The difficulty the shipped data files were written with."""
SIZES = {"train": 2000, "test": 300}
NAMES = [("Ann", "she", "her"), ("Ben", "he", "him"), ("Cara", "she", "her"), ("Dan", "he", "him"), ("Eva", "she", "her"),
         ("Finn", "he", "him"), ("Gus", "he", "him"), ("Hana", "she", "her"), ("Ivy", "she", "her"), ("Jon", "he", "him")]
ITEMS = ["apples", "pears", "stickers", "marbles", "cards", "books", "pencils", "shells", "coins", "cookies"]
SENTENCES = {
    "+": ["{P} buys {b} more.", "{P} finds {b} more.", "{friend} gives {obj} {b} more."],
    "-": ["{P} gives {b} to {friend}.", "{P} loses {b}.", "{P} sells {b}."],
    "*": ["{P} then has {b} times as many."],
}
_MAX_ANSWER_CHARS = 40
_UNSAFE = re.compile(r"[\\^!_]|\*\*")  # checked after \frac is removed
_NUMBER = re.compile(r"(?<![0-9.])-?[0-9]+(?:\.[0-9]+)?")


def extract_answer(text: str) -> str | None:
    """The final answer's text: the last `\\boxed{...}`, else the rest of the line after the last
    `####`, else the last number; None when there is none (or the box is never closed).

    >>> extract_answer("so \\\\boxed{\\\\frac{14}{2}}."), extract_answer("3+4=7\\n#### 7 apples"), extract_answer("10-3=7")
    ('\\\\frac{14}{2}', '7 apples', '7')
    """
    start = text.rfind("\\boxed{")
    if start >= 0:
        depth, inner = 0, start + len("\\boxed")
        for i in range(inner, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[inner + 1:i].strip()
        return None
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n")[0].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def is_equal(candidate: str | None, answer: str) -> bool:
    """Whether `candidate` (an extracted answer) equals `answer` as mathematics, by math-verify;
    False for an answer too long or too costly to check."""
    if not candidate or len(candidate) > _MAX_ANSWER_CHARS or _UNSAFE.search(re.sub(r"\\[dt]?frac", "", candidate)):
        return False
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    with PARSE_LOCK:  # sympy compiles what it parses (see rlhub.envs.base.PARSE_LOCK)
        gold = _gold(answer)
        parsed = parse(candidate, [LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None)
        return bool(parsed) and verify(gold, parsed, timeout_seconds=None)


@functools.lru_cache(maxsize=4096)
def _gold(answer: str) -> list[Any]:
    from math_verify import ExprExtractionConfig, parse

    # The timeout is off on purpose (see the module docstring); math-verify warns once about it.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return parse(answer, [ExprExtractionConfig()], parsing_timeout=None)


def make_problem(steps: int, max_number: int, ops: str, rng: random.Random) -> tuple[str, int, str] | None:
    """(question, answer, its arithmetic as a key like "3+4-2"): a start amount, then `steps` operations,
    each keeping the amount a positive whole number; None when a drawn one cannot (the caller draws again)."""
    (name, pronoun, obj), item = rng.choice(NAMES), rng.choice(ITEMS)
    friend = rng.choice([n for n, _, _ in NAMES if n != name])
    value = rng.randint(1, max_number)
    sentences, key = [f"{name} has {value} {item}."], str(value)
    while len(sentences) <= steps:
        op = rng.choice(ops)
        if op == "-" and value < 2:
            return None
        b = rng.randint(1, min(max_number, value - 1)) if op == "-" else rng.randint(2 if op == "*" else 1, max_number)
        value = value + b if op == "+" else value - b if op == "-" else value * b
        sentences.append(rng.choice(SENTENCES[op]).format(P=pronoun.capitalize(), b=b, friend=friend, obj=obj))
        key += f"{op}{b}"
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences), value, key


def make_rows(steps: int, max_number: int, ops: str, sizes: Mapping[str, int] = SIZES, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """{"train", "test"} rows of distinct questions; a problem goes to test when the hash of its
    arithmetic says so (a fifth of them). Deterministic in `seed`."""
    rng = random.Random(seed)
    rows: dict[str, list[dict[str, Any]]] = {split: [] for split in sizes}
    seen: set[str] = set()
    for _ in range(50 * sum(sizes.values())):
        problem = make_problem(steps, max_number, ops, rng)
        if problem is None:
            continue
        question, answer, key = problem
        split = "test" if zlib.crc32(key.encode()) % 5 == 0 else "train"
        if question in seen or len(rows[split]) >= sizes[split]:
            continue
        seen.add(question)
        rows[split].append({"question": question, "answer": str(answer)})
        if all(len(rows[s]) >= sizes[s] for s in sizes):
            break
    return rows


def write_data(directory: Path = DATA, steps: int = 1, max_number: int = 9, ops: str = "+-") -> tuple[Path, Path]:
    """Write gsm8k_style.jsonl and gsm8k_style_test.jsonl (the shipped files: `python -m rlhub.envs.gsm8k_style`)."""
    from rlhub.data import write_jsonl

    rows = make_rows(steps, max_number, ops)
    return write_jsonl(rows["train"], directory / "gsm8k_style.jsonl"), write_jsonl(rows["test"], directory / "gsm8k_style_test.jsonl")


@dataclass
class GSM8KStyleEnv:
    steps: int = 1
    """Operations per problem."""
    max_number: int = 9
    """Amounts and operands are drawn from 1..max_number."""
    ops: str = "+-"
    """Operations, from + - *."""
    chat: bool = True
    """Prompts as chat messages (False: raw text ending in `Answer:`)."""
    system_prompt: str | None = "Solve the problem. End with the final answer after ####."
    """The instructions ("" or None for none)."""
    row_fields = ("question", "answer")

    def __post_init__(self) -> None:
        if self.steps < 1 or self.max_number < 2 or not self.ops or set(self.ops) - set("+-*"):
            raise ValueError("env.kwargs: steps must be at least 1, max_number at least 2, ops some of + - *")
        params = {"steps": self.steps, "max_number": self.max_number, "ops": self.ops}
        train, test = task_files("gsm8k_style", params, SHIPPED, lambda d: write_data(d, **params), DATA)
        self._splits = {"train": load_split(train), "test": load_split(test)}
        self._answers = sorted(set(self._splits["train"]["answer"]), key=lambda s: (len(s), s))

    def dataset(self, split: str) -> Sequence[Mapping[str, Any]]:
        if split not in self._splits:
            raise KeyError(f"gsm8k_style has splits {sorted(self._splits)}, not {split!r}")
        return self._splits[split]

    def reset(self, row: Mapping[str, Any]) -> tuple[Any, Any]:
        if not self.chat:
            return "\n".join(filter(None, [self.system_prompt, row["question"], "Answer:"])), str(row["answer"])
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": row["question"]}], str(row["answer"])

    def step(self, state: Any, message: str) -> StepResult:
        """1 for a final answer equal to the row's, followed by the end-of-turn token; 0 otherwise."""
        candidate = extract_answer(message)
        correct = ended_turn(message) and is_equal(candidate, state)
        return StepResult(reward=1.0 if correct else 0.0, done=True, success=correct, info={"answered": candidate is not None})

    def format_examples(self, n: int, rng: random.Random) -> list[tuple[Any, str]]:
        """(prompt, answer) pairs whose answer is `#### N` with N drawn at random from the task's
        answers, not computed: it teaches the shape of an answer, not a solution."""
        rows = self._splits["train"]
        return [(self.reset(rows[rng.randrange(len(rows))])[0], f"#### {rng.choice(self._answers)}") for _ in range(n)]


def load_environment(**kwargs: Any) -> GSM8KStyleEnv:
    """GSM8K-style word problems (one + or - on numbers up to 9 by default), answers checked by math-verify."""
    return GSM8KStyleEnv(**kwargs)


if __name__ == "__main__":
    print(*write_data(), sep="\n")
