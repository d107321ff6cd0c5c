"""algorithm.token_selection=entropy_top_p: only the step's highest-entropy tokens carry the policy loss.

On crafted logits whose entropies are known in closed form (uniform over k
tokens: log k), the selection keeps exactly the widest distributions. In the
learner, the update ignores the advantages of the tokens left out (and does
not without the selection), and a step in several micro-batches selects
against the whole step's threshold: it trains the same weights as the step
in one micro-batch.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhub.algorithms.config import AlgorithmConfig
from rlhub.algorithms.selection import entropy_threshold, select
from rlhub.models.logprobs import entropy_of
from rlhub.types import GroupTensors, collate
from rlhub.weight_sync import probe_sequence
from scripted import random_groups


def _uniform_logits(widths: list[list[int]], vocab: int = 16) -> torch.Tensor:
    """[B, T, V] logits uniform over the first `k` tokens of each position (entropy log k)."""
    out = torch.full((len(widths), len(widths[0]), vocab), -1e9)
    for b, row in enumerate(widths):
        for t, k in enumerate(row):
            out[b, t, :k] = 0.0
    return out


def test_the_widest_distributions_are_selected_on_crafted_logits():
    widths = [[1, 8, 2, 3], [16, 1, 4, 5]]  # entropies log k
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])  # the last position is padding
    entropy = entropy_of(torch.log_softmax(_uniform_logits(widths), -1))
    assert entropy[0, 1] == pytest.approx(math.log(8), abs=1e-5)
    threshold = entropy_threshold(entropy[mask.bool()], 0.3)  # ceil(0.3 * 7) = 3 tokens: widths 16, 8, 4
    chosen = select(entropy, mask, threshold)
    assert chosen.tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]]  # the padded width 5 is not chosen
    assert select(entropy, mask, entropy_threshold(entropy[mask.bool()], 1.0)).tolist() == mask.tolist()
    # padding holding inf or NaN is never selected
    poisoned = entropy.clone()
    poisoned[1, 3] = float("nan")
    assert select(poisoned, mask, threshold)[1, 3] == 0.0


def test_the_threshold_is_the_kth_largest():
    values = torch.tensor([0.5, 0.1, 0.9, 0.9, 0.3])
    assert entropy_threshold(values, 0.2) == pytest.approx(0.9)
    assert entropy_threshold(values, 0.6) == pytest.approx(0.5)  # three of five
    assert entropy_threshold(torch.zeros(0), 0.5) == -math.inf


PROBE = probe_sequence(259)


def _batch(seed: int) -> list[GroupTensors]:
    return random_groups(seed)


def _learner(model_path: str, algo: AlgorithmConfig):
    from rlhub.learner import Learner
    from rlhub.models.build import ModelConfig

    return Learner(model_path, ModelConfig(), algo, PROBE, seed=0)


def _step(model_path: str, algo: AlgorithmConfig, batch: GroupTensors) -> tuple[dict[str, torch.Tensor], dict]:
    learner = _learner(model_path, algo)
    metrics = learner.train_step(batch)
    return {k: v.detach().clone() for k, v in learner.model.named_parameters()}, metrics


def _diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _selected_by_hand(model_path: str, batch: GroupTensors, fraction: float) -> torch.Tensor:
    """The step's top `fraction` of generated tokens by the starting policy's entropy, ranked by a sort."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    entropy = entropy_of(torch.log_softmax(logits.float(), -1))
    real = batch.completion_mask.bool()
    ranked = torch.sort(entropy[real], descending=True).values
    k = math.ceil(fraction * int(real.sum()))
    return (real & (entropy >= ranked[k - 1])).float()


def test_the_update_ignores_the_advantages_of_tokens_left_out(tiny_model_path):
    batch = collate(_batch(3), 256)
    algo = AlgorithmConfig(lr=1e-3, token_selection="entropy_top_p", token_selection_p=0.25, micro_batch_size=256)
    chosen = _selected_by_hand(tiny_model_path, batch, 0.25)
    left_out = batch.completion_mask.bool() & ~chosen.bool()
    assert 0 < chosen.sum() < batch.completion_mask.sum()
    changed = collate(_batch(3), 256)
    changed.advantages = torch.where(left_out, changed.advantages * -50.0 + 3.0, changed.advantages)

    selected, metrics = _step(tiny_model_path, algo, batch)
    assert metrics["train/selected_frac"] == pytest.approx(float(chosen.sum() / batch.completion_mask.sum()), abs=1e-6)
    assert _diff(selected, _step(tiny_model_path, algo, changed)[0]) < 1e-7
    everything = AlgorithmConfig(lr=1e-3, micro_batch_size=256)  # without the selection those advantages count
    assert _diff(_step(tiny_model_path, everything, batch)[0], _step(tiny_model_path, everything, changed)[0]) > 1e-4


def test_micro_batches_select_against_the_whole_steps_threshold(tiny_model_path):
    batch = collate(_batch(5), 256)
    # Adam's epsilon at 1e-3 makes the update proportional to the gradient (see test_learner_ranks)
    whole = AlgorithmConfig(lr=1e-3, adam_eps=1e-3, token_selection="entropy_top_p", token_selection_p=0.3, micro_batch_size=256)
    split = AlgorithmConfig(lr=1e-3, adam_eps=1e-3, token_selection="entropy_top_p", token_selection_p=0.3, micro_batch_size=1)
    one, m_one = _step(tiny_model_path, whole, batch)
    many, m_many = _step(tiny_model_path, split, batch)
    assert m_many["train/selected_frac"] == pytest.approx(m_one["train/selected_frac"], abs=1e-6)
    assert "time/learner/selection_s" in m_many  # the pre-pass ran
    assert _diff(one, many) < 1e-6
    other = AlgorithmConfig(lr=1e-3, adam_eps=1e-3, token_selection="entropy_top_p", token_selection_p=0.5, micro_batch_size=256)
    assert _diff(one, _step(tiny_model_path, other, batch)[0]) > 1e-5  # another selection moves the weights elsewhere
    # a threshold per micro-batch would keep a fraction of every row: another update
    per_row = sum(max(1, math.ceil(0.3 * int(r.sum()))) for r in batch.completion_mask)
    assert per_row != round(m_one["train/selected_frac"] * float(batch.completion_mask.sum()))


def test_cutpoints_train_only_the_low_probability_tokens(tiny_model_path):
    """SPO's probability mask: tokens the behaviour policy sampled with probability >= rho carry no loss."""
    batch = collate(_batch(4), 256)  # behaviour log-probs drawn from (-3, 0]: some tokens above log 0.5, some below
    algo = AlgorithmConfig(lr=1e-3, token_selection="cutpoints", micro_batch_size=2)
    algo.spo.rho = 0.5
    likely = batch.completion_mask.bool() & (batch.old_logprobs.exp() >= 0.5)
    assert 0 < likely.sum() < batch.completion_mask.sum()
    changed = collate(_batch(4), 256)
    changed.advantages = torch.where(likely, changed.advantages * -50.0 + 3.0, changed.advantages)
    weights, metrics = _step(tiny_model_path, algo, batch)
    share = 1.0 - float(likely.sum() / batch.completion_mask.sum())
    assert metrics["train/selected_frac"] == pytest.approx(share, abs=1e-6)
    assert _diff(weights, _step(tiny_model_path, algo, changed)[0]) < 1e-7
    everything = AlgorithmConfig(lr=1e-3, micro_batch_size=2)
    assert _diff(_step(tiny_model_path, everything, batch)[0], _step(tiny_model_path, everything, changed)[0]) > 1e-4
