"""Per-token log-probs under the distribution rollouts sample from, shared by learner, engines and scorers.

The behaviour policy of RL on sampled text is not the model's raw softmax: it
is the softmax of the logits divided by the temperature, restricted to the
top-p nucleus and renormalised there. Engines report the log-prob of each
sampled token under that distribution, and the learner, the reference and the
built-in engine compute it with the same function here, so an importance ratio
compares one distribution at two weight versions, and a sync check compares
weights, not two implementations.

Under top-p the nucleus depends on the weights. A token sampled at version v
is in v's nucleus; at a later version it may have fallen out. The learner then
keeps it in the support (nucleus plus the sampled token, renormalised), so its
log-prob stays finite and the ratio small instead of an infinite penalty.
At the engine's own version this changes nothing: the sampled token is
already in the nucleus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class SamplingPolicy:
    """The transform from logits to the sampling distribution (`rollout.temperature`, `rollout.top_p`)."""

    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"rollout.temperature must be > 0 for a sampling distribution, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")

    def log_probs(self, logits: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """[..., V] log-probs of the sampling distribution; `keep` [...] token ids always left in the nucleus.

        Tokens outside the nucleus get -inf.
        """
        scaled = logits.float() / self.temperature
        if self.top_p >= 1.0:
            return torch.log_softmax(scaled, dim=-1)
        with torch.no_grad():  # which tokens are in the nucleus is not differentiated: no graph for the sort
            sorted_p, order = torch.softmax(scaled.detach(), dim=-1).sort(dim=-1, descending=True)
            in_nucleus = sorted_p.cumsum(-1) - sorted_p < self.top_p  # the smallest set reaching top_p; keeps the top token
            inside = torch.zeros_like(in_nucleus).scatter(-1, order, in_nucleus)
            if keep is not None:
                inside = inside.scatter(-1, keep.unsqueeze(-1), True)
        return torch.log_softmax(scaled.masked_fill(~inside, float("-inf")), dim=-1)


RAW = SamplingPolicy()
"""The model's own distribution (temperature 1, no nucleus): what sync probes compare."""


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] position ids that ignore left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def entropy_of(logp: torch.Tensor) -> torch.Tensor:
    """[...] entropy of distributions given as log-probs [..., V] (-inf entries contribute nothing).

    The -inf entries are replaced before the product, not after: 0 * -inf would be NaN in the
    gradient even where the value is discarded."""
    finite_logp = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
    return -(logp.exp() * finite_logp).sum(-1)


@dataclass(frozen=True)
class SharedPrefix:
    """Rows of a batch whose first `length` positions hold the same tokens (a GRPO group's prompt, or
    more): `firsts` [U] the first row of each distinct prefix, `of_row` [B] each row's index among them."""

    length: int
    firsts: torch.Tensor
    of_row: torch.Tensor


def shared_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> SharedPrefix | None:
    """The prefix a batch's rows can share in `token_logprobs`: the positions before the first one any
    row needs a log-prob at (the completions start after it), split into distinct token sequences
    (padding included). None when it is empty or no two rows share it."""
    cols = completion_mask.bool().any(0).nonzero()
    length = int(cols[0, 0]) if cols.numel() else 0
    if length < 1:
        return None
    keys = torch.cat([input_ids[:, :length], attention_mask[:, :length].to(input_ids.dtype)], dim=1)
    distinct, of_row = torch.unique(keys, dim=0, return_inverse=True)
    rows = keys.shape[0]
    if distinct.shape[0] == rows:
        return None
    firsts = torch.full((distinct.shape[0],), rows, dtype=torch.long).scatter_reduce(0, of_row, torch.arange(rows), "amin")
    return SharedPrefix(length, firsts, of_row)


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # [B, T]
    attention_mask: torch.Tensor,  # [B, T]
    with_entropy: bool = False,
    policy: SamplingPolicy = RAW,
    keep: int | None = None,
    prefix: SharedPrefix | None = None,
    between: Callable[[], None] | None = None,
    **forward_kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None, object]:
    """(logprobs [B, T-1], entropy [B, T-1] or None, model output).

    logprobs[:, t] is log pi(input_ids[:, t+1] | input_ids[:, :t+1]) under `policy`'s
    sampling distribution (temperature, top-p nucleus with the target kept in it).
    `keep`: only the last `keep` positions are wanted (a completion's span): the output head and
    the softmax run on those alone, and the earlier positions hold 0.

    `prefix` (`shared_prefix`; `keep` must not reach into it): the model runs the prefix once per
    distinct one, with its keys and values cached, copies each row's cache from its prefix's, then
    runs every row's rest over that cache. The values are those of one whole forward; in the
    backward, the gradients of a prefix's copies add up in its one computation. `between()` is
    called between the two forwards (the routing capture switches its replay there).
    """
    width = input_ids.shape[1]
    keep = width - 1 if keep is None else max(0, min(int(keep), width - 1))
    if keep < width - 1:
        forward_kwargs["logits_to_keep"] = keep + 1
    positions = positions_from_mask(attention_mask)
    if prefix is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False, **forward_kwargs)
    else:
        n, rows = prefix.length, prefix.firsts
        if keep > width - 1 - n:
            raise ValueError(f"token_logprobs: keep={keep} reaches into the shared prefix of {n} positions (width {width})")
        head = model(input_ids=input_ids[rows, :n], attention_mask=attention_mask[rows, :n], position_ids=positions[rows, :n],
                     use_cache=True, logits_to_keep=1)
        cache = head.past_key_values
        cache.batch_select_indices(prefix.of_row)  # each row's copy of its prefix's keys and values
        if between is not None:
            between()
        out = model(input_ids=input_ids[:, n:], attention_mask=attention_mask, position_ids=positions[:, n:], past_key_values=cache,
                    use_cache=True, **{"logits_to_keep": keep + 1, **forward_kwargs})
    targets = input_ids[:, width - keep:]
    logits = out.logits[:, out.logits.shape[1] - keep - 1 : -1]
    logp_all = policy.log_probs(logits, keep=targets)  # [B, keep, V]
    logprobs = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = entropy_of(logp_all) if with_entropy else None
    if keep < width - 1:
        logprobs = _left_pad(logprobs, width - 1)
        entropy = None if entropy is None else _left_pad(entropy, width - 1)
    return logprobs, entropy, out


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (width - x.shape[1], 0))


def completion_span(completion_mask: torch.Tensor) -> int:
    """How many trailing log-prob positions a batch's completion mask [B, T-1] reaches back to."""
    cols = completion_mask.bool().any(0).nonzero()
    return int(completion_mask.shape[1] - cols[0, 0]) if cols.numel() else 0


@torch.no_grad()
def probe_logprobs(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids) - 1] raw log-probs of a fixed probe sequence, for sync verification of the weights."""
    ids = torch.tensor([token_ids], dtype=torch.long, device=next(model.parameters()).device)
    logprobs, _, _ = token_logprobs(model, ids, torch.ones_like(ids))
    return logprobs[0].float().cpu()
