"""The learner ranks on GPUs: NCCL instead of gloo, the same update as one GPU. Needs two CUDA devices."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                                  reason="needs two CUDA GPUs")]


def _train(ranks, model_path, algo, seed, ep_balance="standard"):
    """The unit tests' three steps (tests/unit/test_learner_ranks.py), on this rank's GPU."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
    from test_learner_ranks import train

    return train(ranks, model_path, algo, seed, **({"ep_balance": ep_balance} if ranks.expert_parallel > 1 else {}))


def test_two_nccl_ranks_equal_one_gpu(tiny_model_path):
    import torch.distributed as dist

    from rlhub.algorithms.config import AlgorithmConfig
    from rlhub.parallel.local import run_ranks

    algo = AlgorithmConfig(lr=1e-3, adam_eps=1e-3, micro_batch_size=2, grad_clip=1.0)
    one = run_ranks(_train, 1, tiny_model_path, algo, 7)[0]
    two = run_ranks(_train, 2, tiny_model_path, algo, 7)[0]
    assert max(float((one["params"][k].cpu() - two["params"][k].cpu()).abs().max()) for k in one["params"]) < 1e-4
    assert dist.is_nccl_available()


@pytest.mark.parametrize("ep_balance", ["standard", "llep"])
def test_expert_parallel_over_nccl(tiny_model_path, ep_balance):
    from rlhub.algorithms.config import AlgorithmConfig
    from rlhub.parallel.local import run_ranks

    algo = AlgorithmConfig(lr=1e-3, adam_eps=1e-3, micro_batch_size=2, grad_clip=1.0)
    one = run_ranks(_train, 1, tiny_model_path, algo, 7)[0]
    two = run_ranks(_train, 2, tiny_model_path, algo, 7, ep_balance, expert_parallel=2)[0]
    assert max(float((one["params"][k].cpu() - two["params"][k].cpu()).abs().max()) for k in one["params"]) < 1e-4
