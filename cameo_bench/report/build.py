"""Assemble a convergence report from runs: `reports/<name>/report.md`, its PNGs and `sources.json`.

Everything is computed from `RunRecord`s (plain data), so the numbers can be checked without MLflow;
`cameo_bench.tracking.load_runs` is the one place that reads them from a tracking store.
"""
from __future__ import annotations

import datetime
import json
import math
import pathlib
import re
from dataclasses import dataclass, field

import numpy as np

from cameo_bench.report import architectures, emergence, floors, plots, xaxis
from cameo_bench.report.markdown import mean_std as _mean_std, signed_ci, table as _table
from cameo_bench.report.curves import DEFAULT_FRACTIONS, Comparison, compare
from cameo_bench.report.runs import SUPERVISED, Grouping, Variant, group_runs, seed_of
from cameo_bench.tracking import RunRecord, keys

DEFAULT_METRICS = (keys.PSNR, keys.SSIM, keys.LPIPS_VGG, keys.SUPERVISED_PCK1)
PRIMARY = keys.PSNR  # the metric of the sweep tables' speed-up column (the paper's "2x" is on PSNR)
FIGURES = ("curves_*.png", "speedup_*.png", "profile_*.png", "attention_*.png")
MAX_ATTENTION_FIGURES = 8  # per backbone: the baseline and the first CAMEO variants
QUALITY_BY_BIN = ("psnr", "ssim")  # `eval/<metric>/<bin>` metrics of the quality-by-viewpoint tables
_VIEWPOINT_BIN = r"(?P<bin>\d+(?:-\d+|\+))"
_ATTN, _PCK1 = re.escape(keys.ATTN), re.escape(keys.PCK1)
_LAYER_PCK = re.compile(rf"^{_ATTN}(?P<layer>.+)/{_PCK1}$")
_BIN = re.compile(rf"^{_ATTN}(?P<layer>.+)/{_PCK1}/{_VIEWPOINT_BIN}$")
_QUALITY_BIN = re.compile(rf"^{re.escape(keys.EVAL)}(?P<metric>{'|'.join(QUALITY_BY_BIN)})/{_VIEWPOINT_BIN}$")


@dataclass
class Report:
    out_dir: pathlib.Path
    grouping: Grouping
    comparisons: dict[tuple[int, str], Comparison]  # (index into grouping.variants, metric) -> result
    files: list[pathlib.Path] = field(default_factory=list)
    skipped: list[tuple[RunRecord, str]] = field(default_factory=list)

    def of(self, variant: Variant, metric: str) -> Comparison | None:
        return self.comparisons.get((next(i for i, v in enumerate(self.grouping.variants) if v is variant), metric))

    def comparison(self, label: str, metric: str, backbone: str | None = None) -> Comparison:
        """Look up a result by variant label (and backbone when labels repeat across backbones);
        `metric` may be a name of runs logged earlier (`keys.current_name`)."""
        metric = keys.current_name(metric)
        for (i, key), comp in self.comparisons.items():
            v = self.grouping.variants[i]
            if v.label == label and key == metric and (backbone is None or v.backbone == backbone):
                return comp
        raise KeyError(f"no comparison for variant {label!r} on {metric!r}; variants: "
                       f"{sorted({v.label for v in self.grouping.variants})}")


# ---------------------------------------------------------------------------------------------
# formatting


def _num(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if math.isinf(x):
        return "∞"
    return f"{x:.{digits}g}" if abs(x) >= 1000 else f"{x:.{digits}f}"


def _speed(x: float) -> str:
    if math.isnan(x):
        return "—"
    return "n.r." if x == 0 else ("∞" if math.isinf(x) else f"{x:.2f}×")


def _speed_cell(comp: Comparison, f: int) -> str:
    if math.isnan(comp.speedup[f]):  # resampled seeds may still give numbers: they would mislead
        return f"— (the baseline does not improve: τ {_num(comp.thresholds[f])})"
    lo, hi = comp.speedup_ci[f]
    ci = "" if math.isnan(lo) else f" [{_speed(lo)}, {_speed(hi)}]"
    tv = comp.variant_iters[f]
    iters = f"{comp.base_iters[f]:.0f} → {'n.r.' if math.isnan(tv) else f'{tv:.0f}'}"
    if comp.speedup[f] == 0:  # never reached: the speed-up is below baseline iterations / last step
        iters += f", < {comp.base_iters[f] / comp.steps[-1]:.2f}×"
    return f"{_speed(comp.speedup[f])}{ci} (τ {_num(comp.thresholds[f])}: {iters})"


def _fraction_name(f: float) -> str:
    return "final" if f == 1.0 else f"{f:.0%}"


# ---------------------------------------------------------------------------------------------
# the parts


def current_trials(runs: list[RunRecord], fetch) -> dict[str, set[str]]:
    """Sweep name -> the trial ids its file defines now: the trial list its parent run logged at its
    latest start (`sweep/trials.json`). Sweeps whose list cannot be fetched are left out (no filter)."""
    import tempfile

    parents = {r.tags.get(keys.SWEEP_NAME): r for r in runs if r.tags.get(keys.SWEEP_ROLE) == "parent"}
    trials: dict[str, set[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, parent in parents.items():  # runs come oldest first: the newest parent of a sweep wins
            path = fetch(parent, keys.ARTIFACT_SWEEP_TRIALS, pathlib.Path(tmp) / f"{len(trials)}.json")
            if path is not None and pathlib.Path(path).exists():
                trials[name] = {t["id"] for t in json.loads(pathlib.Path(path).read_text())}
    return trials


def _usable(runs: list[RunRecord], statuses, grid: dict[str, set[str]] | None = None,
            ) -> tuple[list[RunRecord], list[tuple[RunRecord, str]]]:
    """Runs with evaluation metrics and an accepted status; of several runs of one sweep trial (a trial
    restarted from scratch) only the last one counts, or its seed would be counted twice. With `grid`
    (`current_trials`), a sweep trial its sweep file no longer defines (say the file moved a backbone to
    more steps) is left out: a report covers the sweep as it stands, not every grid it once had."""
    kept, skipped = [], []
    for run in runs:
        sweep, trial = run.tags.get(keys.SWEEP_NAME), run.tags.get(keys.SWEEP_TRIAL)
        if not any(k.startswith((keys.EVAL, keys.ATTN)) for k in run.metrics):
            skipped.append((run, f"no evaluation metrics, status {run.status} (e.g. a sweep's parent run)"))
        elif run.status not in statuses:
            skipped.append((run, f"status {run.status}"))
        elif grid and trial is not None and sweep in grid and trial not in grid[sweep]:
            skipped.append((run, f"trial {trial} is no longer in the grid of sweep {sweep!r} (its sweep file changed)"))
        else:
            kept.append(run)
    latest: dict[tuple[str, str], RunRecord] = {}
    for run in kept:  # `load_runs` returns runs oldest first
        if keys.SWEEP_TRIAL in run.tags:
            latest[run.tags.get(keys.SWEEP_NAME, ""), run.tags[keys.SWEEP_TRIAL]] = run
    superseded = [r for r in kept if keys.SWEEP_TRIAL in r.tags
                  and latest[r.tags.get(keys.SWEEP_NAME, ""), r.tags[keys.SWEEP_TRIAL]] is not r]
    skipped += [(r, "superseded by a later run of the same sweep trial") for r in superseded]
    return [r for r in kept if not any(r is s for s in superseded)], skipped


def _layer_order(variants: list[Variant], found: set[str]) -> list[str]:
    """Layers in forward order: from the tag `attn.layers` (comma-separated, logged by the engine) when
    present, else by name with numbers compared as numbers (names carry zero-padded indices). Building the
    backbone to ask it would cost torch and diffusers imports and break on backbones that changed since."""
    tagged = next((r.tags[keys.ATTN_LAYERS] for v in variants for r in v.runs if keys.ATTN_LAYERS in r.tags), "")
    order = [n for n in tagged.split(",") if n]

    def natural(name: str):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]

    return [n for n in order if n in found] + sorted(found - set(order), key=natural)


def _final(run: RunRecord, key: str) -> float | None:
    return floors.final_value(run.metrics, key)


def _convergence_section(backbones, metric: str, out: pathlib.Path, draw: bool,
                         x: str = "steps") -> tuple[list[str], pathlib.Path | None]:
    panels = {}
    for backbone, variants in backbones.items():
        arms = []
        layers = sorted({v.layer for v in variants if not v.baseline_arm and v.layer})
        for v in variants:
            if v.baseline_arm and metric.startswith(SUPERVISED):
                for layer in layers:
                    curves = v.curves(v.key_for(metric, layer))
                    if curves:
                        arms.append((f"baseline @ {layer}", True, curves))
            elif (curves := v.curves(metric)) is not None:
                arms.append((v.label, v.baseline_arm, curves))
        if arms:
            panels[backbone] = arms
    if not panels or not draw:
        return [], None
    lines = {b: floors.plot_lines(backbones[b], metric) for b in panels}
    stem = metric.removeprefix(keys.DIAG).replace('/', '_').replace('@', '')  # names as before the DIAG prefix
    path = plots.convergence(panels, metric, out / f"curves_{stem}.png",
                             floors=lines, xlabel=xaxis.LABELS[x])
    return [f"![{metric}]({path.name})", ""], path


def _bin_key(b: str) -> int:
    """Viewpoint bins ('0-30', '90+') in angle order."""
    return int(re.match(r"\d+", b)[0])


def _profile_section(backbone: str, variants: list[Variant], out: pathlib.Path,
                     draw: bool) -> tuple[list[str], list[pathlib.Path]]:
    found = {m["layer"] for v in variants for r in v.runs for k in r.metrics
             if (m := _LAYER_PCK.match(k)) and m["layer"] != keys.SUPERVISED_LAYER}
    if not found:
        return [], []
    layers = _layer_order(variants, found)
    arms = [(v.label, [float(np.mean(f)) if (f := v.finals(keys.attn(n, keys.PCK1))) else math.nan
                       for n in layers], v.layer) for v in variants]
    lines = [f"#### {backbone}: final PCK@1 of every layer (bold = the variant's supervised layer)", ""]
    rows = [[n] + [f"**{a[1][i]:.3f}**" if a[2] == n else _num(a[1][i]) for a in arms] for i, n in enumerate(layers)]
    lines += _table(["layer"] + [a[0] for a in arms], rows) + [""]
    paths = [plots.layer_profile(layers, arms, backbone, out / f"profile_{backbone.replace('/', '_')}.png")] if draw else []
    lines += [f"![profile {backbone}]({p.name})" for p in paths] + [""]
    bins = sorted({m["bin"] for v in variants for r in v.runs for k in r.metrics if (m := _BIN.match(k))},
                  key=_bin_key)
    supervised = sorted({v.layer for v in variants if not v.baseline_arm and v.layer})
    if bins and supervised:
        rows = []
        for v in variants:
            for layer in supervised if v.baseline_arm else [v.layer]:
                if layer is None:
                    continue
                cells = [_mean_std(v.finals(keys.attn(layer, f"{keys.PCK1}/{b}"))) for b in bins]
                rows.append([v.label, layer] + cells)
        lines += [f"#### {backbone}: PCK@1 at the supervised layer by viewpoint change (degrees), final step", ""]
        lines += _table(["arm", "layer"] + bins, rows) + [""]
    return lines, paths


def _quality_by_bin_section(backbone: str, variants: list[Variant]) -> list[str]:
    """Final PSNR / SSIM per viewpoint-change bin (target view -> nearest reference), and each CAMEO
    variant's gap to its baseline per bin: the mean over the seeds both arms ran."""
    found = {(m["metric"], m["bin"]) for v in variants for r in v.runs for k in r.metrics if (m := _QUALITY_BIN.match(k))}
    if not found:
        return []
    bins = sorted({b for _, b in found}, key=_bin_key)
    lines = []
    for metric in QUALITY_BY_BIN:
        if not any(m == metric for m, _ in found):
            continue
        rows = []
        for v in variants:
            rows.append([v.label] + [_mean_std(v.finals(keys.eval_by_bin(metric, b))) for b in bins])
            if v.baseline_arm or v.baseline is None:
                continue
            gaps = []
            for b in bins:
                key = keys.eval_by_bin(metric, b)
                mine = {seed_of(r): x for r in v.runs if (x := _final(r, key)) is not None}
                theirs = {seed_of(r): x for r in v.baseline.runs if (x := _final(r, key)) is not None}
                paired = [mine[s] - theirs[s] for s in mine if s in theirs]
                gaps.append(signed_ci(float(np.mean(paired)), (math.nan, math.nan)) if paired else "—")
            rows.append([f"Δ {v.label} − baseline"] + gaps)
        rows += floors.table_rows(variants, [keys.eval_by_bin(metric, b) for b in bins], 0, lambda x: f"{x:.3f}")
        lines += [f"#### {backbone}: final {metric.upper()} by viewpoint change of the target view (degrees to the "
                  "nearest reference)", ""]
        lines += _table(["arm"] + bins, rows) + [""]
    return lines


def _attention_section(backbone: str, variants: list[Variant], out: pathlib.Path, fetch) -> tuple[list[str], list[pathlib.Path]]:
    """The engine's last `attention.png` of each arm's lowest seed: where one query of a target view
    attends in the other views, with its true location (green) from depth."""
    lines, paths = [], []
    for i, v in enumerate(variants[:MAX_ATTENTION_FIGURES]):
        run = min(v.runs, key=lambda r: (len(seed_of(r)), seed_of(r)))  # the same seed in every arm when they share one
        steps = [s for s, _ in run.metrics.get(keys.PSNR, [])]
        if not steps:
            continue
        name = f"attention_{backbone.replace('/', '_')}_{i:02d}.png"  # labels hold quotes and braces
        path = fetch(run, f"{keys.figures_folder(max(steps))}/{keys.ATTENTION_FIGURE}", out / name)
        if path is not None:
            lines += [f"**{v.label}** (seed {seed_of(run)}, step {max(steps)})", "", f"![{v.label}]({path.name})", ""]
            paths.append(path)
    if lines:
        lines = [f"#### {backbone}: attention of one target-view query at the supervised layer (final step)", ""] + lines
    return lines, paths


def _speedup_section(report: Report, backbones, present, fractions, out: pathlib.Path, draw: bool) -> list[str]:
    md = ["## Speed-up: iterations to threshold", ""]
    for metric in present:
        for backbone, variants in backbones.items():
            rows = [[v.label, f"{c.n_seeds[0]}/{c.n_seeds[1]}"] + [_speed_cell(c, f) for f in range(len(fractions))]
                    for v in variants if (c := report.of(v, metric))]
            if rows:
                md += [f"### {metric} — {backbone}", ""]
                md += _table(["variant", "seeds b/v"] + [_fraction_name(f) for f in fractions], rows) + [""]
    panels = {b: [(v.label, c) for v in vs if (c := report.of(v, PRIMARY))] for b, vs in backbones.items()}
    panels = {b: rows for b, rows in panels.items() if rows}
    if draw and panels:
        path = plots.speedups(panels, out / "speedup_psnr.png")
        md += [f"![speed-up vs threshold]({path.name})", ""]
        report.files.append(path)
    return md


def _auc_section(report: Report) -> list[str]:
    rows = []
    for (i, metric), c in report.comparisons.items():
        v = report.grouping.variants[i]
        rows.append([v.backbone, v.label, metric, _num(c.auc[0]), _num(c.auc[1]), signed_ci(c.auc[1] - c.auc[0], c.auc_diff_ci),
                     f"{c.steps[-1]:.0f}", signed_ci(c.final_gap, c.final_gap_ci)])
    header = ["backbone", "variant", "metric", "AUC baseline", "AUC variant", "Δ AUC [CI]", "last common step",
              "final gap (variant − baseline) [CI]"]
    return ["## Area under the curve and final gap", ""] + _table(header, rows) + [""]


def _sweep_section(report: Report, backbones, present, fractions) -> list[str]:
    """One row per variant, one column per swept parameter: the layer / lambda / source / head tables."""
    varying = report.grouping.varying
    md = ["## Sweep tables (final values, mean ± std over seeds)", ""]
    if varying:
        md += ["Parameters that vary across the runs: " + ", ".join(f"`{k}`" for k in varying), ""]
    for backbone, variants in backbones.items():
        varying = report.grouping.varying_by_backbone.get(backbone, report.grouping.varying)
        header = ["variant"] + varying + ["seeds"] + list(present) + [f"speed-up {PRIMARY} (final)"]
        verdicts = any(floors.variant_floors(v, PRIMARY) for v in variants)  # runs logged before the floors: none
        header += [f"{PRIMARY} − best floor"] if verdicts else []
        rows = []
        for v in variants:
            finals = ["—" if v.baseline_arm and m.startswith(SUPERVISED) else _mean_std(v.finals(v.key_for(m, v.layer)))
                      for m in present]
            c = report.of(v, PRIMARY)
            speed = _speed_cell(c, len(fractions) - 1) if c and fractions[-1] == 1.0 else "—"
            rows.append([v.label] + [v.params.get(k, "—") for k in varying] + [str(len(v.runs))] + finals + [speed]
                        + ([floors.variant_verdict(v)] if verdicts else []))
        rows += [r + ["—"] * (1 + verdicts)
                 for r in floors.table_rows(variants, present, len(varying) + 1, lambda x: f"{x:.3f}")]
        md += [f"### {backbone}", ""] + _table(header, rows) + [""]
    return md


def _compute_line(runs: list[RunRecord]) -> str:
    """What the runs cost: per-run training time, and the elapsed time from the first start to the
    last end (less than the sum when runs ran side by side). Per run, the training clock
    (`time/train_seconds`, steps only) where logged: a run's start-to-end span also counts its
    evaluations and any pause (a resumed run, one continued to more steps later)."""
    spans = [(r.start_time, r.end_time) for r in runs if r.start_time and r.end_time]
    if not spans:
        return "Compute: run start/end times not recorded."
    clocks = [r.metrics[keys.TRAIN_SECONDS][-1][1] / 60 for r in runs if r.metrics.get(keys.TRAIN_SECONDS)]
    elapsed = (max(e for _, e in spans) - min(s for s, _ in spans)) / 60
    if len(clocks) == len(runs):
        minutes, what = clocks, "min of training (the training clock) median per run"
    else:
        minutes, what = [(e - s) / 60 for s, e in spans], "min median per run (start to end)"
    return (f"Compute: {len(minutes)} runs, {np.median(minutes):.1f} {what} (range {min(minutes):.1f}-"
            f"{max(minutes):.1f}), {sum(minutes):.0f} run-minutes in all, {elapsed:.0f} min from the first start to "
            "the last end (runs side by side).")


def _sources(report: Report, experiment: str, command: str, source: str | None, shas: list[str]) -> dict:
    return {
        "experiment": experiment, "command": command, "source": source, "git_shas": shas,
        "runs": [{"run_id": r.run_id, "name": r.name, "status": r.status, "variant": v.label, "backbone": v.backbone,
                  "seed": seed_of(r), "git_sha": r.tags.get(keys.GIT_SHA, "unknown"), "git_dirty": r.tags.get(keys.GIT_DIRTY),
                  "gin_files": r.params.get(keys.GIN_FILES) or r.tags.get(keys.GIN_FILES),
                  "sweep_trial": r.tags.get(keys.SWEEP_TRIAL), "parent_run_id": r.tags.get(keys.PARENT_RUN_ID)}
                 for v in report.grouping.variants for r in v.runs],
        "left_out": [{"run_id": r.run_id, "name": r.name, "reason": why} for r, why in report.skipped],
    }


METHOD = ("Method: curves are averaged over seeds on their common evaluation steps. The speed-up at a threshold τ "
          "is iterations(baseline) / iterations(variant) to first reach τ, with linear interpolation between "
          "evaluations; τ is placed a fraction of the way from the baseline's first to its final value ('final' = the "
          "baseline's final value, the paper's \"2x\" definition). Brackets: {n_boot}-resample percentile bootstrap "
          "95% CI over seeds (paired when both arms ran the same seeds; — with one seed). n.r. = not reached by the "
          "last common step. AUC = area under the mean curve divided by the step range.")


def build_report(runs: list[RunRecord], out_dir: str | pathlib.Path, *, experiment: str, command: str | None = None,
                 metrics=DEFAULT_METRICS, fractions=DEFAULT_FRACTIONS, n_boot: int = 2000, seed: int = 0,
                 statuses=("FINISHED",), source: str | None = None, draw: bool = True, fetch=None,
                 x: str = "steps") -> Report:
    """Compute every comparison and write the report folder (`draw=False`: tables only, no PNGs).
    `source` names where the runs came from. `fetch(run, artifact_path, dst) -> path | None` copies a
    run's logged figure (attention maps); without it the report has no attention section. `x`: the
    curves' axis, `steps`, `flops` or `seconds` (`report.xaxis`); speed-ups are ratios in that unit."""
    out = pathlib.Path(out_dir)
    kept, skipped = _usable(runs, statuses, current_trials(runs, fetch) if fetch is not None else None)
    if not kept:
        raise ValueError(f"experiment {experiment!r}: no run with status in {list(statuses)} has evaluation metrics "
                         f"({len(runs)} runs found: {sorted({r.status for r in runs})})")
    out.mkdir(parents=True, exist_ok=True)
    for pattern in FIGURES:  # figures of an earlier build that this one may not redraw
        for stale in out.glob(pattern):
            stale.unlink()
    grouping = group_runs(kept)
    rescale = xaxis.rescaler(x)
    for v in grouping.variants:
        v.rescale = rescale
    backbones: dict[str, list[Variant]] = {}
    for v in grouping.variants:
        backbones.setdefault(v.backbone, []).append(v)
    present = [m for m in metrics if any(v.curves(m) for v in grouping.variants)]
    comparisons: dict[tuple[int, str], Comparison] = {}
    for i, v in enumerate(grouping.variants):
        if v.baseline_arm or v.baseline is None:
            continue
        for metric in present:
            mine, theirs = v.curves(metric), v.baseline.curves(v.baseline.key_for(metric, v.layer))
            if mine and theirs:
                comparisons[i, metric] = compare(theirs, mine, metric=metric, base_seeds=v.baseline.seeds,
                                                 variant_seeds=v.seeds, fractions=fractions, n_boot=n_boot, seed=seed)
    report = Report(out, grouping, comparisons, skipped=skipped)
    command = command or f"cameo-bench report --experiment {experiment}"
    shas = sorted({r.tags.get(keys.GIT_SHA, "unknown") for r in kept})
    md = [f"# Convergence report: {experiment}", "", f"Regenerate with `{command}`", "",
          f"Built {datetime.datetime.now().isoformat(timespec='seconds')} from {len(kept)} runs of MLflow experiment "
          f"`{experiment}`" + (f" ({source})" if source else "")
          + f"; git SHA(s): {', '.join(f'`{s[:12]}`' for s in shas)}. Run ids and gin files: `sources.json`.", "",
          _compute_line(kept), "", METHOD.format(n_boot=n_boot), ""]
    if x != "steps":
        md += [f"**x axis: {xaxis.LABELS[x]}.** Every 'step', 'iterations' and 'last common step' below is in "
               f"{xaxis.UNITS[x]}: a speed-up is the ratio of {xaxis.UNITS[x]} to the threshold, so the extra cost "
               "of a CAMEO step counts against it.", ""]
    if grouping.unmatched:
        md += ["**No baseline found for:** " + "; ".join(f"{v.backbone} {v.label}" for v in grouping.unmatched), ""]
    md += ["## Variants", ""]
    md += _table(["backbone", "variant", "seeds", "runs", "baseline"],
                 [[v.backbone, v.label, ", ".join(v.seeds), ", ".join(r.run_id[:8] for r in v.runs),
                   "—" if v.baseline_arm else (v.baseline.label if v.baseline else "**none**")]
                  for v in grouping.variants]) + [""]
    md += floors.section(backbones)
    md += ["## Convergence", ""]
    for metric in present:
        lines, path = _convergence_section(backbones, metric, out, draw, x)
        md += [f"### {metric}", ""] + lines
        report.files += [path] if path else []
    md += architectures.section(backbones, PRIMARY)
    md += _speedup_section(report, backbones, present, fractions, out, draw)
    md += _auc_section(report)
    md += _sweep_section(report, backbones, present, fractions)
    md += emergence.section(backbones, report.of, PRIMARY)
    md += ["## Attention-correspondence profile", ""]
    for backbone, variants in backbones.items():
        lines, paths = _profile_section(backbone, variants, out, draw)
        md += lines + _quality_by_bin_section(backbone, variants)
        report.files += paths
    if fetch is not None and draw:
        sections = [_attention_section(b, vs, out, fetch) for b, vs in backbones.items()]
        if any(lines for lines, _ in sections):
            md += ["## Attention visualisation", ""]
            for lines, paths in sections:
                md += lines
                report.files += paths
    if skipped:
        md += ["## Runs left out", ""]
        md += _table(["run", "name", "reason"], [[r.run_id, r.name, why] for r, why in skipped]) + [""]
    (out / "report.md").write_text("\n".join(md))
    (out / "sources.json").write_text(json.dumps(_sources(report, experiment, command, source, shas), indent=1))
    report.files += [out / "report.md", out / "sources.json"]
    return report
