"""The exactly-once ledger: writer, truncation on resume, and reconciliation of synthetic runs."""

import json
from pathlib import Path

import pytest

from rlhub.ledger import Ledger, Reconciliation, check_run, format_report, reconcile, truncate


def issued(g: int, actor: int = 0, version: int = 0) -> dict:
    return {"event": "issued", "group": g, "row": g, "actor": actor, "version": version}


def trained(g: int, version: int = 0, actor: int = 0, tokens: int = 5) -> dict:
    return {"event": "trained", "group": g, "row": g, "actor": actor, "version": version, "step": version + 1, "tokens": tokens}


def step(version: int, groups: dict[int, int], updated: bool = True) -> dict:
    """The learner's report of the step that trained at `version`: {group: tokens} its tensors held."""
    return {"event": "step", "step": version + 1, "version": version, "updated": updated, "groups": [[g, t] for g, t in groups.items()]}


def dropped(g: int, reason: str = "filtered") -> dict:
    return {"event": "dropped", "group": g, "row": g, "reason": reason}


def requeued(g: int, reason: str) -> dict:
    return {"event": "requeued", "group": g, "reason": reason}


def clean_run() -> list[dict]:
    """Two steps of two groups, one group filtered, one left stale at the end."""
    return [
        {"event": "run", "version": 0, "resumed": False},
        *[issued(g, actor=g % 2) for g in range(6)],
        trained(0), trained(1, actor=1), dropped(2, "filtered"), step(0, {0: 5, 1: 5}),
        trained(3, version=1, actor=1), trained(4, version=1), dropped(5, "stale"), step(1, {3: 5, 4: 5}),
    ]


def messages(rec: Reconciliation) -> list[str]:
    return [str(v) for v in rec.violations]


def only_violation(rec: Reconciliation) -> str:
    assert rec.violation_count == 1, messages(rec)
    return str(rec.violations[0])


def test_clean_run_reconciles_with_counts():
    rec = reconcile(clean_run())
    assert rec.ok, messages(rec)
    assert (rec.issued, rec.trained, rec.dropped, rec.open) == (6, 4, {"filtered": 1, "stale": 1}, 0)
    assert (rec.runs, rec.resumes, rec.steps_checked) == (1, 0, 2)
    report = format_report(rec)
    assert report.splitlines()[0] == "ledger: 6 groups issued, 4 trained, 2 dropped (filtered 1, stale 1), 0 re-issued, 0 open — reconciled"


def test_actor_crash_requeue_then_retrain_is_fine():
    events = [issued(0, actor=0), issued(1, actor=1), requeued(0, "actor_crash"), issued(0, actor=1), trained(0, actor=1), trained(1, actor=1)]
    rec = reconcile(events)
    assert rec.ok, messages(rec)
    assert (rec.issued, rec.trained, rec.requeued) == (2, 2, {"actor_crash": 1})
    assert "1 re-issued (actor_crash 1)" in format_report(rec)


def test_a_dropped_group_is_never_started_again():
    # a drop is an outcome: no path of the pipeline restarts such a group, so the ledger refuses it
    rec = reconcile([issued(0), dropped(0, "env_error"), requeued(0, "lost_object"), issued(0, actor=1), trained(0, actor=1)])
    assert "group 0: dropped, then re-issued (line 3)" in messages(rec)


def test_resume_truncates_and_redoes_work(tmp_path: Path):
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        ledger.write([{"event": "run", "version": 0, "resumed": False}, issued(0), issued(1), issued(2)])
        ledger.write([trained(0), step(0, {0: 5})])
        checkpoint_offset = ledger.offset()  # version 1 saved: 1 and 2 were in flight
        ledger.write([trained(1, version=1), issued(3, version=1), step(1, {1: 5})])  # lost with the crash
    truncate(path, checkpoint_offset)
    with Ledger(path) as ledger:
        ledger.write([{"event": "run", "version": 1, "resumed": True}, requeued(1, "resume"), requeued(2, "resume")])
        ledger.write([issued(1, version=1), issued(2, version=1), issued(3, version=1)])
        ledger.write([trained(1, version=1), trained(2, version=1), dropped(3, "run_end"), step(1, {1: 5, 2: 5})])  # step 2 again
    rec = check_run(tmp_path)
    assert rec.ok, messages(rec)
    assert (rec.issued, rec.trained, rec.dropped, rec.requeued) == (4, 3, {"run_end": 1}, {"resume": 2})
    assert (rec.runs, rec.resumes, rec.steps_checked) == (2, 1, 2)


def rolled_back_run(offset_shift: int = 0) -> tuple[list[dict], int]:
    """A run that loses its learner after step 2, restores the checkpoint at version 1 and redoes step 2:
    (events, the checkpoint's offset into them)."""
    before = [{"event": "run", "version": 0, "resumed": False}, issued(0), issued(1), issued(2), trained(0), step(0, {0: 5})]
    offset = sum(len(json.dumps(e).encode()) + 1 for e in before)
    lost = [trained(1, version=1), issued(3, version=1), step(1, {1: 5})]  # undone by the rollback
    redo = [{"event": "rollback", "offset": offset + offset_shift, "step": 1, "from_step": 2, "reason": "learner rank 0 died"},
            requeued(1, "recovery"), requeued(2, "recovery"), issued(1, version=1), issued(2, version=1), issued(3, version=1),
            trained(1, version=1), trained(2, version=1), dropped(3, "run_end"), step(1, {1: 5, 2: 5})]
    return before + lost + redo, offset


def test_a_rollback_undoes_what_came_after_its_checkpoint_and_the_redone_steps_reconcile(tmp_path: Path):
    events, _ = rolled_back_run()
    with Ledger(tmp_path / "ledger.jsonl") as ledger:
        ledger.write(events)
    for rec in (reconcile(events), check_run(tmp_path)):
        assert rec.ok, messages(rec)
        assert (rec.issued, rec.trained, rec.requeued, rec.steps_checked) == (4, 3, {"recovery": 2}, 2)
        assert (rec.rollbacks, rec.undone, rec.redone_steps) == (1, 3, 1)
    assert "1 recoveries from a checkpoint: 3 events undone, 1 steps redone" in format_report(rec)


def test_a_second_rollback_to_the_same_checkpoint_undoes_only_what_is_left():
    events, offset = rolled_back_run()
    cut = next(i for i, e in enumerate(events) if e["event"] == "rollback")
    again = {"event": "rollback", "offset": offset, "step": 1, "from_step": 1, "reason": "store shard 0 died"}
    twice = events[: cut + 4] + [again] + events[cut + 1:]  # lost again after re-issuing groups 1 and 2
    rec = reconcile(twice)
    assert rec.ok, messages(rec)
    assert (rec.rollbacks, rec.trained, rec.requeued) == (2, 3, {"recovery": 2})


def test_without_the_rollback_the_redone_work_is_caught():
    events, _ = rolled_back_run()
    rec = reconcile([e for e in events if e["event"] != "rollback"])
    assert "group 1: trained, then re-issued: would train twice" in messages(rec)[0]
    assert not rec.ok


def test_a_rollback_to_the_wrong_offset_is_caught():
    events, _ = rolled_back_run(offset_shift=3)  # mid-line: the first undone event is not where the checkpoint was
    rec = reconcile(events)
    assert any("not a line boundary" in m for m in messages(rec)), messages(rec)
    events, offset = rolled_back_run(offset_shift=10**6)  # past the rollback itself
    assert "rollback event with missing, mistyped or impossible ['offset']" in messages(reconcile(events))[0]


def test_without_truncation_the_resume_is_caught(tmp_path: Path):
    # the same resume, but the lost work left in place: group 1 was trained, then re-issued
    rec = reconcile([issued(0), issued(1), trained(0), trained(1, version=1), requeued(1, "resume"), issued(1, version=1), trained(1, version=1)])
    assert messages(rec) == [
        "group 1: trained, then re-issued: would train twice (line 5)",
        "group 1: trained, then re-issued: would train twice (line 6)",
        "group 1: trained twice (line 7)",
    ]


def test_trained_twice():
    assert only_violation(reconcile([issued(0), trained(0), trained(0, version=1)])) == "group 0: trained twice (line 3)"


def test_trained_then_requeued():
    assert only_violation(reconcile([issued(0), trained(0), requeued(0, "actor_crash")])) == (
        "group 0: trained, then re-issued: would train twice (line 3)"
    )


def test_issued_twice_without_requeue():
    assert only_violation(reconcile([issued(0), issued(0, actor=1), trained(0)])) == "group 0: issued twice without a requeue (line 2)"


def test_dropped_without_issued():
    rec = reconcile([issued(0), issued(1), dropped(2, "env_error"), trained(0), trained(1)])
    assert only_violation(rec) == "group 2: dropped without issued (line 3)"


def test_trained_without_issued():
    rec = reconcile([issued(0), trained(0), trained(1)])
    assert messages(rec) == ["group 1: trained without issued (line 3)"]


def test_dropped_after_trained():
    assert only_violation(reconcile([issued(0), trained(0), dropped(0, "stale")])) == "group 0: dropped after trained (line 3)"


def test_open_group_is_a_violation_unless_allowed():
    events = [issued(0), issued(1), trained(0), issued(2), requeued(2, "actor_crash")]
    rec = reconcile(events)
    assert messages(rec) == ["group 1: open: issued but never trained or dropped", "group 2: open: requeued but never trained or dropped"]
    assert rec.open == 2
    relaxed = reconcile(events, allow_open=True)
    assert relaxed.ok and relaxed.open == 2
    assert "2 open — reconciled" in format_report(relaxed)


def test_id_gap_is_a_violation():
    rec = reconcile([issued(g) for g in (0, 1, 4, 5, 7)] + [trained(g) for g in (0, 1, 4, 5, 7)])
    assert messages(rec) == [
        "group 2: id gap: groups 2..3 never issued (a handed-out id was not recorded)",
        "group 6: id gap: groups 6..6 never issued (a handed-out id was not recorded)",
    ]


def without(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["event"] != kind]


def test_each_steps_trained_groups_are_reconciled_with_the_learners_report():
    run = clean_run()
    lacking = [step(1, {3: 5}) if e["event"] == "step" and e["step"] == 2 else e for e in run]  # the learner left group 4 out
    assert only_violation(reconcile(lacking)) == "group 4: recorded as trained at step 2, but the learner's tensors at that step hold no row of it"
    extra = [step(1, {3: 5, 4: 5, 2: 5}) if e["event"] == "step" and e["step"] == 2 else e for e in run]
    assert only_violation(reconcile(extra)) == "group 2: the learner trained on it at step 2, which the ledger does not record as trained there"
    short = [step(1, {3: 5, 4: 2}) if e["event"] == "step" and e["step"] == 2 else e for e in run]
    assert only_violation(reconcile(short)) == "group 4: step 2: its rollout counted 5 tokens, the learner trained on 2"
    unmoved = [step(1, {3: 5, 4: 5}, updated=False) if e["event"] == "step" and e["step"] == 2 else e for e in run]
    assert messages(reconcile(unmoved)) == [f"group {g}: recorded as trained at step 2, where the learner did not move the policy" for g in (3, 4)]
    unreported = [e for e in run if not (e["event"] == "step" and e["step"] == 2)]
    assert only_violation(reconcile(unreported)) == "step 2: 2 groups recorded as trained, but no learner report for the step"
    twice = run + [step(1, {3: 5, 4: 5})]
    assert only_violation(reconcile(twice)) == f"line {len(twice)}: a second learner report for step 2"
    assert reconcile(without(run, "step")).steps_checked == 0  # a ledger from before learners reported: nothing to compare


def test_a_learner_that_drops_a_groups_rows_fails_the_check(tiny_model_path, tmp_path: Path):
    """The learner's report is read off the tensors it trains on: one that silently loses a group's rows
    says so, and `rlhub check` fails the run, although the controller recorded every group as trained."""
    import torch

    from rlhub.actors.pipeline import step_events
    from rlhub.algorithms.config import AlgorithmConfig
    from rlhub.datastore import GroupMeta
    from rlhub.learner import Learner
    from rlhub.models.build import ModelConfig
    from rlhub.types import GroupTensors, Sample, collate
    from rlhub.weight_sync import probe_sequence

    groups = []
    for gid in range(3):
        samples = [Sample([40, 41 + gid], [50 + k, 51, 52][: 2 + k % 2], [-1.0] * (2 + k % 2), [0] * (2 + k % 2), float(k), None, "stop")
                   for k in range(2)]
        tensors = GroupTensors.from_samples(samples, torch.tensor([1.0, -1.0]), 256)
        tensors.group_ids = torch.full((2,), gid)
        meta = GroupMeta(group_id=gid, prompt_index=gid, actor_id=0, min_version=0, max_version=0, num_samples=2,
                         num_tokens=sum(s.generated for s in samples), reward_mean=0.0, success_mean=0.0, response_len_mean=2.5,
                         generate_seconds=0.0)
        groups.append((meta, tensors))
    batch = collate([t for _, t in groups], 256)

    def run(learner: Learner, name: str) -> Reconciliation:
        metrics = learner.train_step(batch)
        events = [issued(m.group_id) for m, _ in groups] + step_events([(m, None) for m, _ in groups], metrics["learned"], 1, None)
        with Ledger(tmp_path / name / "ledger.jsonl") as ledger:
            ledger.write(events)
        return check_run(tmp_path / name)

    honest = Learner(tiny_model_path, ModelConfig(), AlgorithmConfig(micro_batch_size=2), probe_sequence(259))
    assert run(honest, "honest").ok
    lossy = Learner(tiny_model_path, ModelConfig(), AlgorithmConfig(micro_batch_size=2), probe_sequence(259))
    keep = torch.tensor([i for i, g in enumerate(batch.group_ids.tolist()) if g != 1])
    real_step = lossy.train_step
    lossy.train_step = lambda b: real_step(b.rows(keep, b.input_ids.shape[1]))  # loses group 1's rows on the way in
    rec = run(lossy, "lossy")
    assert not rec.ok and messages(rec) == ["group 1: recorded as trained at step 1, but the learner's tensors at that step hold no row of it"]


def test_step_must_be_version_plus_one():
    bad = {**trained(0), "step": 3}
    assert only_violation(reconcile([issued(0), bad])) == "group 0: trained at version 0 by step 3, not version + 1 (line 2)"


def test_corrupt_lines_are_violations_not_crashes(tmp_path: Path):
    good = [json.dumps(e) for e in (issued(0), trained(0))]
    (tmp_path / "ledger.jsonl").write_text(f'{good[0]}\n{{"event": "trai\n{good[1]}\n[1, 2]\n{{"event": "issued"}}\n{{"event": "requeued", "group": "7", "reason": 1}}\n')
    rec = check_run(tmp_path)
    assert messages(rec) == [
        "line 2: unparseable: '{\"event\": \"trai'",
        "line 4: not a ledger event: [1, 2]",
        "line 5: issued event with missing or mistyped ['group', 'row', 'actor', 'version']",
        "line 6: requeued event with missing or mistyped ['group', 'reason']",
    ]
    assert rec.trained == 1
    assert "NOT reconciled: 4 violations" in format_report(rec)


def test_check_run_without_ledger_names_the_path(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "ledger.jsonl")):
        check_run(tmp_path)


def test_violations_are_capped_but_counted():
    rec = reconcile([issued(0)] * 30 + [trained(0)])
    assert rec.violation_count == 29 and len(rec.violations) == 20
    report = format_report(rec).splitlines()
    assert report[0].endswith("NOT reconciled: 29 violations")
    assert report[-1] == "  ... and 19 more"


def test_write_and_offset_round_trip(tmp_path: Path):
    path = tmp_path / "run" / "ledger.jsonl"
    ledger = Ledger(path)
    assert ledger.offset() == 0
    ledger.write([issued(0), issued(1)])
    assert ledger.offset() == path.stat().st_size
    ledger.write([])
    ledger.write([trained(0)])
    ledger.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [issued(0), issued(1), trained(0)]
    assert Ledger(path).offset() == path.stat().st_size  # reopening appends


def test_truncate_keeps_exactly_the_prefix(tmp_path: Path):
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        ledger.write([issued(0), issued(1)])
        offset = ledger.offset()
        ledger.write([trained(0), trained(1)])
    prefix = path.read_bytes()[:offset]
    truncate(path, offset)
    assert path.read_bytes() == prefix
    truncate(path, 0)
    assert path.read_bytes() == b""
    truncate(tmp_path / "missing.jsonl", 0)  # nothing written before the first checkpoint


def test_truncate_rejects_offsets_past_the_end_or_mid_line(tmp_path: Path):
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        ledger.write([issued(0)])
        size = ledger.offset()
    with pytest.raises(ValueError, match=rf"\({size} bytes\) to offset {size + 5}"):
        truncate(path, size + 5)
    with pytest.raises(ValueError, match=r"\(0 bytes\) to offset 7"):
        truncate(tmp_path / "missing.jsonl", 7)
    with pytest.raises(ValueError, match="not at a line boundary"):
        truncate(path, 3)
    assert path.stat().st_size == size  # refused means untouched


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ([requeued(0, "actor_crash")], "group 0: requeued but never issued (line 1)"),
        ([issued(0), requeued(0, "actor_crash"), trained(0)], "group 0: trained while requeued, before being issued again (line 3)"),
        ([issued(0), dropped(0), trained(0)], "group 0: trained after dropped (line 3)"),
        ([issued(0), dropped(0), dropped(0, "stale")], "group 0: dropped twice (line 3)"),
    ],
)
def test_other_refused_transitions(events: list[dict], expected: str):
    assert messages(reconcile(events, allow_open=True))[0] == expected
