"""Learner ranks as plain local processes, without Ray: for tests and the learner benchmark.

`run_ranks(fn, world_size, *args)` starts `world_size` processes (spawned,
one torch thread each), joins them into one gloo group and returns what
`fn(ranks, *args)` returned on each rank, in rank order. `fn` must be
importable by name (a module-level function). A rank that raises fails the
call with its traceback; one that hangs fails it after `timeout_s`.
"""

from __future__ import annotations

import pickle
import queue
import traceback
from typing import Any, Callable


def _main(fn: Callable, rank: int, world_size: int, expert_parallel: int, port: int, args: tuple, out: Any, threads: int) -> None:
    import torch

    from rlhub.parallel.ranks import join, leave

    torch.set_num_threads(threads)
    try:
        ranks = join("127.0.0.1", port, rank, world_size, expert_parallel, timeout_s=300.0)  # rank 0 listens on loopback only
        result = fn(ranks, *args)
        out.put((rank, True, pickle.dumps(result)))  # bytes: tensors through the queue would need this process alive
        leave()
    except BaseException:  # noqa: BLE001 (reported to the parent, which raises)
        out.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable, world_size: int, *args: Any, expert_parallel: int = 1, timeout_s: float = 600.0, threads: int = 1) -> list[Any]:
    import torch.multiprocessing as mp

    from rlhub.parallel.ranks import free_address

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    _, port = free_address()
    procs = [ctx.Process(target=_main, args=(fn, r, world_size, expert_parallel, port, args, out, threads), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        while len(results) < world_size:
            try:
                rank, ok, value = out.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"run_ranks: {world_size - len(results)} rank(s) gave no result in {timeout_s:.0f} s") from None
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)  # from a rank this call spawned, through its own pipe: no file, no other party
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
