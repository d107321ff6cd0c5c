"""Environments checked before a run: what `rlhub train` checks before Ray starts (`check_run_dir`,
`check_env`, `check_prompt_lengths`), and `rlhub envs check NAME [key=value ...]`, an environment tried as a run
would use it, without Ray or a model.

What `rlhub envs check` does, each finding with the row it came from:

1. **Data**: builds the environment from the run config (`env=NAME` and the overrides), which loads
   `env.dataset` and checks its columns and splits (`rlhub.data`); reports the train and eval rows.
2. **Prompts**: renders the prompts of rows spread over the train split with the model's chat template
   and counts their tokens against `rollout.max_model_len - rollout.max_new_tokens`
   (`rlhub.prompt_lengths`), naming the rows that do not fit; shows the first prompts as rendered.
3. **Episodes**: on the first `rows=` rows (default 4) runs `reset` and then `step` with scripted
   replies, turn after turn up to `rollout.max_turns`: the environment's own format example
   (`format_examples`, when it has one), an empty reply, a plain sentence, and the format example
   cut off by the token budget (`finish_reason="length"`). Each call runs under `env.timeout_s`, as
   in a run. Reports each episode's reward, success, turns and time, and every error: an exception,
   a timeout, a reward that is not a finite number.

The exit status is 0 when nothing was found, 1 when something was (each listed), 2 for a config error.
"""

from __future__ import annotations

import copy
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhub.config import ConfigError, RunConfig

log = logging.getLogger("rlhub")

DEFAULT_ROWS = 4
SHOWN_PROMPTS = 2


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def say(self, text: str) -> None:
        self.lines.append(text)

    def problem(self, text: str) -> None:
        self.problems.append(text)
        self.lines.append(f"PROBLEM: {text}")

    def text(self) -> str:
        tail = f"{len(self.problems)} problem(s) found" if self.problems else "no problems found"
        return "\n".join([*self.lines, "", tail])


# ---- the checks `rlhub train` runs before Ray starts ---------------------------------------------------

def check_env(cfg: RunConfig) -> Any:
    """The environment, after checking it and its data."""
    from rlhub.envs.registry import build_env
    from rlhub.evaluation import eval_rows

    try:
        env = build_env(cfg.env, cfg.seed)
        rows = env.dataset("train")
    except (ValueError, TypeError, KeyError) as e:  # DataError is a ValueError; a KeyError's message without its quotes
        raise ConfigError(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)) from None
    if not rows:
        raise ConfigError(f"env.name={cfg.env.name!r}: the train split is empty")
    if cfg.eval.every and not eval_rows(env, 1):
        raise ConfigError(f"eval.every={cfg.eval.every}: env.name={cfg.env.name!r} has no eval rows (its test split is empty; "
                          "set env.dataset.eval_split or env.dataset.eval_size)")
    if cfg.warm_start.steps and not has_format_examples(env):
        log.warning("warm_start.steps=%d skipped: env.name=%r has no format_examples() (warm_start.steps=0 says so, and this "
                    "notice goes)", cfg.warm_start.steps, cfg.env.name)
    if getattr(env, "uses_sandbox", False):
        check_sandbox(cfg, env)
    check_policies(cfg, env)
    return env


def check_run_dir(cfg: RunConfig) -> None:
    """ConfigError unless the run directory (`run_dir`, or runs/<experiment.name>/ that holds the new
    ones) can be made and written: a path under /proc or /sys, a read-only place, a file in the way."""
    import tempfile

    target = Path(cfg.run_dir).expanduser() if cfg.run_dir else Path("runs") / cfg.experiment.name
    key = f"run_dir={cfg.run_dir!r}" if cfg.run_dir else f"{target} (where run directories go; set run_dir)"
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{key}: {target} is a file, not a directory")
    try:
        target.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=target, prefix=".rlhub-write-check-").close()  # made and removed
    except OSError as e:
        raise ConfigError(f"{key}: cannot make or write a directory there ({e.strerror or type(e).__name__}: {e.filename})") from None


def agent_policies(cfg: RunConfig, env: Any) -> dict[str, str]:
    """{agent: its policy} under agents.policies=separate; {} where one policy acts for every agent."""
    from rlhub.envs.base import is_multi_agent

    return cfg.agents.policy_of(tuple(env.agents) if is_multi_agent(env) else ())


def check_policies(cfg: RunConfig, env: Any) -> None:
    """agents.policies=separate needs several agents, and trains what each policy's learner trains
    alone: no critic or reference actor (they score one policy's tokens)."""
    from rlhub.algorithms import advantage_needs
    from rlhub.envs.base import is_multi_agent

    if cfg.agents.policies != "separate":
        return
    if not is_multi_agent(env):
        raise ConfigError(f"agents.policies=separate: env.name={cfg.env.name!r} has one agent (a multi-agent environment names its "
                          "agents; see docs/environments.md)")
    algo = cfg.algorithm
    if advantage_needs(algo.advantage).critic:
        raise ConfigError(f"agents.policies=separate with algorithm.advantage={algo.advantage}: the critic values one policy's "
                          "tokens; use an estimator without a critic (grpo, rloo, reinforce_pp, ...)")
    if algo.reference == "actor" and algo.kl_coef > 0:
        raise ConfigError("agents.policies=separate with algorithm.reference=actor: the reference actor scores one policy; "
                          "use algorithm.reference=learner or algorithm.kl_coef=0")


def check_prompt_lengths(cfg: RunConfig, env: Any, model_path: Path) -> None:
    """Stop before Ray starts when (nearly) no prompt fits the model length; say on the terminal what
    share of groups will be dropped as too long otherwise (`rlhub.prompt_lengths`). The prompts are
    rendered with the model's full tokenizer (its chat template), as the rollout renders them."""
    from transformers import AutoTokenizer

    from rlhub import prompt_lengths as pl

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))

    r = cfg.rollout
    found = pl.measure(env, env.dataset("train"), tokenizer, r.max_model_len, r.max_new_tokens, cfg.env.timeout_s)
    error, warning = pl.verdict(found, r.max_new_tokens, r.max_model_len, pl.model_positions(model_path))
    if error:
        raise ConfigError(f"env.name={cfg.env.name!r}: {error}")
    if warning:
        print(f"rlhub: env.name={cfg.env.name!r}: {warning}", file=sys.stderr, flush=True)


def has_format_examples(env: Any) -> bool:
    """Whether the environment gives the format warm start its examples."""
    return callable(getattr(env, "format_examples", None))


def check_sandbox(cfg: RunConfig, env: Any) -> None:
    """For an environment that scores code in `rlhub.sandbox`: the isolation `sandbox.isolation` asks for
    applies here (required: an error naming each missing layer; best_effort: a warning), and every row's
    tests can be judged outside the candidate's process (an error naming the row)."""
    from rlhub import sandbox
    from rlhub.evaluation import eval_rows

    try:
        sandbox.adopt(cfg.sandbox)
        if callable(getattr(env, "check_rows", None)):
            where = cfg.env.dataset.path or f"env.name={cfg.env.name}"
            env.check_rows(env.dataset("train"), f"{where} train split")
            env.check_rows(eval_rows(env, 0), f"{where} eval split")
    except (sandbox.IsolationUnavailable, ValueError) as e:
        raise ConfigError(str(e)) from None


# ---- `rlhub envs check` ------------------------------------------------------------------------------

def scripted_replies(env: Any, seed: int = 0) -> list[tuple[str, str, str]]:
    """(label, text, finish_reason) of the replies every checked row gets."""
    replies: list[tuple[str, str, str]] = []
    example = ""
    if callable(getattr(env, "format_examples", None)):
        pairs = env.format_examples(1, random.Random(seed))
        example = str(pairs[0][1]) if pairs else ""
        replies.append(("format example", example, "stop"))
    replies += [("empty", "", "stop"), ("plain text", "I am not sure.", "stop")]
    cut = example[: max(1, len(example) // 2)] if example else "I am not"
    replies.append(("cut off", cut, "length"))
    return replies


def run(name: str, overrides: list[str], rows: int = DEFAULT_ROWS) -> Report:
    """The check's report (module docstring); ConfigError for a config that does not load."""
    from transformers import AutoTokenizer

    from rlhub import prompt_lengths as pl
    from rlhub.config import load_config
    from rlhub.evaluation import eval_rows
    from rlhub.episodes import ChatFormat
    from rlhub.models.build import resolve_model_path

    cfg = load_config([f"env={name}", *overrides])
    report = Report()
    try:
        env = check_env(cfg)
    except ConfigError as e:  # data: a missing file, column or split, an empty split
        report.problem(f"data: {e}")
        return report
    train = env.dataset("train")
    report.say(f"environment {cfg.env.name}: {len(train)} train rows, {len(eval_rows(env, 0))} eval rows")
    model_path = resolve_model_path(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    r = cfg.rollout

    found = pl.measure(env, train, tokenizer, r.max_model_len, r.max_new_tokens, cfg.env.timeout_s)
    report.say(f"prompts: {found.summary()}; room: {found.room} tokens (rollout.max_model_len={r.max_model_len} - "
               f"rollout.max_new_tokens={r.max_new_tokens})")
    for index, error in sorted(found.failed.items()):
        report.problem(f"row {index}: reset or rendering failed: {error}")
    too_long = sorted((i, n) for i, n in found.lengths.items() if n > found.room)
    if too_long:
        listed = ", ".join(f"row {i} ({n} tokens)" for i, n in too_long[:5]) + (" ..." if len(too_long) > 5 else "")
        report.problem(f"prompts longer than the room for a turn: {listed}")
    error, warning = pl.verdict(found, r.max_new_tokens, r.max_model_len, pl.model_positions(model_path))
    for text in (error, warning):
        if text:
            report.say(f"  {text}")
    chat = ChatFormat(tokenizer)
    for index in sorted(found.lengths)[:SHOWN_PROMPTS]:
        value = _reset(env, train[index], index, cfg.env.timeout_s)[0]
        if value is not None:
            agents = getattr(env, "agents", None) if isinstance(value[0], dict) else None
            for name, opening in zip(agents or [None], pl.openings(env, value[0])):
                shown = tokenizer.decode(chat.prompt(opening)[0])
                whose = f", agent {name}" if name else ""
                report.say(f"row {index} as rendered{whose} ({len(chat.prompt(opening)[0])} tokens):\n{_indent(shown[:800])}")

    replies = scripted_replies(env, cfg.seed)
    report.say(f"episodes: rows 0-{min(rows, len(train)) - 1}, replies: {', '.join(label for label, _, _ in replies)}; "
               f"up to rollout.max_turns={r.max_turns} turns, env.timeout_s={cfg.env.timeout_s:g}")
    for index in range(min(rows, len(train))):
        for label, text, finish in replies:
            report.say(_episode(env, train[index], index, label, text, finish, r.max_turns, cfg.env.timeout_s, chat.tool_format, report))
    return report


def _reset(env: Any, row: Any, index: int, timeout_s: float) -> tuple[Any, BaseException | None]:
    from rlhub.envs.registry import reset_at
    from rlhub.episodes import EnvRunner, run_all

    runner = EnvRunner(timeout_s)
    try:
        return run_all(runner, [runner.submit(reset_at(env.reset, index), row, lane="reset")])[0]
    finally:
        runner.close()


def _episode(env: Any, row: Any, index: int, label: str, text: str, finish: str, max_turns: int, timeout_s: float,
             tool_format: str, report: Report) -> str:
    """One scripted episode: its summary line; its errors go to `report` with the row."""
    from rlhub.envs.base import ModelMessage
    from rlhub.episodes import BadReward, EnvRunner, checked_reward, run_all

    start = time.perf_counter()
    value, error = _reset(env, row, index, timeout_s)
    if error is not None:
        report.problem(f"row {index}: reset raised {type(error).__name__}: {error}")
        return f"  row {index}, {label}: reset failed"
    state = copy.deepcopy(value[1])
    from rlhub.envs.base import is_multi_agent

    agents = tuple(env.agents) if is_multi_agent(env) else ()
    agent = "" if not agents else env.first_agent(state) if callable(getattr(env, "first_agent", None)) else agents[0]
    runner = EnvRunner(timeout_s)
    try:
        for turn in range(1, max_turns * max(1, len(agents)) + 1):  # every agent's turns, for a multi-agent environment
            result, error = run_all(runner, [runner.submit(env.step, state, ModelMessage(text, finish, (), tool_format, agent))])[0]
            if error is None and agents and not result.done and result.next_agent not in agents:
                error = ValueError(f"step() must name next_agent (one of {list(agents)}) while not done, got {result.next_agent!r}")
            if error is None:
                try:
                    reward = checked_reward(result)
                    if reward != reward:  # NaN
                        raise BadReward(f"step() returned a reward that is not finite: {result.reward!r}")
                except BadReward as e:
                    error = e
            if error is not None:
                report.problem(f"row {index}, reply {label!r}, turn {turn}: step {type(error).__name__}: {error}")
                return f"  row {index}, {label}: failed at turn {turn}"
            if result.done or (finish == "length" and not agents):
                break
            agent = result.next_agent if agents else agent
        seconds = time.perf_counter() - start
        ended = "done" if result.done else f"not done after {turn} turn(s)"
        return (f"  row {index}, {label}: reward {reward:g}, success {result.success}, {turn} turn(s), {ended}, "
                f"{seconds * 1e3:.0f} ms")
    finally:
        runner.close()


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())
