"""Registry of multi-view backbones: experiments pick an architecture by name and preset.

A backbone is one module in this package whose class is decorated with `@register_backbone`.
Every sibling module is imported at the bottom of this file, so a third backbone is one new file
and nothing else changes. Presets are plain keyword dicts kept next to the class (timm style), so
the tiny test presets live beside the paper-scale ones and can never drift from the constructor.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from typing import Any

from backbones.interface import (
    AttentionLayer,
    BackboneOutput,
    MultiViewBackbone,
    TapRequest,
    TapResult,
    UnknownLayerError,
)

__all__ = [
    "AttentionLayer",
    "BackboneOutput",
    "BackboneSpec",
    "MultiViewBackbone",
    "TapRequest",
    "TapResult",
    "UnknownLayerError",
    "UnknownNameError",
    "create_backbone",
    "get_backbone_spec",
    "list_backbones",
    "list_presets",
    "register_backbone",
]


class UnknownNameError(KeyError):
    """An unknown backbone or preset name, reported with the valid ones and close matches."""

    def __init__(self, kind: str, name: str, valid: list[str]):
        close = difflib.get_close_matches(name, valid, n=3)
        hint = f" Did you mean {close}?" if close else ""
        super().__init__(f"unknown {kind} {name!r}.{hint} Valid: {valid}")
        self.name, self.valid = name, valid

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.args[0]


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    cls: type
    presets: dict[str, dict[str, Any]]
    default_preset: str
    module: str

    def config_fields(self) -> list[str] | None:
        """Constructor keywords, or None when the constructor takes **kwargs (then unchecked)."""
        params = list(inspect.signature(self.cls.__init__).parameters.values())[1:]
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return None
        return [p.name for p in params]


_REGISTRY: dict[str, BackboneSpec] = {}


def _check_keys(where: str, keys, fields: list[str] | None) -> None:
    if fields is None:
        return
    for key in keys:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise TypeError(f"{where}: unknown config field {key!r}.{hint} Valid: {sorted(fields)}")


def register_backbone(name: str, presets: dict[str, dict[str, Any]], default_preset: str = "tiny"):
    """Class decorator adding a backbone under `name`; a name can be registered only once.

    Preset keys are checked against the constructor now, so a typo fails at import, not when
    someone first asks for that preset.
    """
    if default_preset not in presets:
        raise ValueError(f"backbone {name!r}: default preset {default_preset!r} not in {sorted(presets)}")

    def decorator(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(
                f"backbone {name!r} is already registered by {_REGISTRY[name].module}."
                f"{_REGISTRY[name].cls.__name__}; pick another name"
            )
        if not issubclass(cls, MultiViewBackbone):
            raise TypeError(f"backbone {name!r}: {cls.__name__} must subclass MultiViewBackbone")
        spec = BackboneSpec(name, cls, {k: dict(v) for k, v in presets.items()}, default_preset, cls.__module__)
        fields = spec.config_fields()
        for preset_name, kwargs in spec.presets.items():
            _check_keys(f"backbone {name!r} preset {preset_name!r}", kwargs, fields)
        _REGISTRY[name] = spec
        return cls

    return decorator


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone_spec(name: str) -> BackboneSpec:
    if name not in _REGISTRY:
        raise UnknownNameError("backbone", name, list_backbones())
    return _REGISTRY[name]


def list_presets(name: str) -> list[str]:
    return list(get_backbone_spec(name).presets)


def create_backbone(name: str, preset: str | None = None, **overrides: Any) -> MultiViewBackbone:
    """Build backbone `name` from a preset ("tiny" unless the backbone says otherwise), with
    constructor keywords in `overrides` taking precedence over the preset's."""
    spec = get_backbone_spec(name)
    preset = spec.default_preset if preset is None else preset
    if preset not in spec.presets:
        raise UnknownNameError(f"preset of backbone {name!r}", preset, list(spec.presets))
    _check_keys(f"create_backbone({name!r}, {preset!r})", overrides, spec.config_fields())
    return spec.cls(**{**spec.presets[preset], **overrides})


# Self-registration: importing every sibling module is what makes "one new file" enough.
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
