"""Environments written for another platform's `load_environment` convention, as rlhub environments.

The verifiers convention: a package's `load_environment(**kwargs)` returns an
object with `dataset` (and `eval_dataset`): rows with a `prompt` (chat
messages) or a `question`, and an `answer`; an optional `system_prompt`; and a
`rubric` whose `funcs` (reward functions) and `weights` score a completion. The
functions take, by keyword, whichever of `prompt`, `completion`, `answer`,
`state`, `task`, `info` and `parser` they name; `completion` is the assistant's
message list; a function may be `async def`.

    rlhub train env=verifiers env.kwargs.module=my_math_env env.kwargs.args.num_train_examples=500

`RubricEnv` is single-turn: the reward is the weighted sum of the functions,
and success is left to evaluation's rule (reward >= 1). Nothing of verifiers is
imported: the adapter reads the object's attributes.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from typing import Any, Mapping, Sequence

from rlhub.envs.base import StepResult


class RubricEnv:
    """A dataset plus a rubric of reward functions, as an rlhub environment."""

    row_fields = ()

    def __init__(self, source: Any) -> None:
        rubric = getattr(source, "rubric", None)
        funcs = list(getattr(rubric, "funcs", None) or getattr(rubric, "reward_funcs", None) or [])
        if not funcs:
            raise TypeError(f"{type(source).__name__}: no rubric with reward functions (rubric.funcs) to score with")
        weights = list(getattr(rubric, "weights", None) or [1.0] * len(funcs))
        if len(weights) != len(funcs):
            raise TypeError(f"{type(source).__name__}: {len(funcs)} reward functions but {len(weights)} weights")
        self.funcs, self.weights = funcs, [float(w) for w in weights]
        self.parser = getattr(source, "parser", None) or getattr(rubric, "parser", None)
        self.system_prompt = getattr(source, "system_prompt", None)
        train, test = getattr(source, "dataset", None), getattr(source, "eval_dataset", None)
        if train is None and test is None:
            raise TypeError(f"{type(source).__name__}: neither dataset nor eval_dataset")
        self.rows = {"train": train if train is not None else test, "test": test if test is not None else []}

    def dataset(self, split: str) -> Sequence[Mapping[str, Any]]:
        if split not in self.rows:
            raise KeyError(f"splits are train and test, not {split!r}")
        return self.rows[split]

    def reset(self, row: Mapping[str, Any]) -> tuple[Any, Any]:
        if row.get("prompt") is not None and not isinstance(row["prompt"], str):
            messages = [dict(m) for m in row["prompt"]]
        else:
            messages = [{"role": "user", "content": row.get("prompt") or row.get("question", "")}]
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return messages, {"row": dict(row), "prompt": messages}

    async def step(self, state: Any, message: str) -> StepResult:
        row = state["row"]
        offered = {"prompt": state["prompt"], "completion": [{"role": "assistant", "content": str(message)}],
                   "answer": row.get("answer", ""), "state": {}, "task": row.get("task", "default"),
                   "info": row.get("info") or {}, "parser": self.parser}
        values = []
        for fn in self.funcs:
            params = inspect.signature(fn).parameters
            takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
            kwargs = offered if takes_all else {k: v for k, v in offered.items() if k in params}
            if inspect.iscoroutinefunction(fn):
                value = await fn(**kwargs)
            else:  # a plain function on a thread: it must not hold up the event loop other calls share
                value = await asyncio.to_thread(fn, **kwargs)
                value = await value if inspect.isawaitable(value) else value
            values.append(float(value))
        reward = sum(w * v for w, v in zip(self.weights, values))
        return StepResult(reward, done=True, info={f"reward_{getattr(f, '__name__', i)}": v for i, (f, v) in enumerate(zip(self.funcs, values))})


def load_environment(module: str = "", args: Mapping[str, Any] | None = None) -> RubricEnv:
    """A verifiers-style environment package (env.kwargs.module) through its load_environment(**args)."""
    if not module:
        raise ValueError("env.kwargs.module: name the installed package whose load_environment() to wrap")
    try:
        factory = importlib.import_module(module).load_environment
    except (ImportError, AttributeError) as e:
        raise ValueError(f"env.kwargs.module={module!r}: {e}") from None
    return RubricEnv(factory(**dict(args or {})))
