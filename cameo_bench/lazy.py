"""Lazy package exports: a package names its public objects without importing the modules that hold them.

Why: `cameo_bench.config` must be importable by the engine without loading gin, `cameo_bench.tracking`
without loading mlflow, `cameo_bench.sweep` without loading torch; yet `config.parse(...)`,
`tracking.MlflowTracker` and `sweep.plan(...)` read naturally. A package calls `exports(__name__, {...})`
and assigns the result to its module-level `__getattr__` (PEP 562). A leaf: imports nothing of the project.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


def exports(package: str, modules: dict[str, tuple[str, ...]]) -> Callable[[str], Any]:
    """`__getattr__` for `package`: `modules` maps a submodule to the names it provides; a name's
    submodule is imported the first time the name is read."""
    if any(isinstance(names, str) for names in modules.values()):  # ('a') is a string, not a tuple
        raise TypeError(f"{package}: exports must map a submodule to a tuple of names, got {modules}")
    home = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in home:
            return getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
