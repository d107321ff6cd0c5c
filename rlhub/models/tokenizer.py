"""A byte-level tokenizer made offline: 256 byte tokens plus three specials.

No merges, so every UTF-8 string round-trips exactly and the vocabulary (259)
stays tiny, which makes the default MoE cheap to generate with and to train.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_byte_tokenizer():
    """A `PreTrainedTokenizerFast` over raw bytes, with `<|im_end|>` as EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    byte_values = sorted(alphabet, key=_byte_table().__getitem__)
    vocab = {ch: i for i, ch in enumerate(byte_values)}
    for i, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = 256 + i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _byte_table() -> dict[str, int]:
    """ByteLevel's printable stand-in character -> the byte it stands for.

    Printable bytes stand for themselves; the others map to 256 + n, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(rest)})
    return table


def save_byte_tokenizer(path: Path) -> None:
    build_byte_tokenizer().save_pretrained(str(path))


class TextCodec:
    """What the controller needs of a tokenizer (decode, the EOS id), without importing transformers.

    A model directory with a `tokenizer.json` (every fast tokenizer) is read with the
    `tokenizers` library in a few milliseconds; other directories fall back to transformers.
    Engines and the learner load the full tokenizer in their own processes.
    """

    def __init__(self, model_path: Path) -> None:
        self.path = Path(model_path)
        self._fast = None
        self._full = None
        if (self.path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        else:
            from transformers import AutoTokenizer

            self._full = AutoTokenizer.from_pretrained(str(self.path))

    @property
    def eos_token_id(self) -> int | None:
        if self._full is not None:
            return self._full.eos_token_id
        config = self.path / "tokenizer_config.json"
        eos = json.loads(config.read_text()).get("eos_token") if config.is_file() else None
        if isinstance(eos, dict):  # {"content": "<|im_end|>", ...}
            eos = eos.get("content")
        return self._fast.token_to_id(eos) if eos else None

    def decode(self, ids: list[int]) -> str:
        """The text of these ids, special tokens kept."""
        if self._full is not None:
            return self._full.decode(ids)
        return self._fast.decode(ids, skip_special_tokens=False)
