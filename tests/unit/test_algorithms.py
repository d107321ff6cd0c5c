"""Estimators, losses, aggregation and corrections against values worked out by hand."""

import math

import pytest
import torch

from rlhub.algorithms import get_advantage, get_policy_loss
from rlhub.algorithms.advantages import gae, group_advantages, normalize_over_batch, token_rewards
from rlhub.algorithms.corrections import correct, kl_estimate
from rlhub.algorithms.losses import BatchNorms, LossConfig, PolicyLossInput, aggregate
from rlhub.algorithms.data_side import overlong_penalty

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
    # REINFORCE++ without a KL term: every generated token's reward-to-go is the sample's reward
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    assert torch.equal(group_advantages("reinforce_pp", token_rewards(torch.tensor([1.0, 0.5]), mask), mask)[0], torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.5, 0.0, 0.0]]))


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


def test_gae_skips_environment_tokens_between_turns():
    # a two-turn episode: assistant tokens at 0, 1 and 4, 5; a tool message at 2, 3 (mask 0) and padding at 6
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.1, 0.2, 9.0, 9.0, 0.3, 0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # the same as the four assistant tokens alone, side by side: the tool tokens neither end the episode nor add a step
    dense, _ = gae(rewards[:, [0, 1, 4, 5]], values[:, [0, 1, 4, 5]], torch.ones(1, 4), gamma=1.0, lam=0.5)
    assert torch.allclose(adv[:, [0, 1, 4, 5]], dense)
    assert adv[0, 2:4].abs().sum() == 0 and adv[0, 6] == 0 and ret[0, 2] == 0


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


# ---- presets match their papers ---------------------------------------------------------

def test_gspo_preset_clips_the_sequence_ratio_as_the_paper_does():
    # bug: gspo.yaml used PPO's token-level 0.2, which a length-normalised sequence ratio almost never reaches
    from rlhub.config import load_config

    algo = load_config(["algorithm=gspo"]).algorithm
    assert (algo.policy_loss, algo.clip_eps, algo.clip_eps_high) == ("gspo", 3.0e-4, 4.0e-4)


def test_grpo_preset_averages_per_sequence_then_over_sequences():
    # bug: the grpo preset (and so the default run) aggregated with token_mean, not the paper's
    # mean over sequences of each sequence's token mean
    from rlhub.config import load_config

    assert load_config(["algorithm=grpo"]).algorithm.loss_agg == "seq_mean_token_mean"
    assert load_config([]).algorithm.loss_agg == "seq_mean_token_mean"  # grpo is the default preset


# ---- REINFORCE++'s reward-to-go and what each estimator needs --------------------------------

def reward_to_go_by_loop(rewards: list[float], kl: list[list[float]], mask: list[list[float]], beta: float) -> list[list[float]]:
    """G_t = r * 1[t = last] - beta * sum_{s >= t} KL_s over each row's generated tokens, in plain Python."""
    out = []
    for r, kl_row, m_row in zip(rewards, kl, mask):
        real = [t for t, m in enumerate(m_row) if m]
        row = [0.0] * len(m_row)
        for t in real:
            row[t] = sum((r if s == real[-1] else 0.0) - beta * kl_row[s] for s in real if s >= t)
        out.append(row)
    return out


def test_reinforce_pp_advantage_is_the_reward_to_go_with_the_kl_in_the_reward():
    # bug: with algorithm.kl_penalty=reward every token got the sequence's whole summed reward
    # (r - beta * the KL of all its tokens) instead of its reward-to-go (r - beta * the KL from it on)
    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    rewards = torch.rand(3, generator=gen)
    kl = torch.rand(3, 6, generator=gen)
    beta = 0.3
    adv, returns = group_advantages("reinforce_pp", token_rewards(rewards, mask, kl, beta), mask)
    expected = torch.tensor(reward_to_go_by_loop(rewards.tolist(), kl.tolist(), mask.tolist(), beta))
    assert returns is None
    assert torch.allclose(adv, expected, atol=1e-6)
    broadcast = (rewards - beta * (kl * mask).sum(-1)).unsqueeze(-1) * mask  # the old value
    assert not torch.allclose(adv, broadcast, atol=1e-3)
    # the learner's global normalisation still applies, over real tokens only
    normed = normalize_over_batch(adv, mask)
    real = normed[mask.bool()]
    assert abs(float(real.mean())) < 1e-5 and float(real.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_outcome_estimators_still_see_each_samples_summed_reward(name):
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    kl = torch.full((3, 4), 0.2)
    rewards = token_rewards(torch.tensor([1.0, 0.0, 0.5]), mask, kl, 0.1)
    adv, returns = group_advantages(name, rewards, mask)
    per_sample = get_advantage(name)(torch.tensor([1.0 - 0.04, -0.06, 0.5 - 0.02]))
    assert returns is None and torch.allclose(adv, per_sample.unsqueeze(-1) * mask, atol=1e-6)


def test_what_each_estimator_needs_is_registered_with_it():
    # bug: "needs a critic" was a list of names (TOKEN_LEVEL) kept apart from the estimators; a token-level
    # estimator without a critic had nowhere to say so
    from rlhub.algorithms import ADVANTAGE_NEEDS, ADVANTAGES, advantage_needs
    from rlhub.algorithms.registry import register_advantage

    assert set(ADVANTAGE_NEEDS) == set(ADVANTAGES)
    assert advantage_needs("gae").critic and advantage_needs("gae").token_rewards
    assert advantage_needs("reinforce_pp").token_rewards and not advantage_needs("reinforce_pp").critic
    for name in ("grpo", "dr_grpo", "rloo"):
        assert not advantage_needs(name).critic and not advantage_needs(name).token_rewards
    with pytest.raises(KeyError, match="unknown advantage estimator"):
        advantage_needs("nope")
    with pytest.raises(ValueError, match="token_rewards"):
        register_advantage("critic_without_token_rewards", critic=True)
    from rlhub.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="needs a critic"):  # reinforce_pp is token-level, but has no critic
        load_config(["algorithm=reinforce_pp", "algorithm.critic_warmup=2"])


# ---- masked positions are selected away, never multiplied by 0 -----------------------------

MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0, 0.0]])
PAD = MASK == 0


def poisoned(x: torch.Tensor, fill: str) -> torch.Tensor:
    """x with its padded positions set to `fill`: zeros, or the non-finite values a padded slot can hold."""
    bad = {"zeros": torch.zeros(5), "nonfinite": torch.tensor([float("inf"), float("-inf"), float("nan"), float("inf"), float("nan")])}[fill]
    return torch.where(PAD, bad.expand_as(x), x)


def learner_pass(fill: str, loss_name: str, mode: str, agg: str) -> tuple[float, dict[str, float], torch.Tensor]:
    """What the learner does with one micro-batch (correction, loss, aggregation, backward), padding set to `fill`."""
    gen = torch.Generator().manual_seed(1)
    logprobs = poisoned(-torch.rand(3, 5, generator=gen) - 0.1, fill).requires_grad_(True)
    behaviour = poisoned(-torch.rand(3, 5, generator=gen) - 0.1, fill)
    adv = poisoned(torch.randn(3, 5, generator=gen), fill)
    corr = correct(logprobs, behaviour, MASK, mode, cap=1.5, band=(0.7, 1.4))
    per_token, metrics = get_policy_loss(loss_name)(PolicyLossInput(logprobs, corr.old_logprobs, adv, corr.mask), LossConfig(clip_eps=0.1))
    loss = aggregate(per_token * corr.weights, corr.mask, agg, BatchNorms(num_tokens=8, num_seqs=3, constant=5))
    loss.backward()
    return float(loss.detach()), {k: float(v) for k, v in {**metrics, **corr.metrics}.items()}, logprobs.grad


@pytest.mark.parametrize("loss_name", ["ppo_clip", "gspo", "cispo"])
@pytest.mark.parametrize("mode", ["none", "tis", "icepop", "decoupled"])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant"])
def test_nonfinite_padding_changes_no_loss_metric_or_gradient(loss_name, mode, agg):
    # bug: masked reductions multiplied by the mask (x * mask), and inf * 0 = NaN: an inf or NaN in a padded
    # slot made the loss, the ratio metrics and every gradient NaN
    loss, metrics, grad = learner_pass("nonfinite", loss_name, mode, agg)
    ref_loss, ref_metrics, ref_grad = learner_pass("zeros", loss_name, mode, agg)
    assert math.isfinite(loss) and loss == pytest.approx(ref_loss, abs=1e-7)
    assert all(math.isfinite(v) for v in metrics.values()) and metrics == pytest.approx(ref_metrics, abs=1e-7)
    assert torch.isfinite(grad).all() and torch.allclose(grad, ref_grad, atol=1e-7)
    assert torch.equal(grad[PAD], torch.zeros(int(PAD.sum())))


def test_nonfinite_padding_in_reductions_value_loss_and_estimators():
    # bug: masked_mean, normalize_over_batch, value_loss, gae, token_rewards and group_advantages multiplied by the mask
    from rlhub.algorithms.losses import masked_mean, value_loss

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, generator=gen)
    assert masked_mean(poisoned(x, "nonfinite"), MASK).item() == pytest.approx(masked_mean(poisoned(x, "zeros"), MASK).item())
    assert torch.equal(normalize_over_batch(poisoned(x, "nonfinite"), MASK), normalize_over_batch(poisoned(x, "zeros"), MASK))
    values = torch.randn(3, 5, generator=gen)
    old, ret = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    out = {}
    for fill in ("nonfinite", "zeros"):
        v = poisoned(values, fill).requires_grad_(True)
        per_token, m = value_loss(v, poisoned(old, fill), poisoned(ret, fill), MASK, clip=0.2)
        loss = aggregate(per_token, MASK, "token_mean", BatchNorms(8, 3))
        loss.backward()
        out[fill] = (float(loss.detach()), {k: float(t) for k, t in m.items()}, v.grad)
    assert math.isfinite(out["nonfinite"][0]) and out["nonfinite"][0] == pytest.approx(out["zeros"][0])
    assert out["nonfinite"][1] == pytest.approx(out["zeros"][1])
    assert torch.isfinite(out["nonfinite"][2]).all() and torch.equal(out["nonfinite"][2], out["zeros"][2])
    kl = torch.rand(3, 5, generator=gen)
    rewards = torch.tensor([1.0, 0.0, 0.5])
    for name in ("grpo", "dr_grpo", "rloo", "reinforce_pp", "gae"):
        results = []
        for fill in ("nonfinite", "zeros"):
            tok = token_rewards(rewards, MASK, poisoned(kl, fill), 0.1)
            adv, returns = group_advantages(name, poisoned(tok, fill), MASK, poisoned(values, fill), 1.0, 0.9)
            results.append((adv, returns))
        (adv, returns), (ref_adv, ref_returns) = results
        assert torch.isfinite(adv).all() and torch.equal(adv, ref_adv), name
        assert returns is None or (torch.isfinite(returns).all() and torch.equal(returns, ref_returns)), name
