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
# the KL to the learner's own frozen reference in the loss: the ranks hold a sharded copy, and it is a forward
# between the policy's forward and backward of every micro-batch
ALGOS["token_mean+kl"] = AlgorithmConfig(lr=1e-3, adam_eps=1e-3, loss_agg="token_mean", micro_batch_size=2, grad_clip=1.0,
                                         kl_coef=0.5, kl_penalty="loss", reference="learner", batch_normalize=True)
# entropy_top_p: the threshold is the whole step's, over both ranks' entropies (gathered), and the
# selected-token count that normalises the loss is summed over them
ALGOS["token_mean+entropy_top_p"] = AlgorithmConfig(lr=1e-3, adam_eps=1e-3, loss_agg="token_mean", micro_batch_size=2, grad_clip=1.0,
                                                    token_selection="entropy_top_p", token_selection_p=0.3)


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


def train_ep(ranks, model_path: str, algo: AlgorithmConfig, seed: int, ep_balance: str) -> dict:
    """`train` with the experts split over the two ranks; and how many expert weights LLEP moved."""
    out = train(ranks, model_path, algo, seed, ep_balance=ep_balance, ep_capacity=1.0)
    out["weights_received"] = sum(m["learner/ep_weights_moved"] for m in out["metrics"])
    return out


@pytest.mark.parametrize("ep_balance", ["standard", "llep"])
def test_expert_parallel_ranks_equal_one_rank(tiny_model_path, one_rank, ep_balance):
    """Experts split over 2 ranks (all_to_all dispatch), replay and global-batch balance on; LLEP at
    capacity 1.0 moves experts between the ranks on every step, and the update is still one rank's."""
    two = run_ranks(train_ep, 2, tiny_model_path, ALGOS["token_mean"], 7, ep_balance, expert_parallel=2)
    assert max_diff(two[0]["params"], one_rank["token_mean"]["params"]) < TOL
    assert max_diff(two[1]["params"], two[0]["params"]) == 0.0
    assert (two[0]["weights_received"] > 0) == (ep_balance == "llep")
    assert all(m["learner/ep_pairs_max_over_mean"] <= 1.0 + 0.05 for m in two[0]["metrics"]) or ep_balance == "standard"


CRITIC = AlgorithmConfig(advantage="gae", critic_lr=3e-3, adam_eps=1e-3, micro_batch_size=2, value_clip=0.2)


def train_critic(ranks, model_path: str, seed: int) -> dict[str, torch.Tensor]:
    """Three critic steps (value regression, global-batch balance of its routers) on the batches of `train`."""
    from rlhub.models.build import ModelConfig
    from rlhub.moe import MoEConfig
    from rlhub.parallel.layout import Layout
    from rlhub.scorers import Critic

    layout = Layout(ranks) if ranks is not None else None
    critic = Critic(model_path, ModelConfig(), CRITIC, seed=3, moe=MoEConfig(balance="global_batch"), ranks=ranks, layout=layout)
    g = torch.Generator().manual_seed(seed)
    for batch in make_batches(seed):
        for t in batch:
            t.values = torch.randn(t.completion_mask.shape, generator=g) * t.completion_mask
            t.returns = torch.randn(t.completion_mask.shape, generator=g) * t.completion_mask
        if ranks is None:
            share = batch
        else:
            share = [batch[i] for i in balance([int(t.completion_mask.sum()) for t in batch], ranks.world_size)[ranks.rank]]
        critic.train_step(collate(share, 256) if share else None)
    return {k: v.clone() for k, v in critic.layout.full_items(critic.model)}


def test_a_sharded_critic_trains_the_values_one_critic_trains(tiny_model_path):
    one = train_critic(None, tiny_model_path, 5)
    two = run_ranks(train_critic, 2, tiny_model_path, 5)
    assert max_diff(two[0], one) < TOL
    assert max_diff(one, train_critic(None, tiny_model_path, 6)) > 1e-3


def full_state(learner) -> dict[str, torch.Tensor]:
    """Parameters and optimizer moments as full tensors (gathered over the ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    out = {f"param/{k}": v.clone() for k, v in learner.full_items()}
    optim = get_optimizer_state_dict(learner.model, learner.optimizer, options=StateDictOptions(full_state_dict=True))
    for name, moments in optim["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{key}/{name}"] = moments[key].clone()
    return out


def save_after_two_steps(ranks, model_path: str, directory: str) -> dict[str, torch.Tensor]:
    from pathlib import Path

    learner = _learner(model_path, ALGOS["token_mean"], ranks)
    for batch in make_batches(11)[:2]:
        share = batch if not ranks.distributed else [batch[i] for i in balance([int(t.completion_mask.sum()) for t in batch], ranks.world_size)[ranks.rank]]
        learner.train_step(collate(share, 256) if share else None)
    learner.save(Path(directory))
    return full_state(learner)


def resume(ranks, model_path: str, directory: str) -> dict[str, torch.Tensor]:
    from pathlib import Path

    learner = _learner(model_path, ALGOS["token_mean"], ranks if ranks.distributed else None)
    learner.load(Path(directory), 2)
    return full_state(learner)


def test_a_sharded_checkpoint_resumes_at_one_and_two_ranks_and_back(tiny_model_path, tmp_path):
    saved = run_ranks(save_after_two_steps, 2, tiny_model_path, str(tmp_path / "two"))[0]
    assert (tmp_path / "two" / "learner" / "index.json").is_file() and (tmp_path / "two" / "policy" / "config.json").is_file()
    fresh = run_ranks(full_state_of_fresh, 1, tiny_model_path)[0]
    assert max_diff({k: v for k, v in saved.items() if k.startswith("param/")}, fresh) > 1e-3  # the steps moved the weights
    for world in (1, 2):
        loaded = run_ranks(resume, world, tiny_model_path, str(tmp_path / "two"))[0]
        assert loaded.keys() == saved.keys() and max_diff(loaded, saved) == 0.0
    saved_one = run_ranks(save_after_two_steps, 1, tiny_model_path, str(tmp_path / "one"))[0]
    loaded = run_ranks(resume, 2, tiny_model_path, str(tmp_path / "one"))[0]
    assert max_diff(loaded, saved_one) == 0.0
    # the HF directory written from the gathered tensors is the model the ranks hold
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "two" / "policy")).state_dict()
    assert max(float((hf[k[6:]] - v).abs().max()) for k, v in saved.items() if k.startswith("param/")) == 0.0


def full_state_of_fresh(ranks, model_path: str) -> dict[str, torch.Tensor]:
    return {f"param/{k}": v.clone() for k, v in _learner(model_path, ALGOS["token_mean"]).full_items()}


def save_ep(ranks, model_path: str, directory: str) -> dict[str, torch.Tensor]:
    from pathlib import Path

    learner = _learner(model_path, ALGOS["token_mean"], ranks, ep_balance="llep")
    for batch in make_batches(11)[:2]:
        learner.train_step(collate([batch[i] for i in balance([int(t.completion_mask.sum()) for t in batch], 2)[ranks.rank]], 256))
        learner.save(Path(directory))  # a save between steps leaves the optimizer's state as it was
    return {f"param/{k}": v.clone() for k, v in learner.full_items()}


def test_an_expert_parallel_checkpoint_resumes_at_one_rank(tiny_model_path, tmp_path):
    saved = run_ranks(save_ep, 2, tiny_model_path, str(tmp_path / "ep"), expert_parallel=2)[0]
    loaded = run_ranks(resume, 1, tiny_model_path, str(tmp_path / "ep"))[0]
    assert max_diff({k: v for k, v in loaded.items() if k.startswith("param/")}, saved) == 0.0
    experts = [k for k in loaded if k.startswith("exp_avg/") and k.endswith("experts.gate_up_proj")]
    assert experts and all(float(loaded[k].abs().sum()) > 0 for k in experts)  # both ranks' slices of the moments
