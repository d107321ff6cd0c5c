"""PPO's critic, GAE on the data side, the reference scorer and the KL reward penalty."""

from __future__ import annotations

import pickle
import threading
import time

import pytest
import torch

from rlhub.algorithms.advantages import group_advantages, token_rewards
from rlhub.algorithms.config import AlgorithmConfig
from rlhub.algorithms.losses import value_loss
from rlhub.config import ConfigError, load_config
from rlhub.datastore import InMemoryDataStore
from rlhub.engines.hf import HFEngine
from rlhub.envs import make_env
from rlhub.learner import Learner
from rlhub.models.build import ModelConfig
from rlhub.models.logprobs import token_logprobs
from rlhub.rollout import DataSide, RolloutConfig, RolloutWorker
from rlhub.scorers import Critic, ReferencePolicy
from rlhub.types import GroupTensors, Sample, collate
from rlhub.weight_sync import InMemoryWeightSync, probe_sequence

PROBE = probe_sequence(259)
PPO = AlgorithmConfig(advantage="gae", critic_lr=3e-3, micro_batch_size=4, value_clip=0.2, lam=0.95)


# ---- pure functions ------------------------------------------------------------------

def test_value_loss_by_hand_with_clipping_and_padding():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    old = torch.tensor([[0.0, 0.0, 0.0]])
    ret = torch.tensor([[1.0, 1.0, 5.0]])
    v = torch.tensor([[1.0, 0.1, 7.0]], requires_grad=True)
    loss, m = value_loss(v, old, ret, mask, clip=0.2)
    # token 0: unclipped error 0, clipped value 0.2 -> 0.5 * 0.8^2 = 0.32 (the larger wins); token 1 inside the band: 0.5 * 0.81
    assert torch.allclose((loss * mask)[0, :2], torch.tensor([0.32, 0.405]))
    assert float(m["value_clip_frac"]) == pytest.approx(0.5)
    assert float(m["zero_value_loss"]) == pytest.approx(0.5)  # 0.5 * R^2 on the two real tokens; padding's R = 5 ignored
    (loss * mask).sum().backward()
    # the clipped branch is flat in V; the unclipped one has gradient V - R; padding has none
    assert torch.allclose(v.grad, torch.tensor([[0.0, -0.9, 0.0]]))
    plain, _ = value_loss(v.detach(), old, ret, mask, clip=0.0)
    assert torch.allclose((plain * mask)[0, :2], torch.tensor([0.0, 0.405]))


def test_token_rewards_put_the_reward_on_the_last_token_and_the_kl_on_every_token():
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    r = token_rewards(torch.tensor([1.0, 2.0]), mask)
    assert torch.equal(r, torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 2.0]]))
    kl = torch.full((2, 4), 0.5)
    r = token_rewards(torch.tensor([1.0, 2.0]), mask, kl, kl_coef=0.1)
    assert torch.allclose(r, torch.tensor([[0.0, -0.05, 0.95, 0.0], [0.0, -0.05, -0.05, 1.95]]))


def test_outcome_estimators_broadcast_the_sequence_advantage_over_its_tokens():
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    adv, ret = group_advantages("dr_grpo", token_rewards(torch.tensor([1.0, 0.0]), mask), mask)
    assert ret is None
    assert torch.equal(adv, torch.tensor([[0.0, 0.5, 0.5], [0.0, -0.5, 0.0]]))
    with pytest.raises(ValueError, match="critic's values"):
        group_advantages("gae", torch.zeros(2, 3), mask)
    adv, ret = group_advantages("gae", token_rewards(torch.tensor([1.0, 0.0]), mask), mask, torch.full((2, 3), 0.25), 1.0, 1.0)
    assert torch.allclose(adv, torch.tensor([[0.0, 0.75, 0.75], [0.0, -0.25, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))


def test_optional_tensors_cross_pickling_and_collate():
    s = Sample([1, 2], [3], [-0.5], [0], 1.0, True, "stop")
    g = GroupTensors.from_samples([s, s], torch.tensor([1.0, -1.0]), 0)
    assert torch.equal(g.advantages, torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
    g.values = torch.ones(2, 2)
    back = pickle.loads(pickle.dumps(g))
    assert torch.equal(back.values, g.values) and back.returns is None and back.ref_logprobs is None
    assert collate([g, back], 0).values.shape == (4, 2)
    with pytest.raises(ValueError, match="values"):
        collate([g, GroupTensors.from_samples([s, s], torch.zeros(2), 0)], 0)


# ---- configuration -----------------------------------------------------------------------

def test_ppo_preset_and_its_checks():
    cfg = load_config(["algorithm=ppo"])
    assert (cfg.algorithm.advantage, cfg.algorithm.kl_penalty, cfg.algorithm.reference) == ("gae", "reward", "actor")
    with pytest.raises(ConfigError, match="kl_penalty=reward needs algorithm.reference=actor"):
        load_config(["algorithm=ppo", "algorithm.reference=learner"])
    with pytest.raises(ConfigError, match="critic_warmup"):
        load_config(["algorithm.critic_warmup=3"])
    with pytest.raises(ConfigError, match="kl_penalty"):
        load_config(["algorithm.kl_penalty=both"])


# ---- the models ----------------------------------------------------------------------------

def worker_batch(tiny_model_path, tokenizer, data_side, scorers, learner):
    store = InMemoryDataStore(prompts_per_step=2, max_staleness=0)
    sync = InMemoryWeightSync()
    sync.push(learner.state_dict(), 0, learner.probe())
    cfg = RolloutConfig(max_new_tokens=4, max_model_len=64, prompts_per_batch=2)
    worker = RolloutWorker(0, cfg, 4, 2, HFEngine(tiny_model_path, seed=0), make_env("arithmetic"), tokenizer, store, sync, data_side, PROBE, scorers=scorers)
    worker.step()
    groups = store.get_batch(2, 0)
    assert len(groups) == 2
    return groups


@pytest.fixture()
def learner(tiny_model_path):
    return Learner(tiny_model_path, ModelConfig(), PPO, PROBE)


def test_worker_attaches_values_returns_and_reference_logprobs(tiny_model_path, tokenizer, learner):
    critic = Critic(tiny_model_path, ModelConfig(), PPO)
    reference = ReferencePolicy(tiny_model_path, ModelConfig())
    reference.load_state(learner.state_dict())
    ds = DataSide(advantage="gae", kl_coef=0.1, kl_estimator="k1", gamma=1.0, lam=0.95)
    groups = worker_batch(tiny_model_path, tokenizer, ds, [reference, critic], learner)
    for meta, t in groups:
        mask = t.completion_mask
        assert meta.extra["critic_version"] == 0
        assert t.values.shape == t.ref_logprobs.shape == t.returns.shape == mask.shape
        assert torch.equal(t.values, torch.zeros_like(mask))  # the head starts at zero
        # the reference is the learner's policy: its log-probs of the sampled tokens equal the engine's
        assert torch.allclose(t.ref_logprobs, t.old_logprobs, atol=1e-4)
        assert float((t.advantages * (1 - mask)).abs().sum()) == 0.0  # nothing off the generated tokens
        assert torch.allclose(t.returns, (t.advantages + t.values) * mask)
        # with V = 0 and KL ~ 0 the return of the first generated token is lambda^(n-1) * reward
        n = mask.sum(-1)
        first = mask.argmax(-1)
        expected = ds.lam ** (n - 1) * t.rewards
        assert torch.allclose(t.returns[torch.arange(len(n)), first], expected, atol=1e-3)


def test_critic_learns_the_returns_and_counts_versions(tiny_model_path, tokenizer, learner):
    critic = Critic(tiny_model_path, ModelConfig(), PPO)
    groups = worker_batch(tiny_model_path, tokenizer, DataSide(advantage="gae"), [critic], learner)
    batch = collate([t for _, t in groups], 256)
    batch.returns = batch.completion_mask * 0.7  # a target the zero-initialised head must move to
    # old values fixed at 0: value clipping holds V within 0.2 of them, so the loss stops at 0.5 * 0.5^2
    clipped = [critic.train_step(batch)["critic/value_loss"] for _ in range(8)]
    assert clipped[0] == pytest.approx(0.5 * 0.7**2, rel=1e-4) and clipped[-1] == pytest.approx(0.125, abs=2e-3)
    # fresh values each step (as new data would bring): the critic reaches the target
    losses = []
    for _ in range(12):
        batch.values = critic.score(batch)["values"]
        losses.append(critic.train_step(batch)["critic/value_loss"])
    assert critic.version == 20
    assert losses[-1] < 0.2 * losses[0]
    values = critic.score(batch)["values"]
    assert float((values * (1 - batch.completion_mask)).abs().sum()) == 0.0


def test_critic_checkpoint_round_trip(tiny_model_path, tokenizer, learner, tmp_path):
    critic = Critic(tiny_model_path, ModelConfig(), PPO)
    groups = worker_batch(tiny_model_path, tokenizer, DataSide(advantage="gae"), [critic], learner)
    batch = collate([t for _, t in groups], 256)
    batch.returns = batch.completion_mask.clone()
    critic.train_step(batch)
    critic.save(tmp_path / "critic")
    other = Critic(tiny_model_path, ModelConfig(), PPO)
    other.load(tmp_path / "critic")
    assert other.version == 1
    assert torch.equal(other.score(batch)["values"], critic.score(batch)["values"])
    assert critic.train_step(batch)["critic/value_loss"] == pytest.approx(other.train_step(batch)["critic/value_loss"], rel=1e-5)


def test_policy_is_frozen_during_the_critic_warmup(tiny_model_path, tokenizer):
    algo = AlgorithmConfig(advantage="gae", critic_warmup=1, lr=1e-2, micro_batch_size=8)
    learner = Learner(tiny_model_path, ModelConfig(), algo, PROBE)
    critic = Critic(tiny_model_path, ModelConfig(), algo)
    groups = worker_batch(tiny_model_path, tokenizer, DataSide(advantage="gae"), [critic], learner)
    batch = collate([t for _, t in groups], 256)
    batch.advantages = batch.completion_mask * torch.linspace(-1, 1, batch.input_ids.shape[0]).unsqueeze(-1)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    m = learner.train_step(batch)
    assert m["train/policy_updated"] == 0.0 and learner.version == 1
    assert all(torch.equal(before[k], v) for k, v in learner.state_dict().items())
    m = learner.train_step(batch)
    assert m["train/policy_updated"] == 1.0
    assert any(not torch.equal(before[k], v) for k, v in learner.state_dict().items())


def test_learner_uses_the_reference_logprobs_that_came_with_the_batch(tiny_model_path, tokenizer, learner):
    algo = AlgorithmConfig(kl_coef=0.5, reference="actor", micro_batch_size=8)
    lrn = Learner(tiny_model_path, ModelConfig(), algo, PROBE)
    groups = worker_batch(tiny_model_path, tokenizer, DataSide(), [], lrn)
    batch = collate([t for _, t in groups], 256)
    with torch.no_grad():
        own, _, _ = token_logprobs(lrn.model, batch.input_ids, batch.attention_mask)
    batch.ref_logprobs = own - 0.3 * batch.completion_mask  # a reference 0.3 nats below on every token
    m = lrn.train_step(batch)
    # k3 with log r = 0.3 on every token: exp(-0.3) - 1 + 0.3
    assert m["train/kl_ref"] == pytest.approx(float(torch.exp(torch.tensor(-0.3)) - 0.7), rel=1e-3)
    assert lrn._reference is None  # no copy of the policy was made


def perturbed(state: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    """A copy of a state dict moved by Gaussian noise: weights that differ from the model directory's."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone() for k, v in state.items()}


def test_critic_trunk_starts_from_the_policy_weights(tiny_model_path, learner):
    # bug: the critic's trunk was the model directory's random init, not the policy as RL starts (after the
    # format warm start); the causal LM's `model.*` names also had to be mapped to the bare trunk's
    policy = perturbed(learner.state_dict(), 0.01, seed=3)  # as a warm start leaves it
    critic = Critic(tiny_model_path, ModelConfig(), PPO)
    trunk = critic.model.backbone.state_dict()
    assert {f"model.{k}" for k in trunk} == set(policy) - {"lm_head.weight"}  # the same tensors, but for the prefix and the LM head
    assert not any(torch.equal(v, policy[f"model.{k}"]) for k, v in trunk.items())
    critic.load_policy(policy)
    assert all(torch.equal(v, policy[f"model.{k}"]) for k, v in critic.model.backbone.state_dict().items())
    assert not critic.model.head.weight.any() and not critic.model.head.bias.any()  # the head still starts at zero
    with pytest.raises(RuntimeError, match="Missing key"):  # a state without the whole trunk is refused, not half-loaded
        critic.load_policy({k: v for k, v in policy.items() if k != "model.norm.weight"})


def test_worker_gives_reinforce_pp_the_reward_to_go_with_the_kl_penalty(tiny_model_path, tokenizer, learner):
    # bug: with the KL in the reward, the data side gave every token the sequence's summed reward
    # (r - beta * the KL of all its tokens) instead of its reward-to-go (r - beta * the KL from it on)
    reference = ReferencePolicy(tiny_model_path, ModelConfig())
    reference.load_state(perturbed(learner.state_dict(), 0.05, seed=4))  # away from the policy: the KL is not ~0
    beta = 0.2
    groups = worker_batch(tiny_model_path, tokenizer, DataSide(advantage="reinforce_pp", kl_coef=beta, kl_estimator="k1"), [reference], learner)
    differs = False
    for _, t in groups:
        assert t.returns is None
        kl = t.old_logprobs - t.ref_logprobs  # k1
        for i in range(t.rewards.numel()):
            real = t.completion_mask[i].nonzero().flatten().tolist()
            for pos in real:
                to_go = float(t.rewards[i]) - beta * sum(float(kl[i, s]) for s in real if s >= pos)
                assert float(t.advantages[i, pos]) == pytest.approx(to_go, abs=1e-5)
            summed = float(t.rewards[i]) - beta * sum(float(kl[i, s]) for s in real)
            differs |= any(abs(float(t.advantages[i, pos]) - summed) > 1e-3 for pos in real)
        assert float(torch.where(t.completion_mask.bool(), 0.0, t.advantages).abs().sum()) == 0.0
    assert differs  # the old broadcast value would not have passed


def test_critic_steps_run_in_version_order_whatever_order_they_start_in(tiny_model_path):
    # bug: the critic actor is threaded (max_concurrency=2), and Ray does not keep the submission order of a
    # threaded actor's tasks: two queued train steps could run swapped (critic/version 2 logged before 1)
    critic = Critic(tiny_model_path, ModelConfig(), PPO)
    s = Sample([1, 2, 3], [4, 5], [-0.5, -0.5], [0, 0], 1.0, True, "stop")
    batch = GroupTensors.from_samples([s, s], torch.tensor([1.0, -1.0]), 0)
    batch.values, batch.returns = torch.zeros_like(batch.completion_mask), batch.completion_mask.clone()
    done: dict[int, dict] = {}
    late = threading.Thread(target=lambda: done.__setitem__(1, critic.train_step(batch, at_version=1)))
    late.start()  # the second step starts first: it must wait for the first, however the threads interleave
    time.sleep(0.2)
    assert critic.version == 0 and 1 not in done
    done[0] = critic.train_step(batch, at_version=0)
    late.join(timeout=120)
    assert (done[0]["critic/version"], done[1]["critic/version"]) == (1, 2)
    with pytest.raises(ValueError, match="arrived at version 2"):  # a step for a version already trained
        critic.train_step(batch, at_version=0)
    with pytest.raises(TimeoutError, match="still at version 2"):
        critic.train_step(batch, at_version=5, wait_s=0.1)
    assert critic.train_step(batch)["critic/version"] == 3  # without at_version: as before, in arrival order
