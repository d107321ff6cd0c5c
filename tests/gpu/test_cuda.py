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
