"""The scaling model of `rlhub bench scale` against hand computation, and the reading of a run's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhub.benches.scale import (
    Measured,
    StageCosts,
    _placement,
    model_samples_per_s,
    model_step_s,
    parse_args,
    report,
    stage_costs,
    steady_skip,
    throughput,
)
from rlhub.tracking import read_rows

COSTS = StageCosts(learner_s=0.5, generate_s=0.3, samples_per_step=256)


def test_staleness_zero_is_the_serial_sum() -> None:
    assert model_step_s(COSTS, actors=1, max_staleness=0, cores=2) == pytest.approx(0.8)
    assert model_samples_per_s(COSTS, 1, 0, 2) == pytest.approx(256 / 0.8)
    # two actors on two cores split the generation: 0.5 + 0.3 / 2
    assert model_step_s(COSTS, 2, 0, 2) == pytest.approx(0.65)
    # four actors cannot generate faster than two cores allow: 0.5 + 0.3 / 2
    assert model_step_s(COSTS, 4, 0, 2) == pytest.approx(0.65)


def test_staleness_one_without_contention_is_the_bottleneck() -> None:
    assert model_step_s(COSTS, 1, 1, 2) == pytest.approx(0.5)  # learner-bound: max(0.5, 0.3)
    slow_gen = StageCosts(0.5, 1.2, 256)
    assert model_step_s(slow_gen, 1, 1, 2) == pytest.approx(1.2)  # generation-bound
    assert model_step_s(slow_gen, 2, 1, 3) == pytest.approx(0.6)  # 1.2 / 2 actors, each on its own core
    assert model_step_s(slow_gen, 4, 1, 5) == pytest.approx(0.5)  # max(0.5, 1.2 / 4)
    # more staleness hides nothing more once the stages overlap
    assert model_step_s(slow_gen, 2, 4, 3) == model_step_s(slow_gen, 2, 1, 3)
    for t_l in (0.1, 0.5, 2.0):
        for t_g in (0.1, 0.7, 3.0):
            c = StageCosts(t_l, t_g, 64)
            for n in (1, 2, 4, 8):
                assert model_step_s(c, n, 1, n + 1) == pytest.approx(max(t_l, t_g / n))
                assert model_step_s(c, n, 1, n + 3) == pytest.approx(max(t_l, t_g / n))  # spare cores change nothing


def test_contention_when_actors_and_learner_outnumber_the_cores() -> None:
    # 2 actors + learner on 2 cores: each runs at 2/3 speed, the learner-bound step takes 1.5 x 0.5
    assert model_step_s(COSTS, 2, 1, 2) == pytest.approx(0.75)
    assert model_step_s(COSTS, 4, 1, 2) == pytest.approx(1.25)  # 5 processes on 2 cores: 2.5 x 0.5
    slow_gen = StageCosts(0.5, 1.2, 256)
    assert model_step_s(slow_gen, 2, 1, 2) == pytest.approx(0.9)  # 1.5 x max(0.5, 0.6)
    assert model_samples_per_s(slow_gen, 2, 1, 2) == pytest.approx(256 / 0.9)
    # at staleness 0 the learner is idle while the actors generate: only the actors share the cores
    assert model_step_s(slow_gen, 4, 0, 2) == pytest.approx(0.5 + 0.6)


def _row(step: int, step_s: float, generate_s: float = 0.3, train_s: float = 0.4) -> dict[str, float]:
    return {"step": step, "time/step_s": step_s, "time/generate_s": generate_s, "time/train_s": train_s,
            "time/collate_s": 0.05, "time/publish_s": 0.05, "staleness/mean": 0.5}


def test_metrics_are_read_after_the_start_up_steps(tmp_path: Path) -> None:
    rows = [_row(1, 5.0, generate_s=2.0, train_s=3.0), _row(2, 3.0, generate_s=2.0, train_s=3.0)]
    rows += [_row(i, 0.5 if i % 2 else 1.0, generate_s=0.2 if i % 2 else 0.4) for i in range(3, 11)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    read = read_rows(path)
    assert read == rows
    steady = read[steady_skip(len(read)):]
    assert [r["step"] for r in steady] == list(range(3, 11))
    assert throughput(steady, 256) == pytest.approx(256 * 8 / 6.0)  # 4 steps of 0.5 s, 4 of 1.0 s
    costs = stage_costs(steady, 256)
    assert costs.learner_s == pytest.approx(0.5)  # 0.05 + 0.4 + 0.05
    assert costs.generate_s == pytest.approx(0.3)


def test_steady_state_skips_a_tenth_at_least_two() -> None:
    assert steady_skip(30) == 3
    assert steady_skip(6) == 2
    assert steady_skip(3) == 1  # a short run keeps two steps to time
    assert steady_skip(100) == 10


def test_report_rows_follow_the_schema() -> None:
    point = Measured(actors=2, nodes=1, max_staleness=1, prompts=32, samples_per_step=256, rows=[_row(3, 0.8), _row(4, 0.8)])
    rows, predicted = report([point], COSTS, cores=2)
    assert set(rows[0]) >= {"actors", "nodes", "max_staleness", "samples_per_s", "model_samples_per_s", "relative_error"}
    assert rows[0]["samples_per_s"] == pytest.approx(320.0)
    assert rows[0]["model_samples_per_s"] == pytest.approx(256 / 0.75)  # 1.5 x max(0.5, 0.15)
    assert rows[0]["relative_error"] == pytest.approx((256 / 0.75 - 320) / 320)
    assert rows[0]["learner_step_s"] == pytest.approx(0.5)  # the run's own stage times ride along
    assert [(p["actors"], p["cores"]) for p in predicted] == [(1, 2), (2, 3), (4, 5)]
    assert predicted[2]["samples_per_s"] == pytest.approx(512.0)  # learner-bound on 4+1 cores


def test_args_split_into_options_and_overrides() -> None:
    opts, overrides = parse_args(["steps=6", "actors=2,4", "two_node=false", "rollout.engine=vllm"])
    assert opts == {"steps": 6, "actors": [1, 2, 4], "serial": True, "two_node": False}  # 1 actor always: the model's inputs
    assert overrides == ["rollout.engine=vllm"]
    with pytest.raises(ValueError, match="steps=2"):
        parse_args(["steps=2"])


def test_placement_names_each_actors_node() -> None:
    table = {
        "a": {"ActorClassName": "LearnerActor", "Address": {"NodeID": "h"}},
        "b": {"ActorClassName": "RolloutActor", "Address": {"NodeID": "h"}},
        "c": {"ActorClassName": "RolloutActor", "Address": {"NodeID": "w"}},
        "d": {"ActorClassName": "WeightRegistry", "Address": {"NodeID": "w"}},
    }
    assert _placement(table, {"h": "head", "w": "node2"}) == {"head": ["LearnerActor", "RolloutActor"], "node2": ["RolloutActor"]}
