"""Build or locate the policy's Hugging Face model directory.

`model=tiny_moe` builds a Qwen3-MoE from a config at random init with the
offline byte tokenizer and saves it as an ordinary HF directory (cached by the
config's hash) that both transformers and vLLM load. `model.path=DIR` uses any
local HF causal-LM directory instead. torch is imported only to build a model,
so finding one that exists is instant.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from rlhub.models.config import ModelConfig
from rlhub.models.tokenizer import save_byte_tokenizer
from rlhub.moe_config import GROUPS_KEY

__all__ = ["ModelConfig", "build_tiny_moe", "cache_dir", "is_moe", "load_policy", "resolve_model_path"]


def cache_dir() -> Path:
    root = os.environ.get("RLHUB_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "rlhub")
    return Path(root)


def resolve_model_path(cfg: ModelConfig) -> Path:
    """The HF directory for this config, building the tiny MoE on first use. A given `model.path` is
    checked first (`rlhub.models.check`): a damaged directory is a ConfigError naming the file."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path={cfg.path!r}: no Hugging Face model directory there (config.json missing)")
        from rlhub.config import ConfigError
        from rlhub.models.check import check_model_dir

        try:
            check_model_dir(path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return path
    if cfg.source in ("smollm2", "smollm2_moe"):
        return build_smollm2(cfg)
    return build_tiny_moe(cfg)


SOURCES = ("tiny_moe", "smollm2", "smollm2_moe")


def build_smollm2(cfg: ModelConfig, root: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct converted from the installed GGUF (once), and for `smollm2_moe` upcycled
    (once per experts, top-k, noise and seed)."""
    from rlhub.convert import convert_gguf, is_complete, smollm2_gguf_path, upcycle

    root = root or cache_dir() / "models"
    dense = root / f"smollm2-135m-instruct-{cfg.dtype}"
    if not is_complete(dense, "rlhub_convert.json"):
        convert_gguf(smollm2_gguf_path(), dense, dtype=cfg.dtype)
    if cfg.source == "smollm2":
        return dense
    grouped = f"-g{cfg.expert_groups}" if cfg.expert_groups > 1 else ""
    moe = root / f"smollm2_moe-e{cfg.num_experts}k{cfg.experts_per_token}{grouped}-noise{cfg.upcycle_noise:g}-seed{cfg.init_seed}-{cfg.dtype}"
    if not is_complete(moe, "rlhub_upcycle.json"):
        upcycle(dense, moe, num_experts=cfg.num_experts, top_k=cfg.experts_per_token, noise=cfg.upcycle_noise, seed=cfg.init_seed,
                dtype=cfg.dtype, groups=cfg.expert_groups)
    return moe


def _arch_fields(cfg: ModelConfig) -> dict:
    d = asdict(cfg)
    for k in ("name", "path", "source", "upcycle_noise"):
        d.pop(k)
    if d["expert_groups"] == 1:
        d.pop("expert_groups")  # the directories of plain top-k models keep the names they had
    return d


def build_tiny_moe(cfg: ModelConfig, root: Path | None = None) -> Path:
    """Build (once) and return the directory of the tiny Qwen3-MoE described by `cfg`."""
    fields = _arch_fields(cfg)
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    out = (root or cache_dir() / "models") / f"tiny_moe-{digest}"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_byte_tokenizer(tmp)
    hf_cfg = Qwen3MoeConfig(
        vocab_size=259,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.expert_intermediate_size * 2,
        moe_intermediate_size=cfg.expert_intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.experts_per_token,
        norm_topk_prob=True,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=258,
        pad_token_id=256,
        decoder_sparse_step=1,
        dtype=cfg.dtype,
    )
    if cfg.expert_groups > 1:
        setattr(hf_cfg, GROUPS_KEY, cfg.expert_groups)
    torch.manual_seed(cfg.init_seed)
    model = Qwen3MoeForCausalLM(hf_cfg).to(getattr(torch, cfg.dtype))
    model.save_pretrained(str(tmp))
    rename_into_place(tmp, out)
    return out


def rename_into_place(tmp: Path, out: Path) -> None:
    """A directory written aside (`tmp`) takes its final name; where another process built `out` first,
    its copy stays and this one is removed."""
    try:
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def load_policy(path: Path, dtype: str = "float32"):
    """(model, tokenizer) from an HF directory, on CPU, in train-ready fp dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    return model, tok


def is_moe(model) -> bool:
    return getattr(model.config, "num_experts", None) or getattr(model.config, "num_local_experts", None)
