"""Built-in multi-agent environments: a cooperative one and a competitive one.

`propose_check` (cooperative): a proposer answers a small arithmetic question,
a checker sees the question and the proposal and answers with the number it
believes; if they differ, the proposer sees the checker's number and answers
once more. Both are paid 1 when they end agreeing on the right answer, else 0.

`nim` (competitive): two players take 1, 2 or 3 stones in turn from a pile of
`min_pile`..`max_pile`; whoever takes the last stone wins (1), the other loses
(0). A move that is not a number from 1 to 3 within the pile loses at once.

Both name their agents (`agents`), say who acts first (`first_agent`) and,
after every message, who acts next (`StepResult.next_agent`), what each agent
is paid (`StepResult.rewards`) and what each sees (`StepResult.observations`).
Prompts are raw text (the tiny MoE's `3+4=` style) or, with `chat=True`, chat
messages in words for pretrained chat models.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from rlhub.envs.base import StepResult, ended_turn

_INTEGER = re.compile(r"-?\d+")


def first_integer(text: str) -> int | None:
    """The first integer in `text`, or None.

    >>> first_integer(" 12 apples"), first_integer("none")
    (12, None)
    """
    m = _INTEGER.search(text)
    return int(m.group()) if m else None


@dataclass
class _Game:
    """What both games share: prompts as raw text or chat, and rows split once into train and test."""

    chat: bool = False
    """Ask in words through the chat template (pretrained chat models) instead of the tiny MoE's short raw text."""
    test_fraction: float = 0.2
    seed: int = 0
    rows: dict[str, list[dict[str, Any]]] = field(init=False)

    def _split(self, rows: list[dict[str, Any]]) -> None:
        random.Random(self.seed).shuffle(rows)
        n_test = max(1, int(len(rows) * self.test_fraction))
        self.rows = {"train": rows[n_test:], "test": rows[:n_test]}

    def dataset(self, split: str) -> Sequence[Mapping[str, Any]]:
        return self.rows[split]

    def _say(self, text: str) -> Any:
        return [{"role": "user", "content": text}] if self.chat else text


@dataclass
class ProposeCheckEnv(_Game):
    """The cooperative task (module docstring)."""

    max_operand: int = 9
    ops: str = "+"
    """+ or max: the question is a + b, or the larger of a and b."""
    agents: tuple[str, ...] = field(default=("proposer", "checker"), init=False)

    def __post_init__(self) -> None:
        if self.ops not in ("+", "max"):
            raise ValueError(f"env.kwargs.ops={self.ops!r}: use + or max")
        self._split([{"a": a, "b": b, "answer": a + b if self.ops == "+" else max(a, b)}
                     for a in range(self.max_operand + 1) for b in range(self.max_operand + 1)])

    def _task(self, row: Mapping[str, Any]) -> str:
        a, b = row["a"], row["b"]
        if self.chat:
            return f"What is {a} + {b}?" if self.ops == "+" else f"What is the larger of {a} and {b}?"
        return f"{a}+{b}=" if self.ops == "+" else f"max({a},{b})="

    def reset(self, row: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        task = self._task(row)
        if self.chat:
            prompts = {"proposer": self._say(f"{task} Reply with the number only."),
                       "checker": self._say(f"{task} Another assistant will propose an answer; reply with the right number.")}
        else:
            prompts = {"proposer": f"P:{task}", "checker": f"C:{task}"}
        return prompts, {"row": dict(row), "proposals": [], "check": None}

    def first_agent(self, state: Any) -> str:
        return "proposer"

    def step(self, state: dict[str, Any], message: Any) -> StepResult:
        agent = message.agent
        said = first_integer(message) if ended_turn(message) else None
        answer = state["row"]["answer"]
        if agent == "proposer" and state["check"] is None:  # the first proposal: the checker's turn
            state["proposals"].append(said)
            shown = "?" if said is None else str(said)
            return StepResult(0.0, done=False, next_agent="checker", rewards={},
                              observations={"checker": self._say(f"Proposed: {shown}. Your answer:" if self.chat else f"{shown}?")})
        if agent == "checker":
            state["check"] = said
            if said is not None and said == state["proposals"][-1]:
                return self._end(state, said == answer, "agreed_right" if said == answer else "agreed_wrong")
            shown = "?" if said is None else str(said)
            return StepResult(0.0, done=False, next_agent="proposer", rewards={},
                              observations={"proposer": self._say(f"The checker says {shown}. Your final answer:" if self.chat else f"{shown}!")})
        state["proposals"].append(said)  # the proposer's final answer
        agreed = said is not None and said == state["check"]
        how = "disagreed" if not agreed else "agreed_right" if said == answer else "agreed_wrong"
        return self._end(state, agreed and said == answer, how)

    def _end(self, state: dict[str, Any], agreed_and_right: bool, how: str) -> StepResult:
        """The end of a match; `info["outcome"]` (rollout/outcome/*) says how it ended."""
        pay = float(agreed_and_right)
        return StepResult(pay, done=True, success=agreed_and_right, rewards={a: pay for a in self.agents},
                          successes={a: agreed_and_right for a in self.agents}, info={"outcome": how})

    def format_examples(self, n: int, rng: random.Random) -> list[tuple[Any, str]]:
        """(prompt, answer) pairs of the right shape whose numbers are drawn at random, not computed, for a
        format warm start (both roles)."""
        out = []
        for i in range(n):
            row = rng.choice(self.rows["train"])
            prompts, _ = self.reset(row)
            role = self.agents[i % 2]
            out.append((prompts[role], str(rng.randint(0, 2 * self.max_operand))))
        return out


@dataclass
class NimEnv(_Game):
    """The competitive game (module docstring)."""

    min_pile: int = 4
    max_pile: int = 9
    test_fraction: float = 0.25
    agents: tuple[str, ...] = field(default=("first", "second"), init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.min_pile <= self.max_pile:
            raise ValueError("env.kwargs: 1 <= min_pile <= max_pile")
        # every pile several times over: rows differ by their index, the game by its pile
        self._split([{"pile": p, "copy": c} for p in range(self.min_pile, self.max_pile + 1) for c in range(8)])

    def reset(self, row: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        pile = row["pile"]
        if self.chat:
            rules = f"Nim: a pile of {pile} stones; players take 1, 2 or 3 in turn, and whoever takes the last stone wins."
            prompts = {"first": self._say(f"{rules} You move first. How many do you take? Reply with the number only."),
                       "second": self._say(f"{rules} You move second. Reply with the number only when it is your turn.")}
        else:
            prompts = {"first": f"N{pile}:", "second": f"M{pile}:"}
        return prompts, {"pile": pile, "moves": []}

    def first_agent(self, state: Any) -> str:
        return "first"

    def step(self, state: dict[str, Any], message: Any) -> StepResult:
        agent = message.agent
        other = self.agents[1 - self.agents.index(agent)]
        take = first_integer(message) if ended_turn(message) else None
        if take is None or not 1 <= take <= min(3, state["pile"]):
            return self._won(other, agent, "illegal_move")  # an illegal move loses
        state["pile"] -= take
        state["moves"].append((agent, take))
        if state["pile"] == 0:
            return self._won(agent, other, "took_last")
        seen = (f"Your opponent took {take}; {state['pile']} left. How many do you take?" if self.chat
                else f"{take}>{state['pile']}:")
        return StepResult(0.0, done=False, next_agent=other, rewards={}, observations={other: self._say(seen)})

    def _won(self, winner: str, loser: str, how: str) -> StepResult:
        """The end of a game; `info["outcome"]` (counted per step as rollout/outcome/*) says how it ended."""
        return StepResult(1.0, done=True, success=True, rewards={winner: 1.0, loser: 0.0}, successes={winner: True, loser: False},
                          info={"outcome": how})

    def format_examples(self, n: int, rng: random.Random) -> list[tuple[Any, str]]:
        """Opening moves of the right shape (a number from 1 to 3, at random), for a format warm start."""
        out = []
        for i in range(n):
            prompts, _ = self.reset(rng.choice(self.rows["train"]))
            out.append((prompts[self.agents[i % 2]], str(rng.randint(1, 3))))
        return out


def load_propose_check(**kwargs: Any) -> ProposeCheckEnv:
    """Cooperative multi-agent arithmetic: a proposer and a checker paid only when they agree on the right answer."""
    return ProposeCheckEnv(**kwargs)


def load_nim(**kwargs: Any) -> NimEnv:
    """Competitive multi-agent Nim: two players take 1-3 stones in turn; whoever takes the last stone wins."""
    return NimEnv(**kwargs)
