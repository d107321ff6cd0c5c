"""Export a trained policy as a plain Hugging Face directory that transformers and vLLM load as they are.

Sits after training: `rlhub export RUN_DIR|CHECKPOINT` takes the policy of a run's
latest checkpoint (`checkpoints/step_N/policy/`, see `rlhub.checkpoint`) or of
one checkpoint, and writes safetensors (`save_pretrained`), the config, the
generation config and the tokenizer with its chat template. A policy directory
may hold tensors plain transformers does not know: the routers' selection bias
(`*.selection_bias`, `moe.balance=aux_free`), which only shifts which experts
are chosen. They are left out; when one is non-zero the report warns that the
exported model routes without it. A model that routes in expert groups
(`rlhub_expert_groups` in its config, `moe.routing=grouped`) keeps that key, but
only rlhub's hf engine applies it: plain transformers and vLLM route plain top-k,
another function; the report warns, the warning is logged, and a README.md in
the export says so. The directory is written aside, reloaded and compared tensor
for tensor, then renamed into place, as checkpoints are.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rlhub.checkpoint import (
    MANIFEST,
    latest_checkpoint,
    list_checkpoints,
    readable_checkpoint,
    verify_checkpoint,
)
from rlhub.moe import BIAS_NAME
from rlhub.moe_config import GROUPS_KEY

log = logging.getLogger("rlhub.export")

DTYPES = ("float32", "bfloat16")
EXPORT_RECORD = "rlhub_export.json"
"""Written last into the export: its report. Marks a directory a later export may replace."""
BIAS_SUFFIX = f".{BIAS_NAME}"
"""The names of the routers' selection biases end with it."""
TOKENIZER_PREFIXES = ("tokenizer", "special_tokens", "chat_template", "added_tokens", "vocab", "merges")


def verified(path: Path | str) -> Path:
    """What `export` reads at `path`, verified against its checkpoint's manifest first: for a run
    directory, its newest checkpoint that verifies (`rlhub.checkpoint.readable_checkpoint`: a damaged
    newer one is named in a warning); a checkpoint directory, or a checkpoint's policy directory, as
    given once it verifies (CheckpointError naming the damaged file otherwise)."""
    path = Path(path)
    if path.is_dir() and list_checkpoints(path):
        return readable_checkpoint(path) or path  # never None here: the run has checkpoints
    for at in (path, path.parent):
        if (at / MANIFEST).is_file():
            verify_checkpoint(at)
            break
    return path


def find_policy(path: Path | str) -> Path:
    """The policy directory to export: a run directory's latest checkpoint's, a checkpoint's, or
    `path` itself when it is a policy directory. FileNotFoundError saying what was looked for."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"export: {path} is not a directory (give a run directory or a checkpoint directory)")
    for candidate in (path / "policy", path):
        if (candidate / "config.json").is_file():
            return candidate
    ckpt = latest_checkpoint(path)
    if ckpt is not None and (ckpt / "policy" / "config.json").is_file():
        return ckpt / "policy"
    for at in (path, ckpt):  # separate policies (agents.policies=separate): one directory each, none to pick for the user
        if at is not None and (at / "policies").is_dir():
            raise FileNotFoundError(f"export: {at} holds one policy per agent; name one: "
                                    + ", ".join(str(p) for p in sorted((at / "policies").iterdir())))
    raise FileNotFoundError(f"export: {path} is neither a run directory with a checkpoint (checkpoints/step_N/policy/) "
                            "nor a checkpoint directory (policy/config.json)")


def find_adapters(path: Path | str) -> Path | None:
    """The checkpoint directory holding LoRA adapters (`adapters/`, `rlhub.lora`) that `path` names: a
    run directory whose latest checkpoint has them, or such a checkpoint; None otherwise."""
    from rlhub import lora

    path = Path(path)
    for candidate in (path, path.parent, latest_checkpoint(path) if path.is_dir() else None):
        if candidate is not None and lora.has_adapters(candidate):
            return candidate
    return None


def export(path: Path | str, out: Path | str, dtype: str | None = None) -> dict[str, Any]:
    """Write the policy at `path` (see `find_policy`) to `out` as an HF directory in `dtype` (default:
    the checkpoint's); returns the report {path, source, parameters, dtype, checked_tensors, dropped, expert_groups,
    warnings}. `out` may not exist yet, or be an earlier export, which is replaced."""
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    path = verified(path)
    adapters_at = find_adapters(path)
    adapters, meta = ({}, {}) if adapters_at is None else _read_adapters(adapters_at)
    policy = Path(meta["base_model"]) if adapters_at is not None else find_policy(path)
    out = Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if out.exists() and not (out / EXPORT_RECORD).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"export: {out} exists and is not an earlier export; remove it or choose another --out")
    names, biases = _stored_tensors(policy)
    dtype = dtype or _stored_dtype(policy)
    model, info = AutoModelForCausalLM.from_pretrained(str(policy), dtype=getattr(torch, dtype), output_loading_info=True)
    unknown = sorted(set(info["unexpected_keys"]) - set(biases))
    if info["missing_keys"] or unknown or info["mismatched_keys"]:
        raise ValueError(f"export: {policy} does not load as its config says: missing {sorted(info['missing_keys'])[:5]}, "
                         f"unexpected {unknown[:5]}, mismatched {sorted(info['mismatched_keys'])[:5]}")
    if adapters:  # W + scaling * B @ A into each adapted weight, computed in fp32
        from rlhub import lora

        with torch.no_grad():
            for name, tensor in lora.merged(model.state_dict(), adapters).items():
                if name.endswith(BIAS_SUFFIX):  # a router's selection bias: dropped as a full checkpoint's is
                    biases[name] = tensor
                    continue
                model.get_parameter(name).copy_(tensor)

    def write(tmp: Path) -> dict[str, Any]:
        model.save_pretrained(str(tmp))  # also the generation config, when the model has one
        _copy_tokenizer(policy, tmp)
        written, _ = _stored_tensors(tmp)
        if written != names - set(biases):
            raise ValueError(f"export: the written tensors differ from the checkpoint's: {sorted(written ^ (names - set(biases)))[:5]}")
        checked = _check_reload(tmp, model)
        groups = int(getattr(model.config, GROUPS_KEY, None) or 1)
        cautions = _bias_warnings(biases) + _group_warnings(groups)
        if groups > 1:
            (tmp / "README.md").write_text(f"# Grouped-expert MoE exported by rlhub\n\n{_group_warnings(groups)[0]}\n")
        report = {
            "path": str(out),
            "source": str(policy),
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": dtype,
            "checked_tensors": checked,
            "dropped": sorted(biases),
            "expert_groups": groups,
            "lora": None if not adapters else {"checkpoint": str(adapters_at), "rank": meta["rank"], "alpha": meta["alpha"],
                                               "targets": meta["targets"], "merged_weights": len(lora_names(adapters))},
            "warnings": cautions,
            "seconds": round(time.perf_counter() - start, 2),
        }
        (tmp / EXPORT_RECORD).write_text(json.dumps(report, indent=1))
        return report

    report = _write_aside(out, write)
    for warning in report["warnings"]:
        log.warning("export %s: %s", out, warning)
    return report


def _read_adapters(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from rlhub import lora

    adapters, meta = lora.read(checkpoint)
    if not (Path(meta["base_model"]) / "config.json").is_file():
        raise FileNotFoundError(f"export: the LoRA checkpoint {checkpoint} adapts {meta['base_model']}, which is not an HF model "
                                "directory (any more); the base model is needed to merge the adapters into")
    return adapters, meta


def lora_names(adapters: dict[str, Any]) -> list[str]:
    from rlhub import lora

    return lora.adapted_names(adapters)


def _stored_tensors(model_dir: Path) -> tuple[set[str], dict[str, Any]]:
    """(every tensor name in the directory's safetensors, the selection biases among them by name)."""
    from safetensors import safe_open

    names: set[str] = set()
    biases: dict[str, Any] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as tensors:
            for key in tensors.keys():
                names.add(key)
                if key.endswith(BIAS_SUFFIX):
                    biases[key] = tensors.get_tensor(key)
    if not names:
        raise FileNotFoundError(f"export: {model_dir} holds no *.safetensors weights")
    return names, biases


def _stored_dtype(model_dir: Path) -> str:
    """The dtype the checkpoint's config records (the policy's training dtype)."""
    config = json.loads((model_dir / "config.json").read_text())
    stored = config.get("dtype") or config.get("torch_dtype") or "float32"
    if stored not in DTYPES:
        raise ValueError(f"export: {model_dir} is stored as {stored}; choose the export's dtype ({', '.join(DTYPES)})")
    return stored


def _bias_warnings(biases: dict[str, Any]) -> list[str]:
    moved = {k: float(v.abs().max()) for k, v in biases.items() if bool(v.any())}
    if not moved:
        return []
    return [f"{len(moved)} of {len(biases)} routers carry a non-zero selection bias (moe.balance=aux_free; |bias| up to "
            f"{max(moved.values()):.3g}). It shifted which experts the trained policy chose; transformers and vLLM have no "
            "such bias, so the exported model routes without it and may choose other experts than the policy did in training."]


def _group_warnings(groups: int) -> list[str]:
    if groups == 1:
        return []
    return [f"The model routes every token to top_k/{groups} experts in each of {groups} expert groups ({GROUPS_KEY}={groups} "
            "in config.json, moe.routing=grouped). rlhub's hf engine (rollout.engine=hf) serves it exactly; plain transformers "
            "and vLLM (its Mixtral and Qwen3-MoE kernels) ignore the key and route plain top-k over all experts, so they "
            "compute a different function from the trained policy's."]


def _copy_tokenizer(source: Path, target: Path) -> None:
    """The tokenizer's files and chat template, byte for byte (the checkpoint copied them from the base model)."""
    copied = []
    for f in source.iterdir():
        if f.is_file() and (f.name.startswith(TOKENIZER_PREFIXES) or f.suffix == ".jinja"):
            shutil.copy2(f, target / f.name)
            copied.append(f.name)
    if not copied:
        raise FileNotFoundError(f"export: {source} has no tokenizer files (tokenizer.json, tokenizer_config.json)")


def _check_reload(model_dir: Path, model: Any) -> int:
    """The written directory loads with no missing, unexpected or mismatched keys and every tensor
    equal to the exported model's; returns how many tensors were compared."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    back, info = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=model.dtype, output_loading_info=True)
    problems = {k: sorted(v)[:5] for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ValueError(f"export: {model_dir} does not load cleanly: {problems}")
    want, got = model.state_dict(), back.state_dict()
    differ = [k for k in want if k not in got or not got[k].equal(want[k])]
    if differ or got.keys() != want.keys():
        raise ValueError(f"export: tensors changed on the way through disk: {differ[:5]}")
    AutoTokenizer.from_pretrained(str(model_dir))  # the tokenizer loads from the export alone
    return len(want)


def _write_aside(out: Path, write: Any) -> dict[str, Any]:
    """`write(tmp)` into a hidden sibling of `out`, then renamed to `out` (replacing what is there: checked
    by the caller to be an earlier export or empty)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (out.parent / f".{out.name}.{kind}-{os.getpid()}" for kind in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        report = write(tmp)
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)  # atomic on one filesystem: the export is whole or absent
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return report
