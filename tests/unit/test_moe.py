"""MoE training: the engine's routing record, routing replay, load balancing, expert-load metrics."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlhub.algorithms.config import AlgorithmConfig
from rlhub.engines.base import SamplingConfig
from rlhub.engines.hf import HFEngine
from rlhub.learner import Learner
from rlhub.models.build import ModelConfig
from rlhub.moe import (
    BIAS_NAME,
    ExpertLoad,
    MoEConfig,
    Routing,
    load_balancing_loss,
    routed_positions,
)
from rlhub.types import GroupTensors, Sample, collate
from rlhub.weight_sync import probe_sequence

PROBE = probe_sequence(259)
PROMPTS = [[51, 43, 52, 61], [49, 61], [55, 43, 55, 43, 55, 61], [50, 50, 61]]


def generate_batch(engine, prompts=PROMPTS, weight_source=None, tokens=10, seed=5) -> GroupTensors:
    """The engine's completions as a learner batch (routes included), with advantages of 1."""
    outs = engine.generate(prompts, SamplingConfig(max_new_tokens=tokens, seed=seed), weight_source)
    samples = [Sample(p, c.token_ids, c.logprobs, c.versions, 0.0, None, c.finish_reason, c.routed_experts) for p, c in zip(prompts, outs)]
    return collate([GroupTensors.from_samples(samples, torch.ones(len(samples)), 256)], 256)


def learner_for(path, replay, moe=None, **algo) -> Learner:
    algo = AlgorithmConfig(**{"micro_batch_size": 2, "lr": 1e-6, **algo})
    moe = dataclasses.replace(moe or MoEConfig(), mismatch_every=1)  # the mismatch metrics on every step
    return Learner(str(path), ModelConfig(), algo, PROBE, moe=moe, replay=replay)


def own_routes(model, input_ids: torch.Tensor) -> torch.Tensor:
    """[T-1, L, K] a plain full forward's top-k experts per position (an independent routing read-out)."""
    selected = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: selected.append(out[0].float().softmax(-1).topk(2, dim=-1).indices))
        for name, m in model.named_modules()
        if name.endswith("mlp.gate")
    ]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(selected, dim=1)[:-1]


@pytest.fixture(scope="module")
def tied_router_path(tiny_model_path, tmp_path_factory) -> Path:
    """The tiny MoE with every router at zero: all experts tie, so any perturbation flips routing."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tied")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            torch.nn.init.zeros_(p)
    model.save_pretrained(str(out))
    for f in Path(tiny_model_path).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, out / f.name)
    return out


# ---- the engine's record -----------------------------------------------------------
def test_engine_records_every_position_as_a_full_forward_routes_it(tiny_model_path):
    eng = HFEngine(tiny_model_path, seed=0)
    outs = eng.generate(PROMPTS, SamplingConfig(max_new_tokens=8, seed=1))  # left padding: prompts of 2 to 6 tokens
    for p, c in zip(PROMPTS, outs):
        ids = torch.tensor([p + c.token_ids])
        assert c.routed_experts.dtype == torch.int8 and c.routed_experts.shape == (ids.shape[1] - 1, 2, 2)
        expected = own_routes(eng.model, ids)
        assert torch.equal(c.routed_experts.long().sort(-1).values, expected.sort(-1).values)


# ---- routing replay --------------------------------------------------------------
def test_replay_at_the_engines_version_matches_its_logprobs_and_routing(tiny_model_path):
    batch = generate_batch(HFEngine(tiny_model_path, seed=0))
    assert batch.routes is not None and batch.routes.shape[:2] == batch.completion_mask.shape
    m = learner_for(tiny_model_path, replay=True).train_step(batch)
    assert m["moe/routing_replay"] == 1.0
    assert m["train/logprob_mismatch"] < 1e-5 and m["moe/logprob_mismatch_fresh"] < 1e-5
    assert m["moe/routing_mismatch_same_version"] == 0.0 and m["moe/routing_mismatch"] == 0.0
    # the record is what the forward uses: other experts for every position move the log-probs far
    batch.routes = torch.where(batch.routes >= 0, (batch.routes + 3) % 8, batch.routes)
    moved = learner_for(tiny_model_path, replay=True).train_step(batch)
    assert moved["train/logprob_mismatch"] > 1e-2 and moved["moe/logprob_mismatch_fresh"] < 1e-5


def perturb_routers(learner: Learner, scale: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in learner.model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p += scale * torch.randn(p.shape, generator=g)


def test_a_router_tie_broken_differently_is_a_mismatch_that_replay_removes(tied_router_path):
    batch = generate_batch(HFEngine(str(tied_router_path), seed=0))
    fresh = learner_for(tied_router_path, replay=False)
    replayed = learner_for(tied_router_path, replay=True)
    for learner in (fresh, replayed):
        perturb_routers(learner, 1e-4)  # a tiny logit perturbation at the tie
    off, on = fresh.train_step(batch), replayed.train_step(batch)
    # without replay the learner routes many positions elsewhere, and its log-probs move by far more
    assert off["moe/routing_mismatch_same_version"] > 0.2  # the routers would choose otherwise, replayed or not
    assert on["moe/routing_mismatch_same_version"] > 0.2
    assert off["train/logprob_mismatch"] > 1e-2
    assert off["moe/logprob_mismatch_replay"] < 1e-3
    # with replay the experts are the engine's; only the gate weights move, by the perturbation's size
    assert on["train/logprob_mismatch"] < 1e-3 and on["moe/logprob_mismatch_fresh"] > 1e-2
    assert on["train/logprob_mismatch"] == pytest.approx(off["moe/logprob_mismatch_replay"], abs=1e-6)


@pytest.mark.parametrize("replay", [True, False])  # without replay the learner at v1 cannot reproduce v1's tokens
def test_replay_across_an_inflight_update_uses_each_versions_routing(tiny_model_path, replay):
    eng = HFEngine(tiny_model_path, seed=0, selection_bias=True)
    v0 = {k: v.clone() for k, v in eng.model.state_dict().items()}
    # v1 moves layer 0's selection bias (which experts win, never the gate weights) and layer 1's MoE
    # block. Positions sampled before the swap went to v0's layer-0 experts and their keys and values
    # at layer 1 come from those experts: a learner holding v1 reproduces the tokens after the swap
    # only if it routes those earlier positions as v0 did, that is, only with replay
    g = torch.Generator().manual_seed(3)
    v1 = {k: v + (0.5 if k.endswith("gate.weight") else 0.05) * torch.randn(v.shape, generator=g) if k.startswith("model.layers.1.mlp.") else v.clone() for k, v in v0.items()}
    v1[f"model.layers.0.mlp.gate.{BIAS_NAME}"][5] = 10.0
    calls = {"n": 0}

    def source() -> bool:
        calls["n"] += 1
        if calls["n"] == 3:
            eng.load_weights(v1, version=1)
            return True
        return False

    batch = generate_batch(eng, weight_source=source, tokens=10)
    versions = batch.versions[batch.completion_mask.bool()]
    assert set(versions.tolist()) == {0, 1} and batch.routes.shape[1] == batch.completion_mask.shape[1]
    moe = MoEConfig(balance="aux_free", bias_update_rate=0.0)
    at_v0, at_v1 = learner_for(tiny_model_path, replay, moe), learner_for(tiny_model_path, replay, moe)
    at_v1.model.load_state_dict(v1)
    at_v1.version = 1
    m0, m1 = at_v0.train_step(batch), at_v1.train_step(batch)
    assert m0["train/logprob_mismatch"] < 1e-5  # v0's tokens: before the swap nothing differs either way
    if replay:  # each version measured on the tokens it sampled
        assert m1["train/logprob_mismatch"] < 1e-5
        assert m0["moe/routing_mismatch_same_version"] == 0.0 and m1["moe/routing_mismatch_same_version"] == 0.0
        # the v0 positions went to v0's experts: v1's bias sends them to expert 5, and replay keeps v0's
        assert m1["moe/routing_mismatch"] > 0.0
    else:
        assert m1["train/logprob_mismatch"] > 1e-3


class TwoTurns:
    """A raw-text task of two turns. Its first step publishes new weights (routers moved), which the
    worker loads before the second turn: every episode's turns are sampled by two versions."""

    def __init__(self, publish) -> None:
        self.publish = publish

    def dataset(self, split):
        return [{"q": f"{a}+{a}="} for a in range(4)]

    def reset(self, row):
        return row["q"], {"turn": 0}

    def step(self, state, message):
        from rlhub.envs.base import StepResult

        state["turn"] += 1
        if state["turn"] == 1:
            self.publish()
            return StepResult(0.0, done=False, observation=" ok, again=")
        return StepResult(float(len(message)), done=True)


@pytest.mark.parametrize("replay", [True, False])
def test_multi_turn_replay_uses_each_positions_own_route_when_weights_change_between_turns(tiny_model_path, tokenizer, replay):
    from rlhub.datastore import InMemoryDataStore
    from rlhub.rollout import DataSide, RolloutConfig, RolloutWorker
    from rlhub.weight_sync import InMemoryWeightSync

    at_v0, at_v1 = learner_for(tiny_model_path, replay), learner_for(tiny_model_path, replay)
    perturb_routers(at_v1, 0.5, seed=4)  # v1: routers moved, so the positions turn 1 computed route elsewhere under v1
    at_v1.version = 1
    sync = InMemoryWeightSync()
    sync.push(at_v0.state_dict(), 0, at_v0.probe())
    published = []

    def publish() -> None:
        if not published:
            published.append(1)
            sync.push(at_v1.state_dict(), 1, at_v1.probe())

    cfg = RolloutConfig(max_new_tokens=6, max_model_len=64, prompts_per_batch=2, weight_update="batch")
    store = InMemoryDataStore(prompts_per_step=2, max_staleness=4)
    worker = RolloutWorker(0, cfg, 3, 2, HFEngine(tiny_model_path, seed=0), TwoTurns(publish), tokenizer, store, sync, DataSide(), PROBE)
    worker.generate_groups([0, 1])
    batch = collate([t for _, t in store.get_batch(2, 0)], 256)
    assert worker.stats.sync_rebuilds == 0 and worker.stats.syncs == 2
    tokens = batch.completion_mask.bool()
    assert set(batch.versions[tokens].tolist()) == {0, 1}  # turn 1 at v0, turn 2 at v1, in every episode
    assert bool((batch.routes[routed_positions(batch.attention_mask)[:, :-1]] >= 0).all())  # every routed position recorded
    m0, m1 = at_v0.train_step(batch), at_v1.train_step(batch)  # each measured on the tokens its version sampled
    if replay:
        assert m0["train/logprob_mismatch"] < 1e-5 and m1["train/logprob_mismatch"] < 1e-5
        assert m0["moe/routing_mismatch_same_version"] == 0.0 and m1["moe/routing_mismatch_same_version"] == 0.0
    else:  # v1 routes turn 1's positions elsewhere: the turn-2 tokens came from v0's routes there
        assert m1["train/logprob_mismatch"] > 1e-3


def test_the_engine_replays_given_routes_in_its_prefill_and_returns_them(tied_router_path):
    eng = HFEngine(str(tied_router_path), seed=0)
    first = eng.generate(PROMPTS, SamplingConfig(max_new_tokens=4, seed=1))
    contexts = [p + c.token_ids for p, c in zip(PROMPTS, first)]
    known = [c.routed_experts for c in first]  # positions 0 .. len(context) - 2
    forced = [torch.full_like(r, 7) for r in known]  # experts no tied router picks first (it takes the lowest ids)
    again = eng.generate(contexts, SamplingConfig(max_new_tokens=4, seed=1), routes=forced)
    for c, f in zip(again, forced):
        assert torch.equal(c.routed_experts[: f.shape[0]], f) and bool((c.routed_experts[f.shape[0]:] != 7).any())
    with pytest.raises(ValueError, match="prompt 0: routes of shape"):
        eng.generate(PROMPTS, SamplingConfig(max_new_tokens=2), routes=[torch.zeros(len(PROMPTS[0]) + 1, 2, 2)] + [None] * 3)


def test_replay_tensor_marks_unrecorded_positions_and_they_route_freshly(tied_router_path):
    from rlhub.models.logprobs import token_logprobs

    batch = generate_batch(HFEngine(str(tied_router_path), seed=0))
    batch.routes[1] = -1  # one sample whose routing was not recorded (another engine, a cut episode)
    learner = learner_for(tied_router_path, replay=True)
    perturb_routers(learner, 1e-4)  # at the tie, fresh routing goes elsewhere than the engine's
    with torch.no_grad(), learner.balancer.micro_batch(batch.attention_mask, batch.routes):
        logprobs, _, _ = token_logprobs(learner.model, batch.input_ids, batch.attention_mask)
    gap = ((logprobs - batch.old_logprobs).abs() * batch.completion_mask).sum(-1) / batch.completion_mask.sum(-1)  # [B]
    assert float(gap[[0, 2, 3]].max()) < 1e-3  # replayed: the engine's experts
    assert float(gap[1]) > 1e-2  # routed freshly: other experts


# ---- load balancing -----------------------------------------------------------------
def one_sided(expert: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.full((n, 2), -6.0)
    logits[:, expert] = 6.0
    return logits, torch.full((n, 1), expert)


def test_global_batch_balance_does_not_penalise_micro_batches_that_each_favour_one_expert():
    lopsided = [one_sided(0), one_sided(1)]  # balanced over the batch, each micro-batch on one expert
    per_micro = float(load_balancing_loss(lopsided, "micro_batch"))
    global_ = float(load_balancing_loss(lopsided, "global_batch"))
    assert per_micro == pytest.approx(2.0, abs=1e-3)  # E * 1 * 1: the worst value, as for a collapsed router
    assert global_ == pytest.approx(1.0, abs=1e-3)  # E * (1/2 * 1/2 + 1/2 * 1/2): the balanced value
    collapsed = [one_sided(0), one_sided(0)]  # both agree on a truly collapsed router
    assert float(load_balancing_loss(collapsed, "global_batch")) == pytest.approx(2.0, abs=1e-3)
    assert float(load_balancing_loss(collapsed, "micro_batch")) == pytest.approx(2.0, abs=1e-3)


@pytest.mark.parametrize("replay", [True, False])  # frequencies from the replayed routes / from a routing pass
def test_global_batch_balance_is_independent_of_micro_batching(tiny_model_path, replay):
    batch = generate_batch(HFEngine(tiny_model_path, seed=0))
    moe = MoEConfig(balance="global_batch", aux_loss_coef=1.0)
    whole = learner_for(tiny_model_path, replay, moe, micro_batch_size=64, grad_clip=1e9)
    split = learner_for(tiny_model_path, replay, moe, micro_batch_size=1, grad_clip=1e9)
    grads = {}
    for name, learner in (("whole", whole), ("split", split)):  # the gradient the optimizer is given
        learner.optimizer.step = lambda name=name, learner=learner: grads.__setitem__(
            name, {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None})
    a, b = whole.train_step(batch), split.train_step(batch)
    assert a["train/aux_loss"] == pytest.approx(b["train/aux_loss"], rel=1e-5)
    assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-4)
    router = "model.layers.0.mlp.gate.weight"
    assert grads["whole"][router].abs().max() > 1e-4  # the balance loss reaches the router: not a vacuous comparison
    for n, g in grads["whole"].items():
        assert torch.allclose(g, grads["split"][n], atol=1e-6), n
    per_micro = learner_for(tiny_model_path, replay, MoEConfig(balance="micro_batch", aux_loss_coef=1.0), micro_batch_size=1)
    assert per_micro.train_step(batch)["train/aux_loss"] > a["train/aux_loss"] + 1e-3  # one sequence is less balanced than four


def test_z_loss_is_the_mean_squared_logsumexp_of_the_router_logits(tiny_model_path):
    batch = generate_batch(HFEngine(tiny_model_path, seed=0))
    learner = learner_for(tiny_model_path, True, MoEConfig(z_loss_coef=1e-3))
    captured = []
    with learner.balancer.micro_batch(batch.attention_mask, batch.routes) as capture, torch.no_grad():
        learner.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        captured = capture.layers
    expected = np.mean([float(torch.logsumexp(rec.logits, -1).pow(2).mean()) for rec in captured])
    assert learner.train_step(batch)["train/z_loss"] == pytest.approx(expected, rel=1e-4)


def test_aux_free_bias_moves_to_underloaded_experts_and_the_engine_routes_with_it(tiny_model_path):
    batch = generate_batch(HFEngine(tiny_model_path, seed=0))
    moe = MoEConfig(balance="aux_free", bias_update_rate=0.01)
    learner = learner_for(tiny_model_path, True, moe)
    m = learner.train_step(batch)
    assert m["train/aux_loss"] == 0.0 and m["moe/selection_bias_absmax"] == pytest.approx(0.01)
    # independent count: the replayed routes of the positions that predict a token
    valid = routed_positions(batch.attention_mask)[:, :-1]
    for layer, router in enumerate(learner.balancer.routing.routers):
        counts = torch.bincount(batch.routes[:, :, layer][valid].long().flatten(), minlength=8).float()
        expected = 0.01 * torch.sign(counts.mean() - counts)
        assert torch.allclose(getattr(router, BIAS_NAME), expected)
    # a large bias decides selection, in the learner and in an engine given the learner's weights
    with torch.no_grad():
        getattr(learner.balancer.routing.routers[0], BIAS_NAME)[5] = 10.0
    state = learner.state_dict()
    assert any(k.endswith(BIAS_NAME) for k in state)
    eng = HFEngine(tiny_model_path, seed=0, selection_bias=True)
    eng.load_weights(state, version=learner.version)
    fresh = generate_batch(eng)
    layer0 = fresh.routes[:, :, 0][routed_positions(fresh.attention_mask)[:, :-1]]
    assert bool((layer0 == 5).any(-1).all())
    learner.balancer.replay = False  # the learner's own routing agrees with the engine's, bias included
    assert learner.train_step(fresh)["moe/routing_mismatch_same_version"] == 0.0
    with pytest.raises(KeyError, match="selection_bias"):
        HFEngine(tiny_model_path, seed=0).load_weights(state, version=1)  # an engine without the bias says so


def test_selection_bias_survives_a_checkpoint(tiny_model_path, tmp_path):
    moe = MoEConfig(balance="aux_free", bias_update_rate=0.05)
    learner = learner_for(tiny_model_path, True, moe)
    learner.train_step(generate_batch(HFEngine(tiny_model_path, seed=0)))
    learner.save(tmp_path)
    resumed = learner_for(tiny_model_path, True, moe)
    resumed.load(tmp_path, version=1)
    before, after = learner.balancer.routing.biases(), resumed.balancer.routing.biases()
    assert before.abs().max() > 0 and torch.equal(before, after)


def test_critic_routers_are_balanced_too(tiny_model_path):
    from rlhub.scorers import Critic

    critic = Critic(tiny_model_path, ModelConfig(), AlgorithmConfig(micro_batch_size=2, advantage="gae"), moe=MoEConfig(aux_loss_coef=0.5))
    batch = generate_batch(HFEngine(tiny_model_path, seed=0))
    batch.values = torch.zeros_like(batch.completion_mask)
    batch.returns = batch.completion_mask * 0.5
    m = critic.train_step(batch)
    assert m["critic/aux_loss"] >= 1.0 - 1e-4 and m["critic/moe/max_over_mean"] >= 1.0  # E*sum(f*P) >= 1, = 1 only balanced


def test_a_scoring_forward_inside_a_critic_training_step_shares_no_routing_state(tiny_model_path):
    """The critic actor scores in one thread while it trains in another. A score forced to run while
    the training step is between two MoE layers of its first forward (an event, not timing) must
    leave the step's losses and expert counts, and its own values, bit-identical to the serial order."""
    import threading

    from rlhub.scorers import Critic

    algo = AlgorithmConfig(micro_batch_size=2, advantage="gae")
    moe = MoEConfig(aux_loss_coef=0.5, z_loss_coef=1e-3)
    engine = HFEngine(tiny_model_path, seed=0)
    train = generate_batch(engine, seed=5)
    train.values = torch.zeros_like(train.completion_mask)
    train.returns = train.completion_mask * 0.5
    scored = generate_batch(engine, prompts=[[52, 43, 53, 61], [57, 61, 57], [49, 50, 51]], seed=9)

    serial = Critic(tiny_model_path, ModelConfig(), algo, moe=moe)
    serial_values = serial.score(scored)["values"]
    serial_metrics = serial.train_step(train)
    serial_counts = serial.balancer.load.history[-1]

    critic = Critic(tiny_model_path, ModelConfig(), algo, moe=moe)
    inside, release, out = threading.Event(), threading.Event(), {}
    trainer = threading.Thread(target=lambda: out.update(critic.train_step(train)))

    def pause(_module, _args) -> None:  # the training thread stops after layer 0 routed, before layer 1 does
        if threading.current_thread() is trainer and not inside.is_set():
            inside.set()
            release.wait(60)

    hook = critic.model.backbone.layers[1].register_forward_pre_hook(pause)
    try:
        trainer.start()
        assert inside.wait(60)
        values = critic.score(scored)["values"]  # a whole forward through both layers, meanwhile
        release.set()
        trainer.join(60)
    finally:
        hook.remove()
    assert torch.equal(values, serial_values)
    for key in ("critic/value_loss", "critic/aux_loss", "critic/z_loss", "critic/grad_norm"):
        assert out[key] == serial_metrics[key], key
    assert torch.equal(critic.balancer.load.history[-1], serial_counts)
    assert serial_metrics["critic/aux_loss"] > 0 and serial_metrics["critic/z_loss"] > 0  # the terms are there to disturb


# ---- metrics ----------------------------------------------------------------------
def test_expert_load_metrics_count_dead_experts_over_the_window():
    load = ExpertLoad(num_layers=1, num_experts=4, window=2)
    m1 = load.metrics(torch.tensor([[6.0, 2.0, 0.0, 0.0]]), torch.tensor([0.5]))
    assert m1["moe/layer0/dead_experts"] == 2 and m1["moe/layer0/max_over_mean"] == pytest.approx(3.0)
    assert m1["moe/layer0/expert0"] == pytest.approx(0.75) and m1["moe/layer0/router_entropy"] == 0.5
    m2 = load.metrics(torch.tensor([[4.0, 0.0, 4.0, 0.0]]), torch.tensor([0.5]))
    assert m2["moe/layer0/dead_experts"] == 1  # expert 2 came back; expert 1 had tokens one step ago
    m3 = load.metrics(torch.tensor([[4.0, 0.0, 4.0, 0.0]]), torch.tensor([0.5]))
    assert m3["moe/layer0/dead_experts"] == 2  # expert 1's last tokens left the window


def test_the_dead_expert_window_goes_on_across_a_checkpoint(tmp_path):
    steps = [torch.tensor([[6.0, 2.0, 0.0, 0.0]]), torch.tensor([[4.0, 0.0, 4.0, 0.0]]), torch.tensor([[4.0, 0.0, 0.0, 4.0]])]
    whole = ExpertLoad(num_layers=1, num_experts=4, window=3)
    for counts in steps[:2]:
        whole.metrics(counts, torch.tensor([0.5]))
    whole.save(tmp_path / "load.safetensors")
    resumed = ExpertLoad(num_layers=1, num_experts=4, window=3)
    resumed.load(tmp_path / "load.safetensors")
    after = whole.metrics(steps[2], torch.tensor([0.5]))
    assert resumed.metrics(steps[2], torch.tensor([0.5])) == after and after["moe/dead_experts"] == 0
    fresh = ExpertLoad(num_layers=1, num_experts=4, window=3)  # without the window: experts 1 and 2 look dead
    assert fresh.metrics(steps[2], torch.tensor([0.5]))["moe/dead_experts"] == 2
    fresh.load(tmp_path / "absent.safetensors")  # a checkpoint of an earlier rlhub: the window starts empty
    assert not fresh.history


def test_router_entropy_of_a_tied_router_is_log_of_the_expert_count(tied_router_path):
    batch = generate_batch(HFEngine(str(tied_router_path), seed=0))
    m = learner_for(tied_router_path, True).train_step(batch)
    assert m["moe/layer0/router_entropy"] == pytest.approx(float(np.log(8)), abs=1e-5)


# ---- configuration and engines -------------------------------------------------------
def test_replay_with_an_engine_that_cannot_record_routing_is_refused_at_start(monkeypatch):
    from rlhub.config import ConfigError, load_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="rollout.engine=vllm cannot return them"):
        load_config(["moe.routing_replay=rollout", "rollout.engine=vllm"])
    with pytest.raises(ConfigError, match="aux_free"):
        load_config(["moe.balance=aux_free", "rollout.engine=vllm"])
    assert load_config(["rollout.engine=vllm"]).moe.routing_replay == "auto"  # auto: fresh routing there
    with pytest.raises(ConfigError, match="moe.balance='sometimes'"):
        load_config(["moe.balance=sometimes"])


def test_vllm_routed_experts_become_position_aligned_small_integers():
    from rlhub.engines.vllm_engine import VLLMEngine

    eng = VLLMEngine.__new__(VLLMEngine)  # the conversion alone: no engine started
    eng.return_routing = True
    eng._hf_config = SimpleNamespace(num_experts=8)
    eng.stats = SimpleNamespace(extra={})
    routed = np.arange(7 * 2 * 2).reshape(7, 2, 2) % 8  # 4 prompt + 4 generated tokens -> 7 positions
    routes = eng._routes(SimpleNamespace(routed_experts=routed), prompt_len=4, num_tokens=4)
    assert routes.dtype == torch.int8 and torch.equal(routes.long(), torch.as_tensor(routed))
    assert eng._routes(SimpleNamespace(routed_experts=routed[:5]), prompt_len=4, num_tokens=4) is None
    assert eng.stats.extra["routing_missing"] == 1
    eng.return_routing = False
    assert eng._routes(SimpleNamespace(routed_experts=routed), 4, 4) is None


def test_routing_refuses_a_model_without_routers():
    with pytest.raises(ValueError, match="no top-k MoE routers"):
        Routing(torch.nn.Linear(2, 2))


def test_the_smollm2_moe_experiment_composes_with_replay_on_an_moe():
    from rlhub.config import ConfigError, load_config
    from rlhub.moe import model_is_moe

    cfg = load_config(["experiment=smollm2_moe"])
    assert (cfg.model.source, cfg.model.num_experts, cfg.model.experts_per_token) == ("smollm2_moe", 4, 2)
    assert cfg.moe.routing_replay == "rollout" and cfg.rollout.engine == "hf" and cfg.eval.before
    assert cfg.env.kwargs["chat"] is True and model_is_moe(cfg.model)
    dense = load_config(["experiment=smollm2_moe", "model.source=smollm2", "moe.routing_replay=rollout", "rollout.engine=vllm"])
    assert not model_is_moe(dense.model)  # a dense model has no routing to replay: nothing to refuse
    with pytest.raises(ConfigError, match="model.source='gpt'"):
        load_config(["model.source=gpt"])
