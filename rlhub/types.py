"""What travels through the pipeline: samples, groups, and their tensor form.

A rollout actor turns one prompt into a `Group` of `group_size` samples, each
token tagged with the policy version that produced it. The data store keeps a
`GroupMeta` per group and the tensors (`GroupTensors`) as a Ray object ref.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rlhub.datastore import GroupMeta  # noqa: F401  (the store's metadata of a group; re-exported)


@dataclass
class Sample:
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # behaviour log-probs, one per completion token
    versions: list[int]  # policy version per completion token
    reward: float
    success: bool | None
    finish_reason: str
    routed_experts: torch.Tensor | None = None
    """[len(prompt_ids) + len(completion_ids) - 1, moe layers, top_k] expert ids of each position of
    prompt + completion, as the engine routed it (`Completion.routed_experts`); None: not recorded."""
    loss_mask: list[int] | None = None
    """Per completion token: 1 where the policy generated it (it carries the loss), 0 for environment
    and tool tokens between a multi-turn episode's turns (their log-prob 0, version -1). None: all 1."""
    turn_rewards: list[tuple[int, float]] | None = None
    """A multi-turn episode's rewards by turn: (index in completion_ids of the turn's last generated
    token, the reward its step returned). `reward` is their sum plus any shaping; None: one reward."""
    agent: int | None = None
    """A multi-agent episode's agent (its index in the environment's `agents`) whose tokens these are."""
    replayed: bool = False
    """A kept successful trajectory of a hard row mixed into this group (data.curation=difficulty), not
    generated for it: its versions and behaviour log-probs are those it was sampled with."""
    cut_values: list[tuple[int, float]] | None = None
    """SPO's segment cuts: (index in completion_ids of the token a cut comes before, the Monte Carlo
    value of the state there, from rollouts branched at it). None: no cut."""

    @property
    def generated(self) -> int:
        """How many completion tokens the policy generated."""
        return len(self.completion_ids) if self.loss_mask is None else sum(self.loss_mask)


@dataclass
class GroupTensors:
    """One group, padded on the right. Token-level tensors are aligned with the shifted targets."""

    input_ids: torch.Tensor  # [G, T] prompt + completion
    attention_mask: torch.Tensor  # [G, T]
    completion_mask: torch.Tensor  # [G, T-1] 1 where target t+1 is a generated token (not prompt, observation or padding)
    old_logprobs: torch.Tensor  # [G, T-1] behaviour log-probs at generated targets, 0 elsewhere
    versions: torch.Tensor  # [G, T-1] policy version of each generated target, -1 elsewhere
    advantages: torch.Tensor  # [G, T-1] per generated target, 0 elsewhere
    rewards: torch.Tensor  # [G] the environment's (shaped) reward per sample
    values: torch.Tensor | None = None  # [G, T-1] the critic's V(s) before each generated target (PPO)
    returns: torch.Tensor | None = None  # [G, T-1] the critic's regression targets (PPO)
    ref_logprobs: torch.Tensor | None = None  # [G, T-1] the reference policy's log-probs (reference actor)
    routes: torch.Tensor | None = None
    """[G, T-1, moe layers, top_k] small integers: the experts the engine routed position t to (the
    computation that predicts target t+1), -1 where not recorded; for routing replay (rlhub.moe)."""
    group_ids: torch.Tensor | None = None
    """[G] the group each row belongs to: the learner reports what it trained on from these."""
    turn_rewards: torch.Tensor | None = None
    """[G, T-1] where samples have turn rewards: each turn's reward on its last generated target, the
    rest of the sample's reward (shaping, a judge) on its last; the advantage estimators read it on
    the rollout side, which drops it before the group is stored (`rlhub.rollout.groups`)."""

    cut_values: torch.Tensor | None = None
    """[G, T-1] SPO's cut values (`Sample.cut_values`) at the targets the cuts come before, NaN elsewhere;
    read by the advantage estimator on the rollout side, dropped before the group is stored."""

    replayed: torch.Tensor | None = None
    """[G] 1.0 for a replayed sample (`Sample.replayed`), 0.0 for the group's own; None when none is.
    Its tokens' age is bounded by data.replay_max_age, not max_staleness: the staleness metrics leave it out."""

    agents: torch.Tensor | None = None
    """[G] each row's agent (`Sample.agent`) in a multi-agent group, -1 for none; None for one agent."""

    OPTIONAL = ("values", "returns", "ref_logprobs", "routes", "group_ids", "turn_rewards", "cut_values", "replayed", "agents")

    def __getstate__(self) -> dict:
        # numpy arrays pickle (and cross Ray's object store) far faster than small torch tensors
        return {k: v.cpu().numpy() for k, v in vars(self).items() if v is not None}

    def __setstate__(self, state: dict) -> None:
        for k in self.OPTIONAL:
            setattr(self, k, None)
        for k, v in state.items():  # arrays from Ray's object store are read-only
            setattr(self, k, torch.from_numpy(v if v.flags.writeable else v.copy()))

    def rows(self, index: torch.Tensor, width: int) -> "GroupTensors":
        """The rows `index`, cut to their first `width` positions (what lies beyond is right padding)."""
        def take(t: torch.Tensor | None, w: int) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, index)[:, :w] if t.dim() > 1 else t.index_select(0, index)

        return GroupTensors(**{k: take(t, width if k in ("input_ids", "attention_mask") else width - 1) for k, t in vars(self).items()})

    def of_agents(self, agents: set[int] | frozenset[int]) -> "GroupTensors | None":
        """The rows of these agents (indices into the environment's `agents`), whole width; None when the
        group has none. A policy of its own trains on its agent's rows only (agents.policies=separate)."""
        if self.agents is None:
            raise ValueError("of_agents: a group without agent indices (one agent's group) has no agent's rows to select")
        index = torch.tensor([i for i, a in enumerate(self.agents.tolist()) if a in agents], dtype=torch.long)
        if len(index) == 0:
            return None
        return self.rows(index, self.input_ids.shape[1])

    def to(self, device: torch.device | str) -> "GroupTensors":
        return GroupTensors(**{k: None if t is None else t.to(device) for k, t in vars(self).items()})

    @staticmethod
    def from_samples(samples: list[Sample], advantages: torch.Tensor, pad_id: int) -> "GroupTensors":
        """The group's tensors; `advantages` is `[G]` (one per sample, put on its tokens) or `[G, T-1]`."""
        width = max(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
        g = len(samples)
        ids = torch.full((g, width), pad_id, dtype=torch.long)
        attn = torch.zeros((g, width), dtype=torch.long)
        cmask = torch.zeros((g, width - 1), dtype=torch.float32)
        old = torch.zeros((g, width - 1), dtype=torch.float32)
        ver = torch.full((g, width - 1), -1, dtype=torch.long)
        for i, s in enumerate(samples):
            p, c = len(s.prompt_ids), len(s.completion_ids)
            ids[i, : p + c] = torch.tensor(s.prompt_ids + s.completion_ids, dtype=torch.long)
            attn[i, : p + c] = 1
            cmask[i, p - 1 : p - 1 + c] = 1.0 if s.loss_mask is None else torch.tensor(s.loss_mask, dtype=torch.float32)  # target t+1 = generated token
            old[i, p - 1 : p - 1 + c] = torch.tensor(s.logprobs, dtype=torch.float32)
            ver[i, p - 1 : p - 1 + c] = torch.tensor(s.versions, dtype=torch.long)
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        adv = advantages.float().unsqueeze(-1) * cmask if advantages.dim() == 1 else advantages.float() * cmask
        return GroupTensors(ids, attn, cmask, old, ver, adv, rewards, routes=_routes_of(samples, width),
                            turn_rewards=_turn_rewards(samples, cmask), cut_values=_cut_values(samples, cmask),
                            replayed=torch.tensor([float(s.replayed) for s in samples]) if any(s.replayed for s in samples) else None,
                            agents=torch.tensor([-1 if s.agent is None else s.agent for s in samples])
                            if any(s.agent is not None for s in samples) else None)


def micro_batches(lengths: torch.Tensor, max_seqs: int, max_tokens: int) -> list[tuple[torch.Tensor, int]]:
    """(row indices, width) of each micro-batch of a right-padded batch whose rows hold `lengths`
    real tokens: rows sorted longest first, cut so that a micro-batch holds at most `max_seqs` rows
    and at most `max_tokens` tokens counted with its padding (rows x its longest row; 0: no token
    limit; a row longer than that goes alone). Each is cut to its own longest row, so short rows
    are not padded to the batch's longest."""
    order = torch.argsort(lengths, descending=True, stable=True)
    out: list[tuple[torch.Tensor, int]] = []
    lo, n = 0, len(order)
    while lo < n:
        width = int(lengths[order[lo]])  # the longest row of this micro-batch: its first
        rows = min(max_seqs, n - lo)
        if max_tokens:
            rows = max(1, min(rows, max_tokens // max(width, 1)))
        out.append((order[lo : lo + rows], width))
        lo += rows
    return out


def _turn_rewards(samples: list[Sample], cmask: torch.Tensor) -> torch.Tensor | None:
    """[G, T-1] the samples' turn rewards on their turns' last targets (GroupTensors.turn_rewards), or
    None when no sample has them. Each row sums to its sample's reward."""
    if not any(s.turn_rewards for s in samples):
        return None
    placed = torch.zeros_like(cmask)
    for i, s in enumerate(samples):
        p = len(s.prompt_ids)
        generated = cmask[i].nonzero()
        if len(generated) == 0:
            continue
        for pos, reward in s.turn_rewards or ():
            placed[i, p - 1 + pos] += reward
        placed[i, int(generated[-1])] += s.reward - sum(r for _, r in s.turn_rewards or ())  # shaping, or the one reward
    return placed


def _cut_values(samples: list[Sample], cmask: torch.Tensor) -> torch.Tensor | None:
    """[G, T-1] the samples' cut values at their cuts' targets, NaN elsewhere (GroupTensors.cut_values);
    None when no sample has a cut."""
    if not any(s.cut_values for s in samples):
        return None
    placed = torch.full_like(cmask, float("nan"))
    for i, s in enumerate(samples):
        for pos, value in s.cut_values or ():
            placed[i, len(s.prompt_ids) - 1 + pos] = value
    return placed


def _routes_of(samples: list[Sample], width: int) -> torch.Tensor | None:
    """[G, width-1, L, K] the samples' recorded routes, -1 where a sample has none."""
    recorded = [s.routed_experts for s in samples if s.routed_experts is not None]
    if not recorded:
        return None
    first = recorded[0]
    routes = torch.full((len(samples), width - 1, *first.shape[1:]), -1, dtype=first.dtype)
    for i, s in enumerate(samples):
        r = s.routed_experts
        if r is None:
            continue
        if r.shape[0] != len(s.prompt_ids) + len(s.completion_ids) - 1 or r.shape[1:] != first.shape[1:]:
            raise ValueError(f"sample {i}: routes of shape {tuple(r.shape)} for {len(s.prompt_ids)} prompt + {len(s.completion_ids)} completion tokens")
        routes[i, : r.shape[0]] = r
    return routes


def _pad_routes(groups: list[GroupTensors], width: int) -> torch.Tensor | None:
    """The groups' routes stacked and padded with -1 to width-1 positions; groups without routes
    (another engine) are all -1."""
    shapes = [g.routes.shape for g in groups if g.routes is not None]
    if not shapes:
        return None
    (_, _, layers, k), dtype = shapes[0], next(g.routes.dtype for g in groups if g.routes is not None)
    out = torch.full((sum(g.input_ids.shape[0] for g in groups), width - 1, layers, k), -1, dtype=dtype)
    lo = 0
    for g in groups:
        n = g.input_ids.shape[0]
        if g.routes is not None:
            out[lo : lo + n, : g.routes.shape[1]] = g.routes
        lo += n
    return out


def collate(groups: list[GroupTensors], pad_id: int) -> GroupTensors:
    """Stack groups into one batch, right-padding to the widest."""
    width = max(g.input_ids.shape[1] for g in groups)

    def pad(t: torch.Tensor, w: int, value: float) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, w - t.shape[1]), value=value)

    def optional(name: str) -> torch.Tensor | None:
        present = [getattr(g, name) is not None for g in groups]
        if not any(present):
            return None
        if not all(present):
            raise ValueError(f"collate: some groups carry {name} and some do not")
        return torch.cat([pad(getattr(g, name), width - 1, 0.0) for g in groups])

    return GroupTensors(
        input_ids=torch.cat([pad(g.input_ids, width, pad_id) for g in groups]),
        attention_mask=torch.cat([pad(g.attention_mask, width, 0) for g in groups]),
        completion_mask=torch.cat([pad(g.completion_mask, width - 1, 0.0) for g in groups]),
        old_logprobs=torch.cat([pad(g.old_logprobs, width - 1, 0.0) for g in groups]),
        versions=torch.cat([pad(g.versions, width - 1, -1) for g in groups]),
        advantages=torch.cat([pad(g.advantages, width - 1, 0.0) for g in groups]),
        rewards=torch.cat([g.rewards for g in groups]),
        routes=_pad_routes(groups, width),
        group_ids=_group_ids(groups),
        replayed=_replayed(groups),
        agents=None if all(g.agents is None for g in groups) else torch.cat(
            [g.agents if g.agents is not None else torch.full((g.input_ids.shape[0],), -1, dtype=torch.long) for g in groups]),
        **{name: optional(name) for name in GroupTensors.OPTIONAL if name not in ("routes", "group_ids", "replayed", "agents")},
    )


def _group_ids(groups: list[GroupTensors]) -> torch.Tensor | None:
    """[B] the rows' group ids, or None when no group carries them (-1 for a group without)."""
    if all(g.group_ids is None for g in groups):
        return None
    return torch.cat([g.group_ids if g.group_ids is not None else torch.full((g.input_ids.shape[0],), -1, dtype=torch.long)
                      for g in groups])


def _replayed(groups: list[GroupTensors]) -> torch.Tensor | None:
    """[B] 1.0 for the rows that are replayed samples, or None when no group has one."""
    if all(g.replayed is None for g in groups):
        return None
    return torch.cat([g.replayed if g.replayed is not None else torch.zeros(g.input_ids.shape[0]) for g in groups])
