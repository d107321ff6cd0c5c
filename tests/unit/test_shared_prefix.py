"""A group's prompt computed once: in the learner (`learner.share_prefix`, rlhub.models.logprobs.shared_prefix)
and in the hf engine's prefill (rlhub.engines.hf.shared_prompts); and the engine's one-draw-a-row sampling."""

from __future__ import annotations

import pytest
import torch

from rlhub.algorithms.config import AlgorithmConfig
from rlhub.models.config import ModelConfig
from rlhub.models.logprobs import shared_prefix, token_logprobs
from rlhub.moe import MoEConfig


def group_batches(path: str, steps: int = 2, seed: int = 5):
    """Collated steps of 3 groups x 4 samples, each group one prompt of its own length (right padding
    then differs between groups), completions of different lengths."""
    from rlhub.benches.learner import Workload, make_batches, model_info
    from rlhub.types import collate

    info = model_info(__import__("pathlib").Path(path), "float32")
    return [collate(b, info.pad_id) for b in make_batches(info, Workload(3, 4, (8, 11), (2, 6), 12, warmup=0, steps=steps), seed)]


def plain_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")


def test_the_shared_prefix_is_what_the_rows_have_in_common_before_the_first_completion(tiny_model_path):
    batch = group_batches(tiny_model_path)[0]
    prefix = shared_prefix(batch.input_ids, batch.attention_mask, batch.completion_mask)
    first = int(batch.completion_mask.bool().any(0).nonzero()[0, 0])
    assert prefix is not None and prefix.length == first
    assert sorted(prefix.firsts.tolist()) == [0, 4, 8]  # one prefix a group, its first row
    groups = prefix.of_row.view(3, 4)
    assert all(len(set(g.tolist())) == 1 for g in groups) and len(set(groups[:, 0].tolist())) == 3
    for row, p in enumerate(prefix.of_row.tolist()):
        assert torch.equal(batch.input_ids[row, : prefix.length], batch.input_ids[prefix.firsts[p], : prefix.length])
    distinct = batch.input_ids.clone()
    distinct[:, 0] = torch.arange(distinct.shape[0])  # no two rows alike any more
    assert shared_prefix(distinct, batch.attention_mask, batch.completion_mask) is None


def test_split_forward_gives_the_whole_forwards_log_probs_and_gradients(tiny_model_path):
    """Two computations of one function: the batch in one forward, and its prefixes once each then
    every row's rest over the copied cache. Values and the gradients of every weight agree."""
    from rlhub.models.logprobs import completion_span

    model = plain_model(tiny_model_path)
    batch = group_batches(tiny_model_path)[0]
    prefix = shared_prefix(batch.input_ids, batch.attention_mask, batch.completion_mask)
    span = completion_span(batch.completion_mask)
    results = []
    for p in (None, prefix):
        model.zero_grad()
        lp, ent, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, with_entropy=True, keep=span, prefix=p)
        ((lp * batch.completion_mask).sum() + ent.sum()).backward()
        results.append((lp.detach(), {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}))
    (whole, g_whole), (split, g_split) = results
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(split[mask], whole[mask], rtol=2e-5, atol=1e-5)  # fp32 rounding of other shapes
    assert g_whole.keys() == g_split.keys()
    for name in g_whole:
        torch.testing.assert_close(g_split[name], g_whole[name], rtol=1e-4, atol=2e-6, msg=name)
    with pytest.raises(ValueError, match="reaches into the shared prefix"):
        token_logprobs(model, batch.input_ids, batch.attention_mask, keep=span + 1, prefix=prefix)


def test_split_forwards_routing_capture_is_the_whole_forwards(tiny_model_path):
    """Replayed routes, the router's own choices and the logits the balance loss reads, position by
    position, as one forward records them."""
    from rlhub.moe import Balancer

    model = plain_model(tiny_model_path)
    balancer = Balancer(model, MoEConfig(routing_replay="rollout"), replay=True)
    batch = group_batches(tiny_model_path)[0]
    prefix = shared_prefix(batch.input_ids, batch.attention_mask, batch.completion_mask)
    with torch.no_grad():
        with balancer.micro_batch(batch.attention_mask, batch.routes) as whole:
            token_logprobs(model, batch.input_ids, batch.attention_mask)
        with balancer.shared_micro_batch(batch.attention_mask, batch.routes, prefix) as parts:
            token_logprobs(model, batch.input_ids, batch.attention_mask, keep=batch.input_ids.shape[1] - 1 - prefix.length,
                           prefix=prefix, between=parts.suffix)
    split = parts.merged()
    assert torch.equal(split.valid, whole.valid) and len(split.layers) == len(whole.layers)
    for a, b in zip(whole.layers, split.layers):
        assert torch.equal(a.used, b.used) and torch.equal(a.fresh, b.fresh)
        torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-5)
    replayed = batch.routes[:, :, 0].long()  # layer 0's replayed experts are the recorded ones wherever recorded
    used = split.layers[0].used.view(*batch.input_ids.shape, -1)[:, : replayed.shape[1]]
    known = (replayed >= 0).all(-1)
    assert torch.equal(used[known], replayed[known])


def test_a_learner_step_with_the_shared_prefix_trains_the_same_weights_on_fewer_tokens(tiny_model_path):
    """Routing replay and the global-batch balance loss on; the model's forwards see about half the
    positions. Without the mechanism the count of positions fed would not drop."""
    from rlhub.learner import Learner
    from rlhub.weight_sync import probe_sequence

    def run(share: bool):
        learner = Learner(tiny_model_path, ModelConfig(), AlgorithmConfig(lr=1e-3, micro_batch_size=12, weight_decay=0.0),
                          probe_sequence(259), moe=MoEConfig(routing_replay="rollout", aux_loss_coef=0.1, mismatch_every=0), replay=True,
                          attention="eager", share_prefix=share)
        fed = []
        forward = learner.model.forward

        def counting(*args, **kwargs):
            fed.append(int(kwargs["input_ids"].numel()))
            return forward(*args, **kwargs)

        learner.model.forward = counting
        metrics = [learner.train_step(b) for b in group_batches(tiny_model_path)]
        return learner, metrics, sum(fed)

    plain, m_plain, fed_plain = run(False)
    shared, m_shared, fed_shared = run(True)
    assert fed_shared < 0.75 * fed_plain
    for a, b in zip(m_plain, m_shared):
        for key in ("train/loss", "train/aux_loss", "train/pg_loss", "train/entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        assert b["learned"] == a["learned"]
    for (n, p), (_, q) in zip(plain.model.named_parameters(), shared.model.named_parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-5, msg=n)


# ---- the engine -----------------------------------------------------------------------------

def test_the_engine_prefills_each_distinct_prompt_once_and_samples_as_before(tiny_model_path, monkeypatch):
    from rlhub.engines import hf
    from rlhub.engines.base import SamplingConfig

    prompts = [[5, 61, 200, 17], [9, 43, 12]] * 3 + [[77, 3]]
    firsts, of_row = hf.shared_prompts(prompts, None)
    assert firsts.tolist() == [0, 1, 6] and of_row.tolist() == [0, 1, 0, 1, 0, 1, 2]
    known = [None] * 7
    known[2] = torch.zeros(2, 2, 2, dtype=torch.int8)  # a prompt whose routes differ is prefilled on its own
    assert hf.shared_prompts(prompts, known)[0].tolist() == [0, 1, 2, 6]
    assert hf.shared_prompts([[1], [2]], None) == (None, None)

    engine = hf.HFEngine(tiny_model_path)
    fed = []
    forward = engine.model.forward

    def counting(*args, **kwargs):
        fed.append(int(kwargs["input_ids"].shape[0]))
        return forward(*args, **kwargs)

    engine.model.forward = counting
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=6, stop_token_ids=[258])
    shared = engine.generate(prompts, sampling)
    assert fed[0] == 3  # the prefill ran three distinct prompts
    monkeypatch.setattr(hf, "shared_prompts", lambda p, r: (None, None))
    fed.clear()
    plain = engine.generate(prompts, sampling)
    assert fed[0] == len(prompts)
    for a, b in zip(shared, plain):
        assert a.token_ids == b.token_ids
        assert torch.equal(a.routed_experts, b.routed_experts)


@pytest.mark.parametrize("draws", ["generator", "seeded"])
def test_one_draw_a_row_samples_the_categorical_distribution(draws):
    from rlhub.engines.hf import sample_categorical, seeded_uniforms

    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.7]]).repeat(4000, 1)
    if draws == "generator":
        uniforms = torch.rand(len(probs), generator=torch.Generator().manual_seed(0))
    else:  # each row's own seed, one decode step: the rollout's per-sample numbers (rlhub.rollout.turns.sampling_seed)
        uniforms = seeded_uniforms(torch.arange(len(probs)) * 7919 + 3, 1)[:, 0]
    ids = sample_categorical(probs, uniforms).view(4000, 3)
    for row, p in enumerate(probs[:3]):
        freq = torch.bincount(ids[:, row], minlength=4).float() / 4000
        assert torch.all((freq - p).abs() < 0.03), (row, freq, p)
        assert not bool(freq[p == 0].any())  # an entry of probability 0 (outside a nucleus) is never drawn
