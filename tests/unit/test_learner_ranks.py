"""N learner ranks compute the update one rank computes: FSDP2 over gloo, two local processes.

Each scenario trains three optimizer steps on the same batches, once in one
process (the plain `Learner`, no process group) and once as two ranks that
each take their token-balanced share of the groups; the full parameters are
then compared. Routing replay and the global-batch balance are on, the
groups differ in length (so the ranks' shares and micro-batch counts
differ), and one rank gets fewer groups than the other.
"""

from __future__ import annotations

import pytest
import torch

from rlhub.algorithms.config import AlgorithmConfig
from rlhub.parallel.local import run_ranks
from rlhub.parallel.split import balance
from rlhub.types import GroupTensors, Sample, collate
from rlhub.weight_sync import probe_sequence

PROBE = probe_sequence(259)
STEPS = 3
MISMATCH = 2
TOL = 1e-5


def make_batches(seed: int, num_layers: int = 2, top_k: int = 2, experts: int = 8, groups: int = 5) -> list[list[GroupTensors]]:
    """STEPS batches of `groups` groups of 2 samples each, of varied lengths, with recorded routes and
    group ids; the rewards differ within each group, so every group carries a gradient."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(STEPS):
        batch = []
        for gid in range(groups):
            samples = []
            for j in range(2):
                p_len, c_len = int(torch.randint(3, 7, (1,), generator=g)), int(torch.randint(2, 9, (1,), generator=g))
                prompt = torch.randint(0, 250, (p_len,), generator=g).tolist()
                completion = torch.randint(0, 250, (c_len,), generator=g).tolist()
                length = p_len + c_len - 1
                routes = torch.rand(length, num_layers, experts, generator=g).argsort(-1)[..., :top_k].to(torch.int8)
                samples.append(Sample(prompt, completion, (-torch.rand(c_len, generator=g) * 3).tolist(), [step] * c_len,
                                      float(j), bool(j), "stop", routed_experts=routes))
            tensors = GroupTensors.from_samples(samples, torch.tensor([-1.0, 1.0]) * (1 + gid / 10), 256)
            tensors.group_ids = torch.full((2,), step * 100 + gid)
            batch.append(tensors)
        out.append(batch)
    return out


def _learner(model_path: str, algo: AlgorithmConfig, ranks=None, **kw):
    from rlhub.learner import Learner
    from rlhub.models.build import ModelConfig
    from rlhub.moe import MoEConfig

    return Learner(model_path, ModelConfig(), algo, PROBE, seed=0, moe=MoEConfig(balance="global_batch", mismatch_every=MISMATCH),
                   replay=True, ranks=ranks, **kw)


def train(ranks, model_path: str, algo: AlgorithmConfig, seed: int, reduce: bool = True, **kw) -> dict[str, torch.Tensor]:
    """Three steps at `ranks` (None: one process); the full parameters after them and the metrics."""
    learner = _learner(model_path, algo, ranks, **kw)
    if ranks is not None:
        ranks.reduce_normalisers = reduce
    metrics = []
    for batch in make_batches(seed):
        if ranks is None or not ranks.distributed:
            share = batch
        else:
            tokens = [int(t.completion_mask.sum()) for t in batch]
            share = [batch[i] for i in balance(tokens, ranks.world_size)[ranks.rank]]
        metrics.append(learner.train_step(collate(share, 256) if share else None))
    params = {k: v.clone() for k, v in learner.full_items()}
    return {"params": params, "metrics": metrics}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# Adam's epsilon at 1e-3: with the default 1e-8 every entry of a nearly cancelling gradient moves by about lr,
# so float32's summation order (which differs between one rank's micro-batches and two ranks') shows as
# lr-sized differences after a step; with it, an update is proportional to the gradient, as the check needs
ALGOS = {agg: AlgorithmConfig(lr=1e-3, adam_eps=1e-3, loss_agg=agg, micro_batch_size=2, grad_clip=1.0) for agg in
         ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant")}


@pytest.fixture(scope="module")
def one_rank(tiny_model_path):
    return {agg: train(None, tiny_model_path, algo, seed=7) for agg, algo in ALGOS.items()}


@pytest.mark.parametrize("agg", list(ALGOS))
def test_two_ranks_equal_one_rank_for_every_loss_aggregation(tiny_model_path, one_rank, agg):
    two = run_ranks(train, 2, tiny_model_path, ALGOS[agg], 7)
    moved = max_diff(one_rank[agg]["params"], train(None, tiny_model_path, ALGOS[agg], seed=7 + 1000)["params"])
    assert moved > 1e-3  # the batches matter: another seed's batches give other weights
    assert max_diff(two[0]["params"], one_rank[agg]["params"]) < TOL
    assert max_diff(two[1]["params"], two[0]["params"]) == 0.0
    for single, sharded in zip(one_rank[agg]["metrics"], two[0]["metrics"]):
        assert sharded["learned"] == single["learned"]  # every group trained once, by one rank
        assert sharded["train/tokens"] == single["train/tokens"]
        assert sharded["train/loss"] == pytest.approx(single["train/loss"], abs=1e-5)
        assert sharded["moe/max_over_mean"] == pytest.approx(single["moe/max_over_mean"], abs=1e-6)
        assert sharded["staleness/mean"] == pytest.approx(single["staleness/mean"])


def test_without_the_cross_rank_normalisers_the_update_differs(tiny_model_path, one_rank):
    """The same run with each rank normalising by its own share: the ranks' gradients no longer add up to
    the one-rank gradient."""
    two = run_ranks(train, 2, tiny_model_path, ALGOS["token_mean"], 7, False)
    assert max_diff(two[0]["params"], one_rank["token_mean"]["params"]) > 10 * TOL
