"""Task data through Hugging Face `datasets`.

`env.dataset.path` names local json, jsonl, csv or parquet files (a glob, or a
directory of them), a `save_to_disk` directory, or a hub id (where a hub is
reachable; rlhub itself never needs one). `env.dataset.columns` maps the
environment's row fields to the dataset's columns; `split` is the training split
and `eval_split` a held-out one (or `eval_size` rows held out of the training
split, chosen with the seed). Rows stay in the dataset's order: the run's seeded
per-epoch permutation (`rlhub.datastore.prompt_index`) picks them, and the
store's cursor, saved in checkpoints, is where a resumed run continues.

Every problem (no such file, an empty split, a missing column) is a
`DataError` naming it, raised before Ray starts.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


class DataError(ValueError):
    """The task data cannot be used as configured."""


@dataclass
class DatasetConfig:
    """Where an environment's rows come from (`env.dataset`); path None: the environment's own rows."""

    path: str | None = None
    """Local data file(s) (json, jsonl, csv, parquet; a glob or a directory of them), a save_to_disk
    directory, or a hub id."""
    split: str = "train"
    eval_split: str | None = None
    """The split held out for evaluation; None: `eval_size` rows of the training split, or none."""
    eval_size: int = 0
    """Rows held out of the training split for evaluation when there is no eval_split (seeded)."""
    columns: dict[str, str] = field(default_factory=dict)
    """The environment's row field -> the dataset's column, for columns named otherwise."""
    limit: int = 0
    """Use only the first N training rows, after any held-out rows are taken (0: all)."""


SPLIT_NAMES = ("train", "test", "validation", "valid", "eval", "dev")


def _split_of(name: str) -> str | None:
    """The split a data file's name says it holds (train.jsonl, test-00000-of-00001.parquet), or None."""
    stem = Path(name).name.split(".")[0]
    return next((s for s in SPLIT_NAMES if stem == s or stem.startswith((f"{s}-", f"{s}_"))), None)


def _files(path: str, split: str) -> tuple[str, list[str]] | None:
    """(datasets builder name, files of `split`) for local data files, None when `path` is not one.
    A directory whose files are named by split (train.jsonl, test.jsonl) holds those splits; any
    other file, glob or directory is one split, 'train'."""
    p = Path(path).expanduser()
    if p.is_dir():
        found = sorted(str(f) for f in p.iterdir() if f.suffix in FORMATS and f.suffix != ".arrow")
    else:
        found = sorted(glob.glob(str(p))) if any(c in path for c in "*?[") else ([str(p)] if p.is_file() else [])
    if not found:
        return None
    kinds = {FORMATS.get(Path(f).suffix) for f in found}
    if None in kinds or len(kinds) > 1:
        raise DataError(f"env.dataset.path={path!r}: files must all be one of {sorted(FORMATS)} (found {sorted(Path(f).name for f in found)[:5]})")
    splits = {f: _split_of(f) for f in found} if p.is_dir() else {}
    if any(splits.values()):
        chosen = [f for f, s in splits.items() if s == split]
        if not chosen:
            raise DataError(f"env.dataset.path={path!r} has splits {sorted({s for s in splits.values() if s})}, not {split!r}")
        return kinds.pop(), chosen
    if split != "train":
        raise DataError(f"env.dataset.path={path!r}: local files hold one split ('train'); name them by split in a "
                        f"directory (train.jsonl, test.jsonl), or use env.dataset.eval_size")
    return kinds.pop(), found


def _load(path: str, split: str) -> Any:
    """One split of the dataset at `path`, or DataError."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    p = Path(path).expanduser()
    if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():  # save_to_disk
        loaded = datasets.load_from_disk(str(p))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"env.dataset.path={path!r} has splits {sorted(loaded)}, not {split!r}")
            return loaded[split]
        if split != "train":
            raise DataError(f"env.dataset.path={path!r} is a single dataset (split 'train'), not {split!r}")
        return loaded
    local = _files(path, split)
    if local is not None:
        builder, files = local
        if all(Path(f).stat().st_size == 0 for f in files):
            raise DataError(f"env.dataset.path={path!r}: split {split!r} is empty")
        try:
            return datasets.load_dataset(builder, data_files=files, split="train")  # datasets' name for one split
        except Exception as e:  # noqa: BLE001 - a malformed file, said with its name
            raise DataError(f"env.dataset.path={path!r}: cannot be read as {builder} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if p.is_absolute() or path.startswith((".", "~")) or p.suffix in FORMATS or "*" in path:
        raise DataError(f"env.dataset.path={path!r}: no such file or directory")
    try:
        return datasets.load_dataset(path, split=split)
    except Exception as e:  # noqa: BLE001 - offline, unknown id, unknown split: all said the same way
        raise DataError(f"env.dataset.path={path!r} is neither a local file nor a loadable hub dataset "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def load_rows(cfg: DatasetConfig, required: Sequence[str] = (), seed: int = 0) -> dict[str, Sequence[Mapping[str, Any]]]:
    """{"train": rows, "test": rows} for an environment; `required`: the row fields it reads."""
    if not cfg.path:
        raise DataError("env.dataset.path is not set")
    train = _load(cfg.path, cfg.split)
    test = _load(cfg.path, cfg.eval_split) if cfg.eval_split else None
    train, test = (_mapped(d, cfg, required, name) if d is not None else None for d, name in ((train, cfg.split), (test, cfg.eval_split)))
    if test is None and cfg.eval_size:
        if cfg.eval_size >= len(train):
            raise DataError(f"env.dataset.eval_size={cfg.eval_size} leaves no training rows (the split has {len(train)})")
        import random

        held = set(random.Random(seed).sample(range(len(train)), cfg.eval_size))
        test = train.select(sorted(held))
        train = train.select([i for i in range(len(train)) if i not in held])
    if cfg.limit:  # after the held-out rows are taken: the training rows used
        train = train.select(range(min(cfg.limit, len(train))))
    if len(train) == 0:
        raise DataError(f"env.dataset.path={cfg.path!r}: split {cfg.split!r} is empty")
    return {"train": train, "test": test if test is not None else train.select([])}


def _mapped(data: Any, cfg: DatasetConfig, required: Sequence[str], split: str) -> Any:
    """Columns renamed to the environment's field names, and the required ones present."""
    renames = {}
    for want, column in cfg.columns.items():
        if column not in data.column_names:
            raise DataError(f"env.dataset.columns.{want}={column!r}: split {split!r} of {cfg.path!r} has no column "
                            f"{column!r}; its columns: {data.column_names}")
        if column != want:
            renames[column] = want
    if renames:
        data = data.rename_columns(renames)
    missing = [c for c in required if c not in data.column_names]
    if missing:
        raise DataError(f"env.dataset.path={cfg.path!r}: split {split!r} lacks column(s) {missing} that the environment "
                        f"reads; its columns: {data.column_names} (map one with env.dataset.columns.{missing[0]}=COLUMN)")
    return data


def write_jsonl(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Rows as JSON lines (how the built-in tasks' data files are written)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(dict(r), sort_keys=True) + "\n" for r in rows))
    return path


def task_files(name: str, params: Mapping[str, Any], shipped: Mapping[str, Any], write: Callable[[Path], Any],
               shipped_dir: Path) -> tuple[Path, Path]:
    """(train, test) jsonl files of a built-in generated task: the shipped ones (envs/data/) when `params` are those they were
    written with, else written once by `write(directory)` under RLHUB_CACHE/envs/<name>-<key>/
    (aside, then renamed into place, so workers starting together never read half a file)."""
    if dict(params) == dict(shipped):
        directory = shipped_dir
    else:
        key = hashlib.sha1(json.dumps(dict(params), sort_keys=True).encode()).hexdigest()[:12]
        from rlhub.models.build import cache_dir

        directory = cache_dir() / "envs" / f"{name}-{key}"
    train, test = directory / f"{name}.jsonl", directory / f"{name}_test.jsonl"
    if directory == shipped_dir and not (train.is_file() and test.is_file()):
        raise FileNotFoundError(f"{train} or {test} is missing: write them with `python -m rlhub.envs.{name}`")
    if not directory.is_dir():
        tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        try:
            tmp.rename(directory)
        except OSError:  # another worker renamed its copy first
            shutil.rmtree(tmp, ignore_errors=True)
    return train, test


def load_split(path: Path) -> Any:
    """The rows of one local jsonl file, through the project's `datasets` loader."""
    from rlhub.data import DatasetConfig, load_rows

    return load_rows(DatasetConfig(path=str(path)))["train"]
