"""LearnerActor: the `Learner` on Ray; fetches a batch's tensors and steps (learn), publishes the weights (sync).

Every submitted step advances the policy version exactly once, whatever
happens to its data: groups whose tensors were lost (their rollout actor died
and took its objects with it) are left out and reported back, so the
controller starts them again; a step left with no group keeps the weights.
The controller queues `publish` right behind each `train_step`, so the new
weights are out, and admission open for the next version, before the next
step starts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import ray

# torch and the learner are imported inside the actor: the controller's process, which only holds
# handles, starts without them


@ray.remote
class LearnerActor:
    def __init__(self, run: Any, model_path: str, probe_ids: list[int], core: int | None, rank: int = 0) -> None:
        """One learner rank. A one-rank learner starts its `Learner` here (the slow part: libraries, model,
        optimizer); the ranks of a group start theirs in `start`, once they have joined the group. The
        store and the weight sync come in `connect`."""
        import torch

        if core is not None:
            os.sched_setaffinity(0, {core})
        torch.set_num_threads(run.cluster.torch_threads)
        self.run, self.model_path, self.probe_ids, self.rank = run, model_path, probe_ids, rank
        self.weight_sync: Any = None
        self.store: Any = None
        self.policy: str | None = None
        """Under agents.policies=separate, the policy this learner trains (None: the run's one policy)."""
        self.agents: frozenset[int] | None = None
        """...and the agents (indices into the environment's agents) whose samples it trains on."""
        self._last_end = 0.0  # when the previous step returned: the gap to the next is idle time
        self.learner: Any = None
        if run.learner.world_size == 1:
            self._build(None)

    def _build(self, ranks: Any) -> None:
        from rlhub.learner import Learner
        from rlhub.models.logprobs import SamplingPolicy
        from rlhub.moe import replay_enabled

        run = self.run
        policy = SamplingPolicy(run.rollout.temperature, run.rollout.top_p)
        self.learner = Learner(self.model_path, run.model, run.algorithm, self.probe_ids, seed=run.seed,
                               generation_budget=run.rollout.max_new_tokens, policy=policy, moe=run.moe,
                               replay=replay_enabled(run.moe, run.rollout.engine), ranks=ranks,
                               ep_balance=run.learner.ep_balance, ep_capacity=run.learner.ep_capacity,
                               precision=run.learner.precision, attention=run.learner.attention,
                               share_prefix=run.learner.share_prefix)
        self.pad_id = self.learner.model.config.pad_token_id or 0

    def where(self) -> dict[str, Any]:
        """This rank's node and process, and (rank 0) a free port on its node for the group's rendezvous."""
        from rlhub.parallel.ranks import free_address, listen, node_host

        if self.rank == 0:  # held open until `start`: the group's store serves on it, at this node's address only
            self._listener = listen(node_host())
            host, port = self._listener.getsockname()[:2]
        else:
            host, port = free_address()
        return {"rank": self.rank, "node": host, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "port": port}

    def start(self, host: str, port: int) -> None:
        """Join the learner ranks' group at host:port and build this rank's share of the learner."""
        from rlhub.parallel.ranks import join

        cfg = self.run.learner
        listener, self._listener = getattr(self, "_listener", None), None
        self._build(join(host, port, self.rank, cfg.world_size, cfg.expert_parallel, cfg.collective_timeout_s, listener=listener))

    def connect(self, weight_sync: Any, store: Any, policy: str | None = None, agents: list[int] | None = None) -> None:
        """The weight registry this learner publishes to and the store whose admission it opens; a policy
        of its own (agents.policies=separate) also names itself and the agents it trains on."""
        self.weight_sync, self.store = weight_sync, store
        self.policy, self.agents = policy, None if agents is None else frozenset(agents)

    def publish(self, version: int | None = None) -> float:
        """Publish the current weights and probe, then open admission for the version's prompts; returns
        the seconds it took. `version`: the version the caller expects to publish (checked). Sharded
        ranks gather one tensor at a time (every rank takes part) and rank 0 streams each to the object store."""
        if version is not None and version != self.learner.version:
            raise RuntimeError(f"publish: the learner is at version {self.learner.version}, not {version}")
        start = time.perf_counter()
        probe = self.learner.probe()
        if self.learner.ranks.distributed:
            items = self.learner.full_items()
            if self.rank == 0:
                self.weight_sync.push_stream(items, self.learner.version, probe)
            else:
                for _ in items:  # this rank's part of each gather
                    pass
        else:
            self.weight_sync.push(self.learner.published_state(), self.learner.version, probe)
        if self.rank == 0:
            self.store.set_version(self.learner.version, self.policy)
        return time.perf_counter() - start

    def train_step(self, parts: list[tuple[Any, list[int], list[int]]]) -> dict[str, Any]:
        """One step on a batch given as (object ref, indices in it, group ids) parts (a rank of a group:
        its share); returns metrics, "version", "learned" ((group id, tokens) read off the tensors
        trained on, by every rank) and "lost_groups" (ids whose tensors could not be fetched: not
        trained; every rank's)."""
        from rlhub.types import collate

        start = time.perf_counter()
        tensors, lost = resolve_batch(parts)
        if self.agents is not None:  # a policy of its own: its agent's rows, and groups that hold none are not its
            tensors = [t for t in (g.of_agents(self.agents) for g in tensors) if t is not None]
        fetched = time.perf_counter()
        ranks = self.learner.ranks
        if ranks.distributed:
            lost = [g for rank_lost in ranks.gather(lost) for g in rank_lost]
            anywhere = ranks.sum_always([len(tensors)])[0]
            metrics = self.learner.train_step(collate(tensors, self.pad_id) if tensors else None) if anywhere else self.learner.skip_step()
        elif tensors:
            metrics = self.learner.train_step(collate(tensors, self.pad_id))
        else:
            metrics = self.learner.skip_step()
        metrics["time/collate_s"] = fetched - start
        from rlhub.rollout.records import peak_rss_mb

        metrics["mem/learner_peak_rss_mb"] = peak_rss_mb()  # this rank's process
        metrics["time/learner_idle_s"] = start - self._last_end if self._last_end else 0.0
        metrics["version"] = self.learner.version
        metrics["lost_groups"] = lost
        self._last_end = time.perf_counter()
        return metrics

    def warm_start(self, pairs: list[tuple[str, str]], steps: int, batch_size: int, lr: float, seed: int,
                   cache: bool = True) -> dict[str, float]:
        """The format warm start on (prompt, answer) texts, tokenized here, each answer ended by EOS; with
        `cache`, loaded from the warm-start cache when a run with the same inputs computed it before
        ("warm_start/cached" says which)."""
        from transformers import AutoTokenizer

        from rlhub.models.warm_cache import cached_warm_start

        from rlhub.episodes import ChatFormat

        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        chat = ChatFormat(tokenizer)  # a prompt given as chat messages is rendered as the rollout renders it
        examples = [(chat.prompt(p)[0], chat.encode(a) + [tokenizer.eos_token_id]) for p, a in pairs]
        # sharded ranks compute it: the cache holds whole state dicts, which no rank should hold
        return cached_warm_start(self.learner, self.model_path, examples, steps, batch_size, lr, seed, cache and not self.learner.ranks.distributed)

    def save(self, directory: str) -> None:
        self.learner.save(Path(directory))

    def load(self, directory: str, version: int) -> None:
        self.learner.load(Path(directory), version)
        if self.rank == 0:
            self.store.set_version(version, self.policy)


def resolve_batch(parts: list[tuple[Any, list[int], list[int]]], timeout_s: float = 60.0) -> tuple[list[Any], list[int]]:
    """(the GroupTensors of each part's indices, ids of the groups whose object cannot be had).

    A rollout actor owns the objects it put; when it dies they may go with it
    (always across nodes; on one node the store may still serve them), and
    fetching them then fails: those groups are reported, not raised."""
    tensors: list[Any] = []
    lost: list[int] = []
    for ref, indices, group_ids in parts:
        try:
            obj = ray.get(ref, timeout=timeout_s)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):  # lost, owner or creator dead, or never ready
            lost += group_ids
            continue
        tensors += [obj[i] for i in indices]
    return tensors, lost


class LearnerGroup:
    """The learner ranks of a run, as the controller sees them: `learner.world_size` `LearnerActor`s in a
    placement group (one bundle a rank, packed on one node or spread over nodes: `learner.placement`),
    joined into one `torch.distributed` group at an address rank 0 chose. Each method sends the call
    to every rank and returns their object refs, rank 0's first (its result is the step's: the ranks
    merge their metrics). `check` turns a dead rank into `RankFailed`, naming it and its node."""

    def __init__(self, run: Any, model_path: str, probe_ids: list[int], core: int | None) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = run.learner
        self.world_size = cfg.world_size
        options = {"num_cpus": run.cluster.learner_num_cpus, "num_gpus": run.cluster.learner_num_gpus}
        self.placement = None
        if cfg.world_size > 1:
            bundle = {"CPU": run.cluster.learner_num_cpus, **({"GPU": run.cluster.learner_num_gpus} if run.cluster.learner_num_gpus else {})}
            self.placement = placement_group([dict(bundle) for _ in range(cfg.world_size)], strategy=cfg.placement.upper())
        self.actors = [
            LearnerActor.options(**options, **({} if self.placement is None else {"scheduling_strategy": PlacementGroupSchedulingStrategy(
                self.placement, placement_group_bundle_index=r)})).remote(run, model_path, probe_ids, core if r == 0 else None, r)
            for r in range(cfg.world_size)]
        self.where: list[dict[str, Any]] = []
        self.place_timeout_s = cfg.place_timeout_s
        self.strategy = cfg.placement

    def close(self) -> None:
        """End the ranks and free their placement group (a run in a Ray it did not start leaves nothing held)."""
        for actor in self.actors:
            ray.kill(actor)
        if self.placement is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement)
            self.placement = None

    def start(self) -> None:
        """Wait for the ranks to be placed, then join them (their model loads run meanwhile)."""
        if self.placement is not None and not self.placement.wait(self.place_timeout_s):
            raise RankFailed(f"the cluster cannot place {self.world_size} learner ranks of {self.placement.bundle_specs[0]} each "
                             f"(learner.placement={self.strategy}) within {self.place_timeout_s:.0f} s")
        self.where = ray.get([a.where.remote() for a in self.actors])
        if self.world_size > 1:
            host, port = self.where[0]["node"], self.where[0]["port"]
            try:
                self.get([a.start.remote(host, port) for a in self.actors])
            except ray.exceptions.RayTaskError as e:  # a rank's own error (its rendezvous port taken, ...): its first line
                cause = getattr(e, "cause", None) or e
                raise RankFailed(f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}") from None

    # ---- calls to every rank -----------------------------------------------------------------
    def _all(self, method: str, *args: Any) -> list[Any]:
        return [getattr(a, method).remote(*args) for a in self.actors]

    def connect(self, weight_sync: Any, store: Any, policy: str | None = None, agents: list[int] | None = None) -> list[Any]:
        return self._all("connect", weight_sync, store, policy, agents)

    def metrics(self, learned: list[Any]) -> dict[str, Any]:
        """A step's metrics from its train calls (`train_step`'s refs): rank 0's, which merged the ranks'."""
        return ray.get(learned[0])

    def train_step(self, shares: list[list[tuple[Any, list[int], list[int]]]]) -> list[Any]:
        """`shares[r]`: rank r's parts (see `split_parts`)."""
        return [a.train_step.remote(share) for a, share in zip(self.actors, shares)]

    def publish(self, version: int | None = None) -> list[Any]:
        return self._all("publish", version)

    def warm_start(self, *args: Any) -> list[Any]:
        return self._all("warm_start", *args)

    def save(self, directory: str) -> list[Any]:
        return self._all("save", directory)

    def load(self, directory: str, version: int) -> list[Any]:
        return self._all("load", directory, version)

    def get(self, refs: list[Any]) -> list[Any]:
        """ray.get of calls to the ranks, watching them: a rank that dies raises `RankFailed` at once,
        even while the others wait for it in a collective."""
        return watched_get(refs, self.check)

    def check(self, ready: list[Any]) -> None:
        """Raise `RankFailed` if any of `ready` (refs of calls to the ranks) holds a dead rank's error."""
        error = dead_rank(ready)
        if error is not None:
            raise RankFailed(self._describe(error))

    def owns(self, error: Exception) -> bool:
        """Whether `error` is one of these ranks' deaths."""
        return any(is_actor(actor, error) for actor in self.actors)


    def _describe(self, error: Exception) -> str:
        for r, actor in enumerate(self.actors):
            if is_actor(actor, error):
                node = self.where[r]["node"] if r < len(self.where) else "?"
                pid = self.where[r]["pid"] if r < len(self.where) else "?"
                return f"learner rank {r} of {self.world_size} (node {node}, pid {pid}) died: {str(error).splitlines()[0]}"
        return f"a learner rank of {self.world_size} died: {str(error).splitlines()[0]}"


class PolicyLearners:
    """Separate policies' learners (agents.policies=separate): one `LearnerGroup` per policy, each with
    its own weights, optimizer, version and weight registry, training on its agents' rows of every
    group only. The controller calls it as it calls one `LearnerGroup`: each method calls every
    policy's ranks and returns their refs, policy after policy in `names` order (rank 0's first
    within each); `metrics` merges the policies' step metrics (`merge_policy_metrics`). Checkpoints
    hold each policy under policies/<name>/."""

    def __init__(self, run: Any, model_path: str, probe_ids: list[int], core: int | None, policy_of: dict[str, str],
                 agents: tuple[str, ...]) -> None:
        self.names = list(dict.fromkeys(policy_of.values()))
        self.agents_of = {n: [agents.index(a) for a, p in policy_of.items() if p == n] for n in self.names}
        self.groups = {n: LearnerGroup(run, model_path, probe_ids, core) for n in self.names}
        self.world_size = run.learner.world_size
        self.where: list[dict[str, Any]] = []

    def start(self) -> None:
        for name, group in self.groups.items():
            group.start()
            self.where += [{**w, "policy": name} for w in group.where]

    def close(self) -> None:
        for group in self.groups.values():
            group.close()

    def _each(self, call: Any) -> list[Any]:
        return [ref for name, group in self.groups.items() for ref in call(name, group)]

    def connect(self, weight_syncs: dict[str, Any], store: Any) -> list[Any]:
        return self._each(lambda n, g: g.connect(weight_syncs[n], store, n, self.agents_of[n]))

    def train_step(self, shares: list[list[tuple[Any, list[int], list[int]]]]) -> list[Any]:
        """Every policy steps on the same shares; each learner keeps its agents' rows."""
        return self._each(lambda n, g: g.train_step(shares))

    def by_policy(self, refs: list[Any]) -> dict[str, list[Any]]:
        """Refs of a call to every policy (as the methods return them), by policy."""
        w = self.world_size
        return {n: refs[i * w:(i + 1) * w] for i, n in enumerate(self.names)}

    def metrics(self, learned: list[Any]) -> dict[str, Any]:
        return merge_policy_metrics({n: ray.get(refs[0]) for n, refs in self.by_policy(learned).items()})

    def publish(self, version: int | None = None) -> list[Any]:
        return self._each(lambda n, g: g.publish(version))

    def warm_start(self, *args: Any) -> list[Any]:
        """The same warm start for every policy, one after another: the first computes it, the others
        (with the warm-start cache) load it, so the policies start from the same weights."""
        refs: list[Any] = []
        for group in self.groups.values():
            calls = group.warm_start(*args)
            group.get(calls)
            refs += calls
        return refs

    def save(self, directory: str) -> list[Any]:
        return self._each(lambda n, g: g.save(str(Path(directory) / "policies" / n)))

    def load(self, directory: str, version: int) -> list[Any]:
        return self._each(lambda n, g: g.load(str(Path(directory) / "policies" / n), version))

    def get(self, refs: list[Any]) -> list[Any]:
        return watched_get(refs, self.check)

    def check(self, ready: list[Any]) -> None:
        """`LearnerGroup.check` over every policy's ranks: a dead rank is named with its policy."""
        error = dead_rank(ready)
        if error is None:
            return
        for name, group in self.groups.items():
            if group.owns(error):
                raise RankFailed(f"policy {name}: {group._describe(error)}")
        raise RankFailed(f"a learner rank died: {str(error).splitlines()[0]}")


def is_actor(actor: Any, error: BaseException) -> bool:
    """Whether `error` (a Ray error) is about `actor`."""
    return actor._actor_id.hex() in str(error) or getattr(error, "actor_id", None) == actor._actor_id.hex()


def watched_get(refs: list[Any], check: Any) -> list[Any]:
    """ray.get of `refs`, calling `check` on those done every second (it raises for a dead rank)."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        check(ready)
    return ray.get(refs)


def dead_rank(ready: list[Any]) -> Exception | None:
    """The first of `ready` (refs of finished calls) that holds a dead actor's error, or None; other
    errors are left to be raised where the result is read."""
    for ref in ready:
        try:
            ray.get(ref, timeout=0)
        except ray.exceptions.RayTaskError:  # the rank lives: its call raised (a partner's death among the causes)
            continue
        except ray.exceptions.RayActorError as e:
            return e
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            continue
    return None


def merge_policy_metrics(per_policy: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One step's metrics from each separate policy's: the first policy's as the step's, each policy's
    train/* also as policies/<name>/train/*, the tokens and groups over all of them, and what the
    controller reads per policy: "learned" {policy: (group id, tokens) pairs} and "policies_updated"
    {policy: bool}. The policies step in lockstep: a version that differs is an error."""
    versions = {n: int(m["version"]) for n, m in per_policy.items()}
    if len(set(versions.values())) != 1:
        raise RuntimeError(f"separate policies out of step: versions {versions}")
    first = next(iter(per_policy.values()))
    out = {k: v for k, v in first.items() if k not in ("learned", "lost_groups")}
    for name, m in per_policy.items():
        out.update({f"policies/{name}/{k}": v for k, v in m.items() if k.startswith("train/")})
    out["train/tokens"] = float(sum(m.get("train/tokens", 0.0) for m in per_policy.values()))
    out["train/groups"] = float(len({g for m in per_policy.values() for g, _ in m["learned"]}))
    out["train/policy_updated"] = float(any(m.get("train/policy_updated") for m in per_policy.values()))
    out["train/nonfinite_skipped"] = float(any(m.get("train/nonfinite_skipped") for m in per_policy.values()))
    out["train/nonfinite_in_row"] = float(max(m.get("train/nonfinite_in_row", 0.0) for m in per_policy.values()))
    out["learned"] = {n: m["learned"] for n, m in per_policy.items()}
    out["policies_updated"] = {n: bool(m.get("train/policy_updated")) for n, m in per_policy.items()}
    out["lost_groups"] = sorted({g for m in per_policy.values() for g in m["lost_groups"]})
    return out


class RankFailed(RuntimeError):
    """A learner rank died or could not be placed: the run cannot go on (recovery is the driver's)."""


def split_parts(groups: list[tuple[Any, tuple[Any, int]]], world_size: int) -> list[list[tuple[Any, list[int], list[int]]]]:
    """A step's groups [(meta, (ref, index))] as each rank's (ref, indices, group ids) parts, the groups
    balanced over the ranks by their completion tokens (`rlhub.parallel.split`)."""
    from rlhub.parallel.split import balance

    shares = balance([int(meta.num_tokens) for meta, _ in groups], world_size)
    out = []
    for share in shares:
        parts: list[tuple[Any, list[int], list[int]]] = []
        for i in share:
            meta, (ref, index) = groups[i]
            if not parts or parts[-1][0] != ref:
                parts.append((ref, [], []))
            parts[-1][1].append(index)
            parts[-1][2].append(meta.group_id)
        out.append(parts)
    return out
