"""The store and sync benchmarks' own logic, and `rlhub bench report`, without Ray or a model."""

import copy
import json
from pathlib import Path

import pytest
import torch

from rlhub.benches import record
from rlhub.benches.report import END, MISSING, PLOT_NAME, START, main, render, targets
from rlhub.benches.store import LearnerSide, LocalStore, Producer, StoreBenchOptions, parse_options
from rlhub.benches.store import run as store_run
from rlhub.benches.sync import flat_buffers, memcpy_times, state_bytes


# ---- results as the benchmarks write them ---------------------------------------------------

def peer_result(gen_ratio: float = 3.5, time_ratio: float | None = 2.5, over_ratio: float = 1.2) -> dict:
    def side(samples_per_s: float, reached: float | None) -> dict:
        return {"samples_per_s": samples_per_s, "step_s": 1.0, "curve": [[0.0, 0.1], [10.0, 0.4], [20.0, 0.8]],
                "time_to": {"0.5": reached, "0.7": None}}

    return {"configs": {
        "smollm2": {"description": "SmolLM2, long completions", "trl": side(10.0, 50.0), "rlhub": side(10.0 * gen_ratio, 20.0),
                    "samples_per_s_ratio": gen_ratio, "time_to_ratio": {"0.5": time_ratio, "0.7": None}, "bound": "generation"},
        "tiny": {"description": "tiny MoE, 4 tokens", "trl": side(100.0, 5.0), "rlhub": side(100.0 * over_ratio, 4.0),
                 "samples_per_s_ratio": over_ratio, "time_to_ratio": {"0.5": 1.25, "0.7": None}, "bound": "overhead"},
    }}


def e2e_result(async_over_sync: float = 2.0, efficiency: float = 0.95) -> dict:
    run = {"step_s": 0.4, "samples_per_s": 600.0, "trained_tokens_per_s": 1400.0, "time_to_success": {"0.5": 30.0}}
    return {"config": {}, "generation_only_step_s": 0.18, "training_only_step_s": 0.41, "runs": {k: run for k in ("0", "1", "2", "4")},
            "async_over_sync_samples_per_s": async_over_sync, "pipeline_efficiency": efficiency}


def engine_result(standalone_over_inside: float = 1.1) -> dict:  # the key's value, as rlhub.benches.engine computes it
    return {"model": "tiny_moe", "rows": [{"engine": "vllm", "threads": 1, "batch": 64, "tokens_per_s": 1600.0},
                                          {"engine": "hf", "threads": 1, "batch": 64, "tokens_per_s": 900.0}],
            "vllm_inside_over_standalone": {"64": standalone_over_inside, "8": 2.0}}


def sync_result(load_ratio: float = 2.5) -> dict:
    return {"model": "tiny_moe", "dtype": "float32", "bytes": 4_000_000, "tensors": 25, "reps": 5, "memcpy_s": 0.0002,
            "hf_load_s": 0.0002 * load_ratio, "hf_load_probe_s": 0.01, "ratio_to_memcpy": {"hf_load": load_ratio, "hf_load_probe": 50.0}}


def store_result(added_ms: float = 0.5, rates: tuple = (1000.0, 1500.0, 2000.0)) -> dict:
    rows = [{"shards": s, "groups_per_s": g, "raw_groups_per_s": 3000.0, "store_ms_per_group": 1.0, "raw_ms_per_group": 1.0 - added_ms,
             "added_ms_per_group": added_ms} for s, g in zip((1, 2, 4), rates)]
    return {"store": "ray", "bytes_per_group": 4960, "rows": rows, "note": "a note"}


def records(**results: dict) -> dict:
    return {name: {"bench": name, "command": f"rlhub bench {name}", "commit": "abc1234", "result": r} for name, r in results.items()}


def verdicts(recs: dict) -> dict[str, tuple[str, bool | None]]:
    return {v.target: (v.measured, v.met) for v in targets(recs)}


def verdict_of(recs: dict, fragment: str) -> bool | None:
    found = [met for target, (_, met) in verdicts(recs).items() if fragment in target]
    assert len(found) == 1, (fragment, list(verdicts(recs)))
    return found[0]


# ---- targets follow the numbers --------------------------------------------------------------

@pytest.mark.parametrize("bench, fragment, good, bad", [
    ("peer", "generation-bound peer: rlhub / TRL samples/s", peer_result(gen_ratio=3.2), peer_result(gen_ratio=2.9)),
    ("peer", "time to success", peer_result(time_ratio=2.1), peer_result(time_ratio=1.9)),
    ("peer", "overhead-bound", peer_result(over_ratio=1.01), peer_result(over_ratio=0.99)),
    ("engine", "vLLM inside rlhub", engine_result(1.25), engine_result(1.26)),  # at the largest batch: 8 is ignored
    ("e2e", "async / sync", e2e_result(async_over_sync=1.5), e2e_result(async_over_sync=1.49)),
    ("e2e", "pipeline efficiency", e2e_result(efficiency=0.9), e2e_result(efficiency=0.89)),
    ("sync", "weight sync", sync_result(3.0), sync_result(3.01)),
    ("store", "added per group", store_result(added_ms=0.99), store_result(added_ms=1.0)),
    ("store", "grows with shards", store_result(rates=(1000.0, 1100.0, 1200.0)), store_result(rates=(1000.0, 1100.0, 1050.0))),
])
def test_each_target_verdict_follows_its_number(bench, fragment, good, bad):
    assert verdict_of(records(**{bench: good}), fragment) is True
    assert verdict_of(records(**{bench: bad}), fragment) is False


def test_time_to_target_counts_a_threshold_only_rlhub_reached_and_skips_one_neither_did():
    peer = peer_result(time_ratio=None)  # rlhub reached 0.5 in 20 s, TRL in 50 s, but no ratio was written
    peer["configs"]["smollm2"]["trl"]["time_to"]["0.5"] = None
    assert verdict_of(records(peer=peer), "time to success") is True
    peer["configs"]["smollm2"]["rlhub"]["time_to"]["0.5"] = None  # neither reached it: nothing to judge
    assert verdict_of(records(peer=peer), "time to success") is None


def test_vllm_target_reads_the_admission_batch_when_the_record_names_it():
    engine = engine_result(1.1)
    assert verdict_of(records(engine=engine), "vLLM inside rlhub") is True
    engine["admission_batch"] = 8  # its ratio is 2.0
    assert verdict_of(records(engine=engine), "vLLM inside rlhub") is False


def test_a_skipped_peer_config_is_shown_and_left_out_of_the_targets():
    peer = peer_result(gen_ratio=2.0)
    peer["configs"]["smollm2"] = {"skipped": "no GGUF file", "bound": "generation"}
    assert "| smollm2 | generation | skipped: no GGUF file | — |" in render(records(peer=peer))
    assert verdict_of(records(peer=peer), "generation-bound peer: rlhub / TRL samples/s") is None


def test_missing_benchmarks_render_not_measured_yet():
    recs = records(sync=sync_result())
    rows = verdicts(recs)
    assert rows[next(t for t in rows if "weight sync" in t)][1] is True
    missing = [t for t, (measured, met) in rows.items() if measured == MISSING]
    assert len(missing) == len(rows) - 1 and all(rows[t][1] is None for t in missing)
    text = render(recs)
    assert f"### store: data store\n\n{MISSING}" in text
    assert f"| store: < 1 ms added per group | {MISSING} | {MISSING} |" in text


def test_render_shows_each_bench_command_commit_and_figures():
    text = render(records(peer=peer_result(), e2e=e2e_result(), engine=engine_result(), sync=sync_result(), store=store_result(),
                          scale={"model": "tiny_moe", "rows": [{"actors": 2, "nodes": 1, "samples_per_s": 812.5, "model_samples_per_s": 900.0}]},
                          learner={"model": "tiny_moe", "sides": {"2_ranks": {"ranks": 2, "tokens_per_s": {"median": 1234.0}}}},
                          learner_smollm2={"model": "smollm2_moe", "sides": {"ep": {"ranks": 2, "tokens_per_s": {"median": 30.0}}}},
                          learner_smollm2_lora={"model": "smollm2_moe", "sides": {"bf16_lora": {
                              "ranks": 1, "tokens_per_s": {"median": 39.0}, "precision": "bf16", "lora_rank": 16,
                              "phases_s": {"forward": {"median": 3.06, "min": 3.0, "max": 3.1}}}}},
                          train={"experiment": "smollm2_moe_lora", "steps": 40, "wall_s": 240.0, "held_out": {"0": 0.425, "40": 0.9}},
                          peer_smollm2={"configs": {"smollm2_moe": {"bound": "generation", "held_out": {"before": 0.4, "trl": 0.5, "rlhub": 0.9}}}},
                          sync_lora=sync_lora_result()))
    for name in ("peer", "e2e", "engine", "sync", "store", "scale", "learner", "learner_smollm2", "learner_smollm2_lora", "train", "peer_smollm2",
                 "sync_lora"):
        assert f"`rlhub bench {name}` at commit `abc1234`" in text
    assert MISSING not in text
    assert "| smollm2 | generation | 10.0 | 35.0 | 3.50 |" in text
    assert "| 2 | 1 | 812.5 | 900.0 |" in text
    assert "| hf engine: load_weights | 0.500 | 2.50 |" in text
    assert "| bf16_lora | bf16 | 16 | 3,060 [3,000, 3,100] |" in text  # the learner's phases, ms per step


def test_a_missing_record_names_the_command_that_makes_it():
    text = render({})
    assert "not measured yet (`rlhub bench learner --model smollm2_moe --cases lora_bf16,shared_prefix`)." in text
    assert "not measured yet (`rlhub bench train`)." in text
    assert "not measured yet (`rlhub bench learner --model smollm2_moe`)." in text


def test_a_malformed_record_is_reported_not_raised():
    text = render(records(store={"rows": [{"added_ms_per_group": 0.5, "groups_per_s": 9.0}]}, e2e={"runs": "none"}))
    assert "| store: its targets | the newest record could not be read (KeyError: 'shards') | — |" in text
    assert "could not be rendered (AttributeError" in text


# ---- the README ---------------------------------------------------------------------------

def write_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# project\n\nintro\n\n{START}\nold section\n{END}\n\n## after\n")
    return readme


def test_report_writes_between_markers_and_check_detects_an_outdated_readme(tmp_path, capsys):
    readme, results = write_readme(tmp_path), tmp_path / "bench" / "results.jsonl"
    record("sync", ["reps=5"], sync_result(2.5), path=results)
    args = ["--readme", str(readme), "--results", str(results)]
    assert main(args + ["--check"]) == 1
    assert "old section" in readme.read_text()  # --check writes nothing
    assert main(args) == 0
    text = readme.read_text()
    assert text.startswith("# project\n\nintro\n\n" + START) and text.endswith(END + "\n\n## after\n")
    assert "old section" not in text and "`rlhub bench sync reps=5`" in text
    assert main(args + ["--check"]) == 0
    record("sync", ["reps=5"], sync_result(3.5), path=results)  # a newer record flips the verdict
    assert main(args + ["--check"]) == 1
    assert main(args) == 0
    assert "| 3.50x (with the probe check: 50.00x) (one run, not a median) | not met |" in readme.read_text()


def test_report_refuses_a_readme_without_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# project\n")
    assert main(["--readme", str(readme), "--results", str(tmp_path / "none.jsonl")]) == 2
    assert readme.read_text() == "# project\n"


def test_report_draws_and_embeds_the_peer_curves(tmp_path):
    readme, results = write_readme(tmp_path), tmp_path / "bench" / "results.jsonl"
    record("peer", [], peer_result(), path=results)
    assert main(["--readme", str(readme), "--results", str(results)]) == 0
    png = results.parent / PLOT_NAME
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"](bench/{PLOT_NAME})" in readme.read_text()


# ---- the sync benchmark's memcpy --------------------------------------------------------------

def test_memcpy_buffers_hold_exactly_the_state_dicts_bytes():
    state = {"w": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "ids": torch.arange(4), "t": torch.randn(4, 6).t()}
    src, dst = flat_buffers(state)
    assert src.numel() == dst.numel() == state_bytes(state) == 15 * 4 + 7 * 2 + 4 * 8 + 24 * 4
    assert torch.equal(src[:60], state["w"].reshape(-1).view(torch.uint8))
    times = memcpy_times(state, reps=3, warmup=1)
    assert times["memcpy_s"] > 0 and times["copy_per_tensor_s"] > 0


# ---- the store benchmark's two sides, with the in-process store -----------------------------------

def test_options_name_a_bad_key_or_value():
    opts = parse_options(["shards=1,4", "batch=8"], StoreBenchOptions())
    assert opts.shards == (1, 4) and opts.batch == 8
    with pytest.raises(ValueError, match="unknown key 'shard'"):
        parse_options(["shard=2"], StoreBenchOptions())
    with pytest.raises(ValueError, match="batch='many'"):
        parse_options(["batch=many"], StoreBenchOptions())


def test_producer_and_learner_side_move_every_group_through_the_store():
    opts = StoreBenchOptions(batch=6, put=4, samples=3, tokens=10)
    store = LocalStore(opts.batch, opts.max_staleness)
    producer = Producer(0, opts)
    producer.connect(store)
    fetched = []
    side = LearnerSide(store, opts.batch, lambda groups: fetched.extend(t for _, t in groups) or [t for _, t in groups])
    for _ in range(3):
        producer.cycle(opts.batch)
        side.step()
    stats = store.stats()
    assert (stats["produced"], stats["consumed"], stats["queued"], stats["in_flight"]) == (18, 18, 0, 0)
    assert side.version == 3 and store.admission.learner_version == 3
    assert len({id(t) for t in fetched[: opts.put]}) == opts.put  # distinct objects in one put: pickle sends each group's bytes
    assert fetched[0].input_ids.shape == (3, 10) and fetched[0].routes.shape == (3, 9, 2, 2)


def test_store_bench_in_memory_reports_rates_and_the_default_groups_bytes():
    result = store_run(["store=memory", "reps=3", "warmup=1"])
    (row,) = result["rows"]
    assert row["groups_per_s"] > 0 and row["store_cycle_ms"] > 0 and row["added_ms_per_group"] == pytest.approx(
        (row["store_cycle_ms"] - row["raw_cycle_ms"]) / 32)
    assert set(row["breakdown_ms"]) == {"admit", "put_many", "get_batch", "fetch", "set_version"}
    # 8 samples x 16 tokens: ids and mask int64 [8, 16]; masks, log-probs, advantages f32 [8, 15];
    # versions int64 [8, 15]; rewards f32 [8]; routes int8 [8, 15, 2 layers, top-2]
    assert result["bytes_per_group"] == 2 * 8 * 16 * 8 + 3 * 8 * 15 * 4 + 8 * 15 * 8 + 8 * 4 + 8 * 15 * 4
    json.dumps(result)  # the record is JSON


def test_store_targets_read_the_rows_a_store_run_writes():
    result = store_run(["store=memory", "reps=2", "warmup=0"])
    measured, met = verdicts(records(store=copy.deepcopy(result)))["store: < 1 ms added per group"]
    assert met is (result["added_ms_per_group_max"] < 1.0) and measured != MISSING


def test_the_readmes_performance_section_is_the_one_the_committed_results_give():
    import rlhub

    root = Path(rlhub.__file__).resolve().parent.parent
    assert main(["--check", "--readme", str(root / "README.md"), "--results", str(root / "bench" / "results.jsonl")]) == 0


def sync_lora_result() -> dict:
    return {"model": "smollm2", "dtype": "float32", "lora_rank": 16, "lora_targets": ["attention", "mlp"], "version_bytes": 9_000_000,
            "rows": 32, "tokens": 32, "hf_merged_load_probe_s": 0.5, "hf_merged_probe_error": 1e-6, "hf_merged_tokens_per_s": 900.0,
            "vllm_merged_load_probe_s": 2.0, "vllm_merged_probe_error": 2e-6, "vllm_merged_tokens_per_s": 1500.0,
            "vllm_lora_skipped": "rollout.vllm_lora=on: has MoE layers"}


def test_a_lora_sync_record_is_its_own_entry_beside_the_full_one_and_renders_each_engine():
    from rlhub.benches import latest

    full = {"bench": "sync", "command": "rlhub bench sync", "commit": "a", "result": sync_result()}
    lora_record = {"bench": "sync", "command": "rlhub bench sync model.lora.rank=16", "commit": "b", "result": sync_lora_result()}
    newest = latest([full, lora_record])
    assert newest["sync"] is full and newest["sync_lora"] is lora_record
    text = render(newest)
    part = text[text.index("### sync_lora"):]
    assert "| vLLM, adapters merged (whole-model load) | 2,000 ms | 2.0e-06 | 1,500 |" in part
    assert "vLLM applying the adapters itself (`rollout.vllm_lora=on`): not measured (rollout.vllm_lora=on: has MoE layers)." in part


def test_sync_bench_under_lora_loads_a_perturbed_adapter_version_and_verifies_it(tiny_model_path):
    from rlhub.benches.sync import run as sync_run

    result = sync_run(["model.lora.rank=4", "vllm=off", "ray=off", "reps=2", "warmup=0"])
    assert result["lora_rank"] == 4 and result["vllm_skipped"] == "vllm=off"
    assert result["hf_merged_rebuilds"] == 0 and result["hf_merged_probe_error"] < 1e-4 and result["hf_merged_tokens_per_s"] > 0
    assert 0 < result["version_bytes"] < 2_000_000  # adapters and routers, not the tiny model's 14 MB
