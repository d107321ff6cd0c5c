"""GPU checks: the CUDA vLLM engine and the learner on a GPU. Skipped where there is no CUDA."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_vllm_engine_sync_matches_learner(tiny_model_path):
    pytest.importorskip("vllm")
    from rlhub.engines.base import SamplingConfig
    from rlhub.engines.vllm_engine import VLLMEngine
    from rlhub.models.build import load_policy
    from rlhub.models.logprobs import probe_logprobs
    from rlhub.weight_sync import probe_sequence

    model, _ = load_policy(tiny_model_path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    engine = VLLMEngine(tiny_model_path, gpu_memory_utilization=0.2)
    try:
        engine.load_weights(model.state_dict(), version=1)
        probe = probe_sequence(259)
        err = (engine.prompt_logprobs(probe) - probe_logprobs(model, probe)).abs().max()
        assert err < 1e-3
        outs = engine.generate([[51, 43, 52, 61]] * 4, SamplingConfig(max_new_tokens=4, stop_token_ids=(258,)))
        assert all(c.versions == [1] * len(c.token_ids) for c in outs)
    finally:
        engine.close()


def test_learner_step_on_gpu(tiny_model_path):
    from rlhub.algorithms.config import AlgorithmConfig
    from rlhub.learner import Learner
    from rlhub.models.build import ModelConfig
    from rlhub.types import GroupTensors, Sample
    from rlhub.weight_sync import probe_sequence

    learner = Learner(tiny_model_path, ModelConfig(), AlgorithmConfig(), probe_sequence(259))
    samples = [Sample([51, 43, 52, 61], [55, 258], [-5.0, -5.0], [0, 0], r, None, "stop") for r in (1.0, 0.0)]
    batch = GroupTensors.from_samples(samples, torch.tensor([1.0, -1.0]), 256)
    metrics = learner.train_step(batch)
    assert learner.version == 1 and metrics["train/grad_norm"] > 0


def test_learner_on_gpu_recomputes_the_cpu_engines_sampling_logprobs(tiny_model_path):
    # the behaviour policy crosses devices: the engine samples on the CPU at temperature 0.7 and top-p 0.9,
    # the learner recomputes the same distribution on the GPU, with finite gradients through the nucleus
    from rlhub.algorithms.config import AlgorithmConfig
    from rlhub.engines.base import SamplingConfig
    from rlhub.engines.hf import HFEngine
    from rlhub.learner import Learner
    from rlhub.models.build import ModelConfig
    from rlhub.models.logprobs import SamplingPolicy, token_logprobs
    from rlhub.types import GroupTensors, Sample
    from rlhub.weight_sync import probe_sequence

    policy = SamplingPolicy(0.7, 0.9)
    learner = Learner(tiny_model_path, ModelConfig(), AlgorithmConfig(), probe_sequence(259), policy=policy)
    assert learner.device.type == "cuda"
    engine = HFEngine(tiny_model_path, seed=0)
    prompts = [[51, 43, 52, 61], [49, 61], [55, 43, 55, 43, 55, 61]] * 4
    outs = engine.generate(prompts, SamplingConfig(max_new_tokens=6, temperature=0.7, top_p=0.9, stop_token_ids=(258,), seed=3))
    samples = [Sample(p, c.token_ids, c.logprobs, c.versions, float(i % 2), None, c.finish_reason) for i, (p, c) in enumerate(zip(prompts, outs))]
    batch = GroupTensors.from_samples(samples, torch.linspace(-1, 1, len(samples)), 256).to("cuda")
    logprobs, _, _ = token_logprobs(learner.model, batch.input_ids, batch.attention_mask, policy=policy)
    mask = batch.completion_mask.bool()
    assert (logprobs[mask] - batch.old_logprobs[mask]).abs().max().item() < 1e-4
    metrics = learner.train_step(batch.to("cpu"))
    assert metrics["train/nonfinite_skipped"] == 0.0 and metrics["train/logprob_mismatch_max"] < 1e-4
    assert metrics["train/is_ratio_mean"] == pytest.approx(1.0, abs=1e-4)


def test_continuous_vllm_labels_every_token_with_the_weights_that_sampled_it(tiny_model_path):
    """Sampled at temperature 0.7 and top-p 0.9, completions span a weight swap; v1 changes only the
    final norm (the logits, not any key or value), so the learner at each token's version recomputes
    exactly what the engine sampled from. A token sampled by the old weights but labelled new (async
    scheduling) would be off by far more than the sync tolerance."""
    pytest.importorskip("vllm")
    from rlhub.engines.base import SamplingConfig
    from rlhub.engines.vllm_engine import VLLMEngine
    from rlhub.models.build import load_policy
    from rlhub.models.logprobs import SamplingPolicy, token_logprobs

    v0, _ = load_policy(tiny_model_path)
    v1, _ = load_policy(tiny_model_path)
    with torch.no_grad():
        v1.model.norm.weight.mul_(1.5)
    engine = VLLMEngine(tiny_model_path, gpu_memory_utilization=0.2, continuous=True)
    sampling = SamplingConfig(max_new_tokens=48, temperature=0.7, top_p=0.9)  # no stop token: every request runs on
    prompts = [[51 + i, 43, 52, 61] for i in range(8)]
    try:
        engine.load_weights(v0.state_dict(), version=0)
        for i, p in enumerate(prompts):
            engine.submit(i, p, sampling, 48)
        for _ in range(10):
            engine._step()  # ten decode steps at version 0
        engine.load_weights(v1.state_dict(), version=1)
        out = {}
        while engine.pending():
            out.update(engine.poll())
    finally:
        engine.close()
    policy = SamplingPolicy(0.7, 0.9)
    for i, p in enumerate(prompts):
        c = out[i]
        assert 0 in c.versions and 1 in c.versions
        ids = torch.tensor([p + c.token_ids], device="cuda")
        versions = torch.tensor(c.versions)
        engine_lp = torch.tensor(c.logprobs)
        for version, model in ((0, v0), (1, v1)):
            with torch.no_grad():
                lp, _, _ = token_logprobs(model.cuda().eval(), ids, torch.ones_like(ids), policy=policy)
            learner_lp = lp[0, len(p) - 1:].float().cpu()
            at = versions == version
            assert (learner_lp[at] - engine_lp[at]).abs().max() < 1e-3, (i, version)


def test_cuda_vllm_serves_moe_adapters_and_routers_itself(tiny_model_path):
    """`rollout.vllm_lora=on` on the MoE: attention and per-expert adapters go to vLLM's LoRA, the routers
    (trained in full) are reloaded in place; the learner's probe agrees without a whole-model load."""
    pytest.importorskip("vllm")
    from pathlib import Path

    from rlhub.algorithms.config import AlgorithmConfig
    from rlhub.benches.learner import Workload, make_batches, model_info
    from rlhub.engines.vllm_engine import VLLMEngine
    from rlhub.learner import Learner
    from rlhub.models.config import LoraConfig, ModelConfig
    from rlhub.rollout.records import WorkerStats
    from rlhub.rollout.weights import VerifiedWeights
    from rlhub.types import collate
    from rlhub.weight_sync import InMemoryWeightSync, probe_sequence

    cfg = ModelConfig(lora=LoraConfig(rank=4, alpha=8.0, targets=["attention", "experts", "router"]))
    learner = Learner(tiny_model_path, cfg, AlgorithmConfig(lr=2e-2, micro_batch_size=4, weight_decay=0.0), probe_sequence(259))
    info = model_info(Path(tiny_model_path), "float32")
    for batch in make_batches(info, Workload(2, 4, (6, 10), (4, 8), 4, warmup=0, steps=2), 3):
        learner.train_step(collate(batch, info.pad_id))
    engine = VLLMEngine(tiny_model_path, gpu_memory_utilization=0.2, continuous=True, lora="on", lora_rank=4)
    try:
        sync, stats = InMemoryWeightSync(), WorkerStats()
        sync.push(learner.published_state(), learner.version, learner.probe())
        VerifiedWeights(0, engine, sync, learner.probe_ids, 1e-3, stats).sync()
        assert stats.sync_rebuilds == 0 and stats.last_probe_error < 1e-3
        assert engine.stats.extra["adapter_loads"] == 1 and engine.stats.weight_loads == 0 and engine.serves_adapters
    finally:
        engine.close()
