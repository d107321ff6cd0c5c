"""Benchmark figures that reproduce (rlhub.benches.repeat): quiet runs, medians with their range, alternated sides."""

from __future__ import annotations

import pytest

from rlhub.benches import repeat
from rlhub.benches.repeat import RepeatOptions, combine, repeated, split_args, wait_quiet


def test_split_args_takes_the_repeat_flags_and_leaves_the_benchmarks_own():
    opts, rest = split_args("peer", ["configs=overhead", "--runs", "5", "--max-load=0.7", "rlhub.x=1", "--settle-s", "10"])
    assert (opts.runs, opts.max_load, opts.settle_s) == (5, 0.7, 10.0)
    assert rest == ["configs=overhead", "rlhub.x=1"]
    assert split_args("peer", [])[0].runs == 3 and split_args("sync", [])[0].runs == 1  # comparisons of sides: three by default
    with pytest.raises(ValueError, match="--runs"):
        split_args("peer", ["--runs", "two"])
    with pytest.raises(ValueError, match="--runs=0"):
        split_args("peer", ["--runs=0"])
    with pytest.raises(ValueError, match="--max-load needs a value"):
        split_args("peer", ["--max-load"])


def test_wait_quiet_waits_for_the_load_to_fall_and_marks_a_machine_that_stays_busy():
    loads, slept = iter([2.4, 1.6, 0.9, 0.5]), []
    state = wait_quiet(1.0, 60, load=lambda: next(loads), sleep=slept.append)
    assert state == {"load_before": 0.9, "waited_s": 2 * repeat.POLL_S, "busy": False}
    slept.clear()
    state = wait_quiet(1.0, 12, load=lambda: 2.0, sleep=slept.append)
    assert state["busy"] and sum(slept) == 12 and state["load_before"] == 2.0


def test_combine_takes_medians_records_ranges_and_keeps_what_is_not_a_number():
    runs = [{"a": 1.0, "b": {"c": 10, "text": "x"}, "rows": [{"v": 3.0}, {"v": 1.0}], "t": None, "u": 4.0},
            {"a": 5.0, "b": {"c": 10, "text": "y"}, "rows": [{"v": 1.0}, {"v": 1.0}], "t": 7.0, "u": None},
            {"a": 2.0, "b": {"c": 10, "text": "z"}, "rows": [{"v": 2.0}, {"v": 1.0}], "t": None, "u": 6.0}]
    out, spread = combine(runs)
    assert out["a"] == 2.0 and spread["a"] == [1.0, 5.0]
    assert out["b"] == {"c": 10, "text": "x"} and "b/c" not in spread  # equal in every run: no range
    assert [r["v"] for r in out["rows"]] == [2.0, 1.0] and spread["rows/0/v"] == [1.0, 3.0]
    assert out["t"] is None  # reached in one run of three: not a median
    assert out["u"] == 5.0 and spread["u"] == [4.0, 6.0]  # reached in two of three: the median of those
    out, _ = combine([{"rows": [1, 2]}, {"rows": [1, 2, 3]}])
    assert out["rows"] == [1, 2]  # lists that differ in length: the first run's


def test_repeated_leaves_busy_runs_out_of_the_figures_and_alternates_the_sides():
    calls, loads = [], iter([0.3, 3.0, 0.4, 0.2])

    def bench(args, run_index=0):
        calls.append((list(args), run_index))
        return {"samples_per_s": [10.0, 1000.0, 12.0, 11.0][run_index], "first": ["trl", "rlhub"][run_index % 2]}

    def quiet(max_load, settle_s):
        load = next(loads)
        return {"load_before": load, "waited_s": 0.0, "busy": load > max_load}

    out = repeated(bench, ["x=1"], RepeatOptions(4, 1.0, 0.0), quiet=quiet)
    assert calls == [(["x=1"], 0), (["x=1"], 1), (["x=1"], 2), (["x=1"], 3)]
    assert out["samples_per_s"] == 11.0 and out["spread"]["samples_per_s"] == [10.0, 12.0]  # 1000 ran on a busy machine
    meta = out["repeat"]
    assert meta["quiet_runs"] == 3 and [r["busy"] for r in meta["runs"]] == [False, True, False, False]
    assert [r["load_before"] for r in meta["runs"]] == [0.3, 3.0, 0.4, 0.2] and meta["alternated"]


def test_repeated_with_every_run_busy_says_so_instead_of_giving_a_figure():
    out = repeated(lambda args: {"x": 1.0}, [], RepeatOptions(2, 1.0, 0.0), quiet=lambda m, s: {"load_before": 5.0, "busy": True})
    assert out["x"] == 1.0 and out["repeat"]["quiet_runs"] == 0 and "not a figure" in out["repeat"]["note"]
    assert not out["repeat"]["alternated"]


def test_peer_alternates_which_side_runs_first():
    from rlhub.benches.peer import side_order

    assert [side_order(i)[0] for i in range(4)] == ["trl", "rlhub", "trl", "rlhub"]
    assert all(sorted(side_order(i)) == ["rlhub", "trl"] for i in range(2))


def test_engine_bench_runs_its_engines_in_reverse_in_odd_runs_and_returns_rows_in_one_order(tiny_model_path):
    from rlhub.benches import engine

    measured = []

    def fake(name, threads, opts, overrides):
        measured.append(name)
        return {"rows": [{"engine": name, "threads": threads, "batch": 4, "tokens_per_s": 1.0}], "call_overhead_ms": 1.0}

    args = ["engines=hf,transformers_generate", "batches=4", f"model.path={tiny_model_path}"]
    even = engine.run(args, measure_one=fake, run_index=0)
    assert measured == ["hf", "transformers_generate"]
    measured.clear()
    odd = engine.run(args, measure_one=fake, run_index=1)
    assert measured == ["transformers_generate", "hf"]
    assert [r["engine"] for r in odd["rows"]] == [r["engine"] for r in even["rows"]]


def test_the_report_shows_each_figures_range_and_how_many_quiet_runs_it_is_the_median_of():
    from rlhub.benches.report import fig, runs_text, targets

    result = {"pipeline_efficiency": 0.95, "async_over_sync_samples_per_s": 1.6, "spread": {"pipeline_efficiency": [0.9, 0.97]},
              "repeat": {"quiet_runs": 2, "max_load": 1.0, "alternated": True,
                         "runs": [{"load_before": 0.3}, {"load_before": 2.5, "busy": True}, {"load_before": 0.4}]}}
    assert fig(result, "pipeline_efficiency") == "0.95 [0.90–0.97]" and fig(result, "async_over_sync_samples_per_s") == "1.60"
    rows = {"rows": [{"tokens_per_s": 10.0}, {"tokens_per_s": 20.0}], "spread": {"rows/1/tokens_per_s": [18.0, 25.0]}}
    assert fig(rows, "rows/1/tokens_per_s", 0) == "20 [18–25]" and fig(rows, "rows/0/tokens_per_s", 0) == "10"
    assert fig(rows, "rows/2/tokens_per_s") == "—"
    text = runs_text(result)
    assert "Median of 2 quiet runs of 3" in text and "2.50 (busy, left out)" in text and "not a figure to quote" in text
    verdicts = targets({"e2e": {"result": result}})
    e2e = [v for v in verdicts if v.target.startswith("pipeline efficiency")][0]
    assert e2e.met and "2 quiet runs, not a median of 3" in e2e.measured
    result["repeat"]["quiet_runs"] = 3
    e2e = [v for v in targets({"e2e": {"result": result}}) if v.target.startswith("pipeline efficiency")][0]
    assert e2e.measured == "0.95"
    assert "not medians of quiet runs" in runs_text({"pipeline_efficiency": 0.9})


def test_bench_train_reads_a_runs_figures_off_its_metrics_and_summary():
    from rlhub.benches.report import render_train
    from rlhub.benches.train import summarize

    rows = []
    for step in range(1, 21):
        row = {"time/step_s": float(step), "time/generate_s": 2.0, "time/train_s": 3.0, "rollout/success_rate": step / 20,
               "time/learner/forward_s": 1.0, "time/learner/backward_s": 1.5, "time/learner/optimizer_s": 0.1,
               "mem/learner_peak_rss_mb": 1000.0 + step, "mem/rollout_peak_rss_mb": 800.0, "sync/bytes": 7_600_000}
        if step in (1, 11):
            row.update({"eval/version": float(step - 1), "eval/pass@1": 0.4 if step == 1 else 0.7})
        rows.append(row)
    summary = {"status": "ok", "eval": {"eval/version": 20.0, "eval/pass@1": 0.9}}
    out = summarize(rows, summary, wall_s=250.0)
    assert out["steps"] == 20 and out["step_s"] == 10.5 and out["loop_s"] == 210.0 and out["wall_s"] == 250.0
    assert out["held_out"] == {"0": 0.4, "10": 0.7, "20": 0.9}
    assert out["success_first_tenth"] == pytest.approx((1 + 2) / 40) and out["success_last_tenth"] == pytest.approx((19 + 20) / 40)
    assert out["peak_rss_mb"] == {"learner": 1020.0, "rollout": 800.0} and out["learner_phases_s"]["backward"] == 1.5
    text = "\n".join(render_train({**out, "experiment": "smollm2_moe_lora", "spread": {"step_s": [9.0, 12.0]}}))
    assert "10.50 [9.00–12.00] s" in text and "0: 0.400, 10: 0.700, 20: 0.900" in text and "7.6 MB" in text


def test_the_smollm2_peer_record_is_its_own_entry_with_each_sides_held_out_accuracy():
    from rlhub.benches import latest
    from rlhub.benches.report import render_peer

    tiny = {"bench": "peer", "result": {"configs": {"overhead": {}, "generation": {}}}}
    smol = {"bench": "peer", "result": {"configs": {"smollm2_moe": {
        "bound": "generation", "trl": {"samples_per_s": 1.0, "total_s": 900.0}, "rlhub": {"samples_per_s": 6.0, "total_s": 270.0},
        "samples_per_s_ratio": 6.0, "held_out": {"rows": 80, "before": 0.425, "trl": 0.61, "rlhub": 0.9}}},
        "spread": {"configs/smollm2_moe/held_out/rlhub": [0.86, 0.9]}}}
    entries = latest([tiny, smol])
    assert entries["peer"] is tiny and entries["peer_smollm2"] is smol  # the tiny configs' comparison stays
    text = "\n".join(render_peer(smol["result"]))
    assert "| smollm2_moe | 80 | 0.425 | 0.610 | 0.900 [0.860–0.900] | 900 | 270 |" in text
