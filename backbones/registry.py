"""Name -> object registries: the generic `Registry` and, built on it, the backbone registry.

One helper serves every registry of the project (backbones here; correspondence sources and dataset
converters through `cameo_bench.registry`), so they all fail the same way: a second registration of
a name raises (two modules would otherwise fight silently over which one an experiment gets), and
an unknown name raises `UnknownNameError` naming the valid names and the close matches.

This module is stdlib-only at import time: reading the registry must not pull in torch, diffusers
or timm. The built-in backbones register themselves when `backbones/__init__.py`'s loader imports
their modules, on the first lookup (see `Registry.set_loader`); presets are plain keyword dicts
kept next to each class (timm style), so the tiny test presets can never drift from the constructor.
"""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "Registry",
    "UnknownNameError",
    "create_backbone",
    "get_backbone_spec",
    "list_backbones",
    "list_presets",
    "register_backbone",
]

T = TypeVar("T")


def close_matches(name: str, valid: list[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(str(name), [str(v) for v in valid], n=n)


def did_you_mean(name: str, valid: list[str]) -> str:
    """`" (did you mean 'a' or 'b'?)"`, or "" when nothing is close."""
    close = close_matches(name, valid)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


class UnknownNameError(KeyError, ValueError):
    """An unknown name in a registry, reported with the valid names and the close matches.

    Both a `KeyError` (a failed lookup) and a `ValueError` (a bad config value), so callers that
    caught either before the registries were unified still catch it.
    """

    def __init__(self, kind: str, name: str, valid: list[str]):
        noun = kind.split()[-1] + "s"  # "correspondence source" -> "valid sources"
        super().__init__(f"unknown {kind} {name!r}{did_you_mean(name, valid)}; valid {noun}: {list(valid)}")
        self.kind, self.name, self.valid = kind, name, list(valid)
        self.close = close_matches(name, self.valid)

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.args[0]

    def __reduce__(self):  # rebuilt from its parts, so it survives a process pool (sweep workers)
        return type(self), (self.kind, self.name, self.valid)


class Registry(Generic[T]):
    """Names -> objects of one kind ("backbone", "converter", ...), registered once each.

    `set_loader(fn)` lets a package register its built-in entries lazily: `fn` (which imports the
    modules that register) runs once, before the first lookup or registration, so importing the
    registry stays cheap and a user's duplicate of a built-in name still fails when it is registered.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._origins: dict[str, str] = {}
        self._loader: Callable[[], None] | None = None
        self._loading = False

    def set_loader(self, loader: Callable[[], None]) -> None:
        self._loader = loader

    def _ensure_loaded(self) -> None:
        if self._loader is None or self._loading:
            return  # no loader, or a module the loader is importing is registering right now
        loader, self._loading = self._loader, True
        try:
            loader()
            self._loader = None  # only once it succeeded: a failed import fails again, not "unknown name"
        finally:
            self._loading = False

    def register(self, name: str, value: T, *, origin: str | None = None) -> T:
        """Add `value` under `name`; raises ValueError if the name is taken. Returns `value`."""
        self._ensure_loaded()
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")
        if name in self._entries:
            raise ValueError(
                f"{self.kind} {name!r} is already registered by {self._origins[name]}; pick another name"
            )
        self._entries[name] = value
        self._origins[name] = origin or _origin(value)
        return value

    def decorator(self, name: str) -> Callable[[T], T]:
        """`@registry.decorator("name")` registers the decorated object and returns it unchanged."""
        return lambda value: self.register(name, value)

    def get(self, name: str) -> T:
        self._ensure_loaded()
        if name not in self._entries:
            raise UnknownNameError(self.kind, name, self.list())
        return self._entries[name]

    def list(self) -> list[str]:
        """Registered names, sorted."""
        self._ensure_loaded()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        self._ensure_loaded()
        return len(self._entries)

    def copy(self) -> "Registry[T]":
        """An independent registry with the same entries (tests register throwaway names in it)."""
        self._ensure_loaded()
        other: Registry[T] = Registry(self.kind)
        other._entries, other._origins = dict(self._entries), dict(self._origins)
        return other

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"


def _origin(value: Any) -> str:
    """Where a registered object was defined, for the duplicate-name message."""
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    return f"{module}.{qualname}" if module and qualname else repr(value)


# ---- the backbone registry ---------------------------------------------------------------------------
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

    def preset(self, preset: str) -> dict[str, Any]:
        """The constructor keywords of `preset` (a copy), or UnknownNameError listing the presets."""
        if preset not in self.presets:
            raise UnknownNameError(f"{self.name} preset", preset, list(self.presets))
        return dict(self.presets[preset])


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def _check_keys(where: str, keys, fields: list[str] | None) -> None:
    if fields is None:
        return
    for key in keys:
        if key not in fields:
            hint = did_you_mean(key, fields)
            raise TypeError(f"{where}: unknown config field {key!r}{hint}; valid fields: {sorted(fields)}")


def register_backbone(name: str, presets: dict[str, dict[str, Any]], default_preset: str = "tiny"):
    """Class decorator adding a backbone under `name`; a name can be registered only once.

    Preset keys are checked against the constructor now, so a typo fails at import, not when
    someone first asks for that preset.
    """
    if default_preset not in presets:
        raise ValueError(f"backbone {name!r}: default preset {default_preset!r} not in {sorted(presets)}")

    def decorator(cls: type) -> type:
        # Imported here, not at the top: the class being registered has already imported torch,
        # while merely reading the registry must not.
        from backbones.interface import MultiViewBackbone

        if not (isinstance(cls, type) and issubclass(cls, MultiViewBackbone)):
            raise TypeError(f"backbone {name!r}: {getattr(cls, '__name__', cls)} must subclass MultiViewBackbone")
        spec = BackboneSpec(name, cls, {k: dict(v) for k, v in presets.items()}, default_preset, cls.__module__)
        fields = spec.config_fields()
        for preset_name, kwargs in spec.presets.items():
            _check_keys(f"backbone {name!r} preset {preset_name!r}", kwargs, fields)
        BACKBONES.register(name, spec, origin=f"{cls.__module__}.{cls.__qualname__}")
        return cls

    return decorator


def list_backbones() -> list[str]:
    return BACKBONES.list()


def get_backbone_spec(name: str) -> BackboneSpec:
    return BACKBONES.get(name)


def list_presets(name: str) -> list[str]:
    """Preset names of backbone `name`, smallest first (the order they are declared in)."""
    return list(get_backbone_spec(name).presets)


def create_backbone(name: str, preset: str | None = None, *, init_from: str | None = None, **overrides: Any):
    """Build backbone `name` from a preset ("tiny" unless the backbone says otherwise), with
    constructor keywords in `overrides` taking precedence over the preset's.

    With `init_from` (a local path; "" or None = random init) the model is built from that
    checkpoint and starts as the source model per view: the architecture comes from the source
    (its config.json, or a DiT checkpoint's tensor shapes), a preset, if given, contributes only
    its multi-view fields (`cls.init_overridable`, e.g. mv_unet's `cross_view_levels`), and
    overrides may set those or repeat a source value (see `MultiViewBackbone.from_source`).
    """
    spec = get_backbone_spec(name)
    if init_from:
        _check_keys(f"create_backbone({name!r}, init_from=...)", overrides, spec.config_fields())
        defaults = spec.preset(preset) if preset is not None else {}
        where = f"preset {preset!r}" if preset is not None else ""
        return spec.cls.from_source(str(init_from), defaults=defaults, defaults_from=where, **overrides)
    preset = spec.default_preset if preset is None else preset
    kwargs = spec.preset(preset)
    _check_keys(f"create_backbone({name!r}, {preset!r})", overrides, spec.config_fields())
    return spec.cls(**{**kwargs, **overrides})
