"""A model judge: a second model scores completions, and its score joins the environment's reward.

`reward.judge.model` names any local Hugging Face causal-LM directory. The judge
reads `reward.judge.template`, filled with the episode's `{prompt}` (the last
user message, or the raw prompt), `{completion}` (the last assistant message)
and `{answer}` (the row's answer, when it has one), and gives a score in [0, 1]:

- `verdict=yes_no` (default): the judge's next-token probability of `yes`
  against `no` after the template, p(yes) / (p(yes) + p(no)); one forward pass,
  no sampling, and any model has such a score;
- `verdict=number`: the judge generates greedily up to 8 tokens; the first
  number in its text, clipped to [0, 1] (no number: 0).

The reward a sample trains on is `env reward + weight * score`; success stays
the environment's. On a run the judge is its own Ray actor with its own model
(`JudgeActor`): rollout actors send each finished generation batch to it and go
on generating; it batches what all actors sent (up to `max_batch` texts); the
groups are finished (advantages, store) when their scores come back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

DEFAULT_TEMPLATE = "Question: {prompt}\nAnswer: {completion}\nIs the answer correct? Reply yes or no.\n"


@dataclass
class JudgeConfig:
    model: str | None = None
    """A local HF causal-LM directory (None: no judge)."""
    template: str = DEFAULT_TEMPLATE
    """Filled with {prompt}, {completion} and {answer}."""
    verdict: str = "yes_no"
    """yes_no: p(yes) / (p(yes) + p(no)) for the next token; number: the first number the judge generates."""
    weight: float = 1.0
    """reward = env reward + weight * judge score."""
    max_batch: int = 256
    """Most texts scored in one forward pass."""
    num_gpus: float = 0.0


def judge_inputs(template: str, prompt: Any, completion: str, row: Any) -> str:
    """The judge's text for one sample."""
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        prompt = users[-1] if users else ""
    answer = row.get("answer", "") if hasattr(row, "get") else ""
    return template.format(prompt=prompt, completion=completion, answer=answer)


class Judge:
    """The judge model, scoring batches of texts (the plain class behind `JudgeActor`)."""

    def __init__(self, cfg: JudgeConfig, device: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if cfg.verdict not in ("yes_no", "number"):
            raise ValueError(f"reward.judge.verdict={cfg.verdict!r}: use yes_no or number")
        self.cfg = cfg
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).to(self.device).eval()
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.yes, self.no = self._token("yes"), self._token("no")
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048) - 8  # room for a number

    def _token(self, word: str) -> int:
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        return ids[0]  # the first token of the word: what the judge would sample first

    def score(self, texts: Sequence[str]) -> list[float]:
        out: list[float] = []
        for lo in range(0, len(texts), self.cfg.max_batch):
            chunk = list(texts[lo : lo + self.cfg.max_batch])
            out += self._yes_no(chunk) if self.cfg.verdict == "yes_no" else self._number(chunk)
        return out

    def _batch(self, texts: list[str]) -> tuple[Any, Any]:
        import torch

        # a text longer than the judge's context keeps its end, where the template puts the question
        ids = [self.tokenizer.encode(t, add_special_tokens=False)[-self.max_len:] or [self.pad] for t in texts]
        width = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, row in enumerate(ids):  # left padding: every text's last token at the end
            input_ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def _yes_no(self, texts: list[str]) -> list[float]:
        import torch

        from rlhub.engines.hf import positions_from_mask

        input_ids, mask = self._batch(texts)
        with torch.no_grad():
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits[:, -1].float()
        two = torch.log_softmax(logits, -1)[:, [self.yes, self.no]]  # [B, 2]
        return torch.softmax(two, -1)[:, 0].tolist()

    def _number(self, texts: list[str]) -> list[float]:
        import torch

        from rlhub.engines.hf import positions_from_mask

        input_ids, mask = self._batch(texts)
        generated = [[] for _ in texts]
        with torch.no_grad():
            for _ in range(8):
                logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits[:, -1]
                nxt = logits.argmax(-1)
                for r, t in enumerate(nxt.tolist()):
                    generated[r].append(t)
                input_ids = torch.cat([input_ids, nxt[:, None]], 1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        return [parse_number(self.tokenizer.decode(g, skip_special_tokens=True)) for g in generated]


def parse_number(text: str) -> float:
    """The first number in `text`, clipped to [0, 1]; 0 without one.

    >>> parse_number("score: 0.75."), parse_number("7"), parse_number("none")
    (0.75, 1.0, 0.0)
    """
    m = re.search(r"\d+(?:\.\d+)?", text)
    return min(1.0, max(0.0, float(m.group()))) if m else 0.0


class LocalJudgeClient:
    """The judge in this process (tests, `rlhub eval`): every request is answered at once."""

    def __init__(self, judge: Judge) -> None:
        self.judge = judge

    def submit(self, texts: list[str]) -> Any:
        return self.judge.score(texts)

    def ready(self, handle: Any) -> bool:
        return True

    def result(self, handle: Any) -> list[float]:
        return handle
