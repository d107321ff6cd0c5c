"""Models that score a complete group on the data side: the critic and the reference policy.

A rollout worker hands each generation batch's finished groups to its scorers
before computing advantages. `score` returns tensors `[B, T-1]` aligned with
the batch's targets (they travel with the group) and scalars (kept in the
group's metadata):

- `Critic`: V(s) before each generated token, stamped with the critic's
  version; it trains on the GAE returns of the same batches the learner trains
  on, with PPO's value clipping against the value it gave at generation time.
- `ReferencePolicy`: the frozen reference's log-probs, for the KL term or the
  KL reward penalty.

In a run each sits in its own Ray actor (`rlhub.actors.scorers`); in unit
tests and benchmarks they are called in-process.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch

from rlhub.algorithms.config import AlgorithmConfig
from rlhub.algorithms.losses import BatchNorms, aggregate, value_loss
from rlhub.models.build import ModelConfig
from rlhub.models.logprobs import RAW, SamplingPolicy, positions_from_mask, token_logprobs
from rlhub.moe import EXPERT_LOAD, Balancer, MoEConfig, find_routers
from rlhub.parallel.fsdp import idle_row
from rlhub.parallel.layout import Layout
from rlhub.parallel.ranks import Ranks
from rlhub.types import GroupTensors


class Scorer(Protocol):
    def score(self, batch: GroupTensors) -> dict[str, Any]: ...


class ValueModel(torch.nn.Module):
    """The policy's transformer trunk (initialised from the policy's weights) and a scalar head (zero at start).

    Built from the model directory; `load_trunk` then takes the policy's weights as RL starts.
    """

    def __init__(self, model_path: str, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModel

        super().__init__()
        self.backbone = AutoModel.from_pretrained(model_path, dtype=dtype)
        self.head = torch.nn.Linear(self.backbone.config.hidden_size, 1, dtype=dtype)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def load_trunk(self, policy_state: dict[str, torch.Tensor]) -> None:
        """Copy the trunk from a causal LM's state dict: its `model.*` tensors (the AutoModel trunk's
        names lack the prefix); the LM head is not used. Every trunk tensor must be there."""
        self.backbone.load_state_dict(trunk_state(policy_state, self.backbone.base_model_prefix))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`[B, T-1]`: the value of the state after tokens 0..t, i.e. before target t+1."""
        positions = positions_from_mask(attention_mask)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False).last_hidden_state
        return self.head(hidden[:, :-1]).squeeze(-1).float()


def trunk_state(policy_state: dict[str, torch.Tensor], prefix: str = "model") -> dict[str, torch.Tensor]:
    """The trunk's tensors of a causal LM's state dict, named as in the bare AutoModel: `model.x` -> `x`.

    >>> sorted(trunk_state({"model.norm.weight": torch.ones(1), "lm_head.weight": torch.ones(1)}))
    ['norm.weight']
    """
    head = prefix + "."
    return {k[len(head):]: v for k, v in policy_state.items() if k.startswith(head)}


class Critic:
    """PPO's value function, trained asynchronously beside the policy; each optimizer step is a critic version."""

    def __init__(self, model_path: str, model_cfg: ModelConfig, algo: AlgorithmConfig, seed: int = 0, moe: MoEConfig | None = None,
                 ranks: Ranks | None = None, layout: Layout | None = None) -> None:
        """An MoE critic's routers are balanced as the policy's are (`moe.balance`, rlhub.moe); it
        never replays the engine's routing, which belongs to the policy's routers. `ranks`, `layout`: the
        critic sharded over learner-like ranks (`rlhub.parallel`), as the policy is: each step takes this
        rank's share of the batch, with the normalisers summed over the ranks."""
        torch.manual_seed(seed)
        self.algo = algo
        self.ranks = ranks or Ranks.single()
        self.layout = layout or Layout(self.ranks)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = ValueModel(model_path, getattr(torch, model_cfg.dtype)).to(self.device)
        self.pad_id = int(self.model.backbone.config.pad_token_id or 0)
        self.balancer = Balancer(self.model.backbone, moe or MoEConfig()) if find_routers(self.model.backbone) else None
        self.layout.apply(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=algo.critic_lr, betas=tuple(algo.adam_betas), eps=algo.adam_eps, weight_decay=algo.weight_decay)
        self.version = 0
        self._lock = threading.Lock()  # scoring may run in another thread than training: never mid-update
        self._train_lock = threading.Lock()  # steps queued by a pipelining controller run one after the other
        self._turn = threading.Condition(self._train_lock)  # ... and, given `at_version`, in version order

    def load_policy(self, policy_state: dict[str, torch.Tensor]) -> None:
        """Start the trunk from the policy's weights as RL starts (after the warm start); the head stays at zero."""
        with self._lock:
            if self.ranks.distributed:  # each rank keeps its shards of the trunk
                self.layout.load_full(self.model.backbone, trunk_state(policy_state, self.model.backbone.base_model_prefix))
            else:
                self.model.load_trunk(policy_state)

    def score(self, batch: GroupTensors | None) -> dict[str, Any]:
        """`batch` None: a rank of a sharded critic with no rows of this call takes part in its collectives."""
        if batch is None:
            with self._lock, torch.no_grad():
                self._idle_forward()
                return {"values": None, "critic_version": self.version}
        batch = batch.to(self.device)
        with self._lock, torch.no_grad():
            values = torch.where(batch.completion_mask.bool(), self.model(batch.input_ids, batch.attention_mask), 0.0)
            version = self.version
        return {"values": values.cpu(), "critic_version": version}

    def train_step(self, batch: GroupTensors | None, at_version: int | None = None, wait_s: float = 600.0) -> dict[str, float]:
        """One step of value regression on the batch's returns (None: an empty step); +1 critic version.

        at_version: the critic version this step must start from. A threaded actor may start two queued
        steps in either order; given it, a step that starts early waits (up to wait_s) for those before it.
        """
        if batch is not None and (batch.values is None or batch.returns is None):
            raise ValueError("the critic trains on batches with values and returns (advantage=gae)")
        with self._turn:
            if at_version is not None:
                if not self._turn.wait_for(lambda: self.version >= at_version, timeout=wait_s):
                    raise TimeoutError(f"critic step for version {at_version}: still at version {self.version} after {wait_s:.0f} s")
                if self.version != at_version:
                    raise ValueError(f"critic step for version {at_version} arrived at version {self.version}")
            anywhere = self.ranks.sum_always([float(batch is not None)])[0]  # sharded: this rank's share may be empty
            if anywhere == 0:  # nothing left to train on (the batch's data was lost): keep step with the policy
                with self._lock:
                    self.version += 1
                out = {"critic/version": self.version}
            else:
                out = self._train_step(batch)
            self._turn.notify_all()
            return out

    def _train_step(self, batch: GroupTensors | None) -> dict[str, float]:
        """With several ranks, `batch` is this rank's share (None: none) and every rank calls this together
        (see `Learner.train_step`: normalisers summed first, idle rounds on padding)."""
        start = time.perf_counter()
        ranks = self.ranks
        batch = None if batch is None else batch.to(self.device)
        mask = None if batch is None else batch.completion_mask
        n = 0 if batch is None else batch.input_ids.shape[0]
        num_tokens, num_seqs = ranks.sum([0.0 if mask is None else mask.sum(), n])
        norms = BatchNorms(num_tokens=num_tokens, num_seqs=num_seqs)
        sums: dict[str, float] = {}
        size = self.algo.micro_batch_size
        slices = [slice(lo, min(n, lo + size)) for lo in range(0, n, size)]
        rounds = ranks.max_int(len(slices))
        balance = None
        if self.balancer is not None:
            prepass = self.balancer.routing_pass([(batch.attention_mask[mb], None) for mb in slices],
                                                 lambda i: self.model(batch.input_ids[slices[i]], batch.attention_mask[slices[i]]),
                                                 rounds, self._idle_forward)
            empty = torch.zeros(0, 2, dtype=torch.long)
            balance = self.balancer.begin(empty if batch is None else batch.attention_mask, None,
                                          prepass if rounds > 1 or ranks.distributed else None, ranks)
        self.optimizer.zero_grad(set_to_none=True)
        for i in range(rounds):
            if i >= len(slices):
                self._idle_forward().backward()
                continue
            mb = slices[i]
            routing = nullcontext() if self.balancer is None else self.balancer.micro_batch(batch.attention_mask[mb], None)
            with routing as capture:
                values = self.model(batch.input_ids[mb], batch.attention_mask[mb])
            per_token, metrics = value_loss(values, batch.values[mb], batch.returns[mb], mask[mb], self.algo.value_clip)
            loss = aggregate(per_token, mask[mb], "token_mean", norms)
            sums["value_loss"] = sums.get("value_loss", 0.0) + float(loss.detach())
            if balance is not None:
                aux, z = self.balancer.loss(balance, capture)
                loss = loss + self.balancer.weighted(aux, z)
                sums["aux_loss"] = sums.get("aux_loss", 0.0) + float(aux.detach())
                sums["z_loss"] = sums.get("z_loss", 0.0) + float(z.detach())
            loss.backward()
            share = float(mask[mb].sum()) / max(norms.num_tokens, 1.0)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * share
        grad_norm = self.layout.clip_grads(self.model, self.algo.grad_clip)
        if ranks.distributed:
            merged: dict[str, float] = {}
            for local in ranks.gather(sums):
                for k, v in local.items():
                    merged[k] = merged.get(k, 0.0) + v
            sums = merged
        with self._lock:
            self.optimizer.step()
            self.version += 1
        if balance is not None:
            load = self.balancer.end(balance, True, ranks)
            sums.update({k: load[k] for k in ("moe/max_over_mean", "moe/dead_experts", "moe/router_entropy")})
        out = {f"critic/{k}": v for k, v in sums.items()}
        out["critic/grad_norm"] = float(grad_norm)
        out["critic/version"] = self.version
        out["time/critic_train_s"] = time.perf_counter() - start
        return out

    def _idle_forward(self) -> torch.Tensor:
        """A forward on a row of padding, for a rank with nothing left to compute (see `Learner`)."""
        ids, attention = idle_row(self.pad_id, self.device)
        return self.model(ids, attention).sum() * 0.0

    def save(self, directory: Path) -> None:
        """Every rank calls this: the critic's shards and its optimizer's (`rlhub.parallel.checkpoint`,
        any world size resumes them) and its version."""
        from rlhub.parallel import checkpoint as sharded

        directory.mkdir(parents=True, exist_ok=True)
        sharded.save(directory, self.model, self.optimizer, None, self.layout)
        if self.ranks.is_main:
            (directory / "critic.json").write_text(json.dumps({"version": self.version}))
            if self.balancer is not None:
                self.balancer.load.save(directory / EXPERT_LOAD)

    def load(self, directory: Path) -> None:
        from rlhub.parallel import checkpoint as sharded

        meta = json.loads((directory / "critic.json").read_text())
        self.version = int(meta["version"])
        if self.balancer is not None:
            self.balancer.load.load(directory / EXPERT_LOAD)
        if sharded.has_sharded(directory):
            sharded.load(directory, self.model, self.optimizer, None, self.layout)
            return
        from safetensors.torch import load_file, load_model  # a checkpoint of an earlier rlhub

        from rlhub.learner import unflatten_optimizer

        load_model(self.model, str(directory / "critic.safetensors"))
        self.optimizer.load_state_dict(unflatten_optimizer(load_file(str(directory / "critic_optimizer.safetensors")), meta["optimizer"]))


class ReferencePolicy:
    """A frozen copy of the policy; its log-probs of the generated tokens. `layout`: sharded over ranks
    as the policy is (`rlhub.parallel`), each rank holding its shards."""

    def __init__(self, model_path: str, model_cfg: ModelConfig, policy: SamplingPolicy = RAW, layout: Layout | None = None) -> None:
        from transformers import AutoModelForCausalLM

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, model_cfg.dtype))
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.layout = layout or Layout(Ranks.single())
        self.layout.apply(self.model)
        self.pad_id = int(self.model.config.pad_token_id or 0)
        self.policy = policy  # the reference is scored under the rollouts' sampling distribution, as the policy is

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take the policy's weights as they are now (the start of RL, after any warm start)."""
        self.layout.load_full(self.model, state)

    def save(self, directory: Path) -> None:
        from rlhub.parallel import checkpoint as sharded

        directory.mkdir(parents=True, exist_ok=True)
        sharded.save_model(directory, self.model, self.layout)

    def load(self, directory: Path) -> None:
        from rlhub.parallel import checkpoint as sharded

        if sharded.has_sharded(directory):
            sharded.load_model(directory, self.model, self.layout)
            return
        from safetensors.torch import load_model  # a checkpoint of an earlier rlhub

        load_model(self.model, str(directory / "reference.safetensors"))

    def score(self, batch: GroupTensors | None) -> dict[str, Any]:
        """`batch` None: a rank of a sharded reference with no rows of this call takes part in its collectives."""
        if batch is None:
            ids, attention = idle_row(self.pad_id, self.device)
            with torch.no_grad():
                self.model(input_ids=ids, attention_mask=attention)
            return {"ref_logprobs": None}
        batch = batch.to(self.device)
        with torch.no_grad():
            logprobs, _, _ = token_logprobs(self.model, batch.input_ids, batch.attention_mask, policy=self.policy)
        return {"ref_logprobs": torch.where(batch.completion_mask.bool(), logprobs, 0.0).cpu()}
