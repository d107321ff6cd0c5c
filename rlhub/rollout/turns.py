"""Turns and episodes: each waiting episode's next assistant turn generated, then handed to the environment.

An `OpenGroup` is a group whose `group_size` episodes still run. `Turns`
starts them from their dataset row (`env.reset`, rendered with the chat
template), generates one turn for every episode waiting for one (one engine
call per round; or, on a continuous engine, every waiting episode joins its
running batch and finished turns come back as they finish), and hands each
new turn to the environment off the engine's thread (`EnvRunner`). The
environment's answer ends the episode, cuts it at a limit, drops it (counted
and reported, never raised), or appends its observation for the next turn.

Each turn is generated with the episode's routing record so far: an engine
that can replays it over the positions earlier turns computed, so every
position keeps the route of the forward that sampled (or first computed) it,
and the learner replays each token with the routes that produced it.
"""

from __future__ import annotations

import concurrent.futures
import copy
import math
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Mapping

from rlhub.engines.base import RolloutEngine, SamplingConfig
from rlhub.envs.base import ModelMessage
from rlhub.episodes import BadReward, Call, ChatFormat, EnvRunner, EnvTimeout, Episode, checked_reward, run_all
from rlhub.rollout.records import FailureLog, WorkerStats
from rlhub.rollout.weights import VerifiedWeights
from rlhub.rollout_config import RolloutConfig


@dataclass
class OpenGroup:
    """A group whose episodes are still running."""

    group_id: int
    row_index: int
    episodes: list[Episode]
    started: float
    generate_seconds: float = 0.0
    plan: dict[str, Any] | None = None
    """What data.curation=difficulty planned for it (`rlhub.curation.DifficultySampler.plan`), or None."""

    @property
    def waiting(self) -> bool:
        """Some episode waits for its next turn to be generated."""
        return any(e.ended is None and not e.in_env and not e.parked for e in self.episodes)

    @property
    def complete(self) -> bool:
        return all(e.ended is not None for e in self.episodes)


@dataclass
class TurnBatch:
    """One generate call's episodes and their environment steps in flight."""

    episodes: list[Episode]
    calls: list[Call]

    def done(self) -> bool:
        return all(c.done() for c in self.calls)

    def wait(self, seconds: float) -> None:
        """Until every step has answered, or `seconds`."""
        concurrent.futures.wait([c.future for c in self.calls], timeout=seconds)


class Turns:
    """Episodes of one environment on one engine, a turn at a time."""

    def __init__(self, cfg: RolloutConfig, engine: RolloutEngine, weights: VerifiedWeights, env: Any, env_name: str,
                 tokenizer: Any, envs: EnvRunner, stats: WorkerStats, failures: FailureLog, continuous: bool,
                 snapshots: bool = False) -> None:
        """`snapshots`: every episode keeps a copy of its state before each turn, to be branched from (SPO)."""
        self.cfg, self.engine, self.weights, self.env, self.env_name = cfg, engine, weights, env, env_name
        self.tokenizer, self.chat, self.envs = tokenizer, ChatFormat(tokenizer), envs
        self.stats, self.failures, self.continuous = stats, failures, continuous
        self.snapshots = snapshots
        from rlhub.envs.base import is_multi_agent

        self.agents: tuple[str, ...] = tuple(env.agents) if is_multi_agent(env) else ()
        """A multi-agent environment's agents (`rlhub.rollout.matches`); () for one agent."""
        self.inflight = cfg.weight_update == "inflight"
        self.last_generate_s = 0.0

    # ---- starting episodes --------------------------------------------------------
    def start(self, rows: list[Any], group_ids: list[int], n: int | list[int], indices: list[int] | None = None) -> list[OpenGroup | str]:
        """Per row, an OpenGroup of `n` episodes (or `n[i]` for row i) ready for their first turn, or why it
        could not start. `indices`: each row's position in its split, passed as `reset(row, index=i)` to a
        reset that takes it."""
        from rlhub.envs.registry import reset_at

        sizes = n if isinstance(n, list) else [n] * len(rows)

        calls = [self.envs.submit(reset_at(self.env.reset, i), row, lane="reset")
                 for row, i in zip(rows, indices if indices is not None else [None] * len(rows))]
        out: list[OpenGroup | str] = []
        for gid, row, n, (value, error) in zip(group_ids, rows, sizes, run_all(self.envs, calls)):
            try:
                if error is not None:
                    raise error
                prompt, state = value
                if self.agents:  # a multi-agent environment: each episode is a match of one episode per agent
                    out.append(self._start_matches(gid, row, prompt, state, n))
                    continue
                ids, history = self.chat.prompt(prompt)
            except Exception as e:  # a broken row or environment loses this group only
                self.failures.record(self.env_name, "reset", row, e)
                out.append("env_timeout" if isinstance(e, EnvTimeout) else "env_error")
                continue
            if len(ids) + self.cfg.max_new_tokens > self.cfg.max_model_len:
                out.append("prompt_too_long")
                continue
            episodes = [Episode(gid, -1, _own_copy(state) if k else state, ids, None if history is None else list(history), row=row)
                        for k in range(n)]
            if self.snapshots:  # before any step: the first episode holds the very state reset returned
                for e in episodes:
                    e.snapshots = []
                    self._snapshot(e)
            out.append(OpenGroup(gid, -1, episodes, time.perf_counter()))
        return out

    def _start_matches(self, gid: int, row: Any, openings: Any, state: Any, n: int) -> OpenGroup | str:
        """`n` matches of a row (an OpenGroup of n x agents episodes, the first agent's turn first), or
        why they could not start. ValueError names an opening or a first agent the environment got wrong."""
        from rlhub.rollout.matches import Match

        if not isinstance(openings, Mapping) or set(openings) != set(self.agents):
            raise ValueError(f"reset() of a multi-agent environment returns {{agent: opening}} for agents {list(self.agents)}, "
                             f"got {sorted(openings) if isinstance(openings, Mapping) else type(openings).__name__}")
        rendered = {a: self.chat.prompt(openings[a]) for a in self.agents}
        if any(len(ids) + self.cfg.max_new_tokens > self.cfg.max_model_len for ids, _ in rendered.values()):
            return "prompt_too_long"
        episodes = []
        for k in range(n):
            own = _own_copy(state) if k else state
            first = self.env.first_agent(own) if callable(getattr(self.env, "first_agent", None)) else self.agents[0]
            if first not in self.agents:
                raise ValueError(f"first_agent() returned {first!r}, not one of {list(self.agents)}")
            match = Match(self.agents, dict(openings), pending={a: [] for a in self.agents})
            for a in self.agents:
                ids, history = rendered[a]
                e = Episode(gid, -1, own, list(ids), None if history is None else list(history), row=row, agent=a, match=match,
                            parked=a != first)
                match.episodes[a] = e
                episodes.append(e)
        return OpenGroup(gid, -1, episodes, time.perf_counter())

    def _snapshot(self, e: Episode) -> None:
        """Keep where `e` stands before its next turn; a state that cannot be copied keeps none (a branch
        would share it with the episode), so no branch starts after that point."""
        from rlhub.episodes import Snapshot

        state = _own_copy(e.state)
        if state is e.state and e.snapshots:  # turn 0's state is the reset's own (never stepped yet): later ones must be copies
            return
        e.snapshots.append(Snapshot(len(e.ids), state, None if e.history is None else copy.deepcopy(e.history),
                                    list(e.turn_rewards), e.turns))

    def budget(self, e: Episode, extra: int = 0) -> int:
        """Tokens the episode's next turn may generate (after `extra` more context tokens): the per-turn
        limit (less the turn's opening a branch inherited), the episode's and the context's."""
        left = min(self.cfg.max_new_tokens - e.partial, self.cfg.max_model_len - len(e.context) - extra)
        if self.cfg.max_episode_tokens:
            left = min(left, self.cfg.max_episode_tokens - e.generated)
        return left

    # ---- generating --------------------------------------------------------------
    def generate(self, groups: dict[int, OpenGroup], sampling: SamplingConfig, queue: deque[TurnBatch]) -> bool:
        """One generate call for every episode of `groups` waiting for a turn (first turns and later ones
        interleaved); their environment steps go to the runner and the batch to `queue`. False when
        none was waiting."""
        episodes = [e for g in groups.values() for e in g.episodes if e.ended is None and not e.in_env and not e.parked]
        if not episodes:
            return False
        self.weights.sync()
        start = time.perf_counter()
        completions = self.engine.generate([e.context for e in episodes], sampling, self.weights.inflight_source(self.inflight),
                                           [self.budget(e) for e in episodes], [e.routes for e in episodes])
        elapsed = self.last_generate_s = time.perf_counter() - start
        for gid in {e.group_id for e in episodes}:
            groups[gid].generate_seconds += elapsed * sum(e.group_id == gid for e in episodes) / len(episodes)
        queue.append(self._to_env(episodes, completions, elapsed))
        return True

    def stream(self, groups: dict[int, OpenGroup], sampling: SamplingConfig, queue: deque[TurnBatch]) -> bool:
        """Continuous batching: every episode of `groups` waiting for a turn joins the engine's running
        batch, the engine runs until some finish, and those turns go to the environment. New weights
        are taken first (in flight for the episodes already running). False when nothing is generating."""
        for g in groups.values():
            for e in g.episodes:
                if e.ended is None and not e.in_env and not e.in_engine and not e.parked:
                    self.engine.submit(e, e.context, sampling, self.budget(e), e.routes)
                    e.in_engine = True
        running = Counter(e.group_id for g in groups.values() for e in g.episodes if e.in_engine)
        if not running:
            return False
        self.weights.sync()
        start = time.perf_counter()
        finished = self.engine.poll()
        elapsed = self.last_generate_s = time.perf_counter() - start
        total = sum(running.values())
        for gid, n in running.items():  # the poll's time, shared by the episodes it ran
            groups[gid].generate_seconds += elapsed * n / total
        episodes = [e for e, _ in finished]
        for e in episodes:
            e.in_engine = False
        queue.append(self._to_env(episodes, [c for _, c in finished], elapsed))
        return True

    def _to_env(self, episodes: list[Episode], completions: list, elapsed: float) -> TurnBatch:
        """Each episode's new turn goes to the environment."""
        self.stats.generate_seconds += elapsed
        self.stats.generated_tokens += sum(len(c.token_ids) for c in completions)
        calls = []
        for e, c in zip(episodes, completions):
            e.add_turn(c)
            e.in_env = True
            text = self.tokenizer.decode(e.last_turn, skip_special_tokens=True)
            if e.history is not None:
                e.history.append({"role": "assistant", "content": text})
            calls.append(self.envs.submit(self.env.step, e.state, ModelMessage(text, c.finish_reason, e.last_turn, self.chat.tool_format,
                                                                           e.agent)))
        return TurnBatch(episodes, calls)

    # ---- the environment's answers -------------------------------------------------
    def answer(self, batch: TurnBatch) -> None:
        """The environment's answers to one generate call: each episode ends or gets its next observation."""
        start = time.perf_counter()
        for e, (result, error) in zip(batch.episodes, run_all(self.envs, batch.calls)):
            e.in_env = False
            self._advance(e, result, error)
        self.stats.score_seconds += time.perf_counter() - start

    def _advance(self, e: Episode, result: Any, error: BaseException | None) -> None:
        """Apply one step's answer to its episode: dropped (counted, reported), ended, or given its observation."""
        if e.match is not None:
            return self._advance_match(e, result, error)
        if error is None:
            try:
                reward = checked_reward(result)
            except BadReward as bad:
                error = bad
        if error is not None:
            reason = "env_timeout" if isinstance(error, EnvTimeout) else "bad_reward" if isinstance(error, BadReward) else "env_error"
            self.failures.record(self.env_name, "step", e.row, error)
            e.ended, e.dropped = reason, True
            return
        e.result = result
        self._count_outcome(result)
        if not math.isfinite(reward):
            e.ended, e.dropped = "nonfinite_reward", True
            self.failures.record(self.env_name, "step", e.row, ValueError(f"non-finite reward {result.reward!r}"))
            return
        e.turn_rewards.append((e.turn_end, reward))  # any turn may pay; the episode's return is the sum
        if result.done:
            e.ended = "done"
            return
        if self.cfg.max_turns and e.turns >= self.cfg.max_turns:
            return self._cut(e, "max_turns")
        try:
            ids, new = self.chat.observation(e.history, result.observation if result.observation is not None else "", e.finish_reason == "stop")
        except Exception as bad:  # noqa: BLE001 - a malformed observation loses this sample only
            self.failures.record(self.env_name, "observation", e.row, bad)
            e.ended, e.dropped = "env_error", True
            return
        if self.budget(e, extra=len(ids)) < 1:  # no room for another turn after it: the episode ends before it
            return self._cut(e, "max_tokens")
        e.add_observation(ids)
        if e.history is not None:
            e.history += new
        if e.snapshots is not None:
            self._snapshot(e)

    def _advance_match(self, e: Episode, result: Any, error: BaseException | None) -> None:
        """Apply one step of a multi-agent environment to the match of `e` (the agent that spoke): pay
        each agent, queue what each sees, and give the next agent its turn, shown what was queued for it;
        or end the match for every agent (done, a limit, a failure)."""
        m = e.match
        if error is None:
            try:
                checked_reward(result)
                pay = {a: float(r) for a, r in (result.rewards or {}).items()}
                unknown = sorted((set(pay) | set(result.observations or {})) - set(m.agents))
                if unknown or not all(math.isfinite(r) for r in pay.values()):
                    raise BadReward(f"step() paid or showed agents {unknown or sorted(pay)} with rewards {pay}; agents are {list(m.agents)}")
                if not result.done and result.next_agent not in m.agents:
                    raise ValueError(f"step() must name next_agent (one of {list(m.agents)}) while not done, got {result.next_agent!r}")
            except (BadReward, ValueError, TypeError) as bad:
                error = bad
        if error is not None:
            reason = "env_timeout" if isinstance(error, EnvTimeout) else "bad_reward" if isinstance(error, BadReward) else "env_error"
            self.failures.record(self.env_name, "step", e.row, error)
            return self._end_match(m, reason, dropped=True)
        e.result = result
        self._count_outcome(result)
        for a, r in pay.items():
            agent = m.episodes[a]
            if agent.turn_end >= 0:
                agent.turn_rewards.append((agent.turn_end, r))
            else:
                m.deferred[a] = m.deferred.get(a, 0.0) + r
        for a, seen in (result.observations or {}).items():
            m.pending[a].append(seen)
        if result.done:
            return self._end_match(m, "done", successes=result.successes or {})
        n = m.episodes[result.next_agent]
        if self.cfg.max_turns and n.turns >= self.cfg.max_turns:
            return self._end_match(m, "max_turns", truncated=True)
        if m.pending[n.agent]:
            from rlhub.rollout.matches import extended, merged

            seen, m.pending[n.agent] = merged(m.pending[n.agent]), []
            try:
                if n.turns == 0:  # before its first turn, what it was shown becomes part of its opening
                    m.openings[n.agent] = extended(m.openings[n.agent], seen)
                    n.prompt_ids, n.history = self.chat.prompt(m.openings[n.agent])
                    extra = 0
                else:
                    ids, new = self.chat.observation(n.history, seen, n.finish_reason == "stop")
                    extra = len(ids)
            except Exception as bad:  # noqa: BLE001 - a malformed observation loses this match only
                self.failures.record(self.env_name, "observation", e.row, bad)
                return self._end_match(m, "env_error", dropped=True)
            if self.budget(n, extra=extra) < 1:
                return self._end_match(m, "max_tokens", truncated=True)
            if n.turns:
                n.add_observation(ids)
                if n.history is not None:
                    n.history += new
        for a, agent in m.episodes.items():
            agent.parked = a != n.agent

    def _end_match(self, m: Any, why: str, dropped: bool = False, truncated: bool = False,
                   successes: Mapping[str, bool] | None = None) -> None:
        """Every agent's episode of the match ends with `why`; an agent that never acted has no sample."""
        from rlhub.envs.base import StepResult

        if truncated:
            self.stats.truncated[why] = self.stats.truncated.get(why, 0) + 1
        for a, agent in m.episodes.items():
            agent.parked = False
            if agent.ended is not None:
                continue
            if a in m.deferred and agent.turn_end >= 0:
                agent.turn_rewards.append((agent.turn_end, m.deferred.pop(a)))
            agent.ended, agent.dropped = why, dropped
            if not dropped and agent.turns == 0:
                agent.ended, agent.dropped = "no_turn", True
            elif not dropped:  # the agent's own view of the outcome: its return and its success
                agent.result = StepResult(agent.total_reward, done=True, success=(successes or {}).get(a))

    def _count_outcome(self, result: Any) -> None:
        """The environment's own outcome label (`info["outcome"]`, e.g. the sandbox's), counted per step."""
        info = getattr(result, "info", None)
        outcome = info.get("outcome") if isinstance(info, Mapping) else None
        if isinstance(outcome, str):
            self.stats.outcomes[outcome] = self.stats.outcomes.get(outcome, 0) + 1

    def _cut(self, e: Episode, why: str) -> None:
        """An episode over a limit ends with the rewards of the turns it took (the environment's rewards for an unfinished episode)."""
        e.ended = why
        self.stats.truncated[why] = self.stats.truncated.get(why, 0) + 1


def _own_copy(state: Any) -> Any:
    """Each episode of a group gets its own copy of the reset state (a multi-turn environment may
    change it); a state that cannot be copied is shared."""
    try:
        return copy.deepcopy(state)
    except Exception:  # noqa: BLE001 - locks, handles, sockets
        return state


def episode_routes(e: Episode) -> Any:
    """The episode's routes for its routed positions (prompt + everything after it, less the last
    token): an observation appended after the last turn was never routed by the engine, so its
    positions are -1 (the learner routes them freshly). None where the engine records no routing."""
    import torch

    n = len(e.prompt_ids) + len(e.ids) - 1
    routes = e.routes
    if routes is None or routes.shape[0] > n:
        return None
    if routes.shape[0] < n:
        routes = torch.cat([routes, routes.new_full((n - routes.shape[0], *routes.shape[1:]), -1)])
    return routes

