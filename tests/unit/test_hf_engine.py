"""The built-in engine: log-probs equal a full forward, routing is recorded, weights swap in flight."""

import math

import pytest
import torch

from rlhub.engines.base import RolloutEngine, SamplingConfig
from rlhub.engines.hf import HFEngine
from rlhub.models.logprobs import SamplingPolicy, token_logprobs
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
        assert c.routed_experts.shape == (len(p) + len(c.token_ids) - 1, 2, 2)  # every position but the last
        ids = torch.tensor([p + c.token_ids])
        ref, _, _ = token_logprobs(eng.model, ids, torch.ones_like(ids))
        assert torch.allclose(ref[0, len(p) - 1 :], torch.tensor(c.logprobs), atol=1e-5)


def test_same_seed_same_samples(tiny_model_path):
    eng = HFEngine(tiny_model_path)
    s = SamplingConfig(max_new_tokens=5, seed=11)
    a = eng.generate([[51, 61]] * 4, s)
    b = eng.generate([[51, 61]] * 4, s)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_seeded_rows_sample_what_their_seeds_say_whatever_the_engine_drew_before(tiny_model_path):
    import doctest

    import rlhub.engines.hf
    import rlhub.rollout.turns

    assert doctest.testmod(rlhub.engines.hf).failed == 0 and doctest.testmod(rlhub.rollout.turns).failed == 0
    prompts = [[51, 61]] * 4 + [[49, 61]] * 4
    seeded = SamplingConfig(max_new_tokens=8, seeds=tuple(range(100, 108)))
    first = HFEngine(tiny_model_path, seed=0).generate(prompts, seeded)
    used = HFEngine(tiny_model_path, seed=5)  # another engine seed, and draws before: the engine's stream is not used
    used.generate(prompts, SamplingConfig(max_new_tokens=8))
    again = used.generate(prompts, seeded)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.logprobs for c in first] == [c.logprobs for c in again]
    assert len({tuple(c.token_ids) for c in first[:4]}) > 1  # each row its own numbers: a group's samples differ
    other = used.generate(prompts, SamplingConfig(max_new_tokens=8, seeds=tuple(range(200, 208))))
    assert [c.token_ids for c in other] != [c.token_ids for c in first]
    with pytest.raises(ValueError, match="3 seeds for 8 prompts"):
        used.generate(prompts, SamplingConfig(seeds=(1, 2, 3)))


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

    def source() -> bool:  # the rollout worker's poll: it loads (and verifies) the weights itself
        calls["n"] += 1
        if calls["n"] == 2:
            eng.load_weights(new_state, 7)
            return True
        return False

    outs = eng.generate([[51, 61]] * 3, SamplingConfig(max_new_tokens=5), weight_source=source)
    full = [c for c in outs if len(c.versions) == 5]
    assert full, "no completion ran past the update"
    assert all(c.versions == [0, 0, 7, 7, 7] for c in full)
    assert eng.stats.inflight_updates == 1


def test_greedy_stops_at_stop_token(tiny_model_path):
    eng = HFEngine(tiny_model_path)
    first = eng.generate([[51, 61]], SamplingConfig(max_new_tokens=3, temperature=0))[0]
    stop = first.token_ids[1]
    again = eng.generate([[51, 61]], SamplingConfig(max_new_tokens=3, temperature=0, stop_token_ids=(stop,)))[0]
    assert again.token_ids == first.token_ids[:2] and again.finish_reason == "stop"


def nucleus_logprob_by_hand(logits: torch.Tensor, token: int, temperature: float, top_p: float) -> float:
    """log pi(token) of softmax(logits / T) restricted to the top-p nucleus, one position, plain Python."""
    probs = torch.softmax(logits.double() / temperature, -1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    nucleus, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        nucleus.append(i)
        mass += probs[i]
    assert token in nucleus, "a sampled token lies in the nucleus"
    return math.log(probs[token] / mass)


def test_reported_logprobs_are_the_sampling_distribution(tiny_model_path):
    # temperature 0.7 and top-p 0.9: the behaviour policy is the tempered nucleus, not the raw softmax
    eng = HFEngine(tiny_model_path, seed=0)
    prompts = [[51, 43, 52, 61], [49, 61], [55, 43, 55, 43, 55, 61]] * 3
    outs = eng.generate(prompts, SamplingConfig(max_new_tokens=6, temperature=0.7, top_p=0.9, stop_token_ids=(258,), seed=3))
    policy = SamplingPolicy(0.7, 0.9)
    raw_gap = 0.0
    for p, c in zip(prompts, outs):
        ids = torch.tensor([p + c.token_ids])
        with torch.no_grad():
            learner, _, _ = token_logprobs(eng.model, ids, torch.ones_like(ids), policy=policy)
            raw, _, _ = token_logprobs(eng.model, ids, torch.ones_like(ids))
            logits = eng.model(ids).logits[0]
        # what a learner recomputes at the engine's version equals what the engine reported
        assert torch.allclose(learner[0, len(p) - 1 :], torch.tensor(c.logprobs), atol=1e-5)
        # and both are the tempered nucleus, recomputed independently
        for k, tok in enumerate(c.token_ids):
            assert c.logprobs[k] == pytest.approx(nucleus_logprob_by_hand(logits[len(p) - 1 + k], tok, 0.7, 0.9), abs=1e-4)
        raw_gap = max(raw_gap, float((raw[0, len(p) - 1 :] - torch.tensor(c.logprobs)).abs().max()))
    assert raw_gap > 0.05  # the raw softmax is a different distribution: the check above is not vacuous


def test_learner_keeps_a_token_that_left_the_nucleus_finite(tiny_model_path):
    eng = HFEngine(tiny_model_path)
    ids = torch.tensor([[51, 43, 52, 61, 200, 201]])  # tokens an untrained model gives little mass
    narrow = SamplingPolicy(1.0, 0.05)
    lp, ent, _ = token_logprobs(eng.model, ids, torch.ones_like(ids), with_entropy=True, policy=narrow)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    (lp.sum() + ent.sum()).backward()  # the learner's loss uses both: the gradient must be finite too
    assert all(torch.isfinite(p.grad).all() for p in eng.model.parameters() if p.grad is not None)
    # the nucleus of a tiny top-p holds the top token alone: kept targets share the mass with it
    assert (lp <= 0).all() and (lp > -30).all()
