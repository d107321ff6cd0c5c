"""Whether an environment's prompts fit the model length, checked before a run starts.

A prompt longer than `rollout.max_model_len - rollout.max_new_tokens` tokens is dropped when its
group starts (`prompt_too_long`); if every prompt is, the run would wait for groups that never come.
`measure` renders the prompts of up to `SAMPLE_ROWS` rows spread over the train split, as the rollout
renders them (`env.reset` under its deadline, then the chat template), and counts their tokens;
`rlhub train` stops before Ray starts when fewer than `MIN_FIT_SHARE` of them fit, naming the lengths
and the setting to change, and says on the terminal what share will be dropped when some do not.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

SAMPLE_ROWS = 64
MIN_FIT_SHARE = 0.25
"""Below this share of sampled prompts fitting, a run stops at start: three in four groups dropped
before generating is a configuration mistake, not a property of the data."""


@dataclass
class PromptLengths:
    lengths: dict[int, int]
    """Prompt tokens by row index, for the rows whose reset and rendering worked."""
    room: int
    """The longest prompt that leaves room for a whole turn: max_model_len - max_new_tokens."""
    failed: dict[int, str] = field(default_factory=dict)
    """What went wrong, by row index, for rows whose reset or rendering failed."""

    @property
    def fits(self) -> int:
        return sum(n <= self.room for n in self.lengths.values())

    @property
    def share(self) -> float:
        return self.fits / len(self.lengths) if self.lengths else 0.0

    def summary(self) -> str:
        values = sorted(self.lengths.values())
        if not values:
            return "no prompt could be rendered"
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        return (f"{self.fits} of {len(values)} sampled prompts fit ({self.share:.0%}); prompts are {values[0]}-{values[-1]} tokens "
                f"(median {statistics.median(values):g}, 90th percentile {p90})")


def sample_indices(n: int, k: int = SAMPLE_ROWS) -> list[int]:
    """Up to `k` row indices spread evenly over `n` rows, first and last included."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def measure(env: Any, rows: Sequence[Any], tokenizer: Any, max_model_len: int, max_new_tokens: int, timeout_s: float,
            indices: Sequence[int] | None = None) -> PromptLengths:
    """The prompt lengths of `rows` at `indices` (default: `sample_indices`), rendered as the rollout does."""
    from rlhub.envs.registry import reset_at
    from rlhub.episodes import ChatFormat, EnvRunner, run_all

    indices = list(sample_indices(len(rows)) if indices is None else indices)
    chat = ChatFormat(tokenizer)
    runner = EnvRunner(timeout_s)
    try:
        calls = [runner.submit(reset_at(env.reset, i), rows[i], lane="reset") for i in indices]
        out = PromptLengths({}, max_model_len - max_new_tokens)
        for i, (value, error) in zip(indices, run_all(runner, calls)):
            try:
                if error is not None:
                    raise error
                out.lengths[i] = max(len(chat.prompt(o)[0]) for o in openings(env, value[0]))
            except Exception as e:  # noqa: BLE001 - a row that fails is reported with its error
                out.failed[i] = f"{type(e).__name__}: {e}"
        return out
    finally:
        runner.close()


def openings(env: Any, prompt: Any) -> list[Any]:
    """The prompts a reset gave: its one prompt, or a multi-agent environment's opening of each agent
    (a row's length is its longest)."""
    from rlhub.envs.base import is_multi_agent

    if is_multi_agent(env):
        if not isinstance(prompt, dict) or set(prompt) != set(env.agents):
            raise TypeError(f"reset() of a multi-agent environment returns {{agent: opening}} for agents {list(env.agents)}")
        return [prompt[a] for a in env.agents]
    return [prompt]


def model_positions(model_path: Any) -> int | None:
    """The model's own longest context (max_position_embeddings in its config.json), when it says."""
    import json
    from pathlib import Path

    try:
        return int(json.loads((Path(model_path) / "config.json").read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verdict(found: PromptLengths, max_new_tokens: int, max_model_len: int, positions: int | None) -> tuple[str | None, str | None]:
    """(error: the run cannot go on, warning: some prompts will be dropped), either None."""
    if not found.lengths:
        first = next(iter(found.failed.items()), None)
        return (f"the environment's reset failed on every one of the {len(found.failed)} sampled rows"
                + (f", e.g. row {first[0]}: {first[1]}" if first else "")), None
    values = sorted(found.lengths.values())
    need = values[min(len(values) - 1, int(0.9 * len(values)))] + max_new_tokens
    limit = f"; the model takes at most {positions} positions" if positions else ""
    advice = (f"set rollout.max_model_len={need} (the 90th percentile prompt plus rollout.max_new_tokens={max_new_tokens}){limit}"
              if positions is None or need <= positions else
              f"the 90th percentile prompt plus rollout.max_new_tokens={max_new_tokens} needs {need} positions{limit}: shorten the "
              "prompts (env.kwargs) or lower rollout.max_new_tokens")
    text = (f"rollout.max_model_len={max_model_len} leaves {found.room} prompt tokens after rollout.max_new_tokens={max_new_tokens}: "
            f"{found.summary()}")
    if found.share < MIN_FIT_SHARE:
        return f"{text}. Fewer than {MIN_FIT_SHARE:.0%} fit, so the run would drop most groups before generating; {advice}", None
    if found.fits < len(values):
        return None, f"{text}. About {1 - found.share:.0%} of the groups will be dropped as prompt_too_long; {advice}"
    return None, None
