"""rlhub.convert on a tiny random Llama: upcycling keeps the dense function, noise and router are as asked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhub.convert import UPCYCLE_RECORD, hf_name, unpermute_rope_rows, upcycle

LAYERS, HIDDEN, INTER = 3, 64, 96


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    """A tiny dense Llama with the byte tokenizer; a wide init so the MLP weighs on the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhub.models.tokenizer import save_byte_tokenizer

    path = tmp_path_factory.mktemp("dense")
    cfg = LlamaConfig(
        vocab_size=259, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, tie_word_embeddings=True,
        eos_token_id=258, pad_token_id=256, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # norms that differ from their init, so a lost copy shows
    model.save_pretrained(str(path))
    save_byte_tokenizer(path)
    return path


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    return model.eval()


def _prompt_ids(path: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    chat = [{"role": "user", "content": "upcycle me, please"}]
    return tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]


@pytest.fixture(scope="module")
def exact_moe(dense_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moe") / "exact"
    report = upcycle(dense_dir, out, num_experts=4, top_k=2, noise=0.0, seed=0)
    assert report["parameters_moe"] - report["parameters_dense"] == LAYERS * (3 * 3 * HIDDEN * INTER + 4 * HIDDEN)  # 3 more experts, a router
    return out


def test_zero_noise_upcycle_keeps_the_dense_model(dense_dir, exact_moe):
    dense, moe = _load(dense_dir), _load(exact_moe)
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    ids = _prompt_ids(exact_moe)
    with torch.no_grad():
        a, b = dense(ids).logits, moe(ids).logits  # [1, T, V]
    assert (a - b).abs().max().item() < 1e-5
    gen = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=256)
    assert torch.equal(dense.generate(ids, **gen), moe.generate(ids, **gen))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(exact_moe)).chat_template == AutoTokenizer.from_pretrained(str(dense_dir)).chat_template
    record = json.loads((exact_moe / UPCYCLE_RECORD).read_text())
    assert record["source"] == str(dense_dir.resolve()) and (record["num_experts"], record["top_k"], record["noise"], record["seed"]) == (4, 2, 0.0, 0)


def test_saved_in_mixtral_layout_that_vllm_reads(dense_dir, exact_moe):
    """On disk each expert is w1 (gate), w3 (up), w2 (down) under block_sparse_moe, as Mixtral checkpoints are."""
    from safetensors.torch import load_file

    dense, moe = load_file(str(dense_dir / "model.safetensors")), load_file(str(exact_moe / "model.safetensors"))
    for i in range(LAYERS):
        d, m = f"model.layers.{i}.mlp.", f"model.layers.{i}.block_sparse_moe."
        assert moe[m + "gate.weight"].shape == (4, HIDDEN)
        for e in range(4):
            for w, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                assert torch.equal(moe[m + f"experts.{e}.{w}.weight"], dense[d + f"{proj}.weight"])


def test_noise_sets_experts_apart_by_the_requested_scale(dense_dir, tmp_path):
    noise = 0.05
    dense = _load(dense_dir).state_dict()
    moe = _load(upcycle(dense_dir, tmp_path / "noisy", noise=noise, seed=3)["out"]).state_dict()
    for i in range(LAYERS):
        d, m = f"model.layers.{i}.mlp.", f"model.layers.{i}.mlp.experts."
        gate, up = moe[m + "gate_up_proj"].split(INTER, dim=1)  # [E, I, H] each, gate rows first
        for expert, w in ((gate, dense[d + "gate_proj.weight"]), (up, dense[d + "up_proj.weight"]), (moe[m + "down_proj"], dense[d + "down_proj.weight"])):
            delta = (expert - w) / w.std()  # [E, ...]: the noise in units of the weight's std
            assert delta.std().item() == pytest.approx(noise, rel=0.05)
            assert delta.mean().abs().item() < noise / 10
            assert not torch.allclose(expert[0], expert[1], atol=noise * w.std().item() / 10)
            corr = torch.corrcoef(delta.flatten(1))  # [E, E]: each expert its own draw
            assert (corr - torch.eye(len(corr))).abs().max().item() < 0.2


def test_router_is_not_a_tie(exact_moe):
    moe = _load(exact_moe)
    ids = _prompt_ids(exact_moe)
    with torch.no_grad():
        router_logits = moe(ids, output_router_logits=True).router_logits  # per layer [T, E]
    picked = set()
    for logits in router_logits:
        top = logits.topk(3, dim=-1).values  # [T, 3]
        assert (top[:, 1] - top[:, 2]).min().item() > 1e-6  # the k-th and (k+1)-th expert never tie
        choices = {tuple(sorted(row)) for row in logits.topk(2, dim=-1).indices.tolist()}
        assert len(choices) >= 2  # tokens are routed differently in every layer
        picked.update(*choices)
    assert picked == {0, 1, 2, 3}  # and every expert gets tokens


def test_a_non_llama_model_is_refused(tmp_path):
    from transformers import Qwen3MoeConfig

    Qwen3MoeConfig(vocab_size=259, hidden_size=32, num_hidden_layers=1).save_pretrained(str(tmp_path / "qwen"))
    with pytest.raises(ValueError, match="'qwen3_moe'"):
        upcycle(tmp_path / "qwen", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_not_overwritten(dense_dir, exact_moe):
    before = (exact_moe / UPCYCLE_RECORD).read_text()
    with pytest.raises(FileExistsError, match=str(exact_moe)):
        upcycle(dense_dir, exact_moe, noise=0.1)
    assert (exact_moe / UPCYCLE_RECORD).read_text() == before


def test_unpermute_inverts_llama_cpp_rope_order():
    """llama.cpp stores each head's rotary pair (rows i, i + d/2) as adjacent rows (2i, 2i + 1)."""
    heads, head_dim, cols = 3, 8, 5
    hf = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    gguf = np.empty_like(hf)
    for h in range(heads):
        for i in range(head_dim // 2):
            gguf[h * head_dim + 2 * i] = hf[h * head_dim + i]
            gguf[h * head_dim + 2 * i + 1] = hf[h * head_dim + head_dim // 2 + i]
    np.testing.assert_array_equal(unpermute_rope_rows(gguf, heads), hf)


def test_gguf_names_map_to_llama_names():
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    with pytest.raises(ValueError, match="rope_freqs"):
        hf_name("rope_freqs.weight")


def test_cli_upcycle_prints_the_report_and_refuses_to_overwrite(dense_dir, tmp_path, capsys):
    from rlhub.cli import main

    out = tmp_path / "cli_moe"
    assert main(["convert", "upcycle", str(dense_dir), "--out", str(out), "--experts", "3", "--top-k", "1", "--seed", "7", "--dtype", "bfloat16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["num_experts"], report["top_k"], report["seed"], report["noise"]) == (3, 1, 7, 0.01)
    assert _load(out).config.num_local_experts == 3 and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / UPCYCLE_RECORD).read_text()) == report
    assert main(["convert", "upcycle", str(dense_dir), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
