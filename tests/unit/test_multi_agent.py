"""Multi-agent episodes with one shared policy: turns, what each agent sees, its loss mask, versions and rewards.

A scripted two-agent environment and a scripted engine make every token's
place known in advance: each agent's sample holds its own opening (with what it
was shown before its first turn), its own turns as loss-carrying tokens, the
other agent's words only as observation tokens, each token's policy version
from the engine call that produced it, and its own rewards; each agent's
samples form their own advantage group. The built-in environments' rules are
checked move by move.
"""

from __future__ import annotations

import pytest
import torch

from rlhub.datastore import InMemoryDataStore
from rlhub.envs.base import ModelMessage, StepResult, is_multi_agent
from rlhub.rollout import DataSide, RolloutConfig, RolloutWorker
from rlhub.weight_sync import InMemoryWeightSync, probe_sequence
from scripted import ScriptedEngine


class Relay:
    """A speaks, B sees A's words and answers; A is paid 0.5 for speaking and 0.25 more at the end, B
    is paid 1 if it repeated what A said. B's first message ends the match."""

    agents = ("a", "b")

    def dataset(self, split):
        return [{"q": "go"}]

    def reset(self, row):
        return {"a": "A:", "b": "B:"}, {"said": None}

    def first_agent(self, state):
        return "a"

    def step(self, state, message):
        if message.agent == "a":
            state["said"] = str(message)
            return StepResult(0.0, done=False, next_agent="b", rewards={"a": 0.5}, observations={"b": f"[{message}]"})
        ok = str(message) == state["said"]
        return StepResult(1.0, done=True, rewards={"a": 0.25, "b": float(ok)}, successes={"a": True, "b": ok})


def _worker(tokenizer, env, engine, group_size=2, **rollout):
    cfg = RolloutConfig(max_new_tokens=rollout.pop("max_new_tokens", 3), max_model_len=64, prompts_per_batch=1,
                        max_turns=rollout.pop("max_turns", 3), **rollout)
    store = InMemoryDataStore(prompts_per_step=1, max_staleness=100)
    worker = RolloutWorker(0, cfg, group_size, 1, engine, env, tokenizer, store, InMemoryWeightSync(), DataSide(),
                           probe_sequence(259), env_name="relay")
    return worker, store


def test_each_agent_holds_its_own_context_loss_versions_and_rewards(tokenizer):
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    eos = tokenizer.eos_token_id
    said = enc("hi") + [eos]
    engine = ScriptedEngine([said, said], eos)  # call 0 (version 0): every A; call 1 (version 1): every B
    worker, store = _worker(tokenizer, Relay(), engine)
    worker.generate_groups([0])
    (meta, t), = store.get_batch(1, 0)
    assert t.agents.tolist() == [0, 1, 0, 1]  # two matches, an episode per agent
    assert [len(c[1]) for c in engine.calls] == [2, 2]  # the As of both matches in one call, then the Bs
    for i in range(4):
        row = t.input_ids[i][t.attention_mask[i].bool()].tolist()
        gen = t.completion_mask[i].bool()
        if t.agents[i] == 0:
            assert row == enc("A:") + said  # A never sees B's words
            assert t.versions[i][gen].tolist() == [0] * len(said)
            assert t.rewards[i] == pytest.approx(0.75)
        else:
            # B's opening holds what it was shown before its first turn; its own turn is all it trains on
            assert row == enc("B:") + enc("[hi]") + said
            assert t.input_ids[i, 1:][gen].tolist() == said and t.versions[i][gen].tolist() == [1] * len(said)
            assert t.rewards[i] == pytest.approx(1.0)
    # each agent is its own group: equal rewards within an agent give zero advantages, not A against B
    assert torch.count_nonzero(t.advantages) == 0
    assert meta.extra["agents"] == {"a": [2, 1.5, 2, 2 * len(said)], "b": [2, 2.0, 2, 2 * len(said)]}


def test_a_later_observation_follows_the_agents_last_turn(tokenizer):
    class PingPong(Relay):
        """a, b, a: the second time a speaks it has seen b's answer after its own first turn."""

        def step(self, state, message):
            turns = state.setdefault("turns", 0) + 1
            state["turns"] = turns
            if turns == 1:
                return StepResult(0.0, done=False, next_agent="b", rewards={}, observations={"b": "<1>"})
            if turns == 2:
                return StepResult(0.0, done=False, next_agent="a", rewards={}, observations={"a": "<2>"})
            return StepResult(1.0, done=True, rewards={"a": 1.0, "b": 0.5})

    enc = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    eos = tokenizer.eos_token_id
    x, y, z = enc("x") + [eos], enc("y") + [eos], enc("z") + [eos]
    worker, store = _worker(tokenizer, PingPong(), ScriptedEngine([x, y, z], eos))
    worker.generate_groups([0])
    (meta, t), = store.get_batch(1, 0)
    a = (t.agents == 0).nonzero()[0, 0]
    row = t.input_ids[a][t.attention_mask[a].bool()].tolist()
    assert row == enc("A:") + x + enc("<2>") + z
    mask = t.completion_mask[a][t.attention_mask[a][1:].bool()].tolist()
    assert mask == [0.0] * (len(enc("A:")) - 1) + [1.0] * len(x) + [0.0] * len(enc("<2>")) + [1.0] * len(z)
    assert t.versions[a][t.completion_mask[a].bool()].tolist() == [0] * len(x) + [2] * len(z)


class Broken(Relay):
    def step(self, state, message):
        return StepResult(0.0, done=False, next_agent="nobody", rewards={})


def test_a_bad_answer_drops_the_whole_match_and_counts_it(tokenizer):
    eos = tokenizer.eos_token_id
    worker, store = _worker(tokenizer, Broken(), ScriptedEngine([[eos]], eos))
    worker.generate_groups([0])
    stats = store.stats()
    assert stats["dropped"] == {"env_error": 1} and stats["dropped_samples"]["env_error"] == 4  # 2 matches x 2 agents
    assert worker.stats.failure_reports[0]["error"] == "ValueError"


def test_the_built_in_cooperative_rules():
    from rlhub.envs.multi_agent import ProposeCheckEnv

    env = ProposeCheckEnv(max_operand=4)
    assert is_multi_agent(env)
    row = {"a": 2, "b": 3, "answer": 5}
    say = lambda agent, text: ModelMessage(text, agent=agent)  # noqa: E731
    openings, state = env.reset(row)
    assert openings == {"proposer": "P:2+3=", "checker": "C:2+3="} and env.first_agent(state) == "proposer"
    r = env.step(state, say("proposer", "5"))
    assert r.next_agent == "checker" and r.observations == {"checker": "5?"} and not r.done
    r = env.step(state, say("checker", "5"))
    assert r.done and r.rewards == {"proposer": 1.0, "checker": 1.0}
    _, state = env.reset(row)
    env.step(state, say("proposer", "4"))
    r = env.step(state, say("checker", "5"))
    assert r.next_agent == "proposer" and r.observations == {"proposer": "5!"}
    assert env.step(state, say("proposer", "5")).rewards == {"proposer": 1.0, "checker": 1.0}  # revised to agree
    _, state = env.reset(row)
    env.step(state, say("proposer", "4"))
    assert env.step(state, say("checker", "4")).rewards == {"proposer": 0.0, "checker": 0.0}  # agreed, but wrong
    _, state = env.reset(row)
    env.step(state, say("proposer", "4"))
    env.step(state, say("checker", "5"))
    assert env.step(state, say("proposer", "4")).rewards == {"proposer": 0.0, "checker": 0.0}  # right checker, never agreed


def test_the_built_in_competitive_rules():
    from rlhub.envs.multi_agent import NimEnv

    env = NimEnv()
    say = lambda agent, text: ModelMessage(text, agent=agent)  # noqa: E731
    openings, state = env.reset({"pile": 5, "copy": 0})
    assert openings == {"first": "N5:", "second": "M5:"}
    r = env.step(state, say("first", "1"))
    assert r.next_agent == "second" and r.observations == {"second": "1>4:"}
    r = env.step(state, say("second", "3"))
    assert r.next_agent == "first" and state["pile"] == 1
    r = env.step(state, say("first", "1"))  # takes the last stone
    assert r.done and r.rewards == {"first": 1.0, "second": 0.0} and r.successes == {"first": True, "second": False}
    _, state = env.reset({"pile": 5, "copy": 0})
    r = env.step(state, say("first", "4"))  # illegal: loses at once
    assert r.done and r.rewards == {"first": 0.0, "second": 1.0}
    _, state = env.reset({"pile": 2, "copy": 0})
    assert env.step(state, say("first", "3")).rewards == {"first": 0.0, "second": 1.0}  # more than the pile holds
    cut = ModelMessage("2", finish_reason="length", agent="first")
    _, state = env.reset({"pile": 5, "copy": 0})
    assert env.step(state, cut).rewards["second"] == 1.0  # a move cut off at the token limit is no move


def test_the_doc_examples_hold():
    import doctest

    import rlhub.envs.multi_agent
    import rlhub.rollout.matches

    for module in (rlhub.rollout.matches, rlhub.envs.multi_agent):
        assert doctest.testmod(module).failed == 0


def test_the_references_example_runs_as_written(tokenizer):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "environments.md").read_text()
    section = text[text.index("## Several agents"):]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    scope: dict = {}
    exec(compile(code, "docs/environments.md", "exec"), scope)
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    eos = tokenizer.eos_token_id
    cat = enc("cat") + [eos]
    worker, store = _worker(tokenizer, scope["Relay"](), ScriptedEngine([cat], eos), max_new_tokens=4)
    worker.generate_groups([0])  # row 0 is "cat": both say it
    (meta, t), = store.get_batch(1, 0)
    assert t.rewards.tolist() == [1.0, 1.0, 1.0, 1.0] and meta.success_mean == 0.5  # only the listener has a success
    listener = (t.agents == 1).nonzero()[0, 0]
    assert t.input_ids[listener][t.attention_mask[listener].bool()].tolist() == enc("Repeat what you hear:") + enc(" cat") + cat
