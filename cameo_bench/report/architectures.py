"""The backbones side by side: each arm on every architecture at equal steps and at equal training compute.

Architectures differ several-fold in cost per step (issue 13), so "the UNet is 1 dB better at step
3000" may only say it spent more compute. For every arm that ran on every backbone the section gives
the parameter count, the training GFLOP per step and the primary metric (mean ± std over seeds)
(a) at the last evaluation step common to every matched run and (b) at the largest training-FLOP
budget every matched run reached, each seed's curve interpolated linearly in FLOPs (= step x its
logged `compute/train_flops_per_step`). One step and one budget serve the whole table, so arms of
one backbone are compared at equal compute too. The curves are the raw step histories whatever the
report's x axis (`Variant.rescale` is not applied), so the table reads the same in every report mode.

Matching rule: arms are matched across backbones by their `cameo.*` params (the weight as a number)
without `cameo.layer` and `cameo.layer_resolved`, since layer names belong to one architecture and a
selector such as `depth:0.5` lands on different layers; every baseline has the one key `baseline`.
A key held by two variants of one backbone (say a layer sweep, or baselines of different lengths)
is ambiguous there and left out, and said so. Pure functions over `Variant`s and their `RunRecord`s.
"""
from __future__ import annotations

import numpy as np

from cameo_bench.report import xaxis
from cameo_bench.report.floors import final_value
from cameo_bench.report.markdown import mean_std, table
from cameo_bench.report.runs import Variant
from cameo_bench.tracking import RunRecord, keys

HEADING = "## Architectures at equal steps and at equal training compute"
_BACKBONE_SPECIFIC = (keys.CAMEO_LAYER, keys.LAYER_RESOLVED)


def arm_key(v: Variant) -> tuple:
    """What an arm is on any backbone: `('baseline',)`, or its `cameo.*` params without the layer."""
    if v.baseline_arm:
        return ("baseline",)
    return tuple(sorted((k, repr(float(x)) if k == keys.CAMEO_WEIGHT else x) for k, x in v.params.items()
                        if k.startswith(keys.CAMEO_PREFIX) and k not in _BACKBONE_SPECIFIC))


def match_arms(backbones: dict[str, list[Variant]]) -> tuple[list[dict[str, Variant]], list[tuple]]:
    """`{backbone: variant}` per arm present once on every backbone (in the first backbone's order),
    and the keys that are ambiguous (two variants) on some backbone."""
    by_key = [{} for _ in backbones]  # per backbone: key -> variants
    for found, variants in zip(by_key, backbones.values()):
        for v in variants:
            found.setdefault(arm_key(v), []).append(v)
    ambiguous = sorted({k for found in by_key for k, vs in found.items() if len(vs) > 1})
    common = [k for k in by_key[0] if k not in ambiguous and all(k in found for found in by_key)]
    return [{b: found[k][0] for b, found in zip(backbones, by_key)} for k in common], ambiguous


def value_at(curve: list[tuple[float, float]], x: float) -> float | None:
    """The curve interpolated linearly at `x`; None outside its evaluations (never extrapolate)."""
    xs, ys = np.asarray([p[0] for p in curve], float), np.asarray([p[1] for p in curve], float)  # [T], [T]
    return float(np.interp(x, xs, ys)) if curve and xs[0] <= x <= xs[-1] else None


in_tflop = xaxis.rescaler("flops")  # (run, step curve) -> the curve against training TFLOP


def common_step(runs: list[RunRecord], metric: str) -> int | None:
    """The last step at which every run evaluated `metric`."""
    shared = set.intersection(*({s for s, _ in r.metrics[metric]} for r in runs))
    return max(shared) if shared else None


def flop_budget(runs: list[RunRecord], metric: str) -> float:
    """The largest training-FLOP budget every run reached at an evaluation of `metric` (TFLOP)."""
    return min(in_tflop(r, r.metrics[metric])[-1][0] for r in runs)


def _seeds_cell(values: list[float | None]) -> str:
    """A seed whose curve does not cover the point (None) makes the cell —, never a smaller sample."""
    return "—" if any(x is None for x in values) else mean_std(values)


def _scaled(values: list[float | None], unit: float, digits: int) -> str:
    values = [x for x in values if x is not None]
    return f"{np.mean(values) / unit:.{digits}f}" if values else "—"


def _row(arm: str, backbone: str, v: Variant, metric: str, step: int | None, budget: float | None) -> list[str]:
    mine = [r for r in v.runs if r.metrics.get(metric)]
    row = [arm, backbone, _scaled([final_value(r.metrics, keys.PARAM_COUNT) for r in v.runs], 1e6, 2),
           _scaled([final_value(r.metrics, keys.TRAIN_FLOPS_PER_STEP) for r in v.runs], 1e9, 2),
           _seeds_cell([value_at(r.metrics[metric], step) if step is not None else None for r in mine])]
    return row + ([_seeds_cell([value_at(in_tflop(r, r.metrics[metric]), budget) for r in mine])] if budget is not None else [])


def section(backbones: dict[str, list[Variant]], metric: str = keys.PSNR) -> list[str]:
    """The markdown section; nothing with fewer than two backbones."""
    if len(backbones) < 2:
        return []
    arms, ambiguous = match_arms(backbones)
    md = [HEADING, "", "Arms are matched across backbones by their `cameo.*` settings without the layer (layer names "
          "belong to one architecture); baselines match baselines."]
    if ambiguous:
        md += [f"Left out, more than one variant on a backbone: {', '.join(str(dict(k)) for k in ambiguous)}."]
    runs = [r for arm in arms for v in arm.values() for r in v.runs if r.metrics.get(metric)]
    if not runs:
        return md + ["", f"No arm ran on every backbone with `{metric}` logged.", ""]
    step = common_step(runs, metric)
    unpriced = [r for r in runs if final_value(r.metrics, keys.TRAIN_FLOPS_PER_STEP) is None]
    budget = None if unpriced else flop_budget(runs, metric)
    md += [f"Equal steps: step {step} (the last evaluation every matched run made)." if step is not None else
           "Equal steps: the matched runs share no evaluation step."]
    if unpriced:
        md += [f"Equal training compute left out: {len(unpriced)} of {len(runs)} runs logged no "
               f"`{keys.TRAIN_FLOPS_PER_STEP}` (trained before FLOPs were counted, or the metric was not loaded)."]
    else:
        md += [f"Equal training compute: {budget:.4g} TFLOP (the largest budget every matched run reached; "
               "each seed's curve interpolated linearly in step x FLOPs per step)."]
    header = ["arm", "backbone", "params (M)", "GFLOP / step", f"{metric} @ step {step if step is not None else '—'}"]
    header += [f"{metric} @ {budget:.4g} TFLOP"] if budget is not None else []
    rows = [_row(" / ".join(dict.fromkeys(v.label for v in arm.values())), backbone, v, metric, step, budget)
            for arm in arms for backbone, v in arm.items()]
    md += [""] + table(header, rows) + [""]
    md += ["CAMEO's speed-up over its baseline on each backbone is in the speed-up section below, in the report's "
           "x unit (a report built with `--x flops` gives it in training FLOPs, CAMEO's extra cost included).", ""]
    return md
