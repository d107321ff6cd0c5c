"""The single controller: start the actors, then loop rollout -> store -> learn -> sync.

Reads top to bottom in dataflow order. Everything that can be wrong with the
configuration (environment name, model path, dataset) fails here before Ray
starts, with one line naming the cause.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rlhub.config import ConfigError, RunConfig

log = logging.getLogger("rlhub")

WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "RAY_DEDUP_LOGS": "1",
}


# ---- before Ray ------------------------------------------------------------------

def prepare_run_dir(cfg: RunConfig) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume from or None)."""
    from rlhub.checkpoint import latest_checkpoint

    base = Path("runs") / cfg.experiment.name
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
    elif cfg.resume:
        candidates = sorted((p for p in base.glob("*") if latest_checkpoint(p)), key=lambda p: p.name)
        if not candidates:
            raise ConfigError(f"resume=true: no run of experiment {cfg.experiment.name!r} under {base} has a checkpoint")
        run_dir = candidates[-1]
    else:
        run_dir = base / datetime.now().strftime("%Y%m%d-%H%M%S")
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and ckpt is None:
        raise ConfigError(f"resume=true: {run_dir} holds no checkpoint")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir.resolve(), ckpt


def check_inputs(cfg: RunConfig) -> tuple[Path, Any, Any]:
    """(model directory, tokenizer, environment), after checking the environment and its data."""
    from rlhub.envs import make_env
    from rlhub.models.build import resolve_model_path
    from transformers import AutoTokenizer

    try:
        env = make_env(cfg.env.name, **cfg.env.kwargs)
        rows = env.dataset("train")
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(str(e).strip("'\"")) from None
    if not rows:
        raise ConfigError(f"env.name={cfg.env.name!r}: the train split is empty")
    if cfg.warm_start.steps and not callable(getattr(env, "format_examples", None)):
        raise ConfigError(f"warm_start.steps={cfg.warm_start.steps}: env.name={cfg.env.name!r} has no format_examples(); set warm_start.steps=0")
    model_path = resolve_model_path(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"model at {model_path}: the tokenizer has no EOS token to stop generation at")
    return model_path, tokenizer, env


def save_resolved_config(cfg: RunConfig, run_dir: Path) -> None:
    from omegaconf import OmegaConf

    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def init_ray(cfg: RunConfig, plan: "CorePlan") -> bool:
    """Start a local Ray or join the configured cluster; True if this process started it."""
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": WORKER_ENV}
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, runtime_env=runtime_env, log_to_driver=True)
        return True
    wanted = cfg.rollout.num_actors * cfg.cluster.rollout_num_cpus + cfg.cluster.learner_num_cpus
    num_cpus = cfg.cluster.num_cpus or max(os.cpu_count() or 1, int(wanted + 0.999))
    everywhere = os.sched_getaffinity(0) if plan.system else None
    if plan.system:  # Ray's own processes inherit this: keep them off the learner's core
        os.sched_setaffinity(0, plan.system)
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=True, configure_logging=False)
    finally:
        if everywhere:
            os.sched_setaffinity(0, everywhere)
    return True


@dataclass
class CorePlan:
    """Which cores the learner, each rollout engine and Ray's own processes use on a small CPU machine."""

    learner: int | None = None
    rollout: list[int | None] = field(default_factory=list)
    system: set[int] = field(default_factory=set)


def plan_cores(cfg: RunConfig) -> CorePlan:
    """The learner takes the last core; engines take the others round robin (all cores if there are
    more engines than other cores), so engines in different actors never share a core they need not."""
    k = cfg.rollout.num_actors
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = []
    if cfg.cluster.address or not cfg.rollout.pin_cores or len(cores) < 2:
        return CorePlan(rollout=[None] * k)
    pool = cores[:-1] if k <= len(cores) - 1 else cores
    learner = None if cfg.cluster.learner_num_gpus else cores[-1]
    return CorePlan(learner=learner, rollout=[pool[i % len(pool)] for i in range(k)], system=set(cores[:-1]))


def format_examples(cfg: RunConfig, env: Any, tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """Token ids of the environment's format-only (prompt, answer) pairs, the answer ending in EOS."""
    import random

    pairs = env.format_examples(cfg.warm_start.examples, random.Random(cfg.seed))
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    return [(encode(p), encode(a) + [tokenizer.eos_token_id]) for p, a in pairs]


def start_scorers(cfg: RunConfig, model_path: str, weight_sync: Any, resume_from: Path | None, plan: CorePlan) -> tuple[Any, Any]:
    """(critic actor or None, reference actor or None), restored from the checkpoint when resuming.

    The reference actor freezes the policy as RL starts (after the warm start): call after the first publish."""
    import ray

    from rlhub.actors.scorers import CriticActor, ReferenceActor
    from rlhub.algorithms.advantages import TOKEN_LEVEL

    algo = cfg.algorithm
    options = {"num_cpus": 0, "num_gpus": cfg.cluster.scorer_num_gpus}
    cores = plan.system or None
    critic = reference = None
    if algo.advantage in TOKEN_LEVEL:
        critic = CriticActor.options(**options).remote(cfg, model_path, cores)
        if resume_from is not None:
            ray.get(critic.load.remote(str(resume_from / "critic")))
    if algo.reference == "actor" and algo.kl_coef > 0:
        reference = ReferenceActor.options(**options).remote(cfg, model_path, cores)
        if resume_from is not None:
            ray.get(reference.load.remote(str(resume_from / "reference")))
        else:
            ray.get(reference.load_published.remote(weight_sync))
    return critic, reference


# ---- the run ---------------------------------------------------------------------

def train(cfg: RunConfig) -> dict[str, Any]:
    run_dir, resume_from = prepare_run_dir(cfg)
    model_path, tokenizer, env = check_inputs(cfg)
    save_resolved_config(cfg, run_dir)
    _setup_logging(run_dir)
    log.info("run directory %s; model %s", run_dir, model_path)
    plan = plan_cores(cfg)
    started_ray = init_ray(cfg, plan)
    try:
        return _train(cfg, run_dir, resume_from, model_path, tokenizer, env, plan)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _train(cfg: RunConfig, run_dir: Path, resume_from: Path | None, model_path: Path, tokenizer: Any, env: Any, plan: CorePlan) -> dict[str, Any]:
    import ray

    from rlhub.actors.learner import LearnerActor
    from rlhub.actors.rollout import RolloutFleet
    from rlhub.actors.store import RayDataStore
    from rlhub.checkpoint import read_state, write_checkpoint
    from rlhub.tracking import Tracker
    from rlhub.weight_sync import ObjectStoreWeightSync, WeightRegistry, probe_sequence

    probe = probe_sequence(len(tokenizer))
    weight_sync = ObjectStoreWeightSync(ray.remote(num_cpus=0)(WeightRegistry).remote())
    store = RayDataStore.create(cfg.datastore.num_shards, cfg.prompts_per_step, cfg.max_staleness)
    learner = LearnerActor.options(num_cpus=cfg.cluster.learner_num_cpus, num_gpus=cfg.cluster.learner_num_gpus).remote(
        cfg, str(model_path), weight_sync, store, probe, plan.learner
    )
    version, resume_state, warm = 0, {}, {}
    if resume_from is not None:
        resume_state = read_state(resume_from)
        version = resume_state["version"]
        ray.get(learner.load.remote(str(resume_from), version))
        store.load_state_dict(resume_state["store"])
        log.info("resumed from %s at version %d", resume_from, version)
    elif cfg.warm_start.steps:
        warm = ray.get(learner.warm_start.remote(format_examples(cfg, env, tokenizer), cfg.warm_start.steps, cfg.warm_start.batch_size, cfg.warm_start.lr, cfg.seed))
        log.info("format warm start: %s", warm)
    ray.get(learner.publish.remote())  # engines start from the learner's weights and probe
    critic, reference = start_scorers(cfg, str(model_path), weight_sync, resume_from, plan)

    fleet = RolloutFleet(cfg, str(model_path), store, weight_sync, probe, plan.rollout, [s for s in (reference, critic) if s])
    tracker = Tracker(run_dir, cfg, cfg.experiment.total_steps, version, resume_state.get("wandb_id"))
    tracker.summary(warm)
    history: list[dict[str, float]] = []
    last_tokens, last_time = 0, time.perf_counter()

    def checkpoint(v: int, held: list[int]) -> None:
        state = {"store": store.state_dict(held), "wandb_id": tracker.run_id, "experiment": cfg.experiment.name}
        def save(d: Path) -> None:
            saves = [learner.save.remote(str(d))]
            saves += [critic.save.remote(str(d / "critic"))] if critic else []
            saves += [reference.save.remote(str(d / "reference"))] if reference else []
            ray.get(saves)

        write_checkpoint(run_dir, v, save, state, cfg.checkpoint.keep_last)

    in_flight: list = []  # the learner step under way, watched while waiting for data

    def watch() -> None:
        fleet.check()
        done = ray.wait(in_flight, num_returns=len(in_flight), timeout=0)[0] if in_flight else []
        ray.get(done)  # a failed learner or critic step raises here instead of leaving the run waiting

    def fetch(for_version: int) -> tuple[list, float]:
        start = time.perf_counter()
        found = store.get_batch(cfg.prompts_per_step, for_version, cfg.datastore.batch_timeout_s, on_wait=watch)
        return found, time.perf_counter() - start

    def checkpoint_due(v: int) -> bool:
        return bool(cfg.checkpoint.every) and v % cfg.checkpoint.every == 0

    def submit(batch: list) -> list:
        """The learner's step (and the critic's, on the same batch) on these groups."""
        # refs as top-level arguments: Ray moves them to the learner while it still trains the step before
        refs: list = []
        picks: list[list[int]] = []
        for _, (ref, index) in batch:
            if not refs or refs[-1] != ref:
                refs.append(ref)
                picks.append([])
            picks[-1].append(index)
        steps = [learner.train_step.remote(picks, *refs)]
        return steps + [critic.train_step.remote(picks, *refs)] if critic else steps

    total = cfg.experiment.total_steps
    try:
        # 1. rollout + store: the oldest groups no more than max_staleness behind the version they train at
        groups, waited = fetch(version) if version < total else ([], 0.0)
        pending = submit(groups) if groups else None
        step_start = time.perf_counter()
        while version < total:
            # 2. learn; the learner publishes the new weights (3. sync) and opens admission before answering.
            # Meanwhile: monitoring, and the next batch, queued on the learner at once unless a checkpoint
            # must be written between the two steps.
            in_flight[:] = pending or []
            rollout_stats = fleet.stats()
            store_stats = store.stats()
            next_groups, next_waited = fetch(version + 1) if version + 1 < total else ([], 0.0)
            next_pending = submit(next_groups) if next_groups and not checkpoint_due(version + 1) else None
            metrics, *critic_metrics = ray.get(pending)
            version = int(metrics.pop("version"))
            for extra in critic_metrics:
                metrics.update(extra)
                lags = [extra["critic/version"] - 1 - m.extra["critic_version"] for m, _ in groups]
                metrics["critic/value_lag_mean"] = sum(lags) / len(lags)  # critic versions between scoring and training
                metrics["critic/value_lag_max"] = max(lags)
            # 4. tracking
            now = time.perf_counter()
            generated = sum(s["generated_tokens"] for s in rollout_stats)
            metrics.update(_step_metrics(groups, rollout_stats, store_stats, waited, now - step_start, fleet.restarts))
            metrics["perf/generated_tokens_per_s"] = (generated - last_tokens) / max(now - last_time, 1e-9)
            metrics["perf/trained_tokens_per_s"] = metrics["train/tokens"] / max(now - step_start, 1e-9)
            last_tokens, last_time, step_start = generated, now, now
            history.append(metrics)
            tracker.log(version, metrics)
            if checkpoint_due(version):
                checkpoint(version, held=[m.group_id for m, _ in next_groups])
            groups, waited = next_groups, next_waited
            pending = next_pending or (submit(groups) if groups else None)
        if cfg.checkpoint.keep_final and not checkpoint_due(version):
            checkpoint(version, held=[])
    finally:
        store.stop()
        finished = fleet.join()
        store.drain("run_end")
        final_stats = store.stats()
        tracker.close()
    summary = _summary(cfg, history, final_stats, finished, run_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _step_metrics(groups: list, rollout_stats: list[dict], store_stats: dict, waited: float, step_s: float, restarts: int) -> dict[str, float]:
    metas = [m for m, _ in groups]
    n = sum(m.num_samples for m in metas)
    return {
        "rollout/success_rate": sum(m.success_mean * m.num_samples for m in metas) / n,
        "rollout/response_len": sum(m.response_len_mean * m.num_samples for m in metas) / n,
        "time/step_s": step_s,
        "time/wait_s": waited,
        "time/generate_s": sum(m.generate_seconds for m in metas),
        "time/sync_s": sum(s["last_sync_seconds"] for s in rollout_stats) / len(rollout_stats),
        "sync/probe_error": max(s["last_probe_error"] for s in rollout_stats),
        "sync/rebuilds": sum(s["sync_rebuilds"] for s in rollout_stats),
        "sync/failures": sum(s["sync_failures"] for s in rollout_stats),
        "rollout/restarts": restarts,
        "store/queued": store_stats["queued"],
        "store/in_flight": store_stats["in_flight"],
        "store/produced": store_stats["produced"],
        "store/consumed": store_stats["consumed"],
        "store/dropped": store_stats["dropped_total"],
    }


def _summary(cfg: RunConfig, history: list[dict], stats: dict, finished: list, run_dir: Path) -> dict[str, Any]:
    def tenth(key: str, last: bool) -> float | None:
        k = max(1, len(history) // 10)
        part = history[-k:] if last else history[:k]
        vals = [h[key] for h in part if key in h]
        return sum(vals) / len(vals) if vals else None

    times = [h["time/step_s"] for h in history]
    return {
        "run_dir": str(run_dir),
        "steps": len(history),
        "reward_first_tenth": tenth("rollout/reward_mean", False),
        "reward_last_tenth": tenth("rollout/reward_mean", True),
        "success_first_tenth": tenth("rollout/success_rate", False),
        "success_last_tenth": tenth("rollout/success_rate", True),
        "staleness_max": max((h.get("staleness/max", 0.0) for h in history), default=0.0),
        "mean_step_s": sum(times) / len(times) if times else None,
        "store": stats,
        "rollout": finished,
        "max_staleness": cfg.max_staleness,
    }


def _setup_logging(run_dir: Path) -> None:
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
