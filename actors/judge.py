"""JudgeActor: the model judge (rlhub.judge) as its own Ray actor, batching what all rollout actors send."""

from __future__ import annotations

import asyncio
from typing import Any

import ray


@ray.remote
class JudgeActor:
    def __init__(self, run: Any) -> None:
        import torch

        from rlhub.judge import Judge

        torch.set_num_threads(run.cluster.torch_threads)
        self.judge = Judge(run.reward.judge)
        self.max_batch = run.reward.judge.max_batch
        self.pending: list[tuple[list[str], asyncio.Future]] = []
        self.draining = False
        self.stats = {"requests": 0, "texts": 0, "batches": 0}

    async def score(self, texts: list[str]) -> list[float]:
        """Scores for `texts`, computed together with whatever other actors sent meanwhile."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append((texts, future))
        self.stats["requests"] += 1
        if not self.draining:
            self.draining = True
            asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                await asyncio.sleep(0)  # requests that arrived together join this batch
                batch, size = [], 0
                while self.pending and (not batch or size + len(self.pending[0][0]) <= self.max_batch):
                    batch.append(self.pending.pop(0))
                    size += len(batch[-1][0])
                texts = [t for request, _ in batch for t in request]
                try:
                    scores = await loop.run_in_executor(None, self.judge.score, texts)
                except Exception as e:  # noqa: BLE001 - every waiting request hears of it
                    for _, future in batch:
                        future.set_exception(e)
                    continue
                self.stats["batches"] += 1
                self.stats["texts"] += len(texts)
                lo = 0
                for request, future in batch:
                    future.set_result(scores[lo : lo + len(request)])
                    lo += len(request)
        finally:
            self.draining = False

    def get_stats(self) -> dict[str, int]:
        return dict(self.stats)


class RayJudgeClient:
    """What a rollout worker holds: requests go out at once, results are picked up when ready."""

    def __init__(self, actor: Any, timeout_s: float = 600.0) -> None:
        self.actor = actor
        self.timeout_s = timeout_s

    def submit(self, texts: list[str]) -> Any:
        return self.actor.score.remote(texts)

    def ready(self, handle: Any) -> bool:
        return bool(ray.wait([handle], timeout=0)[0])

    def result(self, handle: Any) -> list[float]:
        return ray.get(handle, timeout=self.timeout_s)  # a hung judge fails these groups (judge_error), not the loop
