"""The backbones of "the default configuration" as the quickstart runs them, read from its sweep file.

The step-time bar of issue 14 is set at the configuration users run first, so the benchmark and
the profile script take the quickstart sweep's backbone axis (gin/sweeps/quickstart.gin: preset,
overrides such as the UNet's `input_patch`, supervised layer) instead of a copy of it that would
drift when the quickstart changes.
"""
from __future__ import annotations

import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]
QUICKSTART_SWEEP = REPO / "gin" / "sweeps" / "quickstart.gin"
SHORT_NAMES = {"mv_dit": "dit", "mv_unet": "unet"}


def quickstart_backbones() -> dict[str, list[str]]:
    """{"dit": bindings, "unet": bindings}: each backbone point of the quickstart sweep as gin
    binding strings (the axis entry only: the sweep's fixed step counts do not matter to a step)."""
    from cameo_bench.sweep import grid

    spec = grid.load(QUICKSTART_SWEEP)
    out = {}
    for point in spec.axes["backbone"]:
        short = SHORT_NAMES[point["backbone.name"]]
        out[short] = [f"{key} = {value!r}" for key, value in point.items()]
    if set(out) != set(SHORT_NAMES.values()):
        raise ValueError(f"{QUICKSTART_SWEEP}: expected one mv_dit and one mv_unet point, got {sorted(out)}")
    return out
