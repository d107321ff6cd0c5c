"""Multi-agent episodes ("matches"): each agent's own episode over one shared environment state.

A `Match` holds one `Episode` per agent of a `MultiAgentEnv`: the agent's own
context (its opening from `reset`, then its turns and what it was shown), its
own loss mask (only its tokens carry loss) and its own rewards. Only the agent
whose turn it is waits for generation; the others are parked. After each step
(`rlhub.rollout.turns.Turns._advance_match`) the environment's `rewards` go to
each agent's last turn, its `observations` queue up for each agent, and the
next agent is shown everything queued for it before it generates: appended as
observation tokens after its last turn, or, before its first turn, rendered
into its opening (the opening's generation prompt must come last). A match
ends for every agent at once: done, a limit, or a failure (then every agent's
episode is dropped, counted once per agent). An agent that never acted has no
sample (`no_turn`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlhub.episodes import Episode


@dataclass
class Match:
    agents: tuple[str, ...]
    openings: dict[str, Any]
    """Each agent's opening as `reset` gave it, with what it was shown before its first turn."""
    episodes: dict[str, Episode] = field(default_factory=dict)
    pending: dict[str, list[Any]] = field(default_factory=dict)
    """Observations an agent has not been shown yet."""
    deferred: dict[str, float] = field(default_factory=dict)
    """Pay for an agent that had not acted yet when it came: put on its last turn when the match ends."""


def merged(items: list[Any]) -> Any:
    """Several observations as one: texts joined, chat messages (a text counts as a user message) in order.

    >>> merged(["a", "b"]), merged(["a", [{"role": "user", "content": "b"}]])
    ('ab', [{'role': 'user', 'content': 'a'}, {'role': 'user', 'content': 'b'}])
    """
    if all(isinstance(x, str) for x in items):
        return "".join(items)
    out: list[dict[str, Any]] = []
    for x in items:
        out += [{"role": "user", "content": x}] if isinstance(x, str) else list(x)
    return out


def extended(opening: Any, seen: Any) -> Any:
    """An opening with what the agent was shown before its first turn appended.

    >>> extended("P:3+4=", "7?"), extended([{"role": "user", "content": "hi"}], "x")[-1]
    ('P:3+4=7?', {'role': 'user', 'content': 'x'})
    """
    if isinstance(opening, str):
        if not isinstance(seen, str):
            raise TypeError("a raw-text opening takes text observations, not chat messages")
        return opening + seen
    if isinstance(opening, list):
        return opening + ([{"role": "user", "content": seen}] if isinstance(seen, str) else list(seen))
    if isinstance(opening, dict) and "messages" in opening:
        return {**opening, "messages": extended(list(opening["messages"]), seen)}
    raise TypeError(f"an agent's opening is text or chat messages, not {type(opening).__name__}")
