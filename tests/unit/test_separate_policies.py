"""agents.policies=separate: each agent's policy is generated, versioned, admitted, trained and recorded alone.

Two learners that start from the same weights and take a step on the same
batch (as the controller hands every policy the same groups) must end equal to
a learner that saw only their own agent's rows: changing the other agent's
rows changes nothing, changing their own does. In the rollout actor each
agent's turns come from its policy's engine with that engine's versions. The
store opens admission once every policy has published, at the oldest version;
the ledger reconciles each policy's learner with its own agent's tokens.
"""

from __future__ import annotations

import pytest
import torch

from rlhub.actors.learner import merge_policy_metrics
from rlhub.actors.pipeline import policy_step_events
from rlhub.algorithms.config import AlgorithmConfig
from rlhub.datastore import Admission, GroupMeta, InMemoryDataStore
from rlhub.ledger import reconcile
from rlhub.rollout import DataSide, RolloutConfig, RolloutWorker
from rlhub.types import GroupTensors, Sample, collate
from rlhub.weight_sync import InMemoryWeightSync, probe_sequence
from scripted import ScriptedEngine, random_groups
from test_multi_agent import Relay

PROBE = probe_sequence(259)


def _match_batch(seed: int, bump: dict[int, float] | None = None) -> GroupTensors:
    """Three groups of two matches, agents 0 and 1 alternating; `bump` adds to the advantages of an agent's rows."""
    groups = random_groups(seed, size=4, agents=2)
    for t in groups:
        for agent, extra in (bump or {}).items():
            t.advantages[t.agents == agent] += extra * t.completion_mask[t.agents == agent]
    return collate(groups, 256)


def _trained(model_path: str, batch: GroupTensors, agents: set[int]) -> dict[str, torch.Tensor]:
    """A fresh learner's weights after one step on `batch`'s rows of `agents` (what LearnerActor.train_step keeps)."""
    from rlhub.learner import Learner
    from rlhub.models.build import ModelConfig

    learner = Learner(model_path, ModelConfig(), AlgorithmConfig(lr=1e-3, micro_batch_size=256), PROBE, seed=0)
    learner.train_step(batch.of_agents(agents))
    return {k: v.detach().clone() for k, v in learner.model.named_parameters()}


def _diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_policies_from_the_same_weights_diverge_only_through_their_own_agents_samples(tiny_model_path):
    batch = _match_batch(5)
    first, second = _trained(tiny_model_path, batch, {0}), _trained(tiny_model_path, batch, {1})
    assert _diff(first, second) > 1e-4  # the same start and the same groups: each agent's rows make its own policy
    # the other agent's samples change nothing; its own change it
    assert _diff(first, _trained(tiny_model_path, _match_batch(5, {1: 3.0}), {0})) == 0.0
    assert _diff(second, _trained(tiny_model_path, _match_batch(5, {0: 3.0}), {1})) == 0.0
    assert _diff(first, _trained(tiny_model_path, _match_batch(5, {0: 3.0}), {0})) > 1e-4
    # a policy of both agents (shared) trains on every row
    assert _diff(_trained(tiny_model_path, batch, {0, 1}), first) > 1e-4


def test_an_agents_rows_keep_their_tokens_and_a_group_without_them_is_none():
    batch = _match_batch(1)
    mine = batch.of_agents({1})
    assert mine.agents.tolist() == [1] * 6 and mine.input_ids.shape[1] == batch.input_ids.shape[1]
    assert torch.equal(mine.completion_mask, batch.completion_mask[batch.agents == 1])
    assert batch.of_agents({7}) is None
    with pytest.raises(ValueError, match="agent indices"):
        collate([GroupTensors.from_samples([Sample([1], [2], [-0.1], [0], 1.0, True, "stop")] * 2, torch.zeros(2), 0)], 0).of_agents({0})


def test_each_agents_turns_come_from_its_policys_engine_at_that_engines_version(tokenizer):
    eos = tokenizer.eos_token_id
    said = tokenizer.encode("hi", add_special_tokens=False) + [eos]
    engine_a, engine_b = ScriptedEngine([said], eos), ScriptedEngine([said], eos)
    engine_a.version, engine_b.version = 10, 20  # two policies, far apart
    sync_a, sync_b = InMemoryWeightSync(), InMemoryWeightSync()
    cfg = RolloutConfig(max_new_tokens=3, max_model_len=64, prompts_per_batch=1, max_turns=3)
    store = InMemoryDataStore(prompts_per_step=1, max_staleness=100)
    worker = RolloutWorker(0, cfg, 2, 1, engine_a, Relay(), tokenizer, store, sync_a, DataSide(), PROBE, env_name="relay",
                           policies={"a": (engine_a, sync_a), "b": (engine_b, sync_b)}, policy_of={"a": "a", "b": "b"})
    worker.generate_groups([0])
    (meta, t), = store.get_batch(1, 0)
    a_prompt = tokenizer.encode("A:", add_special_tokens=False)
    assert [len(c[1]) for c in engine_a.calls] == [2] and all(p[:len(a_prompt)] == a_prompt for p in engine_a.calls[0][1])
    assert [len(c[1]) for c in engine_b.calls] == [2]  # B's turns, only on B's engine
    gen = t.completion_mask.bool()
    for i, agent in enumerate(t.agents.tolist()):
        assert set(t.versions[i][gen[i]].tolist()) == {10 if agent == 0 else 20}
    assert meta.extra["agent_tokens"] == {"a": 2 * len(said), "b": 2 * len(said)}
    assert set(worker.stats.agent_generate_seconds) == {"a", "b"}
    with pytest.raises(ValueError, match="policy_of"):
        RolloutWorker(0, cfg, 2, 1, engine_a, Relay(), tokenizer, store, sync_a, DataSide(), PROBE,
                      policies={"a": (engine_a, sync_a)}, policy_of={"a": "a", "b": "b"})


def test_admission_opens_once_every_policy_published_at_the_oldest_version():
    adm = Admission(prompts_per_step=2, max_staleness=0, policies=("a", "b"))
    assert len(adm.admit(0, 10)) == 2  # version 0's groups
    adm.set_version(1, "a")
    assert adm.admit(0, 10) == []  # b has not published version 1: its engines may still be at 0
    adm.set_version(1, "b")
    assert adm.admit(0, 10) == [2, 3]
    with pytest.raises(ValueError, match="policy 'c'"):
        adm.set_version(2, "c")


def _meta(gid: int, tokens: dict[str, int]) -> GroupMeta:
    return GroupMeta(gid, gid, 0, 0, 0, 4, sum(tokens.values()), 0.0, 0.0, 0.0, 0.0, extra={"agent_tokens": tokens})


def test_the_ledger_reconciles_each_policy_with_its_own_agents_tokens():
    kept = [(_meta(0, {"a": 5, "b": 3}), None), (_meta(1, {"a": 4, "b": 0}), None)]
    issued = [{"event": "issued", "group": g, "row": g, "actor": 0, "version": 0} for g in (0, 1)]
    learned = {"a": [(0, 5), (1, 4)], "b": [(0, 3)]}
    events = policy_step_events(kept, learned, {"a": True, "b": True}, {"a": "a", "b": "b"}, 1)
    assert events[0]["policies"] == {"a": 5, "b": 3} and events[1]["policies"] == {"a": 4}
    assert reconcile(issued + events).ok
    # a policy that trained on the other agent's rows too: caught, named
    wrong = policy_step_events(kept, {"a": [(0, 8), (1, 4)], "b": [(0, 3)]}, {"a": True, "b": True}, {"a": "a", "b": "b"}, 1)
    rec = reconcile(issued + wrong)
    assert not rec.ok and "policy a" in str(rec.violations[0]) and "counted 5 tokens, the learner trained on 8" in str(rec.violations[0])
    # a policy's report missing
    rec = reconcile(issued + [e for e in events if e.get("policy") != "b"])
    assert not rec.ok and "no learner report" in str(rec.violations[0])
    # a group whose only policy skipped the step is dropped, the other one trained
    skipped = policy_step_events(kept, {"a": [], "b": [(0, 3)]}, {"a": False, "b": True}, {"a": "a", "b": "b"}, 1)
    assert [e["event"] for e in skipped[:2]] == ["trained", "dropped"] and skipped[0]["policies"] == {"b": 3}
    assert reconcile(issued + skipped).ok


def test_engine_time_per_agent_adds_up_over_rollout_actors():
    from rlhub.run_report import agent_engine_seconds

    stats = [{"agent_generate_seconds": {"a": 1.0}}, {"agent_generate_seconds": {"a": 0.5, "b": 2.0}}, {}]
    assert agent_engine_seconds(stats) == {"agents/a/engine_s": 1.5, "agents/b/engine_s": 2.0}
    assert agent_engine_seconds([{}]) == {}


def test_policy_metrics_merge_per_policy_and_refuse_policies_out_of_step():
    def m(tokens: float, version: int, learned: list) -> dict:
        return {"train/loss": tokens / 10, "train/tokens": tokens, "train/policy_updated": 1.0, "version": version,
                "learned": learned, "lost_groups": []}

    out = merge_policy_metrics({"a": m(10.0, 3, [(0, 10)]), "b": m(4.0, 3, [(0, 2), (1, 2)])})
    assert out["train/tokens"] == 14.0 and out["train/groups"] == 2.0 and out["train/loss"] == 1.0
    assert out["policies/b/train/loss"] == pytest.approx(0.4) and out["policies_updated"] == {"a": True, "b": True}
    assert out["learned"] == {"a": [(0, 10)], "b": [(0, 2), (1, 2)]}
    with pytest.raises(RuntimeError, match="out of step"):
        merge_policy_metrics({"a": m(1.0, 3, []), "b": m(1.0, 4, [])})


def test_separate_policies_are_refused_where_they_cannot_work():
    from rlhub.config import ConfigError, load_config
    from rlhub.env_check import check_env

    with pytest.raises(ConfigError, match="has one agent"):
        check_env(load_config(["agents.policies=separate"]))
    with pytest.raises(ConfigError, match="critic"):
        check_env(load_config(["experiment=propose_check", "agents.policies=separate", "algorithm=ppo"]))
    with pytest.raises(ConfigError, match="shared or separate"):
        load_config(["agents.policies=each"])
    assert load_config(["agents.policies=separate"]).agents.policy_of(("x", "y")) == {"x": "x", "y": "y"}
    assert load_config([]).agents.policy_of(("x", "y")) == {}


class Either(Relay):
    """Relay, but row 1's match opens with agent b (whose one message ends it)."""

    def dataset(self, split):
        return [{"first": "a"}, {"first": "b"}]

    def reset(self, row):
        return {"a": "A:", "b": "B:"}, {"said": None, "first": row["first"]}

    def first_agent(self, state):
        return state["first"]


def test_one_policys_long_turns_do_not_hold_back_the_groups_another_policy_finishes(tokenizer):
    """Continuous engines of two policies take turns a slice at a time (rollout.policy_slice_s): while a's
    engine is still on its long turn, the group where b acts comes back, finished."""
    from collections import deque

    from scripted import SteppedEngine

    eos = tokenizer.eos_token_id
    slow, quick = SteppedEngine(40, 5, eos), SteppedEngine(2, 5, eos)
    sync_a, sync_b = InMemoryWeightSync(), InMemoryWeightSync()
    cfg = RolloutConfig(max_new_tokens=48, max_model_len=128, max_turns=3, continuous=True)
    store = InMemoryDataStore(prompts_per_step=2, max_staleness=100)
    worker = RolloutWorker(0, cfg, 2, 2, slow, Either(), tokenizer, store, sync_a, DataSide(), PROBE, env_name="either",
                           policies={"a": (slow, sync_a), "b": (quick, sync_b)}, policy_of={"a": "a", "b": "b"})
    assert worker.continuous
    worker.start_groups([0, 1])
    queue: deque = deque()
    first = None
    while first is None or not first.episodes:  # each call: a slice of each engine
        assert worker.turns.stream(worker.open, worker.sampling, queue)
        first = queue.popleft()
    assert {e.agent for e in first.episodes} == {"b"} and len(first.episodes) == 2  # b's turns of the match it opened
    assert slow.pending() == 2 and slow.steps == 2  # a's long turns still generating, as many steps in as b's took
    worker.turns.answer(first)
    assert sum(g.complete for g in worker.open.values()) == 1  # b's match ended: its group is done before a's turns are


def test_export_and_eval_ask_for_one_policy_of_a_separate_policies_checkpoint(tmp_path):
    from rlhub.config import ConfigError
    from rlhub.evaluation import evaluate_checkpoint
    from rlhub.export import find_policy

    ckpt = tmp_path / "checkpoints" / "step_000004"
    for agent in ("checker", "proposer"):
        (ckpt / "policies" / agent / "policy").mkdir(parents=True)
        (ckpt / "policies" / agent / "policy" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="one policy per agent; name one: .*policies/checker, .*policies/proposer"):
        find_policy(ckpt)
    assert find_policy(ckpt / "policies" / "proposer") == ckpt / "policies" / "proposer" / "policy"
    with pytest.raises(ConfigError, match="separate policies"):
        evaluate_checkpoint(str(ckpt), [])


def test_each_policys_engine_loads_the_first_version_published_to_it_whatever_the_others_loaded(tokenizer):
    """The worker's counters are shared by its engines; whether an engine has loaded anything yet is its own."""
    from rlhub.rollout import VerifiedWeights
    from rlhub.rollout.records import WorkerStats

    eos = tokenizer.eos_token_id
    stats = WorkerStats()
    (engine_a, sync_a), (engine_b, sync_b) = [(ScriptedEngine([[eos]], eos), InMemoryWeightSync()) for _ in range(2)]
    weights = [VerifiedWeights(0, e, s, PROBE, 1e-4, stats) for e, s in ((engine_a, sync_a), (engine_b, sync_b))]
    for sync in (sync_a, sync_b):  # version 0 of each policy: the warm-started weights, not the ones the engines were built from
        sync.push({"w": torch.zeros(1)}, 0, torch.zeros(len(PROBE) - 1))
    for w in weights:
        w.sync()
    assert [w.loads for w in weights] == [1, 1] and stats.syncs == 2
