"""Multi-agent matches through the asynchronous pipeline: both built-in games, one shared policy."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("experiment, agents", [("propose_check", ("proposer", "checker")), ("nim", ("first", "second"))])
def test_matches_train_through_the_pipeline_with_figures_per_agent(ray_local, run_pipeline, tmp_path, experiment, agents):
    # the experiment's own turn limit and warm start (Nim's second player moves only after a legal first move); the
    # small batch of the other pipeline tests
    summary, metrics = run_pipeline(tmp_path, f"experiment={experiment}", "prompts_per_step=4", "group_size=4",
                                    "experiment.total_steps=4", "warm_start.steps=30", "eval.every=0", "checkpoint.keep_final=false")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    first, second = agents
    for m in metrics:
        assert m[f"agents/{first}/samples"] > 0 and m[f"agents/{first}/tokens"] > 0
        # every trained token is some agent's: the agents' tokens add up to what the learner trained on
        assert sum(m.get(f"agents/{a}/tokens", 0.0) for a in agents) == m["train/tokens"]
    assert any(m.get(f"agents/{second}/samples", 0) > 0 for m in metrics)  # the second agent got turns too
    assert summary["eval"] is not None and "eval/pass@1" in summary["eval"]  # the first agent's held-out games
    assert sum(v for k, v in metrics[-1].items() if k.startswith("rollout/outcome/")) > 0  # how matches ended, counted
