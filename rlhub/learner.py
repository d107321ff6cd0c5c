"""The learner: recompute log-probs, apply the configured loss, step, publish.

Algorithm-blind: advantages (per token), behaviour log-probs and, with a
reference actor, reference log-probs arrive with the batch; the loss is looked
up by name. The critic, when there is one, trains beside it (`rlhub.scorers`).
Each optimizer step bumps the policy version by one. For an MoE policy the
routers are under `rlhub.moe`: the learner replays the engine's routing
(`moe.routing_replay`), adds the load-balancing and z-loss terms
(`moe.balance`), measures the expert load from the same forward pass, and
measures how far its own routing and log-probs are from the engine's.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
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
from rlhub.moe import BIAS_NAME, Balancer, BalanceStep, MoEConfig, set_differs
from rlhub.types import GroupTensors, micro_batches


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
        moe: MoEConfig | None = None,
        replay: bool = False,
    ) -> None:
        """`replay`: route every recorded position to the experts the engine used (R3), as
        `rlhub.moe.replay_enabled` decided for the run's engine."""
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        self.model_path = model_path
        self.algo = algo
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, model_cfg.dtype)).to(self.device)
        self.model.train()
        self.moe_cfg = moe or MoEConfig()
        self.balancer = Balancer(self.model, self.moe_cfg, replay) if is_moe(self.model) else None
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
    def train_step(self, batch: GroupTensors) -> dict[str, Any]:
        """One optimizer step on `batch`; the policy version +1. Returns the step's metrics, and under
        "learned" the (group id, tokens) pairs read off the micro-batches the loss was computed on:
        what the learner really trained on, which the ledger reconciles against what it was sent."""
        start = time.perf_counter()
        batch = batch.to(self.device)
        algo = self.algo
        mask = batch.completion_mask
        advantages = batch.advantages * mask  # [B, T]
        if algo.batch_normalize:
            advantages = normalize_over_batch(advantages, mask)
        n = batch.input_ids.shape[0]
        norms = BatchNorms(num_tokens=float(mask.sum()), num_seqs=float(n), constant=algo.loss_constant or self.generation_budget)
        parts = [(batch.rows(idx, width), advantages.index_select(0, idx)[:, : width - 1])
                 for idx, width in micro_batches(batch.attention_mask.sum(-1), algo.micro_batch_size, algo.micro_batch_tokens)]
        measure = self.balancer is not None and self.moe_cfg.mismatch_every > 0 and self.version % self.moe_cfg.mismatch_every == 0
        balance = None
        if self.balancer is not None:
            def forward(i: int) -> None:  # the routers' choices are all the global-batch balance needs
                token_logprobs(self.model, parts[i][0].input_ids, parts[i][0].attention_mask, policy=self.policy)

            prepass = self.balancer.routing_pass([(p.attention_mask, p.routes) for p, _ in parts], forward) if len(parts) > 1 else None
            balance = self.balancer.begin(batch.attention_mask, batch.routes, prepass)
        sums: dict[str, float] = {}
        agreement: dict[str, float] = {}  # sums behind the mismatch metrics
        learned: dict[int, int] = {}  # group id -> its tokens that carried the loss, read off the tensors trained on
        self.optimizer.zero_grad(set_to_none=True)
        for part, part_advantages in parts:
            mask_mb = part.completion_mask
            parts_loss, logprobs, capture = self._micro_batch_loss(part, part_advantages, norms, balance)
            _count_groups(learned, part)
            parts_loss["loss"].backward()
            share = float(mask_mb.sum()) / max(norms.num_tokens, 1.0)  # token share, for metrics that are means
            for k, v in parts_loss.items():
                value = float(v.detach())
                if k.endswith("_max"):
                    sums[k] = max(sums.get(k, value), value)
                elif k in ("loss", "pg_loss", "kl_ref", "aux_loss", "z_loss"):
                    sums[k] = sums.get(k, 0.0) + value  # already this micro-batch's share of the batch value
                else:
                    sums[k] = sums.get(k, 0.0) + value * share
            for k, v in self._agreement(part, logprobs.detach(), capture, measure).items():
                agreement[k] = max(agreement.get(k, v), v) if k.endswith("_max") else agreement.get(k, 0.0) + v
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
        metrics["train/grad_norm"] = float(grad_norm)
        metrics.update(agreement_metrics(agreement))
        metrics.update(staleness_metrics(batch, self.version))
        if balance is not None:
            metrics.update(self.balancer.end(balance, update))
            metrics["moe/routing_replay"] = float(self.balancer.replay and batch.routes is not None)
        metrics["train/tokens"] = norms.num_tokens
        metrics["train/groups"] = float(len(learned))
        metrics["learned"] = sorted(learned.items())
        metrics["rollout/reward_mean"] = float(batch.rewards.mean())
        metrics["rollout/reward_std"] = float(batch.rewards.std(unbiased=False))
        metrics["time/train_s"] = time.perf_counter() - start
        self.version += 1
        return metrics

    def skip_step(self) -> dict[str, Any]:
        """A step with nothing to train on (its data was lost): the weights stay, the version advances."""
        self.version += 1
        return {"train/policy_updated": 0.0, "train/tokens": 0.0, "train/groups": 0.0, "learned": []}

    def _agreement(self, batch: GroupTensors, logprobs: torch.Tensor, capture: Any, measure: bool) -> dict[str, float]:
        """Sums for how far the learner is from the engine. On tokens the engine sampled with these very
        weights (version == the learner's) the log-prob gap is numerical mismatch alone; on all
        generated tokens it also holds the policy's change since. On measuring steps of an MoE policy
        with recorded routing: the gap of the other forward too (fresh routing under replay, replayed
        without), and the share of recorded (position, layer) pairs whose top-k sets differ between
        the engine's record and the learner's router at that position, in the forward the learner
        trains with (under replay: given the engine's computation of every earlier position, so one
        differing route does not count again at every later position)."""
        mask = batch.completion_mask
        same = mask * (batch.versions == self.version)
        gap = (logprobs - batch.old_logprobs).abs()
        out = {"tokens": float(mask.sum()), "gap_all": float((gap * mask).sum()), "same_tokens": float(same.sum())}
        if out["same_tokens"] > 0:
            out["gap_same"] = float((gap * same).sum())
            out["gap_same_max"] = float((gap * same).max())
        routes = None if batch.routes is None else batch.routes
        if not measure or routes is None:
            return out
        replayed = self.balancer.replay
        with torch.no_grad(), self.balancer.micro_batch(batch.attention_mask, routes, replay=not replayed):
            other, _, _ = token_logprobs(self.model, batch.input_ids, batch.attention_mask, policy=self.policy)
        other_gap = (other - batch.old_logprobs).abs()
        this, that = ("replay", "fresh") if replayed else ("fresh", "replay")
        out[f"gap_all_{this}"], out[f"gap_all_{that}"] = out["gap_all"], float((other_gap * mask).sum())
        if out["same_tokens"] > 0:
            out[f"gap_same_{this}"], out[f"gap_same_{that}"] = out["gap_same"], float((other_gap * same).sum())
        b, width = batch.input_ids.shape
        fresh = torch.stack([rec.fresh.view(b, width, -1)[:, :-1] for rec in capture.layers], dim=2)  # [b, T-1, L, K]
        recorded = (routes >= 0).all(-1).all(-1)  # [b, T-1]
        differs = set_differs(fresh, routes.long())  # [b, T-1, L]
        layers = differs.shape[-1]
        for key, where in (("", recorded & mask.bool()), ("_same", recorded & same.bool())):
            out[f"route_diff{key}"] = float(differs[where].sum())
            out[f"route_pairs{key}"] = float(where.sum()) * layers
        return out

    def _micro_batch_loss(self, batch: GroupTensors, advantages: torch.Tensor, norms: BatchNorms,
                          balance: BalanceStep | None) -> tuple[dict[str, torch.Tensor], torch.Tensor, Any]:
        """This micro-batch's (`batch`, one part of the step's) share of the batch loss and its parts for logging, its log-probs, and
        its routing capture (None for a dense policy); `balance`: the step's balance state (None for a dense policy)."""
        algo = self.algo
        mask = batch.completion_mask
        behaviour = batch.old_logprobs
        routing = nullcontext() if self.balancer is None else self.balancer.micro_batch(
            batch.attention_mask, None if batch.routes is None else batch.routes
        )
        with routing as capture:
            logprobs, entropy, _ = token_logprobs(self.model, batch.input_ids, batch.attention_mask, with_entropy=True, policy=self.policy)
        corr = correct(logprobs, behaviour, mask, algo.correction, algo.tis_cap, (algo.icepop_low, algo.icepop_high))
        per_token, metrics = self.loss_fn(PolicyLossInput(logprobs, corr.old_logprobs, advantages, corr.mask), self.loss_cfg)
        pg_loss = aggregate(per_token * corr.weights, corr.mask, algo.loss_agg, norms)
        token_share = mask.sum() / max(norms.num_tokens, 1.0)
        ent = masked_mean(entropy, mask)
        loss = pg_loss - algo.entropy_coef * ent * token_share
        parts = {"pg_loss": pg_loss, "entropy": ent, **metrics, **corr.metrics}
        with torch.no_grad():
            log_r = logprobs - behaviour
            parts["kl_behaviour"] = masked_mean(torch.exp(log_r) - 1.0 - log_r, mask)  # k3 of KL(behaviour || policy)
        if algo.kl_coef > 0:
            if batch.ref_logprobs is not None:  # computed by the reference actor on the data side
                ref_lp = batch.ref_logprobs
            else:
                with torch.no_grad():
                    ref_lp, _, _ = token_logprobs(self.reference(), batch.input_ids, batch.attention_mask, policy=self.policy)
            kl = aggregate(kl_estimate(masked(logprobs, mask), masked(ref_lp, mask), algo.kl_estimator), mask, "token_mean", norms)
            if algo.kl_penalty == "loss":
                loss = loss + algo.kl_coef * kl
            parts["kl_ref"] = kl  # with kl_penalty=reward: logged only, the data side already subtracted it
        if balance is not None:
            aux, z = self.balancer.loss(balance, capture)
            loss = loss + self.balancer.weighted(aux, z)
            parts["aux_loss"], parts["z_loss"] = aux, z
        parts["loss"] = loss
        return parts, logprobs, capture

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
        state = trained.state_dict()
        state.update(_selection_biases(directory / "policy"))  # buffers transformers does not know about
        self.model.load_state_dict(state)
        meta = json.loads((directory / "optimizer.json").read_text())
        self.optimizer.load_state_dict(unflatten_optimizer(load_file(str(directory / "optimizer.safetensors")), meta))
        self.version = version
        if (directory / "reference.safetensors").is_file():
            from safetensors.torch import load_model

            load_model(self.reference(), str(directory / "reference.safetensors"))


def _count_groups(learned: dict[int, int], part: GroupTensors) -> None:
    """Add a micro-batch's tokens per group (rows without a group id, -1, are not counted)."""
    if part.group_ids is None:
        return
    for gid, tokens in zip(part.group_ids.tolist(), part.completion_mask.sum(-1).tolist()):
        if gid >= 0:
            learned[gid] = learned.get(gid, 0) + int(round(tokens))


def _supervised_batch(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> GroupTensors:
    from rlhub.types import Sample

    samples = [Sample(p, a, [0.0] * len(a), [0] * len(a), 0.0, None, "stop") for p, a in pairs]
    return GroupTensors.from_samples(samples, torch.zeros(len(samples)), pad_id)


def agreement_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Learner-engine agreement (see `Learner._agreement`). `train/logprob_mismatch` and the
    `*_same_version` keys: tokens sampled at the learner's version (numerical mismatch only; absent on
    steps without such tokens). `moe/logprob_gap_*` and `moe/routing_mismatch`: all generated tokens."""
    out: dict[str, float] = {}
    tokens, same = sums.get("tokens", 0.0), sums.get("same_tokens", 0.0)
    if same > 0:
        out["train/logprob_mismatch"] = sums["gap_same"] / same
        out["train/logprob_mismatch_max"] = sums["gap_same_max"]
    for mode in ("replay", "fresh"):
        if tokens > 0 and f"gap_all_{mode}" in sums:
            out[f"moe/logprob_gap_{mode}"] = sums[f"gap_all_{mode}"] / tokens
        if same > 0 and f"gap_same_{mode}" in sums:
            out[f"moe/logprob_mismatch_{mode}"] = sums[f"gap_same_{mode}"] / same
    if sums.get("route_pairs", 0.0) > 0:
        out["moe/routing_mismatch"] = sums["route_diff"] / sums["route_pairs"]
    if sums.get("route_pairs_same", 0.0) > 0:
        out["moe/routing_mismatch_same_version"] = sums["route_diff_same"] / sums["route_pairs_same"]
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


def _selection_biases(policy_dir: Path) -> dict[str, torch.Tensor]:
    """The routers' selection biases (moe.balance=aux_free) saved with the policy's weights."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in sorted(policy_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as tensors:
            out.update({k: tensors.get_tensor(k) for k in tensors.keys() if k.endswith(BIAS_NAME)})
    return out


def _copy_tokenizer(source: Path, target: Path) -> None:
    """The tokenizer's files (and chat template) from the model the run started from."""
    import shutil

    for f in source.iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")) or f.suffix == ".jinja"):
            shutil.copy2(f, target / f.name)
