"""The two markdown pieces every report section writes: a pipe table and a mean ± std cell.

Their own module so that sections kept outside build.py (architectures) write the same cells as
the ones inside it without importing the builder that imports them."""
from __future__ import annotations

import numpy as np


def mean_std(values: list[float]) -> str:
    """Mean ± sample std (ddof 1) of the seeds' values; the mean alone for one; — for none."""
    if not values:
        return "—"
    return f"{np.mean(values):.3f}" + (f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else "")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
