"""Reports: how much faster and better CAMEO is than its baseline, per backbone, from logged runs.

With bootstrap confidence intervals over seeds. `cameo-bench report --experiment NAME` is the front door.

- `curves`: iterations to threshold, normalised AUC, bootstrap (pure numpy, no run structure)
- `runs`: variants (runs that differ only by seed) and their baselines
- `plots`: the PNGs
- `build`: report.md + sources.json from a list of `cameo_bench.tracking.RunRecord`
- `summary`: the quickstart's side-by-side table of a sweep's trials, from their run folders
"""
from cameo_bench.report.build import DEFAULT_METRICS, Report, build_report
from cameo_bench.report.curves import (Comparison, align, compare, crossing_steps, first_crossing,
                                       higher_is_better, normalised_auc)
from cameo_bench.report.runs import Variant, group_runs, is_baseline

__all__ = ["DEFAULT_METRICS", "Report", "build_report", "Comparison", "align", "compare", "crossing_steps",
           "first_crossing", "higher_is_better", "normalised_auc", "Variant", "group_runs", "is_baseline"]
