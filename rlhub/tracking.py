"""Run tracking: Weights & Biases (offline by default), a metrics.jsonl, and the progress bar."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any


class Tracker:
    def __init__(self, run_dir: Path, cfg: Any, total_steps: int, start_step: int, resume_id: str | None = None) -> None:
        self.run_dir = run_dir
        self.metrics_file = (run_dir / "metrics.jsonl").open("a")
        self.wandb_run = None
        self.run_id: str | None = None
        if cfg.wandb.mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                mode=cfg.wandb.mode,
                dir=str(run_dir),
                name=f"{cfg.experiment.name}-{run_dir.name}",
                config=asdict(cfg),
                tags=list(cfg.wandb.tags),
                id=resume_id,
                resume="allow" if resume_id else None,
                settings=wandb.Settings(console="off", silent=True),
            )
            self.run_id = self.wandb_run.id
            self.wandb_run.save(str(run_dir / "config.yaml"), base_path=str(run_dir), policy="now")
        self.bar = None
        if cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self.metrics_file.write(json.dumps({"step": step, **clean}) + "\n")
        self.metrics_file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(clean, step=step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(
                reward=f"{metrics.get('rollout/reward_mean', 0):.2f}",
                success=f"{metrics.get('rollout/success_rate', 0):.2f}",
                stale=f"{metrics.get('staleness/mean', 0):.1f}",
                refresh=False,
            )

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            for k, v in values.items():
                self.wandb_run.summary[k] = v

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.metrics_file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
