"""A resume is the same run: killed with `kill -9` right after a checkpoint and resumed, a run at
`max_staleness=0` with one rollout actor logs the metrics, samples the completions and trains the
weights (and optimizer state) of the same run left alone, bit for bit.

What makes it so: the hf engine samples every token with a random number that is a function of
(run seed, group id, sample, position), not of a generator's state, so the resumed actor's fresh
engine draws what the first one drew (`rlhub.rollout.turns.sampling_seed`); the learner restores
weights, optimizer moments and step count, and the expert counts its dead-expert count looks back
over; the store restores the data cursor and restarts the groups in flight at the checkpoint, at
staleness 0 exactly the ones the next step trains on, in the order they were admitted. With the
engine's own generator instead of the seeds, or without the expert counts, steps 4 to 6 differ
(both checked by breaking them).

Driven through `rlhub train` in subprocesses, as test_cluster's kill test is: the killed driver
leaves its Ray behind, which the resumed run stops.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

STEPS, EVERY = 6, 3
RUN = [
    f"experiment.total_steps={STEPS}", f"checkpoint.every={EVERY}", "max_staleness=0",
    "rollout.num_actors=1", "rollout.engine=hf", "seed=11", "prompts_per_step=4", "group_size=4", "rollout.max_new_tokens=4",
    "warm_start.steps=10", "rollout.log_samples=4", "eval.final=false", "wandb.mode=disabled", "progress=false",
]
# snapshots of other processes taken when a step is recorded, which the run's timing decides: wall-clock
# times and rates, memory, the store's queue (the next step's groups may already be in it), the rollout
# actor's last weight load (it may have loaded the next version already)
VOLATILE = ("time/", "perf/", "mem/", "store/", "sync/")


def train(run_dir: Path, *extra: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhub.cli", "train", *RUN, f"run_dir={run_dir}", *extra], check=False,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "RAY_ADDRESS": ""})


def kill_after_checkpoint(run_dir: Path, step: int, timeout: float = 300) -> None:
    """Start the run and kill -9 its driver as soon as checkpoint `step` is in place (no cleanup at all)."""
    driver = subprocess.Popen([sys.executable, "-m", "rlhub.cli", "train", *RUN, f"run_dir={run_dir}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "RAY_ADDRESS": ""})
    target = run_dir / "checkpoints" / f"step_{step:06d}"
    deadline = time.monotonic() + timeout
    while not target.is_dir() and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert target.is_dir(), f"the run did not reach its checkpoint at step {step}"


def learning_rows(path: Path) -> list[dict]:
    from rlhub.tracking import read_rows

    return [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in read_rows(path)]


def trained_groups(run_dir: Path) -> list[tuple[int, list[int]]]:
    """(step, the groups it trained, in the learner's order) from the ledger, as the resume left it."""
    from rlhub.tracking import read_rows

    return [(e["step"], [g for g, _ in e["groups"]]) for e in read_rows(run_dir / "ledger.jsonl") if e["event"] == "step"]


def final_tensors(run_dir: Path) -> dict[str, dict]:
    """The last checkpoint's tensors: the HF policy, and the learner's shards (weights and optimizer state)."""
    from safetensors.torch import load_file

    from rlhub.checkpoint import latest_checkpoint
    from rlhub.parallel.checkpoint import read_full

    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.name == f"step_{STEPS:06d}", ckpt
    policy = {k: v for f in sorted((ckpt / "policy").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    return {"policy": policy, "model": read_full(ckpt, "model"), "optimizer": read_full(ckpt, "optimizer")}


def test_a_killed_and_resumed_run_is_the_uninterrupted_run(tmp_path):
    import torch

    from rlhub.checkpoint import read_state
    from rlhub.ledger import check_run

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    done = train(whole)
    assert done.returncode == 0, done.stderr[-3000:]
    kill_after_checkpoint(broken, EVERY)
    assert read_state(broken / "checkpoints" / f"step_{EVERY:06d}")["version"] == EVERY
    assert not (broken / "checkpoints" / f"step_{STEPS:06d}").exists(), "killed too late: the run had finished"
    resumed = train(broken, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {broken / 'checkpoints' / f'step_{EVERY:06d}'}" in resumed.stderr
    assert check_run(whole).ok and check_run(broken).ok

    a, b = learning_rows(whole / "metrics.jsonl"), learning_rows(broken / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    differ = [f"step {ra['step']} {k}: {ra.get(k)} != {rb.get(k)}" for ra, rb in zip(a, b)
              for k in sorted(ra.keys() | rb.keys()) if ra.get(k) != rb.get(k)]
    assert not differ, f"{len(differ)} values differ:\n" + "\n".join(differ[:20])
    assert len({r["train/loss"] for r in a}) > 1 and any(r["train/grad_norm"] > 0 for r in a)  # it did learn
    assert trained_groups(whole) == trained_groups(broken)
    samples_a, samples_b = learning_rows(whole / "samples.jsonl"), learning_rows(broken / "samples.jsonl")
    assert len(samples_a) == STEPS * 4 * 4 and samples_a == samples_b  # every completion, token by token

    ta, tb = final_tensors(whole), final_tensors(broken)
    for part in ta:
        assert ta[part].keys() == tb[part].keys() and ta[part], part
        differ = [k for k in ta[part] if not torch.equal(ta[part][k], tb[part][k])]
        assert not differ, f"{part}: {len(differ)} tensors differ, first {differ[:3]}"
