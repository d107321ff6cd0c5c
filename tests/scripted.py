"""Test helpers shared by test modules (tests/ is on the path through its conftest)."""

from __future__ import annotations

import time

import torch

from rlhub.engines.base import Completion


class ScriptedEngine:
    """A fake engine for the seam: each call answers every prompt with the same given tokens
    (call i: turns[i], the last one for the calls after), log-prob -0.5 per token, at a version that
    goes up by one per call. `calls` records (time, prompts, per-prompt token caps, temperature)."""

    def __init__(self, turns: list[list[int]], eos: int) -> None:
        self.turns, self.eos, self.version, self.calls = turns, eos, 0, []

    def generate(self, prompts, sampling, weight_source=None, max_tokens=None, routes=None):
        self.calls.append((time.monotonic(), [list(p) for p in prompts], list(max_tokens or []), sampling.temperature))
        tokens = self.turns[min(len(self.calls) - 1, len(self.turns) - 1)]
        out = []
        for cap in max_tokens or [sampling.max_new_tokens] * len(prompts):
            ids = tokens[:cap]
            out.append(Completion(ids, [-0.5] * len(ids), [self.version] * len(ids), "stop" if ids and ids[-1] == self.eos else "length"))
        self.version += 1
        return out

    def prompt_logprobs(self, ids):
        return torch.zeros(len(ids) - 1)

    def load_weights(self, state, version):
        self.version = version
