"""Mixture of Grouped Experts (`moe.routing=grouped`): every token takes top_k/G experts in each of G
expert groups, so every group gets the same load; the engine, the learner, replay, upcycling and export."""

from __future__ import annotations

import copy
import dataclasses
import doctest
import json
import logging
from pathlib import Path

import pytest
import torch

from rlhub.algorithms.config import AlgorithmConfig
from rlhub.convert import UPCYCLE_RECORD, upcycle
from rlhub.engines.base import SamplingConfig
from rlhub.engines.hf import HFEngine
from rlhub.learner import Learner
from rlhub.models.build import ModelConfig
from rlhub.moe import Balancer, MoEConfig, Routing, find_routers, grouped_topk
from rlhub.moe_config import GROUPS_KEY, check_grouping
from rlhub.types import GroupTensors, Sample, collate
from rlhub.weight_sync import probe_sequence

E, K = 8, 4
PROMPTS = [[51, 43, 52, 61], [49, 61], [55, 43, 55, 43, 55, 61], [50, 50, 61]]


def tiny_qwen3_moe(groups: int | None = None, seed: int = 0):
    """The tiny Qwen3-MoE of 8 experts, top 4; `groups` recorded in its config as a converted model would."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=E, num_experts_per_tok=K,
        norm_topk_prob=True, decoder_sparse_step=1,
    )  # fmt: skip
    if groups is not None:
        setattr(cfg, GROUPS_KEY, groups)
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(cfg).eval()


def per_group(ids: torch.Tensor, groups: int) -> torch.Tensor:
    """[..., G] how many of the experts `ids` [..., k] fall in each group."""
    return torch.nn.functional.one_hot(ids.long() // (E // groups), groups).sum(-2)


def check_grouped_choice(probs: torch.Tensor, ids: torch.Tensor, groups: int) -> None:
    """Independently of `grouped_topk`: in every group the chosen experts are k/G distinct ones whose
    probabilities are at least those of the group's others."""
    size = E // groups
    assert (per_group(ids, groups) == K // groups).all()
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all()  # distinct
    chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, ids.long(), True)
    for g in range(groups):
        p, c = probs[:, g * size : (g + 1) * size], chosen[:, g * size : (g + 1) * size]
        lowest_in = p.masked_fill(~c, float("inf")).min(-1).values
        highest_out = p.masked_fill(c, float("-inf")).max(-1).values
        assert (lowest_in >= highest_out).all()


# ---- (a) k/G experts per group, gate weights from the softmax over all experts ------------
@pytest.mark.parametrize("groups", [2, 4])
def test_every_token_takes_k_over_g_experts_in_every_group(groups):
    model = tiny_qwen3_moe(groups)
    routing = Routing(model)  # the grouping comes from the model's config
    assert routing.groups == groups
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(groups))
    with torch.no_grad(), routing.capture() as capture:
        model(input_ids=ids)
    assert len(capture.layers) == 2
    for rec in capture.layers:
        assert rec.used.shape == (33, K) and torch.equal(rec.used, rec.fresh)
        check_grouped_choice(torch.softmax(rec.logits.float(), -1), rec.used, groups)
    hidden = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    for router in routing.routers:  # the gate weights: the chosen softmax probabilities, renormalised over the k
        with torch.no_grad():
            logits, weights, chosen = router(hidden)
        probs = torch.softmax(logits, -1)
        check_grouped_choice(probs, chosen, groups)
        expected = probs.gather(-1, chosen) / probs.gather(-1, chosen).sum(-1, keepdim=True)
        assert torch.allclose(weights, expected, atol=1e-6)


def test_grouped_topk_with_one_group_is_plain_topk():
    import rlhub.moe

    assert doctest.testmod(rlhub.moe).failed == 0  # grouped_topk's example
    scores = torch.rand(50, E, generator=torch.Generator().manual_seed(0))
    assert torch.equal(grouped_topk(scores, K, 1), torch.topk(scores, K, dim=-1).indices)
    assert grouped_topk(torch.tensor([[0.9, 0.8, 0.7, 0.1]]), 2, 2).tolist() == [[0, 2]]  # not [0, 1]


# ---- (b) equal load per group, unlike plain top-k on the same router --------------------------
@pytest.mark.parametrize("groups", [2, 4])
def test_group_loads_are_equal_where_plain_topk_piles_onto_one_group(groups):
    grouped = tiny_qwen3_moe(groups)
    plain = copy.deepcopy(grouped)
    delattr(plain.config, GROUPS_KEY)
    direction = torch.nn.functional.normalize(torch.ones(32), dim=0)
    for model in (grouped, plain):
        with torch.no_grad():  # skewed: the first group's experts look along the inputs' common direction
            for router in find_routers(model):
                router.weight[: E // groups] += 2.0 * direction
    hidden = torch.randn(200, 32, generator=torch.Generator().manual_seed(0)) + 3.0 * direction  # [N, H]
    loads = {}
    for name, model in (("grouped", grouped), ("plain", plain)):
        routing = Routing(model)
        with torch.no_grad():
            loads[name] = [per_group(router(hidden)[2], groups).sum(0) for router in routing.routers]  # per layer [G]
    for grouped_load, plain_load in zip(loads["grouped"], loads["plain"]):
        assert grouped_load.tolist() == [200 * K // groups] * groups
        assert plain_load.sum() == 200 * K and plain_load[0] > plain_load[1:].max() + 100  # the skew is real


# ---- (c), (d) the engine routes grouped on its own; the learner replays it exactly ---------------
@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhub.models.tokenizer import save_byte_tokenizer

    path = tmp_path_factory.mktemp("dense")
    cfg = LlamaConfig(
        vocab_size=259, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, tie_word_embeddings=True,
        eos_token_id=258, pad_token_id=256, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    save_byte_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def grouped_moe(dense_dir, tmp_path_factory) -> Path:
    """The dense model upcycled to 8 experts, top 4, in 2 groups; experts and router far apart, so a route matters."""
    out = tmp_path_factory.mktemp("moge") / "moe"
    upcycle(dense_dir, out, num_experts=E, top_k=K, noise=0.5, router_std=0.5, seed=0, groups=2)
    return out


def generate_batch(engine: HFEngine) -> GroupTensors:
    outs = engine.generate(PROMPTS, SamplingConfig(max_new_tokens=8, seed=5))
    samples = [Sample(p, c.token_ids, c.logprobs, c.versions, 0.0, None, c.finish_reason, c.routed_experts) for p, c in zip(PROMPTS, outs)]
    return collate([GroupTensors.from_samples(samples, torch.ones(len(samples)), 256)], 256)


def test_the_hf_engine_routes_a_grouped_model_in_groups(grouped_moe):
    engine = HFEngine(str(grouped_moe), seed=0)
    assert engine.routing.groups == 2
    outs = engine.generate(PROMPTS, SamplingConfig(max_new_tokens=8, seed=1))
    unbalanced = 0
    for p, c in zip(PROMPTS, outs):
        ids = torch.tensor([p + c.token_ids])
        assert c.routed_experts.shape == (ids.shape[1] - 1, 2, K)
        logits = []  # an independent read-out: each layer's router logits in a plain full forward
        hooks = [r.register_forward_hook(lambda _m, _i, out: logits.append(out[0].float())) for r in engine.routing.routers]
        try:
            with torch.no_grad():
                engine.model(input_ids=ids)
        finally:
            for h in hooks:
                h.remove()
        for layer, layer_logits in enumerate(logits):
            probs = torch.softmax(layer_logits, -1)[:-1]  # the last position routes nothing that matters
            routes = c.routed_experts[:, layer]
            check_grouped_choice(probs, routes, 2)
            unbalanced += int((per_group(probs.topk(K, -1).indices, 2) != K // 2).any(-1).sum())
    assert unbalanced > 0  # plain top-k of the same routers would have chosen otherwise: the check is not vacuous


def learner_for(path: Path, replay: bool, moe: MoEConfig) -> Learner:
    algo = AlgorithmConfig(micro_batch_size=2, lr=1e-6)
    return Learner(str(path), ModelConfig(), algo, probe_sequence(259), moe=dataclasses.replace(moe, mismatch_every=1), replay=replay)


def test_replay_under_grouped_routing_reproduces_the_engines_routes_and_logprobs(grouped_moe):
    batch = generate_batch(HFEngine(str(grouped_moe), seed=0))
    grouped = MoEConfig(routing="grouped", groups=2)
    learner = learner_for(grouped_moe, True, grouped)
    valid = batch.completion_mask.bool()
    with torch.no_grad(), learner.balancer.micro_batch(batch.attention_mask, batch.routes) as capture:
        learner.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    routed = capture.valid.view(batch.input_ids.shape)[:, : batch.routes.shape[1]]
    for layer, rec in enumerate(capture.layers):  # the forward used the recorded experts, every one
        used = rec.used.view(*batch.input_ids.shape, K)[:, : batch.routes.shape[1]]
        assert torch.equal(used[routed], batch.routes[:, :, layer][routed].long())
    m = learner.train_step(batch)
    assert valid.any() and m["moe/routing_replay"] == 1.0
    assert m["train/logprob_mismatch"] < 1e-5 and m["moe/routing_mismatch_same_version"] == 0.0
    assert m["moe/logprob_mismatch_fresh"] < 1e-5  # the learner's own routing is grouped too
    # the record is what the forward uses: other experts, in the same groups, move the log-probs
    batch.routes = torch.where(batch.routes >= 0, batch.routes // 4 * 4 + (batch.routes + 1) % 4, batch.routes)
    moved = learner_for(grouped_moe, True, grouped).train_step(batch)
    assert moved["train/logprob_mismatch"] > 1e-3 and moved["moe/logprob_mismatch_fresh"] < 1e-5


# ---- (e) upcycling with groups, and export -------------------------------------------------
def test_upcycle_records_the_groups_and_refuses_uneven_ones(dense_dir, grouped_moe, tmp_path, capsys):
    from rlhub.cli import main

    assert json.loads((grouped_moe / "config.json").read_text())[GROUPS_KEY] == 2
    assert json.loads((grouped_moe / UPCYCLE_RECORD).read_text())["groups"] == 2
    for experts, top_k, groups in ((8, 4, 3), (6, 2, 3), (8, 2, 4)):
        with pytest.raises(ValueError, match=f"groups={groups} must divide the model's num_experts={experts} and top_k={top_k}"):
            upcycle(dense_dir, tmp_path / "bad", num_experts=experts, top_k=top_k, groups=groups)
        assert not (tmp_path / "bad").exists()
    assert main(["convert", "upcycle", str(dense_dir), "--out", str(tmp_path / "cli"), "--experts", "4", "--top-k", "2", "--groups", "4"]) == 2
    assert "groups=4 must divide" in capsys.readouterr().err
    plain = upcycle(dense_dir, tmp_path / "plain", num_experts=4, top_k=2)
    assert plain["groups"] == 1 and GROUPS_KEY not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_export_of_a_grouped_model_says_which_engines_serve_it(grouped_moe, tmp_path, caplog):
    from rlhub.export import export

    with caplog.at_level(logging.WARNING, logger="rlhub.export"):
        report = export(grouped_moe, tmp_path / "out")
    assert report["expert_groups"] == 2
    assert json.loads((tmp_path / "out" / "config.json").read_text())[GROUPS_KEY] == 2
    (warning,) = report["warnings"]
    assert "hf engine" in warning and "vLLM" in warning and "plain top-k" in warning
    assert warning in (tmp_path / "out" / "README.md").read_text() and warning in caplog.text


def test_the_vllm_engine_refuses_a_grouped_model(grouped_moe):
    from rlhub.engines.vllm_engine import VLLMEngine

    with pytest.raises(ValueError, match="rollout.engine=hf"):
        VLLMEngine(str(grouped_moe))  # refused from its config, before vLLM is imported


# ---- (f) configuration ---------------------------------------------------------------------
def test_config_checks_name_the_key():
    MoEConfig().check()
    MoEConfig(routing="grouped", groups=4).check()
    for bad, match in (
        (MoEConfig(routing="grouped"), "moe.routing=grouped needs moe.groups >= 2"),
        (MoEConfig(routing="sorted"), "moe.routing='sorted'"),
        (MoEConfig(routing="grouped", groups=0), "moe.groups must be >= 1"),
        (MoEConfig(groups=2), "moe.groups=2 splits experts only under moe.routing=grouped"),
    ):
        with pytest.raises(ValueError, match=match):
            bad.check()
    check_grouping(MoEConfig(routing="grouped", groups=4), num_experts=8, top_k=4)
    check_grouping(MoEConfig(), num_experts=7, top_k=3)  # topk: nothing to divide
    with pytest.raises(ValueError, match="moe.groups=4 must divide the model's num_experts=8 and top_k=2"):
        check_grouping(MoEConfig(routing="grouped", groups=4), num_experts=8, top_k=2)


def test_a_grouping_that_contradicts_the_models_record_is_refused():
    with pytest.raises(ValueError, match=f"moe.groups=2 .* records {GROUPS_KEY}=1"):
        Routing(tiny_qwen3_moe(), groups=2)  # the engines would route this model plain top-k
    with pytest.raises(ValueError, match=f"moe.groups=1 \\(moe.routing=topk\\) .* records {GROUPS_KEY}=4"):
        Balancer(tiny_qwen3_moe(4), MoEConfig())
    assert Balancer(tiny_qwen3_moe(4), MoEConfig(routing="grouped", groups=4)).routing.groups == 4
    with pytest.raises(ValueError, match=f"{GROUPS_KEY}=3 must divide the model's num_experts=8 and top_k=4"):
        Routing(tiny_qwen3_moe(3))


def test_run_config_builds_a_grouped_tiny_model_and_refuses_a_contradicting_directory(tmp_path):
    import json

    from rlhub.config import ConfigError, load_config
    from rlhub.models.build import resolve_model_path

    cfg = load_config(["moe.routing=grouped", "moe.groups=2"])
    assert cfg.model.expert_groups == 2 and cfg.rollout.engine == "hf"
    built = resolve_model_path(cfg.model)
    assert json.loads((built / "config.json").read_text())["rlhub_expert_groups"] == 2
    plain = resolve_model_path(load_config([]).model)
    assert plain != built and "rlhub_expert_groups" not in json.loads((plain / "config.json").read_text())
    with pytest.raises(ConfigError, match="rlhub_expert_groups=1"):
        load_config([f"model.path={plain}", "moe.routing=grouped", "moe.groups=2"])
    with pytest.raises(ConfigError, match="moe.groups=3"):
        load_config(["moe.routing=grouped", "moe.groups=3"])
