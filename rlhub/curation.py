"""Which rows the run trains on, and how hard: uniform passes, or sampling that follows difficulty (`data.curation`).

`uniform` (the default) walks the training split in a fresh shuffle per epoch
(`rlhub.datastore.prompt_index`). `difficulty` (DART's adaptive curation) keeps
each row's solve rate over its last `window` groups, as the rollout actors
report them, and picks rows at random with weights that follow it:

- a row never tried weighs `unseen_weight`; one always or never solved weighs
  `min_weight`; one in between weighs more the nearer its rate is to one half
  (min_weight + (1 - min_weight) * 4 p (1 - p)): the frontier, where a group's
  samples disagree and GRPO has a signal, is sampled most;
- a frontier row's group gets `frontier_group_size` samples (0: group_size);
- a hard row's (rate below `hard_below`) successful trajectory is kept in a
  replay buffer (`replay_per_row` per row, the newest) and mixed into a later
  group of that row whose samples all fail, so a rarely solved row still
  teaches. The trajectory travels with its behaviour log-probs and policy
  versions: the off-policy correction (`algorithm.correction`, required to be
  one that weights by pi_prox / pi_behav) corrects its importance weight, and
  one older than `replay_max_age` versions is evicted, as staleness bounds the
  rest of the batch. Replayed samples are counted apart from the staleness
  distribution (`replay/*` metrics), since their age has its own bound.

The sampler lives in the data store's coordinator (plain values, no torch),
and its state (rates, the random generator, the buffer) is in every
checkpoint with the store's.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Any

CURATIONS = ("uniform", "difficulty")


@dataclass
class DataConfig:
    """What the run trains on, row by row (`data.*`)."""

    curation: str = "uniform"
    """uniform: every row once per epoch, shuffled; difficulty: rows sampled by their solve rate (module docstring)."""
    window: int = 4
    """The last N groups of a row make its solve rate."""
    min_weight: float = 0.1
    """The sampling weight of a row always or never solved, against 1 at the frontier (a rate of one half)."""
    unseen_weight: float = 1.0
    """The sampling weight of a row not tried yet."""
    frontier_group_size: int = 0
    """Samples in a frontier row's group (0: group_size)."""
    replay: bool = True
    """Keep hard rows' successful trajectories and mix them into later all-failed groups of the row."""
    hard_below: float = 0.25
    """A row whose solve rate is below this is hard (its successes are kept)."""
    replay_per_row: int = 2
    replay_max_age: int = 8
    """A kept trajectory older than this many policy versions is evicted."""

    def check(self) -> None:
        if self.curation not in CURATIONS:
            raise ValueError(f"data.curation={self.curation!r}: use one of {list(CURATIONS)}")
        if self.window < 1 or self.replay_per_row < 1 or self.replay_max_age < 0 or self.frontier_group_size < 0:
            raise ValueError("data.window and data.replay_per_row must be >= 1, data.replay_max_age and data.frontier_group_size >= 0")
        if not (0 < self.min_weight <= 1 and self.unseen_weight > 0 and 0 < self.hard_below <= 1):
            raise ValueError("data.min_weight must be in (0, 1], data.unseen_weight > 0, data.hard_below in (0, 1]")


def weight(rate: float | None, cfg: DataConfig) -> float:
    """A row's sampling weight from its solve rate (None: never tried).

    >>> cfg = DataConfig(min_weight=0.1)
    >>> weight(None, cfg), weight(0.0, cfg), weight(1.0, cfg), weight(0.5, cfg), round(weight(0.25, cfg), 3)
    (1.0, 0.1, 0.1, 1.0, 0.775)
    """
    if rate is None:
        return cfg.unseen_weight
    return cfg.min_weight + (1.0 - cfg.min_weight) * 4.0 * rate * (1.0 - rate)


@dataclass
class Outcome:
    """What one finished group of a row says about it (plain values: it crosses to the store)."""

    row: int
    successes: int
    samples: int
    success: dict[str, Any] | None = None
    """One successful sample of a hard row, to be kept for replay (`ReplayBuffer`), or None."""


class DifficultySampler:
    """Per-row solve rates, row sampling by them, and the hard rows' replay buffer."""

    def __init__(self, cfg: DataConfig, num_rows: int, seed: int = 0) -> None:
        self.cfg, self.num_rows = cfg, num_rows
        self.rng = random.Random(seed * 1_000_003 + 17)
        self.history: dict[int, deque[tuple[int, int]]] = {}  # row -> (successes, samples) of its last groups
        self.buffer: dict[int, list[dict[str, Any]]] = {}  # row -> kept successful samples, newest last
        self.replayed = 0

    # ---- rates and sampling -----------------------------------------------------------------
    def rate(self, row: int) -> float | None:
        groups = self.history.get(row)
        if not groups:
            return None
        samples = sum(n for _, n in groups)
        return sum(s for s, _ in groups) / samples if samples else None

    def weights(self) -> list[float]:
        return [weight(self.rate(r), self.cfg) for r in range(self.num_rows)]

    def pick(self, n: int) -> list[int]:
        """`n` rows drawn with replacement by their weights."""
        if n <= 0:
            return []
        return self.rng.choices(range(self.num_rows), weights=self.weights(), k=n)

    def is_frontier(self, row: int) -> bool:
        rate = self.rate(row)
        return rate is not None and 0.0 < rate < 1.0

    def is_hard(self, row: int) -> bool:
        rate = self.rate(row)
        return rate is not None and rate < self.cfg.hard_below

    def observe(self, outcome: Outcome, version: int) -> None:
        """A finished group of `outcome.row`: its rate moves, and a hard row's success is kept."""
        groups = self.history.setdefault(outcome.row, deque(maxlen=self.cfg.window))
        groups.append((outcome.successes, outcome.samples))
        if outcome.success is not None and self.cfg.replay:
            kept = self.buffer.setdefault(outcome.row, [])
            kept.append({**outcome.success, "kept_at": version})
            del kept[: -self.cfg.replay_per_row]

    # ---- what a group of a row gets ---------------------------------------------------------
    def plan(self, row: int, group_size: int, learner_version: int) -> dict[str, Any]:
        """How a new group of `row` runs: its samples, whether its success is to be kept (a hard row),
        and a kept trajectory to mix in if all its samples fail (the newest one young enough)."""
        frontier = self.is_frontier(row)
        size = self.cfg.frontier_group_size if frontier and self.cfg.frontier_group_size else group_size
        replay = None
        if self.cfg.replay and row in self.buffer:
            young = [s for s in self.buffer[row] if learner_version - min(v for v in s["versions"] if v >= 0) <= self.cfg.replay_max_age]
            self.buffer[row] = young
            if not young:
                del self.buffer[row]
            else:
                replay = young[-1]
        return {"row": row, "group_size": size, "frontier": frontier, "keep_success": self.cfg.replay and self.is_hard(row),
                "replay": replay}

    # ---- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"rng": _jsonable(self.rng.getstate()), "history": {str(r): list(map(list, g)) for r, g in self.history.items()},
                "buffer": {str(r): s for r, s in self.buffer.items()}, "replayed": self.replayed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(_tuples(state["rng"]))
        self.history = {int(r): deque((tuple(x) for x in g), maxlen=self.cfg.window) for r, g in state["history"].items()}
        self.buffer = {int(r): list(s) for r, s in state["buffer"].items()}
        self.replayed = int(state.get("replayed", 0))

    def stats(self) -> dict[str, float]:
        rates = [r for r in (self.rate(row) for row in self.history) if r is not None]
        return {"curation/rows_seen": float(len(rates)),
                "curation/frontier_rows": float(sum(1 for r in rates if 0.0 < r < 1.0)),
                "curation/solved_rows": float(sum(1 for r in rates if r == 1.0)),
                "curation/unsolved_rows": float(sum(1 for r in rates if r == 0.0)),
                "curation/replay_buffer": float(sum(len(s) for s in self.buffer.values()))}


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x
