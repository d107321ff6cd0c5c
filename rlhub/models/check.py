"""A model directory (`model.path`) checked before Ray starts, in milliseconds, without loading it.

What a run would otherwise find minutes later, inside an actor, as a traceback:
`config.json` that is not JSON, no weight files, a safetensors file shorter
than its own header says (an interrupted copy or download), a shard the index
names that is not there, and a tokenizer whose ids go past the model's
`vocab_size` (a tokenizer from another model: its ids would index past the
embedding). Each is a `ValueError` in one line naming the directory, the file
and what is wrong; `resolve_model_path` raises it as a `ConfigError`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any


def check_model_dir(path: Path) -> dict[str, Any]:
    """The directory's config.json, after checking it, its weights and its tokenizer (module docstring)."""
    where = f"model.path={str(path)!r}"
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: config.json is not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where}: config.json holds a {type(config).__name__}, not a model's settings")
    check_weights(path, where)
    vocab = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    top = tokenizer_max_id(path)
    if isinstance(vocab, int) and top is not None and top >= vocab:
        raise ValueError(f"{where}: the tokenizer has ids up to {top} but the model's vocab_size is {vocab}: ids from {vocab} on "
                         "have no embedding (a tokenizer from another model?)")
    return config


def check_weights(path: Path, where: str) -> None:
    """ValueError naming the first weight file that is missing, unreadable or cut short."""
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            named = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{where}: {index.name} is not a safetensors index ({type(e).__name__}: {e})") from None
        missing = [n for n in named if not (path / n).is_file()]
        if missing:
            raise ValueError(f"{where}: {index.name} names {missing[0]}, which is not there ({len(missing)} of {len(named)} missing)")
    if not files and not any(path.glob("pytorch_model*.bin")):
        raise ValueError(f"{where}: no weights (*.safetensors or pytorch_model*.bin)")
    for f in files:
        problem = safetensors_problem(f)
        if problem:
            raise ValueError(f"{where}: {f.name}: {problem}")


def safetensors_problem(f: Path) -> str | None:
    """What is wrong with safetensors file `f` as its header describes it (None: nothing): the 8-byte
    header length, the JSON header, and the file as long as the last tensor's end."""
    size = f.stat().st_size
    with f.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{size} bytes: not a safetensors file (truncated?)"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"{size} bytes, but its header alone says {n + 8} (truncated)"
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError):
            return "its header is not JSON (not a safetensors file, or corrupt)"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict) and "data_offsets" in t]
    want = 8 + n + max(ends, default=0)
    if size < want:
        return f"{size} bytes, but its header says {want} (truncated)"
    return None


def tokenizer_max_id(path: Path) -> int | None:
    """The largest token id of the directory's tokenizer.json (added tokens included), None without one."""
    f = path / "tokenizer.json"
    if not f.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        vocab = Tokenizer.from_file(str(f)).get_vocab(with_added_tokens=True)
    except Exception as e:  # noqa: BLE001 - the tokenizers library's error, as one line
        said = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"model.path={str(path)!r}: tokenizer.json does not load ({said})") from None
    return max(vocab.values(), default=None)
