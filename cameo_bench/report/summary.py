"""A side-by-side table of a sweep's trials, read from their run folders (no tracking server needed).

This is what `make quickstart` prints at the end: one row per trial, labelled like the runs
(`mv_dit tiny · CAMEO λ0.5 @blocks.02.attn · s0`), with the last evaluation's quality and
attention-correspondence numbers and the measured training speed, then the floors (trivial predictors
and the depth-warp oracle on the same target views) as rows of their own, and each trial's PSNR
above the best floor (`report.floors`: below 1 dB it is marked "not synthesising").
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from backbones import create_backbone
from cameo_bench import config
from cameo_bench.objectives.codecs import codec_downsample
from cameo_bench.report import floors
from cameo_bench.tracking import keys
from cameo_bench.tracking.labels import label_extras, run_label
from cameo_bench.tracking.run_log import read_metrics

COLUMNS = (
    ("PSNR", keys.PSNR, "{:.2f}"),
    ("SSIM", keys.SSIM, "{:.3f}"),
    ("LPIPS", keys.LPIPS_VGG, "{:.3f}"),
    ("ref. use (dB)", keys.REFERENCE_USE, "{:.2f}"),
    ("PCK@1 (sup. layer)", keys.SUPERVISED_PCK1, "{:.3f}"),
    ("EPE (tok)", keys.SUPERVISED_EPE, "{:.2f}"),
    ("consistency L1", keys.CONSISTENCY, "{:.3f}"),
    ("FLOPs/step", keys.TRAIN_FLOPS_PER_STEP, "{:.3g}"),
)
VS_FLOOR = "PSNR − best floor"
FLOOR_COLUMNS = ("PSNR", "SSIM", "LPIPS")  # the COLUMNS the floors have values for


def last_value(history: dict, key: str) -> tuple[int, float] | None:
    values = history.get(key)
    return values[-1] if values else None


@dataclass
class TrialInfo:
    """What the table needs of a trial's parsed experiment."""

    params: dict[str, str]  # the experiment's flat params, as a tracker logs them
    backbone: str  # name/preset/overrides: trials with the same key build the same model
    layer: str  # the layer `cameo.layer` resolves to on that model


def trial_info(plan, trial) -> TrialInfo:
    """The trial's experiment and its resolved layer. A baseline's own `cameo.layer` is whatever the
    base file says (sweeps drop cameo bindings of baselines), so baselines are compared at the layer
    their CAMEO siblings supervise (see `summary_table`)."""
    exp = config.parse(plan.gin_files, plan.trial_bindings(trial))
    with torch.device("meta"):  # built without allocating weights: free
        model = create_backbone(exp.backbone.name, exp.backbone.preset, **exp.backbone.overrides)
    key = f"{exp.backbone.name}/{exp.backbone.preset}/{sorted(exp.backbone.overrides.items())}"
    stride = codec_downsample(exp.codec.kind, exp.codec.vae_path)  # selectors like decoder:1/16 need it
    return TrialInfo(exp.flat_params(), key, model.resolve_layer(exp.cameo.layer, input_stride=stride))


def trial_label(trial, info: TrialInfo) -> str:
    """`run_label` (the trial's MLflow run name), with the trial's other axes that it does not say."""
    return run_label(info.params, None if trial.baseline else info.layer, label_extras(trial.varied, trial.bindings))


def trial_row(plan, trial, baseline_layer: str | None = None, label: str | None = None) -> dict[str, str]:
    history = read_metrics(plan.run_root / trial.id)
    row = {"trial": trial.id, "variant": label or trial.label}
    step = last_value(history, keys.PSNR)
    row["step"] = str(step[0]) if step else "-"
    for title, key, fmt in COLUMNS:
        value = last_value(history, key)
        if value is None and key.startswith(keys.SUPERVISED_PREFIX) and baseline_layer:
            # a baseline has no supervised layer: read the layer CAMEO supervises in its sibling trials
            value = last_value(history, keys.attn(baseline_layer, key[len(keys.SUPERVISED_PREFIX):]))
        row[title] = fmt.format(value[1]) if value else "-"
    psnr = last_value(history, keys.PSNR)
    row[VS_FLOOR] = floors.verdict_cell(psnr[1] if psnr else None, floors.floors_of([history], keys.PSNR))
    steps = [v for _, v in history.get(keys.STEP_SECONDS, [])]
    row["s/step"] = f"{statistics.median(steps):.2f}" if steps else "-"
    return row


def summary_table(plan) -> str:
    """Markdown table, one row per trial, columns that have no value anywhere dropped."""
    infos = {trial.id: trial_info(plan, trial) for trial in plan.trials}
    supervised = {}
    for trial in plan.trials:
        if not trial.baseline:
            supervised.setdefault(infos[trial.id].backbone, infos[trial.id].layer)
    rows = []
    for trial in plan.trials:
        info = infos[trial.id]
        layer = supervised.get(info.backbone) if trial.baseline else None
        rows.append(trial_row(plan, trial, layer, trial_label(trial, info)))
    rows += floor_rows([(row["variant"], [read_metrics(plan.run_root / row["trial"])]) for row in rows])
    titles = ["variant", "step"] + [t for t, _, _ in COLUMNS] + [VS_FLOOR, "s/step"]
    titles = [t for t in titles if any(r.get(t, "-") != "-" for r in rows)]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    lines += ["| " + " | ".join(_cell(r.get(t, "-")) for t in titles) + " |" for r in rows]
    return "\n".join(lines)


def floor_rows(groups: list[tuple[str, list]]) -> list[dict[str, str]]:
    """One row per floor (per distinct set of floors when the trials' evaluation scenes differ)."""
    columns = [(title, key, fmt) for title, key, fmt in COLUMNS if title in FLOOR_COLUMNS]
    sets = floors.floor_sets(groups, [key for _, key, _ in columns])
    rows = []
    for label, name, values in floors.row_labels(sets):
        row = {"variant": label}
        for title, key, fmt in columns:
            value = values.get(key, {}).get(name)
            row[title] = fmt.format(value) if value is not None else "-"
        rows.append(row)
    return rows


def _cell(text: str) -> str:
    """A markdown table cell: the `|` inside a run label is escaped, or it would split the cell."""
    return text.replace("|", "\\|")
