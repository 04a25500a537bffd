"""A side-by-side table of a sweep's trials, read from their run folders (no tracking server needed).

This is what `make quickstart` prints at the end: one row per trial with the last evaluation's
quality and attention-correspondence numbers and the measured training speed.
"""
from __future__ import annotations

import statistics

import torch

from backbones import create_backbone
from cameo_bench import config
from cameo_bench.tracking.run_log import read_metrics

COLUMNS = (
    ("PSNR", "eval/psnr", "{:.2f}"),
    ("SSIM", "eval/ssim", "{:.3f}"),
    ("LPIPS", "eval/lpips_vgg", "{:.3f}"),
    ("PCK@1 (sup. layer)", "attn/supervised/pck@1", "{:.3f}"),
    ("EPE (tok)", "attn/supervised/epe", "{:.2f}"),
    ("consistency L1", "eval/consistency_l1", "{:.3f}"),
)


def last_value(history: dict, key: str) -> tuple[int, float] | None:
    values = history.get(key)
    return values[-1] if values else None


def trial_row(plan, trial, baseline_layer: str | None = None) -> dict[str, str]:
    history = read_metrics(plan.run_root / trial.id)
    row = {"trial": trial.id, "variant": trial.label}
    step = last_value(history, "eval/psnr")
    row["step"] = str(step[0]) if step else "-"
    for title, key, fmt in COLUMNS:
        value = last_value(history, key)
        if value is None and key.startswith("attn/supervised/") and baseline_layer:
            # a baseline has no supervised layer: read the layer CAMEO supervises in its sibling trials
            value = last_value(history, f"attn/{baseline_layer}/{key.split('/', 2)[2]}")
        row[title] = fmt.format(value[1]) if value else "-"
    steps = [v for _, v in history.get("time/step_seconds", [])]
    row["s/step"] = f"{statistics.median(steps):.2f}" if steps else "-"
    return row


def _backbone_and_layer(plan, trial) -> tuple[str, str]:
    """(backbone, preset, overrides) key and the layer `cameo.layer` names for that backbone.

    A baseline's own `cameo.layer` is whatever the base file says (sweeps drop cameo bindings of
    baselines), so baselines are compared at the layer their CAMEO siblings supervise.
    """
    exp = config.parse(plan.gin_files, plan.trial_bindings(trial))
    with torch.device("meta"):  # built without allocating weights: free
        model = create_backbone(exp.backbone.name, exp.backbone.preset, **exp.backbone.overrides)
    key = f"{exp.backbone.name}/{exp.backbone.preset}/{sorted(exp.backbone.overrides.items())}"
    return key, model.resolve_layer(exp.cameo.layer)


def summary_table(plan) -> str:
    """Markdown table, one row per trial, columns that have no value anywhere dropped."""
    supervised = {}
    for trial in plan.trials:
        if not trial.baseline:
            key, layer = _backbone_and_layer(plan, trial)
            supervised.setdefault(key, layer)
    rows = []
    for trial in plan.trials:
        layer = supervised.get(_backbone_and_layer(plan, trial)[0]) if trial.baseline else None
        rows.append(trial_row(plan, trial, layer))
    titles = ["variant", "step"] + [t for t, _, _ in COLUMNS] + ["s/step"]
    titles = [t for t in titles if any(r.get(t, "-") != "-" for r in rows)]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    lines += ["| " + " | ".join(r.get(t, "-") for t in titles) + " |" for r in rows]
    return "\n".join(lines)
