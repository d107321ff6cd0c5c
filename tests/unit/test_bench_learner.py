"""`rlhub bench learner --quick`: every side trains on two local gloo ranks; the figures and their README table.

One quick run (a tiny workload, one repeat, every side in one group of two processes) is shared by the
tests: it takes about 15 s on two cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhub.benches import learner as bench
from rlhub.benches.report import MISSING, render


@pytest.fixture(scope="module")
def result(tiny_model_path) -> dict:
    return bench.run(["--quick", "--repeats", "1"])


def test_every_case_and_side_is_measured(result):
    assert set(result["cases"]) == set(bench.CASES)
    assert set(result["sides"]) == set(bench.SIDES)
    assert result["quick"] is True and result["repeats"] == 1 and result["own_processes_per_side"] is False
    for name, side in result["sides"].items():
        assert side["ranks"] == bench.SIDES[name].ranks
        assert side["tokens_per_s"]["median"] > 0 and side["step_s"]["median"] > 0
        assert len(side["rss_mib"]) == side["ranks"] and all(m["median"] > 0 for m in side["rss_mib"])
        assert ("pairs_max_over_mean" in side) == (side["expert_parallel"] > 1)
    for case in result["cases"].values():
        assert case["tokens_per_s_ratio"] > 0
    json.dumps(result)  # the record is JSON


def test_every_side_reports_where_its_step_goes(result):
    for name, side in result["sides"].items():
        phases = side["phases_s"]
        assert phases["forward"]["median"] > 0 and phases["backward"]["median"] > 0
        assert sum(p["median"] for p in phases.values()) <= side["step_s"]["median"] * 1.01  # parts of the step, not more
    lora = result["sides"]["bf16_lora"]
    assert lora["precision"] == "bf16" and lora["lora_rank"] == 16 and result["cases"]["lora_bf16"]["sides"] == ["1_rank", "bf16_lora"]


def test_llep_holds_the_skewed_router_to_its_capacity_and_standard_ep_does_not(result):
    standard, llep = result["sides"]["ep_skewed"], result["sides"]["llep_skewed"]
    assert standard["pairs_max_over_mean"]["min"] > bench.CAPACITY  # the router favours rank 0's experts
    assert standard["over_llep_bound"]["max"] > 1.0 and standard["steps_over_llep_bound"] > 0
    assert llep["over_llep_bound"]["max"] <= 1.0 and llep["steps_over_llep_bound"] == 0
    assert llep["standard_pairs_max_over_mean"]["min"] > bench.CAPACITY  # what standard EP would have given it
    assert llep["weights_moved"] > 0 and standard["weights_moved"] == 0


def test_grouped_routing_gives_every_rank_the_same_pairs_in_every_step(result):
    grouped, topk = result["sides"]["ep_grouped"], result["sides"]["ep"]
    assert grouped["steps_all_equal"] == grouped["ep_steps"] > 0
    assert grouped["pairs_max_over_mean"]["max"] == 1.0
    assert topk["steps_all_equal"] < topk["ep_steps"] and topk["pairs_max_over_mean"]["max"] > 1.0  # top-k alone does not


def test_llep_bound_adds_one_pair_per_layer_call_to_the_capacity():
    step = {"pairs_max": 600.0, "pairs_max_over_mean": 1.2}  # 2 ranks, mean 500: 1000 pairs
    assert bench.llep_bound(step, 2, 8) == pytest.approx(bench.CAPACITY + 8 * 2 / 1000)


def test_scaling_counts_the_models_parameters_and_the_measured_positions(result, tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    sc = result["scaling"]
    assert sc["params"] == sum(p.numel() for p in model.parameters())
    assert sc["param_bytes"] == 4 * sc["params"]
    step = sc["per_step"]
    assert step["fsdp_bytes"] == pytest.approx(sc["rounds_per_step_2_ranks"] * 4 * sc["param_bytes"])
    assert step["ep_all_to_all_bytes"] == pytest.approx(sc["positions_per_step"] * sc["top_k"] * sc["hidden"] * 4 * 2 * sc["moe_layers"] * 3)
    # EP moves the experts out of FSDP; a rank of 8 sends 7/8 of every sharded collective
    two, eight = sc["per_rank"]["2"], sc["per_rank"]["8"]
    assert two["fsdp_sent_bytes"] == pytest.approx(step["fsdp_bytes"] / 2) and step["fsdp_bytes_with_ep"] < step["fsdp_bytes"]
    assert eight["expert_parallel"] == 8 and eight["fsdp_sent_bytes"] == pytest.approx(eight["rounds"] * 4 * 7 / 8 * sc["param_bytes"])


def test_the_report_renders_the_record(result):
    text = render({"learner": {"bench": "learner", "command": "rlhub bench learner --quick", "commit": "abc1234", "result": result}})
    section = text[text.index("### learner:"):text.index("### learner_smollm2")]
    assert "`rlhub bench learner --quick` at commit `abc1234`" in section and MISSING not in section
    assert "`--quick`: a tiny workload, 1 repeat(s)" in section
    assert "| llep | ep_skewed → llep_skewed |" in section
    assert "| ep_grouped | 2 | 2 (standard) | grouped |" in section


@pytest.mark.parametrize("args, message", [(["--repeats", "1"], "at least 3 repeats"), (["--model", "gpt"], "invalid choice"),
                                           (["--steps", "0", "--quick"], "--steps 0"), (["--fast"], "unrecognized")])
def test_bad_arguments_are_one_line_errors(args, message):
    with pytest.raises(ValueError, match=message):
        bench.parse_args(args)


def test_quick_is_the_only_way_to_a_single_repeat():
    assert bench.parse_args(["--quick", "--repeats", "1"]).repeats == 1
    assert bench.parse_args([]).repeats == 3 and bench.parse_args([]).model == "tiny_moe"


def test_the_skewed_copy_is_built_once_beside_the_model(tmp_path, tiny_model_path):
    import shutil

    base = tmp_path / "tiny"
    shutil.copytree(tiny_model_path, base)
    out = bench.skewed_model(base, 2)
    assert out == tmp_path / "tiny-skew2" and (out / "config.json").is_file()
    mtime = (out / "config.json").stat().st_mtime_ns
    assert bench.skewed_model(base, 2) == out and (out / "config.json").stat().st_mtime_ns == mtime
    assert not list(Path(tmp_path).glob("*.tmp*"))


def test_the_smollm2_record_does_not_hide_the_tiny_models():
    from rlhub.benches import latest

    tiny = {"bench": "learner", "result": {"model": "tiny_moe"}}
    smol = {"bench": "learner", "result": {"model": "smollm2_moe"}}
    newer_tiny = {"bench": "learner", "result": {"model": "tiny_moe", "repeats": 5}}
    assert latest([tiny, smol, newer_tiny]) == {"learner": newer_tiny, "learner_smollm2": smol}
