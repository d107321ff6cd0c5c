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


class SteppedEngine:
    """A fake continuous engine for the seam, whose clock is its decode steps: every submitted
    completion is `length` tokens long (the last one EOS) and gains one token a step. `poll` steps
    until something finished or, given `max_seconds`, takes one step only (a slice)."""

    def __init__(self, length: int, token: int, eos: int, version: int = 0) -> None:
        self.length, self.token, self.eos, self.version = length, token, eos, version
        self.running: dict = {}  # id(key) -> (key, tokens so far): keys (episodes) need not be hashable
        self.steps = 0

    def submit(self, key, prompt, sampling, max_tokens, routes=None):
        self.running[id(key)] = (key, [])

    def pending(self) -> int:
        return len(self.running)

    def poll(self, min_seconds: float = 0.0, max_seconds: float | None = None):
        while self.running:
            self.steps += 1
            for _, tokens in self.running.values():
                tokens.append(self.eos if len(tokens) == self.length - 1 else self.token)
            done = [self.running.pop(i) for i in [i for i, (_, t) in self.running.items() if len(t) == self.length]]
            if done or max_seconds is not None:
                return [(k, Completion(t, [-0.5] * self.length, [self.version] * self.length, "stop")) for k, t in done]
        return []

    def prompt_logprobs(self, ids):
        return torch.zeros(len(ids) - 1)

    def load_weights(self, state, version):
        self.version = version


def random_groups(seed: int, size: int = 2, agents: int = 0) -> list:
    """Three groups of `size` random samples (prompts of 4 tokens, completions of 4-8, behaviour log-probs in
    (-3, 0]): the first half of each group lost (reward 0, advantage -1), the second won (1, +1); with
    `agents`, sample j is agent j % agents's. Each group's rows carry its id."""
    from rlhub.types import GroupTensors, Sample

    g = torch.Generator().manual_seed(seed)
    groups = []
    for gid in range(3):
        samples = []
        for j in range(size):
            prompt = torch.randint(0, 250, (4,), generator=g).tolist()
            completion = torch.randint(0, 250, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g).tolist()
            won = j // (size // 2)
            samples.append(Sample(prompt, completion, (-torch.rand(len(completion), generator=g) * 3).tolist(), [0] * len(completion),
                                  float(won), bool(won), "stop", agent=j % agents if agents else None))
        t = GroupTensors.from_samples(samples, torch.tensor([-1.0] * (size // 2) + [1.0] * (size - size // 2)), 256)
        t.group_ids = torch.full((size,), gid)
        groups.append(t)
    return groups
