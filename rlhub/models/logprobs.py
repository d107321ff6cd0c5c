"""Per-token log-probs of given tokens under a causal LM, shared by learner and engines.

The learner and the built-in engine compute log-probs with the same function,
so that a sync check compares weights, not two implementations.
"""

from __future__ import annotations

import torch


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] position ids that ignore left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # [B, T]
    attention_mask: torch.Tensor,  # [B, T]
    with_entropy: bool = False,
    **forward_kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None, object]:
    """(logprobs [B, T-1], entropy [B, T-1] or None, model output).

    logprobs[:, t] is log p(input_ids[:, t+1] | input_ids[:, :t+1]), from the
    raw logits (no temperature), which is what engines report for sampling.
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        use_cache=False,
        **forward_kwargs,
    )
    logits = out.logits[:, :-1].float()  # [B, T-1, V]
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy, out


@torch.no_grad()
def probe_logprobs(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids) - 1] log-probs of a fixed probe sequence, for sync verification."""
    ids = torch.tensor([token_ids], dtype=torch.long, device=next(model.parameters()).device)
    logprobs, _, _ = token_logprobs(model, ids, torch.ones_like(ids))
    return logprobs[0].float().cpu()
