"""The learner: recompute log-probs, apply the configured loss, step, publish.

Algorithm-blind: advantages (per token), behaviour log-probs and, with a
reference actor, reference log-probs arrive with the batch; the loss is looked
up by name. The critic, when there is one, trains beside it (`rlhub.scorers`).
Each optimizer step bumps the policy version by one. The MoE router's
load-balancing loss is added here and the expert load is measured from the
same forward pass.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from rlhub.algorithms import get_policy_loss
from rlhub.algorithms.config import AlgorithmConfig
from rlhub.algorithms.advantages import normalize_over_batch
from rlhub.algorithms.corrections import correct, kl_estimate
from rlhub.algorithms.losses import BatchNorms, LossConfig, PolicyLossInput, aggregate, masked, masked_mean
from rlhub.models.build import ModelConfig, is_moe
from rlhub.models.logprobs import RAW, SamplingPolicy, probe_logprobs, token_logprobs
from rlhub.types import GroupTensors


class Learner:
    def __init__(
        self,
        model_path: str,
        model_cfg: ModelConfig,
        algo: AlgorithmConfig,
        probe_ids: list[int],
        seed: int = 0,
        generation_budget: int = 16,
        policy: SamplingPolicy = RAW,
    ) -> None:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        self.model_path = model_path
        self.algo = algo
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, model_cfg.dtype)).to(self.device)
        self.model.train()
        self.moe = bool(is_moe(self.model))
        self.aux_coef = model_cfg.router_aux_loss_coef if self.moe else 0.0
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=algo.lr, betas=tuple(algo.adam_betas), weight_decay=algo.weight_decay
        )
        self.loss_fn = get_policy_loss(algo.policy_loss)
        self.loss_cfg = LossConfig(algo.clip_eps, algo.clip_eps_high, algo.dual_clip_c)
        self.generation_budget = float(generation_budget)
        self._reference: torch.nn.Module | None = None
        self.probe_ids = probe_ids
        self.policy = policy
        """The rollouts' sampling distribution: log-probs, ratios and KLs are computed under it."""
        self.version = 0
        self.nonfinite_in_row = 0

    # ---- one optimizer step -----------------------------------------------------
    def train_step(self, batch: GroupTensors) -> dict[str, float]:
        start = time.perf_counter()
        batch = batch.to(self.device)
        algo = self.algo
        mask = batch.completion_mask
        advantages = batch.advantages * mask  # [B, T]
        if algo.batch_normalize:
            advantages = normalize_over_batch(advantages, mask)
        n = batch.input_ids.shape[0]
        norms = BatchNorms(num_tokens=float(mask.sum()), num_seqs=float(n), constant=algo.loss_constant or self.generation_budget)
        sums: dict[str, float] = {}
        load: torch.Tensor | None = None  # [layers, experts] token counts
        self.optimizer.zero_grad(set_to_none=True)
        for lo in range(0, n, algo.micro_batch_size):
            mb = slice(lo, min(n, lo + algo.micro_batch_size))
            parts, out = self._micro_batch_loss(batch, advantages, mb, norms)
            parts["loss"].backward()
            share = float(mask[mb].sum()) / max(norms.num_tokens, 1.0)  # token share, for metrics that are means
            for k, v in parts.items():
                value = float(v.detach())
                if k.endswith("_max"):
                    sums[k] = max(sums.get(k, value), value)
                elif k in ("loss", "pg_loss", "kl_ref", "aux_loss_share"):
                    sums[k] = sums.get(k, 0.0) + value  # already this micro-batch's share of the batch value
                else:
                    sums[k] = sums.get(k, 0.0) + value * share
            if self.moe:
                counts = expert_counts(out.router_logits, batch.attention_mask[mb], self.model.config.num_experts_per_tok)
                load = counts if load is None else load + counts
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), algo.grad_clip)
        finite = math.isfinite(sums["loss"]) and math.isfinite(float(grad_norm))
        # a non-finite loss or gradient would poison the weights: skip the update, keep the version moving
        self.nonfinite_in_row = 0 if finite else self.nonfinite_in_row + 1
        update = finite and self.version >= algo.critic_warmup  # during the critic's warm-up the policy stays as it is
        if update:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {f"train/{k}": v for k, v in sums.items()}
        metrics["train/policy_updated"] = float(update)
        metrics["train/nonfinite_skipped"] = float(not finite)
        metrics["train/nonfinite_in_row"] = float(self.nonfinite_in_row)
        if "train/aux_loss_share" in metrics:
            metrics["train/aux_loss"] = metrics.pop("train/aux_loss_share") / max(self.aux_coef, 1e-12)
        metrics["train/grad_norm"] = float(grad_norm)
        metrics.update(staleness_metrics(batch, self.version))
        if load is not None:
            metrics.update(expert_load_metrics(load))
        metrics["train/tokens"] = norms.num_tokens
        metrics["rollout/reward_mean"] = float(batch.rewards.mean())
        metrics["rollout/reward_std"] = float(batch.rewards.std(unbiased=False))
        metrics["time/train_s"] = time.perf_counter() - start
        self.version += 1
        return metrics

    def skip_step(self) -> dict[str, float]:
        """A step with nothing to train on (its data was lost): the weights stay, the version advances."""
        self.version += 1
        return {"train/policy_updated": 0.0, "train/tokens": 0.0}

    def _micro_batch_loss(self, batch: GroupTensors, advantages: torch.Tensor, mb: slice, norms: BatchNorms) -> tuple[dict[str, torch.Tensor], Any]:
        """This micro-batch's share of the batch loss, and its parts for logging."""
        algo = self.algo
        mask = batch.completion_mask[mb]
        behaviour = batch.old_logprobs[mb]
        kwargs = {"output_router_logits": True} if self.moe else {}
        logprobs, entropy, out = token_logprobs(self.model, batch.input_ids[mb], batch.attention_mask[mb], with_entropy=True, policy=self.policy, **kwargs)
        corr = correct(logprobs, behaviour, mask, algo.correction, algo.tis_cap, (algo.icepop_low, algo.icepop_high))
        per_token, metrics = self.loss_fn(PolicyLossInput(logprobs, corr.old_logprobs, advantages[mb], corr.mask), self.loss_cfg)
        pg_loss = aggregate(per_token * corr.weights, corr.mask, algo.loss_agg, norms)
        token_share = mask.sum() / max(norms.num_tokens, 1.0)
        ent = masked_mean(entropy, mask)
        loss = pg_loss - algo.entropy_coef * ent * token_share
        parts = {"pg_loss": pg_loss, "entropy": ent, **metrics, **corr.metrics}
        with torch.no_grad():
            log_r = logprobs - behaviour
            parts["kl_behaviour"] = masked_mean(torch.exp(log_r) - 1.0 - log_r, mask)  # k3 of KL(behaviour || policy)
            same = mask * (batch.versions[mb] == self.version)  # tokens sampled by these very weights
            if same.sum() > 0:  # engine and learner compute the same distribution: ~0 unless the weights differ
                gap = torch.where(same.bool(), (logprobs - behaviour).abs(), torch.zeros_like(logprobs))
                parts["logprob_mismatch"] = gap.sum() / same.sum()
                parts["logprob_mismatch_max"] = gap.max()
        if algo.kl_coef > 0:
            if batch.ref_logprobs is not None:  # computed by the reference actor on the data side
                ref_lp = batch.ref_logprobs[mb]
            else:
                with torch.no_grad():
                    ref_lp, _, _ = token_logprobs(self.reference(), batch.input_ids[mb], batch.attention_mask[mb], policy=self.policy)
            kl = aggregate(kl_estimate(masked(logprobs, mask), masked(ref_lp, mask), algo.kl_estimator), mask, "token_mean", norms)
            if algo.kl_penalty == "loss":
                loss = loss + algo.kl_coef * kl
            parts["kl_ref"] = kl  # with kl_penalty=reward: logged only, the data side already subtracted it
        if self.moe:
            aux = self.aux_coef * out.aux_loss * (mask.shape[0] / norms.num_seqs)
            loss = loss + aux
            parts["aux_loss_share"] = aux
        parts["loss"] = loss
        return parts, out

    def reference(self) -> torch.nn.Module:
        """The frozen reference policy for the KL term: the policy as RL started (after any warm start)."""
        if self._reference is None:
            import copy

            self._reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        return self._reference

    # ---- format warm start ----------------------------------------------------------
    def warm_start(self, examples: list[tuple[list[int], list[int]]], steps: int, batch_size: int, lr: float, seed: int = 0) -> dict[str, float]:
        """Supervised steps on (prompt ids, answer ids) pairs, loss on the answer tokens only.

        With its own optimizer, so the RL optimizer starts fresh. Used with answers
        that ignore the prompt, it teaches the output format and nothing else.
        """
        start = time.perf_counter()
        opt = torch.optim.AdamW(self.model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(steps):
            idx = torch.randint(len(examples), (batch_size,), generator=gen).tolist()
            batch = _supervised_batch([examples[i] for i in idx], self.model.config.pad_token_id or 0).to(self.device)
            logprobs, _, _ = token_logprobs(self.model, batch.input_ids, batch.attention_mask)
            loss = -masked_mean(logprobs, batch.completion_mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return {"warm_start/loss_first": losses[0], "warm_start/loss_last": losses[-1], "warm_start/seconds": time.perf_counter() - start}

    # ---- what engines get -------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def probe(self) -> torch.Tensor:
        self.model.eval()
        try:
            return probe_logprobs(self.model, self.probe_ids)
        finally:
            self.model.train()

    # ---- checkpoints ------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Policy as an HF directory (safetensors) and the optimizer's tensors as safetensors."""
        from safetensors.torch import save_file

        self.model.save_pretrained(str(directory / "policy"))
        _copy_tokenizer(Path(self.model_path), directory / "policy")  # the policy directory is a whole HF model
        tensors, meta = flatten_optimizer(self.optimizer.state_dict())
        save_file(tensors, str(directory / "optimizer.safetensors"))
        (directory / "optimizer.json").write_text(json.dumps(meta))
        if self._reference is not None:  # a resumed run keeps its KL anchored to the same reference
            from safetensors.torch import save_model

            save_model(self._reference, str(directory / "reference.safetensors"))

    def load(self, directory: Path, version: int) -> None:
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        trained = AutoModelForCausalLM.from_pretrained(str(directory / "policy"), dtype=self.model.dtype)
        self.model.load_state_dict(trained.state_dict())
        meta = json.loads((directory / "optimizer.json").read_text())
        self.optimizer.load_state_dict(unflatten_optimizer(load_file(str(directory / "optimizer.safetensors")), meta))
        self.version = version
        if (directory / "reference.safetensors").is_file():
            from safetensors.torch import load_model

            load_model(self.reference(), str(directory / "reference.safetensors"))


def _supervised_batch(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> GroupTensors:
    from rlhub.types import Sample

    samples = [Sample(p, a, [0.0] * len(a), [0] * len(a), 0.0, None, "stop") for p, a in pairs]
    return GroupTensors.from_samples(samples, torch.zeros(len(samples)), pad_id)


def expert_counts(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor, top_k: int) -> torch.Tensor:
    """[layers, experts] number of real (unpadded) tokens routed to each expert."""
    valid = attention_mask.reshape(-1).bool()
    rows = []
    for logits in router_logits:  # [B*T, E] per MoE layer
        chosen = logits[valid].topk(top_k, dim=-1).indices
        rows.append(torch.bincount(chosen.flatten(), minlength=logits.shape[-1]).float())
    return torch.stack(rows).detach()


def expert_load_metrics(counts: torch.Tensor) -> dict[str, float]:
    frac = counts / counts.sum(-1, keepdim=True).clamp(min=1.0)  # [layers, experts]
    out: dict[str, float] = {}
    for layer, row in enumerate(frac):
        out[f"moe/layer{layer}/max_over_mean"] = float(row.max() / row.mean().clamp(min=1e-9))
        for e, f in enumerate(row.tolist()):
            out[f"moe/layer{layer}/expert{e}"] = f
    out["moe/max_over_mean"] = max(v for k, v in out.items() if k.endswith("max_over_mean"))
    return out


def staleness_metrics(batch: GroupTensors, learner_version: int) -> dict[str, float]:
    """Distribution of (learner version - token version) over trained tokens."""
    tok = batch.completion_mask.bool()
    lag = (learner_version - batch.versions[tok]).float()
    if lag.numel() == 0:
        return {}
    out = {"staleness/mean": float(lag.mean()), "staleness/max": float(lag.max()), "staleness/min": float(lag.min())}
    for k, c in zip(*torch.unique(lag.long(), return_counts=True)):
        out[f"staleness/frac_{int(k)}"] = float(c) / lag.numel()
    return out


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in state["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = t
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _copy_tokenizer(source: Path, target: Path) -> None:
    """The tokenizer's files (and chat template) from the model the run started from."""
    import shutil

    for f in source.iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")) or f.suffix == ".jinja"):
            shutil.copy2(f, target / f.name)
