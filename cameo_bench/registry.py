"""The engine's registries share the backbones' helper: re-exports `Registry` and `UnknownNameError`.

Correspondence sources and dataset converters register through the same stdlib-only class as the
backbones, so every registry of the project raises the same error type on an unknown name (a
`KeyError` and a `ValueError`, naming the valid names and the close matches) and refuses a second
registration of a name. `backbones.registry` imports neither torch nor any model, so importing this
module does not load the backbones (tests/test_import_graph.py checks it).
"""
from __future__ import annotations

from backbones.registry import Registry, UnknownNameError

__all__ = ["Registry", "UnknownNameError"]
