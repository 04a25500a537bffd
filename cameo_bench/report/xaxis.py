"""What a report's curves are drawn against: training steps, training FLOPs or training wall-clock.

Architectures differ several-fold in cost per step and CAMEO adds its loss to every step, so "2x
fewer steps" is not "2x less compute". `cameo-bench report --x flops` maps each evaluation step s
of a run to s x its `compute/train_flops_per_step` (counted once per run by engine/compute.py), in
TFLOP; `--x seconds` to its training clock `time/train_seconds` (steps only, no evaluation),
interpolated between the steps where it was logged. Speed-ups are then ratios of compute, not of
steps. Pure functions over `RunRecord`s.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from cameo_bench.tracking import keys

X_AXES = ("steps", "flops", "seconds")
LABELS = {"steps": "step", "flops": "training TFLOP (step x FLOPs per step)",
          "seconds": "training seconds (time/train_seconds)"}
UNITS = {"steps": "steps", "flops": "training TFLOP", "seconds": "training seconds"}
TFLOP = 1e12

Curve = list[tuple[float, float]]


def _check(x: str) -> None:
    if x not in X_AXES:
        raise ValueError(f"x axis {x!r} is not one of {list(X_AXES)}")


def metric_prefixes(x: str) -> tuple[str, ...]:
    """Metric prefixes a report must load besides the evaluation's to draw against `x`. The compute
    record (`compute/*`: FLOPs per step, parameters; one value each) and the training clock are
    always loaded: the section comparing architectures at equal compute needs the one, the report's
    compute line the other, whatever the curves are drawn against."""
    _check(x)
    return (keys.COMPUTE, keys.TRAIN_SECONDS)


def _flops(run, curve: Curve) -> Curve:
    history = run.metrics.get(keys.TRAIN_FLOPS_PER_STEP)
    if not history:
        raise ValueError(f"run {run.run_id} ({run.name}) has no {keys.TRAIN_FLOPS_PER_STEP} (it was trained before "
                         "FLOPs were counted, or the metric was not loaded): draw it with --x steps")
    per_step = history[-1][1] / TFLOP
    return [(step * per_step, value) for step, value in curve]


def _seconds(run, curve: Curve) -> Curve:
    history = run.metrics.get(keys.TRAIN_SECONDS)
    if not history:
        raise ValueError(f"run {run.run_id} ({run.name}) has no {keys.TRAIN_SECONDS}: draw it with --x steps")
    steps = np.asarray([0.0] + [s for s, _ in history])  # the clock is 0 before the first step
    seconds = np.asarray([0.0] + [v for _, v in history])
    return [(float(np.interp(step, steps, seconds)), value) for step, value in curve]


def rescaler(x: str) -> Callable[[object, Curve], Curve] | None:
    """`f(run, curve) -> curve` with its steps mapped to `x`; None for steps (nothing to do)."""
    _check(x)
    return {"steps": None, "flops": _flops, "seconds": _seconds}[x]
