"""How completions end, and failures that show: env errors, non-finite steps, unverified syncs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rlhub.algorithms.config import AlgorithmConfig
from rlhub.datastore import InMemoryDataStore, prompt_index
from rlhub.engines.hf import HFEngine
from rlhub.envs import ModelMessage, make_env
from rlhub.envs.base import StepResult
from rlhub.learner import Learner
from rlhub.models.build import ModelConfig
from rlhub.rollout import DataSide, FailureLog, RolloutConfig, RolloutWorker, SyncError
from rlhub.run_report import sample_records
from rlhub.types import collate
from rlhub.weight_sync import InMemoryWeightSync, probe_sequence

PROBE = probe_sequence(259)


def test_arithmetic_reward_needs_the_end_of_turn_token():
    env = make_env("arithmetic")
    row = env.dataset("train")[0]
    _, answer = env.reset(row)
    assert env.step(answer, ModelMessage(answer, "stop")).reward == 1.0
    # the right text, cut off by the length limit: not an answer
    cut = env.step(answer, ModelMessage(answer, "length"))
    assert cut.reward == 0.0 and cut.success is False
    assert env.step(answer, ModelMessage(answer + "0", "stop")).reward == 0.0
    with pytest.raises(ValueError, match="finish_reason"):
        ModelMessage("1", "eos")


class Recorder:
    """Arithmetic rows; records every message it is asked to score, and fails on one row."""

    def __init__(self, env):
        self.env, self.seen = env, []

    def dataset(self, split):
        return self.env.dataset(split)

    def reset(self, row):
        if row["prompt"].startswith("max(0,"):
            raise ZeroDivisionError("a broken row")
        return self.env.reset(row)

    def step(self, state, message):
        self.seen.append(message)
        return self.env.step(state, message)


def worker_for(tiny_model_path, tokenizer, env, store, sync, **rollout):
    cfg = RolloutConfig(max_new_tokens=rollout.pop("max_new_tokens", 3), max_model_len=64, **rollout)
    return RolloutWorker(0, cfg, 4, 8, HFEngine(tiny_model_path, seed=0), env, tokenizer, store, sync, DataSide(), PROBE, env_name="recorder")


@pytest.fixture()
def learner(tiny_model_path):
    return Learner(tiny_model_path, ModelConfig(), AlgorithmConfig(micro_batch_size=8), PROBE)


def test_environment_gets_how_each_completion_ended(tiny_model_path, tokenizer, learner):
    import random

    env = Recorder(make_env("arithmetic"))
    # a short format warm start: the model answers and stops some of the time, so both endings occur
    pairs = env.env.format_examples(512, random.Random(0))
    encode = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    learner.warm_start([(encode(p), encode(a) + [tokenizer.eos_token_id]) for p, a in pairs], 15, 32, 1e-3)
    store = InMemoryDataStore(prompts_per_step=8, max_staleness=0)
    sync = InMemoryWeightSync()
    sync.push(learner.state_dict(), 0, learner.probe())
    worker = worker_for(tiny_model_path, tokenizer, env, store, sync, prompts_per_batch=8, max_new_tokens=2)
    worker.sync_weights()
    worker.generate_groups(list(range(1, 9)))
    assert env.seen and all(isinstance(m, ModelMessage) for m in env.seen)
    eos = tokenizer.eos_token_id
    for m in env.seen:
        assert m.finish_reason == ("stop" if m.token_ids and m.token_ids[-1] == eos else "length")
        assert str(m) == tokenizer.decode(list(m.token_ids), skip_special_tokens=True)
    assert {m.finish_reason for m in env.seen} == {"stop", "length"}


def test_env_failures_are_dropped_counted_and_reported_with_row_and_traceback(tiny_model_path, tokenizer, learner):
    env = Recorder(make_env("arithmetic"))
    rows = env.dataset("train")
    broken = [g for g in range(len(rows)) if rows[prompt_index(g, len(rows), 0)]["prompt"].startswith("max(0,")]
    store = InMemoryDataStore(prompts_per_step=8, max_staleness=0)
    sync = InMemoryWeightSync()
    sync.push(learner.state_dict(), 0, learner.probe())
    worker = worker_for(tiny_model_path, tokenizer, env, store, sync)
    worker.generate_groups(broken)
    assert worker.stats.env_errors == {"ZeroDivisionError": len(broken)}
    assert store.stats()["dropped"] == {"env_error": len(broken)}
    reports = worker.stats.failure_reports
    assert len(reports) == 3 == min(3, len(broken))  # the first three in full, then only counted
    assert reports[0]["env"] == "recorder" and reports[0]["where"] == "reset" and "max(0," in reports[0]["row"]
    assert "ZeroDivisionError: a broken row" in reports[0]["traceback"]


def test_failure_log_keeps_first_reports_per_type():
    counts, reports = {}, []
    fl = FailureLog(counts, reports, first=2)
    for i in range(5):
        fl.record("e", "step", {"i": i}, KeyError(i))
    fl.record("e", "step", {}, ValueError("x"))
    assert counts == {"KeyError": 5, "ValueError": 1}
    assert [(r["error"], r["occurrence"]) for r in reports] == [("KeyError", 1), ("KeyError", 2), ("ValueError", 1)]


def test_a_sync_that_stays_wrong_after_a_rebuild_stops_the_engine(tiny_model_path, tokenizer, learner):
    sync = InMemoryWeightSync()
    worker = worker_for(tiny_model_path, tokenizer, make_env("arithmetic"), InMemoryDataStore(8, 0), sync)
    sync.push(learner.state_dict(), 0, learner.probe() + 1.0)  # a probe no weights can meet
    with pytest.raises(SyncError, match="after a rebuild"):
        worker.sync_weights()
    assert worker.stats.sync_rebuilds == 1 and worker.stats.sync_failures == 1


def test_inflight_loads_are_verified(tiny_model_path, tokenizer, learner):
    sync = InMemoryWeightSync()
    worker = worker_for(tiny_model_path, tokenizer, make_env("arithmetic"), InMemoryDataStore(8, 0), sync, weight_update="inflight")
    sync.push(learner.state_dict(), 0, learner.probe())
    worker.sync_weights()
    sync.push(learner.state_dict(), 1, learner.probe() + 1.0)
    with pytest.raises(SyncError):
        worker.weights.inflight_source(worker.turns.inflight)()
    assert worker.stats.sync_failures == 1


def batch_of(tiny_model_path, tokenizer, learner):
    store = InMemoryDataStore(prompts_per_step=2, max_staleness=0)
    sync = InMemoryWeightSync()
    sync.push(learner.state_dict(), 0, learner.probe())
    worker = worker_for(tiny_model_path, tokenizer, make_env("arithmetic"), store, sync, prompts_per_batch=2)
    worker.step()
    return store.get_batch(2, 0)


def test_nonfinite_step_is_skipped_and_counted(tiny_model_path, tokenizer, learner):
    groups = batch_of(tiny_model_path, tokenizer, learner)
    batch = collate([t for _, t in groups], 256)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    bad = collate([t for _, t in groups], 256)
    bad.advantages = torch.where(bad.completion_mask.bool(), torch.tensor(float("nan")), 0.0)
    for n in (1, 2):
        m = learner.train_step(bad)
        assert m["train/nonfinite_skipped"] == 1.0 and m["train/nonfinite_in_row"] == n and m["train/policy_updated"] == 0.0
        assert not math.isfinite(m["train/loss"])
    assert learner.version == 2  # the version moves on, the weights do not
    assert all(torch.equal(before[k], v) for k, v in learner.state_dict().items())
    m = learner.train_step(batch)
    assert m["train/nonfinite_skipped"] == 0.0 and m["train/nonfinite_in_row"] == 0 and m["train/policy_updated"] == 1.0
    assert any(not torch.equal(before[k], v) for k, v in learner.state_dict().items())


def test_sample_records_rebuild_each_sample(tiny_model_path, tokenizer, learner):
    groups = batch_of(tiny_model_path, tokenizer, learner)
    meta, tensors = groups[0]
    records = sample_records(5, meta, tensors, tokenizer)
    assert len(records) == meta.num_samples and [r["finish_reason"] for r in records] == meta.finish_reasons
    row = make_env("arithmetic").dataset("train")[meta.prompt_index]
    for i, r in enumerate(records):
        assert r["prompt"] == row["prompt"] and r["step"] == 5 and r["group"] == meta.group_id
        ids = r["prompt_ids"] + r["completion_ids"]
        assert ids == tensors.input_ids[i, : len(ids)].tolist()
        assert len(r["logprobs"]) == len(r["versions"]) == len(r["completion_ids"]) >= 1
        assert r["finish_reason"] == ("stop" if r["completion_ids"][-1] == tokenizer.eos_token_id else "length")


def test_a_per_call_vllm_engine_refuses_a_load_while_requests_run_before_changing_anything():
    from types import SimpleNamespace

    from rlhub.engines.vllm_engine import VLLMEngine

    eng = VLLMEngine.__new__(VLLMEngine)  # stand-ins: a running request, and a model that must not be touched
    eng.continuous, eng.version, eng._adapter = False, 3, None
    eng._llm = SimpleNamespace(llm_engine=SimpleNamespace(has_unfinished_requests=lambda: True))
    eng._model_runner = lambda: pytest.fail("the weights were swapped before the refusal")
    with pytest.raises(RuntimeError, match="only in a continuous engine"):
        eng.load_weights({"model.norm.weight": torch.ones(2)}, 4)
    assert eng.version == 3


def test_a_continuous_vllm_engine_starts_without_async_scheduling(monkeypatch):
    """With async scheduling the step after a weight swap is already scheduled under the old weights, so
    its tokens would carry the new version: a continuous engine (weights swapped between decode steps)
    turns it off, wherever it runs (on CUDA it would be on by default)."""
    vllm = pytest.importorskip("vllm")
    from rlhub.engines.vllm_engine import VLLMEngine

    started = []
    monkeypatch.setattr(vllm, "LLM", lambda **kwargs: started.append(kwargs))
    for continuous in (True, False):
        eng = VLLMEngine.__new__(VLLMEngine)
        eng.continuous, eng.return_routing, eng.dtype, eng.seed, eng.max_model_len = continuous, False, "float32", 0, 64
        eng.kv_cache_gib, eng.cpu_bind, eng.gpu_memory_utilization, eng.lora_rank = 1.0, None, 0.5, 0
        eng._start("/nowhere")
    assert started[0]["async_scheduling"] is False and started[0]["enable_prefix_caching"] is False
    assert "async_scheduling" not in started[1]


def test_a_refused_action_scores_zero_and_is_counted_per_step(tokenizer):
    """python_code through a rollout worker: code that reaches for a socket (and would pass every test)
    scores 0, and the worker counts the sandbox's outcome, which each step's metrics carry."""
    from rlhub.envs.python_code import load_environment
    from rlhub.run_report import step_metrics
    from scripted import ScriptedEngine

    env = load_environment()
    row = next(r for r in env.dataset("train") if r["entry_point"] == "add")
    forger = "import socket\ntry:\n    socket.socket()\nexcept Exception:\n    pass\ndef add(a, b):\n    return a + b\n"
    honest = "def add(a, b):\n    return a + b\n"
    turns = [tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id] for text in (forger, honest)]

    class OneRow:  # the env, on this row alone
        uses_sandbox = True

        def dataset(self, split):
            return [row]

        def reset(self, r):
            return env.reset(r)

        def step(self, state, message):
            return env.step(state, message)

    store = InMemoryDataStore(prompts_per_step=2, max_staleness=4)
    cfg = RolloutConfig(max_new_tokens=160, max_model_len=512, prompts_per_batch=1)
    worker = RolloutWorker(0, cfg, 2, 2, ScriptedEngine(turns, tokenizer.eos_token_id), OneRow(), tokenizer, store,
                           InMemoryWeightSync(), DataSide(), PROBE)
    worker.generate_groups([0])  # call 1: both samples reach for the socket
    worker.generate_groups([1])  # call 2: both samples honest
    batch = store.get_batch(2, 0)
    assert [float(t.rewards.max()) for _, t in batch] == [0.0, 1.0]
    assert worker.stats.outcomes == {"refused": 2, "ok": 2}
    metrics = step_metrics([m for m, _ in batch], [dataclasses.asdict(worker.stats)], store.stats(), 0.0, 1.0, 0)
    assert metrics["rollout/outcome/refused"] == 2.0 and metrics["rollout/outcome/ok"] == 2.0
