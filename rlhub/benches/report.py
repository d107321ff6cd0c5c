"""`rlhub bench report`: the README's performance section, from the newest record of each benchmark.

Reads the results file that `rlhub bench NAME` appends to (`rlhub.benches.read_results`),
renders a table of the targets (the measured figure and whether it meets the target, computed
from the numbers), then one table per benchmark with the command that reproduces it and its
commit, and puts them between the README's `<!-- bench:start -->` and `<!-- bench:end -->`
lines. The peer benchmark's success curves are drawn to `success_vs_wallclock.png` beside the
results file and embedded. `--check` writes nothing and exits 1 when the README is out of date.

Records come from benchmarks written separately, so every renderer reads them defensively: a
missing figure shows as "—", a benchmark without a record as "not measured yet".
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rlhub.benches import latest, read_results, results_path

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"
PLOT_NAME = "success_vs_wallclock.png"
MISSING = "not measured yet"


# ---- formatting --------------------------------------------------------------------------

def num(x: Any, digits: int = 2) -> str:
    """A number for a table: thousands separated, `digits` decimals; "—" when absent or not a number."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x):
        return "—"
    if math.isinf(x):
        return "∞"
    return f"{x:,.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _ms(seconds: Any) -> str:
    return num(seconds * 1e3, 3) if isinstance(seconds, (int, float)) else "—"


def fig(result: dict[str, Any], path: str, digits: int = 2, scale: float = 1.0) -> str:
    """The number at `path` (keys joined by "/") of a result, with its [min–max] over the runs where
    they differed (`rlhub.benches.repeat` records them under "spread")."""
    value: Any = result
    for key in path.split("/"):
        if isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]  # a row of a table
        else:
            value = value.get(key) if isinstance(value, dict) else None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return num(value, digits)
    text = num(value * scale, digits)
    lo_hi = (result.get("spread") or {}).get(path)
    if isinstance(lo_hi, list) and len(lo_hi) == 2:
        text += f" [{num(lo_hi[0] * scale, digits)}–{num(lo_hi[1] * scale, digits)}]"
    return text


MIN_RUNS = 3
"""Quiet runs a figure needs to be quoted as one (a median of at least three)."""


def quiet_runs(result: dict[str, Any] | None) -> int | None:
    """How many quiet runs a result is the median of; None for a record from before runs were repeated."""
    repeat = (result or {}).get("repeat")
    return int(repeat.get("quiet_runs", 0)) if isinstance(repeat, dict) else None


def runs_text(result: dict[str, Any]) -> str:
    """One line on how the numbers were taken: runs, loads, alternation."""
    repeat = result.get("repeat")
    if not isinstance(repeat, dict):
        return ("One invocation, recorded before whole benchmark runs were repeated: its figures are not medians of quiet runs, "
                "and the load it ran under was not recorded.")
    runs = [r for r in repeat.get("runs") or [] if isinstance(r, dict)]
    loads = ", ".join(num(r.get("load_before")) + (" (busy, left out)" if r.get("busy") else "") for r in runs)
    quiet = quiet_runs(result) or 0
    head = (f"One quiet run of {len(runs)}" if quiet == 1 else
            f"Median of {quiet} quiet runs of {len(runs)}, [min–max] beside each figure where the runs differ")
    text = (f"{head}; 1-minute load average before each run: {loads} (quiet: at most {num(repeat.get('max_load'))})"
            + ("; sides alternated from run to run." if repeat.get("alternated") and len(runs) > 1 else "."))
    if quiet < MIN_RUNS:
        text += f" Fewer than {MIN_RUNS} quiet runs: not a figure to quote."
    return text


# ---- targets -----------------------------------------------------------------------------

@dataclass
class Verdict:
    target: str
    measured: str
    met: bool | None  # None: nothing to judge (not measured)

    def row(self) -> list[str]:
        if self.met is None:
            return [self.target, self.measured, MISSING if self.measured == MISSING else "—"]
        return [self.target, self.measured, "met" if self.met else "not met"]


def _result(records: dict[str, dict], name: str) -> dict[str, Any] | None:
    record = records.get(name)
    return record.get("result") if isinstance(record, dict) else None


def _configs(peer: dict[str, Any], bound: str) -> dict[str, dict]:
    return {name: c for name, c in (peer.get("configs") or {}).items() if isinstance(c, dict) and c.get("bound") == bound}


def _time_to_ratios(config: dict[str, Any]) -> dict[str, float]:
    """TRL's time over rlhub's to each success threshold that rlhub reached (infinite if TRL never did)."""
    out = {}
    given = config.get("time_to_ratio") or {}
    for threshold, rlhub_s in ((config.get("rlhub") or {}).get("time_to") or {}).items():
        trl_s = ((config.get("trl") or {}).get("time_to") or {}).get(threshold)
        if given.get(threshold) is not None:
            out[threshold] = float(given[threshold])
        elif rlhub_s is not None and trl_s is None:
            out[threshold] = math.inf
        elif rlhub_s is None and trl_s is not None:
            out[threshold] = 0.0  # TRL got there and rlhub did not
    return out


def _at_least(name: str, values: dict[str, float], minimum: float, none_text: str) -> Verdict:
    """Met when every labelled value is at least `minimum`."""
    if not values:
        return Verdict(name, none_text, None)
    return Verdict(name, ", ".join(f"{num(v)} ({label})" for label, v in values.items()), all(v >= minimum for v in values.values()))


def peer_targets(peer: dict[str, Any] | None) -> list[Verdict]:
    names = ("generation-bound peer: rlhub / TRL samples/s ≥ 3", "generation-bound peer: TRL / rlhub time to success ≥ 2",
             "overhead-bound peer: rlhub / TRL samples/s ≥ 1")
    if peer is None:
        return [Verdict(n, MISSING, None) for n in names]

    def samples_ratios(bound: str) -> dict[str, float]:
        return {c: cfg["samples_per_s_ratio"] for c, cfg in _configs(peer, bound).items() if isinstance(cfg.get("samples_per_s_ratio"), (int, float))}

    times = {f"{c}, to {t}": r for c, cfg in _configs(peer, "generation").items() for t, r in _time_to_ratios(cfg).items()}
    return [_at_least(names[0], samples_ratios("generation"), 3.0, "no generation-bound config measured"),
            _at_least(names[1], times, 2.0, "no success threshold reached"),
            _at_least(names[2], samples_ratios("overhead"), 1.0, "no overhead-bound config measured")]


def engine_targets(engine: dict[str, Any] | None) -> list[Verdict]:
    """`vllm_inside_over_standalone` holds, per batch, standalone vLLM's tokens/s over rlhub's vllm
    engine's (as `rlhub.benches.engine.inside_over_standalone` computes it, whatever the key says)."""
    name = "vLLM inside rlhub within 1.25x of standalone (standalone / inside tokens/s ≤ 1.25, admission batch)"
    ratios = (engine or {}).get("vllm_inside_over_standalone") or {}
    ratios = {int(b): r for b, r in ratios.items() if isinstance(r, (int, float))}
    if not ratios:
        return [Verdict(name, MISSING, None)]
    given = engine.get("admission_batch")
    batch = int(given) if given else max(ratios)
    if batch not in ratios:
        return [Verdict(name, f"batch {batch} not measured", None)]
    which = "" if given else " (the largest measured)"
    return [Verdict(name, f"{num(ratios[batch])} at batch {batch}{which}", ratios[batch] <= 1.25)]


def e2e_targets(e2e: dict[str, Any] | None) -> list[Verdict]:
    out = []
    for name, key, minimum in (("async / sync samples/s ≥ 1.5", "async_over_sync_samples_per_s", 1.5),
                               ("pipeline efficiency ≥ 0.9", "pipeline_efficiency", 0.9)):
        value = (e2e or {}).get(key)
        if not isinstance(value, (int, float)):
            out.append(Verdict(name, MISSING, None))
        else:
            out.append(Verdict(name, num(value), value >= minimum))
    return out


def sync_targets(sync: dict[str, Any] | None) -> list[Verdict]:
    name = "weight sync ≤ 3x a memcpy of the same bytes (hf engine, load_weights)"
    ratios = (sync or {}).get("ratio_to_memcpy") or {}
    load = ratios.get("hf_load")
    if not isinstance(load, (int, float)):
        return [Verdict(name, MISSING, None)]
    checked = ratios.get("hf_load_probe")
    return [Verdict(name, f"{num(load)}x (with the probe check: {num(checked)}x)", load <= 3.0)]


def _shards(n: int) -> str:
    return f"{n} shard" + ("" if n == 1 else "s")


def store_targets(store: dict[str, Any] | None) -> list[Verdict]:
    names = ("store: < 1 ms added per group", "store: throughput grows with shards")
    rows = [r for r in (store or {}).get("rows") or [] if isinstance(r, dict)]
    added = sorted((r["shards"], r["added_ms_per_group"]) for r in rows if isinstance(r.get("added_ms_per_group"), (int, float)))
    if added:
        out = [Verdict(names[0], ", ".join(f"{_shards(s)}: {num(ms, 3)}" for s, ms in added) + " ms", all(ms < 1.0 for _, ms in added))]
    else:
        out = [Verdict(names[0], MISSING, None)]
    rates = sorted((r["shards"], r["groups_per_s"]) for r in rows if isinstance(r.get("groups_per_s"), (int, float)))
    if len(rates) < 2:
        out.append(Verdict(names[1], MISSING if not rates else "one shard count measured", None))
    else:
        grows = all(b > a for (_, a), (_, b) in zip(rates, rates[1:]))
        out.append(Verdict(names[1], ", ".join(f"{_shards(s)}: {num(g, 0)}" for s, g in rates) + " groups/s", grows))
    return out


RECORD_ERRORS = (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError)
"""What reading a record of an unexpected shape raises: reported in the section, never raised."""

TARGETS: tuple[tuple[str, Callable[[dict[str, Any] | None], list[Verdict]]], ...] = (
    ("peer", peer_targets), ("engine", engine_targets), ("e2e", e2e_targets), ("sync", sync_targets), ("store", store_targets))


def targets(records: dict[str, dict]) -> list[Verdict]:
    out: list[Verdict] = []
    for bench, judge in TARGETS:
        try:
            result = _result(records, bench)
            verdicts = judge(result)
            runs = quiet_runs(result)
            if result is not None and (runs is None or runs < MIN_RUNS):  # said beside the figure, which is not one yet
                note = " (one run, not a median)" if runs is None else f" ({runs} quiet run{'s' if runs != 1 else ''}, not a median of {MIN_RUNS})"
                verdicts = [Verdict(v.target, v.measured + note, v.met) if v.met is not None else v for v in verdicts]
            out += verdicts
        except RECORD_ERRORS as e:
            out.append(Verdict(f"{bench}: its targets", f"the newest record could not be read ({type(e).__name__}: {e})", None))
    return out


# ---- one table per benchmark ----------------------------------------------------------------

def render_peer(r: dict[str, Any]) -> list[str]:
    configs = {n: c for n, c in (r.get("configs") or {}).items() if isinstance(c, dict)}
    thresholds = sorted({t for c in configs.values() for side in ("rlhub", "trl") for t in ((c.get(side) or {}).get("time_to") or {})})
    header = ["config", "bound", "TRL samples/s", "rlhub samples/s", "ratio", "TRL step s", "rlhub step s"]
    header += [f"time to {t}: TRL / rlhub s (ratio)" for t in thresholds]
    rows = []
    for name, c in configs.items():
        if c.get("skipped"):
            rows.append([name, str(c.get("bound", "—")), f"skipped: {c['skipped']}"] + ["—"] * (len(header) - 3))
            continue
        at = f"configs/{name}"
        row = [name, str(c.get("bound", "—")), fig(r, f"{at}/trl/samples_per_s", 1), fig(r, f"{at}/rlhub/samples_per_s", 1),
               fig(r, f"{at}/samples_per_s_ratio"), fig(r, f"{at}/trl/step_s", 3), fig(r, f"{at}/rlhub/step_s", 3)]
        for t in thresholds:
            row.append(f"{fig(r, f'{at}/trl/time_to/{t}', 1)} / {fig(r, f'{at}/rlhub/time_to/{t}', 1)} "
                       f"({fig(r, f'{at}/time_to_ratio/{t}')})")
        rows.append(row)
    held = {n: c["held_out"] for n, c in configs.items() if isinstance(c.get("held_out"), dict)}
    if held:
        accuracy = [[n, str(h.get("rows", "—")), fig(r, f"configs/{n}/held_out/before", 3), fig(r, f"configs/{n}/held_out/trl", 3),
                     fig(r, f"configs/{n}/held_out/rlhub", 3), fig(r, f"configs/{n}/trl/total_s", 0), fig(r, f"configs/{n}/rlhub/total_s", 0)]
                    for n, h in held.items()]
        rows_text = table(["config", "held-out rows", "accuracy before", "TRL after", "rlhub after", "TRL side s", "rlhub side s"], accuracy)
    notes = [f"- **{n}**: {c['description']}" for n, c in configs.items() if c.get("description")]
    if held:
        notes = ["Held-out greedy accuracy of each side's final policy (one evaluator), and each side's whole time "
                 "(start-up, training and shutdown):", "", *rows_text, "", *notes]
    return table(header, rows) + ([""] + notes if notes else [])


def render_e2e(r: dict[str, Any]) -> list[str]:
    lines = table(["", "value"], [["generation-only step", f"{fig(r, 'generation_only_step_s', 3)} s"],
                                  ["training-only step", f"{fig(r, 'training_only_step_s', 3)} s"],
                                  ["async / sync samples/s", fig(r, "async_over_sync_samples_per_s")],
                                  ["pipeline efficiency", fig(r, "pipeline_efficiency")]])
    runs = r.get("runs") or {}
    rows = []
    for staleness, run in sorted(runs.items(), key=lambda kv: float(kv[0]) if str(kv[0]).lstrip("-").isdigit() else math.inf):
        run = run if isinstance(run, dict) else {}
        reached = run.get("time_to_success") or {}
        at = f"runs/{staleness}"
        rows.append([str(staleness), fig(r, f"{at}/step_s", 3), fig(r, f"{at}/samples_per_s", 1), fig(r, f"{at}/trained_tokens_per_s", 0),
                     ", ".join(f"{t}: {fig(r, f'{at}/time_to_success/{t}', 1)} s" for t in reached) or "—"])
    if rows:
        lines += [""] + table(["max_staleness", "step s", "samples/s", "trained tokens/s", "time to success"], rows)
    return lines


def render_engine(r: dict[str, Any]) -> list[str]:
    rows = [(i, x) for i, x in enumerate(r.get("rows") or []) if isinstance(x, dict)]
    rows.sort(key=lambda ix: (str(ix[1].get("engine")), str(ix[1].get("threads")), ix[1].get("batch") if isinstance(ix[1].get("batch"), int) else 0))
    lines = [f"Model: {r['model']}.", ""] if r.get("model") else []
    lines += table(["engine", "threads", "batch", "tokens/s"],
                   [[str(x.get("engine", "—")), str(x.get("threads", "—")), str(x.get("batch", "—")), fig(r, f"rows/{i}/tokens_per_s", 0)]
                    for i, x in rows])
    ratios = r.get("vllm_inside_over_standalone") or {}
    if ratios:
        lines += ["", *table(["batch", "standalone vLLM / vLLM inside rlhub, tokens/s"],
                             [[str(b), fig(r, f"vllm_inside_over_standalone/{b}")] for b in ratios])]
    return lines


SYNC_ROWS = (
    ("memcpy_s", "memcpy of the same bytes (one flat buffer)"),
    ("copy_per_tensor_s", "copy_ of each tensor into a preallocated one"),
    ("hf_load_s", "hf engine: load_weights"),
    ("hf_load_probe_s", "hf engine: load + probe check (the worker's per-version sync)"),
    ("state_dict_s", "learner: state_dict()"),
    ("learner_probe_s", "learner: probe log-probs"),
    ("inmemory_push_s", "in-memory weight sync: push"),
    ("version_inmemory_s", "one version in one process: state dict, probe, push, pull, load, probe check"),
    ("ray_push_s", "Ray object store: push"),
    ("ray_pull_s", "Ray object store: pull"),
    ("ray_load_s", "hf engine: load_weights of the state pulled from Ray"),
    ("vllm_load_s", "vLLM engine: load_weights"),
    ("vllm_load_probe_s", "vLLM engine: load + probe check"),
)


def render_sync(r: dict[str, Any]) -> list[str]:
    base = r.get("memcpy_s")
    rows = [[label, _ms(r[key]), num(r[key] / base) if isinstance(base, (int, float)) and base > 0 else "—"]
            for key, label in SYNC_ROWS if isinstance(r.get(key), (int, float))]
    head = (f"Model: {r.get('model', '—')} ({r.get('dtype', '—')}), {num(r.get('bytes', 0) / 1e6)} MB in {r.get('tensors', '—')} tensors; "
            f"median of {r.get('reps', '—')} repetitions.{_load(r)}")
    lines = [head, ""] + table(["", "ms", "x memcpy"], rows)
    if r.get("vllm_skipped"):
        lines += ["", f"vLLM not measured: {r['vllm_skipped']}."]
    elif isinstance(r.get("vllm_load_s"), (int, float)):
        lines += ["", "On a CPU, the vLLM engine's load builds a fresh model object, loads and repacks it, and swaps it in "
                  "(`rlhub.engines.vllm_engine`); on CUDA it reloads in place."]
    return lines


LORA_SIDES = (("hf_merged", "hf engine, adapters merged"), ("vllm_merged", "vLLM, adapters merged (whole-model load)"),
              ("vllm_lora", "vLLM applying the adapters itself (`rollout.vllm_lora=on`)"))


def render_sync_lora(r: dict[str, Any]) -> list[str]:
    lines = [f"Model: {r.get('model', '—')} ({r.get('dtype', '—')}), LoRA rank {r.get('lora_rank', '—')} on "
             f"{', '.join(r.get('lora_targets') or []) or '—'}; a version is {fig(r, 'version_bytes', 1, 1e-6)} MB. Decode: "
             f"{r.get('rows', '—')} rows x {r.get('tokens', '—')} tokens.{_load(r)}", ""]
    def error(side: str) -> str:
        value = r.get(f"{side}_probe_error")
        return f"{value:.1e}" if isinstance(value, (int, float)) else "—"

    rows = [[label, f"{fig(r, f'{side}_load_probe_s', 0, 1e3)} ms", error(side), fig(r, f"{side}_tokens_per_s", 0)]
            for side, label in LORA_SIDES if isinstance(r.get(f"{side}_load_probe_s"), (int, float))]
    lines += table(["engine", "version load + probe", "probe error", "decode tokens/s"], rows)
    for side, label in LORA_SIDES:
        if r.get(f"{side}_skipped"):
            lines += ["", f"{label}: not measured ({r[f'{side}_skipped']})."]
    return lines


def render_store(r: dict[str, Any]) -> list[str]:
    rows = [x for x in r.get("rows") or [] if isinstance(x, dict)]
    lines = [f"{r.get('store', 'ray')} store, {r.get('bytes_per_group', '—')} bytes per group.{_load(r)}", ""]
    lines += table(["shards", "groups/s", "raw Ray groups/s", "store ms/group", "raw ms/group", "added ms/group"],
                   [[str(x.get("shards", "—")), num(x.get("groups_per_s"), 0), num(x.get("raw_groups_per_s"), 0),
                     num(x.get("store_ms_per_group"), 3), num(x.get("raw_ms_per_group"), 3), num(x.get("added_ms_per_group"), 3)] for x in rows])
    for key in ("latency_includes", "note"):
        if r.get(key):
            lines += ["", f"{key.replace('_', ' ').capitalize()}: {r[key]}"]
    return lines


def render_scale(r: dict[str, Any]) -> list[str]:
    rows = [x for x in r.get("rows") or [] if isinstance(x, dict)]
    lines = [f"Model: {r['model']}.", ""] if r.get("model") else []
    return lines + table(["actors", "nodes", "samples/s", "model samples/s"],
                         [[str(x.get("actors", "—")), str(x.get("nodes", "—")), num(x.get("samples_per_s"), 1), num(x.get("model_samples_per_s"), 1)]
                          for x in rows])


def _spread(s: Any, digits: int = 0, scale: float = 1.0) -> str:
    """A median with its [min, max], from a {"median", "min", "max"} dict."""
    if not isinstance(s, dict):
        return "—"
    median, low, high = (num(s.get(k, math.nan) * scale, digits) for k in ("median", "min", "max"))
    return f"{median} [{low}, {high}]"


def _mb(x: Any) -> str:
    return num(x / 1e6, 2) if isinstance(x, (int, float)) else "—"


def render_learner(r: dict[str, Any]) -> list[str]:
    work = r.get("workload") or {}
    repeats = r.get("repeats", "—")
    head = (f"Model: {r.get('model', '—')} on {r.get('device', '—')}, {r.get('torch_threads_per_rank', '—')} torch thread per rank; "
            f"{work.get('groups', '—')} groups x {work.get('group_size', '—')} samples per step, micro-batches of "
            f"{work.get('micro_batch_size', '—')}, {work.get('warmup', '—')} warm-up + {work.get('steps', '—')} timed steps; "
            f"median of {repeats} repeats [min, max], sides in turn; routing replay "
            f"{'on' if r.get('routing_replay') else 'off'}; LLEP capacity {num(r.get('ep_capacity'))}.{_load(r)}")
    lines = [head]
    if r.get("quick"):
        quick = (f"`--quick`: a tiny workload, {repeats} repeat(s), the sides sharing processes (peak memory not per side): "
                 "a check that the benchmark runs, not figures to quote.")
        lines += ["", quick]
    sides = {n: s for n, s in (r.get("sides") or {}).items() if isinstance(s, dict)}
    rows = []
    for name, s in sides.items():
        ep = s.get("expert_parallel", 1)
        memory = ", ".join(_spread(m) for m in s.get("rss_mib") or [])
        if s.get("cuda_mib"):
            memory += " (CUDA: " + ", ".join(_spread(m) for m in s["cuda_mib"]) + ")"
        rows.append([name, str(s.get("ranks", "—")), f"{ep} ({s.get('ep_balance', '—')})" if ep > 1 else "—", str(s.get("router", "—")),
                     _spread(s.get("tokens_per_s")), _spread(s.get("step_s"), 1, 1e3), memory,
                     _spread(s.get("pairs_max_over_mean"), 2), _spread(s.get("standard_pairs_max_over_mean"), 2),
                     _spread(s.get("over_llep_bound"), 2), num(s.get("weights_moved"), 0)])
    lines += ["", *table(["side", "ranks", "EP", "router", "tokens/s", "step ms", "peak RSS MiB per rank", "pairs per rank max/mean",
                          "under standard EP", "/ LLEP bound", "expert weights moved"], rows)]
    phased = {n: s["phases_s"] for n, s in sides.items() if s.get("phases_s")}
    if phased:
        names = [p for p in ("forward", "backward", "optimizer", "routing_pass", "measure", "idle") if any(p in v for v in phased.values())]
        lines += ["", "Where a step goes (the learner's own clock, `time/learner/<phase>_s`), ms per step:", "",
                  *table(["side", "precision", "LoRA rank", *names],
                         [[n, str(sides[n].get("precision", "fp32")), str(sides[n].get("lora_rank", 0) or "—"),
                           *[_spread(v.get(p), 0, 1e3) for p in names]] for n, v in phased.items()])]
    cases = {n: c for n, c in (r.get("cases") or {}).items() if isinstance(c, dict)}
    if cases:
        lines += ["", *table(["case", "sides (a → b)", "tokens/s b / a", "step time b / a"],
                             [[n, " → ".join(c.get("sides") or []), num(c.get("tokens_per_s_ratio")), num(c.get("step_s_ratio"))]
                              for n, c in cases.items()])]
    return lines + _learner_scaling(r.get("scaling") or {})


def _learner_scaling(sc: dict[str, Any]) -> list[str]:
    """The bytes between ranks that the learner benchmark computes: per step at 2 ranks, and per rank at N."""
    if not sc:
        return []
    step = sc.get("per_step") or {}
    model = (f"Bytes between ranks per step (computed): {num(sc.get('params'), 0)} parameters ({num(sc.get('expert_params'), 0)} "
             f"in experts), {_mb(sc.get('param_bytes'))} MB; {num(sc.get('completion_tokens_per_step'), 0)} completion tokens and "
             f"{num(sc.get('positions_per_step'), 0)} positions per step.")
    collectives = (f"At 2 ranks, {num(sc.get('rounds_per_step_2_ranks'), 1)} micro-batch rounds per step, each "
                   f"{sc.get('all_gathers_per_round', '—')} all-gathers and {sc.get('reduce_scatters_per_round', '—')} reduce-scatter "
                   f"of the sharded parameters, and {sc.get('all_to_all_passes', '—')} all-to-all passes under EP: "
                   f"FSDP {_mb(step.get('fsdp_bytes'))} MB; with EP, FSDP {_mb(step.get('fsdp_bytes_with_ep'))} MB and "
                   f"all-to-all {_mb(step.get('ep_all_to_all_bytes'))} MB (payloads, all ranks). Sent by one rank of N, "
                   "the same global batch:")
    per_rank = sc.get("per_rank") or {}
    rows = [[n, str(x.get("expert_parallel", "—")), num(x.get("rounds"), 1), _mb(x.get("fsdp_sent_bytes")),
             _mb(x.get("fsdp_sent_bytes_with_ep")), _mb(x.get("all_to_all_sent_bytes"))]
            for n, x in per_rank.items() if isinstance(x, dict)]
    return ["", model, collectives, "",
            *table(["N ranks", "EP", "rounds", "FSDP MB", "with EP: FSDP MB", "with EP: all-to-all MB"], rows)]


def render_train(r: dict[str, Any]) -> list[str]:
    held = r.get("held_out") or {}
    versions = sorted(held, key=lambda v: int(v) if str(v).isdigit() else 0)
    rows = [["experiment", f"`{r.get('experiment', '—')}` ({' '.join(r.get('overrides') or [])})"],
            ["steps", str(r.get("steps", "—"))],
            ["wall-clock, command to return (start-up and evaluations included)", f"{fig(r, 'wall_s', 0)} s"],
            ["median step", f"{fig(r, 'step_s')} s"],
            ["learner: forward / backward / optimizer (median per step)",
             " / ".join(fig(r, f"learner_phases_s/{p}") for p in ("forward", "backward", "optimizer")) + " s"],
            ["generation per step (median)", f"{fig(r, 'generate_s')} s"],
            ["held-out greedy accuracy by version", ", ".join(f"{v}: {fig(r, f'held_out/{v}', 3)}" for v in versions) or "—"],
            ["training success, first / last tenth of the steps", f"{fig(r, 'success_first_tenth')} / {fig(r, 'success_last_tenth')}"],
            ["peak memory: learner / rollout / driver process",
             " / ".join(fig(r, f"peak_rss_mb/{p}", 0) for p in ("learner", "rollout", "driver")) + " MB"],
            ["sent to the engines per version", f"{fig(r, 'sync_bytes', 1, 1e-6)} MB"]]
    return table(["", "value"], rows)


def render_budget(r: dict[str, Any]) -> list[str]:
    sides = list(r.get("sides") or {})
    common = " ".join((r.get("overrides") or {}).get("common") or [])
    lines = [f"Every side stops at {num(r.get('tokens'), 0)} generated tokens" + (f"; common overrides `{common}`" if common else "") + ".", ""]
    rows = []
    for name in sides:
        own = " ".join((r.get("overrides") or {}).get(name) or [])
        rows.append([f"{name} (`{own}`)", fig(r, f"sides/{name}/held_out/pass@1", 3), fig(r, f"sides/{name}/held_out/reward_mean", 3),
                     fig(r, f"sides/{name}/steps", 0), fig(r, f"sides/{name}/generated_tokens", 0),
                     fig(r, f"sides/{name}/wall_s", 0), fig(r, f"sides/{name}/success_last_tenth", 3)])
    lines += table(["side", "held-out pass@1", "held-out mean reward (sampled)", "steps", "generated tokens", "wall s",
                    "training success, last tenth"], rows)
    versus = r.get("vs_first") or {}
    if versus:
        lines += ["", *table(["", "pass@1 difference", "wall time ratio", "steps ratio"],
                             [[k, fig(r, f"vs_first/{k}/pass@1_minus", 3), fig(r, f"vs_first/{k}/wall_s"), fig(r, f"vs_first/{k}/steps")]
                              for k in versus])]
    return lines


BENCHES: dict[str, tuple[str, Callable[[dict[str, Any]], list[str]]]] = {
    "peer": ("rlhub against TRL's GRPOTrainer", render_peer),
    "peer_smollm2": ("the SmolLM2 MoE, LoRA and bf16, against TRL with peft (`rlhub bench peer configs=smollm2_moe`)", render_peer),
    "e2e": ("the pipeline, synchronous and asynchronous", render_e2e),
    "engine": ("generation engines", render_engine),
    "sync": ("weight sync", render_sync),
    "sync_lora": ("a LoRA version into each engine (`rlhub bench sync model.source=smollm2 model.lora.rank=16`)", render_sync_lora),
    "store": ("data store", render_store),
    "scale": ("rollout actors and nodes", render_scale),
    "learner": ("the learner alone: ranks, expert parallelism, LLEP, grouped routing", render_learner),
    "learner_smollm2": ("the learner alone on the SmolLM2 MoE (`rlhub bench learner --model smollm2_moe`)", render_learner),
    "train": ("a whole training run (`rlhub bench train`, default `experiment=smollm2_moe_lora`)", render_train),
    "learner_smollm2_lora": ("the SmolLM2 MoE learner: fp32 against bf16 LoRA, and bf16 LoRA with the shared prefix "
                             "(`rlhub bench learner --model smollm2_moe --cases lora_bf16,shared_prefix`)", render_learner),
}


def _load(r: dict[str, Any]) -> str:
    """The machine's 1-minute load average around the run, when the benchmark recorded it."""
    load = r.get("load_average")
    return f" Load average {num(load[0])} before, {num(load[-1])} after." if isinstance(load, list) and load else ""


COMMANDS = {"learner_smollm2": "learner --model smollm2_moe", "peer_smollm2": "peer configs=smollm2_moe",
            "sync_lora": "sync model.source=smollm2 model.lora.rank=16",
            "learner_smollm2_lora": "learner --model smollm2_moe --cases lora_bf16,shared_prefix"}
"""The command behind a report entry whose name is not the benchmark's."""


def render_bench(name: str, record: dict[str, Any] | None, plot: str | None = None) -> list[str]:
    sides, _, task = name.removeprefix("budget:").partition("@")
    title, render = BENCHES[name] if not name.startswith("budget:") else (
        f"{' against '.join(sides.split(','))} at one generation budget" + (f" ({task})" if task else ""), render_budget)
    lines = [f"### {name}: {title}", ""]
    if record is None:
        return lines + [f"{MISSING} (`rlhub bench {COMMANDS.get(name, name)}`)."]
    machine = record.get("machine") or {}
    lines += [f"`{record.get('command', 'rlhub bench ' + name)}` at commit `{record.get('commit', '?')}`, "
              f"{record.get('time', '?')}, {machine.get('cpus', '?')} CPUs" + (", CUDA" if machine.get("cuda") else "") + ".", ""]
    try:
        result = record.get("result") or {}
        lines += [runs_text(result), ""] + render(result)
    except RECORD_ERRORS as e:
        lines += [f"The newest record could not be rendered ({type(e).__name__}: {e})."]
    if plot:
        lines += ["", f"![rolling success against wall-clock seconds, rlhub and TRL]({plot})"]
    return lines


def render(records: dict[str, dict], plot: str | None = None) -> str:
    """The section between the markers (without them): the targets, then one part per benchmark."""
    lines = ["_Written by `rlhub bench report` from the newest record of each benchmark; do not edit by hand._", "",
             "### Targets", "", *table(["target", "measured", "verdict"], [v.row() for v in targets(records)])]
    for name in BENCHES:
        lines += [""] + render_bench(name, records.get(name), plot if name == "peer" else None)
    for name in sorted(k for k in records if k.startswith("budget:")):  # `rlhub bench budget`, one part per comparison
        lines += [""] + render_bench(name, records[name])
    return "\n".join(lines)


def replace_section(readme: str, section: str) -> str:
    """The README with everything between the marker lines replaced by `section`."""
    lines = readme.split("\n")
    if START not in lines or END not in lines or lines.index(START) > lines.index(END):
        raise ValueError(f"the README has no {START} line followed by an {END} line: add them where the section goes")
    start, end = lines.index(START), lines.index(END)
    return "\n".join(lines[: start + 1] + ["", section, ""] + lines[end:])


# ---- the picture -----------------------------------------------------------------------------

def plot_peer(peer: dict[str, Any], path: Path) -> Path | None:
    """Rolling success against wall-clock seconds, rlhub and TRL on the same axes, one panel per config;
    None when no config carries a curve."""
    configs = {n: c for n, c in (peer.get("configs") or {}).items()
               if isinstance(c, dict) and any((c.get(side) or {}).get("curve") for side in ("rlhub", "trl"))}
    if not configs:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(configs), figsize=(5.0 * len(configs), 3.8), squeeze=False)
    for ax, (name, c) in zip(axes[0], configs.items()):
        for side, label in (("rlhub", "rlhub"), ("trl", "TRL")):
            curve = [p for p in (c.get(side) or {}).get("curve") or [] if isinstance(p, (list, tuple)) and len(p) == 2]
            if curve:
                ax.plot([p[0] for p in curve], [p[1] for p in curve], label=label)
        ax.set_title(name)
        ax.set_xlabel("wall-clock s")
        ax.set_ylabel("rolling success")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_link(peer: dict[str, Any] | None, png: Path, readme: Path) -> str | None:
    """The picture's path as the README links it, when the peer record has curves to draw."""
    has_curves = any(isinstance(c, dict) and any((c.get(s) or {}).get("curve") for s in ("rlhub", "trl"))
                     for c in ((peer or {}).get("configs") or {}).values())
    return Path(os.path.relpath(png.resolve(), readme.resolve().parent)).as_posix() if has_curves else None


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlhub bench report", description="write the README's performance section from the results file")
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--results", type=Path, default=None, help="default: bench/results.jsonl or $RLHUB_BENCH_RESULTS")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the README is out of date")
    a = parser.parse_args(args)
    results = a.results or results_path()
    records = latest(read_results(results))
    png = results.parent / PLOT_NAME
    peer = _result(records, "peer")
    text = a.readme.read_text()
    try:
        updated = replace_section(text, render(records, _plot_link(peer, png, a.readme)))
    except ValueError as e:
        print(f"rlhub bench report: {a.readme}: {e}", file=sys.stderr)
        return 2
    if a.check:
        if updated != text:
            print(f"{a.readme} is out of date with {results}: run `rlhub bench report`", file=sys.stderr)
            return 1
        print(f"{a.readme} is up to date with {results}")
        return 0
    if peer is not None:
        plot_peer(peer, png)
    if updated != text:
        a.readme.write_text(updated)
    print(f"wrote the performance section of {a.readme} from {len(records)} benchmarks in {results}")
    return 0
