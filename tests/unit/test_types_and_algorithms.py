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


def test_micro_batches_cover_every_row_once_within_both_limits_each_cut_to_its_longest_row():
    from rlhub.types import micro_batches

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 120, (37,), generator=gen)
    for max_seqs, max_tokens in ((8, 0), (64, 500), (3, 200), (64, 50)):
        parts = micro_batches(lengths, max_seqs, max_tokens)
        rows = torch.cat([idx for idx, _ in parts])
        assert sorted(rows.tolist()) == list(range(37))
        for idx, width in parts:
            assert width == int(lengths[idx].max())  # cut to its longest row, nothing real cut off
            assert len(idx) <= max_seqs
            assert not max_tokens or len(idx) * width <= max_tokens or len(idx) == 1
    # padded tokens computed independently: sorted rows waste less than the batch padded to its longest
    parts = micro_batches(lengths, 8, 0)
    assert sum(len(idx) * w for idx, w in parts) < 37 * int(lengths.max())


def test_rows_keeps_the_real_tokens_and_cuts_only_padding():
    from rlhub.types import micro_batches

    samples = [Sample([1, 2, 3], [4] * n, [-0.5] * n, [0] * n, float(n), None, "stop") for n in (1, 7, 3)]
    batch = collate([GroupTensors.from_samples(samples, torch.tensor([1.0, -1.0, 0.5]), 0)], 0)
    for idx, width in micro_batches(batch.attention_mask.sum(-1), 2, 0):
        part = batch.rows(idx, width)
        assert part.input_ids.shape[1] == width and part.completion_mask.shape[1] == width - 1
        assert part.completion_mask.sum() == batch.completion_mask[idx].sum()
        assert torch.equal(part.rewards, batch.rewards[idx])
        assert torch.equal(part.advantages, batch.advantages[idx][:, : width - 1])
