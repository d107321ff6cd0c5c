"""The fault-injection harness's own logic (`rlhub.faults`): picking a target, measuring a recovery from a
run's records, and the README's table made from the fault tests' records."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from rlhub.faults import Fault, pick, read_records, recovery, table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_a_target_is_a_role_or_a_kind_and_a_missing_one_is_named():
    found = {"driver": {"pid": 1}, "rollout actor 0": {"pid": 2}, "rollout actor 1": {"pid": 3}, "policy a learner rank 0": {"pid": 4},
             "store shard 10": {"pid": 5}}
    assert pick(found, "rollout actor 1", random.Random(0)) == ("rollout actor 1", 3)
    assert {pick(found, "rollout actor", random.Random(s))[0] for s in range(20)} == {"rollout actor 0", "rollout actor 1"}
    assert pick(found, "learner rank", random.Random(0)) == ("policy a learner rank 0", 4)
    with pytest.raises(ValueError):  # a kind is whole words: "store shard 1" is not "store shard 10"
        pick(found, "store shard 1", random.Random(0))
    with pytest.raises(ValueError, match="no process 'critic' in this run; it has: driver, policy a learner rank 0, rollout"):
        pick(found, "critic", random.Random(0))


def test_recovery_counts_from_the_fault_and_skips_steps_recorded_before_the_recovery_ended(tmp_path):
    rows = [(1, 100.0), (2, 101.0), (3, 102.5),  # step 3 was on its way when the learner died at 102.0
            (2, 110.0), (3, 110.5), (4, 111.0)]  # redone after the recovery that ended at 109.0
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "time/unix": t}) + "\n" for s, t in rows))
    fault = Fault("learner rank 0", 42, "kill", 2, 102.0)
    recoveries = [{"at": 90.0, "done": 95.0, "lost": "store shard 0 died"},
                  {"at": 102.3, "done": 109.0, "lost": "learner rank 0 of 1 (node n, pid 42) died: ..."}]
    out = recovery(tmp_path, fault, recoveries)
    assert (out["detected_s"], out["resumed_s"], out["caught_up_s"]) == pytest.approx((0.3, 8.0, 8.5))
    # a rollout actor's loss causes no recovery: the next step counts, and the learner's later recovery is not its
    plain = recovery(tmp_path, Fault("rollout actor 0", 7, "kill", 2, 102.0), recoveries)
    assert (plain["detected_s"], plain["resumed_s"], plain["caught_up_s"]) == (None, pytest.approx(0.5), pytest.approx(0.5))


def test_the_readme_table_of_faults_is_made_from_the_committed_records():
    records = read_records()
    assert len(records) >= 10, "bench/faults.jsonl: RLHUB_FAULT_RECORDS=bench/faults.jsonl pytest tests/integration/test_faults.py"
    lines = table(records)
    text = README.read_text()
    start = text.index(lines[0])
    assert text[start:].split("\n\n")[0].splitlines() == lines  # `rlhub fault table` writes it
