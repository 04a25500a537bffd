"""Multi-view backbones: experiments pick an architecture by name and preset (`create_backbone`).

The registry lives in `backbones.registry` and the contract in `backbones.interface`; this file
only re-exports them and tells the registry how to find the built-in backbones: every module of
this package is imported on the first registry lookup, so a third backbone is one new file with a
`@register_backbone` class and nothing else changes. Nothing heavy is imported here: `import
backbones.registry` (which runs this file first) stays stdlib-only, and the torch-level names of
the interface resolve on first use.
"""
from __future__ import annotations

import importlib
import pkgutil

from backbones.registry import (
    BACKBONES,
    BackboneSpec,
    Registry,
    UnknownNameError,
    create_backbone,
    get_backbone_spec,
    list_backbones,
    list_presets,
    register_backbone,
)

# interface names -> resolved on first use, so reading the registry does not import torch
_LAZY = ("AttentionLayer", "BackboneOutput", "MultiViewBackbone", "TapRequest", "TapResult", "UnknownLayerError")

__all__ = sorted([
    *_LAZY, "BackboneSpec", "Registry", "UnknownNameError", "create_backbone", "get_backbone_spec",
    "list_backbones", "list_presets", "register_backbone",
])


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.interface"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def _import_builtin_backbones() -> None:
    """Import every module of this package; the ones holding a backbone register it."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


BACKBONES.set_loader(_import_builtin_backbones)
