"""One learner rank's place in the group, and the reductions a step needs across ranks.

`Ranks.single()` is the one-process learner: every reduction returns its
input, and nothing touches `torch.distributed`. `join` makes a rank of an
N-rank group (gloo on CPU, NCCL on GPU) from an address the group's rank 0
chose (the Ray actors pass it around; no port is fixed in advance).

A step computes the same update at N ranks as at one because every quantity
that a loss divides by, or a balance term counts over, is summed over the
ranks before any micro-batch's loss: token and sequence counts, the
advantage moments of batch normalisation, routed positions and expert
frequencies. `reduce_normalisers=False` turns exactly those reductions off
(the gradient reduction stays): each rank then normalises by its own share,
and the update differs; a test checks that it does.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch


@dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1
    expert_parallel: int = 1
    """Ranks each MoE layer's experts are split over (a divisor of world_size; 1: experts are FSDP-sharded like the rest)."""
    mesh: Any = None
    """The 1-D device mesh over all ranks (FSDP2); None for one rank."""
    ep_group: Any = None
    """The ranks that share one copy of the experts, each holding a slice (None: no expert parallelism)."""
    replica_group: Any = None
    """The ranks holding the same expert slice (world_size / expert_parallel of them)."""
    ep_mesh: Any = None
    """2-D mesh (replica, expert) for the experts' sharded checkpoint tensors."""
    reduce_normalisers: bool = True
    """Sum the step's normalisers over the ranks (only a test turns this off, to see the update differ)."""

    @staticmethod
    def single() -> Ranks:
        return Ranks()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- reductions --------------------------------------------------------------------
    def sum(self, values: Sequence[float]) -> list[float]:
        """The values summed over the ranks (a normaliser: local when reduce_normalisers is off)."""
        if not self.distributed or not self.reduce_normalisers:
            return [float(v) for v in values]
        return self.sum_always(values)

    def sum_always(self, values: Sequence[float]) -> list[float]:
        """Summed over the ranks whatever `reduce_normalisers` says (metrics, agreement of decisions)."""
        if not self.distributed:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor (expert counts) summed over the ranks, as a normaliser."""
        if not self.distributed or not self.reduce_normalisers:
            return t
        import torch.distributed as dist

        out = t.detach().clone().double()
        dist.all_reduce(out)
        return out.to(t.dtype)

    def max_int(self, value: int) -> int:
        if not self.distributed:
            return int(value)
        import torch.distributed as dist

        t = torch.tensor([int(value)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def all_true(self, flag: bool) -> bool:
        if not self.distributed:
            return bool(flag)
        import torch.distributed as dist

        t = torch.tensor([int(bool(flag))], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (small Python values: metrics, group ids)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


class PortInUse(RuntimeError):
    """The rendezvous port rank 0 chose was taken before rank 0 could listen on it."""


def node_host() -> str:
    """This node's address for the group's sockets: Ray's node IP inside Ray (127.0.0.1 in a local run,
    which keeps every server on loopback: `cluster.bind_host`), else 127.0.0.1."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


def listen(host: str, port: int = 0) -> socket.socket:
    """A socket listening at `host` on `port` (0: a free one), for rank 0 to hand to the group's store (`join`): the
    store then listens on that address only (torch's TCPStore, given a port, listens on every interface),
    and no other process can take the port between choosing it and joining."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.bind((host, port))
    s.listen(128)
    return s


def free_address() -> tuple[str, int]:
    """(this node's address, a port free right now); `listen` holds the port instead of only naming it."""
    with listen(node_host()) as s:
        return s.getsockname()[0], s.getsockname()[1]


def use_interface(host: str) -> None:
    """Bind gloo's and NCCL's sockets on the interface that holds `host` (this rank's node address),
    unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME already name one; left alone if no interface holds it."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == host for a in addresses):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", name)
            return


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def join(host: str, port: int, rank: int, world_size: int, expert_parallel: int = 1, timeout_s: float = 120.0,
         listener: socket.socket | None = None) -> Ranks:
    """Join the N-rank group at host:port as `rank`; builds the meshes and the expert groups. A
    collective that waits longer than `timeout_s` on a rank raises instead of hanging. Rank 0 passes
    the `listener` it opened at host:port (`listen`): the group's store serves on it. Every rank's own
    sockets bind the interface of its node's address (`use_interface`)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if world_size % expert_parallel:
        raise ValueError(f"learner.expert_parallel={expert_parallel} must divide learner.world_size={world_size}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())  # under Ray each rank sees its own GPU only, as device 0
    use_interface(host if rank == 0 else node_host())
    timeout = timedelta(seconds=timeout_s)
    try:
        if rank == 0 and listener is None:
            listener = listen(host, port)
        # the store serves on rank 0's listener, which it takes over (closed when the group ends)
        fd = listener.detach() if listener is not None and rank == 0 else None
        store = dist.TCPStore(host, port, world_size, rank == 0, timeout, master_listen_fd=fd)
        dist.init_process_group(backend(), store=store, rank=rank, world_size=world_size, timeout=timeout)
    except (OSError, dist.DistNetworkError) as e:
        if "EADDRINUSE" not in str(e) and getattr(e, "errno", None) != errno.EADDRINUSE:
            raise
        raise PortInUse(f"learner rank 0 cannot listen at {host}:{port} for the ranks' rendezvous: the port is in use "
                        "(EADDRINUSE; another process took it after it was chosen; start the run again)") from None
    ranks = Ranks(rank, world_size, expert_parallel, mesh=init_device_mesh(device, (world_size,)))
    if expert_parallel > 1:
        replicas = world_size // expert_parallel
        ranks.ep_mesh = init_device_mesh(device, (replicas, expert_parallel), mesh_dim_names=("replica", "expert"))
        ranks.ep_group = ranks.ep_mesh.get_group("expert")
        ranks.replica_group = ranks.ep_mesh.get_group("replica") if replicas > 1 else None
    return ranks


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
