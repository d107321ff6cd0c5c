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
whole message. It is scored by `rlhub.sandbox` (a child process per message,
about 12 ms, with time, memory, output and disk limits, no network, processes
or writes outside its directory): the child only computes the outputs of the
calls the tests make, and this process compares them with the expected values,
which the code never sees. reward = the fraction of the row's tests passed, 0
for a message cut off at the length limit (it is not run) and 0 for any refused
action; success = all passed. `info` carries the sandbox's outcome (ok, syntax,
error, timeout, memory, output, refused, isolation, malformed; cut_off), passed,
total and detail. How strictly the sandbox isolates is the run's
`sandbox.isolation` (`rlhub.sandbox.configure`).

Tests must be asserts the sandbox can judge outside the candidate's process
(`rlhub.sandbox.plan_test`: `assert f(x) == literal`, isinstance, math.isclose,
...); a row with another test is refused when the rows are loaded (`dataset`,
`check_rows`) or reset. `env.kwargs.test_mode=asserts` runs any assert in the
candidate's process instead, the old way: code can then forge its own reward
(the expected values are in its process), so use it only for trusted code.

`format_examples` answers with a definition of the right name and signature
whose body returns a constant from 100..999, which no shipped test expects, so
a warm start on them teaches the shape of an answer and none of the solutions.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from rlhub.envs.base import StepResult, ended_turn
from rlhub.sandbox import Limits, UnsupportedTest, plan_test, run_tests

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
    disk_mb: int = 16
    """Bytes the code may write in its directory (a tmpfs, held in memory)."""
    max_files: int = 256
    """Files and directories the code may create there."""
    test_mode: str = "calls"
    """calls: the tests' checks are made outside the candidate's process (tests must be judgeable asserts);
    asserts: the tests run in its process, any Python, and the code can forge its result."""
    row_fields = ("prompt", "entry_point", "tests")
    uses_sandbox: ClassVar[bool] = True
    """Scores in rlhub.sandbox: the run checks its isolation at start-up (`rlhub.sandbox.check_isolation`)."""
    _rows: dict[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.cpu_s < 1 or self.memory_mb < 64:
            raise ValueError(f"env.kwargs: timeout_s={self.timeout_s} must be > 0, cpu_s={self.cpu_s} >= 1 "
                             f"and memory_mb={self.memory_mb} >= 64 (Python itself needs about 30 MB)")
        if self.disk_mb < 1 or self.max_files < 1:
            raise ValueError(f"env.kwargs: disk_mb={self.disk_mb} and max_files={self.max_files} must be >= 1")
        if self.test_mode not in ("calls", "asserts"):
            raise ValueError(f"env.kwargs.test_mode={self.test_mode!r}: use calls or asserts")
        self.limits = Limits(timeout_s=self.timeout_s, cpu_s=self.cpu_s, memory_mb=self.memory_mb, disk_mb=self.disk_mb,
                             files=self.max_files)

    def dataset(self, split: str) -> Sequence[Mapping[str, Any]]:
        if split not in FILES:
            raise KeyError(f"python_code has splits {sorted(FILES)}, not {split!r}")
        if split not in self._rows:
            from rlhub.data import DatasetConfig, load_rows

            rows = load_rows(DatasetConfig(path=str(FILES[split])), self.row_fields)["train"]
            self.check_rows(rows, str(FILES[split]))
            self._rows[split] = rows
        return self._rows[split]

    def check_rows(self, rows: Sequence[Mapping[str, Any]], name: str = "the dataset") -> None:
        """UnsupportedTest naming the first row (by index) with a test the sandbox cannot judge (calls mode)."""
        for i, row in enumerate(rows):
            self._check_row(row, f"{name}: row {i}")

    def _check_row(self, row: Mapping[str, Any], where: str) -> None:
        if self.test_mode != "calls":
            return
        for test in row["tests"]:
            try:
                plan_test(str(test), row["entry_point"])
            except UnsupportedTest as e:
                raise UnsupportedTest(f"{where} (entry point {row['entry_point']!r}): test {test!r} cannot be judged "
                                      f"outside the candidate's process: {e}. Rewrite it as `assert f(...) == literal` "
                                      f"(or see rlhub.sandbox), or set env.kwargs.test_mode=asserts (forgeable)") from None

    def reset(self, row: Mapping[str, Any]) -> tuple[Any, Mapping[str, Any]]:
        self._check_row(row, "a row")
        state = {"entry_point": row["entry_point"], "tests": list(row["tests"])}
        if not self.chat:
            return f"{row['prompt']}\n", state
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": f"{row['prompt']} {INSTRUCTION}"}], state

    def step(self, state: Mapping[str, Any], message: str) -> StepResult:
        """The fraction of the tests the message's code passes; 0 (not run) when it was cut off at the length
        limit, 0 when it tried something the sandbox refuses (outcome refused)."""
        total = len(state["tests"])
        if not ended_turn(message):
            return StepResult(0.0, done=True, success=False, info={"outcome": "cut_off", "passed": 0, "total": total})
        result = run_tests(extract_code(message), state["tests"], state["entry_point"], self.limits, mode=self.test_mode)
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
                     system_prompt: str | None = None, disk_mb: int = 16, max_files: int = 256,
                     test_mode: str = "calls") -> PythonCodeEnv:
    """Write a small Python function; reward = the fraction of its tests passed in a sandboxed child process."""
    return PythonCodeEnv(timeout_s, cpu_s, memory_mb, chat, system_prompt, disk_mb, max_files, test_mode)


if __name__ == "__main__":
    print(*write_data())
