"""The TRL side of `rlhub bench peer`: TRL's GRPOTrainer on a spec that rlhub wrote.

    TRL_VENV/bin/python -I trl_grpo.py SPEC.json

Run by the TRL virtual environment's Python (`rlhub.benches.peer` installs it),
so this file imports nothing from rlhub: everything arrives in the JSON spec.
`model`: a Hugging Face directory (weights and tokenizer, the same files the
rlhub side loads); `rows`: one per prompt, in the order rlhub's data store hands
them out, each with the environment's `prompt`, its `answer` and the
`prompt_ids` rlhub's rollout worker feeds its engine; `reward`: the arithmetic
task's matching rule and end-of-turn id; `config`: GRPOConfig's arguments;
`torch_threads`: torch's thread count (null: torch's default); `peft`: peft LoraConfig's
arguments when the comparison trains adapters (null: every weight); `model_out`: where to write
the final policy (adapters merged) for the held-out evaluation (absent: nothing written).
Shuffling is off, so TRL trains on the same prompts in the same order.

Checked as it runs, failing loudly: every prompt TRL tokenizes must give the
ids rlhub gives, and every optimizer step must come from exactly one generation.
A TrainerCallback times each optimizer step (from the end of the previous one;
the first from `on_train_begin`) and records the exact success of the samples
the step trained on. The result is written to the spec's `out` as JSON.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any, Callable, Sequence

_INTEGER = re.compile(r"-?\d+")


def arithmetic_reward(text: str, finished: bool, answer: str, match: str = "exact") -> float:
    """The arithmetic task's rule (rlhub.envs.arithmetic): 1 when the reply ended its turn and is the
    answer (`exact`: the reply, stripped of surrounding whitespace, is the number; `last_number`: the
    last integer in the reply is the number), 0 otherwise; success is the same test.

    >>> arithmetic_reward(" 7", True, "7"), arithmetic_reward("7", False, "7"), arithmetic_reward("3+4=7", True, "7")
    (1.0, 0.0, 0.0)
    >>> arithmetic_reward("3 + 4 = 7.", True, "7", "last_number"), arithmetic_reward("7 or -7", True, "7", "last_number")
    (1.0, 0.0)
    """
    if not finished:
        return 0.0
    if match == "last_number":
        numbers = _INTEGER.findall(text)
        return 1.0 if numbers and numbers[-1] == answer else 0.0
    if match == "exact":
        return 1.0 if text.strip() == answer else 0.0
    raise ValueError(f"unknown match rule {match!r}: exact or last_number")


def completion_text(completion: Any) -> str:
    """A TRL completion's text: a string, or (chat prompts) a list of messages whose last is the reply."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def make_reward_func(eos_ids: Sequence[int], match: str, record: Callable[[int, list[float]], None] | None = None) -> Callable[..., list[float]]:
    """A TRL reward function for the arithmetic task. A completion ended its turn when its last id is
    an end-of-turn id (TRL keeps the first one it samples and cuts what follows). `record(step,
    successes)`: told the trainer's step and each completion's success, once per generation."""
    stops = set(eos_ids)

    def arithmetic(prompts: list, completions: list, completion_ids: list[list[int]], answer: list[str], **kwargs: Any) -> list[float]:
        rewards = [arithmetic_reward(completion_text(c), bool(ids) and ids[-1] in stops, a, match)
                   for c, ids, a in zip(completions, completion_ids, answer)]
        if record is not None:
            state = kwargs.get("trainer_state")
            record(state.global_step if state is not None else -1, rewards)
        return rewards

    return arithmetic


def main(spec_path: str) -> None:
    started = time.perf_counter()
    with open(spec_path) as f:
        spec = json.load(f)
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    if spec.get("torch_threads"):
        torch.set_num_threads(spec["torch_threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"]))
    eos = tokenizer.eos_token_id
    model.generation_config.eos_token_id = eos  # stop where rlhub stops: at the tokenizer's end of turn only
    if spec["reward"]["eos_token_id"] != eos:
        raise RuntimeError(f"end-of-turn id differs: rlhub {spec['reward']['eos_token_id']}, TRL's tokenizer {eos}")

    rows = spec["rows"]
    expected = {json.dumps(r["prompt"]): r["prompt_ids"] for r in rows}
    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])

    generations: dict[int, list[float]] = {}

    def record(step: int, successes: list[float]) -> None:
        if step in generations:
            raise RuntimeError(f"two generations for optimizer step {step}: the spec's batch must be one generation")
        generations[step] = successes

    class CheckedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer whose prompt tokenization is compared with rlhub's ids."""

        def _tokenize_prompts(self, prompts: list) -> Any:
            out = super()._tokenize_prompts(prompts)
            for prompt, ids in zip(prompts, out[0]):
                want = expected[json.dumps(prompt)]
                if list(ids) != want:
                    raise RuntimeError(f"prompt {prompt!r}: TRL tokenized it as {list(ids)}, rlhub feeds {want}")
            return out

    if not callable(getattr(GRPOTrainer, "_tokenize_prompts", None)):
        raise RuntimeError(f"trl {trl.__version__} has no GRPOTrainer._tokenize_prompts: the prompt-id check cannot run")

    steps: list[dict[str, float]] = []

    class Timing(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.origin = self.last = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            now = time.perf_counter()
            successes = generations.pop(state.global_step - 1, None)
            if successes is None:
                raise RuntimeError(f"optimizer step {state.global_step} trained on no generation of its own")
            steps.append({"step_s": now - self.last, "wall_s": now - self.origin, "success": sum(successes) / len(successes)})
            self.last = now

    timing = Timing()
    args = GRPOConfig(output_dir=spec["work_dir"], **spec["config"])
    peft_config = None
    if spec.get("peft"):
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **spec["peft"])
    trainer = CheckedGRPOTrainer(
        model=model,
        reward_funcs=make_reward_func([eos], spec["reward"]["match"], record),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[timing],
        peft_config=peft_config,
    )
    for quiet in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(quiet)
    trainer.train()
    if spec.get("model_out"):  # the final policy as a plain HF directory (adapters merged), for the held-out evaluation
        final = trainer.model.merge_and_unload() if peft_config is not None else trainer.model
        final.save_pretrained(spec["model_out"])
        tokenizer.save_pretrained(spec["model_out"])
    result = {"version": f"trl {trl.__version__}", "transformers": transformers.__version__, "torch": torch.__version__,
              "startup_s": timing.origin - started, "torch_threads": torch.get_num_threads(), "steps": steps}
    with open(spec["out"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
