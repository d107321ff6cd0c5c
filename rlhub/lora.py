"""LoRA for RL on a (Mixture-of-Experts) policy: only low-rank adapters train, travel and are saved.

`model.lora.rank=r` puts adapters on the modules `model.lora.targets` names:

- `attention`: the q, k, v and o projections (`nn.Linear`), through peft (`inject_adapter_in_model`:
  the model keeps its class, its base layers move under `base_layer`);
- `mlp`: a dense model's gate, up and down projections (peft likewise);
- `experts`: the fused experts of MoE layers, each expert its own pair of adapters on `gate_up_proj`
  and `down_proj` (`rlhub.models.experts.ExpertAdapters`, computed in the learner's sorted experts
  forward). peft adapts such a 3-D parameter too, but by rebuilding W + BA for every expert at each
  forward and forming the full expert-weight gradient in the backward: on the SmolLM2 MoE (one core,
  bf16 base) a step took 16-17 s that way against 10-11 s with the adapters computed beside the
  frozen experts, so the experts' adapters are rlhub's own;
- `router`: the MoE routers' weights train in full (E x hidden a layer, a few thousand numbers), so
  that the balance losses, whose gradient reaches the policy through the router logits, still act.
  Without it a load-balancing loss could only move the adapters feeding the router.

Whatever their origin, adapters leave the learner in one form, by the name of the base weight they
adapt (its name in the model's state dict before any adapter was put in): `NAME.lora_A` [r, in] and
`NAME.lora_B` [out, r] (an expert stack: [E, r, in] and [E, out, r]) with one scaling `alpha / r`
(`SCALING_KEY`); beside them, as whole tensors by their own names, the weights trained in full (the
routers) and the routers' selection biases (`moe.balance=aux_free` moves them every step, and the
engines route with them). `merged` adds scaling * B @ A to the base weights and takes the whole
tensors as they are: the rollout side does it to load a version into its engine, `rlhub export` to
write a plain HF directory. Checkpoints hold these tensors and the optimizer's state, not the base
model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch

from rlhub.models.config import LORA_TARGETS as TARGETS, LoraConfig

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SCALING_KEY = "rlhub_lora.scaling"
"""A 0-d tensor beside the adapters in a published version: the scaling `merge` applies."""
SUFFIXES = (".lora_A", ".lora_B")
ADAPTERS_DIR = "adapters"
"""A LoRA learner's checkpoint part (instead of `learner/` and `policy/`)."""
ADAPTERS_FILE = "adapters.safetensors"
REFERENCE_FILE = "reference_adapters.safetensors"
META_FILE = "lora.json"
OPTIMIZER_FILE = "optimizer.safetensors"
"""The optimizer's tensors by `<param index>.<name>` (AdamW's moments and step counts)."""
OPTIMIZER_META = "optimizer.json"
"""The rest of the optimizer's state: its parameter groups' hyperparameters and any non-tensor values."""
LEGACY_OPTIMIZER = "optimizer.pt"
"""Earlier checkpoints' optimizer state (`torch.save`); read with `weights_only=True` only."""


def apply(model: torch.nn.Module, cfg: LoraConfig, seed: int = 0) -> dict[str, str]:
    """Put adapters on `model` in place, freeze everything else; returns {adapted base weight: kind}.
    A ValueError names a target the model does not have."""
    from rlhub.models.experts import ExpertAdapters, experts_modules

    before = {id(p): n for n, p in model.named_parameters()}
    suffixes = [s for t, names in (("attention", ATTENTION), ("mlp", MLP)) if t in cfg.targets for s in names]
    adapted: dict[str, str] = {}
    if suffixes:
        linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in suffixes]
        if not linear:
            raise ValueError(f"model.lora.targets: {type(model).__name__} has no {suffixes} linear modules")
        from peft import LoraConfig as PeftLoraConfig, inject_adapter_in_model

        torch.manual_seed(seed)  # peft draws A with the global generator
        inject_adapter_in_model(PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=suffixes, lora_dropout=0.0), model)
        adapted.update({f"{n}.weight": "linear" for n in linear})
    full: list[str] = []
    if "router" in cfg.targets:
        from rlhub.moe import find_routers

        routers = {id(r) for r in find_routers(model)}
        full = [f"{n}.weight" for n, m in model.named_modules() if id(m) in routers]
        if not full:
            raise ValueError(f"model.lora.targets=router: {type(model).__name__} has no top-k MoE routers")
        adapted.update({n: "full" for n in full})
    if "experts" in cfg.targets:
        found = experts_modules(model)
        if not found:
            raise ValueError(f"model.lora.targets=experts: {type(model).__name__} has no fused experts (gate_up_proj, down_proj)")
        generator = torch.Generator().manual_seed(seed + 1)
        for name, module in found:
            experts, up2, hidden = module.gate_up_proj.shape
            module.rlhub_lora = ExpertAdapters(experts, hidden, up2, module.down_proj.shape[-1], cfg.rank, cfg.scaling, generator)
            adapted.update({f"{name}.gate_up_proj": "experts", f"{name}.down_proj": "experts"})
        from rlhub.models.experts import use_sorted_experts

        use_sorted_experts(model)  # the only implementation that computes the experts' adapters
    model.rlhub_lora_full = tuple(full)
    for n, p in model.named_parameters():
        p.requires_grad_((is_adapter_param(n) and id(p) not in before) or n in full)
    return adapted


def is_adapter_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".rlhub_lora." in name


def full_names(model: torch.nn.Module) -> tuple[str, ...]:
    """The parameters an adapted model trains in full (the routers under `router`)."""
    return getattr(model, "rlhub_lora_full", ())


def trained_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What an adapted model trains: its adapters and the parameters it trains in full."""
    full = set(full_names(model))
    return [p for n, p in model.named_parameters() if is_adapter_param(n) or n in full]


def adapter_items(model: torch.nn.Module, scaling: float) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) of every adapter in the published form (module docstring), then `SCALING_KEY`."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            base = f"{name}.weight"
            if abs(module.scaling["default"] - scaling) > 1e-12:
                raise ValueError(f"{name}: adapter scaling {module.scaling['default']} differs from {scaling}")
            yield f"{base}.lora_A", module.lora_A["default"].weight.detach()
            yield f"{base}.lora_B", module.lora_B["default"].weight.detach()
        adapters = getattr(module, "rlhub_lora", None)
        if adapters is not None and not isinstance(module, LoraLayer):
            for param in ("gate_up", "down"):
                yield f"{name}.{param}_proj.lora_A", getattr(adapters, f"{param}_A").detach()
                yield f"{name}.{param}_proj.lora_B", getattr(adapters, f"{param}_B").detach()
    params = dict(model.named_parameters())
    for name in full_names(model):
        yield name, params[name].detach()
    from rlhub.moe import BIAS_NAME

    for name, buffer in model.named_buffers():
        if name.endswith(f".{BIAS_NAME}"):
            yield name, buffer.detach()
    yield SCALING_KEY, torch.tensor(float(scaling))


def adapter_state(model: torch.nn.Module, scaling: float) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapter_items(model, scaling)}


def is_adapter_state(state: dict[str, Any]) -> bool:
    return SCALING_KEY in state


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapters in the published form into `model`'s adapters (names and shapes checked)."""
    own = {k: v for k, v in adapter_items(model, float(state[SCALING_KEY]))}
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise KeyError(f"adapters do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for k, dst in own.items():
            if k == SCALING_KEY:
                continue
            if dst.shape != state[k].shape:
                raise ValueError(f"adapter {k}: shape {tuple(state[k].shape)}, the model's is {tuple(dst.shape)}")
            dst.copy_(state[k])


def is_whole(name: str) -> bool:
    """A published tensor that is not an adapter half: a weight trained in full or a selection bias."""
    return name != SCALING_KEY and not name.endswith(SUFFIXES)


def base_name(adapter_name: str) -> str:
    for suffix in SUFFIXES:
        if adapter_name.endswith(suffix):
            return adapter_name[: -len(suffix)]
    raise ValueError(f"{adapter_name} is not an adapter name (ends with {SUFFIXES})")


def merged(base: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: base[name] + scaling * B @ A} for every weight `adapters` adapts, in the base weight's
    dtype (computed in fp32), and the whole tensors as published (in the base's dtype where the base has
    them: a selection bias need not be there). KeyError/ValueError name a weight the base lacks or a
    shape that differs."""
    scaling = float(adapters[SCALING_KEY])
    out: dict[str, torch.Tensor] = {}
    for key in adapters:
        if is_whole(key):
            if key in base and base[key].shape != adapters[key].shape:
                raise ValueError(f"{key}: published with shape {tuple(adapters[key].shape)}, the base's is {tuple(base[key].shape)}")
            out[key] = adapters[key].to(base[key].dtype) if key in base else adapters[key]
            continue
        if not key.endswith(".lora_A"):
            continue
        name = base_name(key)
        if name not in base:
            raise KeyError(f"adapter {key}: the base model has no weight {name}")
        a, b = adapters[key].float(), adapters[f"{name}.lora_B"].float()
        w = base[name]
        delta = torch.matmul(b, a) * scaling  # [out, in] or [E, out, in]
        if delta.shape != w.shape:
            raise ValueError(f"adapter of {name}: B @ A has shape {tuple(delta.shape)}, the weight {tuple(w.shape)}")
        out[name] = (w.float() + delta).to(w.dtype)
    return out


def base_state(model_path: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The weights of the HF model directory `model_path` by state-dict name, in `dtype`."""
    from transformers import AutoModelForCausalLM

    return {k: v.detach() for k, v in AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).state_dict().items()}


def merged_model_state(model_path: str, adapters: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The whole state dict of the model at `model_path` with `adapters` merged in (the critic and the
    reference start from the policy this way)."""
    base = base_state(model_path, dtype)
    return {**base, **merged(base, adapters)}


def adapted_names(adapters: dict[str, torch.Tensor]) -> list[str]:
    """The base weights a published version changes: the adapted ones and the ones trained in full."""
    from rlhub.moe import BIAS_NAME

    return [base_name(k) for k in adapters if k.endswith(".lora_A")] + [k for k in adapters if is_whole(k) and not k.endswith(BIAS_NAME)]


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# ---- checkpoints ----------------------------------------------------------------------------------

def save(directory: Path, model: torch.nn.Module, cfg: LoraConfig, optimizer: torch.optim.Optimizer, base_model: str,
         reference: torch.nn.Module | None = None) -> None:
    """`directory/adapters/`: the adapters (published form), the optimizer's state (tensors in safetensors, the
    rest in JSON: nothing here is unpickled on resume) and `lora.json`
    (rank, alpha, targets and the base model's directory, which `rlhub export` merges into); with a
    KL `reference` (a frozen copy of the adapted policy), its adapters too."""
    from safetensors.torch import save_file

    target = directory / ADAPTERS_DIR
    target.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter_items(model, cfg.scaling)}, str(target / ADAPTERS_FILE))
    if reference is not None:
        save_file({k: v.contiguous() for k, v in adapter_items(reference, cfg.scaling)}, str(target / REFERENCE_FILE))
    tensors, values = flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(target / OPTIMIZER_FILE))
    (target / OPTIMIZER_META).write_text(json.dumps(values, indent=1) + "\n")
    meta = {"rank": cfg.rank, "alpha": cfg.alpha, "targets": list(cfg.targets), "base_model": str(Path(base_model).resolve())}
    (target / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def read(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(adapters in the published form, lora.json) of a checkpoint directory (or its adapters/)."""
    from safetensors.torch import load_file

    target = directory / ADAPTERS_DIR if (directory / ADAPTERS_DIR).is_dir() else directory
    return load_file(str(target / ADAPTERS_FILE)), json.loads((target / META_FILE).read_text())


def has_adapters(directory: Path) -> bool:
    return (directory / ADAPTERS_DIR / META_FILE).is_file()


def has_reference(directory: Path) -> bool:
    return (directory / ADAPTERS_DIR / REFERENCE_FILE).is_file()


def load(directory: Path, model: torch.nn.Module, cfg: LoraConfig, optimizer: torch.optim.Optimizer,
         reference: torch.nn.Module | None = None) -> None:
    """Resume `model`'s adapters and `optimizer` (and the KL `reference`'s adapters, when saved)."""
    from safetensors.torch import load_file

    adapters, meta = read(directory)
    if meta["rank"] != cfg.rank or sorted(meta["targets"]) != sorted(cfg.targets):
        raise ValueError(f"{directory}: adapters of rank {meta['rank']} on {meta['targets']}; this run has model.lora.rank="
                         f"{cfg.rank} on {list(cfg.targets)}")
    load_adapter_state(model, adapters)
    optimizer.load_state_dict(read_optimizer(directory / ADAPTERS_DIR, optimizer))
    if reference is not None:
        load_adapter_state(reference, load_file(str(directory / ADAPTERS_DIR / REFERENCE_FILE)))


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state dict as (tensors by "<param index>.<name>", the rest as JSON-ready values)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def read_optimizer(target: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state saved in `target` (an adapters/ directory): safetensors and JSON, or an earlier
    checkpoint's optimizer.pt read with `weights_only=True`. Values that were tuples (AdamW's betas) come
    back as tuples."""
    from safetensors.torch import load_file

    if not (target / OPTIMIZER_FILE).is_file() and (target / LEGACY_OPTIMIZER).is_file():
        return torch.load(target / LEGACY_OPTIMIZER, weights_only=True)
    meta = json.loads((target / OPTIMIZER_META).read_text())
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in load_file(str(target / OPTIMIZER_FILE)).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = tensor
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    live = optimizer.state_dict()["param_groups"]
    groups = [{k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in saved.items()}
              for saved, now in zip(meta["param_groups"], live)] + meta["param_groups"][len(live):]
    return {"state": state, "param_groups": groups}
