"""The environment seam: reset from a dataset row, step on a model message, reward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable


@dataclass
class StepResult:
    """What an environment answers to one model message."""

    reward: float
    done: bool = True
    success: bool | None = None
    """Exact task success where the task has one (logged beside the reward)."""
    observation: str | None = None
    """The next user message in a multi-turn episode (unused when done)."""
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Env(Protocol):
    """One task. Stateless between episodes: `reset` returns the episode state."""

    def dataset(self, split: str) -> Sequence[Mapping[str, Any]]:
        """The rows of `split` ("train" or "test"), each enough to start an episode."""
        ...

    def reset(self, row: Mapping[str, Any]) -> tuple[str, Any]:
        """(prompt text, episode state) for a dataset row."""
        ...

    def step(self, state: Any, message: str) -> StepResult:
        """Score the model's message. Single-turn environments answer done=True."""
        ...
