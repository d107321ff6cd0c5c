"""The built-in engine: log-probs equal a full forward, routing is recorded, weights swap in flight."""

import torch

from rlhub.engines.base import RolloutEngine, SamplingConfig
from rlhub.engines.hf import HFEngine
from rlhub.models.logprobs import token_logprobs
from rlhub.weight_sync import probe_sequence


def perturbed(state, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def test_engine_logprobs_match_a_full_forward(tiny_model_path):
    eng = HFEngine(tiny_model_path, seed=0)
    assert isinstance(eng, RolloutEngine)
    prompts = [[51, 43, 52, 61], [49, 61], [55, 43, 55, 43, 55, 61]]
    outs = eng.generate(prompts, SamplingConfig(max_new_tokens=6, stop_token_ids=(258,), seed=3))
    for p, c in zip(prompts, outs):
        assert len(c.token_ids) == len(c.logprobs) == len(c.versions) <= 6
        assert c.routed_experts.shape == (len(c.token_ids), 2, 2)
        ids = torch.tensor([p + c.token_ids])
        ref, _, _ = token_logprobs(eng.model, ids, torch.ones_like(ids))
        assert torch.allclose(ref[0, len(p) - 1 :], torch.tensor(c.logprobs), atol=1e-5)


def test_same_seed_same_samples(tiny_model_path):
    eng = HFEngine(tiny_model_path)
    s = SamplingConfig(max_new_tokens=5, seed=11)
    a = eng.generate([[51, 61]] * 4, s)
    b = eng.generate([[51, 61]] * 4, s)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_load_weights_changes_probe_and_rebuild_matches(tiny_model_path):
    eng = HFEngine(tiny_model_path)
    probe = probe_sequence(259)
    before = eng.prompt_logprobs(probe)
    new_state = perturbed(eng.model.state_dict())
    eng.load_weights(new_state, version=3)
    after = eng.prompt_logprobs(probe)
    assert eng.version == 3 and (after - before).abs().max() > 1e-3
    other = HFEngine(tiny_model_path)
    other.rebuild(new_state, 3)
    assert torch.equal(other.prompt_logprobs(probe), after)


def test_inflight_update_tags_later_tokens_with_new_version(tiny_model_path):
    eng = HFEngine(tiny_model_path)
    new_state = perturbed(eng.model.state_dict(), seed=1)
    calls = {"n": 0}

    def source():
        calls["n"] += 1
        return (new_state, 7) if calls["n"] == 2 else None

    outs = eng.generate([[51, 61]] * 3, SamplingConfig(max_new_tokens=5), weight_source=source)
    for c in outs:
        if len(c.versions) == 5:
            assert c.versions == [0, 0, 7, 7, 7]
    assert eng.stats.inflight_updates == 1


def test_greedy_stops_at_stop_token(tiny_model_path):
    eng = HFEngine(tiny_model_path)
    first = eng.generate([[51, 61]], SamplingConfig(max_new_tokens=3, temperature=0))[0]
    stop = first.token_ids[1]
    again = eng.generate([[51, 61]], SamplingConfig(max_new_tokens=3, temperature=0, stop_token_ids=(stop,)))[0]
    assert again.token_ids == first.token_ids[:2] and again.finish_reason == "stop"
