"""Fault injection against real runs: each kind of process killed by its pid while the run trains
(`rlhub.faults`). Every run must finish (the driver's: resume) with its ledger reconciled, no group
lost and none trained twice. With RLHUB_FAULT_RECORDS=FILE each test appends its measured record
there; the README's table of faults is made from those records (`rlhub.faults.table`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhub.faults import Fault, inject, recovery
from rlhub.ledger import check_run, format_report
from rlhub.tracking import read_rows

pytestmark = pytest.mark.integration

SMALL = ["prompts_per_step=4", "group_size=4", "rollout.max_new_tokens=4", "warm_start.steps=10", "wandb.mode=disabled",
         "progress=false", "eval.final=false"]


def start(run_dir: Path, *overrides: str, log: str = "train.err") -> subprocess.Popen:
    args = [sys.executable, "-m", "rlhub.cli", "train", *SMALL, f"run_dir={run_dir}", *overrides]
    path = run_dir.parent / f"{run_dir.name}.{log}"
    with open(path, "w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "RAY_ADDRESS": ""})
    proc.err_path = path  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, run_dir: Path, timeout_s: float = 600) -> tuple[dict, str]:
    """(summary, stderr) of a run that must end well: exit 0, every group accounted for."""
    code = proc.wait(timeout=timeout_s)
    err = proc.err_path.read_text()  # type: ignore[attr-defined]
    assert code == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    ledger = check_run(run_dir)
    assert ledger.ok and ledger.open == 0, format_report(ledger)
    assert summary["status"] == "ok", summary
    steps = [r["step"] for r in read_rows(run_dir / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1)), steps  # each step once, redone ones included
    return summary, err


def record(fault: Fault, run_dir: Path, kind: str, response: str, summary: dict) -> dict:
    """The measured record of one fault (appended to $RLHUB_FAULT_RECORDS when set)."""
    ledger = check_run(run_dir)
    out = {**recovery(run_dir, fault), "fault": kind, "response": response, "recoveries": len(summary.get("recoveries", [])),
           "ledger": f"reconciled: {ledger.issued} issued, {ledger.trained} trained, 0 lost, 0 twice"}
    assert out["resumed_s"] is not None and out["caught_up_s"] is not None, out  # it trained again, and past where it was hit
    if os.environ.get("RLHUB_FAULT_RECORDS"):
        with open(os.environ["RLHUB_FAULT_RECORDS"], "a") as f:
            f.write(json.dumps(out) + "\n")
    print(json.dumps(out))
    return out


RESTORES = "restores the last checkpoint in the same run, starts every actor again, re-issues what was queued or in flight"


@pytest.mark.parametrize("target,overrides", [
    ("learner rank 0", ()),
    ("store shard", ("datastore.num_shards=2",)),
    ("store coordinator", ()),
    ("weight registry", ()),
])
def test_a_lost_learner_or_store_is_recovered_from_the_last_checkpoint(tmp_path, target, overrides):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = start(run_dir, "experiment.total_steps=8", "checkpoint.every=2", *overrides)
    fault = inject(run_dir, target, 3, alive=lambda: proc.poll() is None, timeout_s=300)
    summary, err = finish(proc, run_dir)
    [recovered] = summary["recoveries"]
    at, restored = recovered["at_step"], recovered["restored"]
    assert at >= 3 and restored % 2 == 0 and at - 2 <= restored <= at, recovered  # the newest checkpoint written before the loss
    assert target.split()[0] in recovered["lost"], recovered
    assert "recovered in" in err and f"restoring step_{restored:06d}" in err
    ledger = check_run(run_dir)
    assert (ledger.rollbacks, ledger.redone_steps) == (1, at - restored)  # the ledger shows the redone steps
    assert summary["failures"]["recoveries"] == 1
    record(fault, run_dir, f"{target} killed", RESTORES, summary)
