"""`rlhub bench NAME [args...]`: benchmarks that print JSON and append it to a results file.

Every benchmark is a function `run(args: list[str]) -> dict` in `rlhub.benches.<module>`, run
once or several times on a quiet machine (`rlhub.benches.repeat`: `--runs`, `--max-load`; the
figures are medians with their range, every run's load average recorded). Its result is printed and appended, as one line, to the results file
(`bench/results.jsonl` in the working directory, or `$RLHUB_BENCH_RESULTS`), with the
command that reproduces it, the commit and the machine. `rlhub bench report` turns the
newest record of each benchmark into the README's performance section.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

BENCHES = {
    "peer": "rlhub.benches.peer",
    "e2e": "rlhub.benches.e2e",
    "engine": "rlhub.benches.engine",
    "sync": "rlhub.benches.sync",
    "store": "rlhub.benches.store",
    "scale": "rlhub.benches.scale",
    "presets": "rlhub.benches.e2e",
    "sandbox": "rlhub.benches.sandbox",
    "learner": "rlhub.benches.learner",
    "train": "rlhub.benches.train",
    "budget": "rlhub.benches.budget",
}
"""Each benchmark's module; `presets` is `bench_presets` in the e2e module."""


def results_path() -> Path:
    return Path(os.environ.get("RLHUB_BENCH_RESULTS", "bench/results.jsonl"))


def _commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True).stdout
        # the results file itself grows with every record: a run of several benchmarks is not dirty for that
        dirty = [line for line in changed.splitlines() if line.strip() and not line.endswith("bench/results.jsonl")]
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    import torch

    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "python": platform.python_version()}


def record(name: str, args: list[str], result: dict[str, Any], path: Path | None = None) -> dict[str, Any]:
    """Append one benchmark's result to the results file; returns the record written."""
    entry = {
        "bench": name,
        "command": " ".join(["rlhub", "bench", name, *args]),
        "args": list(args),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "machine": machine(),
        "result": result,
    }
    path = path or results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    return entry


def read_results(path: Path | None = None) -> list[dict[str, Any]]:
    """Every record of the results file, oldest first (none when it does not exist)."""
    path = path or results_path()
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The newest record of each benchmark; `learner` on the SmolLM2 MoE is its own entry
    (`learner_smollm2`), so the tiny model's figures stay beside it, and its run of the `lora_bf16` and
    `shared_prefix` cases alone (`--cases lora_bf16,shared_prefix`, or one of them) is `learner_smollm2_lora`;
    `peer` on the SmolLM2 config alone (`configs=smollm2_moe`) is `peer_smollm2`, so the tiny configs'
    comparison and its targets stay beside it; `sync` under `model.lora.rank` is `sync_lora`; `budget` is
    one entry per set of sides and task (`budget:grpo,spo@smollm2_moe_lora`: the common overrides'
    experiment and env), so each comparison keeps its newest record."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        result = r.get("result") or {}
        if r["bench"] == "budget":
            out[budget_key(result)] = r
            continue
        smollm2 = r["bench"] == "learner" and result.get("model") == "smollm2_moe"
        lora_only = smollm2 and bool(result.get("cases")) and set(result["cases"]) <= {"lora_bf16", "shared_prefix"}
        peer_smollm2 = r["bench"] == "peer" and set(result.get("configs") or {}) == {"smollm2_moe"}
        sync_lora = r["bench"] == "sync" and bool(result.get("lora_rank"))
        out["learner_smollm2_lora" if lora_only else "learner_smollm2" if smollm2 else "peer_smollm2" if peer_smollm2
            else "sync_lora" if sync_lora else r["bench"]] = r
    return out


def budget_key(result: dict[str, Any]) -> str:
    """A `budget` record's report entry: its sides, and the experiment and env its common overrides name.

    >>> budget_key({"sides": {"uniform": {}, "difficulty": {}}, "overrides": {"common": ["experiment=countdown", "eval.every=0"]}})
    'budget:uniform,difficulty@countdown'
    """
    common = (result.get("overrides") or {}).get("common") or []
    task = [o.partition("=")[2] for o in common if o.startswith(("experiment=", "env="))]
    return "budget:" + ",".join(result.get("sides") or {}) + ("@" + ",".join(task) if task else "")


def run(name: str, args: list[str]) -> dict[str, Any]:
    """Run benchmark `name` as `rlhub.benches.repeat` says (`--runs`, each on a quiet machine), append
    its record, return the result."""
    import importlib

    from rlhub.benches.repeat import repeated, split_args

    if name not in BENCHES:
        raise KeyError(f"unknown benchmark {name!r}; one of: {', '.join(BENCHES)}, report")
    opts, own = split_args(name, args)
    module = importlib.import_module(BENCHES[name])
    check = getattr(module, "check_args", None)
    if check is not None and name != "presets":  # bad arguments are answered at once, not after waiting for a quiet machine
        check(own)
    result = repeated(module.bench_presets if name == "presets" else module.run, own, opts)
    record(name, args, result)
    return result
