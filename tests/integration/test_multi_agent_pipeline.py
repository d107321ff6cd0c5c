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


def test_separate_policies_each_train_on_their_own_agents_samples_and_resume(ray_local, run_pipeline, tmp_path):
    """agents.policies=separate: a learner, weights, version and engine per agent. Each policy's learner
    reports the tokens its tensors held; they must be its own agent's tokens as the rollout counted
    them (the ledger reconciles policy by policy, and the per-agent metrics are a second account).
    The two policies start from the same warm start and part ways; a resume restores both."""
    import json

    import torch
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    common = ["experiment=propose_check", "agents.policies=separate", "prompts_per_step=4", "group_size=4", "warm_start.steps=30",
              "eval.every=0", "checkpoint.every=2"]
    summary, metrics = run_pipeline(run_dir, *common, "experiment.total_steps=4")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    events = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    for m in metrics:
        reports = {e["policy"]: e for e in events if e["event"] == "step" and e["step"] == m["step"]}
        assert set(reports) == {"proposer", "checker"}
        for agent in ("proposer", "checker"):
            # what this policy's learner read off its tensors = what the rollout counted for its agent
            learned = sum(t for _, t in reports[agent]["groups"])
            assert learned == m.get(f"agents/{agent}/tokens", 0.0) == m[f"policies/{agent}/train/tokens"]
        assert m["policies/proposer/train/tokens"] > 0
    # the rollout's engine time by agent, since the run began: both policies' engines worked, and it only grows
    assert 0 < metrics[0]["agents/proposer/engine_s"] <= metrics[-1]["agents/proposer/engine_s"]
    assert metrics[-1]["agents/checker/engine_s"] > 0
    trained = [e for e in events if e["event"] == "trained"]
    assert trained and all(set(e["policies"]) <= {"proposer", "checker"} for e in trained)
    assert any("checker" in e["policies"] for e in trained)
    assert sum(s["sync_failures"] for s in summary["rollout"]) == 0
    assert sum(s["syncs"] for s in summary["rollout"]) >= 2 * 4  # both policies' engines took every version

    def weights(step: int, policy: str) -> dict[str, torch.Tensor]:
        return load_file(run_dir / "checkpoints" / f"step_{step:06d}" / "policies" / policy / "policy" / "model.safetensors")

    p2, c2, p4, c4 = weights(2, "proposer"), weights(2, "checker"), weights(4, "proposer"), weights(4, "checker")
    assert p2.keys() == c2.keys()
    assert any(not torch.equal(p2[k], c2[k]) for k in p2)  # the same start, different samples: different weights
    assert any(not torch.equal(p2[k], p4[k]) for k in p2) and any(not torch.equal(c2[k], c4[k]) for k in c2)

    summary, metrics = run_pipeline(run_dir, *common, "experiment.total_steps=5", "resume=true")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    events = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert {e["policy"] for e in events if e["event"] == "step" and e["step"] == 5} == {"proposer", "checker"}
