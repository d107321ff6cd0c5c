"""data.curation=difficulty: rows sampled by their solve rate, the frontier's bigger groups, hard rows' replay.

The sampler's draws are checked against the weights computed here from the
rates; its state survives a checkpoint (the same draws follow); a hard row's
kept success is mixed into a later all-failed group of that row, travels with
its own versions and behaviour log-probs, stays out of the group's staleness
and success figures, and is evicted once too old.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from rlhub.curation import DataConfig, DifficultySampler, Outcome, weight
from rlhub.datastore import Admission, InMemoryDataStore
from rlhub.learner_metrics import lag_counts, replay_sums
from rlhub.types import GroupTensors, Sample, collate


def _sampler(**kw) -> DifficultySampler:
    return DifficultySampler(DataConfig(curation="difficulty", **kw), num_rows=4, seed=1)


def test_rows_are_drawn_in_proportion_to_their_weights():
    s = _sampler(min_weight=0.1, window=2)
    s.observe(Outcome(0, 8, 8), 0)  # always solved
    s.observe(Outcome(1, 0, 8), 0)  # never solved
    s.observe(Outcome(2, 4, 8), 0)  # the frontier
    s.observe(Outcome(2, 2, 8), 0)  # rate over the window: 6/16
    assert s.rate(2) == pytest.approx(6 / 16) and s.rate(3) is None
    expected = [0.1, 0.1, 0.1 + 0.9 * 4 * (6 / 16) * (10 / 16), 1.0]  # unseen: 1
    n = 40000
    counts = Counter(s.pick(n))
    total = sum(expected)
    for row, w in enumerate(expected):
        p = w / total
        assert counts[row] / n == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n))
    s.observe(Outcome(2, 8, 8), 0)
    s.observe(Outcome(2, 8, 8), 0)  # the window forgets the older groups: solved now
    assert s.rate(2) == 1.0 and weight(s.rate(2), s.cfg) == pytest.approx(0.1)


def test_the_state_survives_a_checkpoint():
    s = _sampler()
    s.observe(Outcome(1, 1, 8, {"prompt_ids": [1], "completion_ids": [2], "logprobs": [-0.5], "versions": [3], "reward": 1.0}), 3)
    s.pick(5)
    restored = _sampler()
    restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert restored.pick(50) == s.pick(50)
    assert restored.rate(1) == s.rate(1) and restored.plan(1, 8, 4) == s.plan(1, 8, 4)


def test_the_frontier_gets_more_samples_and_a_hard_rows_success_is_kept_until_too_old():
    s = _sampler(frontier_group_size=16, hard_below=0.25, replay_max_age=2)
    s.observe(Outcome(0, 4, 8), 0)
    assert s.plan(0, 8, 0)["group_size"] == 16 and s.plan(3, 8, 0)["group_size"] == 8  # row 3 unseen
    success = {"prompt_ids": [5], "completion_ids": [6, 7], "logprobs": [-1.0, -2.0], "versions": [4, 4], "reward": 1.0}
    s.observe(Outcome(1, 0, 8), 4)
    assert s.plan(1, 8, 4)["keep_success"] and s.plan(1, 8, 4)["replay"] is None
    s.observe(Outcome(1, 1, 8, success), 4)
    assert s.plan(1, 8, 5)["replay"]["completion_ids"] == [6, 7]
    assert s.plan(1, 8, 6)["replay"] is not None  # age 2: still young enough
    assert s.plan(1, 8, 7)["replay"] is None and 1 not in s.buffer  # age 3: evicted


def test_admission_picks_rows_keeps_them_across_a_requeue_and_a_checkpoint():
    cfg = DataConfig(curation="difficulty")
    a = Admission(4, 1, num_rows=50, seed=2, curation=cfg, group_size=8)
    ids = a.admit(0, 4)
    rows = {g: a.row(g) for g in ids}
    assert all(r is not None and 0 <= r < 50 for r in rows.values())
    plans = a.plans(ids)
    assert {g: p["row"] for g, p in plans.items()} == rows and all(p["group_size"] == 8 for p in plans.values())
    a.requeue(ids[:2], "actor_crash")
    again = a.admit(1, 2)
    assert again == ids[:2] and [a.row(g) for g in again] == [rows[g] for g in ids[:2]]
    a.finish(ids[3])
    b = Admission(4, 1, num_rows=50, seed=2, curation=cfg, group_size=8)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [b.row(g) for g in ids] == [rows[g] for g in ids]
    assert b.admit(0, 3) == ids[:3]  # what was in flight starts again first, with its rows
    for g in ids[:3]:
        a.finish(g)
        b.finish(g)
    assert b.admit(0, 3) == a.admit(0, 3) == [4, 5, 6]  # then the same fresh draws
    assert [b.row(g) for g in range(4, 7)] == [a.row(g) for g in range(4, 7)]


def test_the_replayed_sample_stays_out_of_the_staleness_counts():
    own = Sample([1, 2], [3, 4], [-0.1, -0.2], [9, 9], 0.0, False, "stop")
    old = Sample([1, 2], [5, 6, 7], [-1.0, -1.0, -1.0], [2, 2, 2], 1.0, True, "stop", replayed=True)
    plain = GroupTensors.from_samples([own, own], torch.zeros(2), 0)
    mixed = GroupTensors.from_samples([own, own, old], torch.zeros(3), 0)
    assert mixed.replayed.tolist() == [0.0, 0.0, 1.0] and plain.replayed is None
    batch = collate([plain, mixed], 0)
    assert batch.replayed.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert lag_counts(batch, 10) == {1: 8}  # four own samples of 2 tokens, one version behind
    assert replay_sums(batch, 10) == {"replay_samples": 1.0, "replay_age_max": 8.0}


class Solver:
    """Rows 0..3: the answer 'a' succeeds on row 0 only; no sample ever succeeds elsewhere."""

    def dataset(self, split):
        return [{"q": f"q{i}", "i": i} for i in range(4)]

    def reset(self, row):
        return row["q"], row

    def step(self, state, message):
        from rlhub.envs.base import StepResult

        ok = state["i"] == 0 and message.startswith("a")
        return StepResult(float(ok), success=ok)


def test_an_all_failed_group_of_a_hard_row_gets_its_kept_success(tokenizer):
    from rlhub.rollout import DataSide, RolloutConfig, RolloutWorker
    from rlhub.weight_sync import InMemoryWeightSync, probe_sequence
    from scripted import ScriptedEngine

    a = tokenizer.encode("a", add_special_tokens=False)
    b = tokenizer.encode("b", add_special_tokens=False)
    cfg = DataConfig(curation="difficulty", hard_below=0.5, replay_max_age=10)
    store = InMemoryDataStore(prompts_per_step=1, max_staleness=100, num_rows=4, seed=0, curation=cfg, group_size=2)
    sampler = store.admission.sampler
    sampler.observe(Outcome(0, 0, 8), 0)  # row 0 looks hard: its success will be kept
    store.admission.rows_of = {}
    engine = ScriptedEngine([a + [tokenizer.eos_token_id]] * 1 + [b + [tokenizer.eos_token_id]], tokenizer.eos_token_id)
    worker = RolloutWorker(0, RolloutConfig(max_new_tokens=4, max_model_len=64, prompts_per_batch=1), 2, 1, engine, Solver(), tokenizer,
                           store, InMemoryWeightSync(), DataSide(), probe_sequence(259), curated=True)
    sampler.pick = lambda n: [0] * n  # every group is of row 0, so the test knows the plan
    worker.generate_groups(store.admit(0, 1))  # first call answers 'a': both succeed, one is kept
    assert len(sampler.buffer[0]) == 1 and sampler.rate(0) == pytest.approx(2 / 10)
    kept = sampler.buffer[0][0]
    worker.generate_groups(store.admit(0, 1))  # later calls answer 'b': every sample fails
    (m1, t1), (m2, t2) = store.get_batch(2, 1)
    assert t1.replayed is None and t1.input_ids.shape[0] == 2
    assert t2.input_ids.shape[0] == 3 and t2.replayed.tolist() == [0.0, 0.0, 1.0]
    row = t2.completion_mask[2].bool()
    assert t2.input_ids[2, 1:][row].tolist() == kept["completion_ids"]  # the kept trajectory, token for token
    assert t2.versions[2][row].tolist() == kept["versions"] and t2.old_logprobs[2][row].tolist() == pytest.approx(kept["logprobs"])
    assert m2.success_mean == 0.0 and m2.num_samples == 3 and m2.extra["replayed"] == 1
    assert m2.min_version == min(t2.versions[:2][t2.completion_mask[:2].bool()].tolist())  # its own samples' versions
    assert worker.stats.replayed == 1 and t2.rewards.tolist() == [0.0, 0.0, 1.0]
