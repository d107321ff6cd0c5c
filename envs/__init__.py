"""Environments: the `Env` protocol, and a registry fed by entry points.

A third-party package exposes an environment by declaring, in its own
pyproject, an entry point in the group `rlhub.envs` that names a factory
`load_environment(**kwargs) -> Env`; `env.name=<entry point name>` selects it
and `env.kwargs` are passed to the factory. Built-in environments register
the same way, through rlhub's own pyproject.
"""

from rlhub.envs.base import Env, ModelMessage, StepResult, ended_turn
from rlhub.envs.registry import available_envs, env_defaults, make_env

__all__ = ["Env", "ModelMessage", "StepResult", "available_envs", "ended_turn", "env_defaults", "make_env"]
