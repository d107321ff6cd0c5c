"""`rlhub bench budget`: sides parsed from their arguments, one seed per run for every side, sides alternated."""

from __future__ import annotations

import pytest

from rlhub.benches.budget import parse, run


def test_parse_splits_each_sides_overrides_from_the_common_ones():
    tokens, sides, common = parse(["tokens=5000", "grpo:algorithm=grpo", "env=countdown", "spo:algorithm=spo",
                                   "spo:algorithm.spo.interval=1"])
    assert tokens == 5000 and common == ["env=countdown"]
    assert sides == {"grpo": ["algorithm=grpo"], "spo": ["algorithm=spo", "algorithm.spo.interval=1"]}
    assert list(sides) == ["grpo", "spo"]


@pytest.mark.parametrize("args, named", [
    (["grpo:algorithm=grpo", "spo:algorithm=spo"], "tokens=N"),
    (["tokens=x", "a:seed=1", "b:seed=2"], "not an integer"),
    (["tokens=10", "a:algorithm=grpo"], "at least two sides"),
    (["tokens=10", "a:algorithm=grpo", "b:algorithm=spo", "seed=3"], "the benchmark's"),
    (["tokens=10", "grpo"], "side:key=value"),
])
def test_bad_arguments_are_named(args, named):
    with pytest.raises(ValueError, match=named):
        parse(args)


def test_each_run_is_one_seed_for_every_side_and_the_order_alternates():
    calls = []

    def fake(overrides):
        calls.append(overrides)
        acc = 0.5 if "algorithm=spo" in overrides else 0.25
        return {"held_out": {"pass@1": acc}, "steps": 10 if "algorithm=spo" in overrides else 40, "wall_s": 20.0,
                "generated_tokens": 1000, "trained_tokens": 1.0, "success_last_tenth": acc}

    even = run(["tokens=1000", "grpo:algorithm=grpo", "spo:algorithm=spo"], run_index=0, side_runner=fake)
    odd = run(["tokens=1000", "grpo:algorithm=grpo", "spo:algorithm=spo"], run_index=1, side_runner=fake)
    assert even["order"] == ["grpo", "spo"] and odd["order"] == ["spo", "grpo"]
    assert [c[0] for c in calls] == ["algorithm=grpo", "algorithm=spo", "algorithm=spo", "algorithm=grpo"]
    seeds = [next(o for o in c if o.startswith("seed=")) for c in calls]
    assert seeds[0] == seeds[1] and seeds[2] == seeds[3] and seeds[0] != seeds[2]
    assert all("experiment.max_generated_tokens=1000" in c for c in calls)
    assert list(odd["sides"]) == ["grpo", "spo"]  # rows in one order, whichever ran first
    assert even["vs_first"]["spo_vs_grpo"] == {"pass@1_minus": 0.25, "wall_s": 1.0, "steps": 0.25}


def test_each_comparison_is_its_own_report_entry_with_every_sides_figures():
    from rlhub.benches import latest
    from rlhub.benches.report import render

    def record(sides, acc):
        result = {"tokens": 1000, "sides": {s: {"held_out": {"pass@1": acc[i]}, "steps": 10 + i, "generated_tokens": 1000 + i,
                                               "wall_s": 30.0, "success_last_tenth": 0.5} for i, s in enumerate(sides)},
                  "vs_first": {f"{sides[1]}_vs_{sides[0]}": {"pass@1_minus": acc[1] - acc[0], "wall_s": 1.0, "steps": 1.1}},
                  "overrides": {"common": ["env=countdown"], **{s: [f"algorithm={s}"] for s in sides}},
                  "spread": {f"sides/{sides[1]}/held_out/pass@1": [0.1, 0.4]},
                  "repeat": {"quiet_runs": 3, "runs": []}}
        return {"bench": "budget", "command": "rlhub bench budget ...", "result": result}

    other_task = record(["uniform", "difficulty"], [0.1, 0.2])
    other_task["result"]["overrides"]["common"] = ["env=reasoning_gym"]
    records = latest([record(["grpo", "spo"], [0.2, 0.1]), record(["uniform", "difficulty"], [0.3, 0.35]),
                      record(["grpo", "spo"], [0.25, 0.3]), other_task])
    assert set(k for k in records if k.startswith("budget:")) == {"budget:grpo,spo@countdown", "budget:uniform,difficulty@countdown",
                                                                  "budget:uniform,difficulty@reasoning_gym"}
    text = render(records)
    assert "### budget:grpo,spo@countdown: grpo against spo at one generation budget (countdown)" in text
    assert "| spo (`algorithm=spo`) | 0.300 [0.100–0.400] |" in text  # the newest record of that comparison
    assert "| spo_vs_grpo | 0.050 |" in text
    assert "### budget:uniform,difficulty@countdown" in text and "### budget:uniform,difficulty@reasoning_gym" in text
