"""Verified weight loading: a rollout worker's engine takes each published version, then proves it.

After every load the engine's log-probs on the fixed probe sequence are
compared with the learner's (published with the weights). Past
`rollout.probe_tolerance` the engine is rebuilt from the same weights; if the
probe still disagrees the worker stops (`SyncError`) rather than sample with
weights nobody can vouch for. Loads happen between generation batches, and
between decode steps where the engine takes weights in flight.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rlhub.engines.base import RolloutEngine, WeightSource
from rlhub.rollout.records import WorkerStats
from rlhub.weight_sync import Published, WeightSync, probe_error

log = logging.getLogger("rlhub.rollout")


class SyncError(RuntimeError):
    """An engine's weights still differ from the learner's after a rebuild: it must not sample."""


class VerifiedWeights:
    """One engine's weights, kept at the newest published version and verified at every load."""

    def __init__(self, actor_id: int, engine: RolloutEngine, weight_sync: WeightSync, probe_ids: list[int],
                 tolerance: float | None, stats: WorkerStats) -> None:
        self.actor_id, self.engine, self.weight_sync = actor_id, engine, weight_sync
        # None: a config that was not resolved (rlhub.config.validate does it): the fp32 tolerance
        self.probe_ids, self.tolerance, self.stats = probe_ids, 1e-4 if tolerance is None else tolerance, stats
        self.held = False
        """While True (an evaluation runs with one version throughout), nothing new is loaded."""
        self.loads = 0
        """Versions this engine loaded (the worker's counters add up every engine's)."""
        self._base: dict[str, Any] | None = None
        """Under LoRA: the engine's base weights (its model directory's), which each version's adapters are merged into."""

    def sync(self) -> None:
        """Load the newest published version, if there is a newer one than the engine's."""
        if self.held:
            return
        # until its first load an engine holds the weights it was built from, whatever its version
        # says: the first published version (0: the policy after the warm start) is always loaded
        published = self.weight_sync.pull(self.engine.version if self.loads else -1)
        if published is not None:
            self.load(published)

    def load(self, published: Published) -> None:
        """Load `published` and verify it; rebuild the engine once if the probe disagrees. A version of
        LoRA adapters (`rlhub.lora`) goes to an engine that applies adapters itself (vLLM's LoRA,
        `serves_adapters`) as it is, else it is merged into the base weights first (kept from the first
        such load). An adapter version the engine cannot apply rebuilds it with the merged weights, and
        it loads whole weights from then on."""
        from rlhub import lora

        start = time.perf_counter()
        self.stats.last_sync_bytes = lora.nbytes(published.state)
        state: dict[str, Any] | None = None
        if lora.is_adapter_state(published.state) and getattr(self.engine, "serves_adapters", False):
            err = self._load_adapters(published)
        else:
            state = self._full_state(published.state)
            self.engine.load_weights(state, published.version)
            err = self._probe_error(published)
        if not err <= self.tolerance:  # also catches NaN
            log.warning("actor %d: probe error %.3g after loading version %d exceeds %.3g; rebuilding the engine",
                        self.actor_id, err, published.version, self.tolerance)
            self.stats.sync_rebuilds += 1
            self.engine.rebuild(state if state is not None else self._full_state(published.state), published.version)
            err = self._probe_error(published)
            if not err <= self.tolerance:
                self.stats.sync_failures += 1
                raise SyncError(f"actor {self.actor_id}: probe error {err:.3g} persists after a rebuild at version "
                                f"{published.version} (tolerance {self.tolerance:.3g}); not sampling with unverified weights")
        elapsed = time.perf_counter() - start
        self.loads += 1
        self.stats.syncs += 1
        self.stats.sync_seconds += elapsed
        self.stats.last_sync_seconds = elapsed
        self.stats.last_probe_error = err

    def _load_adapters(self, published: Published) -> float:
        """Hand an adapter version to the engine (its probe error); one it cannot apply rebuilds the
        engine with the merged weights instead (a probe error of 0 is not assumed: it is measured)."""
        from rlhub.engines.vllm_lora import NotServable

        try:
            self.engine.load_adapters(published.state, published.version)
        except NotServable as e:
            log.warning("actor %d: the engine cannot apply version %d's adapters itself (%s); rebuilding it with them "
                        "merged, and merging from now on", self.actor_id, published.version, e)
            self.engine.rebuild(self._full_state(published.state), published.version)
        return self._probe_error(published)

    def _full_state(self, published: dict[str, Any]) -> dict[str, Any]:
        """The engine's whole state for a published one: itself, or the base weights with the adapters merged in."""
        from rlhub import lora

        if not lora.is_adapter_state(published):
            return published
        if self._base is None:
            self._base = base_weights(self.engine)
        state = dict(self._base)
        state.update(lora.merged(self._base, published))
        return state

    def _probe_error(self, published: Published) -> float:
        return probe_error(self.engine.prompt_logprobs(self.probe_ids), published.probe_logprobs)

    def inflight_source(self, enabled: bool) -> WeightSource | None:
        """For an engine between decode steps: loads newer weights, verified like any other load
        (None when in-flight updates are off or the weights are held)."""

        def poll() -> bool:
            published = self.weight_sync.pull(self.engine.version)
            if published is None:
                return False
            self.load(published)
            return True

        return poll if enabled and not self.held else None


def base_weights(engine: RolloutEngine) -> dict[str, Any]:
    """The weights of the model directory `engine` was built from, by state-dict name, in its dtype."""
    import torch

    from rlhub import lora

    dtype = engine.dtype if isinstance(engine.dtype, torch.dtype) else getattr(torch, engine.dtype)
    return lora.base_state(engine.model_path, dtype)
