"""Run tracking: Weights & Biases (offline by default), metrics.jsonl, samples.jsonl, and the progress bar.

Non-finite metric values are never dropped silently: they are written as
null, counted per key (`nonfinite`), and a run that had any does not report
success. `wandb.mode=online` without W&B credentials logs offline, with one
warning, instead of prompting or failing at start (`wandb_mode`).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

log = logging.getLogger("rlhub")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a jsonl file the run writes (metrics.jsonl, samples.jsonl, ledger.jsonl); blank lines are skipped."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_steps(path: Path, last_step: int) -> int:
    """Keep the rows of a jsonl file whose "step" is at most last_step (a resume redoes the rest);
    returns how many rows were removed."""
    if not path.is_file():
        return 0
    kept, removed = [], 0
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # a torn last line from a killed run
            removed += 1
            continue
        if step <= last_step:
            kept.append(line)
        else:
            removed += 1
    path.write_text("".join(line + "\n" for line in kept))
    return removed


def wandb_mode(mode: str) -> str:
    """`wandb.mode`, or offline (with one warning) for `online` without credentials: W&B would ask for a
    key on the terminal or fail at start. Credentials are WANDB_API_KEY (or WANDB_IDENTITY_TOKEN_FILE) or
    an entry in the netrc file ($NETRC, else ~/.netrc) for the W&B host; nothing touches the network."""
    if mode != "online" or has_wandb_credentials():
        return mode
    log.warning("wandb.mode=online but no W&B credentials (WANDB_API_KEY or `wandb login`): logging offline instead; "
                "`wandb sync RUN_DIR/wandb/offline-run-*` uploads it later")
    return "offline"


def has_wandb_credentials() -> bool:
    import netrc
    import os
    from urllib.parse import urlsplit

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    try:
        found = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(found and found[2])


class Tracker:
    def __init__(self, run_dir: Path, cfg: Any, total_steps: int, start_step: int, resume_id: str | None = None) -> None:
        self.run_dir = run_dir
        self.metrics_file = (run_dir / "metrics.jsonl").open("a")
        self.samples_file = None
        self.nonfinite: Counter[str] = Counter()
        self.wandb_run = None
        self.run_id: str | None = None
        mode = wandb_mode(cfg.wandb.mode)
        if mode != "disabled":
            import wandb

            from rlhub.redact import redact_config, redact_text, redacted_argv

            with redacted_argv():  # W&B records the command line as the run's metadata
                self.wandb_run = wandb.init(
                    project=cfg.wandb.project,
                    entity=cfg.wandb.entity,
                    mode=mode,
                    dir=str(run_dir),
                    name=redact_text(f"{cfg.experiment.name}-{run_dir.name}"),
                    config=redact_config(asdict(cfg)),  # no secret (rlhub.redact) in the config W&B keeps
                    tags=redact_config(list(cfg.wandb.tags)),
                    id=resume_id,
                    resume="allow" if resume_id else None,
                    settings=wandb.Settings(console="off", silent=True),
                )
            self.run_id = self.wandb_run.id  # the resolved config is the run's W&B config (and run_dir/config.yaml)
        self.bar = None
        self._bar_args = dict(total=total_steps, initial=start_step, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
        self.progress = cfg.progress  # the bar appears with the first step, so start-up is not counted in its rate

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        bad = [k for k, v in numeric.items() if not math.isfinite(v)]
        self.nonfinite.update(bad)
        row = {k: (None if k in bad else v) for k, v in numeric.items()}
        self.metrics_file.write(json.dumps({"step": step, **row}) + "\n")
        self.metrics_file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(numeric, step=step)
        if self.progress and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(**self._bar_args)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(
                reward=f"{metrics.get('rollout/reward_mean', 0):.2f}",
                success=f"{metrics.get('rollout/success_rate', 0):.2f}",
                stale=f"{metrics.get('staleness/mean', 0):.1f}",
                refresh=False,
            )

    def log_samples(self, step: int, records: list[dict[str, Any]]) -> None:
        """Sampled groups: one JSON object per sample in samples.jsonl, and a W&B table."""
        if not records:
            return
        if self.samples_file is None:
            self.samples_file = (self.run_dir / "samples.jsonl").open("a")
        self.samples_file.write("".join(json.dumps(r) + "\n" for r in records))
        self.samples_file.flush()
        if self.wandb_run is not None:
            import wandb

            columns = ["step", "group", "actor", "prompt", "completion", "reward", "finish_reason"]
            self.wandb_run.log({"samples": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in records])}, step=step)

    def log_images(self, paths: list[Path], step: int | None = None) -> None:
        """PNG files as W&B images under `plots/<file stem>`, at `step` (default: W&B's current step),
        so a picture drawn again later gets a step slider; nothing without W&B."""
        if self.wandb_run is not None and paths:
            import wandb

            self.wandb_run.log({f"plots/{Path(p).stem}": wandb.Image(str(p)) for p in paths}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            for k, v in values.items():
                self.wandb_run.summary[k] = v

    def finish(self, summary: dict[str, Any], images: list[Path]) -> None:
        """The run's summary (scalars, and the failure counters flattened) and pictures to W&B, then close;
        W&B marks a run whose status is not ok as failed."""
        if self.wandb_run is not None:
            self.log_images(images)
            flat = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
            flat.update({f"failures/{k}": v for k, v in summary.get("failures", {}).items()})
            flat.update({f"final_{k}": v for k, v in (summary.get("eval") or {}).items()})
            self.summary(flat)
        self.close(exit_code=0 if summary.get("status") == "ok" else 1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.progress = None, False

    def close(self, exit_code: int | None = None) -> None:
        """Idempotent: the bar, the files and the W&B run."""
        self.close_bar()
        self.metrics_file.close()
        if self.samples_file is not None:
            self.samples_file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None
