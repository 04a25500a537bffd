"""The markdown pieces every report section writes: a pipe table, a mean ± std cell and a signed
difference with its CI.

Their own module so that sections kept outside build.py (architectures) write the same cells as
the ones inside it without importing the builder that imports them."""
from __future__ import annotations

import math

import numpy as np


def mean_std(values: list[float]) -> str:
    """Mean ± sample std (ddof 1) of the seeds' values; the mean alone for one; — for none."""
    if not values:
        return "—"
    return f"{np.mean(values):.3f}" + (f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else "")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def signed_ci(point: float, ci: tuple[float, float], digits: int = 3) -> str:
    """A difference with its interval, `+0.690 [+0.681, +0.700]`; the point alone when the CI is NaN (one seed)."""
    return f"{point:+.{digits}f}" + ("" if math.isnan(ci[0]) else f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]")
