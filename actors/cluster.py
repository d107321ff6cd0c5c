"""Where Ray runs: a local Ray started by the run, or a cluster it joins; and which cores each actor gets.

Everything here answers fast or fails naming the cause: an address where
nothing listens, a cluster too small for the actors, the Ray processes a
killed run left behind (cleaned up before a new local Ray starts). A local Ray
listens on loopback only unless `cluster.bind_host` says otherwise (`listening_on`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from rlhub.config import LOOPBACK, WORKER_ENV, ConfigError, RunConfig

log = logging.getLogger("rlhub")


def init_ray(cfg: RunConfig, plan: CorePlan, policies: int = 1) -> bool:
    """Start a local Ray or join the configured cluster; True if this process started it. `policies`:
    how many learners the run has (agents.policies=separate: one per agent, each with the learner's
    resources, cluster.learner_num_cpus/gpus a rank)."""
    import ray

    if ray.is_initialized():
        return False
    # Ray announces on every start that it enabled its token authentication (kept on): nothing to act on
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    if cfg.cluster.address:
        try:
            ray.init(address=cfg.cluster.address, runtime_env={"env_vars": WORKER_ENV}, log_to_driver=True, configure_logging=False)
        except ConnectionError as e:
            raise ConfigError(f"cluster.address={cfg.cluster.address!r}: {str(e).splitlines()[0]}") from None
        try:
            check_placement(cfg, policies)
        except ConfigError:
            ray.shutdown()
            raise
        return True
    check_local_gpus(cfg, policies)
    wanted = cfg.rollout.num_actors * cfg.cluster.rollout_num_cpus + cfg.cluster.learner_num_cpus * cfg.learner.world_size * policies
    num_cpus = cfg.cluster.num_cpus or max(os.cpu_count() or 1, int(wanted + 0.999))
    if wanted > (os.cpu_count() or 1):  # placed all the same, sharing cores: said now, not after a silent wait
        log.warning("%d rollout actors and %d learner(s) want %g CPUs on a %d-core machine: they share cores, and each "
                    "actor's start-up takes longer (rollout.num_actors, agents.policies)", cfg.rollout.num_actors, policies, wanted,
                    os.cpu_count() or 1)
    reaped = reap_dead_local_rays()
    if reaped:
        log.warning("stopped %d Ray processes left behind by a run that was killed", reaped)
    # a local Ray's workers inherit this process's environment: no runtime env to set up per worker, so
    # actors start in the workers Ray starts ahead
    os.environ.update(WORKER_ENV)
    # address="local": a Ray of its own; without it ray.init joins any Ray it finds running on the machine
    with listening_on(cfg.cluster.bind_host):
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, configure_logging=False)
    _record_file().write_text(json.dumps({"pid": os.getpid(), "pgid": os.getpgid(0)}))
    return True


@contextmanager
def listening_on(bind_host: str) -> Iterator[None]:
    """Around `ray.init`: where the local Ray it starts, and the servers of its workers, listen
    (`cluster.bind_host`).

    On Linux Ray advertises the node's network IP, and its servers (GCS, raylet, object manager, each
    worker's gRPC server, the agents) listen on every interface, whatever `ray.init` is told (it maps
    127.0.0.1 back to the network IP). Its switch for clusters, off by default on macOS and Windows,
    makes the node's IP 127.0.0.1 and every one of those servers listen on loopback only: a local run
    needs no other node. Ray reads the switch when imported: it goes into the environment, which the
    processes Ray starts inherit, and into this process's already imported copy, both put back once
    Ray has started (this Ray keeps its node IP; a later `ray.init` in this process is not affected).
    Torch's store and gloo's sockets follow the node IP (`rlhub.parallel.ranks`); vLLM's is pinned."""
    from ray._private import ray_constants

    if bind_host not in LOOPBACK:
        yield
        return
    settings = {ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0", "VLLM_HOST_IP": os.environ.get("VLLM_HOST_IP", "127.0.0.1")}
    kept_env, kept_flag = {k: os.environ.get(k) for k in settings}, ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(settings)  # VLLM_HOST_IP: the address of the actors' vLLM engines
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        for key, value in kept_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        ray_constants.ENABLE_RAY_CLUSTER = kept_flag


def confine_ray(plan: CorePlan) -> int:
    """Once the actors have started: this process, Ray's own processes and the unpinned actors (store,
    registry) leave the learner's core (while starting, every process may use every core); returns how many were moved.
    Workers Ray starts later inherit the raylet's cores."""
    import psutil

    if not plan.system:
        return 0
    everywhere = os.sched_getaffinity(0)
    moved = 0
    os.sched_setaffinity(0, plan.system)  # this controller too: it waits most of the time, the learner never should
    for proc in psutil.Process().children(recursive=True):
        try:
            if set(proc.cpu_affinity()) == everywhere:  # pinned actors (learner, engines) chose their cores
                proc.cpu_affinity(sorted(plan.system))
                moved += 1
        except psutil.Error:
            pass
    return moved


def _record_file(pid: int | None = None) -> Path:
    """Where a driver that started a local Ray says so, until it shuts it down."""
    root = Path(tempfile.gettempdir()) / f"rlhub-{os.getuid()}"
    root.mkdir(exist_ok=True)
    return root / f"local-ray-{pid or os.getpid()}.json"


def forget_local_ray() -> None:
    """After ray.shutdown(): nothing of this driver's Ray is left to clean up."""
    _record_file().unlink(missing_ok=True)


def reap_dead_local_rays() -> int:
    """Kill the Ray processes of local Rays whose driver died without shutting them down (kill -9);
    returns how many. Only orphaned Ray processes of the dead driver's process group are touched."""
    import psutil

    killed = 0
    for record in _record_file(1).parent.glob("local-ray-*.json"):
        try:
            dead = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            record.unlink(missing_ok=True)
            continue
        if psutil.pid_exists(dead["pid"]):
            continue  # a run still going (or its pid taken by another process: leave everything alone)
        for proc in psutil.process_iter(["ppid", "cmdline"]):
            try:
                cmd = " ".join(proc.info["cmdline"] or [])
                if proc.info["ppid"] == 1 and os.getpgid(proc.pid) == dead["pgid"] and ("ray::" in cmd or "/ray/" in cmd):
                    proc.kill()
                    killed += 1
            except (psutil.Error, ProcessLookupError):
                pass
        record.unlink(missing_ok=True)
    return killed


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once, naming the address, when nothing listens there (Ray itself would retry for minutes)."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"cluster.address={address!r}: expected auto, host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"cluster.address={address!r}: nothing answers at {host}:{port} ({e})") from None


def needed(cfg: RunConfig, policies: int = 1) -> dict[str, float]:
    """The CPUs and GPUs the run's actors ask Ray for: `policies` learners of `learner.world_size` ranks,
    the rollout actors, the scorers (critic, reference) and a model judge."""
    from rlhub.algorithms import advantage_needs

    scorers = int(advantage_needs(cfg.algorithm.advantage).critic) + int(cfg.algorithm.reference == "actor" and cfg.algorithm.kl_coef > 0)
    ranks = cfg.learner.world_size * policies
    judge = cfg.reward.judge.num_gpus if cfg.reward.judge.model else 0.0
    return {"CPU": cfg.cluster.learner_num_cpus * ranks + cfg.rollout.num_actors * cfg.cluster.rollout_num_cpus,
            "GPU": cfg.cluster.learner_num_gpus * ranks + cfg.rollout.num_actors * cfg.cluster.rollout_num_gpus
            + scorers * cfg.cluster.scorer_num_gpus + judge}


def local_gpus() -> int:
    """GPUs this machine has (what a local Ray would offer)."""
    import torch

    return torch.cuda.device_count()


def check_local_gpus(cfg: RunConfig, policies: int = 1) -> None:
    """Before a local Ray starts: GPUs asked for (cluster.*_num_gpus, reward.judge.num_gpus) that this
    machine does not have would leave those actors waiting for ever to be placed."""
    want = needed(cfg, policies)["GPU"]
    have = local_gpus() if want else 0
    if want > have + 1e-9:
        asked = [f"cluster.{k}={getattr(cfg.cluster, k):g}" for k in ("learner_num_gpus", "rollout_num_gpus", "scorer_num_gpus")
                 if getattr(cfg.cluster, k)]
        asked += [f"reward.judge.num_gpus={cfg.reward.judge.num_gpus:g}"] if cfg.reward.judge.model and cfg.reward.judge.num_gpus else []
        raise ConfigError(f"{', '.join(asked)}: the run's actors need {want:g} GPU(s) and this machine has {have} "
                          "(set them to 0 to run on CPUs, or cluster.address to join a cluster with GPUs)")


def check_placement(cfg: RunConfig, policies: int = 1) -> None:
    """Say at start, not after minutes of silence, when the cluster cannot place the actors (`policies`
    learners of `learner.world_size` ranks each)."""
    import ray

    have = ray.cluster_resources()
    need = needed(cfg, policies)
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if short:
        what = ", ".join(f"{v:g} {k} needed, {h:g} in the cluster" for k, (v, h) in short.items())
        raise ConfigError(f"the cluster cannot place the learner and {cfg.rollout.num_actors} rollout actors: {what} "
                          f"(rollout.num_actors, cluster.rollout_num_cpus, cluster.learner_num_cpus)")


@dataclass
class CorePlan:
    """Which cores the learner, each rollout engine and Ray's own processes use on a small CPU machine."""

    learner: int | None = None
    rollout: list[int | None] = field(default_factory=list)
    system: set[int] = field(default_factory=set)


def plan_cores(cfg: RunConfig) -> CorePlan:
    """The learner takes the last core; engines take the others round robin (all cores if there are
    more engines than other cores), so engines in different actors never share a core they need not."""
    k = cfg.rollout.num_actors
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = []
    if cfg.cluster.address or not cfg.rollout.pin_cores or len(cores) < 2:
        return CorePlan(rollout=[None] * k)
    pool = cores[:-1] if k <= len(cores) - 1 else cores
    learner = None if cfg.cluster.learner_num_gpus else cores[-1]
    return CorePlan(learner=learner, rollout=[pool[i % len(pool)] for i in range(k)], system=set(cores[:-1]))


