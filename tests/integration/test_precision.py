"""bf16 learns the default task as fp32 does: the learner under bf16 autocast against fp32 (two fp32
seeds give the spread, one bf16 run must fall within it), at the default run's sizes. The engine stays fp32: the tiny MoE's engine in bf16 fails the sync
probe (an error of 2.4 against the 0.5 that bf16 allows; bf16 rounding flips some of its top-2-of-8
routing choices on the probe sequence), which the README states under `rollout.dtype`."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEEDS = (0, 1)
DEFAULT_SIZES = ("prompts_per_step=32", "group_size=8", "warm_start.steps=30", "experiment.total_steps=60")
BF16 = ("learner.precision=bf16",)


def test_bf16_learns_the_default_task_within_the_spread_of_fp32_seeds(ray_local, run_pipeline, tmp_path):
    """60 of the default run's 300 steps (about 20 s of training each; one fp32 run goes from about 0.1
    to 0.5 success). The gain, success of the last tenth of the steps minus the first, of each bf16 run
    must lie within the fp32 runs' range widened by its own width (at least 0.1 each way), and every
    run must learn. The learner-engine log-prob mismatch shows each run's precision: a bf16 learner's
    log-probs differ from the fp32 engine's by more than fp32 rounding, an fp32 learner's do not; the
    sync probe, computed from the fp32 master weights either way, holds to fp32's tolerance in both."""
    gains: dict[tuple[str, int], float] = {}
    for precision in ("fp32", "bf16"):
        for seed in (SEEDS if precision == "fp32" else SEEDS[:1]):  # the fp32 seeds give the spread; one bf16 run must fall in it
            summary, rows = run_pipeline(tmp_path / f"{precision}-{seed}", *DEFAULT_SIZES, f"seed={seed}",
                                         *(BF16 if precision == "bf16" else ()))
            gains[precision, seed] = summary["success_last_tenth"] - summary["success_first_tenth"]
            probe = max(r["sync/probe_error"] for r in rows)
            mismatch = max(r.get("train/logprob_mismatch_max", 0.0) for r in rows)
            assert probe < 1e-4 and ((mismatch > 1e-3) if precision == "bf16" else (mismatch < 1e-3)), (precision, seed, probe, mismatch)
    fp32 = [gains["fp32", s] for s in SEEDS]
    bf16 = [gains["bf16", s] for s in SEEDS[:1]]
    assert min(fp32) > 0.2 and min(bf16) > 0.2, gains  # both learn: the comparison is between runs that do
    width = max(max(fp32) - min(fp32), 0.1)
    assert min(fp32) - width <= min(bf16) and max(bf16) <= max(fp32) + width, gains
