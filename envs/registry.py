"""Find environments by name through the `rlhub.envs` entry-point group, and build one from the config.

A factory may return an environment (`dataset`, `reset`, `step`) or a plain reward
function `(prompt, completion, row) -> float`, which becomes a whole single-turn
environment over the rows of `env.dataset` (`RewardFunctionEnv`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Mapping, Sequence

from rlhub.envs.base import Env, StepResult

GROUP = "rlhub.envs"


DEFAULT_PREFIXES = ("env.", "rollout.", "warm_start.", "eval.")
"""What an environment's defaults may set: its own settings and those of the episodes it needs (turns,
token budgets, model length, warm start, evaluation), not the algorithm's or the cluster's."""


def env_defaults(defaults: Mapping[str, Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate an environment's factory with run-config values that apply whenever `env=NAME` selects
    it, over the config files and under the command line's own values (`rlhub config env=NAME` shows
    them). Keys are dotted run-config keys; a nested mapping is flattened (`{"env": {"dataset":
    {"path": p}}}` is `env.dataset.path`). For example, a multi-turn plugin that ships its data::

        @env_defaults({"rollout.max_turns": 3, "rollout.max_new_tokens": 24, "rollout.max_model_len": 512,
                       "env.dataset.path": str(Path(__file__).parent / "data" / "rows.jsonl"),
                       "env.dataset.columns.prompt": "question", "env.dataset.eval_size": 20})
        def load_environment(...): ...

    ValueError names a key outside `DEFAULT_PREFIXES`."""
    flat = _flatten(defaults)
    wrong = sorted(k for k in flat if not k.startswith(DEFAULT_PREFIXES))
    if wrong:
        raise ValueError(f"env_defaults: {wrong[0]!r} is not an environment's to set; use keys under {list(DEFAULT_PREFIXES)}")

    def mark(factory: Callable[..., Any]) -> Callable[..., Any]:
        factory.rlhub_defaults = flat  # type: ignore[attr-defined]
        return factory

    return mark


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def defaults_of(name: str) -> dict[str, Any]:
    """The run-config values environment `name`'s factory declares (`env_defaults`); {} when none, or
    when no environment has that name (the config reports that)."""
    found = available_envs().get(name)
    if found is None:
        return {}
    return dict(getattr(load_factory(name, found), "rlhub_defaults", {}) or {})


def available_envs() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


class EnvLoadError(ValueError):
    """An environment's entry point names a module or factory that does not import."""


def load_factory(name: str, entry_point: Any) -> Callable[..., Any]:
    """The factory `entry_point` names; EnvLoadError in one line naming the environment, the entry
    point, its package and what the import raised (a plugin's own bug or a missing dependency)."""
    try:
        return entry_point.load()
    except Exception as e:  # noqa: BLE001 - whatever the plugin's import raises, said in one line
        dist = getattr(entry_point, "dist", None)
        package = f" (package {dist.metadata['Name']} {dist.version})" if dist else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise EnvLoadError(f"env.name={name!r}: its entry point {entry_point.value!r}{package} does not import: "
                           f"{type(e).__name__}: {first}") from None


def make_env(name: str, **kwargs: Any) -> Env:
    """Build environment `name` with its factory's keyword arguments."""
    found = available_envs()
    if name not in found:
        raise ValueError(f"env.name={name!r}: no such environment; installed: {sorted(found)} (rlhub envs list)")
    factory = load_factory(name, found[name])
    try:
        env = factory(**kwargs)
    except TypeError as e:  # most often an argument the factory does not take (env.kwargs.*), or one it needs
        raise TypeError(f"env.name={name!r} with env.kwargs={kwargs}: {e}") from None
    if not hasattr(env, "step") and callable(env):
        return RewardFunctionEnv(env)
    check_env_methods(env, name)
    return env


def check_env_methods(env: Any, name: str) -> None:
    for method in ("dataset", "reset", "step"):
        if not callable(getattr(env, method, None)):
            raise TypeError(f"env.name={name!r}: its factory returned {type(env).__name__}, which has no {method}()")


def build_env(cfg: Any, seed: int = 0) -> Env:
    """The run's environment (`cfg`: the `env` config): by name, with its rows from `env.dataset`
    when a path is set; a `rlhub.data.DataError` names what is wrong with the data."""
    from rlhub.data import DataError, load_rows

    env = make_env(cfg.name, **cfg.kwargs)
    if cfg.dataset.path:
        env = WithRows(env, load_rows(cfg.dataset, getattr(env, "row_fields", ()), seed))
    elif isinstance(env, RewardFunctionEnv):
        raise DataError(f"env.name={cfg.name!r} is a reward function: its rows come from env.dataset.path")
    return env


class WithRows:
    """An environment whose rows come from a dataset; everything else is the environment's."""

    def __init__(self, env: Any, rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        self.env, self.rows = env, rows
        if inspect.iscoroutinefunction(env.step):  # the runner awaits an async step
            self.step = env.step

    def dataset(self, split: str) -> Sequence[Mapping[str, Any]]:
        if split not in self.rows:
            raise KeyError(f"the dataset has splits {sorted(self.rows)}, not {split!r}")
        return self.rows[split]

    def reset(self, row: Mapping[str, Any], index: int | None = None) -> Any:
        return self.env.reset(row, index=index) if takes_index(self.env.reset) else self.env.reset(row)

    def step(self, state: Any, message: str) -> Any:
        return self.env.step(state, message)

    def __getattr__(self, name: str) -> Any:  # format_examples, row_fields, evaluation hooks
        return getattr(self.env, name)


@dataclass
class RewardFunctionEnv:
    """A reward function `(prompt, completion, row) -> float` as a single-turn environment.

    Rows need a `prompt` (text, or a list of chat messages); the reward is the
    function's value, and success is reward >= `success_threshold`."""

    fn: Callable[[Any, str, Mapping[str, Any]], float]
    rows: Mapping[str, Sequence[Mapping[str, Any]]] | None = None
    success_threshold: float = 1.0
    row_fields = ("prompt",)

    def dataset(self, split: str) -> Sequence[Mapping[str, Any]]:
        if self.rows is None:
            raise KeyError("a reward-function environment takes its rows from env.dataset.path")
        return self.rows[split]

    def reset(self, row: Mapping[str, Any]) -> tuple[Any, Any]:
        return row["prompt"], row

    def step(self, row: Mapping[str, Any], message: str) -> StepResult:
        reward = self.fn(row["prompt"], message, row)
        try:  # numpy scalars and bools count as numbers; anything else goes to the platform's check as it is
            value = float(reward) if not isinstance(reward, (str, bytes)) else reward
        except (TypeError, ValueError):
            value = reward
        return StepResult(value, done=True, success=isinstance(value, float) and value >= self.success_threshold)


def takes_index(reset: Callable[..., Any]) -> bool:
    """Whether an environment's `reset` takes the row's position: a parameter `index` (or **kwargs).
    rlhub then calls `reset(row, index=i)`, with `dataset(split)[i] is row`."""
    try:
        params = inspect.signature(reset).parameters
    except (TypeError, ValueError):
        return False
    return "index" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def reset_at(reset: Callable[..., Any], index: int | None) -> Callable[..., Any]:
    """`reset` to call with a row: given the row's `index` when it takes one (`takes_index`)."""
    if index is None or not takes_index(reset):
        return reset
    import functools

    return functools.partial(reset, index=index)


def reward_env(fn: Callable[[Any, str, Mapping[str, Any]], float], train: Sequence[Mapping[str, Any]],
               test: Sequence[Mapping[str, Any]] = ()) -> RewardFunctionEnv:
    """A reward function and its rows as an environment (for a plugin's `load_environment`)."""
    return RewardFunctionEnv(fn, {"train": train, "test": test})


def describe(name: str) -> dict[str, Any]:
    """Where environment `name` comes from and what it is: package, version, one line of description."""
    ep = available_envs()[name]
    dist = getattr(ep, "dist", None)
    factory = load_factory(name, ep)
    module = inspect.getmodule(factory)
    doc = inspect.getdoc(factory) or (inspect.getdoc(module) if module else "") or ""
    return {
        "name": name,
        "package": dist.metadata["Name"] if dist else "?",
        "version": dist.version if dist else "?",
        "entry_point": ep.value,
        "description": doc.strip().splitlines()[0] if doc.strip() else "",
    }
