"""The weight-sync seam: the learner publishes each version once, engines pull it.

`ObjectStoreWeightSync` puts the state dict in Ray's object store (shared
memory, so every actor on a node reads one copy) and records its ref in a small
registry actor. An NCCL implementation for GPUs fits the same `WeightSync`
protocol: `push` broadcasts, `pull` receives. Every published version carries
the learner's log-probs on a fixed probe sequence, which engines compare with
their own after loading (see `verify`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Protocol

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are made: the registry actor holds refs only, and starts light
    import torch


@dataclass
class Published:
    version: int
    state: dict[str, torch.Tensor]
    probe_logprobs: torch.Tensor  # [len(probe) - 1] learner log-probs on the probe sequence


class WeightSync(Protocol):
    def push(self, state: dict[str, torch.Tensor], version: int, probe_logprobs: torch.Tensor) -> None: ...

    def push_stream(self, items: Iterable[tuple[str, torch.Tensor]], version: int, probe_logprobs: torch.Tensor) -> None:
        """`push` of tensors that arrive one at a time (gathered by sharded learner ranks): each leaves
        the pushing process before the next arrives, so it never holds the whole model."""
        ...

    def pull(self, have_version: int) -> Published | None:
        """The latest weights if newer than `have_version`, else None."""
        ...


class InMemoryWeightSync:
    """Same-process implementation, for tests of the seam and of rollout workers."""

    def __init__(self) -> None:
        self.latest: Published | None = None

    def push(self, state: dict[str, torch.Tensor], version: int, probe_logprobs: torch.Tensor) -> None:
        self.latest = Published(version, {k: v.detach().clone() for k, v in state.items()}, probe_logprobs.clone())

    def push_stream(self, items: Iterable[tuple[str, torch.Tensor]], version: int, probe_logprobs: torch.Tensor) -> None:
        self.push(dict(items), version, probe_logprobs)

    def pull(self, have_version: int) -> Published | None:
        if self.latest is None or self.latest.version <= have_version:
            return None
        return self.latest


# --- Ray object store -----------------------------------------------------------

def state_to_arrays(state: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, str]]:
    """numpy arrays travel through Ray's object store without copies; bf16 travels as int16 bits."""
    import torch

    out = {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        arr = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        out[name] = (arr, dtype)
    return out


def arrays_to_state(arrays: dict[str, tuple[np.ndarray, str]]) -> dict[str, torch.Tensor]:
    import warnings

    import torch

    out = {}
    with warnings.catch_warnings():  # arrays from the object store are read-only; consumers copy them
        warnings.simplefilter("ignore", UserWarning)
        for name, (arr, dtype) in arrays.items():
            t = torch.from_numpy(arr)
            out[name] = t.view(torch.bfloat16) if dtype == "bfloat16" else t
    return out


class WeightRegistry:
    """Holds the latest published version's object ref (hosted in a tiny Ray actor)."""

    def __init__(self) -> None:
        self.version = -1
        self.entry: list[Any] | None = None  # [ref to arrays, probe logprobs]

    def publish(self, version: int, entry: list[Any]) -> None:
        if version > self.version:
            self.version, self.entry = version, entry

    def latest(self, have_version: int) -> tuple[int, list[Any]] | None:
        if self.entry is None or self.version <= have_version:
            return None
        return self.version, self.entry


class ObjectStoreWeightSync:
    """Client of a `WeightRegistry` actor; picklable, so every actor holds one. Every call waits at most
    `timeout_s`: a registry (or weights) that does not come fails the caller, whose loss the
    controller then finds (a rollout actor is replaced; a hung learner step is recovered)."""

    def __init__(self, registry: Any, timeout_s: float = 600.0) -> None:
        self.registry = registry
        self.timeout_s = timeout_s

    def push(self, state: dict[str, torch.Tensor], version: int, probe_logprobs: torch.Tensor) -> None:
        import ray

        ref = ray.put(state_to_arrays(state))  # owned by the learner, which lives as long as the run
        ray.get(self.registry.publish.remote(version, [ref, probe_logprobs.float().cpu().numpy()]), timeout=self.timeout_s)

    def push_stream(self, items: Iterable[tuple[str, torch.Tensor]], version: int, probe_logprobs: torch.Tensor) -> None:
        import ray

        refs = {name: ray.put(state_to_arrays({name: t})[name]) for name, t in items}  # one object per tensor
        ray.get(self.registry.publish.remote(version, [refs, probe_logprobs.float().cpu().numpy()]), timeout=self.timeout_s)

    def pull(self, have_version: int) -> Published | None:
        import ray

        found = ray.get(self.registry.latest.remote(have_version), timeout=self.timeout_s)
        if found is None:
            return None
        import torch

        version, (ref, probe) = found
        if isinstance(ref, dict):  # pushed a tensor at a time
            arrays = dict(zip(ref, ray.get(list(ref.values()), timeout=self.timeout_s)))
        else:
            arrays = ray.get(ref, timeout=self.timeout_s)
        return Published(version, arrays_to_state(arrays), torch.from_numpy(probe.copy()))


# --- verification -------------------------------------------------------------

def probe_sequence(vocab_size: int, length: int = 32, seed: int = 1234) -> list[int]:
    """A fixed token sequence that both sides score after every sync."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab_size, 256), (length,), generator=g).tolist()


def probe_error(engine_logprobs: torch.Tensor, learner_logprobs: torch.Tensor) -> float:
    """Largest absolute difference of the two sides' probe log-probs."""
    if engine_logprobs.shape != learner_logprobs.shape:
        return float("inf")
    return float((engine_logprobs.float() - learner_logprobs.float()).abs().max())
