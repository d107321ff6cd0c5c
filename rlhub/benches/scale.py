"""`rlhub bench scale`: pipeline throughput against the number of rollout actors, on one node and on two.

In one invocation, each a short run of the real pipeline (`train()` in a fresh
run directory, its `metrics.jsonl` read back, steady state after the first
tenth of the steps):

- one node: `rollout.num_actors` = 1, 2, 4 at the configured `max_staleness`,
  and 1 actor at `max_staleness=0`;
- two nodes: a `ray.cluster_utils.Cluster` in this process (a head node and a
  second node, both raylets on this machine), joined by `cluster.address`,
  with 2 actors placed one per node. Both nodes share this machine's cores:
  that run exercises the multi-node path (placement, objects moving between
  the two raylets' object stores), not more compute.

The model predicts each point from two per-stage costs measured in the
1-actor run: t_L, the learner's seconds per step (fetching the batch, the
optimizer step, publishing the weights), and t_G, the engine-seconds one actor
spends generating a step's P prompts x G samples. With N actors on C cores:

    k          = max(1, (N + 1) / C)                    processes per core when all N + 1 run at once
    T(S >= 1)  = k * max(t_L, t_G / N)                  the stages overlap: the slower one sets the pace
    T(S = 0)   = t_L + t_G / min(N, C)                  generation and training take turns
    samples/s  = P * G / T

`max_staleness` S lets up to S + 1 steps be in flight, so with S >= 1 the
shorter stage is hidden behind the longer one (in this model, completely);
S = 0 admits a step's prompts only after the previous step trained, so the
stages add up, and while one runs the other's processes are idle (the actors
compete only among themselves for the cores). k is core contention: when the N
actors and the learner outnumber the cores and run at the same time, each gets
C / (N + 1) of a core. Not modelled: per-step overheads outside the two stages
(admission, weight pick-up, scoring, store round trips: they show as the S = 0
row's error), and generation getting cheaper per sample in larger batches (N
actors each generate P / N prompts per call).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhub.tracking import read_rows

BENCH_DEFAULTS = ["wandb.mode=disabled", "progress=false", "checkpoint.keep_final=false", "eval.final=false"]
MODEL = ("samples/s = P*G / T;  T = max(1, (N+1)/C) * max(t_L, t_G/N) if S >= 1, else t_L + t_G/min(N, C)  "
         "(t_L: learner s/step, t_G: 1 actor's generation s/step, N actors, C cores, S max_staleness)")
NODE_OBJECT_STORE_BYTES = 512 * 1024**2
"""Each simulated node's object store: room for a few published weight versions and batches of the tiny MoE."""


# ---- the model ---------------------------------------------------------------------

@dataclass(frozen=True)
class StageCosts:
    """Per-stage costs of one learner step, measured with one rollout actor."""

    learner_s: float
    """t_L: the learner's seconds per step (fetch and collate, optimizer step, publish)."""
    generate_s: float
    """t_G: engine-seconds one actor spends generating one step's samples."""
    samples_per_step: int
    """P * G: prompts per step times group size."""


def model_step_s(c: StageCosts, actors: int, max_staleness: int, cores: int) -> float:
    """Seconds per learner step predicted for `actors` rollout actors on `cores` cores (see the module docstring)."""
    if max_staleness == 0:
        return c.learner_s + c.generate_s / min(actors, cores)
    contention = max(1.0, (actors + 1) / cores)
    return contention * max(c.learner_s, c.generate_s / actors)


def model_samples_per_s(c: StageCosts, actors: int, max_staleness: int, cores: int) -> float:
    return c.samples_per_step / model_step_s(c, actors, max_staleness, cores)


# ---- reading a run's metrics ----------------------------------------------------------

def steady_skip(steps: int) -> int:
    """How many first steps are start-up, not steady state: the first tenth, at least two (one if the run is shorter)."""
    return min(max(2, steps // 10), max(steps - 2, 0))


def throughput(rows: list[dict[str, float]], samples_per_step: int) -> float:
    """Samples per second over `rows` (each one learner step, timed by `time/step_s`)."""
    return samples_per_step * len(rows) / sum(r["time/step_s"] for r in rows)


def stage_costs(rows: list[dict[str, float]], samples_per_step: int) -> StageCosts:
    """t_L and t_G as the mean over `rows` of a 1-actor run's steps."""
    learner = [r["time/collate_s"] + r["time/train_s"] + r["time/publish_s"] for r in rows]
    return StageCosts(sum(learner) / len(rows), sum(r["time/generate_s"] for r in rows) / len(rows), samples_per_step)


# ---- measuring -----------------------------------------------------------------------

@dataclass
class Measured:
    actors: int
    nodes: int
    max_staleness: int
    prompts: int
    """P: prompts per step."""
    samples_per_step: int
    """P * G."""
    rows: list[dict[str, float]]
    """The steady-state steps' metrics."""

    @property
    def samples_per_s(self) -> float:
        return throughput(self.rows, self.samples_per_step)


def _pipeline(overrides: list[str], steps: int, nodes: int = 1) -> Measured:
    """One short run of the real pipeline, its steady-state steps."""
    from rlhub.actors.controller import train
    from rlhub.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config([*BENCH_DEFAULTS, *overrides, f"experiment.total_steps={steps}", f"run_dir={tmp}"])
        train(cfg)
        rows = read_rows(Path(tmp) / "metrics.jsonl")[steady_skip(steps):]
    return Measured(cfg.rollout.num_actors, nodes, cfg.max_staleness, cfg.prompts_per_step, cfg.prompts_per_step * cfg.group_size, rows)


def _two_nodes(overrides: list[str], steps: int) -> tuple[Measured, dict[str, Any]]:
    """2 actors on a simulated two-node cluster: the head holds the learner's CPU and one actor's, the
    second node one actor's, so the only way to place them puts one actor on each node (checked after)."""
    from ray.cluster_utils import Cluster

    from rlhub.config import load_config

    cfg = load_config([*BENCH_DEFAULTS, *overrides])
    head_cpus = math.ceil(cfg.cluster.learner_num_cpus + cfg.cluster.rollout_num_cpus)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "object_store_memory": NODE_OBJECT_STORE_BYTES,
                                                             "include_dashboard": False})
    try:
        second = cluster.add_node(num_cpus=math.ceil(cfg.cluster.rollout_num_cpus), object_store_memory=NODE_OBJECT_STORE_BYTES)
        cluster.wait_for_nodes()
        measured = _pipeline([*overrides, "rollout.num_actors=2", f"cluster.address={cluster.address}"], steps, nodes=2)
        placement = _placement(cluster.global_state.actor_table(None), {cluster.head_node.node_id: "head", second.node_id: "node2"})
    finally:
        cluster.shutdown()
    return measured, placement


def _placement(actors: dict[str, dict[str, Any]], names: dict[str, str]) -> dict[str, list[str]]:
    """Which node each learner and rollout actor ran on (the GCS's actor table, dead actors included)."""
    out: dict[str, list[str]] = {name: [] for name in names.values()}
    for info in actors.values():
        if info["ActorClassName"] in ("LearnerActor", "RolloutActor"):
            out.setdefault(names.get(info["Address"]["NodeID"], "unplaced"), []).append(info["ActorClassName"])
    return {node: sorted(classes) for node, classes in out.items()}


# ---- the benchmark ---------------------------------------------------------------------

def parse_args(args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """(this benchmark's options, Hydra overrides for every run). Options: steps=30, actors=1,2,4,
    serial=true (the 1-actor run at max_staleness=0), two_node=true."""
    opts: dict[str, Any] = {"steps": 30, "actors": [1, 2, 4], "serial": True, "two_node": True}
    overrides = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key == "steps":
            opts["steps"] = int(value)
        elif key == "actors":
            opts["actors"] = sorted({int(v) for v in value.split(",")} | {1})  # the model's costs come from 1 actor
        elif key in ("serial", "two_node"):
            opts[key] = value.lower() in ("1", "true", "yes")
        else:
            overrides.append(arg)
    if opts["steps"] < 3:
        raise ValueError(f"steps={opts['steps']}: at least 3 (the first steps are start-up, not steady state)")
    return opts, overrides


def machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def measure(opts: dict[str, Any], overrides: list[str]) -> tuple[list[Measured], dict[str, list[str]] | None]:
    """Every measured point, the 1-actor run at the configured staleness first; and the two-node run's placement."""
    steps = opts["steps"]
    measured = [_pipeline([*overrides, f"rollout.num_actors={n}"], steps) for n in opts["actors"]]
    if opts["serial"] and measured[0].max_staleness != 0:
        measured.insert(1, _pipeline([*overrides, "rollout.num_actors=1", "max_staleness=0"], steps))
    placement = None
    if opts["two_node"]:
        point, placement = _two_nodes(overrides, steps)
        measured.append(point)
    return measured, placement


def _diagnostics(m: Measured) -> dict[str, float]:
    """The run's own stage times, to see where contention went: the learner's step, all actors' generation."""
    own = stage_costs(m.rows, m.samples_per_step)
    return {"learner_step_s": own.learner_s, "generate_step_s": own.generate_s,
            "staleness_mean": sum(r["staleness/mean"] for r in m.rows) / len(m.rows)}


def report(measured: list[Measured], costs: StageCosts, cores: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(measured rows with the model's prediction, predicted-only rows for N actors on N + 1 cores)."""
    rows = []
    for m in measured:
        predicted = model_samples_per_s(costs, m.actors, m.max_staleness, cores)
        rows.append({"actors": m.actors, "nodes": m.nodes, "max_staleness": m.max_staleness, "samples_per_s": m.samples_per_s,
                     "model_samples_per_s": predicted, "relative_error": (predicted - m.samples_per_s) / m.samples_per_s,
                     "step_s": m.samples_per_step / m.samples_per_s, **_diagnostics(m)})
    s = measured[0].max_staleness
    predicted = [{"actors": n, "cores": n + 1, "max_staleness": s, "samples_per_s": model_samples_per_s(costs, n, s, n + 1)}
                 for n in (1, 2, 4)]
    return rows, predicted


def _note(steps: int, cores: int, base: Measured, costs: StageCosts, placement: dict[str, list[str]] | None) -> str:
    spread = placement is not None and all(placement.get(n, []).count("RolloutActor") == 1 for n in ("head", "node2"))
    group = base.samples_per_step // base.prompts
    return (f"{cores} cores; {steps} steps per run, steady state from step {steady_skip(steps) + 1}. Model inputs from the "
            f"1-actor run (so its row checks the form, not the inputs): t_L={costs.learner_s:.3f} s, t_G={costs.generate_s:.3f} s "
            f"({costs.generate_s / base.prompts:.4f} s per group of {group}), P*G={base.samples_per_step}. "
            f"relative_error = (model - measured) / measured. On {cores} cores, actors beyond {cores - 1} share cores with "
            "each other and the learner. The two-node row runs two raylets on this same machine: it measures the multi-node "
            "code path (placement, objects between two object stores), not extra compute"
            + ("" if placement is None else f"; rollout actors {'one per node' if spread else 'NOT spread'}: {placement}") + ". "
            "The predicted rows assume each actor and the learner on a core of its own, with the same per-sample costs. "
            "load_average_1min (before, after) above the core count means other work shared the cores.")


def run(args: list[str]) -> dict[str, Any]:
    opts, overrides = parse_args(args)
    steps, cores = opts["steps"], machine_cores()
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    measured, placement = measure(opts, overrides)
    base = measured[0]
    costs = stage_costs(base.rows, base.samples_per_step)
    rows, predicted = report(measured, costs, cores)
    return {"model": MODEL, "rows": rows, "predicted": predicted, "note": _note(steps, cores, base, costs, placement),
            "stages": {"learner_step_s": costs.learner_s, "generate_step_s": costs.generate_s, "samples_per_step": base.samples_per_step},
            "placement": placement, "cores": cores, "load_average_1min": [load_before, os.getloadavg()[0]], "steps": steps,
            "overrides": [*BENCH_DEFAULTS, *overrides], "seconds": time.perf_counter() - start}
