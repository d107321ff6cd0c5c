"""`rlhub bench engine`: token counting, timing, the rows it returns and the vLLM ratio."""

import time

import pytest
import torch

from rlhub.benches import engine as bench

NO_PIN = ["rollout.pin_cores=false"]  # the bench pins a rollout actor's core; a test process keeps its own


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cfg_and_path(tiny_model_path):
    from rlhub.config import load_config

    return load_config(NO_PIN), tiny_model_path


def test_rlhub_engine_counts_the_tokens_of_its_completions_and_is_called_as_the_worker(cfg_and_path, tokenizer, keep_threads):
    cfg, path = cfg_and_path
    runner = bench.RlhubEngine(cfg, path, "hf", torch.get_num_threads())
    calls = []
    generate = runner.engine.generate

    def spy(prompts, sampling, weight_source, max_tokens):
        calls.append((sampling, max_tokens))
        out = generate(prompts, sampling, weight_source, max_tokens)
        calls.append(out)
        return out

    runner.engine.generate = spy
    prompts = bench.bench_prompts(cfg, tokenizer, 2)
    tokens = runner.generate(prompts, 4)
    (sampling, max_tokens), completions = calls
    assert tokens == sum(len(c.token_ids) for c in completions) > 0
    assert all(1 <= len(c.token_ids) <= 4 for c in completions)
    assert max_tokens == [4, 4] and sampling.max_new_tokens == 4
    assert sampling.stop_token_ids == (tokenizer.eos_token_id,) and sampling.temperature == 1.0
    assert all(c.routed_experts is not None for c in completions)  # routing recorded, as in a run


def test_prompts_are_the_worker_prompts_in_groups(cfg_and_path, tokenizer):
    cfg, _ = cfg_and_path
    from rlhub.envs.registry import build_env
    from rlhub.episodes import ChatFormat

    prompts = bench.bench_prompts(cfg, tokenizer, 20)
    assert len(prompts) == 20
    firsts = [prompts[0], prompts[8], prompts[16]]
    assert all(prompts[i] == firsts[i // 8] for i in range(20))
    assert len({tuple(p) for p in firsts}) == 3
    env = build_env(cfg.env, cfg.seed)
    from rlhub.datastore import prompt_index

    row = env.dataset("train")[prompt_index(0, len(env.dataset("train")), cfg.seed)]
    assert prompts[0] == ChatFormat(tokenizer).prompt(env.reset(row)[0])[0]


def test_generated_lengths_stop_at_the_first_eos():
    pad, eos = 256, 258
    rows = [[5, 6, eos, pad, pad], [5, 6, 7, 8, 9], [eos, pad, pad, pad, pad], [1, eos, 2, eos, pad]]
    assert bench.generated_lengths(rows, eos) == [3, 5, 1, 2]
    assert bench.generated_lengths(rows, None) == [5, 5, 5, 5]


def test_time_calls_warms_up_then_takes_the_median_call():
    produced = iter([10**6, 10, 1000, 100])  # the first call is the warm-up

    def generate(prompts, max_new_tokens):
        time.sleep(0.01)
        return next(produced)

    row = bench.time_calls(generate, [[1]], 4, reps=3)
    assert row["tokens"] == 100
    assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds"])
    with pytest.raises(StopIteration):
        next(produced)


def test_ratio_is_standalone_over_inside_at_the_same_threads():
    rows = [
        {"engine": "vllm", "threads": 1, "batch": 16, "tokens_per_s": 100.0},
        {"engine": "vllm", "threads": 1, "batch": 64, "tokens_per_s": 400.0},
        {"engine": "vllm_standalone", "threads": 1, "batch": 16, "tokens_per_s": 150.0},
        {"engine": "vllm_standalone", "threads": 2, "batch": 16, "tokens_per_s": 900.0},
        {"engine": "vllm_standalone", "threads": 2, "batch": 64, "tokens_per_s": 900.0},
        {"engine": "hf", "threads": 1, "batch": 64, "tokens_per_s": 50.0},
    ]
    assert bench.inside_over_standalone(rows, 1) == {"16": 1.5}


def test_parse_args_splits_bench_options_from_config_overrides():
    opts, overrides = bench.parse_args(["batches=1,2", "reps=1", "engines=hf,vllm", "model.source=smollm2", "threads=2"])
    assert opts == bench.Options(batches=(1, 2), reps=1, threads=(2,), engines=("hf", "vllm"))
    assert overrides == ["model.source=smollm2"]
    with pytest.raises(ValueError, match="vlm"):
        bench.parse_args(["engines=hf,vlm"])


def test_run_returns_a_row_per_engine_and_batch(tiny_model_path, keep_threads):
    args = ["engines=hf,transformers_generate", "batches=1,3", "max_new_tokens=2", "reps=1", f"model.path={tiny_model_path}",
            *NO_PIN]
    result = bench.run(args, measure_one=bench.measure)  # in this process: no child per engine
    assert sorted((r["engine"], r["batch"]) for r in result["rows"]) == [
        ("hf", 1), ("hf", 3), ("transformers_generate", 1), ("transformers_generate", 3)]
    assert all(0 < r["tokens"] <= 2 * r["batch"] and r["tokens_per_s"] > 0 for r in result["rows"])
    assert set(result["call_overhead_ms"]) == {"hf", "transformers_generate"}
    assert result["max_new_tokens"] == 2 and result["vllm_inside_over_standalone"] == {} and "skipped" not in result


def test_vllm_rows_are_skipped_with_a_reason_when_vllm_is_missing_or_broken(tiny_model_path, monkeypatch):
    args = [f"model.path={tiny_model_path}", *NO_PIN]
    measured = []

    def fake(engine, threads, opts, overrides):
        measured.append((engine, threads))
        if engine == "vllm_standalone":
            raise ImportError("libcudart.so.12: cannot open shared object file")
        return {"rows": [{"engine": engine, "threads": threads, "batch": b, "tokens_per_s": 1.0, "tokens": 1, "seconds": 1.0}
                         for b in opts.batches], "call_overhead_ms": 1.0}

    result = bench.run(["batches=4", "threads=1,2", *args], measure_one=fake)
    # after the first failure, standalone vLLM's other thread counts are not tried
    assert measured == [("hf", 1), ("vllm", 1), ("vllm_standalone", 1), ("transformers_generate", 1)]
    assert "libcudart" in result["skipped"]["vllm_standalone"]
    assert {r["engine"] for r in result["rows"]} == {"hf", "vllm", "transformers_generate"}

    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    measured.clear()
    result = bench.run(["batches=4", *args], measure_one=fake)
    assert set(result["skipped"]) == {"vllm", "vllm_standalone"}
    assert [e for e, _ in measured] == ["hf", "transformers_generate"]
