"""Group tensors, the GRPO estimator and the clipped loss, against hand-worked values."""

import pytest
import torch

from rlhub.algorithms import get_advantage, get_policy_loss
from rlhub.algorithms.losses import PolicyLossInput
from rlhub.types import GroupTensors, Sample, collate


def sample(prompt, completion, reward, version=0):
    return Sample(prompt, completion, [-0.5] * len(completion), [version] * len(completion), reward, reward > 0, "stop")


def test_group_tensors_align_targets_with_completion():
    g = GroupTensors.from_samples([sample([1, 2, 3], [4, 5], 1.0, 3), sample([1, 2, 3], [6], 0.0, 2)], torch.tensor([1.0, -1.0]), pad_id=0)
    assert g.input_ids.tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 6, 0]]
    # targets are input_ids[:, 1:]; completion targets start at index p - 1 = 2
    assert g.completion_mask.tolist() == [[0, 0, 1, 1], [0, 0, 1, 0]]
    assert g.versions.tolist() == [[-1, -1, 3, 3], [-1, -1, 2, -1]]
    assert g.old_logprobs[0, 2:].tolist() == [-0.5, -0.5]


def test_collate_pads_to_widest():
    a = GroupTensors.from_samples([sample([1], [2], 1.0), sample([1], [3], 0.0)], torch.zeros(2), 0)
    b = GroupTensors.from_samples([sample([1, 2], [3, 4], 1.0), sample([1, 2], [3], 0.0)], torch.zeros(2), 0)
    c = collate([a, b], pad_id=0)
    assert c.input_ids.shape == (4, 4) and c.completion_mask.shape == (4, 3)
    assert c.completion_mask.sum() == 1 + 1 + 2 + 1


def test_grpo_advantages_by_hand():
    adv = get_advantage("grpo")(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    # mean 0.25, population std sqrt(0.1875)
    std = 0.1875 ** 0.5
    assert torch.allclose(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]) / std, atol=1e-5)
    assert abs(float(adv.sum())) < 1e-5


def test_grpo_equal_rewards_give_zero_advantage():
    assert torch.equal(get_advantage("grpo")(torch.full((4,), 3.0)), torch.zeros(4))


def test_unknown_names_are_refused():
    with pytest.raises(KeyError, match="unknown advantage estimator 'nope'"):
        get_advantage("nope")
