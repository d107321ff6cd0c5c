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

import logging
import math
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from rlhub.algorithms.data_side import DataSide, advantages, drop_reason, overlong_penalty
from rlhub.datastore import prompt_index
from rlhub.engines.base import RolloutEngine, SamplingConfig
from rlhub.envs.base import ModelMessage
from rlhub.rollout_config import RolloutConfig
from rlhub.scorers import Scorer
from rlhub.types import GroupMeta, GroupTensors, Sample, collate
from rlhub.weight_sync import Published, WeightSync, probe_error

log = logging.getLogger("rlhub.rollout")


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
    ) -> None:
        self.actor_id = actor_id
        self.cfg = cfg
        self.group_size = group_size
        self.batch_prompts = cfg.prompts_per_batch or max(1, prompts_per_step // cfg.num_actors)
        self.engine = engine
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
        eos = tokenizer.eos_token_id
        self.sampling = SamplingConfig(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            stop_token_ids=(eos,) if eos is not None else (),
        )

    # ---- the loop ---------------------------------------------------------
    def run(self) -> WorkerStats:
        while self.step():
            pass
        return self.stats

    def step(self) -> bool:
        """One admission + generation round; False once the run is stopping."""
        start = time.perf_counter()
        group_ids = self.store.admit(self.actor_id, self.batch_prompts, self.cfg.admission_wait_s)
        self.stats.idle_seconds += time.perf_counter() - start
        if group_ids is None:
            return False
        if not group_ids:
            return True
        self.sync_weights()
        self.generate_groups(group_ids)
        return True

    # ---- weights ------------------------------------------------------------
    def sync_weights(self) -> None:
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

        return poll if self.cfg.weight_update == "inflight" else None

    # ---- generation and scoring ----------------------------------------------
    def generate_groups(self, group_ids: list[int]) -> None:
        episodes = []  # (group id, row index, prompt ids, episode state)
        for gid in group_ids:
            row_idx = prompt_index(gid, len(self.rows), self.seed)
            try:
                text, state = self.env.reset(self.rows[row_idx])
                ids = self.tokenizer.encode(text, add_special_tokens=False)
            except Exception as e:  # a broken row or environment loses this group only
                self.failures.record(self.env_name, "reset", self.rows[row_idx], e)
                self._drop(gid, row_idx, "env_error", self.group_size)
                continue
            if len(ids) + self.cfg.max_new_tokens > self.cfg.max_model_len:
                self._drop(gid, row_idx, "prompt_too_long", self.group_size)
                continue
            episodes.append((gid, row_idx, ids, state))
        if not episodes:
            return
        prompts = [ids for _, _, ids, _ in episodes for _ in range(self.group_size)]
        start = time.perf_counter()
        completions = self.engine.generate(prompts, self.sampling, self._inflight_source())
        elapsed = time.perf_counter() - start
        self.stats.generate_seconds += elapsed
        self.stats.generated_tokens += sum(len(c.token_ids) for c in completions)
        finished = []
        for k, (gid, row_idx, ids, state) in enumerate(episodes):
            chunk = completions[k * self.group_size : (k + 1) * self.group_size]
            group = self._finish_group(gid, row_idx, ids, state, chunk, elapsed * len(chunk) / len(completions))
            if group is not None:
                finished.append(group)
        if not finished:
            return
        if self.scorers:
            self._score(finished)
        for _, tensors in finished:
            self._advantages(tensors)
        self.store.put_many(finished)

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

    def _finish_group(
        self, gid: int, row_idx: int, prompt_ids: list[int], state: Any, completions: list, seconds: float
    ) -> tuple[GroupMeta, GroupTensors] | None:
        """The scored group (advantages still to compute), or None when it was dropped (and counted)."""
        samples: list[Sample] = []
        sample_drops: Counter[str] = Counter()
        for c in completions:
            try:
                text = self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
                result = self.env.step(state, ModelMessage(text, c.finish_reason, c.token_ids))
                reward = float(result.reward)
            except Exception as e:  # the environment failed on this sample: drop it, keep the run
                self.failures.record(self.env_name, "step", self.rows[row_idx], e)
                sample_drops["env_error"] += 1
                continue
            if not math.isfinite(reward):
                sample_drops["nonfinite_reward"] += 1
                continue
            samples.append(Sample(prompt_ids, c.token_ids, c.logprobs, c.versions, reward, result.success, c.finish_reason, c.routed_experts))
        for reason, n in sample_drops.items():
            self._count(reason, n)
        if len(samples) < 2:  # no group baseline without two samples: the whole group goes
            reason = sample_drops.most_common(1)[0][0] if sample_drops else "too_few_samples"
            self.store.drop(gid, reason, len(completions), row_idx)
            return None
        for s in samples:
            s.reward += overlong_penalty(len(s.completion_ids), self.cfg.max_new_tokens, self.data_side.overlong_window, self.data_side.overlong_penalty)
        rewards = torch.tensor([s.reward for s in samples])
        reason = drop_reason(self.data_side, rewards)
        if reason is not None:  # a filter (DAPO's dynamic sampling): admission starts another prompt instead
            self._count(reason)
            self.store.drop(gid, reason, len(samples), row_idx)
            return None
        tensors = GroupTensors.from_samples(samples, torch.zeros(len(samples)), self.tokenizer.pad_token_id or 0)  # advantages: _advantages
        versions = [v for s in samples for v in s.versions] or [self.engine.version]
        meta = GroupMeta(
            group_id=gid,
            prompt_index=row_idx,
            actor_id=self.actor_id,
            min_version=min(versions),
            max_version=max(versions),
            num_samples=len(samples),
            num_tokens=sum(len(s.completion_ids) for s in samples),
            reward_mean=float(rewards.mean()),
            success_mean=sum(bool(s.success) for s in samples) / len(samples),
            response_len_mean=sum(len(s.completion_ids) for s in samples) / len(samples),
            generate_seconds=seconds,
            finish_reasons=[s.finish_reason for s in samples],
            extra={"dropped_samples": dict(sample_drops)},
        )
        self.stats.groups += 1
        self.stats.samples += len(samples)
        return meta, tensors

    def _count(self, reason: str, n: int = 1) -> None:
        self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + n

    def _drop(self, gid: int, row_idx: int, reason: str, samples: int) -> None:
        self._count(reason)
        self.store.drop(gid, reason, samples, row_idx)
