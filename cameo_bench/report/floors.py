"""Floors in reports and summaries: the trivial predictors' values read back from runs, as table rows,
horizontal plot lines and the "not synthesising" verdict.

A variant whose PSNR does not beat the best floor (the better of `mean_colour` and `copy_nearest`;
which one depends on the data) by `SYNTHESIS_MARGIN_DB` has not learned to synthesise views, and
its PSNR differences to other such variants compare kinds of noise (issue 13). The depth-warp
oracle is shown beside the floors as a ceiling of what copying with perfect geometry gives; it never
counts as a floor. Pure functions over metric histories (`{key: [(step, value), ...]}`), so the
report (MLflow records) and the quickstart summary (run folders) share them.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from cameo_bench.report.curves import higher_is_better
from cameo_bench.tracking import keys

SYNTHESIS_MARGIN_DB = 1.0
VERDICT_METRIC = keys.PSNR
NAMES = keys.FLOOR_PREDICTORS + (keys.ORACLE_DEPTH_WARP,)
LABELS = {keys.FLOOR_MEAN_COLOUR: "floor: mean colour", keys.FLOOR_COPY_NEAREST: "floor: copy nearest",
          keys.ORACLE_DEPTH_WARP: "oracle: depth warp"}
LINE_STYLES = {keys.FLOOR_MEAN_COLOUR: dict(color="tab:brown", linestyle=":"),
               keys.FLOOR_COPY_NEAREST: dict(color="tab:gray", linestyle="-."),
               keys.ORACLE_DEPTH_WARP: dict(color="tab:green", linestyle=(0, (5, 2, 1, 2)))}

Histories = Mapping[str, Sequence[tuple[int, float]]]


def floor_key(name: str, metric: str) -> str | None:
    """The logged key of floor/oracle `name` for eval metric `metric` (`eval/psnr`, `eval/ssim/30-60`);
    None for metrics that are not image-quality scores of the target views."""
    if not metric.startswith(keys.EVAL) or metric.startswith((keys.FLOOR, keys.ORACLE)):
        return None
    suffix = metric.removeprefix(keys.EVAL)
    return keys.oracle_metric(name, suffix) if name == keys.ORACLE_DEPTH_WARP else keys.floor_metric(name, suffix)


def final_value(history: Histories, key: str) -> float | None:
    values = history.get(key)
    return float(values[-1][1]) if values else None


def floors_of(histories: Iterable[Histories], metric: str) -> dict[str, float]:
    """{floor name: value} of `metric`, the mean over the runs that logged it (the runs of a variant
    share their evaluation scenes, so their floors are equal)."""
    histories = list(histories)
    out = {}
    for name in NAMES:
        key = floor_key(name, metric)
        values = [v for h in histories if key and (v := final_value(h, key)) is not None]
        if values:
            out[name] = sum(values) / len(values)
    return out


def best_floor(floors: Mapping[str, float], metric: str = VERDICT_METRIC) -> tuple[str, float] | None:
    """(name, value) of the best trivial predictor of `metric` (the oracle is not a floor)."""
    candidates = [(name, floors[name]) for name in keys.FLOOR_PREDICTORS if name in floors]
    if not candidates:
        return None
    pick = max if higher_is_better(metric) else min
    return pick(candidates, key=lambda item: item[1])


def synthesis_gap(psnr: float | None, floors: Mapping[str, float]) -> tuple[float, str, float] | None:
    """(PSNR - best floor, floor name, floor value), or None without a PSNR or floors."""
    best = best_floor(floors)
    if psnr is None or best is None:
        return None
    return psnr - best[1], best[0], best[1]


def is_synthesising(psnr: float, floors: Mapping[str, float]) -> bool | None:
    gap = synthesis_gap(psnr, floors)
    return None if gap is None else gap[0] >= SYNTHESIS_MARGIN_DB


def _floor_name(name: str) -> str:
    """`mean colour` for `mean_colour`: the label without its kind."""
    return LABELS[name].split(": ", 1)[1]


def _signed_db(x: float) -> str:
    return f"{x:+.2f} dB".replace("-", "−")


def verdict_cell(psnr: float | None, floors: Mapping[str, float]) -> str:
    """`+3.12 dB` for a variant that synthesises, `−0.41 dB: **not synthesising** (best floor mean
    colour 15.63 dB)` for one that does not beat the best floor by the margin; `—` without floors."""
    gap = synthesis_gap(psnr, floors)
    if gap is None:
        return "—"
    text = _signed_db(gap[0])
    if gap[0] < SYNTHESIS_MARGIN_DB:
        text += f": **not synthesising** (best floor {_floor_name(gap[1])} {gap[2]:.2f} dB)"
    return text


def floor_sets(groups: Sequence[tuple[str, list[Histories]]], metrics: Sequence[str]):
    """The distinct floor values among `groups` = [(label, histories of its runs), ...]: a list of
    (labels of the groups that share them, {metric: {floor name: value}}). Groups evaluated on the
    same scenes share one set; a study that varies the data (the viewpoint study) has one per setting."""
    sets: list[tuple[list[str], dict[str, dict[str, float]]]] = []
    for label, histories in groups:
        values = {m: f for m in metrics if (f := floors_of(histories, m))}
        if not values:
            continue
        for labels, known in sets:
            if _same(known, values):
                labels.append(label)
                break
        else:
            sets.append(([label], values))
    return sets


def _same(a: dict, b: dict, tol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(
        a[m].keys() == b[m].keys() and all(abs(a[m][n] - b[m][n]) <= tol for n in a[m]) for m in a)


def row_labels(sets) -> list[tuple[str, str, dict[str, dict[str, float]]]]:
    """(row label, floor name, values) per floor row; when there are several sets, each label says
    which groups it belongs to."""
    rows = []
    for labels, values in sets:
        names = [n for n in NAMES if any(n in v for v in values.values())]
        where = "" if len(sets) == 1 else f" ({labels[0]}" + (f" and {len(labels) - 1} more)" if len(labels) > 1 else ")")
        rows += [(LABELS[n] + where, n, values) for n in names]
    return rows


# --- the report's pieces (variants: `report.runs.Variant`, read through `.runs[i].metrics` and `.label`)


def variant_floors(variant, metric: str) -> dict[str, float]:
    return floors_of([r.metrics for r in variant.runs], metric)


def _mean_final(variant, metric: str) -> float | None:
    values = variant.finals(metric)
    return sum(values) / len(values) if values else None


def variant_verdict(variant) -> str:
    """The sweep tables' cell: the variant's mean final PSNR above its best floor."""
    return verdict_cell(_mean_final(variant, VERDICT_METRIC), variant_floors(variant, VERDICT_METRIC))


def plot_lines(variants, metric: str) -> list[tuple[str, str, float]]:
    """(label, floor name, value) of the horizontal lines of one backbone's `metric` panel."""
    sets = floor_sets([(v.label, [r.metrics for r in v.runs]) for v in variants], [metric])
    return [(f"{label} {values[metric][name]:.3g}", name, values[metric][name])
            for label, name, values in row_labels(sets)]


def table_rows(variants, metrics: Sequence[str], width_before: int, cell) -> list[list[str]]:
    """Floor rows for a table whose rows are `[label] + width_before cells + one cell per metric`;
    `cell(value)` formats a value, metrics without floors get `—`."""
    sets = floor_sets([(v.label, [r.metrics for r in v.runs]) for v in variants], metrics)
    return [[label] + ["—"] * width_before + [cell(values[m][name]) if name in values.get(m, {}) else "—"
                                              for m in metrics]
            for label, name, values in row_labels(sets)]


def section(backbones: Mapping[str, list]) -> list[str]:
    """`## Floors and ceiling`: per backbone the floors of PSNR / SSIM / LPIPS, and which variants
    do not beat the best floor by the margin. Empty when no run logged floors (runs before them)."""
    metrics = (keys.PSNR, keys.SSIM, keys.LPIPS_VGG)
    md = []
    for backbone, variants in backbones.items():
        sets = floor_sets([(v.label, [r.metrics for r in v.runs]) for v in variants], metrics)
        if not sets:
            continue
        shown = [m for m in metrics if any(m in values for _, values in sets)]
        rows = [[label] + [f"{values[m][name]:.3f}" if name in values.get(m, {}) else "—" for m in shown]
                for label, name, values in row_labels(sets)]
        md += [f"### {backbone}", ""]
        md += ["| predictor | " + " | ".join(m.removeprefix(keys.EVAL).upper() for m in shown) + " |",
               "|" + "---|" * (len(shown) + 1)] + ["| " + " | ".join(r) + " |" for r in rows] + [""]
        failing = []
        for v in variants:
            psnr = _mean_final(v, VERDICT_METRIC)
            gap = synthesis_gap(psnr, variant_floors(v, VERDICT_METRIC))
            if gap is not None and gap[0] < SYNTHESIS_MARGIN_DB:
                failing.append(f"- **not synthesising**: {v.label}, final PSNR {psnr:.2f} dB "
                               f"({_signed_db(gap[0])} to the best floor, {_floor_name(gap[1])} {gap[2]:.2f} dB)")
        if failing:
            md += failing + [""]
        else:
            md += [f"Every variant beats the best floor by at least {SYNTHESIS_MARGIN_DB:g} dB PSNR.", ""]
    if not md:
        return []
    return ["## Floors and ceiling", "",
            "Trivial predictors scored on the same target views with the same metrics: each target filled with its "
            "references' mean colour, the nearest reference (by rotation) copied, and the depth-warp oracle (the "
            "nearest reference warped by ground-truth depth with the occlusion test, holes in the mean colour; a "
            f"ceiling of copying with perfect geometry, not a floor). A variant whose final PSNR is less than "
            f"{SYNTHESIS_MARGIN_DB:g} dB above the best floor is marked **not synthesising**: its differences to other "
            "such variants are differences between models that do not yet produce the views.", ""] + md
