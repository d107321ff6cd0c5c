"""The `rlhub` command: train, check, plot, bench, config.

Overrides are Hydra's (`key=value`, `group=option`). Heavy imports happen after
the arguments are read, so `rlhub --help` answers at once.
"""

from __future__ import annotations

import json
import sys

USAGE = """usage: rlhub <command> [hydra overrides...]

commands:
  train          run asynchronous RL training (default config: conf/config.yaml); exits 0 only
                 when the run ended with every group accounted for and finite metrics
  check RUN_DIR  reconcile a run's ledger (every group handed out trained or dropped exactly
                 once); exit 1 when it does not reconcile
  plot RUN_DIR   draw RUN_DIR/plots/*.png (success and reward, staleness, step time)
  bench e2e      measure sync vs async throughput and pipeline efficiency (JSON)
  bench presets  a short run of every algorithm preset, and GRPO at max_staleness=4
                 without and with TIS: reward before/after, correction metrics (JSON)
  config         print the resolved configuration

examples:
  rlhub train
  rlhub train max_staleness=2 rollout.num_actors=2 algorithm.lr=1e-3
  rlhub train rollout.engine=vllm cluster.address=auto
  rlhub train resume=true
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    import os

    from rlhub.config import WORKER_ENV, ConfigError

    for key, value in WORKER_ENV.items():  # quiet, offline defaults for this process and what it starts
        os.environ.setdefault(key, value)

    try:
        if command == "train":
            return _train(rest)
        if command == "config":
            return _print_config(rest)
        if command in ("check", "plot") and len(rest) == 1:
            return _check(rest[0]) if command == "check" else _plot(rest[0])
        if command == "bench" and rest[:1] == ["e2e"]:
            from rlhub.bench import bench_e2e

            print(json.dumps(bench_e2e(rest[1:]), indent=1))
            return 0
        if command == "bench" and rest[:1] == ["presets"]:
            from rlhub.bench import bench_presets

            print(json.dumps(bench_presets(rest[1:]), indent=1))
            return 0
    except ConfigError as e:
        print(f"rlhub: config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"rlhub: {e}", file=sys.stderr)
        return 2
    print(f"rlhub: unknown command {' '.join(args[:2])!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def _train(overrides: list[str]) -> int:
    from rlhub.config import load_config

    cfg = load_config(overrides)
    from rlhub.actors.controller import train
    from rlhub.actors.pipeline import RunFailed

    try:
        summary = train(cfg)
    except RunFailed as e:
        print(f"rlhub: run failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in summary.items() if k != "rollout"}, indent=1))
    if summary["status"] != "ok":
        print(f"rlhub: the run ended with status {summary['status']} (see summary.json)", file=sys.stderr)
        return 1
    return 0


def _check(run_dir: str) -> int:
    from pathlib import Path

    from rlhub.ledger import check_run, format_report

    summary = Path(run_dir) / "summary.json"
    failed = summary.is_file() and json.loads(summary.read_text()).get("status") == "failed"
    result = check_run(Path(run_dir), allow_open=failed)  # a failed run may leave groups open; none may end twice
    print(format_report(result))
    return 0 if result.ok else 1


def _plot(run_dir: str) -> int:
    from pathlib import Path

    from rlhub.plots import plot_run

    paths = plot_run(Path(run_dir))
    print("\n".join(str(p) for p in paths) or f"rlhub: {run_dir}/metrics.jsonl holds no steps to plot")
    return 0


def _print_config(overrides: list[str]) -> int:
    from omegaconf import OmegaConf

    from rlhub.config import load_config

    print(OmegaConf.to_yaml(OmegaConf.structured(load_config(overrides))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
