"""Evaluation on the environment's held-out rows ("test" split).

Every `eval.every` steps, rollout actor 0 pauses between generation rounds and
runs the eval rows with the policy version it holds: once greedily (pass@1, the
share of rows solved) and, with `eval.k` > 0, k sampled episodes per row at the
training temperature and top-p (mean reward; pass@k, the share of rows solved
by at least one of the k). Episodes run exactly as in training (multi-turn,
tools, limits), but nothing goes to the store. Results go to metrics.jsonl and
W&B under `eval/`, the last one to the summary; `rlhub eval` runs the same on a
checkpoint, outside a run.

Success is the environment's `success` when it gives one, else reward >= 1. An
episode that could not start or was dropped (environment error, timeout) counts
as a failure, and is counted in `eval/failed`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence


@dataclass
class EvalConfig:
    every: int = 0
    """Steps between evaluations during the run (0: none)."""
    rows: int = 128
    """Eval rows used, the first of the split (0: all)."""
    k: int = 4
    """Sampled episodes per row for mean reward and pass@k (0: greedy pass@1 only)."""
    final: bool = True
    """Evaluate the final policy at the end of the run (in the summary), when the environment has eval rows."""
    before: bool = False
    """Also evaluate the starting policy (version 0), asked for as the run starts: the "before" of a
    before-and-after comparison (metrics at eval/step 0)."""


def succeeded(episode: Any) -> bool:
    if episode.dropped or episode.result is None:
        return False
    success = getattr(episode.result, "success", None)
    return bool(success) if success is not None else episode.total_reward >= 1.0


def evaluate(worker: Any, rows: Sequence[Any], k: int) -> dict[str, float]:
    """`eval/*` metrics of the worker's engine (at its current weights) on `rows`."""
    greedy = replace(worker.sampling, temperature=0.0, top_p=1.0, seed=None)
    once = worker.run_episodes(list(rows), 1, greedy)
    failed = sum(1 for r in once if isinstance(r, str) or r[0].dropped)
    out = {
        "eval/version": float(worker.engine.version),
        "eval/rows": float(len(rows)),
        "eval/pass@1": sum(1 for r in once if not isinstance(r, str) and succeeded(r[0])) / len(rows),
        "eval/reward_greedy": sum(r[0].total_reward for r in once if not isinstance(r, str) and not r[0].dropped) / len(rows),
        "eval/turns_mean": sum(r[0].turns for r in once if not isinstance(r, str)) / len(rows),
    }
    if k:
        sampled = worker.run_episodes(list(rows), k, worker.sampling)
        episodes = [e for r in sampled if not isinstance(r, str) for e in r]
        failed += sum(k for r in sampled if isinstance(r, str)) + sum(1 for e in episodes if e.dropped)
        out["eval/reward_mean"] = sum(e.total_reward for e in episodes if not e.dropped) / (len(rows) * k)
        out[f"eval/pass@{k}"] = sum(1 for r in sampled if not isinstance(r, str) and any(succeeded(e) for e in r)) / len(rows)
    out["eval/failed"] = float(failed)
    return out


def eval_rows(env: Any, limit: int) -> Sequence[Any]:
    """The first `limit` rows of the environment's eval split (all for 0; empty when it has none)."""
    try:
        rows = env.dataset("test")
    except (KeyError, ValueError):
        return []
    n = len(rows) if not limit else min(limit, len(rows))
    return [rows[i] for i in range(n)]


def evaluate_checkpoint(target: str, overrides: list[str]) -> dict[str, Any]:
    """`rlhub eval`: a run directory (its latest checkpoint) or a checkpoint directory, evaluated
    in this process with the run's own config (`key=value` overrides apply, e.g. eval.k=8)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from rlhub import lora
    from rlhub.checkpoint import readable_checkpoint, verify_checkpoint
    from rlhub.config import ConfigError, RunConfig, validate

    path = Path(target)
    if (path / "config.yaml").is_file():  # a run directory: its newest checkpoint that verifies
        checkpoint = readable_checkpoint(path)
    else:  # a checkpoint directory, verified against its manifest
        checkpoint = path
        verify_checkpoint(path)
    run_dir = checkpoint.parent.parent if checkpoint is not None else path
    policy_dir = None if checkpoint is None else checkpoint / "policy"
    if checkpoint is not None and lora.has_adapters(checkpoint):  # LoRA: the adapters merged into the base, aside
        import tempfile

        from rlhub.export import export

        policy_dir = Path(tempfile.mkdtemp(prefix="rlhub-eval-")) / "policy"
        export(checkpoint, policy_dir)
    if checkpoint is not None and (checkpoint / "policies").is_dir():
        raise ConfigError(f"{target}: a run of separate policies (agents.policies=separate); `rlhub eval` loads one policy. The run's "
                          "own evaluations (eval.every, eval.final: metrics.jsonl, summary.json) play each agent with its own policy")
    if checkpoint is None or not (policy_dir / "config.json").is_file():
        raise ConfigError(f"{target}: neither a run directory with a checkpoint nor a checkpoint directory (policy/ missing)")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}/config.yaml not found: the checkpoint's run config is needed for its environment")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(run_dir / "config.yaml"), OmegaConf.from_dotlist(overrides))
        cfg: RunConfig = OmegaConf.to_object(merged)
    except Exception as e:  # noqa: BLE001 - OmegaConf's errors name the key
        raise ConfigError(str(e).splitlines()[0]) from None
    validate(cfg)
    version = int(checkpoint.name.rpartition("_")[2]) if checkpoint.name.rpartition("_")[2].isdigit() else 0
    model = str(policy_dir)
    has_tokenizer = any(f.name.startswith("tokenizer") for f in policy_dir.iterdir())
    tokenizer_from = None
    if not has_tokenizer:  # a checkpoint from before policy/ kept its tokenizer: the run's model has it
        from rlhub.models.build import resolve_model_path

        tokenizer_from = str(resolve_model_path(cfg.model))
    return {"checkpoint": str(checkpoint), "env": cfg.env.name, **evaluate_model(cfg, model, version, tokenizer_from)}


def evaluate_model(cfg: Any, model: str, version: int = 0, tokenizer_from: str | None = None) -> dict[str, Any]:
    """The held-out evaluation of the HF model directory `model` under run config `cfg` (its environment's
    eval rows, `eval.rows` and `eval.k`, its rollout engine and dtype), in this process: what a run's
    own evaluations compute, for a model from anywhere (`rlhub bench peer` evaluates TRL's this way)."""
    from transformers import AutoTokenizer

    from rlhub.config import ConfigError
    from rlhub.datastore import InMemoryDataStore
    from rlhub.engines import make_engine
    from rlhub.envs.registry import build_env
    from rlhub.rollout import DataSide, RolloutWorker
    from rlhub.weight_sync import InMemoryWeightSync, probe_sequence

    env = build_env(cfg.env, cfg.seed)
    if getattr(env, "uses_sandbox", False):  # the run's isolation policy holds outside the run too
        from rlhub import sandbox

        try:
            sandbox.adopt(cfg.sandbox)
        except sandbox.IsolationUnavailable as e:
            raise ConfigError(str(e)) from None
    rows = eval_rows(env, cfg.eval.rows)
    if not rows:
        raise ConfigError(f"env.name={cfg.env.name!r} has no eval rows (set env.dataset.eval_split or env.dataset.eval_size)")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from or model)
    engine = make_engine(cfg.rollout, model, cfg.rollout.dtype or cfg.model.dtype, cfg.seed, None, cfg.cluster.torch_threads, selection_bias=cfg.moe.balance == "aux_free")
    worker = RolloutWorker(0, cfg.rollout, cfg.group_size, cfg.prompts_per_step, engine, env, tokenizer,
                           InMemoryDataStore(cfg.prompts_per_step, 0), InMemoryWeightSync(), DataSide.of(cfg.algorithm),
                           probe_sequence(len(tokenizer)), cfg.seed, env_name=cfg.env.name, env_timeout_s=cfg.env.timeout_s)
    engine.version = version
    try:
        return evaluate(worker, rows, cfg.eval.k)
    finally:
        worker.envs.close()
