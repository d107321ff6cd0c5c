"""The rollout worker's loop: admitted prompts in, scored groups with advantages out.

The plain class behind each `RolloutActor`. One round: collect what the
environment finished, ask the store for admission, take the newest weights
(`rlhub.rollout.weights`), generate a turn for every episode waiting for one
(`rlhub.rollout.turns`), and put the groups whose episodes all ended in the
store (`rlhub.rollout.groups`). Failures are dropped and counted, never
raised into the run.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Sequence

from rlhub.algorithms.data_side import DataSide
from rlhub.datastore import prompt_index
from rlhub.engines.base import RolloutEngine, SamplingConfig
from rlhub.episodes import EnvRunner, Episode
from rlhub.rollout.branches import Branches
from rlhub.rollout.groups import Groups
from rlhub.rollout.records import DataStoreClient, FailureLog, WorkerStats
from rlhub.rollout.turns import Lane, OpenGroup, TurnBatch, Turns
from rlhub.rollout.weights import VerifiedWeights
from rlhub.rollout_config import RolloutConfig
from rlhub.scorers import Scorer
from rlhub.weight_sync import WeightSync


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
        curated: bool = False,
        policies: dict[str, tuple[RolloutEngine, WeightSync]] | None = None,
        policy_of: dict[str, str] | None = None,
    ) -> None:
        """`max_groups`: the groups admission lets this actor hold at once, all generating together
        in a continuous engine (0: twice `prompts_per_batch`). `policies` (agents.policies=separate):
        each policy's (engine, weight sync), the first being `engine` and `weight_sync`; `policy_of`:
        each agent's policy."""
        self.actor_id = actor_id
        self.cfg = cfg
        self.group_size = group_size
        self.batch_prompts = cfg.prompts_per_batch or max(1, prompts_per_step // cfg.num_actors)
        self.engine = engine
        self.continuous = cfg.continuous and hasattr(engine, "submit")
        self.max_groups = max_groups or 2 * self.batch_prompts
        self.env = env
        self.rows: Sequence[Any] = env.dataset("train")
        self.store = store
        self.seed = seed
        self.stats = WorkerStats()
        self.failures = FailureLog(self.stats.env_errors, self.stats.failure_reports)
        self.envs = EnvRunner(env_timeout_s, env_workers)
        self.weights = VerifiedWeights(actor_id, engine, weight_sync, probe_ids, cfg.probe_tolerance, self.stats)
        lanes = None
        if policies:
            if next(iter(policies.values())) != (engine, weight_sync):
                raise ValueError("policies: the first policy's (engine, weight sync) must be `engine` and `weight_sync`")
            self.continuous = cfg.continuous and all(hasattr(e, "submit") for e, _ in policies.values())
            lanes = {name: Lane(e, self.weights if e is engine else VerifiedWeights(actor_id, e, ws, probe_ids, cfg.probe_tolerance, self.stats))
                     for name, (e, ws) in policies.items()}
        self.turns = Turns(cfg, engine, self.weights, env, env_name or type(env).__name__, tokenizer, self.envs, self.stats,
                           self.failures, self.continuous, snapshots=data_side.spo is not None, policies=lanes, policy_of=policy_of,
                           seed=seed)
        self.groups = Groups(actor_id, cfg, store, data_side, scorers, tokenizer, self.stats, self.failures, judge, judge_cfg)
        self.groups.agents = self.turns.agents
        if data_side.spo is not None and self.turns.agents:
            raise ValueError("algorithm.advantage=spo branches one agent's episodes; a multi-agent environment's matches are not branched")
        self.branches = None if data_side.spo is None else Branches(data_side.spo, self.stats, self.groups.episode_return)
        self.curated = curated
        """data.curation=difficulty: the store plans each group (row, samples, replay) and hears each one's outcome."""
        self.open: dict[int, OpenGroup] = {}  # by group id, in admission order
        self.in_env: deque[TurnBatch] = deque()
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
            self.in_env[0].wait(0.25 * self.turns.last_generate_s)
        while self.in_env and self.in_env[0].done():
            self._collect(self.in_env.popleft())
        self.groups.judged(wait=False, fallback_version=self.engine.version)
        if self.eval_requests:
            self._evaluate(*self.eval_requests.pop(0))
        if not self._admit():
            return False
        generated = self._generate_turn()
        if self.in_env and (drain or not generated):
            self._collect(self.in_env.popleft())
        elif not generated and self.groups.judging:  # nothing to generate: wait for the judge instead of spinning
            self.groups.judged(wait=True, fallback_version=self.engine.version)
        if drain:
            self.drain()
        return True

    def _admit(self) -> bool:
        """Start as many new groups as there is room for; False once the run is stopping."""
        waiting = sum(1 for g in self.open.values() if g.waiting)
        busy = len(self.open) + self.groups.waiting_for_judge
        room = self.max_groups - busy if self.continuous else min(self.batch_prompts - waiting, 2 * self.batch_prompts - busy)
        if room <= 0:
            return True
        start = time.perf_counter()
        group_ids = self.store.admit(self.actor_id, room, 0.0 if busy else self.cfg.admission_wait_s)
        self.stats.idle_seconds += time.perf_counter() - start
        if group_ids is None:
            return False
        self.start_groups(group_ids)
        return True

    def _plans(self, group_ids: list[int]) -> dict[int, dict[str, Any]]:
        """Each group's row, samples and replay under data.curation=difficulty (the store picks them); none otherwise."""
        return self.store.plans(group_ids) if self.curated and group_ids else {}

    def drain(self) -> None:
        """Finish every open episode (the run is stopping, or a test or benchmark waits for its groups)."""
        while self.in_env or any(g.waiting for g in self.open.values()):
            self._generate_turn()
            if self.in_env:
                self._collect(self.in_env.popleft())
        self.groups.judged(wait=True, fallback_version=self.engine.version)

    # ---- weights ------------------------------------------------------------
    def sync_weights(self) -> None:
        """Every policy's engine to its newest published version."""
        for lane in self.turns.lanes.values():
            lane.weights.sync()

    # ---- episodes -------------------------------------------------------------
    def generate_groups(self, group_ids: list[int]) -> None:
        """Run these groups' episodes to the end and put the finished groups (tests, benchmarks)."""
        self.start_groups(group_ids)
        self.drain()

    def start_groups(self, group_ids: list[int]) -> None:
        """Each group's episodes from its row (`group_size`, or what curation planned), ready for their
        first turn; a group whose reset fails or whose prompt is too long is dropped and counted."""
        plans = self._plans(group_ids)
        rows = [plans[gid]["row"] if gid in plans else prompt_index(gid, len(self.rows), self.seed) for gid in group_ids]
        sizes = [plans[gid]["group_size"] if gid in plans else self.group_size for gid in group_ids]
        for gid, row_idx, size, started in zip(group_ids, rows, sizes,
                                               self.turns.start([self.rows[r] for r in rows], group_ids, sizes, rows)):
            if isinstance(started, str):
                self.groups.drop(gid, row_idx, started, size)
                continue
            started.row_index = row_idx
            started.plan = plans.get(gid)
            for e in started.episodes:
                e.row_index = row_idx
            self.open[gid] = started

    def _generate_turn(self) -> bool:
        """The training groups' next turns, on the engine's way (continuous or one call); False when none was waiting."""
        if self.continuous:
            return self.turns.stream(self.open, self.sampling, self.in_env)
        return self.turns.generate(self.open, self.sampling, self.in_env)

    def _collect(self, batch: TurnBatch) -> None:
        """The environment's answers to one batch of turns; the groups whose episodes all ended go on to be finished."""
        self.turns.answer(batch)
        complete = [self.open.pop(gid) for gid in [g for g, group in self.open.items() if group.complete]]
        if self.branches is not None:  # SPO: a group waits for the rollouts branched from its samples' cuts
            complete = self._branch(complete)
        if complete:
            self.groups.complete(complete, self.engine.version)

    def _branch(self, complete: list[OpenGroup]) -> list[OpenGroup]:
        """Of these complete groups, the ones ready for their advantages: sample groups whose branches
        all ended, and those without a cut. The others' branch groups join the open groups."""
        ready = []
        for group in complete:
            if self.branches.is_branch(group):
                ready.append(self.branches.finish(group))
            elif (branched := self.branches.start(group)) is not None:
                self.open[branched.group_id] = branched
            else:
                ready.append(group)
        return ready

    # ---- evaluation -------------------------------------------------------------
    def _evaluate(self, step: int, rows: int, k: int) -> None:
        """An evaluation (rlhub.evaluation) with the newest weights, held for its whole length; the
        starting policy's (step 0, eval.before) with the weights the engine started with."""
        from rlhub.evaluation import eval_rows, evaluate

        start = time.perf_counter()
        lanes = list(self.turns.lanes.values())
        if step > 0:
            self.sync_weights()
        for lane in lanes:
            lane.weights.held = True
        kept = (self.stats.generated_tokens, self.stats.generate_seconds, dict(self.stats.truncated), dict(self.stats.outcomes),
                dict(self.stats.agent_generate_seconds))
        try:  # the environment's failures on eval rows are eval/failed, not the run's counters
            with self.failures.aside():
                result = evaluate(self, eval_rows(self.env, rows), k)
        finally:  # the training throughput, truncation, outcome and failure counters leave evaluation out
            for lane in lanes:
                lane.weights.held = False
            (self.stats.generated_tokens, self.stats.generate_seconds, self.stats.truncated, self.stats.outcomes,
             self.stats.agent_generate_seconds) = kept
        result.update({"eval/step": float(step), "eval/seconds": time.perf_counter() - start})
        self.eval_results.append(result)

    def run_episodes(self, rows: list[Any], n: int, sampling: SamplingConfig) -> list[list[Episode] | str]:
        """`n` episodes of each row to their end with `sampling`, outside training (evaluation): per
        row its episodes, or why it could not start. Nothing goes to the store. `rows` are a prefix of
        the eval split (`rlhub.evaluation.eval_rows`): a row's index is its position. Of a multi-agent
        environment's matches, the first agent's episodes (its own return and success) are returned."""
        started = self.turns.start(rows, [-1 - i for i in range(len(rows))], n, list(range(len(rows))))
        groups = {-1 - i: g for i, g in enumerate(started) if not isinstance(g, str)}
        queue: deque[TurnBatch] = deque()
        while self.turns.generate(groups, sampling, queue):
            self.turns.answer(queue.popleft())
        first = self.turns.agents[0] if self.turns.agents else ""
        return [g if isinstance(g, str) else [e for e in g.episodes if e.agent == first] for g in started]
