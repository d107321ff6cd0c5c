"""VLLMEngine against a transformers fp32 forward on the tiny Qwen3-MoE.

One engine serves the whole module (start-up costs seconds). Every test first
loads the weights it checks against, so the tests do not depend on their order.
"""

from __future__ import annotations

import copy
import gc
import math
import subprocess
import sys
import tempfile
import weakref

import pytest
import torch

pytest.importorskip("vllm")

from rlhub.engines.base import Completion, RolloutEngine, SamplingConfig  # noqa: E402
from rlhub.engines.hf_names import to_checkpoint_names_for  # noqa: E402
from rlhub.models.build import ModelConfig, build_tiny_moe, load_policy  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.integration]

TOL = 1e-4
PROBE = [(7 * i + 3) % 256 for i in range(60)]
PROMPTS = [[(i * 13 + j) % 256 for j in range(3 + i % 5)] for i in range(8)]
LONG = [[(5 * i + 1) % 256 for i in range(150)]]
"""Longer than one KV block (128 on CPU): its first block lands in vLLM's prefix cache."""


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(build_tiny_moe(ModelConfig()))


@pytest.fixture(scope="module")
def engine(model_path):
    from rlhub.engines.vllm_engine import VLLMEngine

    eng = VLLMEngine(model_path, dtype="float32", seed=0, max_model_len=256, kv_cache_gib=1)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def learner(model_path):
    model, _ = load_policy(model_path, "float32")
    return model.eval()


def perturbed(model, seed: int, scale: float = 0.02):
    """A copy of the learner after a random step on every parameter."""
    new = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return new


def hf_token_logprobs(model, ids: list[int], start: int) -> torch.Tensor:
    """Log-prob of ids[start:], each given the ids before it (raw logits, no temperature)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = logits[start - 1 : -1].log_softmax(-1)
    return logp.gather(-1, torch.tensor(ids[start:])[:, None])[:, 0]


def check_against(model, prompts: list[list[int]], completions: list[Completion], sampling: SamplingConfig | None = None) -> float:
    """Largest difference between the engine's log-probs of the sampled tokens and the learner's
    recomputation under the same sampling distribution (temperature, top-p nucleus)."""
    from rlhub.models.logprobs import SamplingPolicy, token_logprobs

    policy = SamplingPolicy(sampling.temperature, sampling.top_p) if sampling else SamplingPolicy()
    worst = 0.0
    for prompt, c in zip(prompts, completions):
        ids = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            ref, _, _ = token_logprobs(model, ids, torch.ones_like(ids), policy=policy)
        worst = max(worst, (torch.tensor(c.logprobs) - ref[0, len(prompt) - 1 :]).abs().max().item())
    return worst


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def test_import_does_not_need_vllm():
    code = "import sys, rlhub.engines.vllm_engine; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_converter_matches_save_pretrained(learner, model_path):
    from safetensors.torch import load_file

    on_disk = load_file(f"{model_path}/model.safetensors")
    converted = to_checkpoint_names_for(learner.state_dict(), learner.config)
    assert sorted(converted) == sorted(on_disk)
    for name, tensor in on_disk.items():
        assert torch.equal(converted[name], tensor), name


@pytest.mark.parametrize("arch", ["mixtral", "tied_llama"])
def test_converter_other_architectures(arch):
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if arch == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(num_local_experts=4, **small))
    else:
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **small))
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        on_disk = load_file(f"{d}/model.safetensors")
    converted = to_checkpoint_names_for(model.state_dict(), model.config)
    assert sorted(converted) == sorted(on_disk)
    assert all(torch.equal(converted[k], v) for k, v in on_disk.items())


def test_generate_matches_transformers(engine, learner):
    assert isinstance(engine, RolloutEngine)
    engine.load_weights(learner.state_dict(), version=3)
    # Temperature 0.7 and top-p 0.9: the log-probs are those of the distribution sampled from
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.7, top_p=0.9, seed=11)
    out = engine.generate(PROMPTS, sampling)
    assert len(out) == len(PROMPTS)
    for c in out:
        assert len(c.token_ids) == len(c.logprobs) == len(c.versions) == 12
        assert c.finish_reason == "length"
        assert c.versions == [3] * 12
        assert c.routed_experts is None
        assert all(math.isfinite(x) and x <= 0.0 for x in c.logprobs)
    assert check_against(learner, PROMPTS, out, sampling) < TOL
    assert check_against(learner, PROMPTS, out) > 0.05  # the raw softmax differs: the check above is not vacuous


def test_stop_tokens_end_generation_and_are_kept(engine, learner):
    engine.load_weights(learner.state_dict(), version=4)
    stops = tuple(range(0, 259, 4))  # about a quarter of the vocabulary
    out = engine.generate(PROMPTS, SamplingConfig(max_new_tokens=30, stop_token_ids=stops, seed=5))
    assert any(c.finish_reason == "stop" for c in out)
    for c in out:
        assert len(c.token_ids) == len(c.logprobs) == len(c.versions)
        assert not any(t in stops for t in c.token_ids[:-1])
        if c.finish_reason == "stop":
            assert c.token_ids[-1] in stops
        else:
            assert len(c.token_ids) == 30 and c.token_ids[-1] not in stops
    assert check_against(learner, PROMPTS, out) < TOL


def test_seeded_groups_differ_and_repeat(engine, learner):
    engine.load_weights(learner.state_dict(), version=5)
    group = [PROMPTS[0]] * 8
    sampling = SamplingConfig(max_new_tokens=8, seed=21)
    first = [tuple(c.token_ids) for c in engine.generate(group, sampling)]
    again = [tuple(c.token_ids) for c in engine.generate(group, sampling)]
    assert len(set(first)) > 1  # copies of one prompt must not share a random stream
    assert first == again


def test_load_weights_matches_new_weights(engine, learner):
    engine.load_weights(learner.state_dict(), version=6)
    engine.generate(LONG, SamplingConfig(max_new_tokens=4, seed=1))  # fills the prefix cache
    before = engine.prompt_logprobs(PROBE)
    assert before.dtype == torch.float32 and before.shape == (len(PROBE) - 1,)
    assert (before - hf_token_logprobs(learner, PROBE, 1)).abs().max().item() < TOL

    new = perturbed(learner, seed=1)
    engine.load_weights(new.state_dict(), version=7)
    after = engine.prompt_logprobs(PROBE)
    assert engine.version == 7 and engine.last_load_seconds > 0
    assert (after - hf_token_logprobs(new, PROBE, 1)).abs().max().item() < TOL
    assert (after - before).abs().max().item() > 1e-2  # the update really changed the model
    # Generation (not just prefill) uses the new weights and stamps the new version.
    out = engine.generate(PROMPTS + LONG, SamplingConfig(max_new_tokens=8, seed=2))
    assert all(c.versions == [7] * len(c.token_ids) for c in out)
    # LONG would reuse the old weights' cached keys/values without a cache reset.
    assert check_against(new, PROMPTS + LONG, out) < TOL


def test_repeated_updates_stay_correct_and_free_old_models(engine, learner):
    models = [perturbed(learner, seed=s) for s in (2, 3)]
    states = [m.state_dict() for m in models]
    engine.load_weights(states[1], version=10)
    rss_start = rss_mb()
    for i in range(10):
        old_model = weakref.ref(engine._model_runner().model)
        engine.load_weights(states[i % 2], version=11 + i)
        gc.collect()
        assert old_model() is None, "the replaced model is still referenced"
        got = engine.prompt_logprobs(PROBE)
        assert (got - hf_token_logprobs(models[i % 2], PROBE, 1)).abs().max().item() < TOL
    assert rss_mb() - rss_start < 150, "memory grew over 10 updates"
    assert engine.version == 20


def test_incomplete_update_is_refused_and_engine_keeps_working(engine, learner):
    engine.load_weights(learner.state_dict(), version=30)
    partial = {k: v for k, v in learner.state_dict().items() if "layers.1." not in k}
    with pytest.raises(ValueError, match="unloaded"):
        engine.load_weights(partial, version=31)
    assert engine.version == 30
    got = engine.prompt_logprobs(PROBE)
    assert (got - hf_token_logprobs(learner, PROBE, 1)).abs().max().item() < TOL


def test_rebuild(engine, learner):
    new = perturbed(learner, seed=4)
    engine.rebuild(new.state_dict(), version=40)
    assert engine.version == 40
    got = engine.prompt_logprobs(PROBE)
    assert (got - hf_token_logprobs(new, PROBE, 1)).abs().max().item() < TOL
    out = engine.generate(PROMPTS, SamplingConfig(max_new_tokens=8, seed=9))
    assert all(c.versions == [40] * 8 for c in out)
    assert check_against(new, PROMPTS, out) < TOL
    # Weight swaps keep working on the rebuilt engine.
    engine.load_weights(learner.state_dict(), version=41)
    got = engine.prompt_logprobs(PROBE)
    assert (got - hf_token_logprobs(learner, PROBE, 1)).abs().max().item() < TOL
