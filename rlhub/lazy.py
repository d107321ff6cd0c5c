"""A module imported on first use of one of its attributes.

The algorithm modules register their functions by name when they are imported,
and reading a config checks those names; `torch` there is this lazy stand-in,
so that the check (and `rlhub train` up to starting Ray) does not wait for
torch's import, about 2 s on a small CPU machine. The first tensor operation
imports it.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule(ModuleType):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self.__name__)
        return getattr(self._module, attr)


torch = LazyModule("torch")
