"""Soak: a long training run with a random process killed every few minutes (not part of CI).

    .venv/bin/python scripts/soak.py --minutes 30 --kill-every 240 [train overrides...]

It starts `rlhub train` (the default task; checkpoints every 25 steps) in its own run directory,
kills one process (a rollout actor, the learner, a store shard, the store's coordinator or the
weight registry, drawn at random with --seed) every --kill-every seconds with `rlhub.faults.inject`,
and samples the resident memory of every process the run lists in processes.json once a minute.
After --minutes it asks the run to stop (`rlhub stop`), waits for its summary, and prints JSON: the
steps trained, each kill and whether the run went on past it, the ledger's reconciliation, and per
role the memory at its first and last sample, with the growth per 10 minutes of each process that
lived at least 10 minutes. The same JSON goes to RUN_DIR/soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhub.faults import inject, last_step, processes, recovery  # noqa: E402

TARGETS = ("rollout actor", "rollout actor", "learner rank 0", "store shard", "store coordinator", "weight registry")
"""What a kill draws from: rollout actors twice as often (there are several)."""


def rss_mb(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--kill-every", type=float, default=240.0, help="seconds between kills")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    a = parser.parse_args()
    run_dir = (a.run_dir or ROOT / "runs" / "soak" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "rlhub.cli", "train", "experiment.total_steps=1000000", "checkpoint.every=25", "progress=false",
            "rollout.num_actors=2", f"run_dir={run_dir}", *a.overrides]
    err = open(run_dir.parent / f"{run_dir.name}.train.err", "w")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "RAY_ADDRESS": ""})
    alive = lambda: proc.poll() is None  # noqa: E731
    rng = random.Random(a.seed)
    start = time.monotonic()
    end = start + 60 * a.minutes
    samples: dict[str, list[tuple[float, int, float]]] = {}  # role -> [(minute, pid, MB)]
    kills: list[dict] = []
    next_sample, next_kill = start + 60, start + a.kill_every
    while time.monotonic() < end and alive():
        now = time.monotonic()
        if now >= next_sample:
            for role, where in processes(run_dir).items():
                mb = rss_mb(int(where["pid"]))
                if mb is not None:
                    samples.setdefault(role, []).append(((now - start) / 60, int(where["pid"]), mb))
            next_sample += 60
        if now >= next_kill:
            target = rng.choice(TARGETS)
            try:
                kills.append({"fault": inject(run_dir, target, last_step(run_dir), alive=alive, timeout_s=60)})
            except (ValueError, TimeoutError, RuntimeError, ProcessLookupError) as e:
                kills.append({"target": target, "skipped": str(e)})
            next_kill += a.kill_every
        time.sleep(1)
    subprocess.run([sys.executable, "-m", "rlhub.cli", "stop", str(run_dir)], check=False)
    code = proc.wait(timeout=900)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    memory = {}
    for role, series in sorted(samples.items()):
        by_pid: dict[int, list[tuple[float, float]]] = {}
        for minute, pid, mb in series:
            by_pid.setdefault(pid, []).append((minute, mb))
        growth = [(s[-1][1] - s[0][1]) / (s[-1][0] - s[0][0]) * 10 for s in by_pid.values() if s[-1][0] - s[0][0] >= 10]
        memory[role] = {"first_mb": round(series[0][2], 1), "last_mb": round(series[-1][2], 1), "max_mb": round(max(m for *_, m in series), 1),
                        "processes": len(by_pid), "growth_mb_per_10min": [round(g, 1) for g in growth]}
    out = {
        "exit_code": code, "minutes": round((time.monotonic() - start) / 60, 1), "run_dir": str(run_dir),
        "steps": summary.get("steps"), "status": summary.get("status"), "ledger": summary.get("ledger"),
        "recoveries": len(summary.get("recoveries", [])), "actor_restarts": summary.get("failures", {}).get("actor_restarts"),
        "kills": [{**recovery(run_dir, k["fault"], summary.get("recoveries", []))} if "fault" in k else k for k in kills],
        "memory": memory,
    }
    (run_dir / "soak.json").write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(out, indent=1, default=str))
    return 0 if code == 0 and summary.get("status") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
