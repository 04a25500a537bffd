"""Is the best layer to supervise the one where correspondence emerges by itself? Issue 13 asks the
layer study to test it: in the pretrain -> fine-tune regime a baseline's layers find corresponding
tokens without supervision (the backbones study: PCK@1 0.83-0.86 in the DiT's middle block and the
UNet's decoder, 0.07-0.21 in its encoder), which the from-scratch models never did.

One table per backbone whose CAMEO variants are supervised at two or more layers: per variant, the
baseline's final PCK@1 at that layer (the emergent correspondence), the variant's own PCK@1 there
and its final PSNR gap to the baseline [CI]; then the layers ordered by each criterion. With the
study's four layers per backbone an ordering is a description; the CIs say which gaps differ.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from cameo_bench.report.curves import Comparison
from cameo_bench.report.markdown import mean_std, signed_ci, table
from cameo_bench.report.runs import SUPERVISED, Variant
from cameo_bench.tracking import keys


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def section(backbones: dict[str, list[Variant]], of: Callable[[Variant, str], Comparison | None],
            metric: str) -> list[str]:
    """`of(variant, metric)`: the variant's comparison with its baseline (`Report.of`)."""
    md = []
    for backbone, variants in backbones.items():
        arms = [v for v in variants if not v.baseline_arm and v.baseline is not None and v.layer]
        if len({v.layer for v in arms}) < 2:
            continue
        rows, points = [], []
        for v in arms:
            emergent = _mean(v.baseline.finals(keys.attn(v.layer, keys.PCK1)))
            supervised = v.finals(SUPERVISED + keys.PCK1) or v.finals(keys.attn(v.layer, keys.PCK1))
            c = of(v, metric)
            gap = signed_ci(c.final_gap, c.final_gap_ci) if c else "—"
            rows.append([v.label, v.layer, "—" if emergent is None else f"{emergent:.3f}", mean_std(supervised), gap])
            if emergent is not None and c is not None:
                points.append((v.layer, emergent, c.final_gap))
        md += [f"### {backbone}", ""]
        md += table(["variant", "supervised layer", "baseline PCK@1 there (emergent)", "variant PCK@1 there",
                     f"final {metric} gap to the baseline [CI]"], rows) + [""]
        if len(points) >= 2:
            by_emergence = [p[0] for p in sorted(points, key=lambda p: -p[1])]
            by_gain = [p[0] for p in sorted(points, key=lambda p: -p[2])]
            verdict = "the same layer" if by_emergence[0] == by_gain[0] else "different layers"
            md += [f"- Layers by emergent PCK@1 (high to low): {', '.join(by_emergence)}",
                   f"- Layers by {metric} gain (high to low): {', '.join(by_gain)}",
                   f"- The most emergent layer and the most helpful one to supervise are **{verdict}**.", ""]
    if not md:
        return []
    return ["## Supervised layer vs emergent correspondence", "",
            "Per CAMEO variant: the baseline's final PCK@1 at the variant's supervised layer (the "
            "correspondence that layer found without supervision), the variant's own, and its final gap to "
            "the baseline (95% bootstrap CI over seeds).", ""] + md
