"""The single controller: start the actors, then loop rollout -> store -> learn -> sync -> record.

`train` reads top to bottom: check the inputs (before Ray starts, failing in
one line that names the cause), start Ray and the actors, run the loop, then
close the run: the ledger reconciled, the summary, the pictures (the
expert-load heatmaps are also drawn and sent to W&B at every evaluation). The
loop itself is `run_loop`; each of its stages is a method of `Pipeline`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rlhub.actors.cluster import CorePlan, check_reachable, confine_ray, forget_local_ray, init_ray, plan_cores
from rlhub.config import ConfigError, RunConfig
from rlhub.env_check import agent_policies, check_env, check_prompt_lengths, check_sandbox, has_format_examples  # noqa: F401 - the checks a run starts with

log = logging.getLogger("rlhub")


# ---- before Ray ------------------------------------------------------------------

def prepare_run_dir(cfg: RunConfig) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume from or None)."""
    from rlhub.checkpoint import latest_checkpoint

    base = Path("runs") / cfg.experiment.name
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
    elif cfg.resume:
        candidates = sorted((p for p in base.glob("*") if latest_checkpoint(p)), key=lambda p: p.name)
        if not candidates:
            raise ConfigError(f"resume=true: no run of experiment {cfg.experiment.name!r} under {base} has a checkpoint")
        run_dir = candidates[-1]
    else:
        run_dir = base / datetime.now().strftime("%Y%m%d-%H%M%S")
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and ckpt is None:
        raise ConfigError(f"resume=true: {run_dir} holds no checkpoint")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir.resolve(), ckpt


def check_judge(cfg: RunConfig) -> None:
    """The model judge's directory and template, checked before Ray starts."""
    judge = cfg.reward.judge
    if judge.model and not (Path(judge.model).expanduser() / "config.json").is_file():
        raise ConfigError(f"reward.judge.model={judge.model!r}: no Hugging Face model directory there (config.json missing)")
    try:
        judge.template.format(prompt="", completion="", answer="")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"reward.judge.template: {type(e).__name__} {e}; it may use {{prompt}}, {{completion}} and {{answer}}") from None


def load_tokenizer(model_path: Path) -> Any:
    """The controller's view of the tokenizer (decode, EOS), light to load; the actors load the full one."""
    from rlhub.models.tokenizer import TextCodec

    tokenizer = TextCodec(model_path)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"model at {model_path}: the tokenizer has no EOS token to stop generation at")
    return tokenizer


def save_resolved_config(cfg: RunConfig, run_dir: Path) -> None:
    from omegaconf import OmegaConf

    from rlhub.redact import redact_config

    resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(redact_config(resolved)))  # no secret in it: rlhub.redact


def format_examples(cfg: RunConfig, env: Any) -> list[tuple[str, str]]:
    """The environment's format-only (prompt, answer) texts (the learner tokenizes them)."""
    import random

    return env.format_examples(cfg.warm_start.examples, random.Random(cfg.seed))


def create_scorers(cfg: RunConfig, model_path: str, plan: CorePlan) -> tuple[Any, Any, list[Any], dict[str, Any]]:
    """(critic actor or None, reference actor or None, the critic ranks' start-ups to wait for, every
    rank's handle by name), as the algorithm needs them; weights come in init_scorers. With
    `learner.world_size` N > 1 the critic is sharded over N ranks of its own, as the policy is; the
    handle returned is rank 0's, the front."""
    import ray

    from rlhub.actors.scorers import CriticActor, ReferenceActor
    from rlhub.algorithms import advantage_needs

    algo = cfg.algorithm
    options = {"num_cpus": 0, "num_gpus": cfg.cluster.scorer_num_gpus}
    cores = plan.system or None
    starting: list[Any] = []
    handles: dict[str, Any] = {}

    def ranked(cls: Any) -> Any:
        """The scorer's rank actors, their start-ups queued; rank 0's handle."""
        ranks = [cls.options(**options).remote(cfg, model_path, cores, r) for r in range(cfg.learner.world_size)]
        name = "critic" if cls is CriticActor else "reference"
        handles.update({name if len(ranks) == 1 else f"{name} rank {r}": a for r, a in enumerate(ranks)})
        if len(ranks) > 1:
            where = ray.get(ranks[0].where.remote())
            starting.extend(a.start.remote(where["node"], where["port"], ranks[1:] if r == 0 else []) for r, a in enumerate(ranks))
        return ranks[0]

    critic = ranked(CriticActor) if advantage_needs(algo.advantage).critic else None
    reference = ranked(ReferenceActor) if algo.reference == "actor" and algo.kl_coef > 0 else None
    return critic, reference, starting, handles


def init_scorers(critic: Any, reference: Any, weight_sync: Any, resume_from: Path | None) -> None:
    """The scorers' weights: from the checkpoint when resuming; otherwise the critic's trunk starts from, and
    the reference freezes, the policy as RL starts (after the warm start). Call after the first publish."""
    import ray

    for actor, name in ((critic, "critic"), (reference, "reference")):
        if actor is not None:
            ray.get(actor.load.remote(str(resume_from / name)) if resume_from is not None else actor.load_published.remote(weight_sync))


# ---- the run ---------------------------------------------------------------------

def train(cfg: RunConfig) -> dict[str, Any]:
    """One training run (or its resumption); returns the summary. Raises ConfigError before Ray starts
    on bad input, RunFailed when the run cannot go on."""
    from rlhub.checkpoint import resume_checkpoint
    from rlhub.models.build import resolve_model_path

    import psutil

    t0 = psutil.Process().create_time()  # the phases below are timed from the command's start
    run_dir, resume_from = prepare_run_dir(cfg)
    (run_dir / "STOP").unlink(missing_ok=True)  # a resumed run goes on, whatever stopped it before
    env = check_env(cfg)
    check_judge(cfg)
    model_path = resolve_model_path(cfg.model)
    resume_from = resume_checkpoint(run_dir, model_path) if resume_from is not None else None  # the newest that verifies
    if cfg.cluster.address:
        check_reachable(cfg.cluster.address)
    tokenizer = load_tokenizer(model_path)
    check_prompt_lengths(cfg, env, model_path)
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))  # the actors see it (`rlhub fault`'s triggers are there)
    save_resolved_config(cfg, run_dir)
    plan = plan_cores(cfg)
    everywhere = os.sched_getaffinity(0)  # confine_ray moves this process too: a later run in it plans afresh
    started_ray = init_ray(cfg, plan, len(set(agent_policies(cfg, env).values())) or 1)
    actors = None
    try:
        actors = create_actors(cfg, model_path, env, plan)  # their start-ups (imports, model loads) run meanwhile
        _setup_logging(run_dir)
        log.info("run directory %s; model %s; Ray %s (%.1f s)", run_dir, model_path, "started" if started_ray else "joined",
                 time.time() - t0)
        return _train(cfg, run_dir, resume_from, actors, tokenizer, env, plan, t0, model_path)
    finally:
        if actors is not None and not started_ray:
            actors.learner.close()  # the learner ranks' placement group, in a Ray that outlives the run
        if started_ray:
            import ray

            ray.shutdown()
            if not cfg.cluster.address:
                forget_local_ray()
        os.sched_setaffinity(0, everywhere)


def _train(cfg: RunConfig, run_dir: Path, resume_from: Path | None, actors: Actors, tokenizer: Any, env: Any, plan: CorePlan,
           t0: float, model_path: Path) -> dict[str, Any]:
    from rlhub.actors.pipeline import RunFailed

    p = start_pipeline(cfg, run_dir, resume_from, actors, tokenizer, env, plan, t0)
    failure: str | None = None
    final_eval = None
    try:
        version = None
        while version is None:
            try:
                version = run_loop(p, p.version, cfg.experiment.total_steps)
            except lost_actor_errors() as e:
                lost = actors.lost(e)
                if lost is None:  # a call failed, but every actor lives: a bug, not a loss
                    raise
                p = recover(p, actors, lost, cfg, run_dir, tokenizer, env, plan, t0, model_path)
        if cfg.checkpoint.keep_final and not p.checkpoint_due(version):
            p.checkpoint(version)
        final_eval = p.final_eval(version)
    except RunFailed as e:
        failure = str(e)
        log.error("run failed: %s", failure)
    except BaseException:
        p.tracker.close()
        raise
    finally:
        store_stats, rollout_stats = p.finish()
    summary = close_run(cfg, run_dir, p, store_stats, rollout_stats, failure, final_eval)
    if failure:
        raise RunFailed(failure)
    return summary


def ping(handle: Any) -> Any:
    """The method that answers a probe of `handle`: its `alive` where it has one (a scorer's, on a
    thread of its own), else Ray's `__ray_ready__`, which waits behind the actor's running call."""
    try:
        return handle.alive
    except AttributeError:
        return handle.__ray_ready__


def lost_actor_errors() -> tuple[type, ...]:
    """What a lost actor surfaces as in the loop: `ActorLost` (a dead learner rank, a partner a probe
    found dead or silent), Ray's own error from a call to a dead actor, or a call's error caused by a
    peer's death (a sharded scorer's collective with a dead rank): `Actors.lost` tells which."""
    import ray

    from rlhub.actors.learner import RankFailed
    from rlhub.actors.pipeline import ActorLost

    return ActorLost, RankFailed, ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ray.exceptions.GetTimeoutError


def recover(p: Any, actors: Actors, lost: str, cfg: RunConfig, run_dir: Path, tokenizer: Any, env: Any, plan: CorePlan, t0: float,
            model_path: Path) -> Any:
    """After losing an actor the run cannot replace alone: every actor ended and started anew, the last
    checkpoint (or the run's start) restored, what was queued or in flight started again, and the
    ledger told (a "rollback" event: what came after the checkpoint is undone, its steps redone).
    Returns the new pipeline; raises RunFailed once `checkpoint.max_recoveries` are spent, or when the
    new actors fail too often to start."""
    from rlhub.actors.pipeline import RunFailed
    from rlhub.checkpoint import read_state, resume_checkpoint
    from rlhub.tracking import truncate_steps

    limit = cfg.checkpoint.max_recoveries
    while True:
        if p.recoveries_in_a_row >= limit:
            raise RunFailed(lost if not limit else f"{lost} (after {p.recoveries_in_a_row} recoveries in a row, none of which got past "
                                                   f"the step it was lost at: checkpoint.max_recoveries={limit})")
        began = time.time()
        ckpt = resume_checkpoint(run_dir, model_path)  # the newest that verifies (a damaged one is moved aside)
        state = read_state(ckpt) if ckpt is not None else {}
        restored = int(state.get("version", 0))
        log.warning("%s; restoring %s and starting every actor again (recovery %d, %d in a row of at most %d)", lost,
                    ckpt.name if ckpt is not None else "the run's start (no checkpoint yet)", len(p.recoveries) + 1,
                    p.recoveries_in_a_row + 1, limit)
        p.tracker.close_bar()
        actors.kill()
        p.ledger.write([{"event": "rollback", "offset": int(state.get("ledger_offset", p.ledger_start)), "step": restored,
                         "from_step": p.last_version, "reason": lost}])
        for name in ("metrics.jsonl", "samples.jsonl"):
            truncate_steps(run_dir / name, restored)
        record = {"lost": lost, "at_step": p.last_version, "restored": restored, "at": began}
        p.recoveries.append(record)
        p.recoveries_in_a_row += 1
        try:
            vars(actors).update(vars(create_actors(cfg, model_path, env, plan)))
            new = start_pipeline(cfg, run_dir, ckpt, actors, tokenizer, env, plan, t0, carried=p)
        except lost_actor_errors() as e:  # an actor of the new set died while starting: that is one more
            if (again := actors.lost(e)) is None:
                raise
            lost = again
            record["seconds"] = time.time() - began
            continue
        record["seconds"], record["done"] = time.time() - began, time.time()
        redo = f"steps {restored + 1}..{p.last_version} are redone" if p.last_version > restored else "no step to redo"
        log.warning("recovered in %.1f s: back at step %d (%s)", record["seconds"], restored, redo)
        return new


def run_loop(p: Any, version: int, total: int) -> int:
    """Train from `version` to `total`, or until the generation budget (experiment.max_generated_tokens)
    is spent; returns the final version. The next step waits queued on the learner while the current
    one trains, except across a checkpoint; once the budget is spent no step is queued, and the queued
    one still trains. A file RUN_DIR/STOP (`rlhub stop RUN_DIR`) ends the run the same way."""
    steps: deque = deque()
    budget = p.cfg.experiment.max_generated_tokens
    while version < total:
        stop = (p.run_dir / "STOP").exists()
        while (len(steps) < 2 and version + len(steps) < total and not (budget and p.generated_tokens >= budget) and not stop
               and not (steps and p.checkpoint_due(version + len(steps)))):
            # 1. rollout -> store, 2. learn at that version, 3. sync: the new weights out, admission opened
            steps.append(p.publish(p.submit(p.fetch(version + len(steps)))))
        if not steps:  # the generation budget is spent, or a stop was asked for
            if stop:
                log.info("stopped at step %d: %s asked for it", version, p.run_dir / "STOP")
            else:
                log.info("experiment.max_generated_tokens=%d reached after %d generated tokens, at step %d", budget, p.generated_tokens,
                         version)
            break
        step = steps.popleft()
        metrics = p.wait(step)
        version = p.record(step, metrics)  # 4. ledger, metrics, samples
        if p.cfg.eval.every and version % p.cfg.eval.every == 0:
            draw_expert_load(p.run_dir, p.tracker, version)  # pictures for W&B beside each evaluation
        if p.checkpoint_due(version):
            p.checkpoint(version)
    return version


def draw_expert_load(run_dir: Path, tracker: Any, step: int) -> list[Path]:
    """The expert-load heatmaps (`rlhub.plots.expert_heatmaps`, none for a dense policy) drawn from
    metrics.jsonl so far and logged to W&B at `step`. A failure is a warning: it never ends a run."""
    from rlhub.plots import expert_heatmaps

    try:
        paths = expert_heatmaps(run_dir)
        tracker.log_images(paths, step)
    except Exception as e:  # noqa: BLE001 (pictures are a convenience)
        log.warning("expert-load pictures not drawn at step %d: %s: %s", step, type(e).__name__, e)
        return []
    return paths


@dataclass
class Actors:
    """The run's actors (handles), created at once so that their start-ups overlap."""

    weight_sync: Any
    """The weight sync, or under separate policies {policy: its weight sync}."""
    store: Any
    learner: Any
    critic: Any
    reference: Any
    fleet: Any
    judge: Any = None
    starting: list = field(default_factory=list)
    """Start-ups still running (a sharded critic's ranks joining their group)."""
    partners: dict[str, Any] = field(default_factory=dict)
    """Every actor but the learner ranks and the rollout actors, by name ("store shard 1", "critic",
    "weight registry", ...): what `probe` asks and `describe` names."""
    call_timeout_s: float = 60.0
    """How long `probe` waits for an answer."""

    def lost(self, error: BaseException) -> str | None:
        """One line naming the actor lost: a partner a probe finds dead or silent first (a call that
        failed because a partner died names the caller), else the actor `error` names; None when
        `error` is a call's own failure and no actor is lost."""
        import ray

        from rlhub.actors.learner import RankFailed
        from rlhub.actors.pipeline import ActorLost

        if isinstance(error, (ActorLost, RankFailed)):
            return str(error)
        try:
            self.probe()
        except ActorLost as e:
            return str(e)
        if isinstance(error, (ray.exceptions.RayTaskError, ray.exceptions.GetTimeoutError)) and not isinstance(error, ray.exceptions.RayActorError):
            return None
        return self.describe(error)

    def describe(self, error: BaseException) -> str:
        """One line naming the actor whose death `error` reports."""
        import ray

        from rlhub.actors.learner import is_actor

        first = (str(error).splitlines() or [type(error).__name__])[0]
        if not isinstance(error, ray.exceptions.RayActorError):
            return first
        groups = getattr(self.learner, "groups", {None: self.learner})
        for policy, group in groups.items():
            if group.owns(error):
                return (f"policy {policy}: " if policy else "") + group._describe(error)
        for name, handle in self.partners.items():
            if is_actor(handle, error):
                return f"{name} died: {first}"
        return f"an actor died: {first}"

    def probe(self, timeout_s: float | None = None) -> None:
        """Raise ActorLost naming the first partner (store, scorer, weight registry) that is dead or
        does not answer within `timeout_s` (default: cluster.call_timeout_s). A scorer answers on a
        thread of its own (`alive`), so a long score or critic step does not make it look silent; the
        store's actors are asyncio ones and the registry's calls are short, so their plain
        `__ray_ready__` answers between calls."""
        import ray

        from rlhub.actors.pipeline import ActorLost

        timeout_s = self.call_timeout_s if timeout_s is None else timeout_s
        asked = {ping(handle).remote(): name for name, handle in self.partners.items()}
        ready, pending = ray.wait(list(asked), num_returns=len(asked), timeout=timeout_s)
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as e:
                raise ActorLost(f"{asked[ref]} died: {str(e).splitlines()[0]}") from None
        if pending:
            raise ActorLost(f"{asked[pending[0]]} did not answer within {timeout_s:.0f} s")

    def kill(self) -> None:
        """End every actor of the run: a recovery starts a new set."""
        import ray

        self.fleet.kill()
        self.learner.close()
        for handle in [*self.partners.values(), *([self.judge] if self.judge is not None else [])]:
            ray.kill(handle, no_restart=True)




def create_actors(cfg: RunConfig, model_path: Path, env: Any, plan: CorePlan) -> Actors:
    """Every actor of the run, without waiting for any: each imports its libraries and loads its model meanwhile."""
    import ray

    from rlhub.actors.learner import LearnerGroup, PolicyLearners
    from rlhub.actors.rollout import RolloutFleet
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from rlhub.actors.store import RayDataStore
    from rlhub.weight_sync import ObjectStoreWeightSync, WeightRegistry, probe_sequence

    vocab = json.loads((model_path / "config.json").read_text()).get("vocab_size", 256)
    probe = probe_sequence(vocab)
    policy_of = agent_policies(cfg, env)
    # the slow starters first, so they take the workers Ray started ahead; they are wired up after
    if policy_of:  # separate policies: a learner, a weight registry and (in each rollout actor) an engine each
        learner: Any = PolicyLearners(cfg, str(model_path), probe, plan.learner, policy_of, tuple(env.agents))
    else:
        learner = LearnerGroup(cfg, str(model_path), probe, plan.learner)
    fleet = RolloutFleet(cfg, str(model_path), probe, plan.rollout)
    critic, reference, starting, partners = create_scorers(cfg, str(model_path), plan)

    # the store and the weight registries hold no model: they live beside the controller, so that a lost
    # worker node takes only what it computed (rollout actors are replaced; a learner rank is recovered)
    home = {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}

    def registry() -> Any:
        return ObjectStoreWeightSync(ray.remote(num_cpus=0)(WeightRegistry).options(**home).remote(), cfg.cluster.transfer_timeout_s)

    weight_sync = {name: registry() for name in learner.names} if policy_of else registry()
    store = RayDataStore.create(cfg.datastore.num_shards, cfg.prompts_per_step, cfg.max_staleness, len(env.dataset("train")), cfg.seed,
                                cfg.data, cfg.group_size, tuple(learner.names) if policy_of else (), options=home,
                                call_timeout_s=cfg.cluster.call_timeout_s)
    learner.connect(weight_sync, store)
    judge = None
    if cfg.reward.judge.model:
        from rlhub.actors.judge import JudgeActor

        # stateless: Ray restarts it in place and sends it again the calls that were in flight
        judge = JudgeActor.options(num_cpus=0, num_gpus=cfg.reward.judge.num_gpus, max_restarts=-1, max_task_retries=-1).remote(cfg)
    partners["store coordinator"] = store.coordinator
    partners.update({f"store shard {i}": shard for i, shard in enumerate(store.shards)})
    syncs = weight_sync if policy_of else {"": weight_sync}
    partners.update({f"weight registry {name}".strip(): ws.registry for name, ws in syncs.items()})
    return Actors(weight_sync, store, learner, critic, reference, fleet, judge, starting, partners, cfg.cluster.call_timeout_s)


def start_pipeline(cfg: RunConfig, run_dir: Path, resume_from: Path | None, actors: Actors, tokenizer: Any, env: Any, plan: CorePlan,
                   t0: float, carried: Any = None) -> Any:
    """The policy trained up to its starting point (warm start, or the checkpoint), published, the
    scorers loaded, the rollout loops running, and the run's records opened; or, in a recovery, the
    `carried` pipeline's records (ledger, tracker, history, counters) taken over."""
    import ray

    from rlhub.actors.pipeline import Pipeline, RunFailed
    from rlhub.checkpoint import read_state
    from rlhub.evaluation import eval_rows
    from rlhub.ledger import Ledger, truncate
    from rlhub.tracking import Tracker, truncate_steps

    learner, store, fleet, critic, reference = actors.learner, actors.store, actors.fleet, actors.critic, actors.reference
    try:
        learner.start()  # placed, and (several ranks) joined into one group
    except Exception as e:  # noqa: BLE001 (a rank that fails to start ends the run, named)
        raise RunFailed(f"the learner ranks did not start: {e}") from None
    (run_dir / "learner_ranks.json").write_text(json.dumps(learner.where, indent=1))
    if learner.world_size > 1:
        log.info("learner: %d ranks on %s (%.1f s)", learner.world_size, ", ".join(sorted({w["node"] for w in learner.where})),
                 time.time() - t0)
    state: dict[str, Any] = read_state(resume_from) if resume_from is not None else {}
    version = int(state.get("version", 0))
    if carried is not None:  # a recovery: the records go on (its "rollback" event undid what came after the checkpoint)
        ledger, tracker, ledger_start = carried.ledger, carried.tracker, carried.ledger_start
    else:
        if resume_from is not None:  # the run's records go back to the checkpoint: what came after it is redone
            truncate(run_dir / "ledger.jsonl", state["ledger_offset"])
            for name in ("metrics.jsonl", "samples.jsonl"):
                truncate_steps(run_dir / name, version)
        ledger = Ledger(run_dir / "ledger.jsonl")
        ledger_start = ledger.offset()
        ledger.write([{"event": "run", "version": version, "resumed": resume_from is not None}])
        tracker = Tracker(run_dir, cfg, cfg.experiment.total_steps, version, state.get("wandb_id"))
    if resume_from is not None:
        learner.get(learner.load(str(resume_from), version))
        store.load_state_dict(state["store"])
        restart = state["store"]["admission"]["requeued"]
        reason = "recovery" if carried is not None else "resume"
        ledger.write([{"event": "requeued", "group": g, "reason": reason} for g in restart])
        log.info("%s from %s at version %d; %d groups to start again (%.1f s)", "restored" if carried else "resumed", resume_from,
                 version, len(restart), time.time() - t0)
    elif cfg.warm_start.steps and has_format_examples(env):
        warm = learner.get(learner.warm_start(format_examples(cfg, env), cfg.warm_start.steps, cfg.warm_start.batch_size,
                                              cfg.warm_start.lr, cfg.seed, cfg.warm_start.cache))[0]
        tracker.summary(warm)
        log.info("format warm start: %d steps, loss %.3f -> %.3f%s (%.1f s)", cfg.warm_start.steps, warm["warm_start/loss_first"],
                 warm["warm_start/loss_last"], ", loaded from the cache" if warm["warm_start/cached"] else "", time.time() - t0)
    learner.get(learner.publish())  # engines start from the learner's weights and probe
    ray.get(actors.starting)
    init_scorers(critic, reference, actors.weight_sync, resume_from)
    fleet.partner_check = actors.probe
    if carried is not None:
        fleet.inherit(carried.fleet)
    fleet.start(store, actors.weight_sync, [s for s in (reference, critic) if s], actors.judge)
    if plan is not None and not cfg.cluster.address:
        confine_ray(plan)
    log.info("%d rollout actor(s) generating; training (%.1f s)", cfg.rollout.num_actors, time.time() - t0)
    pipeline = Pipeline(cfg, run_dir, store, learner, fleet, critic, reference, tracker, ledger, tokenizer, version, t0)
    pipeline.eval_rows = len(eval_rows(env, cfg.eval.rows))
    pipeline.policy_of = agent_policies(cfg, env)
    pipeline.ledger_start = ledger_start
    if carried is not None:
        pipeline.carry(carried)
    pipeline.record_processes = lambda: record_processes(run_dir, actors)
    pipeline.record_processes()
    return pipeline


def record_processes(run_dir: Path, actors: Actors) -> dict[str, dict[str, Any]]:
    """run_dir/processes.json: every process of the run by role ("driver", "learner rank 0", "rollout
    actor 1", "store shard 0", "critic", ...) -> {pid, node}; what `rlhub fault` picks its target from.
    Written again whenever the run replaces a process."""
    import ray

    named = {**{f"rollout actor {i}": a for i, a in actors.fleet.running().items()}, **actors.partners}
    if actors.judge is not None:
        named["judge"] = actors.judge
    asked = {name: handle.__ray_call__.remote(_whereabouts) for name, handle in named.items()}
    found: dict[str, dict[str, Any]] = {"driver": {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}}
    for w in actors.learner.where:
        found[(f"policy {w['policy']} " if "policy" in w else "") + f"learner rank {w['rank']}"] = {"pid": w["pid"], "node": w["node_id"]}
    for name, ref in asked.items():
        try:
            found[name] = ray.get(ref, timeout=30)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):  # dead or busy: the next record finds it
            continue
    tmp = run_dir / ".processes.json.tmp"
    tmp.write_text(json.dumps(found, indent=1))
    os.replace(tmp, run_dir / "processes.json")
    return found


def _whereabouts(_actor: Any) -> dict[str, Any]:
    import ray

    return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}


def close_run(cfg: RunConfig, run_dir: Path, p: Any, store_stats: dict, rollout_stats: list, failure: str | None,
              final_eval: dict[str, float] | None = None) -> dict[str, Any]:
    """The run's summary (also summary.json), after reconciling its ledger and drawing its pictures."""
    from rlhub.ledger import check_run, format_report
    from rlhub.plots import plot_run
    from rlhub.run_report import tenth

    p.ledger.close()
    reconciled = check_run(run_dir, allow_open=failure is not None)
    log.info("%s", format_report(reconciled))
    failures = p.failures(store_stats, rollout_stats)
    status = "failed" if failure else "unreconciled" if not reconciled.ok else "nonfinite" if failures["nonfinite_metrics"] or failures["nonfinite_steps"] else "ok"
    history = p.history
    times = [h["time/step_s"] for h in history]
    summary = {
        "status": status,
        "error": failure,
        "run_dir": str(run_dir),
        "steps": len(history),
        "generated_tokens": p.generated_tokens,
        "reward_first_tenth": tenth(history, "rollout/reward_mean", False),
        "reward_last_tenth": tenth(history, "rollout/reward_mean", True),
        "success_first_tenth": tenth(history, "rollout/success_rate", False),
        "success_last_tenth": tenth(history, "rollout/success_rate", True),
        "staleness_max": max((h.get("staleness/max", 0.0) for h in history), default=0.0),
        "mean_step_s": sum(times) / len(times) if times else None,
        "failures": failures,
        "nonfinite_metrics": dict(p.tracker.nonfinite),
        "ledger": {"ok": reconciled.ok, "issued": reconciled.issued, "trained": reconciled.trained, "dropped": reconciled.dropped,
                   "requeued": reconciled.requeued, "open": reconciled.open, "violations": [str(v) for v in reconciled.violations]},
        "store": store_stats,
        "rollout": rollout_stats,
        "max_staleness": cfg.max_staleness,
        "recoveries": p.recoveries,
        "checkpoints": {"written": len(p.checkpoint_seconds), "mean_s": sum(p.checkpoint_seconds) / len(p.checkpoint_seconds)
                        if p.checkpoint_seconds else None},
        "eval": final_eval,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    try:
        plots = plot_run(run_dir)  # the expert-load heatmaps among them, for an MoE policy
    except Exception as e:  # noqa: BLE001 (pictures are a convenience: never fail a run over them)
        log.warning("plots not drawn: %s", e)
        plots = []
    p.tracker.finish(summary, plots)
    return summary


class _Console(logging.Handler):
    """rlhub's log lines on the terminal, written past the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(f"rlhub: {record.getMessage()}", file=sys.stderr)


def _setup_logging(run_dir: Path) -> None:
    for h in [h for h in log.handlers if isinstance(h, (logging.FileHandler, _Console))]:
        log.removeHandler(h)
        h.close()
    from rlhub.redact import RedactFilter

    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console = _Console(logging.INFO)
    for h in (handler, console):
        h.addFilter(RedactFilter())  # no secret in train.log or on the terminal
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
