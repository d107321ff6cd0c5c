"""LoRA RL (rlhub.lora), the sorted experts forward (rlhub.models.experts) and bf16 (rlhub.models.precision)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhub import lora
from rlhub.algorithms.config import AlgorithmConfig
from rlhub.models.config import LoraConfig, ModelConfig
from rlhub.moe import MoEConfig

EOS = 258
PROMPTS = [[51, 43, 52, 61], [49, 61], [55, 43, 55, 43, 55, 61], [(i * 13) % 256 for i in range(7)]]
EXAMPLES = [([49 + i % 9, 43, 50 + i % 7, 61], [48 + (i * 3 + j) % 10 for j in range(8)] + [EOS]) for i in range(16)]


def make_learner(path: str, rank: int = 4, precision: str = "fp32", targets=("attention", "experts"), lr: float = 1e-2,
                 moe: MoEConfig | None = None, **kw):
    from rlhub.learner import Learner
    from rlhub.weight_sync import probe_sequence

    cfg = ModelConfig(lora=LoraConfig(rank=rank, alpha=2.0 * rank, targets=list(targets)))
    return Learner(path, cfg, AlgorithmConfig(lr=lr, micro_batch_size=4, weight_decay=0.0), probe_sequence(259), precision=precision,
                   moe=moe or MoEConfig(routing_replay="rollout"), replay=True, **kw)


def batches(path: str, steps: int = 2, seed: int = 3):
    from rlhub.benches.learner import Workload, make_batches, model_info
    from rlhub.types import collate

    info = model_info(Path(path), "float32")
    return [collate(b, info.pad_id) for b in make_batches(info, Workload(2, 4, (6, 10), (4, 8), 4, warmup=0, steps=steps), seed)]


def greedy(model: torch.nn.Module, prompt: list[int], tokens: int = 10) -> list[int]:
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=tokens,
                             do_sample=False, eos_token_id=EOS, pad_token_id=256)
    return out[0, len(prompt):].tolist()


def base_model(path: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


# ---- the sorted experts forward ---------------------------------------------------------------------

def test_sorted_experts_equal_transformers_eager_forward_and_gradients(tiny_model_path):
    from rlhub.models.experts import experts_modules, sorted_experts_forward

    model = base_model(tiny_model_path)
    _, module = experts_modules(model)[0]
    module.config._experts_implementation = "eager"
    experts = module.gate_up_proj.shape[0]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, module.gate_up_proj.shape[-1], generator=g, requires_grad=True)
    index = torch.stack([torch.randperm(experts, generator=g)[:2] for _ in range(20)])
    index[3, 1] = experts  # a sentinel ("no expert") is skipped by both
    weights = torch.rand(20, 2, generator=g)
    want = module(hidden, index, weights)
    want.pow(2).sum().backward()
    want_grads = [t.grad.clone() for t in (hidden, module.gate_up_proj, module.down_proj)]
    for t in (hidden, module.gate_up_proj, module.down_proj):
        t.grad = None
    got = sorted_experts_forward(module, hidden, index, weights)
    got.pow(2).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for w, t in zip(want_grads, (hidden, module.gate_up_proj, module.down_proj)):
        torch.testing.assert_close(t.grad, w, rtol=1e-5, atol=1e-6)


# ---- LoRA in the learner -------------------------------------------------------------------------------

def test_a_lora_step_changes_only_adapters_and_the_optimizer_holds_only_them(tiny_model_path):
    learner = make_learner(tiny_model_path)
    adapters = {n for n, p in learner.model.named_parameters() if lora.is_adapter_param(n)}
    assert any(".rlhub_lora." in n for n in adapters) and any(".lora_A." in n for n in adapters)  # experts and attention
    held = {id(p) for group in learner.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for n, p in learner.model.named_parameters() if n in adapters}
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    for batch in batches(tiny_model_path):
        metrics = learner.train_step(batch)
        assert metrics["train/policy_updated"] == 1.0
    changed = {n for n, p in learner.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= adapters
    assert any(n.endswith(("lora_A.default.weight", "gate_up_A", "down_A")) for n in changed)  # the second step moves A too (B is no longer 0)
    assert all(p.dtype == torch.float32 for n, p in learner.model.named_parameters() if n in adapters)


def test_without_lora_the_same_steps_move_the_base_weights(tiny_model_path):
    """The check above fails with the mechanism off: a full learner changes weights that are not adapters."""
    from rlhub.learner import Learner
    from rlhub.weight_sync import probe_sequence

    learner = Learner(tiny_model_path, ModelConfig(), AlgorithmConfig(lr=1e-2, micro_batch_size=4), probe_sequence(259),
                      moe=MoEConfig(routing_replay="rollout"), replay=True)
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    for batch in batches(tiny_model_path):
        learner.train_step(batch)
    assert any(not torch.equal(p, before[n]) for n, p in learner.model.named_parameters() if not lora.is_adapter_param(n))


@pytest.mark.parametrize("targets", [("attention", "experts"), ("experts",), ("attention",), ("attention", "experts", "router")])
def test_merged_base_weights_compute_the_adapted_policy(tiny_model_path, targets):
    """W + scaling * B @ A (the engines' and the export's merge), loaded into a plain model with transformers'
    own experts code, gives the learner's log-probs: two implementations, one function."""
    from rlhub.models.logprobs import token_logprobs

    learner = make_learner(tiny_model_path, targets=targets)
    for batch in batches(tiny_model_path):
        learner.train_step(batch)
    published = learner.published_state()
    assert lora.is_adapter_state(published)
    plain = base_model(tiny_model_path)
    untouched = token_logprobs(plain, torch.tensor(PROMPTS[2:3]), torch.ones(1, 6, dtype=torch.long))[0]
    merged = lora.merged(plain.state_dict(), published)
    assert set(merged) == set(lora.adapted_names(published)) and set(merged) <= set(plain.state_dict())
    plain.load_state_dict({**plain.state_dict(), **merged})
    ids = torch.tensor([[5, 61, 200, 17, 33, 90, 12, 4, 250, 61]])
    learner.model.eval()
    with torch.no_grad():
        want, _, _ = token_logprobs(learner.model, ids, torch.ones_like(ids))
        got, _, _ = token_logprobs(plain, ids, torch.ones_like(ids))
        moved = token_logprobs(plain, torch.tensor(PROMPTS[2:3]), torch.ones(1, 6, dtype=torch.long))[0]
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert not torch.allclose(moved, untouched, atol=1e-4)  # the adapters changed the policy: the merge had work to do


def routers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from rlhub.moe import find_routers

    ids = {id(r) for r in find_routers(model)}
    return {f"{n}.weight": m.weight.detach().clone() for n, m in model.named_modules() if id(m) in ids}


@pytest.mark.parametrize("balance,targets,moves", [("global_batch", ("attention", "router"), True),
                                                   ("none", ("attention", "router"), False),
                                                   ("global_batch", ("attention",), False)])
def test_the_balance_loss_reaches_a_lora_policy_through_its_trained_routers(tiny_model_path, balance, targets, moves):
    """With every advantage 0 the policy loss has no gradient, so a router moves only by the balance loss,
    and only when the router is trained (`targets` router): switched off either way, it stays."""
    learner = make_learner(tiny_model_path, targets=targets, moe=MoEConfig(routing_replay="rollout", balance=balance, aux_loss_coef=0.5))
    held = {id(p) for group in learner.optimizer.param_groups for p in group["params"]}
    params = dict(learner.model.named_parameters())
    before = routers(learner.model)
    assert ({id(params[n]) for n in before} <= held) == ("router" in targets)
    for batch in batches(tiny_model_path):
        batch.advantages.zero_()
        learner.train_step(batch)
    after = routers(learner.model)
    assert any(not torch.equal(after[n], before[n]) for n in before) == moves
    published = learner.published_state()
    assert (set(before) <= set(published)) == ("router" in targets)  # a trained router travels whole with the adapters
    if moves:
        for n in before:
            torch.testing.assert_close(published[n], after[n], rtol=0, atol=0)


def test_selection_biases_travel_with_the_adapters_and_resume_from_a_checkpoint(tiny_model_path, tmp_path):
    """moe.balance=aux_free moves each router's selection bias every step; the engines route with it,
    so a LoRA version carries it, merged as it is, and a checkpoint keeps it."""
    from rlhub.checkpoint import write_checkpoint
    from rlhub.moe import BIAS_NAME

    moe = MoEConfig(routing_replay="rollout", balance="aux_free", bias_update_rate=0.05)
    learner = make_learner(tiny_model_path, moe=moe)
    for batch in batches(tiny_model_path):
        learner.train_step(batch)
    biases = {n: b.clone() for n, b in learner.model.named_buffers() if n.endswith(BIAS_NAME)}
    assert biases and any(bool(b.any()) for b in biases.values())
    published = learner.published_state()
    merged = lora.merged(base_model(tiny_model_path).state_dict(), published)
    for n, b in biases.items():
        torch.testing.assert_close(merged[n], b, rtol=0, atol=0)
    assert not any(n.endswith(BIAS_NAME) for n in lora.adapted_names(published))  # not a weight of the HF model
    ckpt = write_checkpoint(tmp_path, 2, learner.save, {}, keep_last=1)
    resumed = make_learner(tiny_model_path, moe=moe)
    resumed.load(ckpt, 2)
    for n, b in resumed.model.named_buffers():
        if n.endswith(BIAS_NAME):
            torch.testing.assert_close(b, biases[n], rtol=0, atol=0)


def test_published_adapters_are_a_small_part_of_the_model_and_name_base_weights(tiny_model_path):
    learner = make_learner(tiny_model_path)
    published = learner.published_state()
    full = base_model(tiny_model_path).state_dict()
    assert lora.nbytes(published) < 0.2 * lora.nbytes(full)
    names = lora.adapted_names(published)
    assert any(n.endswith("experts.gate_up_proj") for n in names) and any(n.endswith("q_proj.weight") for n in names)
    experts = next(n for n in names if n.endswith("experts.gate_up_proj"))
    e, out, _ = full[experts].shape
    assert published[f"{experts}.lora_A"].shape[0] == e and published[f"{experts}.lora_B"].shape[:2] == (e, out)  # one adapter per expert


def test_merge_names_what_does_not_fit():
    base = {"w.weight": torch.zeros(3, 2)}
    good = {"w.weight.lora_A": torch.ones(1, 2), "w.weight.lora_B": torch.ones(3, 1), lora.SCALING_KEY: torch.tensor(2.0)}
    torch.testing.assert_close(lora.merged(base, good)["w.weight"], torch.full((3, 2), 2.0))
    with pytest.raises(KeyError, match="no weight v.weight"):
        lora.merged(base, {"v.weight.lora_A": torch.ones(1, 2), "v.weight.lora_B": torch.ones(3, 1), lora.SCALING_KEY: torch.tensor(1.0)})
    with pytest.raises(ValueError, match="shape"):
        lora.merged(base, {"w.weight.lora_A": torch.ones(1, 3), "w.weight.lora_B": torch.ones(2, 1), lora.SCALING_KEY: torch.tensor(1.0)})


def test_lora_config_errors_name_the_key():
    with pytest.raises(ValueError, match="model.lora.rank"):
        LoraConfig(rank=-1).check()
    with pytest.raises(ValueError, match="model.lora.targets"):
        LoraConfig(rank=4, targets=["attention", "heads"]).check()


def test_a_dense_model_without_experts_is_refused_for_expert_targets(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="experts"):
        lora.apply(base_model(str(tmp_path)), LoraConfig(rank=2, targets=["experts"]))
    adapted = lora.apply(base_model(str(tmp_path)), LoraConfig(rank=2, targets=["attention", "mlp"]))
    assert sorted({n.rsplit(".", 2)[-2] for n in adapted}) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


# ---- the rollout side ---------------------------------------------------------------------------------

def test_a_rollout_engine_loads_adapters_merged_and_verifies_the_probe(tiny_model_path):
    from rlhub.engines.hf import HFEngine
    from rlhub.rollout.records import WorkerStats
    from rlhub.rollout.weights import VerifiedWeights
    from rlhub.weight_sync import InMemoryWeightSync

    learner = make_learner(tiny_model_path)
    for batch in batches(tiny_model_path):
        learner.train_step(batch)
    sync = InMemoryWeightSync()
    sync.push(learner.published_state(), learner.version, learner.probe())
    engine = HFEngine(tiny_model_path)
    stats = WorkerStats()
    weights = VerifiedWeights(0, engine, sync, learner.probe_ids, 1e-4, stats)
    weights.sync()
    assert engine.version == learner.version and stats.sync_rebuilds == 0 and stats.last_probe_error < 1e-4
    assert stats.last_sync_bytes == lora.nbytes(learner.published_state())
    plain = base_model(tiny_model_path)
    want = lora.merged(plain.state_dict(), learner.published_state())
    live = engine.model.state_dict()
    for name, tensor in want.items():
        torch.testing.assert_close(live[name], tensor)
    # the next version's adapters go onto the same base, not onto the merged weights
    learner.train_step(batches(tiny_model_path, steps=1, seed=9)[0])
    sync.push(learner.published_state(), learner.version, learner.probe())
    weights.sync()
    assert stats.last_probe_error < 1e-4
    for name, tensor in lora.merged(plain.state_dict(), learner.published_state()).items():
        torch.testing.assert_close(engine.model.state_dict()[name], tensor)


# ---- checkpoints and export ------------------------------------------------------------------------------

def test_a_lora_checkpoint_holds_adapters_and_resumes_the_same_next_step(tiny_model_path, tmp_path):
    from rlhub.checkpoint import write_checkpoint

    steps = batches(tiny_model_path, steps=3)
    a = make_learner(tiny_model_path)
    for batch in steps[:2]:
        a.train_step(batch)
    ckpt = write_checkpoint(tmp_path, 2, a.save, {}, keep_last=1)
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapters", "manifest.json", "state.json"]  # no base model, no full policy
    size = sum(f.stat().st_size for f in (ckpt / "adapters").iterdir())
    assert size < 0.5 * sum(f.stat().st_size for f in Path(tiny_model_path).glob("*.safetensors"))
    b = make_learner(tiny_model_path)
    b.load(ckpt, 2)
    ma, mb = a.train_step(steps[2]), b.train_step(steps[2])
    assert ma["train/loss"] == pytest.approx(mb["train/loss"], abs=1e-7)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=n)
    with pytest.raises(ValueError, match="rank"):
        make_learner(tiny_model_path, rank=2).load(ckpt, 2)


def test_export_merges_the_adapters_and_generates_the_learners_greedy_tokens(tiny_model_path, tmp_path):
    from rlhub.checkpoint import write_checkpoint
    from rlhub.engines.base import SamplingConfig
    from rlhub.engines.hf import HFEngine
    from rlhub.export import export

    learner = make_learner(tiny_model_path, rank=8)
    learner.warm_start(EXAMPLES, steps=6, batch_size=4, lr=3e-2)
    run_dir = tmp_path / "run"
    write_checkpoint(run_dir, 6, learner.save, {}, keep_last=1)
    report = export(run_dir, tmp_path / "export")
    assert report["lora"]["rank"] == 8 and report["lora"]["merged_weights"] == len(learner.adapted)
    want = [greedy(learner.model, p) for p in PROMPTS]
    assert want != [greedy(base_model(tiny_model_path), p) for p in PROMPTS]  # the adapters changed what the model says
    engine = HFEngine(str(tmp_path / "export"))
    got = engine.generate(PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0.0, stop_token_ids=(EOS,)))
    assert [c.token_ids for c in got] == want


# ---- bf16 -------------------------------------------------------------------------------------------------

def test_bf16_log_probs_stay_within_the_stated_tolerance_of_fp32(tiny_model_path):
    """bf16 autocast with the head and the log-softmax in fp32: on the tiny MoE the log-probs of a batch
    differ from fp32 by at most 0.05 (mean below 0.01), and they do differ (bf16 is on)."""
    from rlhub.learner import Learner
    from rlhub.models.logprobs import token_logprobs
    from rlhub.weight_sync import probe_sequence

    fp32 = Learner(tiny_model_path, ModelConfig(), AlgorithmConfig(), probe_sequence(259))
    bf16 = Learner(tiny_model_path, ModelConfig(), AlgorithmConfig(), probe_sequence(259), precision="bf16")
    batch = batches(tiny_model_path, steps=1)[0]
    with torch.no_grad():
        want, _, _ = token_logprobs(fp32.model, batch.input_ids, batch.attention_mask)
        with bf16.autocast():
            got, _, out = token_logprobs(bf16.model, batch.input_ids, batch.attention_mask)
    assert out.logits.dtype == torch.float32  # the head ran in fp32 under autocast
    mask = batch.attention_mask[:, 1:].bool()
    diff = (got - want).abs()[mask]
    assert float(diff.max()) < 0.05 and float(diff.mean()) < 0.01
    assert float(diff.max()) > 1e-5  # bf16 arithmetic did happen
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # master weights stay fp32


def test_bf16_lora_keeps_a_bf16_base_and_fp32_adapters(tiny_model_path):
    learner = make_learner(tiny_model_path, precision="bf16")
    for n, p in learner.model.named_parameters():
        assert p.dtype == (torch.float32 if lora.is_adapter_param(n) else torch.bfloat16), n
    metrics = learner.train_step(batches(tiny_model_path, steps=1)[0])
    assert metrics["train/policy_updated"] == 1.0
    assert {"time/learner/forward_s", "time/learner/backward_s", "time/learner/optimizer_s"} <= set(metrics)


def test_log_probs_of_a_kept_span_equal_the_full_computation(tiny_model_path):
    from rlhub.models.logprobs import completion_span, token_logprobs

    model = base_model(tiny_model_path)
    batch = batches(tiny_model_path, steps=1)[0]
    span = completion_span(batch.completion_mask)
    assert 0 < span < batch.input_ids.shape[1] - 1
    with torch.no_grad():
        full, full_ent, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, with_entropy=True)
        kept, kept_ent, out = token_logprobs(model, batch.input_ids, batch.attention_mask, with_entropy=True, keep=span)
    assert out.logits.shape[1] == span + 1  # the head ran on the span alone
    tail = slice(full.shape[1] - span, None)
    torch.testing.assert_close(kept[:, tail], full[:, tail])
    torch.testing.assert_close(kept_ent[:, tail], full_ent[:, tail])
    assert torch.all(kept[:, : full.shape[1] - span] == 0)
    assert torch.all(batch.completion_mask[:, : full.shape[1] - span] == 0)  # nothing the loss reads was cut


def test_config_checks_for_precision_lora_and_the_probe_tolerance():
    from rlhub.config import BF16_PROBE_TOLERANCE, ConfigError, FP32_PROBE_TOLERANCE, load_config

    assert load_config([]).rollout.probe_tolerance == FP32_PROBE_TOLERANCE
    assert load_config(["learner.precision=bf16"]).rollout.probe_tolerance == BF16_PROBE_TOLERANCE
    assert load_config(["rollout.dtype=bfloat16"]).rollout.probe_tolerance == BF16_PROBE_TOLERANCE
    assert load_config(["learner.precision=bf16", "rollout.probe_tolerance=0.2"]).rollout.probe_tolerance == 0.2
    for override, match in [("learner.precision=fp16", "learner.precision"), ("learner.attention=flash", "learner.attention"),
                            ("rollout.dtype=float16", "rollout.dtype"), ("model.lora.rank=-2", "model.lora.rank"),
                            ("model.lora.targets=[heads]", "model.lora.targets")]:
        with pytest.raises(ConfigError, match=match):
            load_config([override])
    with pytest.raises(ConfigError, match="world_size=1"):
        load_config(["model.lora.rank=8", "learner.world_size=2"])


def test_the_lora_experiment_composes():
    from rlhub.config import load_config

    cfg = load_config(["experiment=smollm2_moe_lora"])
    assert cfg.model.lora.rank == 16 and cfg.model.lora.targets == ["attention", "router"] and cfg.learner.share_prefix
    assert cfg.learner.precision == "bf16" and cfg.rollout.dtype == "bfloat16" and cfg.model.source == "smollm2_moe"
    assert cfg.experiment.total_steps == 40 and cfg.env.kwargs["max_operand"] == 19  # the rest is experiment=smollm2_moe
