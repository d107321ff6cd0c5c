"""Built-in single-turn tasks: any task of the `reasoning_gym` package, by name, scored by the task itself.

    rlhub train env=reasoning_gym env.kwargs.task=leg_counting env.kwargs.max_animals=3

The entries are generated offline by
`reasoning_gym.create_dataset(task, size=size + test_size, seed=seed, **task_kwargs)`,
deterministically, so every process that builds the environment with the same
kwargs holds the same entries. A row is {"question", "index"}: plain JSON, with
`index` pointing at its entry, against which `step` scores the answer with the
dataset's own `score_answer(answer, entry)`.

Splits: a question asked twice is kept once; the test split is the last
`test_size` distinct entries (at most a fifth of them, for small task spaces),
the training split the rest, so no test question is trained on.

The answer is the text inside the last `<answer>...</answer>` of the message
when there is one, else the whole stripped message. Reward = the task's score
(0..1), success = a score of 1; a message cut off at the length limit scores 0.

`basic_arithmetic`, the default task, starts from an easy setting (two one-digit
terms, + and -, `EASY_BASIC_ARITHMETIC`) that task kwargs override key by key;
every other task starts from reasoning_gym's own defaults.
"""

from __future__ import annotations

import random
import re
from typing import Any, Mapping, Sequence

from rlhub.envs.base import StepResult, ended_turn

EASY_BASIC_ARITHMETIC: dict[str, Any] = {
    "min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ("+", "-"),
    "allow_parentheses": False, "allow_negation": False,
}
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(message: str) -> str:
    """The text inside the last <answer>...</answer>, else the whole message, stripped.

    >>> extract_answer("think... <answer> 42 </answer>"), extract_answer(" 42\\n")
    ('42', '42')
    """
    found = _ANSWER.findall(message)
    return (found[-1] if found else message).strip()


class ReasoningGymEnv:
    """One reasoning_gym task as an environment (see the module docstring)."""

    row_fields = ("question", "index")

    def __init__(self, task: str = "basic_arithmetic", size: int = 2000, test_size: int = 200, seed: int = 0,
                 system_prompt: str | None = None, chat: bool = True, **task_kwargs: Any) -> None:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS

        if task not in DATASETS:
            names = sorted(DATASETS)
            raise ValueError(f"env.kwargs.task={task!r}: reasoning_gym has no such task; it has {len(names)}, "
                             f"e.g. {names[:12]}")
        if size < 1 or test_size < 0:
            raise ValueError(f"env.kwargs.size={size} must be at least 1 and test_size={test_size} at least 0")
        if task == "basic_arithmetic":
            task_kwargs = {**EASY_BASIC_ARITHMETIC, **task_kwargs}
        self.task, self.system_prompt, self.chat = task, system_prompt, chat
        self.data = reasoning_gym.create_dataset(task, size=size + test_size, seed=seed, **task_kwargs)
        self.entries = [self.data[i] for i in range(size + test_size)]
        self._splits = _split(self.entries, test_size)

    def dataset(self, split: str) -> Sequence[Mapping[str, Any]]:
        if split not in self._splits:
            raise KeyError(f"reasoning_gym has splits {sorted(self._splits)}, not {split!r}")
        return self._splits[split]

    def reset(self, row: Mapping[str, Any]) -> tuple[Any, int]:
        index = int(row["index"])
        if not 0 <= index < len(self.entries) or self.entries[index]["question"] != row["question"]:
            raise ValueError(f"reasoning_gym {self.task}: row {index} is not this environment's entry "
                             f"(built with other size, seed or task kwargs?)")
        if not self.chat:
            return f"{row['question']}\n", index
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": row["question"]}], index

    def step(self, index: int, message: str) -> StepResult:
        """The task's score of the extracted answer; 0 for a message cut off at the length limit."""
        if not ended_turn(message):
            return StepResult(0.0, done=True, success=False)
        try:
            score = float(self.data.score_answer(extract_answer(message), self.entries[index]))
        except Exception as e:  # noqa: BLE001 - a task's scorer choking on the model's text is a wrong answer
            return StepResult(0.0, done=True, success=False, info={"score_error": type(e).__name__})
        return StepResult(score, done=True, success=score == 1.0)

    def format_examples(self, n: int, rng: random.Random) -> list[tuple[Any, str]]:
        """(prompt, answer) pairs whose answer is another entry's answer, never the prompt's own."""
        rows = self._splits["train"]
        pairs = []
        for _ in range(n):
            row = rows[rng.randrange(len(rows))]
            own = self.entries[row["index"]]["answer"]
            for _ in range(100):
                answer = self.entries[rows[rng.randrange(len(rows))]["index"]]["answer"]
                if answer is not None and answer != own:
                    break
            else:
                raise ValueError(f"reasoning_gym {self.task}: too few distinct answers for format examples")
            pairs.append((self.reset(row)[0], str(answer)))
        return pairs


def _split(entries: Sequence[Mapping[str, Any]], test_size: int) -> dict[str, list[dict[str, Any]]]:
    """Rows of the distinct questions: the last `test_size` (at most a fifth) for test, the rest for training."""
    first: dict[str, int] = {}
    for i, entry in enumerate(entries):
        first.setdefault(entry["question"], i)
    rows = [{"question": q, "index": i} for q, i in first.items()]
    n_test = min(test_size, len(rows) // 5)
    return {"train": rows[: len(rows) - n_test], "test": rows[len(rows) - n_test:]}


def load_environment(task: str = "basic_arithmetic", size: int = 2000, test_size: int = 200, seed: int = 0,
                     system_prompt: str | None = None, chat: bool = True, **task_kwargs: Any) -> ReasoningGymEnv:
    """Any reasoning_gym task by name (env.kwargs.task), generated offline and scored by the task's own score_answer."""
    return ReasoningGymEnv(task, size, test_size, seed, system_prompt, chat, **task_kwargs)
