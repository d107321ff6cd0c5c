"""`rlhub bench budget tokens=N side:key=value ... [key=value ...]`: training runs compared at one generation budget.

Each side is a training run (`rlhub.actors.controller.train`) that stops once its rollout actors have
generated `tokens` tokens (`experiment.max_generated_tokens`; SPO's branched rollouts count, so an
algorithm that spends generation on value estimates gets fewer steps). An argument `name:key=value`
is an override of side `name` only (sides are named by their first such argument, in order), a plain
`key=value` one of every side. Reported per side: the held-out accuracy of the final policy
(`eval/pass@1` and, when sampled, `eval/reward_mean` and pass@k), the steps it took, the tokens it
generated, the wall time from the config to the return, and the training success of the last tenth;
and for every side after the first, its ratios to the first (accuracy and wall time).

A run of the benchmark is one seed for every side: `seed` is the base seed plus the run's index, and
the sides run in the reverse order in odd runs. `rlhub bench budget` takes three runs by default
(`rlhub.benches.repeat`), so every figure is the median over three seeds with its range.

    rlhub bench budget tokens=150000 grpo:algorithm=grpo spo:algorithm=spo spo:algorithm.spo.interval=1
"""

from __future__ import annotations

from typing import Any

DEFAULTS = ["wandb.mode=disabled", "progress=false", "experiment.total_steps=100000"]


def parse(args: list[str]) -> tuple[int, dict[str, list[str]], list[str]]:
    """(tokens, each side's own overrides in order, the overrides every side takes); ValueError naming a bad argument."""
    tokens, sides, common = 0, {}, []
    for a in args:
        key, eq, value = a.partition("=")
        if not eq:
            raise ValueError(f"{a!r}: arguments are tokens=N, side:key=value or key=value")
        if key == "tokens":
            try:
                tokens = int(value)
            except ValueError:
                raise ValueError(f"tokens={value!r} is not an integer") from None
            continue
        side, colon, override = a.partition(":")
        if colon and "=" not in side:
            sides.setdefault(side, []).append(override)
        else:
            common.append(a)
    if tokens <= 0:
        raise ValueError("tokens=N (the generation budget of every side, > 0) is required")
    if len(sides) < 2:
        raise ValueError(f"at least two sides (name:key=value) to compare; got {sorted(sides) or 'none'}")
    if any(o.startswith(("seed=", "experiment.max_generated_tokens=")) for o in common + sum(sides.values(), [])):
        raise ValueError("seed and experiment.max_generated_tokens are the benchmark's (the run index and tokens=N)")
    return tokens, sides, common


def check_args(args: list[str]) -> None:
    """ValueError naming a bad argument, and the config error of a side's overrides, before any run starts."""
    from rlhub.config import load_config

    _, sides, common = parse(args)
    for own in sides.values():
        load_config([*DEFAULTS, *common, *own])


def run_side(overrides: list[str]) -> dict[str, Any]:
    """One training run with these overrides: its figures (module docstring)."""
    from rlhub.benches.train import timed_run

    _, summary, rows, wall = timed_run([*DEFAULTS, *overrides], "budget")
    final = summary.get("eval") or {}
    tenth = max(1, len(rows) // 10)
    return {
        "held_out": {k.removeprefix("eval/"): v for k, v in final.items() if k.startswith(("eval/pass@", "eval/reward_"))},
        "steps": len(rows),
        "generated_tokens": sum(s.get("generated_tokens", 0) for s in summary.get("rollout") or []),
        "trained_tokens": sum(r.get("train/tokens", 0.0) for r in rows),
        "wall_s": wall,
        "success_last_tenth": sum(r.get("rollout/success_rate", 0.0) for r in rows[-tenth:]) / tenth,
    }


def run(args: list[str], run_index: int = 0, side_runner=run_side) -> dict[str, Any]:
    tokens, sides, common = parse(args)
    from rlhub.config import load_config

    seed = load_config(common).seed + run_index  # each run of the benchmark is another seed, the same for every side
    order = list(sides) if run_index % 2 == 0 else list(reversed(sides))
    results = {}
    for name in order:
        results[name] = side_runner([*common, *sides[name], f"seed={seed}", f"experiment.max_generated_tokens={tokens}"])
    names = list(sides)
    first = results[names[0]]
    ratios = {}
    for name in names[1:]:
        side = results[name]
        acc, base = side["held_out"].get("pass@1"), first["held_out"].get("pass@1")
        ratios[f"{name}_vs_{names[0]}"] = {
            "pass@1_minus": None if acc is None or base is None else acc - base,
            "wall_s": side["wall_s"] / max(first["wall_s"], 1e-9),
            "steps": side["steps"] / max(first["steps"], 1),
        }
    return {"tokens": tokens, "seed": seed, "order": order, "sides": {n: results[n] for n in names}, "vs_first": ratios,
            "overrides": {"common": common, **sides}}
