"""Expert parallelism over two gloo processes against the unsharded tiny Qwen3-MoE; the LLEP plan alone.

The two ranks run every distributed scenario in one spawn (`ep_runs`) and save what they saw; the
tests compare that with the unsharded model computed here, in the test process.
"""

from __future__ import annotations

import copy
import math
import socket
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhub.parallel.experts import (
    ep_stats,
    find_experts,
    gather_expert,
    llep_plan,
    load_expert,
    reduce_expert_grads,
    shard_experts,
)

TOL = 1e-5
WORLD = 2
BATCH = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))  # rank r feeds rows 2r, 2r+1
EXPERT_NAMES = ("experts.gate_up_proj", "experts.down_proj")


def tiny_moe(hot: int = 0, num_experts: int = 4) -> torch.nn.Module:
    """The tiny Qwen3-MoE, seed 0. `hot`: that many experts (0, 1, ...) are chosen by every token, through
    an embedding component all tokens share and the router reads. hot=1: rank 0 gets ~2/3 of the pairs
    under standard EP; hot=2: all of them, and rank 1 none."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=num_experts, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg)
    if hot:
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 0] = 0.05
            for layer in model.model.layers:
                layer.mlp.gate.weight[:hot, 0] = 0.5
    return model


def half(rank: int) -> torch.Tensor:
    return BATCH[2 * rank:2 * rank + 2]


def is_expert(name: str) -> bool:
    return name.endswith(EXPERT_NAMES)


# ---- the two ranks -----------------------------------------------------------------------------


def _gather(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def _train_step(rank: int, hot: int, balance: str, loss_weight: float = 1.0) -> dict[str, Any]:
    """One forward/backward of this rank's half; dense grads summed over the ranks, expert grads gathered."""
    model = tiny_moe(hot)
    shard_experts(model, None, balance=balance, capacity=1.25)
    with ep_stats() as stats:
        out = model(input_ids=half(rank), labels=half(rank))
        (out.loss * loss_weight).backward()
    grads, local = {}, {}
    for name, p in model.named_parameters():
        if is_expert(name):
            local[name] = p.grad.clone()
            grads[name] = _gather(p.grad)
        else:
            dist.all_reduce(p.grad)
            grads[name] = p.grad.clone()
    return {"logits": out.logits.detach(), "grads": grads, "local": local, "stats": [asdict(d) for d in stats.layers]}


def _checks(rank: int) -> dict[str, Any]:
    """Sharding bookkeeping: keys, shapes, gather/load, replicas, stats confined to their thread, errors."""
    found: dict[str, Any] = {}
    model = tiny_moe()
    before = {k: v.shape for k, v in model.state_dict().items()}
    full = find_experts(model)[0].gate_up_proj.detach().clone()
    handles = shard_experts(model)
    after = {k: v.shape for k, v in model.state_dict().items()}
    found["same_keys"] = before.keys() == after.keys()
    found["expert_shape"] = tuple(handles[0].module.gate_up_proj.shape)
    found["gather_is_full"] = torch.equal(gather_expert(handles[0].module, "gate_up_proj"), full)
    load_expert(handles[0], "gate_up_proj", full * 2)
    found["load_takes_slice"] = torch.equal(handles[0].module.gate_up_proj, (full * 2)[2 * rank:2 * rank + 2])
    copied = copy.deepcopy(model).model.layers[0].mlp.experts.expert_parallel
    found["copy_shares_group"] = copied.group is handles[0].group and copied.module is not handles[0].module

    with ep_stats() as outer:  # a forward in another thread does not record into this thread's stats
        worker = threading.Thread(target=lambda: model(input_ids=half(rank)))
        worker.start()
        worker.join()
    found["thread_recorded"] = len(outer.layers)
    with ep_stats() as own:
        model(input_ids=half(rank))
    found["own_recorded"] = len(own.layers)

    singles = [dist.new_group([r]) for r in range(WORLD)]  # EP=1 per rank, the two ranks replicas of each other
    replicated = shard_experts(tiny_moe(), singles[rank], replicas=dist.group.WORLD)
    experts = replicated[0].module
    for p in (experts.gate_up_proj, experts.down_proj):
        p.grad = torch.full_like(p, float(rank + 1))
    reduce_expert_grads(replicated, dist.group.WORLD)
    found["replica_sum"] = float(experts.down_proj.grad.unique().item())

    try:
        shard_experts(tiny_moe(num_experts=3))
        found["indivisible"] = ""
    except ValueError as e:
        found["indivisible"] = str(e)
    return found


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        runs = {
            **{b: _train_step(rank, 0, b) for b in ("standard", "llep")},
            **{f"skewed_{b}": _train_step(rank, 1, b) for b in ("standard", "llep")},
            **{f"all_hot_{b}": _train_step(rank, 2, b) for b in ("standard", "llep")},
            **{f"rank0_loss_only_{b}": _train_step(rank, 1, b, loss_weight=float(rank == 0))
               for b in ("standard", "llep")},
            "checks": _checks(rank),
        }
        torch.save(runs, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ep")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(out))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=150)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * WORLD, "an EP rank failed (its traceback is in the captured stderr)"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


# ---- the unsharded reference -------------------------------------------------------------------


def reference(hot: int, loss_weights: tuple[float, ...] = (1.0, 1.0)) -> dict[str, Any]:
    """The unsharded model: each rank's half through it, losses weighted and summed, one backward."""
    model = tiny_moe(hot)
    outs = [model(input_ids=half(r), labels=half(r)) for r in range(WORLD)]
    sum(w * o.loss for w, o in zip(loss_weights, outs)).backward()
    return {"logits": [o.logits.detach() for o in outs], "grads": {n: p.grad for n, p in model.named_parameters()}}


def assert_same_step(run: list[dict[str, Any]], ref: dict[str, Any]) -> None:
    for r in range(WORLD):
        torch.testing.assert_close(run[r]["logits"], ref["logits"][r], atol=TOL, rtol=0)
        assert run[r]["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            torch.testing.assert_close(run[r]["grads"][name], g, atol=TOL, rtol=0,
                                       msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture(scope="module")
def skewed_reference() -> dict[str, Any]:
    return reference(hot=1)


# ---- (a) standard EP, and LLEP, against the unsharded model ------------------------------------


@pytest.mark.parametrize("balance", ["standard", "llep"])
def test_ep_matches_unsharded_model(ep_runs: list[dict[str, Any]], balance: str) -> None:
    assert_same_step([ep_runs[r][balance] for r in range(WORLD)], reference(hot=0))


def test_standard_ep_computes_each_experts_pairs_at_its_owner(ep_runs: list[dict[str, Any]]) -> None:
    for r in range(WORLD):
        stats = ep_runs[r]["standard"]["stats"]
        assert [d["layer"] for d in stats] == [0, 1]
        assert all(d["pairs"] == d["standard_pairs"] and d["weights_received"] == 0 for d in stats)
    total = sum(ep_runs[r]["standard"]["stats"][0]["pairs"] for r in range(WORLD))
    assert total == BATCH.numel() * 2  # every (token, choice) pair computed exactly once


# ---- (b) LLEP against standard EP under skewed routing -----------------------------------------


def test_llep_matches_standard_under_skewed_routing(ep_runs: list[dict[str, Any]],
                                                    skewed_reference: dict[str, Any]) -> None:
    assert_same_step([ep_runs[r]["skewed_standard"] for r in range(WORLD)], skewed_reference)
    assert_same_step([ep_runs[r]["skewed_llep"] for r in range(WORLD)], skewed_reference)
    for r in range(WORLD):
        llep, standard = ep_runs[r]["skewed_llep"], ep_runs[r]["skewed_standard"]
        torch.testing.assert_close(llep["logits"], standard["logits"], atol=TOL, rtol=0)
        for name, g in standard["grads"].items():
            torch.testing.assert_close(llep["grads"][name], g, atol=TOL, rtol=0)


def test_a_rank_with_no_pairs_still_takes_part(ep_runs: list[dict[str, Any]]) -> None:
    """Experts 0 and 1 (rank 0's) take every token: under standard EP rank 1 computes nothing, yet its
    backward must join both collectives; under LLEP it computes what exceeds C, with expert 1's weights."""
    ref = reference(hot=2)
    for balance in ("standard", "llep"):
        assert_same_step([ep_runs[r][f"all_hot_{balance}"] for r in range(WORLD)], ref)
    assert [d["pairs"] for d in ep_runs[1]["all_hot_standard"]["stats"]] == [0, 0]
    llep = ep_runs[1]["all_hot_llep"]["stats"]
    assert [d["pairs"] for d in llep] == [2 * BATCH.numel() - d["capacity"] for d in llep]
    assert [d["weights_received"] for d in llep] == [1, 1]


def test_llep_keeps_every_rank_under_capacity_where_standard_does_not(ep_runs: list[dict[str, Any]]) -> None:
    for layer in range(2):
        llep = [ep_runs[r]["skewed_llep"]["stats"][layer] for r in range(WORLD)]
        standard = [ep_runs[r]["skewed_standard"]["stats"][layer] for r in range(WORLD)]
        cap = llep[0]["capacity"]
        assert cap == math.ceil(1.25 * 2 * BATCH.numel() / WORLD)  # T = N * K pairs over both ranks
        assert max(d["pairs"] for d in llep) <= cap < max(d["pairs"] for d in standard)
        assert [d["standard_pairs"] for d in llep] == [d["pairs"] for d in standard]
        assert sum(d["pairs"] for d in llep) == sum(d["pairs"] for d in standard)
        assert llep[1]["weights_received"] > 0 and llep[1]["bytes_received"] > 0  # rank 1 helps rank 0


# ---- (d) the other rank's experts learn from this rank's tokens --------------------------------


@pytest.mark.parametrize("balance", ["standard", "llep"])
def test_expert_grads_come_from_the_tokens_of_other_ranks(ep_runs: list[dict[str, Any]], balance: str) -> None:
    """Only rank 0's loss counts: rank 1's experts still get exactly the gradient of rank 0's tokens,
    which reach them only by dispatch (under LLEP partly at a rank that borrowed the weights)."""
    ref = reference(hot=1, loss_weights=(1.0, 0.0))
    run = [ep_runs[r][f"rank0_loss_only_{balance}"] for r in range(WORLD)]
    assert_same_step(run, ref)
    for name, g in run[1]["local"].items():
        assert g.abs().max() > 1e-4, f"{name}: rank 1's experts got no gradient from rank 0's tokens"
        torch.testing.assert_close(g, ref["grads"][name][2:], atol=TOL, rtol=0)


# ---- sharding bookkeeping ----------------------------------------------------------------------


def test_sharding_keeps_keys_and_round_trips(ep_runs: list[dict[str, Any]]) -> None:
    for r in range(WORLD):
        found = ep_runs[r]["checks"]
        assert found["same_keys"] and found["expert_shape"] == (2, 32, 32)
        assert found["gather_is_full"] and found["load_takes_slice"] and found["copy_shares_group"]
        assert found["thread_recorded"] == 0 and found["own_recorded"] == 2
        assert found["replica_sum"] == 3.0  # 1 + 2
        assert "num_experts=3" in found["indivisible"] and "expert_parallel=2" in found["indivisible"]


# ---- (c) the plan alone ------------------------------------------------------------------------


def random_counts(seed: int, ranks: int, experts: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    skew = torch.rand(experts, generator=g) ** 4 * 50  # a few hot experts
    return torch.poisson(skew.expand(ranks, experts), generator=g).long()  # [P, E]


@pytest.mark.parametrize("ranks,experts,capacity", [(2, 4, 1.0), (4, 8, 1.0), (4, 16, 1.25), (8, 64, 1.1)])
def test_llep_plan_bound_and_every_pair_once(ranks: int, experts: int, capacity: float) -> None:
    for seed in range(20):
        counts = random_counts(seed, ranks, experts)
        plan = llep_plan(counts, capacity)
        total = int(counts.sum())
        assert plan.capacity == math.ceil(capacity * total / ranks)
        assert max(plan.load) <= plan.capacity and sum(plan.load) == total
        for e in range(experts):  # the pieces of an expert tile its global order exactly
            spans = [(p.start, p.stop) for p in plan.pieces if p.expert == e]  # [] for an expert nobody chose
            assert all(a < b for a, b in spans)
            assert [a for a, _ in spans] == [0, *(b for _, b in spans[:-1])][:len(spans)]
            assert (spans[-1][1] if spans else 0) == int(counts[:, e].sum())
        per_rank = experts // ranks
        for r in range(ranks):  # owners first: each keeps its own experts' pairs up to C
            kept = sum(p.stop - p.start for p in plan.pieces if p.rank == r and p.expert // per_rank == r)
            assert kept == min(plan.capacity, int(counts[:, r * per_rank:(r + 1) * per_rank].sum()))
        routes = plan.routes()  # [P, P, E]
        assert torch.equal(routes.sum(1), counts)  # each source's pairs all go somewhere
        assert routes.sum((0, 2)).tolist() == list(plan.load)
        for s in range(ranks):  # per-pair destinations agree with the route counts
            mine = torch.repeat_interleave(torch.arange(experts), counts[s])
            dest = plan.destinations(s, mine) if len(mine) else mine
            sent = torch.bincount(dest * experts + mine, minlength=ranks * experts).view(ranks, experts)
            assert torch.equal(sent, routes[s])


def test_llep_plan_serves_owners_first() -> None:
    counts = torch.tensor([[9, 1, 1, 0], [8, 1, 0, 2]])  # rank 0's experts hold 20 of 22 pairs
    plan = llep_plan(counts, 1.0)
    assert plan.capacity == 11 and plan.load == (11, 11)
    native = [p for p in plan.pieces if p.rank == plan.owner(p.expert)]
    assert all(p.start == 0 for p in native)  # an owner keeps the head of its expert's order
    assert (0, 0, 0, 11) in plan.pieces  # the heaviest expert is kept first, up to C
    assert plan.moves() == [(0, 1), (1, 1)]  # and the overflow goes to the least-loaded rank with its weights


def test_llep_plan_is_standard_ep_when_nothing_overflows() -> None:
    counts = torch.tensor([[3, 2, 1, 4], [1, 2, 3, 0]])  # 8 and 8 per owner
    plan = llep_plan(counts, 1.0)
    assert [tuple(p) for p in plan.pieces] == [(e, e // 2, 0, int(counts[:, e].sum())) for e in range(4)]
    assert plan.moves() == []


def test_llep_plan_refuses_capacity_below_one() -> None:
    with pytest.raises(ValueError, match="capacity"):
        llep_plan(torch.ones(2, 4, dtype=torch.long), 0.9)
