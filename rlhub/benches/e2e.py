"""`rlhub bench e2e` and `rlhub bench presets`: the pipeline's throughput, and every algorithm preset.

`rlhub bench e2e [staleness=0,1,2,4] [success=0.5] [overrides...]`, in one invocation:
generation alone (admission, weight pick-up with its probe check, generation, scoring) and
training alone (the optimizer step and the weight publish with its probe), with the same engine
and learner code in a child process, one thread each as in the actors; then the full pipeline at
each `max_staleness`. Per run: samples/s and trained tokens/s over the steady state (from the
first tenth of the steps on), the step-time split, and the wall-clock from the first step's start
to the first step where the success rate averaged over the last 10 steps reaches `success`
(start-up excluded; null when the run never reaches it; the curve of `rlhub bench peer`). Pipeline efficiency = max(generation-only,
training-only step time) / the asynchronous step time, at the config's `max_staleness` (1 by
default): 1.0 means the pipeline hides the shorter phase completely.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from rlhub.benches.peer import rolling_curve, steady_skip, time_to
from rlhub.tracking import read_rows

BENCH_DEFAULTS = ["wandb.mode=disabled", "progress=false", "checkpoint.keep_final=false", "eval.every=0", "eval.before=false", "eval.final=false",
                  "experiment.total_steps=100"]


def _isolated_phases(overrides: list[str], steps: int) -> dict[str, float]:
    """Seconds per step of generation alone and of training alone.

    Runs in a child process: an engine changes process-wide state (vLLM sets
    environment variables and thread bindings) that Ray workers started later
    from this process would inherit."""
    import torch

    from rlhub.config import load_config

    cfg = load_config(overrides)
    from rlhub.engines import make_engine
    from rlhub.datastore import InMemoryDataStore
    from rlhub.envs.registry import build_env
    from rlhub.learner import Learner
    from rlhub.models.logprobs import SamplingPolicy
    from rlhub.models.build import resolve_model_path
    from rlhub.moe import replay_enabled
    from rlhub.rollout import DataSide, RolloutWorker
    from rlhub.types import collate
    from rlhub.weight_sync import InMemoryWeightSync, probe_sequence
    from transformers import AutoTokenizer

    torch.set_num_threads(cfg.cluster.torch_threads)
    path = str(resolve_model_path(cfg.model))
    tok = AutoTokenizer.from_pretrained(path)
    probe = probe_sequence(len(tok))
    policy = SamplingPolicy(cfg.rollout.temperature, cfg.rollout.top_p)
    learner = Learner(path, cfg.model, cfg.algorithm, probe, seed=cfg.seed, generation_budget=cfg.rollout.max_new_tokens, policy=policy,
                      moe=cfg.moe, replay=replay_enabled(cfg.moe, cfg.rollout.engine))
    sync = InMemoryWeightSync()
    store = InMemoryDataStore(cfg.prompts_per_step, max_staleness=10**9)
    engine = make_engine(cfg.rollout, path, cfg.model.dtype, cfg.seed, None, cfg.cluster.torch_threads,
                         routing=replay_enabled(cfg.moe, cfg.rollout.engine), selection_bias=cfg.moe.balance == "aux_free")
    worker = RolloutWorker(0, cfg.rollout, cfg.group_size, cfg.prompts_per_step, engine, build_env(cfg.env, cfg.seed),
                           tok, store, sync, DataSide.of(cfg.algorithm), probe, cfg.seed)
    worker.batch_prompts = worker.max_groups = cfg.prompts_per_step  # one learner step's groups at a time
    gen_times, train_times, tokens = [], [], 0
    for step in range(steps + 1):  # the first step of each phase warms up
        start = time.perf_counter()
        worker.step()
        gen = time.perf_counter() - start
        batch = collate([t for _, t in store.get_batch(cfg.prompts_per_step, learner.version)], tok.pad_token_id or 0)
        start = time.perf_counter()
        learner.train_step(batch)
        sync.push(learner.state_dict(), learner.version, learner.probe())  # publishing is part of a training step
        train = time.perf_counter() - start
        store.set_version(learner.version)
        if step:
            gen_times.append(gen)
            train_times.append(train)
            tokens += int(batch.completion_mask.sum())
    engine.close()
    gen_s, train_s = sum(gen_times) / steps, sum(train_times) / steps
    return {
        "generation_only_step_s": gen_s,
        "training_only_step_s": train_s,
        "generation_only_samples_per_s": cfg.prompts_per_step * cfg.group_size / gen_s,
        "training_only_tokens_per_s": tokens / steps / train_s,
    }


def _pipeline(overrides: list[str], staleness: int, skip: int, threshold: float) -> dict[str, Any]:
    from rlhub.actors.controller import train
    from rlhub.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config([*overrides, f"max_staleness={staleness}", f"run_dir={tmp}"])
        summary = train(cfg)
        every = read_rows(Path(tmp) / "metrics.jsonl")
    rows = every[skip:]
    seconds = sum(r["time/step_s"] for r in rows)
    samples = cfg.prompts_per_step * cfg.group_size * len(rows)

    def per_step(key: str) -> float:
        return sum(r.get(key, 0.0) for r in rows) / len(rows)

    return {
        "step_s": seconds / len(rows),
        "samples_per_s": samples / seconds,
        "trained_tokens_per_s": sum(r["train/tokens"] for r in rows) / seconds,
        "split_s": {k: per_step(f"time/{k}_s") for k in ("train", "publish", "wait", "collate", "learner_idle")},
        "staleness_mean": per_step("staleness/mean"),
        "time_to_success": {str(threshold): time_to(rolling_curve([r["time/step_s"] for r in every], [r["rollout/success_rate"] for r in every]), threshold)},
        "success_last_tenth": summary["success_last_tenth"],
    }


def check_args(args: list[str]) -> tuple[list[int], float, list[str], Any]:
    """(stalenesses, success threshold, overrides, config) of `rlhub bench e2e`'s arguments; a ConfigError
    names what is wrong (before any run waits for a quiet machine)."""
    from rlhub.config import ConfigError, load_config

    stalenesses, threshold, overrides = [0, 1, 2, 4], 0.5, []
    for a in args:
        if a.startswith("staleness="):
            stalenesses = [int(x) for x in a.split("=", 1)[1].split(",")]
        elif a.startswith("success="):
            threshold = float(a.split("=", 1)[1])
        else:
            overrides.append(a)
    overrides = [*BENCH_DEFAULTS, *overrides]
    cfg = load_config(overrides)
    from rlhub.algorithms import advantage_needs

    algo = cfg.algorithm
    if advantage_needs(algo.advantage).critic or (algo.kl_coef > 0 and algo.reference == "actor"):
        raise ConfigError("bench e2e measures algorithms without scorer actors (no critic, reference=learner); use rlhub bench presets")
    if advantage_needs(algo.advantage).segment_values:
        raise ConfigError("bench e2e measures the pipeline on the training groups alone; SPO's branches are compared at one "
                          "generation budget by rlhub bench budget")
    if 0 not in stalenesses:
        raise ConfigError("bench e2e: staleness= must include 0 (the synchronous baseline)")
    return stalenesses, threshold, overrides, cfg


def bench_e2e(args: list[str], run_index: int = 0) -> dict[str, Any]:
    """Odd `run_index`es (`rlhub.benches.repeat`) run the pipeline's stalenesses in the reverse order,
    then the isolated phases; even ones the phases first."""
    stalenesses, threshold, overrides, cfg = check_args(args)
    skip = steady_skip(cfg.experiment.total_steps)  # start-up steps are not steady state
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    def isolated() -> dict[str, float]:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_isolated_phases, overrides, min(10, cfg.experiment.total_steps)).result()

    forward = run_index % 2 == 0
    phases = isolated() if forward else {}
    done = {str(s): _pipeline(overrides, s, skip, threshold) for s in (stalenesses if forward else stalenesses[::-1])}
    runs = {str(s): done[str(s)] for s in stalenesses}
    phases = phases or isolated()
    headline = str(cfg.max_staleness if cfg.max_staleness in stalenesses and cfg.max_staleness > 0 else max(stalenesses))
    bound = max(phases["generation_only_step_s"], phases["training_only_step_s"])
    return {
        "config": {"engine": cfg.rollout.engine, "num_actors": cfg.rollout.num_actors, "prompts_per_step": cfg.prompts_per_step,
                   "group_size": cfg.group_size, "max_new_tokens": cfg.rollout.max_new_tokens, "steps": cfg.experiment.total_steps,
                   "steady_state_from_step": skip + 1, "success_threshold": threshold, "async_staleness": int(headline)},
        **phases,
        "runs": runs,
        "async_over_sync_samples_per_s": runs[headline]["samples_per_s"] / runs["0"]["samples_per_s"],
        "pipeline_efficiency": bound / runs[headline]["step_s"],
    }


# ---- `rlhub bench presets` ---------------------------------------------------------

PRESETS = ("grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo", "reinforce_pp", "ppo", "spo")
PRESET_DEFAULTS = ["wandb.mode=disabled", "progress=false", "checkpoint.keep_final=false", "experiment.total_steps=150"]
STALENESS_RUNS = {"grpo S=4 none": ["algorithm=grpo", "max_staleness=4", "algorithm.correction=none"],
                  "grpo S=4 tis": ["algorithm=grpo", "max_staleness=4", "algorithm.correction=tis"]}


def _preset_run(overrides: list[str]) -> dict[str, Any]:
    """One short training run through the asynchronous pipeline: reward, success and the correction's metrics."""
    import math

    from rlhub.actors.controller import train
    from rlhub.config import load_config

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config([*PRESET_DEFAULTS, *overrides, f"run_dir={tmp}"])
        summary = train(cfg)
        rows = read_rows(Path(tmp) / "metrics.jsonl")
    tenth = max(1, len(rows) // 10)

    def mean(key: str, part: list[dict]) -> float | None:
        vals = [r[key] for r in part if key in r]
        return sum(vals) / len(vals) if vals else None

    out: dict[str, Any] = {
        "steps": len(rows),
        "reward_first_tenth": summary["reward_first_tenth"],
        "reward_last_tenth": summary["reward_last_tenth"],
        "success_first_tenth": summary["success_first_tenth"],
        "success_last_tenth": summary["success_last_tenth"],
        "seconds": time.perf_counter() - start,
        "staleness_mean": mean("staleness/mean", rows),
        "staleness_max": summary["staleness_max"],
        "nonfinite_metrics": sum(1 for r in rows for v in r.values() if isinstance(v, float) and not math.isfinite(v)),
        "dropped": summary["store"]["dropped"],
    }
    for key in ("train/is_ratio_mean", "train/is_ratio_max", "train/clip_frac", "train/is_truncated_frac", "train/kl_ref"):
        if any(key in r for r in rows):
            out[key.split("/", 1)[1]] = mean(key, rows)
    if any("critic/value_loss" in r for r in rows):
        # the returns' distribution moves as the policy learns: compare critics on the same batches too
        out["value_loss_first_tenth"] = mean("critic/value_loss", rows[:tenth])
        out["value_loss_last_tenth"] = mean("critic/value_loss", rows[-tenth:])
        # the same last batches, scored by the critic as it started (V = 0)
        out["initial_critic_value_loss_last_tenth"] = mean("critic/zero_value_loss", rows[-tenth:])
        out["explained_variance_first_tenth"] = mean("critic/explained_variance", rows[:tenth])
        out["explained_variance_last_tenth"] = mean("critic/explained_variance", rows[-tenth:])
        out["critic_value_lag_max"] = max(r["critic/value_lag_max"] for r in rows)
    return out


def bench_presets(overrides: list[str]) -> dict[str, Any]:
    """Each preset of conf/algorithm for a short run, then GRPO at max_staleness=4 without and with TIS.

    `overrides` apply to every run; `presets=a,b` (first) picks presets."""
    names: tuple[str, ...] = PRESETS
    if overrides and overrides[0].startswith("presets="):
        names = tuple(overrides[0].split("=", 1)[1].split(","))
        overrides = overrides[1:]
    results: dict[str, Any] = {"overrides": [*PRESET_DEFAULTS, *overrides]}
    for name in names:
        results[name] = _preset_run([f"algorithm={name}", *overrides])
    if names == PRESETS:
        for label, extra in STALENESS_RUNS.items():
            results[label] = _preset_run([*extra, *overrides])
    return results


run = bench_e2e
