"""The learner's arithmetic precision (`learner.precision`).

`fp32`: everything in the parameters' dtype. `bf16`: forwards and backwards under autocast to bf16
(matmuls and attention in bf16, the parameters and AdamW's moments stay fp32, so updates smaller than
bf16's resolution still add up), with the output head and everything after it in fp32: the logits,
log-softmax, log-probs, ratios and losses, where bf16's 8-bit mantissa would put an error of about
0.05 on a logit of 10. Under LoRA the frozen base weights are stored in bf16 (no cast at every
forward, half the memory) and only the adapters are fp32.
"""

from __future__ import annotations

import types
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

PRECISIONS = ("fp32", "bf16")


def autocast(precision: str, device: torch.device) -> Any:
    """The context a forward and backward of the learner run in."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def head_in_fp32(model: torch.nn.Module) -> None:
    """Make the output head compute its logits in fp32 even under autocast (the state dict is untouched)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "_rlhub_fp32", False):
        return

    def forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)

    head.forward = types.MethodType(forward, head)
    head._rlhub_fp32 = True
