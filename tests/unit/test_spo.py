"""Segment Policy Optimization: segment advantages from Monte Carlo values at cuts, and the branches behind them.

The estimator is checked against values worked out by hand on a crafted
group. The worker's branching is checked by an independent route: a fake
engine records every continuation it generated, the test re-scores those
texts itself, and the advantages that reach the store must be the ones those
values give. A multi-turn episode branched at its second turn must continue
from the environment's state as it was before that turn, not as it ended.
"""

from __future__ import annotations

import doctest
import math
import random

import pytest
import torch

from rlhub.algorithms.advantages import spo_advantages
from rlhub.algorithms.config import SpoConfig
from rlhub.algorithms.data_side import DataSide, advantages
from rlhub.datastore import InMemoryDataStore
from rlhub.engines.base import Completion
from rlhub.envs.base import StepResult
from rlhub.rollout import RolloutConfig, RolloutWorker
from rlhub.types import GroupTensors, Sample
from rlhub.weight_sync import InMemoryWeightSync, probe_sequence

PROBE = probe_sequence(259)
NAN = float("nan")


def test_segment_advantages_by_hand():
    # three samples of one group, returns 1, 0, 0.5; positions are completion targets
    rewards = torch.tensor([1.0, 0.0, 0.5])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    values = torch.full((3, 7), NAN)
    values[0, 3], values[0, 5] = 0.25, 0.75  # sample 0: cuts before targets 3 and 5
    values[1, 2] = 0.5  # sample 1: one cut
    # sample 2: no cut
    out = spo_advantages(rewards, values, mask)
    # baselines (leave-one-out means): 0.25, 0.75, 0.5
    expected = torch.tensor([
        [0, 0.25 - 0.25, 0.0, 0.75 - 0.25, 0.5, 1 - 0.75, 0],  # segments [1,3): 0.0, [3,5): 0.5, [5,6): 0.25
        [0, 0.5 - 0.75, 0 - 0.5, 0 - 0.5, 0, 0, 0],  # [1,2): -0.25, [2,4): -0.5
        [0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # 0.5 - mean(1, 0)
    ])
    assert torch.allclose(out, expected)
    # the segments telescope: each sample's first and last segment span r_i - baseline_i
    rloo = rewards - (rewards.sum() - rewards) / 2
    for i, (first, last) in enumerate([(1, 5), (1, 3), (1, 6)]):
        seg_sum = sum(float(out[i, t]) for t in sorted({first, *values[i].isfinite().nonzero().flatten().tolist()}))
        assert seg_sum == pytest.approx(float(rloo[i]))


def test_cut_values_travel_from_samples_to_the_estimator():
    samples = [Sample([5, 6], [1, 2, 3, 4], [-0.1] * 4, [0] * 4, 1.0, True, "stop", cut_values=[(2, 0.25)]),
               Sample([5, 6], [1, 2, 3], [-0.1] * 3, [0] * 3, 0.0, False, "stop")]
    t = GroupTensors.from_samples(samples, torch.zeros(2), 0)
    assert t.cut_values[0, 1 + 2] == 0.25 and int(t.cut_values.isfinite().sum()) == 1  # target of completion token 2
    adv, _ = advantages(DataSide(advantage="spo", spo=SpoConfig()), t.rewards, t.completion_mask, t.old_logprobs, None, None,
                        None, t.cut_values)
    assert adv[0, 1:3].tolist() == [0.25, 0.25] and adv[0, 3:5].tolist() == [0.75, 0.75]  # 0.25 - 0, then 1 - 0.25
    assert adv[1, 1:4].tolist() == [-1.0, -1.0, -1.0]


def test_the_doc_examples_hold():
    import rlhub.algorithms.advantages
    import rlhub.algorithms.selection
    import rlhub.rollout.branches

    for module in (rlhub.algorithms.advantages, rlhub.algorithms.selection, rlhub.rollout.branches):
        assert doctest.testmod(module).failed == 0


class LetterEngine:
    """A fake engine for the seam: every prompt is continued with `cap` letters drawn at random from
    eight (each sampled with probability 1/8: every token is a cutpoint), and every continuation is
    recorded with the context it continued."""

    def __init__(self, letters: list[int], seed: int) -> None:
        self.letters, self.rng, self.version, self.record = letters, random.Random(seed), 0, []

    def generate(self, prompts, sampling, weight_source=None, max_tokens=None, routes=None):
        out = []
        for prompt, cap in zip(prompts, max_tokens or [sampling.max_new_tokens] * len(prompts)):
            ids = [self.rng.choice(self.letters) for _ in range(cap)]
            self.record.append((list(prompt), ids))
            out.append(Completion(ids, [math.log(1 / 8)] * cap, [self.version] * cap, "length"))
        return out

    def prompt_logprobs(self, ids):
        return torch.zeros(len(ids) - 1)

    def load_weights(self, state, version):
        self.version = version


class CountA:
    """Single turn: the reward is the share of the answer's letters that are 'a'."""

    def dataset(self, split):
        return [{"q": f"q{i}:"} for i in range(4)]

    def reset(self, row):
        return row["q"], None

    def step(self, state, message):
        return StepResult(message.count("a") / 4, done=True)


def _worker(tokenizer, env, engine, spo: SpoConfig, group_size: int = 3, **rollout):
    cfg = RolloutConfig(max_new_tokens=rollout.pop("max_new_tokens", 4), max_model_len=128, prompts_per_batch=2, **rollout)
    store = InMemoryDataStore(prompts_per_step=2, max_staleness=100)
    worker = RolloutWorker(0, cfg, group_size, 2, engine, env, tokenizer, store, InMemoryWeightSync(),
                           DataSide(advantage="spo", spo=spo), PROBE, env_name="spo-test")
    return worker, store


def test_cut_values_are_the_mean_return_of_the_branches(tokenizer):
    letters = [tokenizer.encode(c, add_special_tokens=False)[0] for c in "abcdefgh"]
    engine = LetterEngine(letters, seed=3)
    spo = SpoConfig(segments="cutpoints", interval=2, branches=5)  # every token a cutpoint: one cut, before token 2
    worker, store = _worker(tokenizer, CountA(), engine, spo)
    worker.generate_groups([0, 1])
    batch = store.get_batch(2, 0)
    assert batch is not None and len(batch) == 2
    branch_runs: dict[tuple, list[float]] = {}
    for context, ids in engine.record:  # the test's own scoring of every continuation the engine made
        text = tokenizer.decode(context[-2:] + ids) if len(ids) == 2 else None
        if text is not None:
            branch_runs.setdefault(tuple(context), []).append(text.count("a") / 4)
    assert sum(len(v) for v in branch_runs.values()) == 2 * 3 * 5  # 2 groups x 3 samples x 1 cut x 5 branches
    assert all(len(v) == 5 for v in branch_runs.values())  # no two samples share a cut's context (seeded)
    assert worker.stats.spo_cuts == 6 and worker.stats.spo_branches == 30 and worker.stats.spo_branch_tokens == 60
    for _, t in batch:
        g, width = t.input_ids.shape
        returns = t.rewards
        values = torch.full((g, width - 1), NAN)
        for i in range(g):
            ids = t.input_ids[i][t.attention_mask[i].bool()].tolist()
            prompt_len = len(ids) - 4  # every completion is 4 letters
            context = tuple(ids[: prompt_len + 2])
            values[i, prompt_len - 1 + 2] = sum(branch_runs[context]) / 5
        expected = spo_advantages(returns, values, t.completion_mask)
        assert torch.allclose(t.advantages, expected, atol=1e-6)
        assert not torch.allclose(t.advantages, expected.sum(-1, keepdim=True) / 4 * t.completion_mask, atol=1e-3)  # not one number per sample
        assert t.cut_values is None and t.turn_rewards is None  # read on the rollout side, never stored


class TwoTurns:
    """The first turn gets an observation; the second pays 1 only if the state shows exactly one turn
    before it (a branch from the second turn must start from that state, not the finished one)."""

    def dataset(self, split):
        return [{"q": "start"}]

    def reset(self, row):
        return row["q"], {"turns": 0}

    def step(self, state, message):
        state["turns"] += 1
        if state["turns"] == 1:
            return StepResult(0.0, done=False, observation=" then ")
        return StepResult(1.0 if state["turns"] == 2 else -1.0, done=True)


def test_a_branch_from_a_later_turn_starts_from_that_turns_state(tokenizer):
    letters = [tokenizer.encode(c, add_special_tokens=False)[0] for c in "abcdefgh"]
    engine = LetterEngine(letters, seed=0)
    worker, store = _worker(tokenizer, TwoTurns(), engine, SpoConfig(segments="turns", branches=3), group_size=2,
                            max_new_tokens=3, max_turns=2)
    worker.generate_groups([0])
    (meta, t), = store.get_batch(1, 0)
    assert worker.stats.spo_cuts == 2 and worker.stats.spo_branches == 6 and worker.stats.spo_branches_dropped == 0
    assert t.rewards.tolist() == [1.0, 1.0]
    # the cut (the second turn's start) is worth 1, as both samples' returns: every advantage is 0. A branch
    # from the finished state would score -1 there (advantages -2, then +2); one from the reset state would
    # get the first turn's observation again and be cut at max_turns with 0 (advantages -1, then +1)
    assert t.completion_mask.sum() == 12 and torch.count_nonzero(t.advantages) == 0
    branch_contexts = [c for c, ids in engine.record if len(c) > len(engine.record[0][0])]
    assert len(branch_contexts) == 2 + 6  # the samples' second turns, then each branch's, after the first turn and the observation
