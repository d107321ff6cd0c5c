"""The learner's step metrics that are sums over its micro-batches and ranks, and their read-out.

A step's local results (loss parts, agreement sums, groups trained, tokens per
staleness, reward moments) are plain numbers that add over micro-batches and
over learner ranks; `merge_ranks` adds them up, and the functions below turn
the totals into the logged metrics.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhub.types import GroupTensors


def agreement_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Learner-engine agreement (see `Learner._agreement`). `train/logprob_mismatch` and the
    `*_same_version` keys: tokens sampled at the learner's version (numerical mismatch only; absent on
    steps without such tokens). `moe/logprob_gap_*` and `moe/routing_mismatch`: all generated tokens."""
    out: dict[str, float] = {}
    tokens, same = sums.get("tokens", 0.0), sums.get("same_tokens", 0.0)
    if same > 0:
        out["train/logprob_mismatch"] = sums["gap_same"] / same
        out["train/logprob_mismatch_max"] = sums["gap_same_max"]
    for mode in ("replay", "fresh"):
        if tokens > 0 and f"gap_all_{mode}" in sums:
            out[f"moe/logprob_gap_{mode}"] = sums[f"gap_all_{mode}"] / tokens
        if same > 0 and f"gap_same_{mode}" in sums:
            out[f"moe/logprob_mismatch_{mode}"] = sums[f"gap_same_{mode}"] / same
    if sums.get("route_pairs", 0.0) > 0:
        out["moe/routing_mismatch"] = sums["route_diff"] / sums["route_pairs"]
    if sums.get("route_pairs_same", 0.0) > 0:
        out["moe/routing_mismatch_same_version"] = sums["route_diff_same"] / sums["route_pairs_same"]
    return out


def staleness_metrics(lags: dict[int, int]) -> dict[str, float]:
    """Distribution of (learner version - token version) over trained tokens, from the tokens per lag."""
    total = sum(lags.values())
    if total == 0:
        return {}
    mean = sum(k * c for k, c in lags.items()) / total
    out = {"staleness/mean": float(mean), "staleness/max": float(max(lags)), "staleness/min": float(min(lags))}
    for k in sorted(lags):
        out[f"staleness/frac_{k}"] = lags[k] / total
    return out


def lag_counts(batch: GroupTensors | None, learner_version: int) -> dict[int, int]:
    """Trained tokens per lag (learner version - the token's version); replayed samples (data.curation's,
    whose age has its own bound) are left out (`replay_sums`)."""
    if batch is None:
        return {}
    mask = batch.completion_mask.bool()
    if batch.replayed is not None:
        mask = mask & (batch.replayed < 0.5).unsqueeze(-1)
    lag = learner_version - batch.versions[mask].long()
    return {int(k): int(c) for k, c in zip(*torch.unique(lag, return_counts=True))}


def replay_sums(batch: GroupTensors | None, learner_version: int) -> dict[str, float]:
    """Replayed samples in the batch and the oldest one's age in versions (none: empty)."""
    if batch is None or batch.replayed is None or not bool((batch.replayed > 0.5).any()):
        return {}
    rows = batch.replayed > 0.5
    versions = torch.where(batch.completion_mask[rows].bool(), batch.versions[rows], learner_version)
    return {"replay_samples": float(rows.sum()), "replay_age_max": float(learner_version - int(versions.min()))}


def moments(values: torch.Tensor | None) -> tuple[float, float, float]:
    """(count, sum, sum of squares), which add over ranks."""
    if values is None:
        return 0.0, 0.0, 0.0
    v = values.double()
    return float(v.numel()), float(v.sum()), float(v.pow(2).sum())


def merge_ranks(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """One step's local results of every rank as one: sums add (each rank's terms are its share of the
    batch's), maxima take the max, groups and lags join; "rank_tokens": each rank's trained tokens."""
    out: dict[str, Any] = {"sums": {}, "agreement": {}, "learned": {}, "lags": {}, "rewards": (0.0, 0.0, 0.0), "rank_tokens": []}
    for local in steps:
        for key in ("sums", "agreement"):
            for k, v in local[key].items():
                out[key][k] = max(out[key].get(k, v), v) if k.endswith("_max") else out[key].get(k, 0.0) + v
        out["learned"].update(local["learned"])
        for lag, c in local["lags"].items():
            out["lags"][lag] = out["lags"].get(lag, 0) + c
        out["rewards"] = tuple(a + b for a, b in zip(out["rewards"], local["rewards"]))
        out["rank_tokens"].append(sum(local["learned"].values()))
    return out


def max_over_mean(values: list[float]) -> float:
    mean = sum(values) / max(len(values), 1)
    return max(values) / mean if mean > 0 else 0.0
