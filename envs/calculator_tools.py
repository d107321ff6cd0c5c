"""Built-in multi-turn task: arithmetic with a calculator tool, scored by the final answer.

The user asks `What is 13*17?`. The model may call the calculator by making its
whole message one JSON object with one key:

    {"calc": "13*17"}

The environment evaluates the expression safely (numbers, + - * / and
parentheses, parsed with `ast` and walked by hand; nothing is ever run) and
answers with a tool message holding the value (`221`), or `error: ...` for a
malformed call; the episode goes on with reward 0 so far. A message that does
not start with `{` is the final answer: reward 1 and success when it is the
row's integer answer exactly (after stripping) and the model ended its turn,
else 0; the episode ends. At most `max_tool_calls` calls (well-formed or not)
per episode; one more ends the episode with 0.

Rows are {"question", "expression", "answer"} from `envs/data/calculator_tools.jsonl`
and `calculator_tools_test.jsonl`, written by `write_data` (run this module to
rewrite them). Other numbers: write files with `write_data(directory, low=.., high=..)`
and point `env.dataset.path` at them.

`format_examples` gives the two turn shapes with random values that ignore the
prompt: a first turn that is a call with another row's expression, and a final
turn (after a transcript of such a call and its result) that is another row's
answer. A warm start on the first shape alone would leave the model calling the
tool on every turn, so the final answer would never be sampled.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import random
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from rlhub.envs.base import PARSE_LOCK, StepResult, ended_turn

DATA = Path(__file__).parent / "data"
NAME = "calculator_tools"
MAX_EXPRESSION = 200
"""Longest expression evaluated, in characters (keeps parsing and the numbers small)."""
INSTRUCTIONS = ('Calculator: reply with only {"calc": "<expression>"} (numbers, + - * / and parentheses) '
                "and its result comes back. Reply with the final answer alone, an integer.")
CALL_SHAPE = 'a tool call is one JSON object: {"calc": "<expression>"}'

_BINARY: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
}
_UNARY: dict[type, Callable[[Fraction], Fraction]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_PYTHON_OPS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}


class CalcError(ValueError):
    """A tool call the calculator refuses; its text is what the model is told."""


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression; CalcError for anything but numbers, + - * / and
    parentheses (refused while walking the syntax tree, never evaluated).

    >>> evaluate("13*17"), evaluate("-(1+2)/4")
    (Fraction(221, 1), Fraction(-3, 4))
    >>> evaluate("__import__('os')")
    Traceback (most recent call last):
    rlhub.envs.calculator_tools.CalcError: Call is not allowed: use numbers, + - * / and parentheses
    """
    if len(expression) > MAX_EXPRESSION:
        raise CalcError(f"expression longer than {MAX_EXPRESSION} characters")
    try:
        with PARSE_LOCK:
            tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalcError("not an arithmetic expression") from None
    return _value(tree.body)


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if not math.isfinite(node.value):
            raise CalcError("numbers must be finite")
        return Fraction(repr(node.value))  # 0.1 is one tenth, not its binary neighbour
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise CalcError("division by zero")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    raise CalcError(f"{type(node).__name__} is not allowed: use numbers, + - * / and parentheses")


def render(value: Fraction) -> str:
    """An integer as itself, anything else to six significant digits."""
    return str(value.numerator) if value.denominator == 1 else f"{float(value):.6g}"


def parse_call(message: str) -> str:
    """The expression of a tool call `{"calc": "<expression>"}`; CalcError for any other shape."""
    try:
        call = json.loads(message)
    except json.JSONDecodeError:
        raise CalcError(CALL_SHAPE) from None
    if not isinstance(call, dict) or set(call) != {"calc"} or not isinstance(call["calc"], str):
        raise CalcError(CALL_SHAPE)
    return call["calc"]


def calculator(message: str) -> str:
    """What the tool answers to a call message: the value, or `error: <why>`."""
    try:
        return render(evaluate(parse_call(message)))
    except CalcError as e:
        return f"error: {e}"


def write_data(directory: Path = DATA, low: int = 2, high: int = 20, ops: str = "*", limit: int = 3000,
               test_fraction: float = 0.2, seed: int = 0) -> tuple[Path, Path]:
    """The task's train and test files: every `a op b` with operands in low..high (at most `limit`
    of them, shuffled with `seed`), answers computed with Python's integers."""
    from rlhub.data import write_jsonl

    unknown = set(ops) - set(_PYTHON_OPS)
    if unknown:
        raise ValueError(f"ops: unknown operations {sorted(unknown)}; use some of {sorted(_PYTHON_OPS)}")
    rows = [{"question": f"What is {a}{op}{b}?", "expression": f"{a}{op}{b}", "answer": str(_PYTHON_OPS[op](a, b))}
            for op in ops for a in range(low, high + 1) for b in range(low, high + 1)]
    random.Random(seed).shuffle(rows)
    rows = rows[:limit]
    n_test = max(1, int(len(rows) * test_fraction))
    directory = Path(directory)
    return write_jsonl(rows[n_test:], directory / f"{NAME}.jsonl"), write_jsonl(rows[:n_test], directory / f"{NAME}_test.jsonl")


class CalculatorToolsEnv:
    """Questions answered with the help of a calculator tool (see the module docstring)."""

    row_fields = ("question", "answer")

    def __init__(self, max_tool_calls: int = 2, chat: bool = True, system_prompt: str | None = None) -> None:
        from rlhub.data import DatasetConfig, load_rows

        if max_tool_calls < 0:
            raise ValueError(f"env.kwargs.max_tool_calls={max_tool_calls} must be at least 0")
        self.max_tool_calls, self.chat = max_tool_calls, chat
        self.system_prompt = INSTRUCTIONS if system_prompt is None else system_prompt
        self._splits = {split: load_rows(DatasetConfig(path=str(DATA / f"{NAME}{suffix}.jsonl")), self.row_fields)["train"]
                        for split, suffix in (("train", ""), ("test", "_test"))}

    def dataset(self, split: str) -> Sequence[Mapping[str, Any]]:
        if split not in self._splits:
            raise KeyError(f"{NAME} has splits {sorted(self._splits)}, not {split!r}")
        return self._splits[split]

    def reset(self, row: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        state = {"answer": str(row["answer"]).strip(), "calls": 0}
        if self.chat:
            system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            return [*system, {"role": "user", "content": row["question"]}], state
        return "".join(f"{line}\n" for line in (self.system_prompt, row["question"]) if line), state

    def step(self, state: dict[str, Any], message: str) -> StepResult:
        """A tool call gets the calculator's answer (reward 0, not done); anything else is the final answer."""
        text = message.strip()
        if not text.startswith("{"):
            correct = ended_turn(message) and text == state["answer"]
            return StepResult(1.0 if correct else 0.0, done=True, success=correct)
        if state["calls"] >= self.max_tool_calls:
            return StepResult(0.0, done=True, success=False, info={"ended": "max_tool_calls"})
        state["calls"] += 1
        return StepResult(0.0, done=False, observation=self._tool_message(calculator(text)))

    def _tool_message(self, result: str) -> Any:
        return [{"role": "tool", "content": result}] if self.chat else f"\nresult: {result}\n"

    def format_examples(self, n: int, rng: random.Random) -> list[tuple[Any, str]]:
        """(prompt, answer) pairs of the right shape whose values ignore the prompt: half first turns
        (a call with another row's expression), half final turns after a transcript of such a call
        (another row's answer). Never the prompt's own expression or answer."""
        rows = self._splits["train"]
        pairs = []
        for _ in range(n):
            row = rows[rng.randrange(len(rows))]
            prompt, _ = self.reset(row)
            expression = _other(rows, "expression", row, rng)
            call = json.dumps({"calc": expression})
            if rng.random() < 0.5:
                pairs.append((prompt, call))
                continue
            result = calculator(call)
            if self.chat:
                transcript = [*prompt, {"role": "assistant", "content": call}, *self._tool_message(result)]
            else:
                transcript = prompt + call + self._tool_message(result)
            pairs.append((transcript, _other(rows, "answer", row, rng)))
        return pairs


def _other(rows: Sequence[Mapping[str, Any]], key: str, row: Mapping[str, Any], rng: random.Random) -> str:
    """`key` of a random row whose value differs from `row`'s."""
    for _ in range(100):
        value = rows[rng.randrange(len(rows))][key]
        if value != row[key]:
            return value
    raise ValueError(f"{NAME}: the training rows have too few distinct {key}s for format examples")


def load_environment(max_tool_calls: int = 2, chat: bool = True, system_prompt: str | None = None) -> CalculatorToolsEnv:
    """Arithmetic questions answered with a JSON calculator tool call ({"calc": "13*17"}), multi-turn."""
    return CalculatorToolsEnv(max_tool_calls=max_tool_calls, chat=chat, system_prompt=system_prompt)


if __name__ == "__main__":
    print(*write_data(), sep="\n")
