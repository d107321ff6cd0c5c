"""A rollout worker: admitted prompts in, scored groups with advantages out.

The plain class behind each `RolloutActor`. One iteration: ask the store for
admission, pick up the newest weights (verified against the learner's probe),
generate `group_size` completions per prompt, score them in the environment,
hand the finished groups to the data-side scorers (critic values, reference
log-probs) if the algorithm has any, compute advantages now that each group is
complete, and put the groups in the store. Failures are dropped and counted,
never raised into the run.
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging
import math
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from rlhub.algorithms.data_side import DataSide, advantages, drop_reason, overlong_penalty
from rlhub.datastore import prompt_index
from rlhub.engines.base import RolloutEngine, SamplingConfig
from rlhub.envs.base import ModelMessage
from rlhub.episodes import BadReward, Call, ChatFormat, EnvRunner, EnvTimeout, Episode, checked_reward, run_all
from rlhub.rollout_config import RolloutConfig
from rlhub.scorers import Scorer
from rlhub.types import GroupMeta, GroupTensors, Sample, collate
from rlhub.weight_sync import Published, WeightSync, probe_error

log = logging.getLogger("rlhub.rollout")


@dataclass
class OpenGroup:
    """A group whose episodes are still running."""

    group_id: int
    row_index: int
    episodes: list[Episode]
    started: float
    generate_seconds: float = 0.0

    @property
    def waiting(self) -> bool:
        """Some episode waits for its next turn to be generated."""
        return any(e.ended is None and not e.in_env for e in self.episodes)

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


@dataclass
class WorkerStats:
    groups: int = 0
    samples: int = 0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    idle_seconds: float = 0.0
    syncs: int = 0
    sync_seconds: float = 0.0
    last_sync_seconds: float = 0.0
    last_probe_error: float = 0.0
    sync_rebuilds: int = 0
    sync_failures: int = 0
    score_seconds: float = 0.0
    dropped: dict[str, int] = field(default_factory=dict)
    env_errors: dict[str, int] = field(default_factory=dict)
    """Environment exceptions by type (reset or step)."""
    judged: int = 0
    """Samples scored by the model judge."""
    truncated: dict[str, int] = field(default_factory=dict)
    """Episodes ended at a limit (max_turns, max_tokens), kept with their last step's reward."""
    failure_reports: list[dict[str, Any]] = field(default_factory=list)
    """The first occurrences of each (environment, exception type): row and traceback, for the run's log."""


class SyncError(RuntimeError):
    """An engine's weights still differ from the learner's after a rebuild: it must not sample."""


class FailureLog:
    """Keeps the first `first` failures per key in full, and counts all of them."""

    def __init__(self, counts: dict[str, int], reports: list[dict[str, Any]], first: int = 3) -> None:
        self.counts, self.reports, self.first = counts, reports, first

    def record(self, env: str, where: str, row: Any, error: BaseException) -> None:
        kind = type(error).__name__
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.counts[kind] <= self.first:
            self.reports.append({
                "env": env, "where": where, "error": kind, "occurrence": self.counts[kind],
                "row": repr(row)[:500], "traceback": "".join(traceback.format_exception(error))[-3000:],
            })


class DataStoreClient:
    """What a worker needs from the store (an in-memory one in unit tests, Ray in runs)."""

    def admit(self, actor_id: int, n: int, wait_s: float = 0.0) -> list[int] | None: ...
    def put_many(self, groups: list[tuple[GroupMeta, GroupTensors]]) -> None: ...
    def drop(self, group_id: int, reason: str, samples: int, row: int | None = None) -> None: ...


class RolloutWorker:
    def __init__(
        self,
        actor_id: int,
        cfg: RolloutConfig,
        group_size: int,
        prompts_per_step: int,
        engine: RolloutEngine,
        env: Any,
        tokenizer: Any,
        store: DataStoreClient,
        weight_sync: WeightSync,
        data_side: DataSide,
        probe_ids: list[int],
        seed: int = 0,
        scorers: Sequence[Scorer] = (),
        env_name: str | None = None,
        env_timeout_s: float = 60.0,
        env_workers: int = 4,
        judge: Any = None,
        judge_cfg: Any = None,
        max_groups: int = 0,
    ) -> None:
        """`max_groups`: the groups admission lets this actor hold at once, all generating together
        in a continuous engine (0: twice `prompts_per_batch`)."""
        self.actor_id = actor_id
        self.cfg = cfg
        self.group_size = group_size
        self.batch_prompts = cfg.prompts_per_batch or max(1, prompts_per_step // cfg.num_actors)
        self.engine = engine
        self.continuous = cfg.continuous and hasattr(engine, "submit")
        self.max_groups = max_groups or 2 * self.batch_prompts
        self.env = env
        self.rows: Sequence[Any] = env.dataset("train")
        self.tokenizer = tokenizer
        self.store = store
        self.weight_sync = weight_sync
        self.data_side = data_side
        self.scorers = list(scorers)
        self.probe_ids = probe_ids
        self.seed = seed
        self.stats = WorkerStats()
        self.env_name = env_name or type(env).__name__
        self.failures = FailureLog(self.stats.env_errors, self.stats.failure_reports)
        self.chat = ChatFormat(tokenizer)
        self.envs = EnvRunner(env_timeout_s, env_workers)
        self.open: dict[int, OpenGroup] = {}  # by group id, in admission order
        self.in_env: deque[TurnBatch] = deque()
        self.last_generate_s = 0.0
        self.judge, self.judge_cfg = judge, judge_cfg  # a judge client (rlhub.judge) and its JudgeConfig, or None
        self.judging: list[tuple[list[OpenGroup], Any]] = []  # complete groups waiting for their judge scores
        self._holding = False
        self.eval_requests: list[tuple[int, int, int]] = []  # (step, rows, k), from the actor's other thread
        self.eval_results: list[dict[str, float]] = []
        eos = tokenizer.eos_token_id
        self.sampling = SamplingConfig(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            stop_token_ids=(eos,) if eos is not None else (),
        )

    # ---- the loop ---------------------------------------------------------
    def run(self) -> WorkerStats:
        try:  # at the stop, open groups are left: the store closes them out as dropped at the run's end
            while self.step(drain=False):
                pass
        finally:
            self.envs.close()
        return self.stats

    def step(self, drain: bool = True) -> bool:
        """One round: admit prompts, generate one turn for every episode waiting for one, hand those
        turns to the environment. False once the run is stopping.

        With `drain` the round also waits for the environment and puts the groups it finished
        (what tests and benchmarks call). Without, as the actor's loop runs it, environment work
        overlaps the next round's generation: finished work is collected first, the round waits
        for the environment only when it has nothing to generate, and at most twice a batch of
        groups is open at once."""
        if self.in_env:  # a quick environment is waited for: its groups go to the store before the next generation
            self.in_env[0].wait(0.25 * self.last_generate_s)
        while self.in_env and self.in_env[0].done():
            self._collect(self.in_env.popleft())
        self._judged(wait=False)
        if self.eval_requests:
            self._evaluate(*self.eval_requests.pop(0))
        waiting = sum(1 for g in self.open.values() if g.waiting)
        busy = len(self.open) + sum(len(groups) for groups, _ in self.judging)
        room = self.max_groups - busy if self.continuous else min(self.batch_prompts - waiting, 2 * self.batch_prompts - busy)
        if room > 0:
            start = time.perf_counter()
            group_ids = self.store.admit(self.actor_id, room, 0.0 if busy else self.cfg.admission_wait_s)
            self.stats.idle_seconds += time.perf_counter() - start
            if group_ids is None:
                return False
            self.start_groups(group_ids)
        generated = self._generate_turn()
        if self.in_env and (drain or not generated):
            self._collect(self.in_env.popleft())
        elif not generated and self.judging:  # nothing to generate: wait for the judge instead of spinning
            self._judged(wait=True)
        while drain and (self.in_env or any(g.waiting for g in self.open.values())):
            self._generate_turn()
            self._collect(self.in_env.popleft())
        if drain:
            self._judged(wait=True)
        return True

    def _evaluate(self, step: int, rows: int, k: int) -> None:
        """An evaluation (rlhub.evaluation) with the newest weights, held for its whole length; the
        starting policy's (step 0, eval.before) with the weights the engine started with."""
        from rlhub.evaluation import eval_rows, evaluate

        start = time.perf_counter()
        if step > 0:
            self.sync_weights()
        self._holding = True
        kept = (self.stats.generated_tokens, self.stats.generate_seconds, dict(self.stats.truncated), self.failures)
        self.failures = FailureLog({}, [])  # the environment's failures on eval rows are eval/failed, not the run's counters
        try:
            result = evaluate(self, eval_rows(self.env, rows), k)
        finally:  # the training throughput, truncation and failure counters leave evaluation out
            self._holding = False
            self.stats.generated_tokens, self.stats.generate_seconds, self.stats.truncated, self.failures = kept
        result.update({"eval/step": float(step), "eval/seconds": time.perf_counter() - start})
        self.eval_results.append(result)

    def drain(self) -> None:
        """Finish every open episode (the run is stopping: what is done is still handed over)."""
        while self.in_env or any(g.waiting for g in self.open.values()):
            self._generate_turn()
            if self.in_env:
                self._collect(self.in_env.popleft())
        self._judged(wait=True)

    # ---- weights ------------------------------------------------------------
    def sync_weights(self) -> None:
        if self._holding:  # an evaluation runs with one version throughout
            return
        # until its first load an engine holds the weights it was built from, whatever its version
        # says: the first published version (0: the policy after the warm start) is always loaded
        published = self.weight_sync.pull(self.engine.version if self.stats.syncs else -1)
        if published is not None:
            self._load(published)

    def _load(self, published: Published) -> None:
        start = time.perf_counter()
        self.engine.load_weights(published.state, published.version)
        err = probe_error(self.engine.prompt_logprobs(self.probe_ids), published.probe_logprobs)
        if not err <= self.cfg.probe_tolerance:  # also catches NaN
            log.warning("actor %d: probe error %.3g after loading version %d exceeds %.3g; rebuilding the engine",
                        self.actor_id, err, published.version, self.cfg.probe_tolerance)
            self.stats.sync_rebuilds += 1
            self.engine.rebuild(published.state, published.version)
            err = probe_error(self.engine.prompt_logprobs(self.probe_ids), published.probe_logprobs)
            if not err <= self.cfg.probe_tolerance:
                self.stats.sync_failures += 1
                raise SyncError(f"actor {self.actor_id}: probe error {err:.3g} persists after a rebuild at version "
                                f"{published.version} (tolerance {self.cfg.probe_tolerance:.3g}); not sampling with unverified weights")
        elapsed = time.perf_counter() - start
        self.stats.syncs += 1
        self.stats.sync_seconds += elapsed
        self.stats.last_sync_seconds = elapsed
        self.stats.last_probe_error = err

    def _inflight_source(self):
        """Between decode steps: load newer weights, verified like any other load (hf engine)."""

        def poll() -> bool:
            published = self.weight_sync.pull(self.engine.version)
            if published is None:
                return False
            self._load(published)
            return True

        return poll if self.cfg.weight_update == "inflight" and not self._holding else None

    # ---- episodes -------------------------------------------------------------
    def generate_groups(self, group_ids: list[int]) -> None:
        """Run these groups' episodes to the end and put the finished groups (tests, benchmarks)."""
        self.start_groups(group_ids)
        self.drain()

    def start_groups(self, group_ids: list[int]) -> None:
        """Each group's `group_size` episodes from its row, ready for their first turn; a group whose
        reset fails or whose prompt is too long is dropped and counted."""
        rows = [prompt_index(gid, len(self.rows), self.seed) for gid in group_ids]
        for gid, row_idx, started in zip(group_ids, rows, self._reset([self.rows[r] for r in rows], group_ids, self.group_size)):
            if isinstance(started, str):
                self._drop(gid, row_idx, started, self.group_size)
            else:
                started.row_index = row_idx
                for e in started.episodes:
                    e.row_index = row_idx
                self.open[gid] = started

    def _reset(self, rows: list[Any], group_ids: list[int], n: int) -> list["OpenGroup | str"]:
        """Per row, an OpenGroup of `n` episodes ready for their first turn, or why it could not start."""
        calls = [self.envs.submit(self.env.reset, row, lane="reset") for row in rows]
        out: list[OpenGroup | str] = []
        for gid, row, (value, error) in zip(group_ids, rows, run_all(self.envs, calls)):
            try:
                if error is not None:
                    raise error
                prompt, state = value
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
            out.append(OpenGroup(gid, -1, episodes, time.perf_counter()))
        return out

    def _budget(self, e: Episode, extra: int = 0) -> int:
        """Tokens the episode's next turn may generate (after `extra` more context tokens): the per-turn
        limit, the episode's and the context's."""
        left = min(self.cfg.max_new_tokens, self.cfg.max_model_len - len(e.context) - extra)
        if self.cfg.max_episode_tokens:
            left = min(left, self.cfg.max_episode_tokens - e.generated)
        return left

    def _generate_turn(self, groups: dict[int, "OpenGroup"] | None = None, sampling: SamplingConfig | None = None,
                       queue: deque | None = None) -> bool:
        """One generate call for every episode of `groups` (the training groups) waiting for a turn
        (first turns and later ones interleaved); their environment steps go to the runner and the
        batch to `queue`. False when none was waiting."""
        if groups is None and self.continuous:
            return self._stream_turns()
        groups = self.open if groups is None else groups
        episodes = [e for g in groups.values() for e in g.episodes if e.ended is None and not e.in_env]
        if not episodes:
            return False
        self.sync_weights()
        start = time.perf_counter()
        completions = self.engine.generate([e.context for e in episodes], sampling or self.sampling, self._inflight_source(),
                                           [self._budget(e) for e in episodes])
        elapsed = self.last_generate_s = time.perf_counter() - start
        for gid in {e.group_id for e in episodes}:
            groups[gid].generate_seconds += elapsed * sum(e.group_id == gid for e in episodes) / len(episodes)
        self._to_env(episodes, completions, elapsed, queue)
        return True

    def _stream_turns(self) -> bool:
        """Continuous batching: every training episode waiting for a turn joins the engine's running
        batch, the engine runs until some finish, and those turns go to the environment. New weights
        are taken first (in flight for the episodes already running). False when nothing is generating."""
        for g in self.open.values():
            for e in g.episodes:
                if e.ended is None and not e.in_env and not e.in_engine:
                    self.engine.submit(e, e.context, self.sampling, self._budget(e))
                    e.in_engine = True
        running = Counter(e.group_id for g in self.open.values() for e in g.episodes if e.in_engine)
        if not running:
            return False
        self.sync_weights()
        start = time.perf_counter()
        finished = self.engine.poll()
        elapsed = self.last_generate_s = time.perf_counter() - start
        total = sum(running.values())
        for gid, n in running.items():  # the poll's time, shared by the episodes it ran
            self.open[gid].generate_seconds += elapsed * n / total
        episodes = [e for e, _ in finished]
        for e in episodes:
            e.in_engine = False
        self._to_env(episodes, [c for _, c in finished], elapsed, None)
        return True

    def _to_env(self, episodes: list[Episode], completions: list, elapsed: float, queue: deque | None) -> None:
        """Each episode's new turn goes to the environment; the batch of steps to `queue` (the run's by default)."""
        self.stats.generate_seconds += elapsed
        self.stats.generated_tokens += sum(len(c.token_ids) for c in completions)
        calls = []
        for e, c in zip(episodes, completions):
            e.add_turn(c)
            e.in_env = True
            text = self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
            if e.history is not None:
                e.history.append({"role": "assistant", "content": text})
            calls.append(self.envs.submit(self.env.step, e.state, ModelMessage(text, c.finish_reason, c.token_ids)))
        (self.in_env if queue is None else queue).append(TurnBatch(episodes, calls))

    def _answer(self, batch: "TurnBatch") -> None:
        """The environment's answers to one generate call: each episode ends or gets its next observation."""
        start = time.perf_counter()
        for e, (result, error) in zip(batch.episodes, run_all(self.envs, batch.calls)):
            e.in_env = False
            self._advance(e, result, error)
        self.stats.score_seconds += time.perf_counter() - start

    def _collect(self, batch: "TurnBatch") -> None:
        """`_answer`, then the groups whose episodes all ended are finished and put in the store."""
        self._answer(batch)
        complete = [self.open.pop(gid) for gid in [g for g, group in self.open.items() if group.complete]]
        if not complete:
            return
        if self.judge is None:
            return self._finish(complete, [None] * len(complete))
        # the judge scores them while generation goes on; _judged finishes them when the scores are back
        texts = [self.judge_text(e) for g in complete for e in g.episodes if not e.dropped]
        if not texts:  # every sample was dropped: nothing to judge, the groups go (and are counted) now
            return self._finish(complete, [[] for _ in complete])
        self.judging.append((complete, self.judge.submit(texts)))

    def judge_text(self, e: Episode) -> str:
        from rlhub.judge import judge_inputs

        last = e.history[-1]["content"] if e.history else self.tokenizer.decode(e.ids, skip_special_tokens=True)
        prompt = e.history if e.history else self.tokenizer.decode(e.prompt_ids, skip_special_tokens=True)
        return judge_inputs(self.judge_cfg.template, prompt, last, e.row)

    def _judged(self, wait: bool) -> None:
        """Finish the groups whose judge scores came back (all of them, waiting, with `wait`)."""
        while self.judging and (wait or self.judge.ready(self.judging[0][1])):
            groups, handle = self.judging.pop(0)
            try:
                scores = self.judge.result(handle)
            except Exception as e:  # noqa: BLE001 - a failed judge loses these groups, not the run
                self.failures.record("judge", "score", None, e)
                for g in groups:
                    self._drop(g.group_id, g.row_index, "judge_error", len(g.episodes))
                continue
            per_group, lo = [], 0
            for g in groups:
                n = sum(1 for e in g.episodes if not e.dropped)
                per_group.append(scores[lo : lo + n])
                lo += n
            self.stats.judged += lo
            self._finish(groups, per_group)

    def _finish(self, complete: list["OpenGroup"], judge_scores: list[list[float] | None]) -> None:
        """Groups whose episodes all ended: scored, their advantages computed, put in the store."""
        finished = []
        for group, scores in zip(complete, judge_scores):
            out = self._finish_group(group, scores)
            if out is not None:
                finished.append(out)
        if not finished:
            return
        if self.scorers:
            self._score(finished)
        for _, tensors in finished:
            self._advantages(tensors)
        self.store.put_many(finished)

    def run_episodes(self, rows: list[Any], n: int, sampling: SamplingConfig) -> list[list[Episode] | str]:
        """`n` episodes of each row to their end with `sampling`, outside training (evaluation): per
        row its episodes, or why it could not start. Nothing goes to the store."""
        started = self._reset(rows, [-1 - i for i in range(len(rows))], n)
        groups = {-1 - i: g for i, g in enumerate(started) if not isinstance(g, str)}
        queue: deque[TurnBatch] = deque()
        while self._generate_turn(groups, sampling, queue):
            self._answer(queue.popleft())
        return [g if isinstance(g, str) else g.episodes for g in started]

    def _advance(self, e: Episode, result: Any, error: BaseException | None) -> None:
        """Apply one step's answer to its episode: dropped (counted, reported), ended, or given its observation."""
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
        if not math.isfinite(reward):
            e.ended, e.dropped = "nonfinite_reward", True
            self.failures.record(self.env_name, "step", e.row, ValueError(f"non-finite reward {result.reward!r}"))
            return
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
        if self._budget(e, extra=len(ids)) < 1:  # no room for another turn after it: the episode ends before it
            return self._cut(e, "max_tokens")
        e.add_observation(ids)
        if e.history is not None:
            e.history += new

    def _cut(self, e: Episode, why: str) -> None:
        """An episode over a limit ends with the reward of its last step (the environment's reward for an unfinished episode)."""
        e.ended = why
        self.stats.truncated[why] = self.stats.truncated.get(why, 0) + 1

    def _score(self, groups: list[tuple[GroupMeta, GroupTensors]]) -> None:
        """One call per scorer for the whole generation batch; tensors go back to their groups, scalars to the metadata."""
        batch = collate([t for _, t in groups], self.tokenizer.pad_token_id or 0)
        start = time.perf_counter()
        for scorer in self.scorers:
            for key, value in scorer.score(batch).items():
                lo = 0
                for meta, tensors in groups:
                    g, width = tensors.input_ids.shape
                    if torch.is_tensor(value):
                        setattr(tensors, key, value[lo : lo + g, : width - 1].contiguous())
                    else:
                        meta.extra[key] = value
                    lo += g
        self.stats.score_seconds += time.perf_counter() - start

    def _advantages(self, t: GroupTensors) -> None:
        t.advantages, t.returns = advantages(self.data_side, t.rewards, t.completion_mask, t.old_logprobs, t.ref_logprobs, t.values)

    def _finish_group(self, group: "OpenGroup", judge_scores: list[float] | None = None) -> tuple[GroupMeta, GroupTensors] | None:
        """The scored group (advantages still to compute), or None when it was dropped (and counted).
        `judge_scores`: the judge's score of each episode that was not dropped, added with its weight."""
        samples: list[Sample] = []
        sample_drops: Counter[str] = Counter()
        scores = iter(judge_scores or ())
        for e in group.episodes:
            if e.dropped:
                sample_drops[e.ended] += 1
                continue
            routes = _positions(e.routes, len(e.prompt_ids) + len(e.ids) - 1)
            reward = float(e.result.reward) + (self.judge_cfg.weight * next(scores) if judge_scores is not None else 0.0)
            samples.append(Sample(e.prompt_ids, e.ids, e.logprobs, e.versions, reward, e.result.success,
                                  e.finish_reason, routes, e.loss_mask if 0 in e.loss_mask else None))
        gid, row_idx = group.group_id, group.row_index
        for reason, n in sample_drops.items():
            self._count(reason, n)
        if len(samples) < 2:  # no group baseline without two samples: the whole group goes
            reason = sample_drops.most_common(1)[0][0] if sample_drops else "too_few_samples"
            self.store.drop(gid, reason, len(group.episodes), row_idx)
            return None
        for s in samples:  # a multi-turn episode's length is measured against the episode's budget
            budget = self.cfg.max_new_tokens if s.loss_mask is None else self.cfg.max_episode_tokens or self.cfg.max_turns * self.cfg.max_new_tokens
            s.reward += overlong_penalty(s.generated, budget, self.data_side.overlong_window, self.data_side.overlong_penalty)
        rewards = torch.tensor([s.reward for s in samples])
        reason = drop_reason(self.data_side, rewards)
        if reason is not None:  # a filter (DAPO's dynamic sampling): admission starts another prompt instead
            self._count(reason)
            self.store.drop(gid, reason, len(samples), row_idx)
            return None
        tensors = GroupTensors.from_samples(samples, torch.zeros(len(samples)), self.tokenizer.pad_token_id or 0)  # advantages: _advantages
        versions = [v for s in samples for v in s.versions if v >= 0] or [self.engine.version]
        meta = GroupMeta(
            group_id=gid,
            prompt_index=row_idx,
            actor_id=self.actor_id,
            min_version=min(versions),
            max_version=max(versions),
            num_samples=len(samples),
            num_tokens=sum(s.generated for s in samples),
            reward_mean=float(rewards.mean()),
            success_mean=sum(bool(s.success) for s in samples) / len(samples),
            response_len_mean=sum(s.generated for s in samples) / len(samples),
            generate_seconds=group.generate_seconds,
            finish_reasons=[s.finish_reason for s in samples],
            extra={"dropped_samples": dict(sample_drops),
                   "turns_mean": sum(e.turns for e in group.episodes if not e.dropped) / len(samples)},
        )
        self.stats.groups += 1
        self.stats.samples += len(samples)
        return meta, tensors

    def _count(self, reason: str, n: int = 1) -> None:
        self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + n

    def _drop(self, gid: int, row_idx: int, reason: str, samples: int) -> None:
        self._count(reason)
        self.store.drop(gid, reason, samples, row_idx)


def _own_copy(state: Any) -> Any:
    """Each episode of a group gets its own copy of the reset state (a multi-turn environment may
    change it); a state that cannot be copied is shared."""
    try:
        return copy.deepcopy(state)
    except Exception:  # noqa: BLE001 - locks, handles, sockets
        return state


def _positions(routes: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """An episode's routes for its n routed positions: an observation appended after the last turn
    was never routed by the engine, so its positions are -1 (the learner routes them freshly)."""
    if routes is None or routes.shape[0] > n:
        return None
    if routes.shape[0] < n:
        routes = torch.cat([routes, routes.new_full((n - routes.shape[0], *routes.shape[1:]), -1)])
    return routes
