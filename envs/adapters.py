"""Environments written for another platform's `load_environment` convention, as rlhub environments.

The verifiers convention: a package's `load_environment(**kwargs)` returns an
object with `dataset` (and `eval_dataset`): rows with a `prompt` (chat
messages) or a `question`, and an `answer`; an optional `system_prompt`; and a
`rubric` whose `funcs` (reward functions) and `weights` score a completion. The
functions take, by keyword, whichever of `prompt`, `completion`, `answer`,
`state`, `task`, `info` and `parser` they name; `completion` is the assistant's
message list; a function may be `async def`.

    rlhub train env=verifiers env.kwargs.module=my_math_env env.kwargs.args.num_train_examples=500

The reward is the weighted sum of the functions, and success is left to
evaluation's rule (reward >= 1). An object with `env_response` and
`is_completed` (verifiers' multi-turn protocol) runs multi-turn: after each
model turn, `is_completed(messages, state)` decides whether the episode ends
(or `max_turns` turns were taken); if not, `env_response(messages, state)`
gives the next messages and the new state, appended as the observation.
`setup_state(state)` runs at the start. The verifiers-style state holds
`prompt`, `completion` (every message after the prompt, the environment's
included), `answer`, `task`, `info`, `responses` and `turn`; the rubric scores
the whole completion when the episode ends. Each of these may be `async def`.
Nothing of verifiers is imported: the adapter reads the object's attributes.
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
        self.source = source
        self.multi_turn = callable(getattr(source, "env_response", None)) and callable(getattr(source, "is_completed", None))
        self.max_turns = int(getattr(source, "max_turns", 0) or 0)

    def dataset(self, split: str) -> Sequence[Mapping[str, Any]]:
        if split not in self.rows:
            raise KeyError(f"splits are train and test, not {split!r}")
        return self.rows[split]

    async def reset(self, row: Mapping[str, Any]) -> tuple[Any, Any]:
        if row.get("prompt") is not None and not isinstance(row["prompt"], str):
            messages = [dict(m) for m in row["prompt"]]
        else:
            messages = [{"role": "user", "content": row.get("prompt") or row.get("question", "")}]
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        vf_state = {"prompt": messages, "completion": [], "answer": row.get("answer", ""), "task": row.get("task", "default"),
                    "info": row.get("info") or {}, "responses": [], "turn": 0}
        if self.multi_turn and callable(getattr(self.source, "setup_state", None)):
            vf_state = await _maybe_await(self.source.setup_state(vf_state)) or vf_state
        return messages, {"row": dict(row), "prompt": messages, "vf_state": vf_state}

    async def step(self, state: Any, message: str) -> StepResult:
        if self.multi_turn:
            return await self._multi_turn_step(state, message)
        return await self._score(state, [{"role": "assistant", "content": str(message)}], {})

    async def _multi_turn_step(self, state: Any, message: str) -> StepResult:
        """One model turn of a multi-turn verifiers-style environment (module docstring)."""
        vf_state = state["vf_state"]
        vf_state["completion"].append({"role": "assistant", "content": str(message)})
        vf_state["responses"].append(str(message))
        vf_state["turn"] += 1
        messages = [*state["prompt"], *vf_state["completion"]]
        done = bool(await _maybe_await(self.source.is_completed(messages, vf_state))) or (self.max_turns and vf_state["turn"] >= self.max_turns)
        if done:
            return await self._score(state, vf_state["completion"], vf_state)
        reply, new_state = await _maybe_await(self.source.env_response(messages, vf_state))
        reply = [reply] if isinstance(reply, Mapping) else [dict(m) for m in reply]
        state["vf_state"] = vf_state = new_state if new_state is not None else vf_state
        vf_state["completion"].extend(reply)
        return StepResult(0.0, done=False, observation=reply)

    async def _score(self, state: Any, completion: list[dict[str, Any]], vf_state: dict[str, Any]) -> StepResult:
        row = state["row"]
        offered = {"prompt": state["prompt"], "completion": completion,
                   "answer": row.get("answer", ""), "state": vf_state, "task": row.get("task", "default"),
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


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def load_environment(module: str = "", args: Mapping[str, Any] | None = None) -> RubricEnv:
    """A verifiers-style environment package (env.kwargs.module) through its load_environment(**args)."""
    if not module:
        raise ValueError("env.kwargs.module: name the installed package whose load_environment() to wrap")
    try:
        factory = importlib.import_module(module).load_environment
    except (ImportError, AttributeError) as e:
        raise ValueError(f"env.kwargs.module={module!r}: {e}") from None
    return RubricEnv(factory(**dict(args or {})))
