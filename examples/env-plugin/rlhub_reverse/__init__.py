"""Reverse a short word: `Reverse: cab` -> `bac`. An rlhub environment plugin to copy.

The environment protocol (rlhub.envs.base): `dataset(split)` gives rows,
`reset(row)` gives the prompt (here chat messages; a plain string is raw text)
and the episode's state, `step(state, message)` scores the model's message.
`format_examples` feeds rlhub's format warm start (the shape of an answer, never
the answer), `row_fields` names what a user's own dataset must provide
(`env.dataset.path=...`).

The package ships its words (`data/words.jsonl`, a `text` column) and the settings
its task needs, declared once with `env_defaults`: `rlhub train env=reverse_word`
reads the shipped file, maps its `text` column to the `word` field, holds out 40
rows for evaluation and budgets 4 new tokens (3 letters and the end of turn);
any of them can still be given on the command line (`rlhub config env=reverse_word`
shows them). Without a dataset (`env.dataset.path=`) the words are generated.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

from rlhub.envs import env_defaults
from rlhub.envs.base import StepResult, ended_turn

WORDS = Path(__file__).parent / "data" / "words.jsonl"


class ReverseWord:
    row_fields = ("word",)

    def __init__(self, length: int = 3, letters: str = "abcdef", test_fraction: float = 0.2, seed: int = 0) -> None:
        if length < 2 or len(set(letters)) < 2:
            raise ValueError("env.kwargs.length must be >= 2 and env.kwargs.letters hold two different letters")
        words = ["".join(w) for w in itertools.product(sorted(set(letters)), repeat=length)]
        words = [w for w in words if w != w[::-1]]  # a palindrome would be its own answer
        random.Random(seed).shuffle(words)
        n_test = max(1, int(len(words) * test_fraction))
        self.rows = {"test": [{"word": w} for w in words[:n_test]], "train": [{"word": w} for w in words[n_test:]]}
        self.length, self.letters = length, "".join(sorted(set(letters)))

    def dataset(self, split: str) -> Sequence[Mapping[str, Any]]:
        return self.rows[split]

    def reset(self, row: Mapping[str, Any]) -> tuple[Any, str]:
        return [{"role": "user", "content": f"Reverse: {row['word']}"}], row["word"][::-1]

    def step(self, answer: str, message: str) -> StepResult:
        """1 for the reversed word followed by the end-of-turn token, else 0."""
        correct = ended_turn(message) and message.strip() == answer
        return StepResult(1.0 if correct else 0.0, done=True, success=correct)

    def format_examples(self, n: int, rng: random.Random) -> list[tuple[Any, str]]:
        """(prompt, a random word of the right length): the shape of an answer, not the answer."""
        rows = self.rows["train"]
        return [(self.reset(rng.choice(rows))[0], "".join(rng.choice(self.letters) for _ in range(self.length))) for _ in range(n)]


@env_defaults({
    "env.dataset.path": str(WORDS),
    "env.dataset.columns.word": "text",
    "env.dataset.eval_size": 40,
    "rollout.max_new_tokens": 4,
    "rollout.max_model_len": 64,
    "warm_start.steps": 5,
})
def load_environment(length: int = 3, letters: str = "abcdef", seed: int = 0) -> ReverseWord:
    """Reverse a short word (an example plugin: copy examples/env-plugin/ to start your own)."""
    return ReverseWord(length=length, letters=letters, seed=seed)
