"""A reward function `(prompt, completion, row) -> float`, named by its import path, as a whole task.

    rlhub train env=reward_fn env.kwargs.fn=my_package.rewards:exact_match env.dataset.path=rows.jsonl

Rows need a `prompt` column (text, or a list of chat messages); map another
column with `env.dataset.columns.prompt=question`.
"""

from __future__ import annotations

import importlib
from typing import Any

from rlhub.envs.registry import RewardFunctionEnv


def load_environment(fn: str = "", success_threshold: float = 1.0) -> RewardFunctionEnv:
    """A reward function `(prompt, completion, row) -> float` (env.kwargs.fn=module:name) over env.dataset's rows."""
    module, _, attr = fn.partition(":")
    if not module or not attr:
        raise ValueError(f"env.kwargs.fn={fn!r}: name the reward function as module:function")
    try:
        target: Any = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"env.kwargs.fn={fn!r}: {e}") from None
    if not callable(target):
        raise ValueError(f"env.kwargs.fn={fn!r} is not callable")
    return RewardFunctionEnv(target, success_threshold=success_threshold)


def exact_match(prompt: Any, completion: str, row: Any) -> float:
    """1.0 when the completion, stripped, is the row's `answer`; a ready-made reward function.

    >>> exact_match("2+2=", " 4 ", {"answer": "4"}), exact_match("2+2=", "5", {"answer": 4})
    (1.0, 0.0)
    """
    return float(completion.strip() == str(row["answer"]).strip())
