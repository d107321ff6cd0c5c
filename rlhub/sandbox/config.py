"""The `sandbox.*` configuration: how strictly the code-reward sandbox (`rlhub.sandbox`) must isolate."""

from __future__ import annotations

from dataclasses import dataclass

ISOLATION_MODES = ("required", "best_effort")


@dataclass
class SandboxConfig:
    """The run's policy for environments that score code in `rlhub.sandbox` (`sandbox.*`)."""

    isolation: str = "required"
    """required: every kernel layer (netns, tmpfs, nocaps, landlock, seccomp) must apply, checked when the
    run starts (an error naming the missing ones) and again in every call (code is not run without them);
    best_effort: run with what the kernel offers, warning about each missing layer (an audit hook then
    stands in for them, which native code can bypass)."""

    def check(self) -> None:
        """ValueError naming the key whose value is not allowed."""
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"sandbox.isolation={self.isolation!r}: use one of {list(ISOLATION_MODES)}")
