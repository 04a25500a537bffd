"""Layer selectors: how a config names an attention layer without knowing the model's layer names.

`"decoder:first_cross_view"` or `"decoder:1/16"` means the same part of the network on every preset
of a backbone, so one experiment file can say "the paper's layer" at any scale. The grammar is
documented in `MultiViewBackbone.resolve_layer` and spelled out in every error. Stdlib-only: layers
are read through their attributes (`name`, `stage`, `stride`, `cross_view`), as listed by
`MultiViewBackbone.attention_layers()` in forward order.
"""
from __future__ import annotations

import difflib
import math
import re
from typing import Any, Sequence

NAMED_RULES = ("first", "last", "first_cross_view", "last_cross_view")  # the rules without an argument
SELECTOR_GRAMMAR = (
    "a layer is an exact name or a selector '[STAGE:]RULE' with RULE one of "
    "first | last | first_cross_view | last_cross_view (within STAGE, or the whole model) | "
    "depth:F (the layer at fraction F in [0, 1] of the forward order) | "
    "1/N (the first layer whose token grid is 1/N of the image side; resolve_layer(..., input_stride=S) "
    "with S image pixels per model-input pixel: 1 in pixel space, 8 on SD latents)"
)


class UnknownLayerError(KeyError, ValueError):
    """An unknown layer name or selector, raised with the valid names (and close matches).

    A `KeyError` like every failed lookup and a `ValueError` like every bad config value, as the
    registries' `UnknownNameError` is. Errors of `resolve_layer` also spell out the selector grammar.
    """

    def __init__(
        self, name: str, valid: list[str], *, why: str = "", stages: list[str] | None = None, suggest: bool = True
    ):
        candidates = list(valid) if suggest else []
        if stages is not None and suggest:  # a selector: suggest selectors too
            candidates += [*NAMED_RULES, *(f"{stage}:{rule}" for stage in stages for rule in NAMED_RULES)]
        close = difflib.get_close_matches(name, candidates, n=3)
        hint = f" Did you mean {close}?" if close else ""
        message = f"unknown attention layer {name!r}" + (f" ({why})" if why else "") + f".{hint} Valid layers: {valid}"
        if stages is not None:
            message += f". Selectors: {SELECTOR_GRAMMAR}; stages of this model: {stages}"
        super().__init__(message)
        self.name, self.valid = name, valid
        self._parts = dict(why=why, stages=stages, suggest=suggest)

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.args[0]

    def __reduce__(self):  # rebuilt from its parts, so it survives a process pool (sweep workers)
        return _rebuild_layer_error, (type(self), self.name, self.valid, self._parts)


def _rebuild_layer_error(cls, name, valid, parts):
    return cls(name, valid, **parts)


def select_layer(layers: Sequence[Any], selector: str, input_stride: int = 1) -> str:
    """The name of the layer `selector` picks among `layers` (forward order); see `SELECTOR_GRAMMAR`."""
    if isinstance(input_stride, bool) or not isinstance(input_stride, int) or input_stride < 1:
        raise ValueError(
            f"input_stride must be a positive integer (image pixels per input pixel), got {input_stride!r}")
    names = [layer.name for layer in layers]
    if selector in names:
        return selector
    if not isinstance(selector, str):
        raise TypeError(f"a layer selector must be a string, got {selector!r}")
    stages = list(dict.fromkeys(layer.stage for layer in layers if layer.stage))

    def fail(why: str, suggest: bool = False):  # suggest close matches only for what did not parse
        raise UnknownLayerError(selector, names, why=why, stages=stages, suggest=suggest)

    stage, rule = None, selector
    head, sep, tail = selector.partition(":")
    if sep and head in stages:
        stage, rule = head, tail
    elif sep and head != "depth":
        fail(f"{head!r} is neither a stage of this model nor 'depth'", suggest=True)
    pool = [layer for layer in layers if stage is None or layer.stage == stage]
    where = f"stage {stage!r}" if stage else "the model"
    if not pool:
        fail(f"{where} has no attention layer")

    if rule in ("first", "last"):  # the rules of NAMED_RULES, then the two that take an argument
        return pool[0 if rule == "first" else -1].name
    if rule in ("first_cross_view", "last_cross_view"):
        cross = [layer for layer in pool if layer.cross_view]
        if not cross:
            fail(f"{where} has no cross-view layer")
        return cross[0 if rule.startswith("first") else -1].name
    if rule.startswith("depth:"):
        try:
            frac = float(rule.split(":", 1)[1])
        except ValueError:
            frac = math.nan
        if not 0.0 <= frac <= 1.0:
            fail(f"depth fraction must be a number in [0, 1], got {rule.split(':', 1)[1]!r}")
        return pool[min(int(round(frac * (len(pool) - 1))), len(pool) - 1)].name
    match = re.fullmatch(r"1/(\d+)", rule)
    if match:
        n = int(match.group(1))
        for layer in pool:
            if layer.stride * input_stride == n:
                return layer.name
        there = ", ".join(f"1/{s}" for s in sorted({layer.stride * input_stride for layer in pool}))
        fail(f"no layer of {where} has a token grid at 1/{n} of the image with input_stride={input_stride}; "
             f"its grids are at {there}")
    fail("not a layer name, and not a selector", suggest=True)
