"""`rlhub bench learner`: the learner alone, over local ranks: trained tokens/s and peak memory per rank.

No Ray and no rollout: every rank is a local process (`rlhub.parallel.local.run_ranks`, gloo, one
torch thread each, as one core stands in for one device) that builds a `Learner` and trains it on
synthetic batches (groups of samples of random tokens, with advantages and routes, the same
batches at every side for one seed), each rank taking its token-balanced share of the groups
(`rlhub.parallel.split.balance`), as the learner actors do. A few warm-up steps, then timed ones.
The learner routes freshly (`moe.routing_replay=none`): the router, not the recorded routes,
decides the experts, so a skewed or grouped router shows in the load. The balance is the default
`global_batch`, whose routing pre-pass runs whenever a rank has several micro-batches or there
are several ranks; the learning rate is 1e-5, so that the routing stays as built over the steps.
On CUDA every local rank takes device 0 (`rlhub.parallel.ranks.join`), so only CPU runs sides of
several ranks here.

Sides (each its own processes, so the peak memory is that side's alone; under `--quick`, a tiny
workload for the unit test, every side runs in one group of two processes, to start them once):

- `1_rank`, `2_ranks`: one process, and two with FSDP2 data parallelism (plain top-k routing);
- `ep`: two ranks whose experts are split over both (`learner.expert_parallel=2`, standard EP);
- `ep_skewed`, `llep_skewed`: standard EP and LLEP (capacity 1.25) on a copy of the model whose
  routers send most tokens to the experts of EP rank 0 (a component every token's embedding
  shares, which the routers of rank 0's experts read, as in tests/unit/test_expert_parallel.py);
- `ep_grouped`: EP with grouped routing (`moe.routing=grouped`, 2 groups, one per EP rank).

- `bf16_lora`: one process, `learner.precision=bf16`, `model.lora.rank=16` on attention, experts
  and routers, eager attention; `bf16_lora_shared`: the same with `learner.share_prefix` (each
  group's prompt run once per micro-batch; the batches give each group one prompt, as GRPO does).

Cases compare two sides each: `ranks` (1_rank, 2_ranks), `expert_parallel` (2_ranks, ep),
`llep` (ep_skewed, llep_skewed), `grouped` (ep, ep_grouped), `lora_bf16` (1_rank, bf16_lora),
`shared_prefix` (bf16_lora, bf16_lora_shared); `--model smollm2_moe` runs `ranks`,
`expert_parallel`, `lora_bf16` and `shared_prefix`. Every side also reports the
learner's split of its step (`phases_s`: forward, backward, optimizer, routing pass, measuring
forwards, idle rounds, each the mean seconds per step). Each repeat runs every side once, in turn, so the sides alternate; a figure is the
median over the repeats with [min, max]. Tokens/s: the completion tokens trained by all ranks
together per second of `train_step` wall time (per step, the slowest rank's). Peak memory: each
rank process's maximum resident set (`ru_maxrss`, imports and model loading included) and, on
CUDA, `torch.cuda.max_memory_allocated`. Under EP, the learner's own record of its dispatch
(`learner/ep_*`, from `rlhub.parallel.experts.ep_stats`): per step, the most (token, expert) pairs
a rank computed over the mean, what standard EP would have given on the same routing, and that
ratio against the most LLEP allows (`llep_bound`: 1.25 in every layer call, plus rounding); the
worst step is reported. `scaling` holds the bytes a step moves between ranks, computed from the
parameter count and the batches (see `scaling`), for 2, 8 and 16 ranks.

    rlhub bench learner [--model tiny_moe|smollm2_moe] [--repeats 3] [--steps N] [--warmup N] [--cases a,b] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

CAPACITY = 1.25
"""LLEP's capacity factor, and the bound every EP side's per-rank pairs are held against."""
SKEW = (0.05, 0.5)
"""(embedding component 0 of every token, router weight on it for EP rank 0's experts): about 93 % of
the tiny MoE's pairs go to rank 0."""
LR = 1e-5
"""Small enough that the routing stays as built over the steps: the first Adam steps at the tiny MoE's
default 2e-3 turn the skewed router around (the balance loss's gradient is small, Adam's step is not)."""
PROJECTED_RANKS = (2, 8, 16)
SEED = 7


# ---- what runs ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Side:
    """One learner configuration: its ranks, expert parallelism and router."""

    ranks: int = 1
    expert_parallel: int = 1
    ep_balance: str = "standard"
    router: str = "topk"
    """topk: the model as built; skewed: its copy with rank 0's experts favoured; grouped: 2 expert groups."""
    precision: str = "fp32"
    lora_rank: int = 0
    """model.lora.rank (targets: attention, experts and routers); 0 trains every weight."""
    attention: str = "sdpa"
    share_prefix: bool = False
    """learner.share_prefix: a group's prompt runs once per micro-batch."""


SIDES = {
    "1_rank": Side(),
    "2_ranks": Side(ranks=2),
    "ep": Side(ranks=2, expert_parallel=2),
    "ep_skewed": Side(ranks=2, expert_parallel=2, router="skewed"),
    "llep_skewed": Side(ranks=2, expert_parallel=2, ep_balance="llep", router="skewed"),
    "ep_grouped": Side(ranks=2, expert_parallel=2, router="grouped"),
    "bf16_lora": Side(precision="bf16", lora_rank=16, attention="eager"),
    "bf16_lora_shared": Side(precision="bf16", lora_rank=16, attention="eager", share_prefix=True),
}
CASES = {"ranks": ("1_rank", "2_ranks"), "expert_parallel": ("2_ranks", "ep"), "llep": ("ep_skewed", "llep_skewed"),
         "grouped": ("ep", "ep_grouped"), "lora_bf16": ("1_rank", "bf16_lora"), "shared_prefix": ("bf16_lora", "bf16_lora_shared")}
MODEL_CASES = {"tiny_moe": tuple(CASES), "smollm2_moe": ("ranks", "expert_parallel", "lora_bf16", "shared_prefix")}
PHASES = ("forward", "backward", "optimizer", "routing_pass", "measure", "idle")
"""The learner's own split of a step (`time/learner/<phase>_s`, `rlhub.learner.PhaseClock`)."""


@dataclass(frozen=True)
class Workload:
    """The synthetic batches of one step and how many steps run."""

    groups: int
    group_size: int
    prompt: tuple[int, int]
    """Prompt lengths are drawn from [lo, hi]."""
    completion: tuple[int, int]
    micro_batch_size: int
    warmup: int
    steps: int


WORKLOADS = {
    ("tiny_moe", False): Workload(8, 8, (16, 32), (32, 64), 16, warmup=2, steps=8),
    ("tiny_moe", True): Workload(4, 4, (4, 8), (4, 12), 4, warmup=1, steps=2),
    ("smollm2_moe", False): Workload(4, 4, (16, 32), (16, 32), 8, warmup=1, steps=2),
    ("smollm2_moe", True): Workload(2, 2, (4, 8), (4, 8), 2, warmup=1, steps=1),
}


@dataclass(frozen=True)
class ModelInfo:
    """What the batches and the scaling figures need of the model, read from its config."""

    vocab: int
    pad_id: int
    hidden: int
    moe_layers: int
    experts: int
    top_k: int
    params: int
    expert_params: int
    dtype: str
    dtype_bytes: int


@dataclass(frozen=True)
class Job:
    """What every rank of one side gets."""

    side: Side
    path: str
    info: ModelInfo
    workload: Workload


# ---- models ------------------------------------------------------------------------------------

def model_config(name: str) -> Any:
    from rlhub.models.build import ModelConfig

    if name == "smollm2_moe":  # as conf/experiment/smollm2_moe.yaml
        return ModelConfig(name="smollm2_moe", source="smollm2_moe", num_experts=4, experts_per_token=2, upcycle_noise=0.01)
    return ModelConfig()


def model_info(path: Path, dtype: str) -> ModelInfo:
    """Counts from the model's config, built on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhub.moe import find_routers
    from rlhub.parallel.experts import find_experts

    cfg = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    experts, routers = find_experts(model), find_routers(model)
    return ModelInfo(vocab=cfg.vocab_size, pad_id=int(cfg.pad_token_id or 0), hidden=cfg.hidden_size, moe_layers=len(experts),
                     experts=int(routers[0].weight.shape[0]), top_k=int(routers[0].top_k),
                     params=sum(p.numel() for p in model.parameters()),
                     expert_params=sum(p.numel() for m in experts for p in (m.gate_up_proj, m.down_proj)),
                     dtype=dtype, dtype_bytes=torch.empty((), dtype=getattr(torch, dtype)).element_size())


def skewed_model(path: Path, expert_parallel: int) -> Path:
    """A copy of the model at `path` (built once, beside it) whose routers favour the experts of EP rank 0."""
    out = path.with_name(f"{path.name}-skew{expert_parallel}")
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM

    from rlhub.models.build import rename_into_place
    from rlhub.moe import find_routers

    model = AutoModelForCausalLM.from_pretrained(str(path))
    embed, weight = SKEW
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = embed  # a direction every token shares
        for router in find_routers(model):
            router.weight[: router.weight.shape[0] // expert_parallel, 0] += weight
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")  # written aside, renamed when whole
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    rename_into_place(tmp, out)
    return out


def side_paths(name: str, sides: list[str]) -> dict[str, str]:
    """The model directory of every router kind the sides use."""
    from rlhub.models.build import build_tiny_moe, resolve_model_path

    cfg = model_config(name)
    base = resolve_model_path(cfg)
    paths = {"topk": base}
    routers = {SIDES[s].router for s in sides}
    if "skewed" in routers:
        paths["skewed"] = skewed_model(base, 2)
    if "grouped" in routers:
        paths["grouped"] = build_tiny_moe(replace(cfg, expert_groups=2))
    return {k: str(v) for k, v in paths.items()}


# ---- batches -----------------------------------------------------------------------------------

def make_batches(info: ModelInfo, work: Workload, seed: int = SEED) -> list[list[Any]]:
    """warmup + steps batches of `groups` GroupTensors each: random tokens, one prompt per group (with its
    routes, as the engine records a group's one prefill) and a completion per sample, a reward and an
    advantage that differ within each group, behaviour log-probs, and random routes (carried as the
    pipeline's batches carry them; with replay off the learner does not read them)."""
    import torch

    from rlhub.moe import route_dtype
    from rlhub.types import GroupTensors, Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(work.warmup + work.steps):
        batch = []
        for gid in range(work.groups):
            samples = []
            p_len = int(torch.randint(work.prompt[0], work.prompt[1] + 1, (1,), generator=g))
            prompt = torch.randint(0, info.vocab, (p_len,), generator=g).tolist()
            prompt_routes = torch.rand(p_len, info.moe_layers, info.experts, generator=g).argsort(-1)[..., :info.top_k]
            for j in range(work.group_size):
                c_len = int(torch.randint(work.completion[0], work.completion[1] + 1, (1,), generator=g))
                ids = torch.randint(0, info.vocab, (c_len,), generator=g).tolist()
                routes = torch.rand(c_len - 1, info.moe_layers, info.experts, generator=g).argsort(-1)[..., :info.top_k]
                routes = torch.cat([prompt_routes, routes])
                samples.append(Sample(prompt, ids, (-torch.rand(c_len, generator=g) * 3).tolist(), [step] * c_len,
                                      float(j % 2), bool(j % 2), "stop", routed_experts=routes.to(route_dtype(info.experts))))
            advantages = torch.linspace(-1.0, 1.0, work.group_size) * (1 + gid / 10)
            tensors = GroupTensors.from_samples(samples, advantages, info.pad_id)
            tensors.group_ids = torch.full((work.group_size,), step * 1000 + gid)
            batch.append(tensors)
        out.append(batch)
    return out


def share(batch: list[Any], rank: int, world_size: int, pad_id: int) -> Any:
    """This rank's groups of one step, collated (None: it has none)."""
    from rlhub.parallel.split import balance
    from rlhub.types import collate

    mine = balance([int(t.completion_mask.sum()) for t in batch], world_size)[rank]
    return collate([batch[i] for i in mine], pad_id) if mine else None


def micro_batch_shapes(batch: Any, micro_batch_size: int) -> list[tuple[int, int]]:
    """(rows, width) of each micro-batch the learner cuts a rank's share into."""
    from rlhub.algorithms.config import AlgorithmConfig
    from rlhub.types import micro_batches

    if batch is None:
        return []
    tokens = AlgorithmConfig().micro_batch_tokens
    return [(len(idx), width) for idx, width in micro_batches(batch.attention_mask.sum(-1), micro_batch_size, tokens)]


# ---- one side, in each rank's process -------------------------------------------------------------

def train_ranks(ranks: Any, jobs: list[Job]) -> list[dict[str, Any] | None]:
    """Each job's side in turn at this rank (None where the side has no part for it): warm-up then timed
    steps; its step times, tokens, memory and EP dispatch. The ranks' group may be larger than a side
    needs (--quick runs every side in one group of 2): a 1-rank side then runs on rank 0 alone, and a
    side without EP on the ranks with EP turned off."""
    import gc

    results = []
    for job in jobs:
        results.append(_train(_view(ranks, job.side), job) if ranks.rank < job.side.ranks else None)
        gc.collect()
        if ranks.distributed:
            import torch.distributed as dist

            dist.barrier()  # the next side starts together
    return results


def _view(ranks: Any, side: Side) -> Any:
    from rlhub.parallel.ranks import Ranks

    if side.ranks == 1:
        return Ranks.single()
    if side.ranks != ranks.world_size or side.expert_parallel not in (1, ranks.expert_parallel):
        raise ValueError(f"side {side} does not fit {ranks.world_size} ranks with expert_parallel={ranks.expert_parallel}")
    return ranks if side.expert_parallel == ranks.expert_parallel else replace(
        ranks, expert_parallel=1, ep_group=None, replica_group=None, ep_mesh=None)


EP_METRICS = {"pairs_max": "learner/ep_pairs_max", "pairs_max_over_mean": "learner/ep_pairs_max_over_mean",
              "standard_pairs_max_over_mean": "learner/ep_standard_pairs_max_over_mean",
              "weights_moved": "learner/ep_weights_moved", "ep_seconds_max": "learner/ep_seconds_max"}
"""The learner's own record of its EP dispatch over a step (`Learner._ep_metrics`, from `ep_stats`), whole-step
figures that every rank returns alike."""
FORWARDS_PER_ROUND = 2
"""EP layer calls per micro-batch round and MoE layer: the balance's routing pre-pass and the loss's forward."""


def _train(ranks: Any, job: Job) -> dict[str, Any]:
    import time

    import torch

    from rlhub.algorithms.config import AlgorithmConfig
    from rlhub.learner import Learner
    from rlhub.models.build import ModelConfig
    from rlhub.models.config import LoraConfig
    from rlhub.moe import MoEConfig
    from rlhub.rollout.records import peak_rss_mb
    from rlhub.weight_sync import probe_sequence

    side, work, info = job.side, job.workload, job.info
    grouped = side.router == "grouped"
    moe = MoEConfig(routing="grouped" if grouped else "topk", groups=2 if grouped else 1, routing_replay="none", mismatch_every=0)
    algo = AlgorithmConfig(lr=LR, micro_batch_size=work.micro_batch_size)
    learner = Learner(job.path, ModelConfig(dtype=info.dtype, lora=LoraConfig(rank=side.lora_rank)), algo, probe_sequence(info.vocab),
                      seed=0, moe=moe, replay=False, ranks=ranks, ep_balance=side.ep_balance, ep_capacity=CAPACITY,
                      precision=side.precision, attention=side.attention, share_prefix=side.share_prefix)
    steps = make_batches(info, work)
    batches = [share(b, ranks.rank, ranks.world_size, info.pad_id) for b in steps]
    rounds = [max(max(len(micro_batch_shapes(share(b, r, ranks.world_size, info.pad_id), work.micro_batch_size))
                      for r in range(ranks.world_size)), 1) for b in steps[work.warmup:]]
    for batch in batches[: work.warmup]:
        learner.train_step(batch)
    if ranks.distributed:
        torch.distributed.barrier()
    train_s, tokens, ep, phases = [], [], [], []
    for batch in batches[work.warmup:]:
        start = time.perf_counter()
        metrics = learner.train_step(batch)
        train_s.append(time.perf_counter() - start)
        tokens.append(metrics["train/tokens"])
        phases.append({p: metrics.get(f"time/learner/{p}_s", 0.0) for p in PHASES})
        if EP_METRICS["pairs_max"] in metrics:
            ep.append({k: metrics[m] for k, m in EP_METRICS.items()})
    return {"train_s": train_s, "tokens": tokens, "ep": ep, "rounds": rounds, "phases": phases,
            "rss_mib": peak_rss_mb(),
            "cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}


# ---- figures -----------------------------------------------------------------------------------

def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def llep_bound(step: dict[str, float], ranks: int, calls: int) -> float:
    """The most a step's max/mean pairs per rank can be under LLEP: each of its `calls` EP layer calls keeps
    every rank within ceil(capacity * T_c / ranks) of its T_c pairs, so the step's max is below
    capacity * T / ranks + calls, and max/mean below capacity + calls * ranks / T."""
    total = step["pairs_max"] / step["pairs_max_over_mean"] * ranks
    return CAPACITY + calls * ranks / total


def one_run(per_rank: list[dict[str, Any]], moe_layers: int) -> dict[str, Any]:
    """One side's figures from one repeat (its ranks' results, in rank order)."""
    steps = len(per_rank[0]["train_s"])
    step_s = [max(r["train_s"][i] for r in per_rank) for i in range(steps)]  # a step ends when its slowest rank does
    out: dict[str, Any] = {"tokens_per_s": sum(per_rank[0]["tokens"]) / sum(step_s), "step_s": sum(step_s) / steps,
                           "rss_mib": [r["rss_mib"] for r in per_rank], "cuda_mib": [r["cuda_mib"] for r in per_rank],
                           "phases_s": {p: sum(s[p] for s in per_rank[0]["phases"]) / steps for p in PHASES}}
    ep, ranks = per_rank[0]["ep"], len(per_rank)
    if ep:
        bounds = [llep_bound(s, ranks, moe_layers * FORWARDS_PER_ROUND * n) for s, n in zip(ep, per_rank[0]["rounds"])]
        out.update(
            pairs_max_over_mean=max(s["pairs_max_over_mean"] for s in ep),
            standard_pairs_max_over_mean=max(s["standard_pairs_max_over_mean"] for s in ep),
            over_llep_bound=max(s["pairs_max_over_mean"] / b for s, b in zip(ep, bounds)),
            steps_over_llep_bound=sum(s["pairs_max_over_mean"] > b for s, b in zip(ep, bounds)),
            steps_all_equal=sum(s["pairs_max_over_mean"] == 1.0 for s in ep),
            ep_steps=len(ep),
            weights_moved=sum(s["weights_moved"] for s in ep),
            ep_seconds_max=sum(s["ep_seconds_max"] for s in ep),
        )
    return out


def side_figures(runs: list[dict[str, Any]], side: Side) -> dict[str, Any]:
    """A side over its repeats: a spread for every figure, per rank for memory."""
    out: dict[str, Any] = {**asdict(side), "tokens_per_s": spread([r["tokens_per_s"] for r in runs]),
                           "step_s": spread([r["step_s"] for r in runs]),
                           "rss_mib": [spread(list(v)) for v in zip(*(r["rss_mib"] for r in runs))],
                           "phases_s": {p: spread([r["phases_s"][p] for r in runs]) for p in PHASES if any(r["phases_s"][p] for r in runs)}}
    if runs[0]["cuda_mib"][0] is not None:
        out["cuda_mib"] = [spread(list(v)) for v in zip(*(r["cuda_mib"] for r in runs))]
    if "pairs_max_over_mean" in runs[0]:
        for key in ("pairs_max_over_mean", "standard_pairs_max_over_mean", "over_llep_bound", "ep_seconds_max"):
            out[key] = spread([r[key] for r in runs])
        out["steps_over_llep_bound"] = max(r["steps_over_llep_bound"] for r in runs)
        out["steps_all_equal"] = min(r["steps_all_equal"] for r in runs)
        out["ep_steps"] = runs[0]["ep_steps"]
        out["weights_moved"] = statistics.median(r["weights_moved"] for r in runs)
    return out


def case_figures(sides: dict[str, dict[str, Any]], a: str, b: str) -> dict[str, Any]:
    """Side b against side a: ratios of the medians."""
    ta, tb = sides[a]["tokens_per_s"]["median"], sides[b]["tokens_per_s"]["median"]
    return {"sides": [a, b], "tokens_per_s_ratio": tb / ta, "step_s_ratio": sides[b]["step_s"]["median"] / sides[a]["step_s"]["median"]}


def ep_size(ranks: int, experts: int) -> int:
    """The largest expert-parallel size that divides both the ranks and the experts."""
    return max(p for p in range(1, min(ranks, experts) + 1) if ranks % p == 0 and experts % p == 0)


def scaling(info: ModelInfo, work: Workload, batches: list[list[Any]]) -> dict[str, Any]:
    """Bytes moved between ranks per optimizer step, from the parameter count and the batches' micro-batches.

    Per micro-batch round FSDP2 all-gathers every sharded parameter three times (the balance's routing
    pre-pass, the forward, the backward) and reduce-scatters its gradient once; a collective's payload is
    the parameters' bytes, of which a rank sends (N-1)/N in a ring. Under EP the experts leave FSDP: their
    gradients are all-reduced once per step over the R = N/P replicas of each slice (2 (R-1)/R of a slice
    per rank), and every position's k hidden rows go to the experts' ranks and back (2 directions) in
    each MoE layer, in the pre-pass, the forward and the backward; a rank sends the (P-1)/P of its rows
    whose experts live elsewhere (uniform routing). `per_step`: the collectives' payloads over all ranks,
    at the measured 2 ranks; `per_rank`: what one rank sends, at N ranks with the same global batch."""
    b = info.dtype_bytes
    params, experts = info.params * b, info.expert_params * b
    dense = params - experts
    row = info.hidden * b * info.top_k * 2 * info.moe_layers * 3  # one position: k rows, there and back, 3 passes, all layers
    tokens = sum(float(t.completion_mask.sum()) for batch in batches for t in batch) / len(batches)

    def shapes(n: int) -> tuple[float, float]:
        """(micro-batch rounds, positions) per step at n ranks, averaged over the steps."""
        rounds = positions = 0
        for batch in batches:
            per_rank = [micro_batch_shapes(share(batch, r, n, info.pad_id), work.micro_batch_size) for r in range(n)]
            rounds += max(max(len(s) for s in per_rank), 1)
            positions += sum(rows * width for s in per_rank for rows, width in s)
        return rounds / len(batches), positions / len(batches)

    rounds2, positions2 = shapes(2)
    out: dict[str, Any] = {
        "params": info.params, "expert_params": info.expert_params, "param_bytes": params, "dtype_bytes": b,
        "hidden": info.hidden, "moe_layers": info.moe_layers, "top_k": info.top_k, "experts": info.experts,
        "all_gathers_per_round": 3, "reduce_scatters_per_round": 1, "all_to_all_passes": 3,
        "completion_tokens_per_step": tokens, "rounds_per_step_2_ranks": rounds2, "positions_per_step": positions2,
        "per_step": {"fsdp_bytes": rounds2 * 4 * params, "fsdp_bytes_with_ep": rounds2 * 4 * dense,
                     "ep_all_to_all_bytes": positions2 * row},
        "per_rank": {},
    }
    for n in PROJECTED_RANKS:
        rounds, positions = shapes(n)
        p = ep_size(n, info.experts)
        r = n // p
        out["per_rank"][str(n)] = {
            "rounds": rounds, "expert_parallel": p,
            "fsdp_sent_bytes": rounds * 4 * (n - 1) / n * params,
            "fsdp_sent_bytes_with_ep": rounds * 4 * (n - 1) / n * dense + 2 * (r - 1) / r * experts / p,
            "all_to_all_sent_bytes": positions / n * row * (p - 1) / p,
        }
    return out


# ---- the command ---------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # the CLI prints a ValueError as the command's one-line error
        raise ValueError(message)


def parse_args(args: list[str]) -> argparse.Namespace:
    parser = _Parser(prog="rlhub bench learner", add_help=False)
    parser.add_argument("--model", choices=tuple(MODEL_CASES), default="tiny_moe")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default: the workload's)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before them (default: the workload's)")
    parser.add_argument("--quick", action="store_true", help="a tiny workload, for the unit test; allows --repeats 1")
    parser.add_argument("--cases", default=None, help="comma-separated cases to run (default: every case of the model)")
    opts = parser.parse_args(args)
    known = MODEL_CASES[opts.model]
    opts.cases = list(known) if opts.cases is None else [c.strip() for c in opts.cases.split(",") if c.strip()]
    unknown = [c for c in opts.cases if c not in known]
    if unknown or not opts.cases:
        raise ValueError(f"--cases {','.join(unknown) or '(none)'}: choose from {','.join(known)} for --model {opts.model}")
    if opts.repeats < (1 if opts.quick else 3):
        raise ValueError(f"--repeats {opts.repeats}: a figure is the median of at least 3 repeats (1 only with --quick)")
    if (opts.steps is not None and opts.steps < 1) or (opts.warmup is not None and opts.warmup < 0):
        raise ValueError(f"--steps {opts.steps} must be >= 1 and --warmup {opts.warmup} >= 0")
    return opts


def run(args: list[str]) -> dict[str, Any]:
    import torch

    from rlhub.parallel.local import run_ranks

    opts = parse_args(args)
    if torch.cuda.is_available():
        raise ValueError("local ranks all take cuda:0 (rlhub.parallel.ranks.join), which NCCL refuses for 2 ranks: "
                         "run on CPU (CUDA_VISIBLE_DEVICES=)")
    work = WORKLOADS[(opts.model, opts.quick)]
    work = replace(work, steps=opts.steps or work.steps, warmup=work.warmup if opts.warmup is None else opts.warmup)
    cases = {c: CASES[c] for c in opts.cases}
    names = list(dict.fromkeys(s for pair in cases.values() for s in pair))
    load_before = os.getloadavg()[0]
    paths = side_paths(opts.model, names)
    info = model_info(Path(paths["topk"]), model_config(opts.model).dtype)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in names}
    spawns = [names] if opts.quick else [[name] for name in names]  # the sides each group of processes runs
    for _ in range(opts.repeats):
        for group in spawns:  # every side once per repeat: the sides alternate
            jobs = [Job(SIDES[s], paths[SIDES[s].router], info, work) for s in group]
            world, ep = max(j.side.ranks for j in jobs), max(j.side.expert_parallel for j in jobs)
            per_rank = run_ranks(train_ranks, world, jobs, expert_parallel=ep)
            for i, name in enumerate(group):
                runs[name].append(one_run([r[i] for r in per_rank if r[i] is not None], info.moe_layers))
    sides = {name: side_figures(runs[name], SIDES[name]) for name in names}
    return {
        "model": opts.model,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads_per_rank": 1,
        "repeats": opts.repeats,
        "quick": opts.quick,
        "own_processes_per_side": not opts.quick,
        "workload": asdict(work),
        "routing_replay": False,
        "ep_capacity": CAPACITY,
        "sides": sides,
        "cases": {c: case_figures(sides, a, b) for c, (a, b) in cases.items()},
        "scaling": scaling(info, work, make_batches(info, work)[work.warmup:]),
        "load_average": [load_before, os.getloadavg()[0]],
    }
