"""Built-in multi-turn task: arithmetic with a calculator tool, scored by the final answer.

The user asks `What is 13*17?`. The environment is a `rlhub.envs.tools.ToolEnv` with one tool,

    def calculator(expression: str) -> str   # numbers, + - * / and parentheses, e.g. 13*17

offered through the chat template (rlhub's ChatML models get it in a system message), and called
in the model family's format, for these models Hermes':

    <tool_call>{"name": "calculator", "arguments": {"expression": "13*17"}}</tool_call>

The expression is evaluated safely (parsed with `ast` and walked by hand, exact fractions; nothing
is ever run) and the value comes back as a tool message (`221`), or `error: ...` for a malformed
call or a refused expression; the episode goes on with reward 0. A turn without a call is the
final answer: reward 1 and success when it is the row's integer answer exactly (after stripping)
and the model ended its turn, else 0; the episode ends. At most `max_tool_calls` calls per episode;
one more ends the episode with 0.

Rows are {"question", "expression", "answer"} from `envs/data/calculator_tools.jsonl`
and `calculator_tools_test.jsonl`, written by `write_data` (run this module to
rewrite them). Other numbers: write files with `write_data(directory, low=.., high=..)`
and point `env.dataset.path` at them. The task's settings (three turns, 64 new tokens a turn, a
1024-token context for the tool's description) come with it (`env_defaults`).

`format_examples` gives the two turn shapes with random values that ignore the
prompt: a first turn that is a call with another row's expression, and a final
turn (after a transcript of such a call and its result) that is another row's
answer. A warm start on the first shape alone would leave the model calling the
tool on every turn, so the final answer would never be sampled.
"""

from __future__ import annotations

import ast
import math
import operator
import random
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from rlhub.envs.base import PARSE_LOCK
from rlhub.envs.registry import env_defaults
from rlhub.envs.tools import ToolCall, ToolEnv, format_call, schemas

DATA = Path(__file__).parent / "data"
NAME = "calculator_tools"
MAX_EXPRESSION = 200
"""Longest expression evaluated, in characters (keeps parsing and the numbers small)."""
INSTRUCTIONS = "Use the calculator for arithmetic. Reply with the final answer alone, an integer."
FORMAT = "hermes"
"""The call format of the warm start's examples: that of rlhub's ChatML models (tiny MoE, SmolLM2)."""

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


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: numbers, + - * / and parentheses, e.g. 13*17
    """
    return render(evaluate(expression))


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


class ShippedToolEnv(ToolEnv):
    """A built-in tool task over the files it ships (`envs/data/<task>.jsonl` and `<task>_test.jsonl`),
    asking each row's `question`, with a call limit and a system prompt of its own."""

    task = ""
    instructions = ""
    row_fields = ("question", "answer")

    def __init__(self, max_tool_calls: int, system_prompt: str | None = None, tool_format: str = "auto") -> None:
        from rlhub.data import DatasetConfig, load_rows

        if max_tool_calls < 0:
            raise ValueError(f"env.kwargs.max_tool_calls={max_tool_calls} must be at least 0")
        self.max_tool_calls = self.max_calls_per_turn = max_tool_calls
        self.system_prompt = self.instructions if system_prompt is None else system_prompt
        self.tool_format = tool_format
        self._splits = {split: load_rows(DatasetConfig(path=str(DATA / f"{self.task}{suffix}.jsonl")), self.row_fields)["train"]
                        for split, suffix in (("train", ""), ("test", "_test"))}

    def dataset(self, split: str) -> Sequence[Mapping[str, Any]]:
        if split not in self._splits:
            raise KeyError(f"{self.task} has splits {sorted(self._splits)}, not {split!r}")
        return self._splits[split]

    def prompt(self, row: Mapping[str, Any]) -> str:
        return row["question"]


class CalculatorToolsEnv(ShippedToolEnv):
    """Questions answered with the help of a calculator tool (see the module docstring)."""

    task, instructions = NAME, INSTRUCTIONS
    tools = (calculator,)

    def check(self, row: Mapping[str, Any], answer: str) -> bool:
        return answer.strip() == str(row["answer"]).strip()

    def format_examples(self, n: int, rng: random.Random) -> list[tuple[Any, str]]:
        """(prompt, answer) pairs of the right shape whose values ignore the prompt: half first turns
        (a call with another row's expression), half final turns after a transcript of such a call
        and its result (another row's answer). Never the prompt's own expression or answer."""
        rows = self._splits["train"]
        fmt = FORMAT if self.tool_format == "auto" else self.tool_format
        pairs = []
        for _ in range(n):
            row = rows[rng.randrange(len(rows))]
            prompt, _ = self.reset(row)
            expression = _other(rows, "expression", row, rng)
            call = ToolCall("calculator", {"expression": expression}, "call_1")
            text = format_call([call], fmt)
            if rng.random() < 0.5:
                pairs.append((prompt, text))
                continue
            result = {"role": "tool", "name": "calculator", "tool_call_id": "call_1", "content": calculator(expression)}
            transcript = {"messages": [*prompt["messages"], {"role": "assistant", "content": text}, result],
                          "tools": schemas(self.tool_list())}
            pairs.append((transcript, _other(rows, "answer", row, rng)))
        return pairs


def _other(rows: Sequence[Mapping[str, Any]], key: str, row: Mapping[str, Any], rng: random.Random) -> str:
    """`key` of a random row whose value differs from `row`'s."""
    for _ in range(100):
        value = rows[rng.randrange(len(rows))][key]
        if value != row[key]:
            return value
    raise ValueError(f"{NAME}: the training rows have too few distinct {key}s for format examples")


@env_defaults({"rollout.max_turns": 3, "rollout.max_new_tokens": 64, "rollout.max_model_len": 1024})
def load_environment(max_tool_calls: int = 2, system_prompt: str | None = None, tool_format: str = "auto") -> CalculatorToolsEnv:
    """Arithmetic questions answered with a calculator tool, multi-turn (the tool protocol: rlhub.envs.tools)."""
    return CalculatorToolsEnv(max_tool_calls=max_tool_calls, system_prompt=system_prompt, tool_format=tool_format)


if __name__ == "__main__":
    print(*write_data(), sep="\n")
