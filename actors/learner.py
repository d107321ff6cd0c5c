"""LearnerActor: the `Learner` on Ray; fetches a batch's tensors and steps (learn), publishes the weights (sync).

Every submitted step advances the policy version exactly once, whatever
happens to its data: groups whose tensors were lost (their rollout actor died
and took its objects with it) are left out and reported back, so the
controller starts them again; a step left with no group keeps the weights.
The controller queues `publish` right behind each `train_step`, so the new
weights are out, and admission open for the next version, before the next
step starts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import ray

# torch and the learner are imported inside the actor: the controller's process, which only holds
# handles, starts without them


@ray.remote
class LearnerActor:
    def __init__(self, run: Any, model_path: str, probe_ids: list[int], core: int | None) -> None:
        """The slow part (libraries, model, optimizer); the store and the weight sync come in `connect`."""
        import torch

        from rlhub.learner import Learner
        from rlhub.models.logprobs import SamplingPolicy
        from rlhub.moe import replay_enabled

        if core is not None:
            os.sched_setaffinity(0, {core})
        torch.set_num_threads(run.cluster.torch_threads)
        policy = SamplingPolicy(run.rollout.temperature, run.rollout.top_p)
        self.learner = Learner(model_path, run.model, run.algorithm, probe_ids, seed=run.seed, generation_budget=run.rollout.max_new_tokens,
                               policy=policy, moe=run.moe, replay=replay_enabled(run.moe, run.rollout.engine))
        self.model_path = model_path
        self.weight_sync: Any = None
        self.store: Any = None
        self._last_end = 0.0  # when the previous step returned: the gap to the next is idle time
        self.pad_id = self.learner.model.config.pad_token_id or 0

    def connect(self, weight_sync: Any, store: Any) -> None:
        self.weight_sync, self.store = weight_sync, store

    def publish(self, version: int | None = None) -> float:
        """Publish the current weights and probe, then open admission for the version's prompts; returns
        the seconds it took. `version`: the version the caller expects to publish (checked)."""
        if version is not None and version != self.learner.version:
            raise RuntimeError(f"publish: the learner is at version {self.learner.version}, not {version}")
        start = time.perf_counter()
        self.weight_sync.push(self.learner.state_dict(), self.learner.version, self.learner.probe())
        self.store.set_version(self.learner.version)
        return time.perf_counter() - start

    def train_step(self, parts: list[tuple[Any, list[int], list[int]]]) -> dict[str, Any]:
        """One step on a batch given as (object ref, indices in it, group ids) parts; returns metrics,
        "version", "learned" ((group id, tokens) read off the tensors trained on) and "lost_groups"
        (ids whose tensors could not be fetched: not trained)."""
        from rlhub.types import collate

        start = time.perf_counter()
        tensors, lost = resolve_batch(parts)
        fetched = time.perf_counter()
        if tensors:
            metrics = self.learner.train_step(collate(tensors, self.pad_id))
        else:
            metrics = self.learner.skip_step()
        metrics["time/collate_s"] = fetched - start
        metrics["time/learner_idle_s"] = start - self._last_end if self._last_end else 0.0
        metrics["version"] = self.learner.version
        metrics["lost_groups"] = lost
        self._last_end = time.perf_counter()
        return metrics

    def warm_start(self, pairs: list[tuple[str, str]], steps: int, batch_size: int, lr: float, seed: int,
                   cache: bool = True) -> dict[str, float]:
        """The format warm start on (prompt, answer) texts, tokenized here, each answer ended by EOS; with
        `cache`, loaded from the warm-start cache when a run with the same inputs computed it before
        ("warm_start/cached" says which)."""
        from transformers import AutoTokenizer

        from rlhub.models.warm_cache import cached_warm_start

        from rlhub.episodes import ChatFormat

        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        chat = ChatFormat(tokenizer)  # a prompt given as chat messages is rendered as the rollout renders it
        examples = [(chat.prompt(p)[0], chat.encode(a) + [tokenizer.eos_token_id]) for p, a in pairs]
        return cached_warm_start(self.learner, self.model_path, examples, steps, batch_size, lr, seed, cache)

    def save(self, directory: str) -> None:
        self.learner.save(Path(directory))

    def load(self, directory: str, version: int) -> None:
        self.learner.load(Path(directory), version)
        self.store.set_version(version)


def resolve_batch(parts: list[tuple[Any, list[int], list[int]]], timeout_s: float = 60.0) -> tuple[list[Any], list[int]]:
    """(the GroupTensors of each part's indices, ids of the groups whose object cannot be had).

    A rollout actor owns the objects it put; when it dies they may go with it
    (always across nodes; on one node the store may still serve them), and
    fetching them then fails: those groups are reported, not raised."""
    tensors: list[Any] = []
    lost: list[int] = []
    for ref, indices, group_ids in parts:
        try:
            obj = ray.get(ref, timeout=timeout_s)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):  # lost, owner or creator dead, or never ready
            lost += group_ids
            continue
        tensors += [obj[i] for i in indices]
    return tensors, lost
