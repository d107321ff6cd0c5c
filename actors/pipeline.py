"""The running pipeline, as the controller's loop sees it: fetch a batch, learn, sync, wait, record.

`Pipeline` holds the actor handles of one run (store, learner, rollout fleet,
scorers) and the run's records (tracker, ledger). Each method is one stage of
the loop in `rlhub.actors.controller`; what a step reports is assembled in
`rlhub.run_report`. Every group handed to the learner ends in the ledger as
trained, dropped (a skipped non-finite step, or a critic warm-up step where
the policy did not move), or requeued (its data was lost); beside them, the
learner's own account of what its tensors held (`rlhub.ledger`'s "step" event).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from rlhub.ledger import Ledger
from rlhub.run_report import failure_counters, sample_records, step_metrics

log = logging.getLogger("rlhub")


HISTORY = ("rollout/reward_mean", "rollout/success_rate", "time/step_s", "staleness/max")
"""The metrics of each step the controller keeps in memory (for the run's summary); every metric is in
metrics.jsonl. Keeping all of them cost the controller 8 KB a step (34 MB per 10 minutes of the
default run, measured in a 30-minute soak)."""


class RunFailed(RuntimeError):
    """The run cannot go on; the message says why (the command exits non-zero)."""


class ActorLost(RunFailed):
    """An actor the run cannot replace on its own died or stopped answering: a learner rank, the
    critic or reference, the store, a weight registry. The controller restores the last checkpoint
    and goes on (`checkpoint.max_recoveries`); past that, the run fails with this message."""


@dataclass
class Step:
    """A learner step: its groups [(meta, (ref, index))], the version it trains at, the wait for its
    groups, and (once submitted) the calls computing it."""

    groups: list
    version: int
    waited: float
    calls: list = field(default_factory=list)
    """Every call computing the step: each learner rank's, the critic's, the publications."""
    learned: list = field(default_factory=list)
    """The learner ranks' train calls, rank 0's first (its metrics are the step's)."""
    published: list = field(default_factory=list)
    """The learner ranks' publications of the weights the step makes (once `publish` queued them)."""
    submitted: float = 0.0
    """time.monotonic() when it went to the learner: `learner.step_timeout_s` counts from here."""


class Pipeline:
    def __init__(self, cfg: Any, run_dir: Path, store: Any, learner: Any, fleet: Any, critic: Any, reference: Any,
                 tracker: Any, ledger: Ledger, tokenizer: Any, version: int, started: float) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.version = version
        """The policy version the run starts (or resumes) at."""
        self.started = started  # time.time() when the command began
        self.store, self.learner, self.fleet, self.critic, self.reference = store, learner, fleet, critic, reference
        self.tracker, self.ledger, self.tokenizer = tracker, ledger, tokenizer
        self.history: list[dict[str, float]] = []
        self.outstanding: list[Step] = []  # submitted, not yet recorded
        self.nonfinite_steps = 0
        self.lost_groups = 0
        self._last_tokens, self._last_time = 0, time.perf_counter()
        self.policy_of: dict[str, str] = {}  # separate policies: each agent's (set by the controller)
        self.eval_rows = 0  # how many eval rows the environment has (set by the controller)
        self.evals_pending = 0
        self.eval_requested = -1
        self.last_eval: dict[str, float] | None = None
        self.last_version = version  # the version the last recorded step made
        self.history_start = version  # the version before history[0]
        self.ledger_start = 0  # the ledger's offset where this run began (what a recovery with no checkpoint goes back to)
        self.recoveries: list[dict[str, Any]] = []  # {lost, at_step, restored, seconds}: the controller's recoveries
        self.recoveries_in_a_row = 0  # since the run last got past the step where it lost an actor
        self.checkpoint_seconds: list[float] = []  # each checkpoint's writing time (summary: checkpoints)
        self._store_stats: dict[str, Any] = {}  # the store's counters at the last step (what remains if the store dies)
        self.record_processes: Any = lambda: None  # rewrites run_dir/processes.json (set by the controller)
        self._recorded_started = 0

    def carry(self, old: "Pipeline") -> None:
        """Take over what a pipeline lost in a recovery had recorded up to the checkpoint this one starts
        from: its steps' history and its failure counters (the fleet carries its own)."""
        self.history = old.history[: max(0, self.version - old.history_start)]
        self.history_start = old.history_start
        self.nonfinite_steps, self.lost_groups = old.nonfinite_steps, old.lost_groups
        self.recoveries, self.recoveries_in_a_row = old.recoveries, old.recoveries_in_a_row
        self.checkpoint_seconds = old.checkpoint_seconds
        self._last_tokens = old._last_tokens
        self._recorded_started = self.fleet.started

    # ---- 1. rollout -> store ---------------------------------------------------------
    def fetch(self, version: int) -> Step:
        """The step training at `version`: prompts_per_step groups no more than max_staleness behind it, oldest first."""
        if self.cfg.eval.before and version == 0 and self.eval_requested < 0 and self.eval_rows:
            self.fleet.request_eval(0, self.cfg.eval.rows, self.cfg.eval.k)  # actor 0 still holds version 0
            self.evals_pending += 1
            self.eval_requested = 0
        start = time.perf_counter()
        groups = self.store.get_batch(self.cfg.prompts_per_step, version, self.cfg.datastore.batch_timeout_s, on_wait=self._watch)
        return Step(groups, version, time.perf_counter() - start)

    def _watch(self) -> None:
        """While waiting for data: replace crashed rollout actors, and raise at once if a submitted learner
        or critic step failed (the data for the next step may be waiting on it: at max_staleness=0 it is)."""
        self.fleet.check()
        calls = [c for step in self.outstanding for c in step.calls]
        ready = ray.wait(calls, num_returns=len(calls), timeout=0)[0] if calls else []
        self._check_ranks(ready, self.outstanding)
        ray.get(ready)
        for step in self.outstanding:  # the data may be waiting on a step that never ends (admission follows the learner)
            self._check_deadline(step, ready)

    def _check_deadline(self, step: Step, ready: list[Any]) -> None:
        """ActorLost when `step` has been with the learner (or the critic) longer than learner.step_timeout_s."""
        if time.monotonic() - step.submitted <= self.cfg.learner.step_timeout_s:
            return
        late = [c for c in step.calls if c not in ready]
        ranks = {*step.learned, *step.published}
        who = " and ".join(w for w, hit in (("the learner", any(c in ranks for c in late)),
                                            ("the critic", any(c not in ranks for c in late))) if hit)
        raise ActorLost(f"{who or 'the learner'} did not finish step {step.version + 1} within learner.step_timeout_s="
                        f"{self.cfg.learner.step_timeout_s:g} s: hung")

    def _check_ranks(self, ready: list[Any], steps: list[Step]) -> None:
        """A dead learner rank ends the run at once, named (the others would wait for it in a collective)."""
        from rlhub.actors.learner import RankFailed

        ranks = {c for step in steps for c in (*step.learned, *step.published)}
        try:
            self.learner.check([c for c in ready if c in ranks])
        except RankFailed as e:
            raise ActorLost(str(e)) from None

    # ---- 2. learn ------------------------------------------------------------------------
    def submit(self, step: Step) -> Step:
        """The learner's step (and the critic's, on the same groups, in version order). Refs travel nested,
        so a lost one is reported by the learner instead of failing the call."""
        from rlhub.actors.learner import split_parts

        shares = split_parts(step.groups, self.learner.world_size)  # each learner rank's (ref, indices, group ids)
        step.learned = self.learner.train_step(shares)
        step.calls = list(step.learned)
        step.submitted = time.monotonic()
        if self.critic is not None:  # the critic steps with the policy: its version is the learner's
            step.calls.append(self.critic.train_step.remote(shares, step.version))  # sharded alike, or one critic takes all
        self.outstanding.append(step)
        return step

    # ---- 3. sync -------------------------------------------------------------------------
    def publish(self, step: Step) -> Step:
        """The step's weights to the engines, and admission opened for its version: queued on the learner
        right behind the step, so it runs before the next step does."""
        step.published = self.learner.publish(step.version + 1)
        step.calls += step.published
        return step

    def wait(self, step: Step) -> dict[str, Any]:
        """The step's metrics once it is learned and published; watches the rollout fleet meanwhile (a
        crashed actor is replaced)."""
        self.fleet.check()  # also when every step's data is ready at once: a dead actor is found each step
        while True:
            ready = ray.wait(step.calls, num_returns=len(step.calls), timeout=1.0)[0]
            self._check_ranks(ready, [step])
            if len(ready) == len(step.calls):
                break
            self._check_deadline(step, ready)
            self.fleet.check()
        metrics = self.learner.metrics(step.learned)
        learner_calls = set(step.learned) | set(step.published)
        critic_metrics = ray.get([c for c in step.calls if c not in learner_calls])
        metrics["time/publish_s"] = max(ray.get(step.published))
        self.outstanding.remove(step)
        for extra in critic_metrics:
            extra.pop("lost_groups", None)
            metrics.update(extra)
            lags = [extra["critic/version"] - 1 - m.extra["critic_version"] for m, _ in step.groups]
            metrics["critic/value_lag_mean"] = sum(lags) / len(lags)  # critic versions between scoring and training
            metrics["critic/value_lag_max"] = max(lags)
        return metrics

    # ---- 4. record --------------------------------------------------------------------------
    def record(self, step: Step, metrics: dict[str, Any]) -> int:
        """Ledger, metrics, samples for a finished step; returns the new policy version."""
        version = int(metrics.pop("version"))
        if version != step.version + 1:  # one version per submitted step, in order: the loop relies on it
            raise RuntimeError(f"the learner reached version {version} where the controller expected {step.version + 1}")
        learned = metrics.pop("learned")
        updated_by = metrics.pop("policies_updated", None)  # separate policies: each one's, beside its "learned"
        lost = set(metrics.pop("lost_groups"))
        if lost:  # their tensors died with a rollout actor: never trained, started again
            self.lost_groups += len(lost)
            self.store.requeue_taken(sorted(lost), "lost_object")
            log.warning("step %d: %d groups lost with a rollout actor's objects; started again", version, len(lost))
        skipped = bool(metrics.get("train/nonfinite_skipped"))
        if skipped:
            self.nonfinite_steps += 1
            log.warning("step %d skipped: non-finite loss or gradient (loss %s, grad norm %s), %d in a row", version,
                        metrics.get("train/loss"), metrics.get("train/grad_norm"), int(metrics["train/nonfinite_in_row"]))
        kept = [(m, box) for m, box in step.groups if m.group_id not in lost]
        updated = bool(metrics.get("train/policy_updated"))
        not_trained = "nonfinite_step" if skipped else None if updated else "critic_warmup"
        # issued before trained: the store's events first
        if updated_by is None:
            events = step_events(kept, learned, version, not_trained)
        else:
            events = policy_step_events(kept, learned, updated_by, self.policy_of, version)
        self.ledger.write(self.store.take_events() + events)
        if not_trained and updated_by is None:  # (separate policies count the groups their moving policies trained on)
            metrics["train/groups"] = 0.0
        metrics.update(self._evaluations(version))
        self._log(version, step, kept, metrics)
        if skipped and metrics["train/nonfinite_in_row"] >= self.cfg.learner.max_nonfinite_steps:
            raise RunFailed(f"{int(metrics['train/nonfinite_in_row'])} learner steps in a row had a non-finite loss or gradient "
                            f"(learner.max_nonfinite_steps={self.cfg.learner.max_nonfinite_steps}); last loss "
                            f"{metrics.get('train/loss')}, grad norm {metrics.get('train/grad_norm')}")
        return version

    @property
    def generated_tokens(self) -> int:
        """Tokens the rollout actors had generated at the last step's record (crashed actors' included)."""
        return self._last_tokens

    def _log(self, version: int, step: Step, kept: list, metrics: dict[str, Any]) -> None:
        rollout_stats, store_stats = self.fleet.stats(), self.store.stats()
        for report in self.fleet.new_failure_reports(rollout_stats):
            log.warning("environment %s raised %s in %s (occurrence %d) on row %s\n%s", report["env"], report["error"],
                        report["where"], report["occurrence"], report["row"], report["traceback"])
        now = time.perf_counter()
        metrics.update(step_metrics([m for m, _ in kept] or [m for m, _ in step.groups], rollout_stats, store_stats,
                                    step.waited, now - self._last_time, self.fleet.restarts, self.fleet.retired))
        metrics.update({f"failures/actor_crash/{kind}": float(n) for kind, n in self.fleet.crashes.items()})
        metrics["failures/nonfinite_steps"] = float(self.nonfinite_steps)
        metrics["failures/lost_groups"] = float(self.lost_groups)
        metrics["failures/recoveries"] = float(len(self.recoveries))
        generated = sum(s["generated_tokens"] for s in rollout_stats + self.fleet.retired)
        metrics["perf/generated_tokens_per_s"] = (generated - self._last_tokens) / max(now - self._last_time, 1e-9)
        metrics["perf/generated_tokens"] = float(generated)  # since the run began: what experiment.max_generated_tokens counts
        if self.cfg.data.curation == "difficulty":  # the rows' solve rates, as the store's sampler holds them
            metrics.update(self.store.curation_stats())
            metrics["curation/replayed_groups"] = float(sum(s.get("replayed", 0) for s in rollout_stats + self.fleet.retired))
        metrics["perf/trained_tokens_per_s"] = metrics["train/tokens"] / max(now - self._last_time, 1e-9)
        metrics["time/unix"] = time.time()  # when the step was recorded: what `rlhub fault` measures recoveries by
        self._last_tokens, self._last_time = generated, now
        if not self.history:
            log.info("first step done (%.1f s after the command)", time.time() - self.started)
        self.history.append({k: metrics[k] for k in HISTORY if k in metrics})  # what the summary reads: flat memory per step
        self.last_version, self._store_stats = version, store_stats
        if self.recoveries and version > self.recoveries[-1]["at_step"]:
            self.recoveries_in_a_row = 0  # past the step the last loss was at: the next loss starts a new count
        self.fleet.progressed()  # replacements in a row (rollout.max_restarts) count from zero again
        if self.fleet.started != self._recorded_started:  # a rollout actor's replacement started: its new pid
            self._recorded_started = self.fleet.started
            self.record_processes()
        self.tracker.log(version, metrics)
        if self.cfg.rollout.log_samples:
            self._log_samples(version, kept[: self.cfg.rollout.log_samples])

    def _log_samples(self, version: int, groups: list) -> None:
        records = []
        for meta, (ref, index) in groups:
            try:
                tensors = ray.get(ref, timeout=self.cfg.cluster.call_timeout_s)[index]
            except ray.exceptions.RayError:  # its rollout actor died (or hangs) since the learner fetched it: no sample this time
                continue
            records += sample_records(version, meta, tensors, self.tokenizer)
        self.tracker.log_samples(version, records)

    # ---- evaluation ---------------------------------------------------------------------------
    def _evaluations(self, version: int) -> dict[str, float]:
        """Ask for an evaluation every eval.every steps; the newest one that came back joins this
        step's metrics (eval/step says which step's policy it measured)."""
        every = self.cfg.eval.every
        if every and version % every == 0 and self.eval_rows:
            self.fleet.request_eval(version, self.cfg.eval.rows, self.cfg.eval.k)
            self.evals_pending += 1
            self.eval_requested = version
        out: dict[str, float] = {}
        if self.evals_pending:
            for result in self.fleet.eval_results():
                self.evals_pending -= 1
                self.last_eval = out = result
                log.info("eval at step %d: %s", int(result["eval/step"]), _eval_line(result))
        return out

    def final_eval(self, version: int, timeout_s: float = 600.0) -> dict[str, float] | None:
        """The final policy's evaluation (eval.final), waited for; None without eval rows. It goes to
        the summary (and W&B's), not to metrics.jsonl, whose rows are the steps."""
        if not (self.cfg.eval.final and self.eval_rows):
            return self.last_eval
        if self.eval_requested != version:  # the last step's own evaluation, when due, is the final one
            self.fleet.request_eval(version, self.cfg.eval.rows, self.cfg.eval.k)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for result in self.fleet.eval_results():  # an earlier step's, still on its way, is left out
                if int(result["eval/step"]) == version:
                    log.info("final eval: %s", _eval_line(result))
                    return result
            time.sleep(0.2)
        log.warning("final eval did not finish within %.0f s", timeout_s)
        return None

    # ---- checkpoints and the end ------------------------------------------------------------
    def checkpoint_due(self, version: int) -> bool:
        return bool(self.cfg.checkpoint.every) and version % self.cfg.checkpoint.every == 0

    def checkpoint(self, version: int) -> None:
        """Everything needed to resume at `version`: weights, optimizer, the store's state, the ledger's length.
        Called with no learner step outstanding."""
        from rlhub.checkpoint import write_checkpoint

        events, store_state = self.store.snapshot()
        self.ledger.write(events)
        state = {"store": store_state, "wandb_id": self.tracker.run_id, "experiment": self.cfg.experiment.name}
        # what happened after the snapshot is recorded after this offset: a resume discards it and restarts
        # every group the snapshot did not see end (state["store"]["admission"]["requeued"])
        state["ledger_offset"] = self.ledger.offset()

        def save(d: Path) -> None:
            saves = self.learner.save(str(d))
            saves += [self.critic.save.remote(str(d / "critic"))] if self.critic else []
            saves += [self.reference.save.remote(str(d / "reference"))] if self.reference else []
            timeout_s = self.cfg.learner.step_timeout_s
            if ray.wait(saves, num_returns=len(saves), timeout=timeout_s)[1]:  # a hung rank or scorer: recovered like a dead one
                raise ActorLost(f"the learner or a scorer did not finish writing checkpoint step_{version:06d} within "
                                f"learner.step_timeout_s={timeout_s:g} s: hung")
            ray.get(saves)

        start = time.perf_counter()
        write_checkpoint(self.run_dir, version, save, state, self.cfg.checkpoint.keep_last)
        self.checkpoint_seconds.append(time.perf_counter() - start)
        log.info("checkpoint step_%06d written in %.2f s", version, self.checkpoint_seconds[-1])

    def finish(self) -> tuple[dict, list]:
        """Stop admission, let the rollout actors end, count what was left: (store stats, actor stats).
        A run that failed with its store dead keeps the store's counters of its last step."""
        self.tracker.close_bar()
        try:
            self.store.stop()
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            log.warning("the store is gone (%s): its counters are those of step %d", str(e).splitlines()[0], self.last_version)
            return self._store_stats or {"dropped": {}}, self.fleet.join(timeout_s=30) if self.fleet.runs else []
        finished = self.fleet.join()
        self.store.drain("run_end")
        self.store.close_out("run_end")
        self.ledger.write(self.store.take_events())
        return self.store.stats(), finished

    def failures(self, store_stats: dict, rollout_stats: list[dict]) -> dict[str, int]:
        learner = {"nonfinite_steps": self.nonfinite_steps, "lost_groups": self.lost_groups, "recoveries": len(self.recoveries),
                   "nonfinite_metrics": sum(self.tracker.nonfinite.values()),
                   **{f"actor_crash/{kind}": n for kind, n in self.fleet.crashes.items()}}
        return failure_counters(rollout_stats, store_stats, self.fleet.restarts, learner)


def step_events(kept: list, learned: list, version: int, not_trained: str | None) -> list[dict[str, Any]]:
    """The ledger's events for one finished step at `version` - 1: each group the controller handed over
    (and the learner could fetch) as trained, with the tokens its rollout counted, or dropped for
    `not_trained` when the policy did not move; then the learner's own account of the step, the
    (group id, tokens) pairs its tensors held, which `rlhub.ledger` reconciles against them."""
    events: list[dict[str, Any]] = []
    for meta, _ in kept:
        if not_trained:
            events.append({"event": "dropped", "group": meta.group_id, "row": meta.prompt_index, "reason": not_trained})
        else:
            events.append({"event": "trained", "group": meta.group_id, "row": meta.prompt_index, "actor": meta.actor_id,
                           "version": version - 1, "step": version, "tokens": meta.num_tokens})
    events.append({"event": "step", "step": version, "version": version - 1, "updated": not_trained is None,
                   "groups": [[int(g), int(t)] for g, t in learned]})
    return events


def policy_step_events(kept: list, learned: dict[str, list], updated: dict[str, bool], policy_of: dict[str, str],
                       version: int) -> list[dict[str, Any]]:
    """`step_events` under separate policies: a group is trained when a policy that moved trained on
    some of its agents' tokens; its "trained" event records each such policy's tokens as its rollout
    counted them (`policies`), and each policy's learner gives its own "step" report, which
    `rlhub.ledger` reconciles with those, policy by policy. A group no moving policy trained on is
    dropped (nonfinite_step: the policies holding its tokens skipped the step)."""
    events: list[dict[str, Any]] = []
    for meta, _ in kept:
        tokens: dict[str, int] = {}
        for agent, n in meta.extra.get("agent_tokens", {}).items():
            tokens[policy_of[agent]] = tokens.get(policy_of[agent], 0) + int(n)
        by = {p: n for p, n in tokens.items() if n and updated[p]}
        if by:
            events.append({"event": "trained", "group": meta.group_id, "row": meta.prompt_index, "actor": meta.actor_id,
                           "version": version - 1, "step": version, "tokens": meta.num_tokens, "policies": by})
        else:
            events.append({"event": "dropped", "group": meta.group_id, "row": meta.prompt_index, "reason": "nonfinite_step"})
    for policy, pairs in learned.items():
        events.append({"event": "step", "step": version, "version": version - 1, "updated": updated[policy], "policy": policy,
                       "groups": [[int(g), int(t)] for g, t in pairs]})
    return events


def _eval_line(result: dict[str, float]) -> str:
    return ", ".join(f"{k[5:]} {v:.3f}" for k, v in result.items() if k.startswith(("eval/pass@", "eval/reward")))
