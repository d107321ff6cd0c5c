"""The rollout-engine seam: token-in/token-out generation with log-probs.

Rollout actors own one engine each. Every engine returns, per generated token,
the id, the sampling log-prob under the weights that produced it, and that
policy version, so the learner can correct for staleness. MoE engines that can
record routing also return the routed expert ids per position, for routing replay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import torch


@dataclass
class SamplingConfig:
    """How completions are sampled; one per generate call."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    """Generation of a sequence ends after it samples one of these ids (kept in the output)."""
    seed: int | None = None
    """Reseeds the engine's own random stream at the start of the call (None: it goes on)."""
    seeds: tuple[int, ...] | None = None
    """Per prompt of the call, the seed (0 <= seed < 2**63) of that prompt's own random stream, in
    place of the engine's: its tokens are then a function of the seed, the prompt and the weights,
    whatever else the call holds and whatever the engine drew before, so a resumed run's fresh engine
    draws what the interrupted one drew (`rlhub.rollout.turns.sampling_seed`). The hf engine draws
    from them; vLLM keeps its own seeded stream."""


@dataclass
class Completion:
    """One generated continuation of one prompt."""

    token_ids: list[int]
    logprobs: list[float]
    """Log-prob of each sampled token under the distribution it was sampled from: the weights that
    sampled it, the temperature and the top-p nucleus (`rlhub.models.logprobs.SamplingPolicy`)."""
    versions: list[int]
    """Policy version of the weights that produced each token."""
    finish_reason: str  # "stop" | "length"
    routed_experts: torch.Tensor | None = None
    """[len(prompt) + len(token_ids) - 1, num_moe_layers, top_k] small-integer expert ids that each
    position of prompt + completion was routed to (the last token is never an input), where the
    engine records routing (`rlhub.moe`)."""


WeightSource = Callable[[], bool]
"""Called between decode steps by engines that update in flight. It loads newer weights into the
engine itself (and verifies them, as between batches) and returns whether it did."""


@runtime_checkable
class RolloutEngine(Protocol):
    """What a rollout actor needs from an inference engine."""

    version: int
    """Policy version of the weights currently loaded."""

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        weight_source: WeightSource | None = None,
        max_tokens: list[int] | None = None,
        routes: list[torch.Tensor | None] | None = None,
    ) -> list[Completion]:
        """One completion per prompt (repeat a prompt for a group). `max_tokens`: a cap per prompt,
        at most `sampling.max_new_tokens` (a multi-turn episode's remaining budget). `routes`: per
        prompt, the experts its first positions were routed to ([n, layers, top_k], earlier turns of
        a multi-turn episode, or None): an engine that can replays them while it computes those
        positions again, so that what it samples next comes from the computation the learner will
        replay, and returns them unchanged in `routed_experts`; an engine that cannot ignores them."""
        ...

    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Replace the policy weights (names as in the learner's Hugging Face state dict)."""
        ...

    def prompt_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """[len(token_ids) - 1] log-prob of each token after the first, given those before it.

        Used for sync verification against the learner on a fixed probe sequence.
        """
        ...

    def rebuild(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Build the engine afresh from these weights (the fallback after a failed verification)."""
        ...

    def close(self) -> None: ...


@dataclass
class EngineStats:
    """Counters an engine keeps for tracking."""

    generated_tokens: int = 0
    generate_seconds: float = 0.0
    weight_loads: int = 0
    inflight_updates: int = 0
    extra: dict[str, float] = field(default_factory=dict)
