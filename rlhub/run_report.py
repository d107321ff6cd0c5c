"""What a run reports about itself: per-step metrics from the pipeline's parts, sampled groups, the summary.

Pure functions over plain values (no Ray): the controller gathers the inputs
each step and at the end. Failure counters live here in one place, so the
per-step metrics (W&B, metrics.jsonl) and the summary name them the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlhub.datastore import GroupMeta

if TYPE_CHECKING:
    from rlhub.types import GroupTensors


def step_metrics(metas: list[GroupMeta], rollout_stats: list[dict], store_stats: dict, waited: float, step_s: float, restarts: int,
                 retired: list[dict] = ()) -> dict[str, float]:
    """The pipeline's side of a step's metrics (the learner adds its own); `retired`: the last stats of
    rollout actors that crashed, whose failure counters still count."""
    n = sum(m.num_samples for m in metas) or 1
    return {
        "rollout/success_rate": sum(m.success_mean * m.num_samples for m in metas) / n,
        "rollout/response_len": sum(m.response_len_mean * m.num_samples for m in metas) / n,
        "judge/samples": float(sum(s.get("judged", 0) for s in [*rollout_stats, *retired])),
        "rollout/turns": sum(m.extra.get("turns_mean", 1.0) * m.num_samples for m in metas) / n,
        **{f"rollout/truncated/{why}": float(sum(s.get("truncated", {}).get(why, 0) for s in [*rollout_stats, *retired]))
           for why in ("max_turns", "max_tokens")},
        **{f"rollout/outcome/{k}": float(v) for k, v in outcome_counts([*rollout_stats, *retired]).items()},
        **spo_metrics([*rollout_stats, *retired]),
        **agent_metrics(metas),
        **agent_engine_seconds([*rollout_stats, *retired]),
        "time/step_s": step_s,
        "time/wait_s": waited,
        "time/generate_s": sum(m.generate_seconds for m in metas),
        "time/sync_s": sum(s["last_sync_seconds"] for s in rollout_stats) / max(len(rollout_stats), 1),
        "sync/probe_error": max((s["last_probe_error"] for s in rollout_stats), default=0.0),
        "sync/bytes": max((s.get("last_sync_bytes", 0) for s in rollout_stats), default=0),
        "mem/rollout_peak_rss_mb": max((s.get("peak_rss_mb", 0.0) for s in rollout_stats), default=0.0),
        "store/queued": store_stats["queued"],
        "store/in_flight": store_stats["in_flight"],
        "store/produced": store_stats["produced"],
        "store/consumed": store_stats["consumed"],
        "store/dropped": store_stats["dropped_total"],
        **{f"failures/{k}": float(v) for k, v in failure_counters([*rollout_stats, *retired], store_stats, restarts).items()},
    }


def agent_metrics(metas: list[GroupMeta]) -> dict[str, float]:
    """A multi-agent run's step, per agent (none for one agent): its samples, mean reward and success, and
    the tokens it generated (the rollout's load by agent), over the step's groups."""
    totals: dict[str, list[float]] = {}
    for m in metas:
        for name, fig in (m.extra.get("agents") or {}).items():
            t = totals.setdefault(name, [0.0, 0.0, 0.0, 0.0])
            for i, v in enumerate(fig):
                t[i] += v
    out: dict[str, float] = {}
    for name, (n, reward, won, tokens) in totals.items():
        out[f"agents/{name}/samples"] = n
        out[f"agents/{name}/reward_mean"] = reward / max(n, 1.0)
        out[f"agents/{name}/success_rate"] = won / max(n, 1.0)
        out[f"agents/{name}/tokens"] = tokens
    return out


def agent_engine_seconds(rollout_stats: list[dict]) -> dict[str, float]:
    """A multi-agent run's engine time by agent since the run began (`WorkerStats.agent_generate_seconds`:
    each engine call's time shared by the episodes it generated for): the rollout load per agent in
    time, beside the step's tokens."""
    totals: dict[str, float] = {}
    for s in rollout_stats:
        for agent, seconds in (s.get("agent_generate_seconds") or {}).items():
            totals[agent] = totals.get(agent, 0.0) + seconds
    return {f"agents/{a}/engine_s": v for a, v in sorted(totals.items())}


def spo_metrics(rollout_stats: list[dict]) -> dict[str, float]:
    """SPO's branching since the run began (none without it): cuts, branch episodes (dropped ones
    among them), the tokens they generated, and cuts left out for want of a state copy."""
    keys = ("spo_cuts", "spo_branches", "spo_branches_dropped", "spo_branch_tokens", "spo_unbranchable")
    totals = {k: sum(s.get(k, 0) for s in rollout_stats) for k in keys}
    if not totals["spo_cuts"] and not totals["spo_unbranchable"]:
        return {}
    return {f"spo/{k.removeprefix('spo_')}": float(v) for k, v in totals.items()}


def outcome_counts(rollout_stats: list[dict]) -> dict[str, int]:
    """Environment steps by the outcome the environment reported (`info["outcome"]`; the code tasks'
    sandbox outcomes: ok, refused, timeout, ...), summed over the rollout actors, since the run began."""
    out: dict[str, int] = {}
    for s in rollout_stats:
        for outcome, n in s.get("outcomes", {}).items():
            out[outcome] = out.get(outcome, 0) + n
    return dict(sorted(out.items()))


def failure_counters(rollout_stats: list[dict], store_stats: dict, restarts: int, learner: dict | None = None) -> dict[str, int]:
    """Every failure the run counts, flat: env errors by type, drops by reason, sync trouble, crashes, skipped steps."""
    out: dict[str, int] = {
        "env_errors": sum(sum(s["env_errors"].values()) for s in rollout_stats),
        "sync_rebuilds": sum(s["sync_rebuilds"] for s in rollout_stats),
        "sync_failures": sum(s["sync_failures"] for s in rollout_stats),
        "actor_restarts": restarts,
    }
    for s in rollout_stats:
        for kind, n in s["env_errors"].items():
            out[f"env_error/{kind}"] = out.get(f"env_error/{kind}", 0) + n
    for reason, n in store_stats["dropped"].items():
        out[f"dropped/{reason}"] = n
    for key, n in (learner or {}).items():
        out[key] = n
    return out


def sample_records(step: int, meta: GroupMeta, tensors: GroupTensors, tokenizer: Any) -> list[dict[str, Any]]:
    """One JSON-able record per sample of a trained group: texts, ids, the engine's log-probs and versions."""
    records = []
    for i in range(tensors.input_ids.shape[0]):
        length = int(tensors.attention_mask[i].sum())
        generated = tensors.completion_mask[i].bool()  # [T-1] targets that were generated
        start = int(generated.nonzero()[0]) + 1 if generated.any() else length
        prompt_ids = tensors.input_ids[i, :start].tolist()
        completion_ids = tensors.input_ids[i, start:length].tolist()
        records.append({
            "step": step,
            "group": meta.group_id,
            "row": meta.prompt_index,
            "actor": meta.actor_id,
            "prompt": tokenizer.decode(prompt_ids),
            "completion": tokenizer.decode(completion_ids),
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "logprobs": tensors.old_logprobs[i][generated].tolist(),
            "versions": tensors.versions[i][generated].tolist(),
            "reward": float(tensors.rewards[i]),
            "finish_reason": meta.finish_reasons[i] if i < len(meta.finish_reasons) else None,
        })
    return records


def tenth(history: list[dict], key: str, last: bool) -> float | None:
    """Mean of `key` over the first (or last) tenth of the steps."""
    k = max(1, len(history) // 10)
    part = history[-k:] if last else history[:k]
    vals = [h[key] for h in part if key in h and h[key] is not None]
    return sum(vals) / len(vals) if vals else None
