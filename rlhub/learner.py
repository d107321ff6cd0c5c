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

import contextlib

import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from rlhub.algorithms import get_policy_loss
from rlhub.algorithms.config import AlgorithmConfig
from rlhub.algorithms.advantages import normalize_over_batch
from rlhub.algorithms.corrections import correct, kl_estimate
from rlhub.algorithms.losses import BatchNorms, LossConfig, PolicyLossInput, aggregate, masked, masked_mean
from rlhub.algorithms.selection import cutpoints, entropy_threshold, select
from rlhub.models.build import ModelConfig, is_moe
from rlhub.models.logprobs import RAW, SamplingPolicy, completion_span, probe_logprobs, shared_prefix, token_logprobs
from rlhub.models.precision import autocast, head_in_fp32
from rlhub.moe import BIAS_NAME, EXPERT_LOAD, Balancer, BalanceStep, MoEConfig, set_differs
from rlhub.parallel.fsdp import idle_row, local
from rlhub.parallel.layout import Layout, frozen_copy
from rlhub.parallel.ranks import Ranks
from rlhub.learner_metrics import agreement_metrics, lag_counts, max_over_mean, merge_ranks, moments, replay_sums, staleness_metrics
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
        ranks: Ranks | None = None,
        ep_balance: str = "standard",
        ep_capacity: float = 1.25,
        precision: str = "fp32",
        attention: str = "sdpa",
        share_prefix: bool = False,
    ) -> None:
        """`replay`: route every recorded position to the experts the engine used (R3), as
        `rlhub.moe.replay_enabled` decided for the run's engine. `ranks`: this learner's place in a
        group of learner ranks (`rlhub.parallel`; None: one process): the model is then sharded with
        FSDP2, its experts split over `ranks.expert_parallel` ranks (`ep_balance`: standard or llep,
        with `ep_capacity`), and each step takes this rank's share of the batch. `precision`: fp32 or bf16
        (`rlhub.models.precision`); `attention`: sdpa or eager (`learner.attention`); `share_prefix`: each
        micro-batch's shared prefix runs once (`learner.share_prefix`; one process only). `model_cfg.lora`
        with a rank: only LoRA adapters train (`rlhub.lora`), and what is published and checkpointed is
        the adapters."""
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        self.model_path = model_path
        self.algo = algo
        self.ranks = ranks or Ranks.single()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, model_cfg.dtype),
                                                          attn_implementation=attention).to(self.device)
        self.model.train()
        self.precision = precision
        self.lora = model_cfg.lora if model_cfg.lora.enabled else None
        if self.lora is not None:
            if self.ranks.distributed:
                raise ValueError("model.lora with learner.world_size > 1: LoRA adapters train in one learner process")
            from rlhub import lora

            if precision == "bf16":
                self.model.to(torch.bfloat16)  # the frozen base: no cast at every forward, half the memory
            self.adapted = lora.apply(self.model, self.lora, seed)
            for p in lora.trained_params(self.model):
                p.data = p.data.float()  # what trains, and its optimizer state, in fp32
        if precision == "bf16":
            from rlhub.models.experts import use_sorted_experts

            use_sorted_experts(self.model)  # transformers' grouped_mm casts its input back to fp32
            head_in_fp32(self.model)
        self.moe_cfg = moe or MoEConfig()
        self.balancer = Balancer(self.model, self.moe_cfg, replay) if is_moe(self.model) else None
        self._reference: torch.nn.Module | None = None
        self.layout = Layout(self.ranks, ep_balance, ep_capacity)
        if self.ranks.distributed:
            if algo.kl_coef > 0 and algo.reference == "learner":  # frozen before the policy is sharded, then sharded alike
                self._reference = self.layout.apply(frozen_copy(self.model))
            self.layout.apply(self.model)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=algo.lr, betas=tuple(algo.adam_betas), eps=algo.adam_eps, weight_decay=algo.weight_decay
        )
        self.loss_fn = get_policy_loss(algo.policy_loss)
        self.loss_cfg = LossConfig(algo.clip_eps, algo.clip_eps_high, algo.dual_clip_c)
        self.generation_budget = float(generation_budget)
        self.pad_id = int(self.model.config.pad_token_id or 0)
        self.probe_ids = probe_ids
        self.policy = policy
        """The rollouts' sampling distribution: log-probs, ratios and KLs are computed under it."""
        self.version = 0
        self.nonfinite_in_row = 0
        self.share_prefix = share_prefix and not self.ranks.distributed  # ranks pair their forwards: one each

    # ---- one optimizer step -----------------------------------------------------
    def train_step(self, batch: GroupTensors | None) -> dict[str, Any]:
        """One optimizer step on `batch`; the policy version +1. Returns the step's metrics, and under
        "learned" the (group id, tokens) pairs read off the micro-batches the loss was computed on:
        what the learner really trained on, which the ledger reconciles against what it was sent.

        With several ranks, `batch` is this rank's share (None: it has none) and every rank calls this
        together: the normalisers are summed over the ranks first, every rank runs as many forwards and
        backwards as the busiest one (idle ones on a row of padding, so that FSDP's collectives pair
        up), and the metrics returned are the whole step's on every rank."""
        if self.layout.expert_names(self.model):
            from rlhub.parallel.experts import ep_stats

            with ep_stats() as dispatch, self.autocast():
                metrics = self._train_step(batch)
            metrics.update(self._ep_metrics(dispatch))
            return metrics
        with self.autocast():
            return self._train_step(batch)

    def autocast(self) -> Any:
        """The context the learner's forwards and backwards run in (`learner.precision`)."""
        return autocast(self.precision, self.device)

    def _ep_metrics(self, dispatch: Any) -> dict[str, float]:
        """Expert parallelism's per-rank load over the step: (token, expert) pairs each rank computed, and
        what standard EP would have given it; the seconds in dispatch, expert compute and combine."""
        ranks = self.ranks.gather((sum(dispatch.pairs), sum(dispatch.standard_pairs), dispatch.seconds, dispatch.weights_received))
        pairs, standard, seconds, moved = (list(x) for x in zip(*ranks))
        return {"learner/ep_pairs_max_over_mean": max_over_mean(pairs), "learner/ep_pairs_max": float(max(pairs)),
                "learner/ep_standard_pairs_max_over_mean": max_over_mean(standard), "learner/ep_seconds_max": max(seconds),
                "learner/ep_seconds_mean": sum(seconds) / len(seconds), "learner/ep_weights_moved": float(sum(moved))}

    def _train_step(self, batch: GroupTensors | None) -> dict[str, Any]:
        start = time.perf_counter()
        clock = PhaseClock()  # where the step's time goes: time/learner/<phase>_s
        ranks = self.ranks
        algo = self.algo
        batch = None if batch is None else batch.to(self.device)
        mask = None if batch is None else batch.completion_mask
        advantages = None if batch is None else batch.advantages * mask  # [B, T]
        if algo.batch_normalize and batch is not None:
            advantages = normalize_over_batch(advantages, mask, *self._advantage_moments(advantages, mask))
        elif algo.batch_normalize:
            self._advantage_moments(None, None)  # this rank's part of the collective
        n = 0 if batch is None else batch.input_ids.shape[0]
        num_tokens, num_seqs = ranks.sum([0.0 if mask is None else mask.sum(), n])
        norms = BatchNorms(num_tokens=num_tokens, num_seqs=num_seqs, constant=algo.loss_constant or self.generation_budget)
        parts = [] if batch is None else [
            (batch.rows(idx, width), advantages.index_select(0, idx)[:, : width - 1])
            for idx, width in micro_batches(batch.attention_mask.sum(-1), algo.micro_batch_size, algo.micro_batch_tokens)]
        rounds = ranks.max_int(len(parts))  # forwards every rank runs (its own parts, then idle ones)
        measure = self.balancer is not None and self.moe_cfg.mismatch_every > 0 and self.version % self.moe_cfg.mismatch_every == 0
        has_routes = ranks.all_true(batch is None or batch.routes is not None)
        measure = measure and has_routes
        balance = None
        if self.balancer is not None:
            def forward(i: int) -> None:  # the routers' choices are all the global-batch balance needs
                token_logprobs(self.model, parts[i][0].input_ids, parts[i][0].attention_mask, policy=self.policy, keep=0)

            prepass = None if rounds <= 1 and not ranks.distributed else self.balancer.routing_pass(
                [(p.attention_mask, p.routes) for p, _ in parts], forward, rounds, self._idle_forward)
            empty = torch.zeros(0, 2, dtype=torch.long)
            with clock("routing_pass"):  # runs only where replay does not cover every position
                balance = self.balancer.begin(empty if batch is None else batch.attention_mask, None if batch is None else batch.routes,
                                              prepass, ranks)
        sums: dict[str, float] = {}
        agreement: dict[str, float] = {}  # sums behind the mismatch metrics
        learned: dict[int, int] = {}  # group id -> its tokens that carried the loss, read off the tensors trained on
        with clock("measure"):
            others = [self._other_forward(parts[i][0] if i < len(parts) else None) for i in range(rounds)] if measure else []
        selections: list[TokenSelection | None] = [None] * rounds
        if algo.token_selection != "all":
            with clock("selection"):
                selections = self._token_selections(parts, rounds)
        self.optimizer.zero_grad(set_to_none=True)
        for i in range(rounds):
            if i >= len(parts):
                with clock("idle"):
                    self._idle_round()
                continue
            part, part_advantages = parts[i]
            mask_mb = part.completion_mask
            with clock("forward"):
                parts_loss, logprobs, capture = self._micro_batch_loss(part, part_advantages, norms, balance, selections[i])
            _count_groups(learned, part)
            with clock("backward"):
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
            for k, v in self._agreement(part, logprobs.detach(), capture, others[i] if measure else None).items():
                agreement[k] = max(agreement.get(k, v), v) if k.endswith("_max") else agreement.get(k, 0.0) + v
        with clock("optimizer"):
            grad_norm = self.layout.clip_grads(self.model, algo.grad_clip)
        sums.update(replay_sums(batch, self.version))
        local = {"sums": sums, "agreement": agreement, "learned": learned,
                 "lags": lag_counts(batch, self.version), "rewards": moments(None if batch is None else batch.rewards)}
        step = merge_ranks(ranks.gather(local)) if ranks.distributed else local
        finite = math.isfinite(step["sums"].get("loss", 0.0)) and math.isfinite(float(grad_norm))
        # a non-finite loss or gradient would poison the weights: skip the update, keep the version moving
        self.nonfinite_in_row = 0 if finite else self.nonfinite_in_row + 1
        update = finite and self.version >= algo.critic_warmup  # during the critic's warm-up the policy stays as it is
        with clock("optimizer"):
            if update:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, Any] = {f"train/{k}": v for k, v in step["sums"].items()}
        metrics["train/policy_updated"] = float(update)
        metrics["train/nonfinite_skipped"] = float(not finite)
        metrics["train/nonfinite_in_row"] = float(self.nonfinite_in_row)
        metrics["train/grad_norm"] = float(grad_norm)
        metrics.update(agreement_metrics(step["agreement"]))
        metrics.update(staleness_metrics(step["lags"]))
        if balance is not None:
            metrics.update(self.balancer.end(balance, update, ranks))
            metrics["moe/routing_replay"] = float(self.balancer.replay and has_routes and batch is not None)
        metrics["train/tokens"] = norms.num_tokens
        metrics["train/groups"] = float(len(step["learned"]))
        metrics["learned"] = sorted(step["learned"].items())
        count, total, squares = step["rewards"]
        mean = total / max(count, 1.0)
        metrics["rollout/reward_mean"] = mean
        metrics["rollout/reward_std"] = math.sqrt(max(squares / max(count, 1.0) - mean * mean, 0.0))
        if ranks.distributed:
            metrics["learner/world_size"] = float(ranks.world_size)
            metrics["learner/rank_tokens_max_over_mean"] = max_over_mean(step["rank_tokens"])
        metrics["time/train_s"] = time.perf_counter() - start
        metrics.update({f"time/learner/{k}_s": v for k, v in clock.seconds.items()})
        self.version += 1
        return metrics

    def _advantage_moments(self, advantages: torch.Tensor | None, mask: torch.Tensor | None) -> tuple[float | None, float | None]:
        """(mean, std) of the advantages over every real token of the step, all ranks together; (None,
        None) for one rank (`normalize_over_batch` computes them itself, as it always did)."""
        if not self.ranks.distributed:
            return None, None
        values = torch.zeros(0) if advantages is None else advantages[mask.bool()].double()
        count, total, squares = self.ranks.sum([values.numel(), values.sum(), values.pow(2).sum()])
        mean = total / max(count, 1.0)
        return mean, math.sqrt(max(squares / max(count, 1.0) - mean * mean, 0.0))

    def _idle_forward(self) -> torch.Tensor:
        """A forward on a row of padding: a rank with nothing left to compute pairs its collectives with
        the busier ranks' this way. Returns 0 times the logits' sum (backward gives zero gradients)."""
        ids, attention = idle_row(self.pad_id, self.device)
        return self.model(input_ids=ids, attention_mask=attention).logits.float().sum() * 0.0

    def _idle_round(self) -> None:
        """What a micro-batch costs in collectives, on padding: a forward and a backward (and the KL
        reference's forward)."""
        loss = self._idle_forward()
        if self.algo.kl_coef > 0 and self._reference is not None:  # after the policy's, as in a real micro-batch
            with torch.no_grad():
                ids, attention = idle_row(self.pad_id, self.device)
                self._reference(input_ids=ids, attention_mask=attention)
        loss.backward()

    def skip_step(self) -> dict[str, Any]:
        """A step with nothing to train on (its data was lost): the weights stay, the version advances."""
        self.version += 1
        return {"train/policy_updated": 0.0, "train/tokens": 0.0, "train/groups": 0.0, "learned": []}

    def _other_forward(self, batch: GroupTensors | None) -> torch.Tensor | None:
        """On measuring steps: the log-probs of the forward the learner does not train with (fresh routing
        under replay, replayed without). Run before the step's first backward: a forward of a sharded
        model between its backwards and the optimizer step loses gradients."""
        if batch is None:
            with torch.no_grad():
                self._idle_forward()
            return None
        with torch.no_grad(), self.balancer.micro_batch(batch.attention_mask, batch.routes, replay=not self.balancer.replay):
            other, _, _ = token_logprobs(self.model, batch.input_ids, batch.attention_mask, policy=self.policy,
                                         keep=completion_span(batch.completion_mask))
        return other

    def _agreement(self, batch: GroupTensors, logprobs: torch.Tensor, capture: Any, other: torch.Tensor | None) -> dict[str, float]:
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
        routes = batch.routes
        if other is None or routes is None:
            return out
        replayed = self.balancer.replay
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

    @torch.no_grad()
    def _token_selections(self, parts: list[tuple[GroupTensors, torch.Tensor]], rounds: int) -> list[TokenSelection | None]:
        """Each micro-batch's tokens that carry the policy loss (algorithm.token_selection). cutpoints: those
        sampled with probability below spo.rho. entropy_top_p: the step's highest-entropy fraction, over
        every micro-batch and rank. One micro-batch on one
        rank selects from its training forward's own entropies; otherwise a forward without gradients
        measures them first (with the routing the training forward uses)."""
        fraction = self.algo.token_selection_p
        if self.algo.token_selection == "cutpoints":  # SPO's probability mask: read off the behaviour log-probs
            masks = [cutpoints(p.old_logprobs, p.completion_mask, self.algo.spo.rho) for p, _ in parts]
            (count,) = self.ranks.sum([sum(float(m.sum()) for m in masks)])
            return [TokenSelection(fraction, masks[i] if i < len(masks) else None, count) for i in range(rounds)]
        if rounds <= 1 and not self.ranks.distributed:
            return [TokenSelection(fraction) for _ in range(rounds)]
        entropies = []
        for i in range(rounds):
            if i >= len(parts):
                self._idle_forward()
                continue
            part = parts[i][0]
            routing = nullcontext() if self.balancer is None else self.balancer.micro_batch(part.attention_mask, part.routes)
            with routing:
                _, entropy, _ = token_logprobs(self.model, part.input_ids, part.attention_mask, with_entropy=True,
                                               policy=self.policy, keep=completion_span(part.completion_mask))
            entropies.append(entropy.float())
        real = [e[p.completion_mask.bool()] for e, (p, _) in zip(entropies, parts)]
        local_real = torch.cat(real).cpu() if real else torch.zeros(0)
        every = torch.cat(self.ranks.gather(local_real)) if self.ranks.distributed else local_real
        threshold = entropy_threshold(every, fraction)
        masks = [select(e, p.completion_mask, threshold) for e, (p, _) in zip(entropies, parts)]
        (count,) = self.ranks.sum([sum(float(m.sum()) for m in masks)])
        return [TokenSelection(fraction, masks[i] if i < len(masks) else None, count) for i in range(rounds)]

    def _micro_batch_loss(self, batch: GroupTensors, advantages: torch.Tensor, norms: BatchNorms,
                          balance: BalanceStep | None, selection: TokenSelection | None = None,
                          ) -> tuple[dict[str, torch.Tensor], torch.Tensor, Any]:
        """This micro-batch's (`batch`, one part of the step's) share of the batch loss and its parts for logging, its log-probs, and
        its routing capture (None for a dense policy); `balance`: the step's balance state (None for a dense policy);
        `selection`: the tokens that carry the policy loss (None: every generated token)."""
        algo = self.algo
        mask = batch.completion_mask
        behaviour = batch.old_logprobs
        span = completion_span(mask)  # the head and softmax run on the completions' positions only
        prefix = shared_prefix(batch.input_ids, batch.attention_mask, mask) if self.share_prefix else None
        if prefix is None:
            routing = nullcontext() if self.balancer is None else self.balancer.micro_batch(batch.attention_mask, batch.routes)
            with routing as capture:
                logprobs, entropy, _ = token_logprobs(self.model, batch.input_ids, batch.attention_mask, with_entropy=True,
                                                      policy=self.policy, keep=span)
        else:
            split = nullcontext() if self.balancer is None else self.balancer.shared_micro_batch(batch.attention_mask, batch.routes, prefix)
            with split as parts:
                logprobs, entropy, _ = token_logprobs(self.model, batch.input_ids, batch.attention_mask, with_entropy=True,
                                                      policy=self.policy, keep=span, prefix=prefix,
                                                      between=None if parts is None else parts.suffix)
            capture = None if parts is None else parts.merged()
        corr = correct(logprobs, behaviour, mask, algo.correction, algo.tis_cap, (algo.icepop_low, algo.icepop_high))
        pg_mask, pg_norms, selected = corr.mask, norms, None
        if selection is not None:
            selected = selection.mask
            if selected is None:  # the step is this one micro-batch: its own entropies decide
                real = entropy.detach()[mask.bool()]
                selected = select(entropy, mask, entropy_threshold(real, selection.fraction))
                selection = replace(selection, num_tokens=float(selected.sum()))
            pg_mask, pg_norms = corr.mask * selected, replace(norms, num_tokens=selection.num_tokens)
        per_token, metrics = self.loss_fn(PolicyLossInput(logprobs, corr.old_logprobs, advantages, pg_mask), self.loss_cfg)
        pg_loss = aggregate(per_token * corr.weights, pg_mask, algo.loss_agg, pg_norms)
        token_share = mask.sum() / max(norms.num_tokens, 1.0)
        ent = masked_mean(entropy, mask)
        loss = pg_loss - algo.entropy_coef * ent * token_share
        parts = {"pg_loss": pg_loss, "entropy": ent, **metrics, **corr.metrics}
        if selected is not None:  # the share of this micro-batch's generated tokens that carried the policy loss
            parts["selected_frac"] = selected.sum() / mask.sum().clamp(min=1.0)
            parts["selected_entropy"] = masked_mean(entropy.detach(), selected)
        with torch.no_grad():
            log_r = logprobs - behaviour
            parts["kl_behaviour"] = masked_mean(torch.exp(log_r) - 1.0 - log_r, mask)  # k3 of KL(behaviour || policy)
        if algo.kl_coef > 0:
            if batch.ref_logprobs is not None:  # computed by the reference actor on the data side
                ref_lp = batch.ref_logprobs
            else:
                with torch.no_grad():
                    ref_lp, _, _ = token_logprobs(self.reference(), batch.input_ids, batch.attention_mask, policy=self.policy, keep=span)
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
            if self.ranks.distributed:  # a sharded copy is made with the policy, before sharding (see __init__)
                raise RuntimeError("the KL reference of sharded learner ranks exists only with algorithm.reference=learner and kl_coef > 0")
            self._reference = frozen_copy(self.model)
        return self._reference

    # ---- format warm start ----------------------------------------------------------
    def warm_start(self, examples: list[tuple[list[int], list[int]]], steps: int, batch_size: int, lr: float, seed: int = 0) -> dict[str, float]:
        """Supervised steps on (prompt ids, answer ids) pairs, loss on the answer tokens only.

        With its own optimizer, so the RL optimizer starts fresh. Used with answers
        that ignore the prompt, it teaches the output format and nothing else.
        """
        start = time.perf_counter()
        opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)
        gen = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(steps):
            idx = torch.randint(len(examples), (batch_size,), generator=gen).tolist()
            batch = _supervised_batch([examples[i] for i in idx], self.model.config.pad_token_id or 0).to(self.device)
            with self.autocast():
                logprobs, _, _ = token_logprobs(self.model, batch.input_ids, batch.attention_mask)
                loss = -masked_mean(logprobs, batch.completion_mask)
                opt.zero_grad(set_to_none=True)
                (loss / self.ranks.world_size).backward()  # every rank takes the same batch; their gradients are summed
            opt.step()
            losses.append(float(loss.detach()))
        if self._reference is not None:  # sharded ranks made it before the warm start: it starts from here
            with torch.no_grad():
                for dst, src in zip(self._reference.state_dict().values(), self.model.state_dict().values()):
                    local(dst).copy_(local(src))
        return {"warm_start/loss_first": losses[0], "warm_start/loss_last": losses[-1], "warm_start/seconds": time.perf_counter() - start}

    # ---- what engines get -------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full weights (one process; sharded ranks stream them with `full_items`)."""
        return dict(self.full_items())

    def published_state(self) -> dict[str, torch.Tensor]:
        """What a version sends the engines (one process): the full weights, or under LoRA the adapters
        alone (`rlhub.lora`: the rollout side merges them into the base weights it holds)."""
        if self.lora is not None:
            from rlhub import lora

            return lora.adapter_state(self.model, self.lora.scaling)
        return self.state_dict()

    def full_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor), one at a time: sharded ranks gather each in turn (every rank iterates)."""
        return self.layout.full_items(self.model)

    def probe(self) -> torch.Tensor:
        """The probe sequence's log-probs under the published weights, which the engines must reproduce.
        With full fp32 master weights (`learner.precision=bf16` included) they are computed in fp32, the
        exact function of what is published: bf16 autocast's rounding here flipped top-2 routing choices
        of the tiny MoE on the probe and missed an fp32 engine by up to 0.9. Under LoRA the frozen base
        is itself bf16, so the probe runs as the learner does."""
        self.model.eval()
        try:
            with self.autocast() if self.lora is not None else contextlib.nullcontext():
                return probe_logprobs(self.model, self.probe_ids)
        finally:
            self.model.train()

    # ---- checkpoints ------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Every rank calls this. The shards of policy, optimizer and KL reference with
        `torch.distributed.checkpoint` under `learner/` (one process writes the same format, so any
        world size can resume it), and `policy/` as a whole HF directory for evaluation and export:
        one process saves it directly, sharded ranks gather one tensor at a time and rank 0 writes."""
        from rlhub.parallel import checkpoint as sharded

        if self.lora is not None:  # the adapters and their optimizer state; the base model is where the run started
            from rlhub import lora

            lora.save(directory, self.model, self.lora, self.optimizer, self.model_path, self._reference)
            self._save_expert_load(directory)
            return
        sharded.save(directory, self.model, self.optimizer, self._reference, self.layout)
        self._save_expert_load(directory)
        if not self.ranks.distributed:
            self.model.save_pretrained(str(directory / "policy"))
        else:
            from rlhub.parallel.hf_writer import write_hf

            write_hf(directory / "policy", self.model.config, self.full_items(), write=self.ranks.is_main)
        if self.ranks.is_main:
            _copy_tokenizer(Path(self.model_path), directory / "policy")  # the policy directory is a whole HF model

    def _expert_load_path(self, directory: Path) -> Path:
        """Beside the learner's own state (`learner/`, or `adapters/` under LoRA): the expert counts of the
        steps the dead-expert count looks back over, so that it goes on across a resume."""
        from rlhub.lora import ADAPTERS_DIR
        from rlhub.parallel.checkpoint import DIRNAME

        return directory / (ADAPTERS_DIR if self.lora is not None else DIRNAME) / EXPERT_LOAD

    def _save_expert_load(self, directory: Path) -> None:
        if self.balancer is not None and self.ranks.is_main:
            self.balancer.load.save(self._expert_load_path(directory))

    def load(self, directory: Path, version: int) -> None:
        """From either layout `save` writes, at any world size: a sharded checkpoint is read by each rank
        for its own part (or whole, by one process); a one-process checkpoint only by one process."""
        from rlhub.parallel import checkpoint as sharded

        self.version = version
        if self.balancer is not None:  # (absent from a checkpoint of an earlier rlhub: the window starts empty)
            self.balancer.load.load(self._expert_load_path(directory))
        if self.lora is not None:
            from rlhub import lora

            if not lora.has_adapters(directory):
                raise ValueError(f"{directory}: no LoRA adapters (adapters/lora.json) to resume model.lora.rank={self.lora.rank} from")
            lora.load(directory, self.model, self.lora, self.optimizer, self.reference() if lora.has_reference(directory) else None)
            return
        if sharded.has_sharded(directory):
            saved_reference = any(k.startswith("reference.") for k in sharded.saved_keys(directory))
            reference = None
            if saved_reference:  # a resumed run keeps its KL anchored to the same reference
                reference = self._reference if self.ranks.distributed else self.reference()
            sharded.load(directory, self.model, self.optimizer, reference, self.layout)
            return
        if self.ranks.distributed:
            raise ValueError(f"{directory}: a checkpoint of an earlier rlhub (policy/ and optimizer.safetensors, no learner/) cannot be "
                             f"resumed by {self.ranks.world_size} learner ranks; resume it with learner.world_size=1 and checkpoint again")
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        trained = AutoModelForCausalLM.from_pretrained(str(directory / "policy"), dtype=self.model.dtype)
        state = trained.state_dict()
        state.update(_selection_biases(directory / "policy"))  # buffers transformers does not know about
        self.model.load_state_dict(state)
        meta = json.loads((directory / "optimizer.json").read_text())
        self.optimizer.load_state_dict(unflatten_optimizer(load_file(str(directory / "optimizer.safetensors")), meta))
        if (directory / "reference.safetensors").is_file():
            from safetensors.torch import load_model

            load_model(self.reference(), str(directory / "reference.safetensors"))


@dataclass
class TokenSelection:
    """Which of a micro-batch's generated tokens carry the policy loss (algorithm.token_selection)."""

    fraction: float
    """algorithm.token_selection_p: the step's share of tokens kept, highest entropy first."""
    mask: torch.Tensor | None = None
    """[b, T-1] the selected tokens, from the step's threshold; None: the micro-batch is the whole step
    and selects from its own forward's entropies."""
    num_tokens: float = 0.0
    """Tokens selected in the whole step (every rank): the policy loss's token normaliser."""


class PhaseClock:
    """Seconds per phase of one step (forward, backward, optimizer, routing_pass, measure, idle), summed
    over its micro-batches; a phase that did not run is absent."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - began


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
