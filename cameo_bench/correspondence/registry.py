"""The registry of correspondence sources: names -> functions turning a batch into token targets.

A source is a function `fn(batch, grid, stride, **options) -> CorrespondenceTargets | None`
registered under a name together with the batch keys it needs, so the engine can reject an
experiment whose data cannot feed its source before the first training step, with a message that
says which keys would be enough.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

from cameo_bench.correspondence.targets import CorrespondenceTargets
from cameo_bench.registry import Registry

SourceFn = Callable[..., "CorrespondenceTargets | None"]


@dataclass(frozen=True)
class Source:
    """One registered source.

    `requires` lists alternatives: the batch must hold every key of at least one of them.
    `soft_only` marks sources whose targets are spread over many tokens by construction (the
    epipolar band): an argmax one-hot of them would pick an arbitrary token on the line.
    """

    name: str
    fn: SourceFn
    requires: tuple[frozenset[str], ...]
    soft_only: bool = False

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.fn) or ""
        return doc.splitlines()[0] if doc else ""

    @property
    def options(self) -> tuple[str, ...]:
        """Keyword options the source accepts (everything after batch, grid, stride)."""
        params = list(inspect.signature(self.fn).parameters.values())[3:]
        return tuple(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))

    def missing_keys(self, keys: Iterable[str]) -> str | None:
        """None when some alternative is satisfied, else a message naming what would be."""
        keys = set(keys)
        if any(alt <= keys for alt in self.requires):
            return None
        wanted = " or ".join("{" + ", ".join(sorted(alt)) + "}" for alt in self.requires)
        return (
            f"correspondence source {self.name!r} needs batch keys {wanted}; "
            f"the batch has {sorted(keys)}"
        )

    def check(self, batch_or_keys: Mapping[str, Any] | Iterable[str], **options: Any) -> None:
        """Raise before training if the data or the options cannot feed this source."""
        message = self.missing_keys(batch_or_keys.keys() if isinstance(batch_or_keys, Mapping) else batch_or_keys)
        if message is not None:
            raise KeyError(message)
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(
                f"correspondence source {self.name!r} got unknown options {unknown}; "
                f"valid options: {list(self.options)}"
            )

    def __call__(self, batch, grid, stride, **options) -> CorrespondenceTargets | None:
        return self.fn(batch, grid, stride, **options)


SOURCES: Registry[Source] = Registry("correspondence source")


def register_source(
    name: str, *, requires: Iterable[Iterable[str]] = ((),), soft_only: bool = False
) -> Callable[[SourceFn], SourceFn]:
    """Decorator: register `fn` under `name`. A second registration of a name is a bug (two
    modules would silently fight over which one an experiment gets), so it raises ValueError."""

    def decorator(fn: SourceFn) -> SourceFn:
        source = Source(name, fn, tuple(frozenset(alt) for alt in requires), soft_only)
        SOURCES.register(name, source, origin=f"{fn.__module__}.{fn.__qualname__}")
        return fn

    return decorator


# The registry's own lookups; `get_source` raises `UnknownNameError` (a KeyError) listing the valid names.
list_sources = SOURCES.list
get_source = SOURCES.get


def batch_key(batch: Mapping[str, Any], option: str, choice: str, choices, *, preferred: str, fallback: str,
              source: str, hint: str = "") -> str:
    """The batch key a source option names: `auto` = `preferred` when the batch has it, else `fallback`."""
    if choice not in choices:
        raise ValueError(f"{option} {choice!r} is not one of {list(choices)}")
    key = (preferred if preferred in batch else fallback) if choice == "auto" else choice
    if key not in batch:
        raise KeyError(f"{source} with {option}={choice!r} needs batch key {key!r}{hint}; the batch has {sorted(batch)}")
    return key


def _check_grid(batch: Mapping[str, torch.Tensor], grid: tuple[int, int, int], stride: int) -> None:
    if len(grid) != 3:
        raise ValueError(f"grid must be (V, h, w), got {grid}")
    V, h, w = grid
    if V < 2:
        raise ValueError(f"correspondence targets need at least 2 views, got grid {tuple(grid)}")
    for key in ("image", "depth", "point_map"):
        if key in batch:
            shape = tuple(batch[key].shape)
            H, W = shape[-2:]
            if len(shape) < 4 or shape[1] != V or H != h * stride or W != w * stride:
                raise ValueError(
                    f"batch[{key!r}] of shape {shape} does not fit grid {tuple(grid)} at stride {stride} "
                    f"(expected V={V}, H={h * stride}, W={w * stride})"
                )


def compute_targets(
    name: str, batch: Mapping[str, torch.Tensor], grid: tuple[int, int, int], stride: int, **options: Any
) -> CorrespondenceTargets | None:
    """Targets of source `name` on the token grid (V, h, w) of a layer with pixel stride `stride`.

    Returns None for the `none` baseline (the engine then runs no tap at all). Targets carry no
    gradient: they are data.
    """
    source = get_source(name)
    source.check(batch, **options)
    _check_grid(batch, tuple(grid), int(stride))
    with torch.no_grad():
        return source(batch, tuple(grid), int(stride), **options)
