"""SPO's Monte Carlo values: rollouts branched at each sample's segment cuts (algorithm.advantage=spo).

When a group's episodes have all ended, each sample is cut into segments
(`cuts`: before every `interval`-th low-probability token, every `tokens`
generated tokens, or at each later turn's start), and `spo.branches` new
episodes are started from every cut: the same prompt and tokens up to the
cut, the environment's state as it was before the cut's turn (the episode's
snapshot), and the policy continuing from there. They run as a group of
their own beside the training groups, through the same engine calls, so
they cost what they generate and the generation throughput counts them.
When they have all ended, each cut's value is the mean return of its
branches that were not dropped (a cut whose branches all failed has no
value and is no cut), and the sample's group goes on to its advantages
(`rlhub.algorithms.advantages.spo_advantages`). Branch episodes never reach
the store: only the values do.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

from rlhub.algorithms.config import SpoConfig
from rlhub.episodes import Episode
from rlhub.rollout.records import WorkerStats
from rlhub.rollout.turns import OpenGroup, _own_copy

BRANCH_GROUP = 1 << 40
"""Branch groups live among the worker's open groups under their sample group's id plus this (the
store's group ids never come near it)."""


def cuts(e: Episode, spo: SpoConfig) -> list[int]:
    """Where `e`'s segments begin after the first: indices in `e.ids` of the generated tokens a cut
    comes before. Never the first token (the prompt's value comes from the group's other samples),
    never an environment token, at most `spo.max_cuts` (thinned evenly).

    >>> e = Episode(0, 0, None, [1], None, ids=list(range(8)), loss_mask=[1, 1, 1, 0, 0, 1, 1, 1],
    ...             logprobs=[-0.01, -1.0, -2.0, 0.0, 0.0, -0.01, -3.0, -1.5])
    >>> cuts(e, SpoConfig(segments="cutpoints", interval=2)), cuts(e, SpoConfig(segments="turns"))
    ([1, 6], [5])
    >>> cuts(e, SpoConfig(segments="tokens", tokens=2))
    [2, 6]
    """
    generated = [i for i, m in enumerate(e.loss_mask) if m]
    if spo.segments == "cutpoints":
        low = [i for i in generated if e.logprobs[i] < math.log(spo.rho)]
        chosen = low[:: spo.interval]
    elif spo.segments == "tokens":
        chosen = generated[spo.tokens :: spo.tokens]
    elif spo.segments == "turns":
        chosen = [i for i in generated if i > 0 and not e.loss_mask[i - 1]]
    else:
        raise ValueError(f"algorithm.spo.segments={spo.segments!r}: use cutpoints, tokens or turns")
    chosen = [c for c in chosen if c > 0]
    if spo.max_cuts and len(chosen) > spo.max_cuts:
        chosen = chosen[:: math.ceil(len(chosen) / spo.max_cuts)]
    return chosen


def branch(e: Episode, cut: int, group_id: int) -> Episode | None:
    """A new episode that holds `e` up to `cut` and continues from there; None where `e` kept no
    snapshot of the turn the cut falls in (its state could not be copied)."""
    snaps = [s for s in e.snapshots or () if s.at <= cut]
    if not snaps or not all(e.loss_mask[snaps[-1].at : cut]):  # the snapshot must be of the cut's own turn
        return None
    snap = snaps[-1]
    return Episode(group_id, e.row_index, _own_copy(snap.state), e.prompt_ids, copy.deepcopy(snap.history),
                   ids=e.ids[:cut], loss_mask=e.loss_mask[:cut], logprobs=e.logprobs[:cut], versions=e.versions[:cut],
                   turns=snap.turns, generated=sum(e.loss_mask[:cut]), row=e.row, turn_rewards=list(snap.turn_rewards),
                   partial=cut - snap.at)


@dataclass
class _Cut:
    sample: int
    """The episode's index in its group."""
    at: int
    first: int
    """The cut's branches: episodes first .. first + n of the branch group."""
    inherited: int
    """Generated tokens each branch inherited from the sample."""


class Branches:
    """One rollout worker's branch groups, and the sample groups that wait for them."""

    def __init__(self, spo: SpoConfig, stats: WorkerStats, returns) -> None:
        """`returns(episode)`: an ended episode's return as its sample's reward would be (shaping included)."""
        self.spo, self.stats, self.returns = spo, stats, returns
        self.waiting: dict[int, tuple[OpenGroup, list[_Cut]]] = {}

    @staticmethod
    def is_branch(group: OpenGroup) -> bool:
        return group.group_id >= BRANCH_GROUP

    def start(self, group: OpenGroup) -> OpenGroup | None:
        """The branch group of a complete sample group, which then waits for it; None when none of its
        samples has a cut (the group goes on as it is)."""
        key = BRANCH_GROUP + group.group_id
        episodes: list[Episode] = []
        plan: list[_Cut] = []
        for i, e in enumerate(group.episodes):
            if e.dropped:
                continue
            for at in cuts(e, self.spo):
                first = branch(e, at, key)
                if first is None:
                    self.stats.spo_unbranchable += 1
                    continue
                plan.append(_Cut(i, at, len(episodes), first.generated))
                episodes += [first] + [branch(e, at, key) for _ in range(self.spo.branches - 1)]
        if not episodes:
            return None
        self.waiting[group.group_id] = (group, plan)
        self.stats.spo_cuts += len(plan)
        return OpenGroup(key, group.row_index, episodes, time.perf_counter())

    def finish(self, branches: OpenGroup) -> OpenGroup:
        """The sample group whose branches have all ended, each sample given its cuts' values."""
        group, plan = self.waiting.pop(branches.group_id - BRANCH_GROUP)
        n = self.spo.branches
        for cut in plan:
            ran = branches.episodes[cut.first : cut.first + n]
            self.stats.spo_branch_tokens += sum(b.generated - cut.inherited for b in ran)
            kept = [self.returns(b) for b in ran if not b.dropped]
            self.stats.spo_branches += len(ran)
            self.stats.spo_branches_dropped += len(ran) - len(kept)
            if kept:
                e = group.episodes[cut.sample]
                e.cut_values = (e.cut_values or []) + [(cut.at, sum(kept) / len(kept))]
        group.generate_seconds += branches.generate_seconds
        return group
