"""Group assembly: episodes that all ended become one scored group with advantages, put in the store.

A complete group is scored by the model judge when there is one (the judge
works while generation goes on; its groups finish when the scores are back),
turned into tensors (a sample per episode that was not dropped, each token
with its behaviour log-prob, policy version and route), shaped (DAPO's
overlong penalty), filtered (dynamic sampling), handed to the data-side
scorers (critic values, reference log-probs) and given its advantages, now
that the group is complete. A group with fewer than two samples left has no
baseline and is dropped; every drop is counted and reaches the ledger.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Sequence

import torch

from rlhub.algorithms.data_side import DataSide, advantages, drop_reason, overlong_penalty
from rlhub.episodes import Episode
from rlhub.rollout.records import DataStoreClient, FailureLog, WorkerStats
from rlhub.rollout.turns import OpenGroup, episode_routes
from rlhub.rollout_config import RolloutConfig
from rlhub.scorers import Scorer
from rlhub.types import GroupMeta, GroupTensors, Sample, collate


class Groups:
    """Finishes one rollout actor's complete groups and puts them in the store."""

    def __init__(self, actor_id: int, cfg: RolloutConfig, store: DataStoreClient, data_side: DataSide, scorers: Sequence[Scorer],
                 tokenizer: Any, stats: WorkerStats, failures: FailureLog, judge: Any = None, judge_cfg: Any = None) -> None:
        self.actor_id, self.cfg, self.store, self.data_side = actor_id, cfg, store, data_side
        self.scorers, self.tokenizer, self.stats, self.failures = list(scorers), tokenizer, stats, failures
        self.judge, self.judge_cfg = judge, judge_cfg  # a judge client (rlhub.judge) and its JudgeConfig, or None
        self.judging: list[tuple[list[OpenGroup], Any]] = []  # complete groups waiting for their judge scores
        self.outcomes: list[Any] = []  # data.curation=difficulty: finished groups' outcomes, for the store
        self.agents: tuple[str, ...] = ()
        """A multi-agent environment's agents (the worker sets them): samples carry their agent's index."""
        self.pad_id = tokenizer.pad_token_id or 0

    @property
    def waiting_for_judge(self) -> int:
        return sum(len(groups) for groups, _ in self.judging)

    def complete(self, groups: list[OpenGroup], fallback_version: int) -> None:
        """Groups whose episodes all ended: to the judge, or finished now. `fallback_version`: the
        engine's version, for a group none of whose tokens carries one."""
        if self.judge is None:
            return self._finish(groups, [None] * len(groups), fallback_version)
        texts = [self.judge_text(e) for g in groups for e in g.episodes if not e.dropped]
        if not texts:  # every sample was dropped: nothing to judge, the groups go (and are counted) now
            return self._finish(groups, [[] for _ in groups], fallback_version)
        self.judging.append((groups, self.judge.submit(texts)))

    def judge_text(self, e: Episode) -> str:
        from rlhub.judge import judge_inputs

        last = e.history[-1]["content"] if e.history else self.tokenizer.decode(e.ids, skip_special_tokens=True)
        prompt = e.history if e.history else self.tokenizer.decode(e.prompt_ids, skip_special_tokens=True)
        return judge_inputs(self.judge_cfg.template, prompt, last, e.row)

    def judged(self, wait: bool, fallback_version: int) -> None:
        """Finish the groups whose judge scores came back (all of them, waiting, with `wait`)."""
        while self.judging and (wait or self.judge.ready(self.judging[0][1])):
            groups, handle = self.judging.pop(0)
            try:
                scores = self.judge.result(handle)
            except Exception as e:  # noqa: BLE001 - a failed judge loses these groups, not the run
                self.failures.record("judge", "score", None, e)
                for g in groups:
                    self.drop(g.group_id, g.row_index, "judge_error", len(g.episodes))
                continue
            per_group, lo = [], 0
            for g in groups:
                n = sum(1 for e in g.episodes if not e.dropped)
                per_group.append(scores[lo : lo + n])
                lo += n
            self.stats.judged += lo
            self._finish(groups, per_group, fallback_version)

    def _finish(self, complete: list[OpenGroup], judge_scores: list[list[float] | None], fallback_version: int) -> None:
        """Scored, their advantages computed, put in the store."""
        finished = [out for group, scores in zip(complete, judge_scores)
                    if (out := self.assemble(group, scores, fallback_version)) is not None]
        if self.outcomes:  # the rows' solve rates move before these groups are trained
            self.store.observe(self.outcomes)
            self.outcomes = []
        if not finished:
            return
        if self.scorers:
            self._score(finished)
        for _, tensors in finished:
            self._advantages(tensors)
            tensors.turn_rewards = tensors.cut_values = None  # read here; the learner trains on the advantages
        self.store.put_many(finished)

    def _advantages(self, tensors: GroupTensors) -> None:
        """The group's advantages (and the critic's returns); in a multi-agent group each agent's samples
        are their own group: an agent is measured against the same agent in the other matches."""
        def compute(t: GroupTensors) -> tuple[torch.Tensor, torch.Tensor | None]:
            return advantages(self.data_side, t.rewards, t.completion_mask, t.old_logprobs, t.ref_logprobs, t.values,
                              t.turn_rewards, t.cut_values)

        if tensors.agents is None:
            tensors.advantages, tensors.returns = compute(tensors)
            return
        width = tensors.input_ids.shape[1]
        adv = torch.zeros_like(tensors.completion_mask)
        returns = None if tensors.values is None else torch.zeros_like(tensors.completion_mask)
        for agent in tensors.agents.unique().tolist():
            rows = (tensors.agents == agent).nonzero().flatten()
            a, r = compute(tensors.rows(rows, width))
            adv[rows] = a
            if returns is not None and r is not None:
                returns[rows] = r
        tensors.advantages, tensors.returns = adv, returns

    def assemble(self, group: OpenGroup, judge_scores: list[float] | None, fallback_version: int) -> tuple[GroupMeta, GroupTensors] | None:
        """The scored group (advantages still to compute), or None when it was dropped (and counted).
        `judge_scores`: the judge's score of each episode that was not dropped, added with its weight."""
        samples, sample_drops = self._samples(group, judge_scores)
        if self.agents:  # each agent is its own baseline group: an agent with one sample left has none
            for a in range(len(self.agents)):
                mine = [s for s in samples if s.agent == a]
                if len(mine) == 1:
                    samples = [s for s in samples if s is not mine[0]]
                    sample_drops["too_few_samples"] += 1
        gid, row_idx = group.group_id, group.row_index
        for reason, n in sample_drops.items():
            self._count(reason, n)
        if len(samples) < 2:  # no group baseline without two samples: the whole group goes
            reason = sample_drops.most_common(1)[0][0] if sample_drops else "too_few_samples"
            self.store.drop(gid, reason, len(group.episodes), row_idx)
            return None
        for s in samples:
            s.reward += self.overlong(s.generated, s.loss_mask is not None)
        if group.plan is not None:  # data.curation=difficulty: the row's outcome, and a replay where it fails
            samples = self._curate(group, samples)
        fresh = [s for s in samples if not s.replayed]
        rewards = torch.tensor([s.reward for s in samples])
        reason = drop_reason(self.data_side, rewards)
        if reason is not None:  # a filter (DAPO's dynamic sampling): admission starts another prompt instead
            self._count(reason)
            self.store.drop(gid, reason, len(samples), row_idx)
            return None
        tensors = GroupTensors.from_samples(samples, torch.zeros(len(samples)), self.pad_id)  # advantages: _finish
        tensors.group_ids = torch.full((len(samples),), gid, dtype=torch.long)
        self.stats.groups += 1
        self.stats.samples += len(fresh)
        return self._meta(group, samples, sample_drops, fallback_version), tensors

    def _curate(self, group: OpenGroup, samples: list[Sample]) -> list[Sample]:
        """The group's outcome, for its row's solve rate (with a success of a hard row, to be kept); and the
        samples with the planned replay mixed in when none of them succeeded."""
        from rlhub.curation import Outcome

        plan = group.plan
        won = [s for s in samples if s.success]
        keep = None
        if plan.get("keep_success") and won:
            w = won[0]
            keep = {"prompt_ids": list(w.prompt_ids), "completion_ids": list(w.completion_ids), "logprobs": list(w.logprobs),
                    "versions": list(w.versions), "reward": float(w.reward), "success": True, "finish_reason": w.finish_reason,
                    "loss_mask": None if w.loss_mask is None else list(w.loss_mask), "agent": w.agent}
        self.outcomes.append(Outcome(group.row_index, len(won), len(samples), keep))
        replay = plan.get("replay")
        if replay is None or won:
            return samples
        self.stats.replayed += 1
        return samples + [Sample(replay["prompt_ids"], replay["completion_ids"], replay["logprobs"], replay["versions"], replay["reward"],
                                 True, replay["finish_reason"], None, replay["loss_mask"], agent=replay.get("agent"), replayed=True)]

    def overlong(self, generated: int, multi_turn: bool) -> float:
        """The overlong shaping of a sample that generated `generated` tokens (0 unless configured); a
        multi-turn episode's length is measured against the episode's budget."""
        budget = self.cfg.max_episode_tokens or self.cfg.max_turns * self.cfg.max_new_tokens if multi_turn else self.cfg.max_new_tokens
        return overlong_penalty(generated, budget, self.data_side.overlong_window, self.data_side.overlong_penalty)

    def episode_return(self, e: Episode) -> float:
        """An ended episode's return as its sample's reward would be without a judge: its turns' rewards and the overlong shaping."""
        return e.total_reward + self.overlong(e.generated, 0 in e.loss_mask)

    def _samples(self, group: OpenGroup, judge_scores: list[float] | None) -> tuple[list[Sample], Counter[str]]:
        """The group's samples (its episodes that were not dropped) and the drops by reason."""
        samples: list[Sample] = []
        drops: Counter[str] = Counter()
        scores = iter(judge_scores or ())
        for e in group.episodes:
            if e.dropped:
                drops[e.ended] += 1
                continue
            # the episode's return: every turn's reward (a single-turn episode's one reward)
            reward = e.total_reward + (self.judge_cfg.weight * next(scores) if judge_scores is not None else 0.0)
            samples.append(Sample(e.prompt_ids, e.ids, e.logprobs, e.versions, reward, e.result.success,
                                  e.finish_reason, episode_routes(e), e.loss_mask if 0 in e.loss_mask else None,
                                  list(e.turn_rewards) if len(e.turn_rewards) > 1 else None, cut_values=e.cut_values,
                                  agent=self.agents.index(e.agent) if e.agent else None))
        return samples, drops

    def _meta(self, group: OpenGroup, samples: list[Sample], drops: Counter[str], fallback_version: int) -> GroupMeta:
        """The group's metadata. Its versions (the store's staleness bound), rewards and success are its
        own samples'; a replayed one counts in its samples and tokens (it is trained), not in those."""
        fresh = [s for s in samples if not s.replayed]
        versions = [v for s in fresh for v in s.versions if v >= 0] or [fallback_version]
        rewards = torch.tensor([s.reward for s in fresh])
        return GroupMeta(
            group_id=group.group_id,
            prompt_index=group.row_index,
            actor_id=self.actor_id,
            min_version=min(versions),
            max_version=max(versions),
            num_samples=len(samples),
            num_tokens=sum(s.generated for s in samples),
            reward_mean=float(rewards.mean()),
            success_mean=sum(bool(s.success) for s in fresh) / len(fresh),
            response_len_mean=sum(s.generated for s in fresh) / len(fresh),
            generate_seconds=group.generate_seconds,
            finish_reasons=[s.finish_reason for s in samples],
            extra={"dropped_samples": dict(drops), "replayed": len(samples) - len(fresh), **self._agent_figures(fresh),
                   **self._agent_tokens(samples),
                   "turns_mean": sum(e.turns for e in group.episodes if not e.dropped) / len(fresh)},
        )

    def _agent_figures(self, samples: list[Sample]) -> dict[str, Any]:
        """Per agent of a multi-agent group: [samples, reward sum, successes, generated tokens] (what
        the step's `agents/*` metrics add up); nothing for one agent."""
        if not self.agents:
            return {}
        out = {name: [0, 0.0, 0, 0] for name in self.agents}
        for s in samples:
            fig = out[self.agents[s.agent]]
            fig[0] += 1
            fig[1] += s.reward
            fig[2] += int(bool(s.success))
            fig[3] += s.generated
        return {"agents": out}

    def _agent_tokens(self, samples: list[Sample]) -> dict[str, Any]:
        """Per agent of a multi-agent group, the generated tokens of all its samples, replayed ones
        included (what a separate policy trains on: the ledger checks each policy's learner against it)."""
        if not self.agents:
            return {}
        tokens = {name: 0 for name in self.agents}
        for s in samples:
            tokens[self.agents[s.agent]] += s.generated
        return {"agent_tokens": tokens}

    def _score(self, groups: list[tuple[GroupMeta, GroupTensors]]) -> None:
        """One call per scorer for the whole generation batch; tensors go back to their groups, scalars to the metadata."""
        batch = collate([t for _, t in groups], self.pad_id)
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

    def _count(self, reason: str, n: int = 1) -> None:
        self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + n

    def drop(self, gid: int, row_idx: int, reason: str, samples: int) -> None:
        """A group that will not be trained: counted, and told to the store (the ledger's dropped event)."""
        self._count(reason)
        self.store.drop(gid, reason, samples, row_idx)
