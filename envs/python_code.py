"""Built-in verifiable task: write a small Python function, scored by running its tests in a sandbox.

A row is {"prompt": "Write a Python function add(a, b) that returns a plus b.",
"entry_point": "add", "tests": ["assert add(3, 5) == 8", ...]}. The shipped rows
(`envs/data/python_code.jsonl` and `python_code_test.jsonl`, written by
`write_data`: `python -m rlhub.envs.python_code`) come from templates easy
enough for a tiny model: return a constant, return an argument, add, subtract,
add or multiply by a constant, the larger or smaller of two; about 300 rows,
a fifth of them held out. Other rows of the same shape come through
`env.dataset.path`.

The code is the first ```python (or ```) fenced block of the message, else the
whole message. It runs in `rlhub.sandbox` (a child process per message, about
25 ms, with time, memory and output limits, no network and no writes outside
its directory): reward = the fraction of the row's tests passed, 0 for a
message cut off at the length limit (it is not run); success = all passed.
`info` carries the sandbox's outcome (ok, syntax, error, timeout, memory,
output, refused), passed, total and detail.

`format_examples` answers with a definition of the right name and signature
whose body returns a constant from 100..999, which no shipped test expects, so
a warm start on them teaches the shape of an answer and none of the solutions.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from rlhub.envs.base import StepResult, ended_turn
from rlhub.sandbox import Limits, run_tests

DATA = Path(__file__).parent / "data"
FILES = {"train": DATA / "python_code.jsonl", "test": DATA / "python_code_test.jsonl"}
INSTRUCTION = "Reply with the code only."
_FENCED = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)

# (function names, argument lists, what it returns, the expected value from the arguments and constant k, k values)
TEMPLATES: list[tuple[tuple[str, ...], tuple[str, ...], str, Any, tuple[int, ...]]] = [
    (("answer", "get_value", "constant", "number", "magic"), ("",), "returns {k}", lambda args, k: k, tuple(range(10))),
    (("identity", "echo", "same", "passthrough", "unchanged"), ("x", "n", "value"), "returns {0}", lambda args, k: args[0], (0,)),
    (("first", "pick_first", "left", "take_a"), ("a, b", "x, y", "m, n"), "returns {0}", lambda args, k: args[0], (0,)),
    (("second", "pick_second", "right", "take_b"), ("a, b", "x, y", "m, n"), "returns {1}", lambda args, k: args[1], (0,)),
    (("add", "plus", "total", "sum_two", "combine"), ("a, b", "x, y", "m, n"), "returns {0} plus {1}", lambda args, k: args[0] + args[1], (0,)),
    (("subtract", "minus", "difference", "take_away"), ("a, b", "x, y", "m, n"), "returns {0} minus {1}", lambda args, k: args[0] - args[1], (0,)),
    (("add_k", "increase", "bump", "shift"), ("x", "n", "value"), "returns {0} plus {k}", lambda args, k: args[0] + k, tuple(range(1, 10))),
    (("times_k", "scale", "multiply"), ("x", "n", "value"), "returns {0} times {k}", lambda args, k: args[0] * k, tuple(range(2, 10))),
    (("larger", "maximum", "bigger"), ("a, b", "x, y", "m, n"), "returns the larger of {0} and {1}", lambda args, k: max(args), (0,)),
    (("smaller", "minimum", "lesser"), ("a, b", "x, y", "m, n"), "returns the smaller of {0} and {1}", lambda args, k: min(args), (0,)),
]
"""Every expected value is below 100 (arguments 0..10), so a constant of 100..999 passes no value test."""


def make_rows(seed: int = 0, test_fraction: float = 0.2) -> dict[str, list[dict[str, Any]]]:
    """The generated rows, split at random (seeded) into train and test."""
    rng = random.Random(seed)
    rows = []
    for names, arg_lists, returns, expected, ks in TEMPLATES:
        for name in names:
            for arg_list in arg_lists:
                params = arg_list.split(", ") if arg_list else []
                for k in ks:
                    task = returns.format(*params, k=k)
                    tests = [f"assert {name}() == {k}", f"assert isinstance({name}(), int)"] if not params else []
                    for _ in range(3 if params else 0):
                        args = rng.sample(range(11), len(params))  # distinct, so that a or b alone is not a sum
                        tests.append(f"assert {name}({', '.join(map(str, args))}) == {expected(args, k)}")
                    rows.append({"prompt": f"Write a Python function {name}({arg_list}) that {task}.", "entry_point": name,
                                 "tests": tests})
    rng.shuffle(rows)
    n_test = int(len(rows) * test_fraction)
    return {"train": rows[n_test:], "test": rows[:n_test]}


def write_data(directory: Path = DATA) -> tuple[Path, Path]:
    """Write python_code.jsonl and python_code_test.jsonl (the shipped files)."""
    from rlhub.data import write_jsonl

    rows = make_rows()
    return (write_jsonl(rows["train"], directory / FILES["train"].name),
            write_jsonl(rows["test"], directory / FILES["test"].name))


def extract_code(message: str) -> str:
    """The first fenced code block of the message (```python, ```py or ```), else the whole message.

    >>> extract_code("Here:\\n```python\\ndef f():\\n    return 1\\n```\\nDone."), extract_code("def f(): return 1")
    ('def f():\\n    return 1\\n', 'def f(): return 1')
    """
    found = _FENCED.search(message)
    return found.group(1) if found else message


@dataclass
class PythonCodeEnv:
    timeout_s: float = 3.0
    """Wall-clock seconds for one message's code and all its tests."""
    cpu_s: int = 2
    memory_mb: int = 256
    chat: bool = True
    """Prompts as chat messages (False: raw text, the task then a newline)."""
    system_prompt: str | None = None
    row_fields = ("prompt", "entry_point", "tests")
    _rows: dict[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.cpu_s < 1 or self.memory_mb < 64:
            raise ValueError(f"env.kwargs: timeout_s={self.timeout_s} must be > 0, cpu_s={self.cpu_s} >= 1 "
                             f"and memory_mb={self.memory_mb} >= 64 (Python itself needs about 30 MB)")
        self.limits = Limits(timeout_s=self.timeout_s, cpu_s=self.cpu_s, memory_mb=self.memory_mb)

    def dataset(self, split: str) -> Sequence[Mapping[str, Any]]:
        if split not in FILES:
            raise KeyError(f"python_code has splits {sorted(FILES)}, not {split!r}")
        if split not in self._rows:
            from rlhub.data import DatasetConfig, load_rows

            self._rows[split] = load_rows(DatasetConfig(path=str(FILES[split])), self.row_fields)["train"]
        return self._rows[split]

    def reset(self, row: Mapping[str, Any]) -> tuple[Any, Mapping[str, Any]]:
        state = {"entry_point": row["entry_point"], "tests": list(row["tests"])}
        if not self.chat:
            return f"{row['prompt']}\n", state
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": f"{row['prompt']} {INSTRUCTION}"}], state

    def step(self, state: Mapping[str, Any], message: str) -> StepResult:
        """The fraction of the tests the message's code passes; 0 (not run) when it was cut off at the length limit."""
        total = len(state["tests"])
        if not ended_turn(message):
            return StepResult(0.0, done=True, success=False, info={"outcome": "cut_off", "passed": 0, "total": total})
        result = run_tests(extract_code(message), state["tests"], state["entry_point"], self.limits)
        info = {"outcome": result.outcome, "passed": result.passed, "total": total, "detail": result.detail}
        return StepResult(result.fraction, done=True, success=total > 0 and result.passed == total, info=info)

    def format_examples(self, n: int, rng: random.Random) -> list[tuple[Any, str]]:
        """(prompt, answer) pairs: a definition of the row's function with its signature, returning 100..999."""
        rows = self.dataset("train")
        pairs = []
        for _ in range(n):
            row = rows[rng.randrange(len(rows))]
            found = re.search(rf"\b{re.escape(row['entry_point'])}\(([^)]*)\)", row["prompt"])
            params = found.group(1) if found else "*args"
            pairs.append((self.reset(row)[0], f"def {row['entry_point']}({params}):\n    return {rng.randint(100, 999)}\n"))
        return pairs


def load_environment(timeout_s: float = 3.0, cpu_s: int = 2, memory_mb: int = 256, chat: bool = True,
                     system_prompt: str | None = None) -> PythonCodeEnv:
    """Write a small Python function; reward = the fraction of its tests passed in a sandboxed child process."""
    return PythonCodeEnv(timeout_s, cpu_s, memory_mb, chat, system_prompt)


if __name__ == "__main__":
    print(*write_data())
