"""Command-line overrides checked against the schema before Hydra composes them.

Hydra's own messages name an unknown key but not the key meant, and a wrong
value's type in three lines. Here an unknown key is named with the nearest
known one (`difflib`: a sibling spelled alike, else the same name in another
section, so `learner.lr` points at `algorithm.lr`), an unknown group option
(`algorithm=grpoo`) with the options there are, and a value of the wrong type
with the type its key takes: each a one-line `ConfigError`.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

OPEN = object()
"""The schema's mark for a dict field (`env.kwargs`, `env.dataset.columns`): any key below it is allowed."""


def schema(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of dataclass `cls` -> its type (a nested dataclass's own key included; OPEN for a dict)."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        key, hint = f"{prefix}{f.name}", _plain(hints[f.name])
        if is_dataclass(hint):
            out[key] = hint
            out.update(schema(hint, f"{key}."))
        else:
            out[key] = OPEN if typing.get_origin(hint) is dict or hint is dict else hint
    return out


def _plain(hint: Any) -> Any:
    """`X | None` -> X when X is a dataclass (the schema walks into it); anything else as it is."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1 and is_dataclass(inner[0]):
            return inner[0]
    return hint


def nearest(key: str, known: list[str]) -> list[str]:
    """The known keys `key` was most likely meant to be: a sibling spelled alike; else the keys of the
    same last name in other sections (`learner.lr`: `algorithm.lr`, `warm_start.lr`); else, when the
    section itself is misspelled, a key spelled alike."""
    parent, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
    close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.7)
    if close:
        return [siblings[close[0]]]
    same_leaf = sorted(k for k in known if k.rpartition(".")[2] == leaf)
    if same_leaf:
        return same_leaf[:3]
    return [] if siblings else difflib.get_close_matches(key, known, n=1, cutoff=0.8)


def check_overrides(overrides: list[str], config_dir: Path, root: type) -> None:
    """ConfigError for the first override whose key is not in `root`'s schema or whose group option
    has no file under `config_dir`. Additions and deletions (`+k=v`, `~k`) are left to Hydra."""
    from rlhub.config import ConfigError

    keys = schema(root)
    for override in overrides:
        key, eq, value = override.partition("=")
        if not eq or key.startswith(("+", "~", "hydra.")) or any(c in key for c in "@[/"):  # Hydra's other forms: its own checks
            continue
        group = config_dir / key
        if "." not in key and group.is_dir() and key != "env" and value and value != "null":
            options = sorted(p.stem for p in group.glob("*.yaml"))
            if value not in options:
                guess = difflib.get_close_matches(value, options, n=1, cutoff=0.5)
                hint = f"; did you mean {key}={guess[0]}?" if guess else ""
                raise ConfigError(f"{key}={value}: no such option (conf/{key}/ has {', '.join(options)}){hint}")
            continue
        parts = key.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if keys.get(prefix, None) is OPEN:
                break  # a dict field: its keys are the environment's own
            if prefix not in keys:
                raise ConfigError(f"{key}: no such key{_hint(key, keys)}")


def _hint(key: str, keys: dict[str, Any]) -> str:
    """"; did you mean K?" with the nearest known keys; else the keys of the section `key` names."""
    guess = nearest(key, [k for k, v in keys.items() if not is_dataclass(v)])
    if guess:
        return f"; did you mean {' or '.join(guess)}?"
    parent = key.rpartition(".")[0]
    if parent and parent not in keys:
        return ""
    return f"; {parent or 'the top level'} has {', '.join(k.rpartition('.')[2] for k in keys if k.rpartition('.')[0] == parent)}"


def type_error(e: BaseException, root: type) -> str | None:
    """One line for an OmegaConf type error somewhere in `e`'s chain: the key, the value given and the
    type the key takes; None when the chain holds no such error."""
    from omegaconf.errors import ValidationError

    keys = schema(root)
    while e is not None:
        if isinstance(e, ValidationError) and getattr(e, "full_key", None) in keys:
            return f"{e.full_key}={e.value!r}: expected {_type_name(keys[e.full_key])}"
        e = e.__cause__ or e.__context__
    return None


def _type_name(hint: Any) -> str:
    """`int` -> "an integer", `str | None` -> "a string or null", ..."""
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    said = [names.get(a, getattr(a, "__name__", str(a))) for a in args if a is not type(None)]
    return " or ".join(said + (["null"] if type(None) in args else []))
