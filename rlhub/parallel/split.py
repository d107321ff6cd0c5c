"""A step's groups split over the learner ranks, balanced by tokens.

Each group goes whole to one rank (its samples' advantages were computed
together, and the ledger counts groups), largest first onto the rank with
the fewest tokens so far (LPT), so the slowest rank carries at most about one
group more than the mean. The split is computed once, by the caller, so
every rank's share is fixed before any rank starts.
"""

from __future__ import annotations


def balance(tokens: list[int], ranks: int) -> list[list[int]]:
    """The indices of `tokens` split into `ranks` lists, each in its original order.

    >>> balance([5, 1, 1, 1, 4], 2)
    [[0, 2], [1, 3, 4]]
    >>> balance([3], 2)
    [[0], []]
    """
    if ranks < 1:
        raise ValueError(f"balance: ranks={ranks} must be >= 1")
    load = [0] * ranks
    shares: list[list[int]] = [[] for _ in range(ranks)]
    for i in sorted(range(len(tokens)), key=lambda i: (-tokens[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += tokens[i]
    return [sorted(s) for s in shares]
