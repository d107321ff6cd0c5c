"""The algorithm's configuration: which estimator, loss and correction, and their knobs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpoConfig:
    """Segment Policy Optimization (algorithm.advantage=spo): where completions are cut into segments,
    and how each cut's value is estimated (`rlhub.rollout.branches`)."""

    segments: str = "cutpoints"
    """Where the cuts go: cutpoints (SPO-chain: before every `interval`-th generated token whose
    behaviour probability is below `rho`), tokens (every `tokens` generated tokens), or turns (at the
    start of each assistant turn after the first)."""
    rho: float = 0.9
    """A generated token sampled with probability below this is a cutpoint (the behaviour policy's,
    under the rollout's temperature and top-p); `algorithm.token_selection=cutpoints` trains on those alone."""
    interval: int = 5
    """segments=cutpoints: a cut before the 1st, (interval+1)-th, (2 interval+1)-th ... cutpoint."""
    tokens: int = 32
    """segments=tokens: a cut every this many generated tokens."""
    branches: int = 4
    """Monte Carlo rollouts from each cut: the cut's value is the mean of their returns."""
    max_cuts: int = 8
    """Most cuts per sample; more are thinned evenly (every k-th kept). 0: no limit."""


@dataclass
class AlgorithmConfig:
    """Policy optimisation (selected by `algorithm=<preset>`)."""

    name: str = "grpo"
    advantage: str = "grpo"
    """Advantage estimator, by registered name (computed on the data side)."""
    batch_normalize: bool = False
    """Normalise advantages over the whole batch in the learner (REINFORCE++; with gae, PPO's usual whitening)."""
    policy_loss: str = "ppo_clip"
    """Policy loss, by registered name (applied by the learner): ppo_clip, gspo, cispo."""
    loss_agg: str = "token_mean"
    """token_mean, seq_mean_token_mean, seq_mean_token_sum, or constant (Dr. GRPO)."""
    loss_constant: float = 0.0
    """The `constant` aggregation's per-sequence normaliser; 0 means rollout.max_new_tokens."""
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    """Upper clip of the ratio (DAPO's clip-higher); defaults to clip_eps."""
    dual_clip_c: float | None = None
    """Dual-clip bound (> 1) for negative advantages; None disables."""
    correction: str = "none"
    """Off-policy correction for stale samples: none, tis, icepop, decoupled."""
    tis_cap: float = 2.0
    """Truncation of the importance weight (tis)."""
    icepop_low: float = 0.5
    icepop_high: float = 2.0
    """Band of importance ratios that icepop keeps; tokens outside it are masked."""
    kl_coef: float = 0.0
    """Weight of KL(policy || reference); the reference is the policy at the start of RL (after any warm start)."""
    kl_estimator: str = "k3"
    """k1, k2 or k3."""
    kl_penalty: str = "loss"
    """loss: kl_coef * KL added to the learner's loss; reward: kl_coef * KL per token subtracted from the
    reward on the data side, before the advantages (needs reference=actor)."""
    reference: str = "learner"
    """Who computes the reference log-probs: learner (a frozen copy in the learner, at train time) or
    actor (a reference actor, on the data side when a group is complete; the log-probs travel with the group)."""
    entropy_coef: float = 0.0
    spo: SpoConfig = field(default_factory=SpoConfig)
    """Segment Policy Optimization's knobs, read when advantage=spo."""
    token_selection: str = "all"
    """Which generated tokens carry the policy loss: all; entropy_top_p (the step's highest-entropy
    token_selection_p fraction only); cutpoints (tokens the behaviour policy sampled with probability
    below spo.rho: SPO's probability mask). `rlhub.algorithms.selection`."""
    token_selection_p: float = 0.2
    """entropy_top_p's fraction of the step's generated tokens."""
    dynamic_sampling: bool = False
    """DAPO: drop (and count) groups whose rewards are all equal; admission refills the batch."""
    overlong_window: int = 0
    """DAPO's soft overlong penalty: the last N tokens of the budget are penalised linearly (0: off)."""
    overlong_penalty: float = 1.0
    """Penalty at the very end of the budget."""
    gamma: float = 1.0
    lam: float = 0.95
    """Discount of the token-level estimators (gae, reinforce_pp's reward-to-go) and GAE's lambda."""
    value_clip: float = 0.2
    """PPO value clipping: the new value stays within +-value_clip of the value at generation time (0: off)."""
    critic_lr: float = 1e-3
    critic_warmup: int = 0
    """The first N steps train only the critic; the policy's weights stay as they are (its version still advances)."""
    lr: float = 2e-3
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.99)
    adam_eps: float = 1e-8
    """AdamW's epsilon (policy and critic). Adam divides each gradient entry by its running magnitude,
    so entries that nearly cancel move by about lr whatever their size; a larger epsilon damps them."""
    grad_clip: float = 1.0
    micro_batch_size: int = 256
    """Most samples per forward/backward; gradients accumulate to one optimizer step per batch."""
    micro_batch_tokens: int = 4096
    """Most tokens per forward/backward, padding counted (0: no limit). The learner sorts a batch's
    samples by length and cuts each micro-batch to its longest sample, so short samples are not
    padded to the batch's longest (rlhub.types.micro_batches)."""
