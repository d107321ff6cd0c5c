"""The environment seam: reset from a dataset row, step on a model message, reward."""

from __future__ import annotations

import threading
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
    # ---- a multi-agent environment's answer (`MultiAgentEnv`) ----
    next_agent: str | None = None
    """Who acts next (required while not done)."""
    rewards: dict[str, float] | None = None
    """What this step pays each agent (absent agents: 0); `reward` is then only logged."""
    observations: dict[str, Any] | None = None
    """What each agent sees before its next turn (text, or chat messages): the other agents' messages
    reach an agent only this way."""
    successes: dict[str, bool] | None = None
    """Each agent's task success, where the task has one (read when done)."""


class ModelMessage(str):
    """The model's message as `step` receives it: the completion's text (special tokens removed),
    carrying how generation ended.

    A `str`, so an environment that compares text keeps working unchanged; one
    that must know whether the model finished its turn reads `finish_reason`.

    >>> m = ModelMessage("7", finish_reason="length", token_ids=(55, 55))
    >>> m == "7", m.finished, m.token_ids
    (True, False, (55, 55))
    """

    finish_reason: str
    """stop: the model sampled a stop token (end of turn); length: generation was cut at the token budget."""
    token_ids: tuple[int, ...]
    tool_format: str
    """The tool-call format of the model's family (`rlhub.envs.tools.FORMATS`, from its chat template):
    the format its tool instructions asked for, and the one to parse its calls with."""
    agent: str
    """Who spoke, in a multi-agent environment (`MultiAgentEnv.agents`); "" otherwise."""

    def __new__(cls, text: str, finish_reason: str = "stop", token_ids: tuple[int, ...] = (),
                tool_format: str = "hermes", agent: str = "") -> "ModelMessage":
        if finish_reason not in ("stop", "length"):
            raise ValueError(f"finish_reason must be stop or length, not {finish_reason!r}")
        message = super().__new__(cls, text)
        message.finish_reason = finish_reason
        message.token_ids = tuple(token_ids)
        message.tool_format = tool_format
        message.agent = agent
        return message

    @property
    def finished(self) -> bool:
        """True when the model ended its turn itself (a stop token), False when it was cut off."""
        return self.finish_reason == "stop"


PARSE_LOCK = threading.Lock()
"""Held around the built-in environments' expression parsing (`ast.parse`, math-verify's sympy). CPython
3.11 keeps the AST validator's recursion depth per interpreter, not per thread, so two threads compiling
at once can fail with "SystemError: AST constructor recursion depth mismatch"; environments score from
`env.workers` threads, and parsing a short answer takes microseconds."""


def ended_turn(message: str) -> bool:
    """Whether the model ended its turn: a plain `str` (no generation record) counts as a whole message."""
    return getattr(message, "finish_reason", "stop") == "stop"


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
        """Score the model's message (a `ModelMessage`: text plus finish_reason). Single-turn environments answer done=True."""
        ...


@runtime_checkable
class MultiAgentEnv(Protocol):
    """An episode in which several agents act in turn over one shared state.

    `agents` names the roles. `reset(row)` gives each agent its own opening (text or chat messages:
    its role and what it knows) and the shared state; `first_agent(state)` says who acts first.
    Only the agent whose turn it is generates; `step(state, message)` (`message.agent` says who spoke)
    answers a `StepResult` with what this step pays each agent (`rewards`), what each agent sees
    before its next turn (`observations`: the other agents' words reach it only this way), and who
    acts next (`next_agent`), until `done`. Each agent's tokens carry its own loss and its own
    rewards: it is trained on what it said, never on what the others said.
    """

    agents: Sequence[str]

    def dataset(self, split: str) -> Sequence[Mapping[str, Any]]: ...

    def reset(self, row: Mapping[str, Any]) -> tuple[Mapping[str, Any], Any]: ...

    def first_agent(self, state: Any) -> str: ...

    def step(self, state: Any, message: "ModelMessage") -> StepResult: ...


def is_multi_agent(env: Any) -> bool:
    """Whether `env` names agents (a `MultiAgentEnv`)."""
    agents = getattr(env, "agents", None)
    return isinstance(agents, (list, tuple)) and len(agents) > 0
