"""An exported policy loads in vLLM as it is and generates the learner's greedy tokens."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from rlhub.engines.base import SamplingConfig  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.integration]

PROMPTS = [[51, 43, 52, 61], [49, 61], [55, 43, 55, 43, 55, 61], [(i * 13) % 256 for i in range(7)]]
EOS = 258
EXAMPLES = [([49 + i % 9, 43, 50 + i % 7, 61], [48 + (i * 3 + j) % 10 for j in range(8)] + [EOS]) for i in range(16)]


def learner_greedy(model) -> list[list[int]]:
    """The learner's own greedy completions of PROMPTS (transformers generate on its model)."""
    want = []
    for prompt in PROMPTS:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=12,
                                 do_sample=False, eos_token_id=EOS, pad_token_id=256)
        want.append(out[0, len(prompt):].tolist())
    return want


def vllm_greedy(path: str) -> list[list[int]]:
    from rlhub.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(path, dtype="float32", seed=0, max_model_len=256, kv_cache_gib=1)
    try:
        got = engine.generate(PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0.0, stop_token_ids=(EOS,)))
    finally:
        engine.close()
    return [c.token_ids for c in got]


@pytest.fixture(scope="module")
def trained(tiny_model_path, tmp_path_factory):
    """(the learner after two supervised steps, the export of its checkpoint)."""
    from rlhub.algorithms.config import AlgorithmConfig
    from rlhub.checkpoint import write_checkpoint
    from rlhub.export import export
    from rlhub.learner import Learner
    from rlhub.models.build import ModelConfig
    from rlhub.weight_sync import probe_sequence

    learner = Learner(tiny_model_path, ModelConfig(), AlgorithmConfig(), probe_sequence(259))
    learner.warm_start(EXAMPLES, steps=2, batch_size=4, lr=3e-3)
    run_dir = tmp_path_factory.mktemp("run")
    write_checkpoint(run_dir, 2, learner.save, {}, keep_last=1)
    report = export(run_dir, run_dir / "export")
    assert report["warnings"] == [] and report["checked_tensors"] > 0
    return learner.model.eval(), report["path"]


def test_vllm_generates_the_learners_greedy_tokens_from_the_export(trained):
    model, path = trained
    want = learner_greedy(model)
    assert vllm_greedy(path) == want
    assert len({tuple(w) for w in want}) > 1  # the trained model says different things to different prompts


def test_vllm_generates_the_lora_learners_greedy_tokens_from_the_merged_export(tiny_model_path, tmp_path):
    """model.lora: the export merges W + (alpha / r) B @ A; vLLM serves the merged model as the learner's policy."""
    from rlhub.algorithms.config import AlgorithmConfig
    from rlhub.checkpoint import write_checkpoint
    from rlhub.export import export
    from rlhub.learner import Learner
    from rlhub.models.config import LoraConfig, ModelConfig
    from rlhub.weight_sync import probe_sequence

    learner = Learner(tiny_model_path, ModelConfig(lora=LoraConfig(rank=8, alpha=16)), AlgorithmConfig(), probe_sequence(259))
    learner.warm_start(EXAMPLES, steps=6, batch_size=4, lr=3e-2)
    write_checkpoint(tmp_path / "run", 6, learner.save, {}, keep_last=1)
    report = export(tmp_path / "run", tmp_path / "export")
    assert report["lora"]["merged_weights"] == len(learner.adapted)
    assert vllm_greedy(report["path"]) == learner_greedy(learner.model.eval())
