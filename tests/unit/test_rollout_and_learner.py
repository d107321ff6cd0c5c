"""A rollout worker and a learner wired through the in-memory seams, without Ray."""

import math

import pytest
import torch

from rlhub.algorithms.config import AlgorithmConfig
from rlhub.datastore import InMemoryDataStore
from rlhub.engines.hf import HFEngine
from rlhub.envs import make_env
from rlhub.envs.base import StepResult
from rlhub.learner import Learner
from rlhub.models.build import ModelConfig
from rlhub.moe import MoEConfig
from rlhub.rollout import DataSide, RolloutConfig, RolloutWorker, prompt_index
from rlhub.types import collate
from rlhub.weight_sync import InMemoryWeightSync, probe_sequence

PROBE = probe_sequence(259)


class ScriptedEnv:
    """Arithmetic, but some rows misbehave on purpose."""

    def __init__(self, rows):
        self.rows = rows

    def dataset(self, split):
        return self.rows

    def reset(self, row):
        if row["prompt"] == "boom":
            raise RuntimeError("broken row")
        return row["prompt"], row

    def step(self, state, message):
        if state.get("reward") == "nan":
            return StepResult(reward=math.nan)
        return StepResult(reward=float(message.startswith("1")), success=message == "1")


def make_worker(tiny_model_path, tokenizer, env, store, sync, group_size=4, **rollout):
    cfg = RolloutConfig(max_new_tokens=4, max_model_len=64, **rollout)
    engine = HFEngine(tiny_model_path, seed=0)
    return RolloutWorker(0, cfg, group_size, 2, engine, env, tokenizer, store, sync, DataSide(), PROBE)


@pytest.fixture()
def learner(tiny_model_path):
    return Learner(tiny_model_path, ModelConfig(), AlgorithmConfig(micro_batch_size=5), PROBE)


def test_bad_rows_are_dropped_and_counted(tiny_model_path, tokenizer, learner):
    rows = [{"prompt": "1+0="}, {"prompt": "boom"}, {"prompt": "9" * 80 + "="}, {"prompt": "2+2=", "reward": "nan"}]
    env = ScriptedEnv(rows)
    store = InMemoryDataStore(prompts_per_step=4, max_staleness=0)
    sync = InMemoryWeightSync()
    sync.push(learner.state_dict(), 0, learner.probe())
    worker = make_worker(tiny_model_path, tokenizer, env, store, sync, prompts_per_batch=4)
    worker.generate_groups([rows.index(r) for r in rows])  # ids equal rows here: one epoch, identity below
    s = store.stats()
    assert s["produced"] == 4 and s["queued"] == 1
    assert s["dropped"] == {"env_error": 1, "prompt_too_long": 1, "nonfinite_reward": 1}
    assert s["dropped_samples"]["nonfinite_reward"] == 4
    assert s["produced"] == s["consumed"] + s["dropped_total"] + s["queued"]


def test_sync_is_verified_and_a_bad_load_rebuilds(tiny_model_path, tokenizer, learner):
    store = InMemoryDataStore(2, 0)
    sync = InMemoryWeightSync()
    worker = make_worker(tiny_model_path, tokenizer, make_env("arithmetic"), store, sync)
    state = {k: v + 0.01 for k, v in learner.state_dict().items()}
    learner.model.load_state_dict(state)
    sync.push(learner.state_dict(), 1, learner.probe())

    real_load = worker.engine.load_weights

    def corrupting_load(st, version):  # a load that leaves wrong weights, as some engines do
        real_load({k: v * 0.5 for k, v in st.items()}, version)

    worker.engine.load_weights = corrupting_load
    worker.sync_weights()
    assert worker.engine.version == 1
    assert worker.stats.sync_rebuilds == 1 and worker.stats.sync_failures == 0
    assert worker.stats.last_probe_error <= 1e-4
    assert torch.allclose(worker.engine.prompt_logprobs(PROBE), learner.probe(), atol=1e-5)


def test_the_first_published_version_reaches_the_engine(tiny_model_path, tokenizer, learner):
    # version 0 is the policy after the warm start, not the weights the engine was built from
    sync = InMemoryWeightSync()
    worker = make_worker(tiny_model_path, tokenizer, make_env("arithmetic"), InMemoryDataStore(2, 0), sync)
    learner.model.load_state_dict({k: v + 0.01 for k, v in learner.state_dict().items()})
    sync.push(learner.state_dict(), 0, learner.probe())
    assert worker.engine.version == 0 and not torch.allclose(worker.engine.prompt_logprobs(PROBE), learner.probe(), atol=1e-3)
    worker.sync_weights()
    assert worker.stats.syncs == 1
    assert torch.allclose(worker.engine.prompt_logprobs(PROBE), learner.probe(), atol=1e-5)
    worker.sync_weights()  # nothing newer: no second load
    assert worker.stats.syncs == 1


def test_worker_and_learner_loop_respects_staleness(tiny_model_path, tokenizer, learner):
    max_staleness = 1
    store = InMemoryDataStore(prompts_per_step=2, max_staleness=max_staleness)
    sync = InMemoryWeightSync()
    sync.push(learner.state_dict(), 0, learner.probe())
    worker = make_worker(tiny_model_path, tokenizer, make_env("arithmetic", max_operand=3), store, sync, prompts_per_batch=2)
    for _ in range(4):
        worker.step()  # runs ahead as far as admission allows
        batch = store.get_batch(2, learner.version)
        if batch is None:
            continue
        tensors = collate([t for _, t in batch], pad_id=256)
        lag = learner.version - tensors.versions[tensors.completion_mask.bool()]
        assert int(lag.max()) <= max_staleness
        metrics = learner.train_step(tensors)
        assert math.isfinite(metrics["train/loss"]) and metrics["staleness/max"] <= max_staleness
        sync.push(learner.state_dict(), learner.version, learner.probe())
        store.set_version(learner.version)
    assert learner.version >= 2
    assert worker.stats.syncs >= 2


def test_learner_step_changes_weights_and_logs_moe_load(tiny_model_path, tokenizer, learner):
    store = InMemoryDataStore(2, 0)
    sync = InMemoryWeightSync()
    sync.push(learner.state_dict(), 0, learner.probe())
    worker = make_worker(tiny_model_path, tokenizer, make_env("arithmetic"), store, sync, prompts_per_batch=2)
    worker.step()
    batch = collate([t for _, t in store.get_batch(2, 0)], 256)
    before = learner.probe()
    m = learner.train_step(batch)
    assert learner.version == 1
    assert (learner.probe() - before).abs().max() > 0
    fracs = [m[f"moe/layer0/expert{e}"] for e in range(8)]
    assert sum(fracs) == pytest.approx(1.0, abs=1e-5) and m["moe/layer0/max_over_mean"] >= 1.0
    assert m["train/aux_loss"] > 0 and m["train/tokens"] == float(batch.completion_mask.sum())


def test_micro_batching_gives_the_same_gradient(tiny_model_path, tokenizer):
    store = InMemoryDataStore(2, 0)
    sync = InMemoryWeightSync()
    whole = Learner(tiny_model_path, ModelConfig(), AlgorithmConfig(micro_batch_size=64, grad_clip=1e9), PROBE, moe=MoEConfig(aux_loss_coef=0.0, z_loss_coef=0.0))
    split = Learner(tiny_model_path, ModelConfig(), AlgorithmConfig(micro_batch_size=3, grad_clip=1e9), PROBE, moe=MoEConfig(aux_loss_coef=0.0, z_loss_coef=0.0))
    sync.push(whole.state_dict(), 0, whole.probe())
    worker = make_worker(tiny_model_path, tokenizer, make_env("arithmetic"), store, sync, prompts_per_batch=2)
    worker.step()
    batch = collate([t for _, t in store.get_batch(2, 0)], 256)
    a, b = whole.train_step(batch), split.train_step(batch)
    assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-4)
    for (n, p), (_, q) in zip(whole.model.named_parameters(), split.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_prompt_stream_is_a_permutation_per_epoch():
    first = [prompt_index(g, 10, seed=3) for g in range(10)]
    second = [prompt_index(g, 10, seed=3) for g in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second


def test_staleness_zero_without_correction_equals_plain_on_policy_gradient(tiny_model_path, tokenizer):
    from rlhub.models.logprobs import token_logprobs

    store = InMemoryDataStore(2, 0)
    sync = InMemoryWeightSync()
    learner = Learner(tiny_model_path, ModelConfig(), AlgorithmConfig(micro_batch_size=4), PROBE, moe=MoEConfig(aux_loss_coef=0.0, z_loss_coef=0.0))
    sync.push(learner.state_dict(), 0, learner.probe())
    worker = make_worker(tiny_model_path, tokenizer, make_env("arithmetic"), store, sync, prompts_per_batch=2)
    worker.step()
    batch = collate([t for _, t in store.get_batch(2, 0)], 256)
    batch.advantages = torch.randn(batch.advantages.shape, generator=torch.Generator().manual_seed(0))  # any advantages
    # the rlhub learner's loss and gradient, micro-batched
    grads = {}
    learner.optimizer.zero_grad()
    adv = batch.advantages * batch.completion_mask
    from rlhub.algorithms.losses import BatchNorms

    norms = BatchNorms(float(batch.completion_mask.sum()), float(batch.input_ids.shape[0]))
    total = 0.0
    n, width = batch.input_ids.shape
    for lo in range(0, n, 4):
        rows = torch.arange(lo, min(lo + 4, n))
        parts, _, _ = learner._micro_batch_loss(batch.rows(rows, width), adv[rows], norms, None)  # aux and z off: no balance terms
        parts["loss"].backward()
        total += float(parts["loss"])
    grads = {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None}
    # plain on-policy REINFORCE with the group advantage, token mean, in one pass
    learner.model.zero_grad()
    logp, _, _ = token_logprobs(learner.model, batch.input_ids, batch.attention_mask)
    mask = batch.completion_mask
    plain = -(adv * logp * mask).sum() / mask.sum()
    plain.backward()
    # at ratio 1 the clipped surrogate's value is -mean(A) and its gradient is the plain one
    assert total == pytest.approx(float(-(adv * mask).sum() / mask.sum()), abs=1e-5)
    assert max(float(g.abs().max()) for g in grads.values()) > 1e-4  # the check below is not vacuous
    for n, p in learner.model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[n], p.grad, atol=1e-6), n


def test_checkpoint_restores_weights_optimizer_and_the_next_step(tiny_model_path, tokenizer, tmp_path):
    store = InMemoryDataStore(2, 0)
    sync = InMemoryWeightSync()
    learner = Learner(tiny_model_path, ModelConfig(), AlgorithmConfig(micro_batch_size=8), PROBE)
    sync.push(learner.state_dict(), 0, learner.probe())
    worker = make_worker(tiny_model_path, tokenizer, make_env("arithmetic"), store, sync, prompts_per_batch=2)
    worker.step()
    batch = collate([t for _, t in store.get_batch(2, 0)], 256)
    batch.advantages = batch.completion_mask * torch.linspace(-1, 1, batch.input_ids.shape[0]).unsqueeze(-1)
    learner.train_step(batch)
    learner.save(tmp_path)
    resumed = Learner(tiny_model_path, ModelConfig(), AlgorithmConfig(micro_batch_size=8), PROBE)
    resumed.load(tmp_path, learner.version)
    assert resumed.version == 1
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in learner.state_dict().items())  # the checkpoint's weights
    saved, loaded = learner.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[p][k], loaded[p][k]) for p in saved for k in ("exp_avg", "exp_avg_sq"))
    # Adam's moments are restored: the next step is the one the uninterrupted learner takes
    a, b = learner.train_step(batch), resumed.train_step(batch)
    assert a["train/loss"] == b["train/loss"] and a["train/grad_norm"] == b["train/grad_norm"]
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in learner.state_dict().items())


def test_warm_start_cache_gives_the_computed_weights_and_misses_on_other_inputs(tiny_model_path, tokenizer, tmp_path, monkeypatch):
    from rlhub.models.warm_cache import cached_warm_start

    monkeypatch.setenv("RLHUB_CACHE", str(tmp_path))
    examples = [(tokenizer.encode(f"{i}+{i}=", add_special_tokens=False), tokenizer.encode("7", add_special_tokens=False) + [tokenizer.eos_token_id])
                for i in range(32)]
    new = lambda: Learner(tiny_model_path, ModelConfig(), AlgorithmConfig(), PROBE)  # noqa: E731
    computed, loaded, fresh = new(), new(), new()
    m1 = cached_warm_start(computed, tiny_model_path, examples, 4, 8, 1e-3, seed=0)
    m2 = cached_warm_start(loaded, tiny_model_path, examples, 4, 8, 1e-3, seed=0)
    assert (m1["warm_start/cached"], m2["warm_start/cached"]) == (0.0, 1.0)
    assert m2["warm_start/loss_last"] == m1["warm_start/loss_last"]
    initial, a, b = fresh.state_dict(), computed.state_dict(), loaded.state_dict()
    assert any(not torch.equal(initial[k], a[k]) for k in a)  # the warm start moved the weights...
    assert all(torch.equal(a[k], b[k]) for k in a)  # ...and the cache gives them back bit for bit
    # any input that changes the result is a miss: seed, steps, examples, and cache=false computes
    for args, kwargs in [((examples, 4, 8, 1e-3), {"seed": 1}), ((examples, 5, 8, 1e-3), {"seed": 0}),
                         ((examples[:-1], 4, 8, 1e-3), {"seed": 0}), ((examples, 4, 8, 1e-3), {"seed": 0, "cache": False})]:
        assert cached_warm_start(new(), tiny_model_path, *args, **kwargs)["warm_start/cached"] == 0.0


class StreamingHF:
    """A continuous engine for the worker's seam, over the hf engine: each poll finishes the newest
    half of what runs (at least one), so completions come back out of submission order while other
    episodes keep running and new ones join."""

    def __init__(self, engine):
        self.engine, self.running, self.returned, self.most_running = engine, [], [], 0

    version = property(lambda self: self.engine.version)

    def __getattr__(self, name):  # load_weights, prompt_logprobs, rebuild, generate, close
        return getattr(self.engine, name)

    def submit(self, key, prompt, sampling, max_tokens, routes=None):
        self.running.append((key, list(prompt), sampling, max_tokens))
        self.most_running = max(self.most_running, len(self.running))

    def pending(self):
        return len(self.running)

    def poll(self):
        cut = len(self.running) - max(1, len(self.running) // 2)
        done, self.running = self.running[cut:], self.running[:cut]
        outs = self.engine.generate([p for _, p, _, _ in done], done[0][2], None, [m for *_, m in done])
        self.returned += [(key.group_id, c.token_ids) for (key, *_), c in zip(done, outs)]
        return [(key, c) for (key, *_), c in zip(done, outs)]


def test_a_continuous_engine_holds_every_group_admission_allows_and_each_turn_returns_to_its_episode(tiny_model_path, tokenizer, learner):
    store = InMemoryDataStore(prompts_per_step=2, max_staleness=2)  # 3 steps of 2 prompts in flight
    sync = InMemoryWeightSync()
    sync.push(learner.state_dict(), 0, learner.probe())
    cfg = RolloutConfig(max_new_tokens=4, max_model_len=64, continuous=True)
    engine = StreamingHF(HFEngine(tiny_model_path, seed=0))
    worker = RolloutWorker(0, cfg, 4, 2, engine, make_env("arithmetic", max_operand=3), tokenizer, store, sync, DataSide(), PROBE, max_groups=6)
    assert worker.continuous
    while store.stats()["produced"] < 6:
        worker.step(drain=False)
    assert engine.most_running == 6 * 4  # every admitted group generating at once, not one step's 2
    groups = store.get_batch(2, 0) + store.get_batch(2, 0) + store.get_batch(2, 0)
    assert sorted(meta.group_id for meta, _ in groups) == list(range(6))
    for meta, tensors in groups:  # the tokens stored for each group are those the engine returned for its episodes
        mask = tensors.completion_mask.bool()
        stored = sorted(tensors.input_ids[i, 1:][mask[i]].tolist() for i in range(mask.shape[0]))
        assert stored == sorted(t for g, t in engine.returned if g == meta.group_id)
