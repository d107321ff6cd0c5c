"""`rlhub bench store`: groups per second through the data store, and the time it adds per group.

Where it sits: the store stands between the rollout actors (`admit`, then
`put_many` of finished groups) and the learner's side (`get_batch`, the
tensors fetched by object ref as `LearnerActor.train_step` does, then
`set_version`). This benchmark drives the real store client
(`rlhub.actors.store.RayDataStore`) through exactly those calls, with
producer actors that stand in for rollout actors (prebuilt groups shaped like
a default run's instead of generation) and the driver standing in for the
learner, for each shard count asked for.

Two figures per shard count:

- latency: one producer and the driver take turns, nothing overlaps. A store
  cycle is admit + put_many (in the producer actor, one call from the driver)
  + get_batch + fetching the tensors + set_version; a raw cycle is the same
  producer call doing `ray.put` of the same groups in the same chunks and the
  driver's `ray.get` of them. Added ms per group = (store cycle - raw cycle) /
  groups per cycle, medians over interleaved repetitions: the store's own
  round trips and bookkeeping, nothing of the payload's transfer.
- throughput: the producers loop as rollout actors do (admission waits
  included) while the driver takes `steps` batches; groups/s end to end. The
  raw baseline: the same producers `ray.put` the same chunks, the driver asks
  for them up to max_staleness + 1 steps ahead and `ray.get`s them.

`store=memory` runs the latency cycle against the in-process store
(`rlhub.datastore.InMemoryDataStore`, one shard, no Ray, no serialization):
the store's pure bookkeeping cost; the tests use it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from rlhub.datastore import GroupMeta, InMemoryDataStore

GET_BATCH_TIMEOUT_S = 60.0
ADMISSION_WAIT_S = 0.5  # the rollout default (rollout.admission_wait_s)


@dataclass
class StoreBenchOptions:
    shards: tuple[int, ...] = (1, 2, 4)
    """Shard counts to measure (`datastore.num_shards`), comma-separated."""
    producers: int = 2
    """Producer actors (stand-ins for rollout actors) in the throughput run."""
    batch: int = 32
    """Groups per learner step (`prompts_per_step` of the default run)."""
    put: int = 0
    """Groups per admit + put_many; 0: batch / producers, one actor's share, as a rollout actor puts them."""
    samples: int = 8
    """Samples per group (`group_size`)."""
    tokens: int = 16
    """Prompt + completion tokens per sample (a quarter of them completion)."""
    max_staleness: int = 1
    steps: int = 30
    """Learner steps timed in the throughput run (after `warmup` untimed ones)."""
    warmup: int = 3
    reps: int = 30
    """Interleaved store / raw cycles for the latency figure."""
    store: str = "ray"
    """ray: the Ray store actors; memory: the in-process store (latency only, one shard)."""


def parse_options(args: list[str], options: Any) -> Any:
    """`key=value` strings into a copy of the dataclass `options`; values take the type of the default
    (a tuple: comma-separated ints). A bad key or value raises ValueError naming it."""
    known = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    values: dict[str, Any] = {}
    for arg in args:
        key, sep, text = arg.partition("=")
        if not sep:
            raise ValueError(f"argument {arg!r} is not key=value; keys: {', '.join(known)}")
        if key not in known:
            raise ValueError(f"unknown key {key!r}; keys: {', '.join(known)}")
        default = known[key]
        try:
            if isinstance(default, tuple):
                values[key] = tuple(int(x) for x in text.split(","))
            elif isinstance(default, bool):
                values[key] = {"true": True, "false": False}[text.lower()]
            else:
                values[key] = type(default)(text)
        except (ValueError, KeyError):
            raise ValueError(f"{key}={text!r}: expected {type(default).__name__} like {default!r}") from None
    return dataclasses.replace(options, **values)


# ---- the payload ---------------------------------------------------------------------------

def make_group(samples: int, tokens: int, seed: int, layers: int = 2, top_k: int = 2, experts: int = 8) -> Any:
    """A finished group's tensors as a rollout worker builds them (`GroupTensors.from_samples`), with the
    tiny MoE's routing record (2 MoE layers, top-2 of 8 experts)."""
    import torch

    from rlhub.types import GroupTensors, Sample

    g = torch.Generator().manual_seed(seed)
    completion = max(1, tokens // 4)
    prompt = max(1, tokens - completion)
    rows = []
    for i in range(samples):
        ids = torch.randint(3, 259, (prompt + completion,), generator=g).tolist()
        rows.append(Sample(prompt_ids=ids[:prompt], completion_ids=ids[prompt:], logprobs=[-1.0] * completion,
                           versions=[0] * completion, reward=float(i % 2), success=bool(i % 2), finish_reason="stop",
                           routed_experts=torch.randint(0, experts, (prompt + completion - 1, layers, top_k), generator=g, dtype=torch.int8)))
    return GroupTensors.from_samples(rows, torch.randn(samples, generator=g), pad_id=0)


def payload_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in vars(tensors).values() if t is not None)


def group_meta(group_id: int, actor_id: int, batch: int, samples: int, tokens: int) -> GroupMeta:
    """Metadata of a group, tagged with the version of the step it belongs to (so it is never stale)."""
    version = group_id // batch
    completion = max(1, tokens // 4)
    return GroupMeta(group_id=group_id, prompt_index=group_id, actor_id=actor_id, min_version=version, max_version=version,
                     num_samples=samples, num_tokens=samples * completion, reward_mean=0.5, success_mean=0.5,
                     response_len_mean=float(completion), generate_seconds=0.0, finish_reasons=["stop"] * samples)


def _identity(x: Any) -> Any:
    return x


def _chunks(n: int, size: int) -> list[int]:
    return [min(size, n - lo) for lo in range(0, n, size)]


# ---- the two sides -----------------------------------------------------------------------

class Producer:
    """Stands in for a rollout actor: asks admission for prompts and puts the finished groups, as
    `RolloutWorker` does, with prebuilt tensors instead of generation."""

    def __init__(self, actor_id: int, opts: StoreBenchOptions, put_object: Callable[[Any], Any] = _identity) -> None:
        self.actor_id, self.opts, self.put_object = actor_id, opts, put_object
        # distinct objects within one put: pickling the same object k times would send it once
        self.pool = [make_group(opts.samples, opts.tokens, seed=actor_id * 1000 + i) for i in range(opts.put)]
        self.store: Any = None

    def connect(self, store: Any) -> None:
        self.store = store

    def bytes_per_group(self) -> int:
        return payload_bytes(self.pool[0])

    def _put(self, ids: list[int]) -> None:
        o = self.opts
        self.store.put_many([(group_meta(g, self.actor_id, o.batch, o.samples, o.tokens), self.pool[i]) for i, g in enumerate(ids)])

    def cycle(self, n: int) -> dict[str, float]:
        """n groups, `put` at a time: admit, then put_many; seconds spent in each."""
        spent = {"admit": 0.0, "put_many": 0.0}
        for size in _chunks(n, self.opts.put):
            t0 = time.perf_counter()
            ids = self.store.admit(self.actor_id, size)
            t1 = time.perf_counter()
            if len(ids or []) != size:
                raise RuntimeError(f"admission granted {ids} where {size} groups were expected (the cycle keeps it open)")
            self._put(ids)
            spent["admit"] += t1 - t0
            spent["put_many"] += time.perf_counter() - t1
        return spent

    def raw(self, n: int) -> list[Any]:
        """The same groups in the same chunks, only `put_object`-ed: the baseline's producer half."""
        return [self.put_object(self.pool[:size]) for size in _chunks(n, self.opts.put)]

    def loop(self) -> int:
        """The rollout actor's loop until the store stops admission; the number of groups put."""
        done = 0
        while True:
            ids = self.store.admit(self.actor_id, self.opts.put, ADMISSION_WAIT_S)
            if ids is None:
                return done
            if ids:
                self._put(ids)
                done += len(ids)


class LearnerSide:
    """Stands in for the controller and the learner: a batch from the store, its tensors fetched, the
    version bumped (which opens admission for the next step's prompts)."""

    def __init__(self, store: Any, batch: int, fetch: Callable[[list], list]) -> None:
        self.store, self.batch, self.fetch = store, batch, fetch
        self.version = 0
        self.on_wait: Callable[[], None] | None = None  # runs while get_batch waits (raises if a producer failed)

    def step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        groups = self.store.get_batch(self.batch, self.version, GET_BATCH_TIMEOUT_S, on_wait=self.on_wait)
        t1 = time.perf_counter()
        tensors = self.fetch(groups)
        t2 = time.perf_counter()
        if len(tensors) != self.batch:
            raise RuntimeError(f"fetched {len(tensors)} groups' tensors of a batch of {self.batch}")
        self.version += 1
        self.store.set_version(self.version)
        return {"get_batch": t1 - t0, "fetch": t2 - t1, "set_version": time.perf_counter() - t2}


class LocalStore(InMemoryDataStore):
    """The in-process store with the Ray client's `get_batch` signature."""

    def get_batch(self, n: int, learner_version: int, timeout_s: float = 0.0, on_wait: Any = None) -> list[tuple[GroupMeta, Any]]:
        batch = super().get_batch(n, learner_version)
        if batch is None:
            raise TimeoutError(f"no batch of {n} groups: {self.stats()}")
        return batch


def fetch_by_ref(groups: list[tuple[GroupMeta, tuple[Any, int]]]) -> list[Any]:
    """The batch's tensors as the learner actor fetches them: one `ray.get` per object, in the parts
    `Pipeline.submit` builds."""
    from rlhub.actors.learner import resolve_batch

    parts: list[tuple[Any, list[int], list[int]]] = []
    for meta, (ref, index) in groups:
        if not parts or parts[-1][0] != ref:
            parts.append((ref, [], []))
        parts[-1][1].append(index)
        parts[-1][2].append(meta.group_id)
    tensors, lost = resolve_batch(parts)
    if lost:
        raise RuntimeError(f"groups {lost} lost their tensors")
    return tensors


# ---- measurements --------------------------------------------------------------------------

def _median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def latency(store_cycle: Callable[[], dict[str, float]], raw_cycle: Callable[[], None], reps: int, groups: int) -> dict[str, Any]:
    """Median seconds of a store cycle and of a raw cycle, interleaved so both see the same machine."""
    store_s, raw_s, parts = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        parts.append(store_cycle())
        t1 = time.perf_counter()
        raw_cycle()
        raw_s.append(time.perf_counter() - t1)
        store_s.append(t1 - t0)
    store_ms, raw_ms = _median_ms(store_s), _median_ms(raw_s)
    return {
        "store_cycle_ms": store_ms,
        "raw_cycle_ms": raw_ms,
        "store_ms_per_group": store_ms / groups,
        "raw_ms_per_group": raw_ms / groups,
        "added_ms_per_group": (store_ms - raw_ms) / groups,
        "breakdown_ms": {k: _median_ms([p[k] for p in parts]) for k in parts[0]},
    }


def _bench_memory(opts: StoreBenchOptions) -> dict[str, Any]:
    store = LocalStore(opts.batch, opts.max_staleness)
    producer = Producer(0, opts)
    producer.connect(store)
    side = LearnerSide(store, opts.batch, lambda groups: [t for _, t in groups])
    handoff: list[Any] = []

    def store_cycle() -> dict[str, float]:
        return {**producer.cycle(opts.batch), **side.step()}

    def raw_cycle() -> None:  # a list passed along: what handing objects over costs in one process
        handoff.extend(producer.raw(opts.batch))
        handoff.clear()

    for _ in range(opts.warmup):
        store_cycle()
    row = latency(store_cycle, raw_cycle, opts.reps, opts.batch)
    row.update(shards=1, groups_per_s=1e3 * opts.batch / row["store_cycle_ms"], raw_groups_per_s=1e3 * opts.batch / row["raw_cycle_ms"])
    return {"bytes_per_group": producer.bytes_per_group(), "rows": [row]}


def _raw_throughput(producers: list[Any], opts: StoreBenchOptions) -> float:
    """Groups/s of `ray.put` by the producers and `ray.get` by the driver, up to max_staleness + 1 steps ahead."""
    import ray

    chunks = _chunks(opts.batch, opts.put)

    def issue() -> list[Any]:
        return [producers[i % len(producers)].raw.remote(size) for i, size in enumerate(chunks)]

    pending = deque(issue() for _ in range(opts.max_staleness + 1))
    for step in range(opts.warmup + opts.steps):
        if step == opts.warmup:
            start = time.perf_counter()
        refs = [r for part in ray.get(pending.popleft()) for r in part]
        pending.append(issue())
        if sum(len(chunk) for chunk in ray.get(refs)) != opts.batch:
            raise RuntimeError("the raw baseline lost groups")
    elapsed = time.perf_counter() - start
    for calls in pending:  # let the last calls end before the store run
        ray.get(calls)
    return opts.steps * opts.batch / elapsed


def _store_throughput(store: Any, producers: list[Any], side: LearnerSide, opts: StoreBenchOptions) -> float:
    import ray

    loops = [p.loop.remote() for p in producers]

    def check_producers() -> None:  # a loop that ended early failed: raise its error instead of waiting for data
        ray.get(ray.wait(loops, num_returns=len(loops), timeout=0)[0])

    side.on_wait = check_producers
    for _ in range(opts.warmup):
        side.step()
    start = time.perf_counter()
    for _ in range(opts.steps):
        side.step()
    elapsed = time.perf_counter() - start
    store.stop()
    ray.get(loops)
    return opts.steps * opts.batch / elapsed


def _bench_shards(num_shards: int, producers: list[Any], opts: StoreBenchOptions) -> dict[str, Any]:
    import ray

    from rlhub.actors.store import RayDataStore

    store = RayDataStore.create(num_shards, opts.batch, opts.max_staleness)
    ray.get([p.connect.remote(store) for p in producers])
    side = LearnerSide(store, opts.batch, fetch_by_ref)
    first = producers[0]

    def store_cycle() -> dict[str, float]:
        return {**ray.get(first.cycle.remote(opts.batch)), **side.step()}

    def raw_cycle() -> None:
        refs = ray.get(first.raw.remote(opts.batch))
        ray.get(refs)

    for _ in range(opts.warmup):
        store_cycle()
        raw_cycle()
    row = {"shards": num_shards, **latency(store_cycle, raw_cycle, opts.reps, opts.batch)}
    row["raw_groups_per_s"] = _raw_throughput(producers, opts)
    row["groups_per_s"] = _store_throughput(store, producers, side, opts)
    stats = store.stats()
    row["dropped"] = stats["dropped"]  # stale evictions would mean the producers fell behind
    for actor in [store.coordinator, *store.shards]:
        ray.kill(actor)
    return row


def _bench_ray(opts: StoreBenchOptions) -> dict[str, Any]:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=0)(Producer)  # load generators: they take no CPU slot from the store's actors
        producers = [remote.remote(i, opts, ray.put) for i in range(opts.producers)]
        size = ray.get(producers[0].bytes_per_group.remote())
        rows = [_bench_shards(n, producers, opts) for n in opts.shards]
    finally:
        if started:
            ray.shutdown()
    return {"bytes_per_group": size, "rows": rows}


def throughput_note(rows: list[dict[str, Any]], cpus: int) -> str:
    """Whether throughput grows with shards, and why not when it does not, from the rows measured."""
    rates = [(r["shards"], r["groups_per_s"]) for r in rows]
    if len(rates) < 2:
        return "one shard count measured: growth with shards not assessed"
    if all(b > a for (_, a), (_, b) in zip(rates, rates[1:])):
        return "throughput grows with every added shard"
    (first, low), (last, high) = rates[0], rates[-1]
    return (f"throughput does not grow with shards here ({first} shard: {low:,.0f} groups/s, {last}: {high:,.0f}; {cpus} CPUs). "
            "Every shard is one more Ray process on the same cores as the producers and the driver, and each learner "
            "step calls every shard twice (get_batch: peek, then take) while each put calls every shard holding one "
            "of its groups (groups are spread by id): more shards mean more round trips and process wake-ups per step, "
            "while what a shard does per call takes microseconds. Admission (admit, and finish after every put) stays "
            "on the one coordinator actor. Shards can add capacity only where their processes get cores of their own "
            "and many producers put at once.")


LATENCY_INCLUDES = {
    "ray": ("per learner step of `batch` groups, run serially: the producer's admit + put_many (in its actor, one call "
            "from the driver), get_batch, fetching the tensors by ref, set_version; minus the same producer call doing "
            "ray.put of the same groups in the same chunks and the driver's ray.get of them. Divided by the groups per step."),
    "memory": ("per learner step of `batch` groups, in one process: admit + put_many + get_batch + set_version of the "
               "in-memory store, minus handing the same objects over in a list. Divided by the groups per step."),
}


def run(args: list[str]) -> dict[str, Any]:
    opts = parse_options(args, StoreBenchOptions())
    if opts.store not in LATENCY_INCLUDES:
        raise ValueError(f"store={opts.store!r}: expected one of {', '.join(LATENCY_INCLUDES)}")
    if min(opts.shards) < 1 or opts.producers < 1 or opts.batch < 1 or opts.reps < 1 or opts.steps < 1:
        raise ValueError("shards, producers, batch, reps and steps must be >= 1")
    if opts.put <= 0:
        opts = dataclasses.replace(opts, put=math.ceil(opts.batch / opts.producers))
    if opts.store == "memory":
        opts = dataclasses.replace(opts, shards=(1,))  # the in-process store has no shards
    load_before = os.getloadavg()[0]
    result = _bench_memory(opts) if opts.store == "memory" else _bench_ray(opts)
    result.update(
        store=opts.store,
        options=dataclasses.asdict(opts),
        latency_includes=LATENCY_INCLUDES[opts.store],
        added_ms_per_group_max=max(r["added_ms_per_group"] for r in result["rows"]),
        note=throughput_note(result["rows"], os.cpu_count() or 1),
        load_average=[load_before, os.getloadavg()[0]],  # 1-minute load before and after: other work on the machine
    )
    return result
