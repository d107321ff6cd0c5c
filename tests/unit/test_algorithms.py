"""Estimators, losses, aggregation and corrections against values worked out by hand."""

import math

import pytest
import torch

from rlhub.algorithms import get_advantage, get_policy_loss
from rlhub.algorithms.advantages import gae, normalize_over_batch
from rlhub.algorithms.corrections import correct, kl_estimate
from rlhub.algorithms.losses import BatchNorms, LossConfig, PolicyLossInput, aggregate
from rlhub.rollout import overlong_penalty

R = torch.tensor([1.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_sum_to_zero_and_vanish_on_equal_rewards(name):
    fn = get_advantage(name)
    assert abs(float(fn(torch.tensor([3.0, 1.0, 0.5, 2.0])).sum())) < 1e-5
    assert torch.equal(fn(torch.full((4,), 0.7)), torch.zeros(4))


def test_estimators_by_hand():
    assert torch.allclose(get_advantage("dr_grpo")(R), torch.tensor([0.75, -0.25, -0.25, -0.25]))
    # RLOO: the baseline of sample i is the mean of the other three
    assert torch.allclose(get_advantage("rloo")(R), torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    assert torch.allclose(get_advantage("grpo")(R), torch.tensor([0.75, -0.25, -0.25, -0.25]) / math.sqrt(0.1875), atol=1e-5)
    assert torch.equal(get_advantage("reinforce_pp")(R), R)


def test_global_batch_normalisation_ignores_padding():
    adv = torch.tensor([[2.0, 2.0, 9.0], [0.0, 0.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    out = normalize_over_batch(adv, mask)
    assert torch.allclose(out, torch.tensor([[1.0, 1.0, 0.0], [-1.0, -1.0, 0.0]]), atol=1e-5)


def test_gae_by_hand():
    # one sequence of 3 tokens, reward 1 on the last; V = (0.5, 0.5, 0.5); gamma 1, lambda 0.5
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    # deltas: 0, 0, 0.5 ; A2 = 0.5, A1 = 0 + 0.5*0.5 = 0.25, A0 = 0.125
    assert torch.allclose(adv, torch.tensor([[0.125, 0.25, 0.5]]))
    assert torch.allclose(ret, adv + values)
    # lambda = 1, gamma = 1: the advantage is the Monte-Carlo return minus the value
    adv1, _ = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert torch.allclose(adv1, torch.tensor([[0.5, 0.5, 0.5]]))


def inputs(ratios, adv, mask):
    old = torch.zeros(1, len(ratios))
    return PolicyLossInput(torch.log(torch.tensor([ratios])), old, torch.tensor([adv]), torch.tensor([mask]))


def test_ppo_clip_by_hand_with_padding():
    loss, m = get_policy_loss("ppo_clip")(inputs([1.5, 0.5, 9.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]), LossConfig(clip_eps=0.2))
    # min(1.5, 1.2) = 1.2 ; min(0.5, 0.8) = 0.5 ; the padded token does not count
    assert aggregate(loss, torch.tensor([[1.0, 1.0, 0.0]]), "token_mean", BatchNorms(2, 1)).item() == pytest.approx(-(1.2 + 0.5) / 2)
    assert m["clip_frac"].item() == pytest.approx(0.5) and m["ratio_max"].item() == pytest.approx(1.5)


def test_clip_higher_and_dual_clip():
    fn = get_policy_loss("ppo_clip")
    loss, _ = fn(inputs([1.5], [1.0], [1.0]), LossConfig(clip_eps=0.2, clip_eps_high=0.28))
    assert loss.item() == pytest.approx(-1.28)
    # negative advantage, ratio 5: plain PPO gives -min(-5, -1.2) = 5; dual clip caps it at c = 3
    plain, _ = fn(inputs([5.0], [-1.0], [1.0]), LossConfig())
    dual, _ = fn(inputs([5.0], [-1.0], [1.0]), LossConfig(dual_clip_c=3.0))
    assert plain.item() == pytest.approx(5.0) and dual.item() == pytest.approx(3.0)


def test_gspo_uses_the_length_normalised_sequence_ratio():
    # token ratios 2 and 0.5: geometric mean 1, so s = 1 and nothing is clipped
    loss, m = get_policy_loss("gspo")(inputs([2.0, 0.5, 7.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]), LossConfig())
    assert torch.allclose(loss, torch.tensor([[-1.0, -1.0, 0.0]]))
    assert m["ratio_mean"].item() == pytest.approx(1.0)
    big, _ = get_policy_loss("gspo")(inputs([4.0, 4.0], [1.0, 1.0], [1.0, 1.0]), LossConfig())
    assert big[0, 0].item() == pytest.approx(-1.2)  # s = 4, clipped at 1.2


def test_cispo_clips_the_weight_but_keeps_every_gradient():
    logp = torch.log(torch.tensor([[3.0, 0.5]])).requires_grad_(True)
    inp = PolicyLossInput(logp, torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2))
    loss, m = get_policy_loss("cispo")(inp, LossConfig(clip_eps=0.2))
    loss.sum().backward()
    # d/dlogp of -w A logp = -w A with w = clip(3, 0.8, 1.2) = 1.2 and clip(0.5) = 0.8
    assert torch.allclose(logp.grad, torch.tensor([[-1.2, -0.8]]))
    assert m["clip_frac"].item() == pytest.approx(1.0)


def test_on_policy_gradient_is_advantage_weighted_score():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = get_policy_loss("ppo_clip")(PolicyLossInput(logp, logp.detach().clone(), torch.tensor([[2.0, -1.0]]), torch.ones(1, 2)), LossConfig())
    aggregate(loss, torch.ones(1, 2), "token_mean", BatchNorms(2, 1)).backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, 0.5]]))


def test_aggregations_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    norms = BatchNorms(num_tokens=4, num_seqs=2, constant=5)
    assert aggregate(loss, mask, "token_mean", norms).item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "seq_mean_token_mean", norms).item() == pytest.approx((2 + 4) / 2)
    assert aggregate(loss, mask, "seq_mean_token_sum", norms).item() == pytest.approx((6 + 4) / 2)
    assert aggregate(loss, mask, "constant", norms).item() == pytest.approx(10 / (2 * 5))
    # micro-batches add up to the whole batch
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant"):
        parts = aggregate(loss[:1], mask[:1], mode, norms) + aggregate(loss[1:], mask[1:], mode, norms)
        assert parts.item() == pytest.approx(aggregate(loss, mask, mode, norms).item())


def test_corrections_by_hand():
    behaviour = torch.log(torch.tensor([[0.5, 0.1, 0.4]]))
    current = torch.log(torch.tensor([[0.5, 0.4, 0.1]]))  # ratios 1, 4, 0.25
    mask = torch.ones(1, 3)
    none = correct(current, behaviour, mask, "none")
    assert torch.equal(none.old_logprobs, behaviour) and torch.equal(none.weights, mask)
    tis = correct(current, behaviour, mask, "tis", cap=2.0)
    assert torch.allclose(tis.weights, torch.tensor([[1.0, 2.0, 0.25]])) and torch.equal(tis.old_logprobs, current)
    assert tis.metrics["is_truncated_frac"].item() == pytest.approx(1 / 3)
    ice = correct(current, behaviour, mask, "icepop", band=(0.5, 2.0))
    assert torch.equal(ice.mask, torch.tensor([[1.0, 0.0, 0.0]])) and ice.metrics["is_masked_frac"].item() == pytest.approx(2 / 3)
    dec = correct(current, behaviour, mask, "decoupled")
    assert torch.allclose(dec.weights, torch.tensor([[1.0, 4.0, 0.25]]))
    assert dec.metrics["is_ratio_max"].item() == pytest.approx(4.0)


def test_kl_estimators():
    lp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    log_r = math.log(2.0)
    assert kl_estimate(lp, ref, "k1").item() == pytest.approx(log_r)
    assert kl_estimate(lp, ref, "k2").item() == pytest.approx(0.5 * log_r**2)
    assert kl_estimate(lp, ref, "k3").item() == pytest.approx(0.5 - 1 + log_r)
    assert kl_estimate(lp, lp, "k3").item() == 0.0


def test_overlong_penalty_window():
    assert [overlong_penalty(n, 16, 4) for n in (12, 13, 16)] == [0.0, -0.25, -1.0]
    assert overlong_penalty(16, 16, 0) == 0.0
