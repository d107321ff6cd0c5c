"""The `rlhub` command: `rlhub train [overrides]`, `rlhub bench e2e|presets [overrides]`.

Overrides are Hydra's (`key=value`, `group=option`). Heavy imports happen after
the arguments are read, so `rlhub --help` answers at once.
"""

from __future__ import annotations

import json
import sys

USAGE = """usage: rlhub <command> [hydra overrides...]

commands:
  train          run asynchronous RL training (default config: conf/config.yaml)
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

    from rlhub.actors.controller import WORKER_ENV
    from rlhub.config import ConfigError

    for key, value in WORKER_ENV.items():  # quiet, offline defaults for this process and what it starts
        os.environ.setdefault(key, value)

    try:
        if command == "train":
            return _train(rest)
        if command == "config":
            return _print_config(rest)
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

    summary = train(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "rollout"}, indent=1))
    return 0


def _print_config(overrides: list[str]) -> int:
    from omegaconf import OmegaConf

    from rlhub.config import load_config

    print(OmegaConf.to_yaml(OmegaConf.structured(load_config(overrides))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
