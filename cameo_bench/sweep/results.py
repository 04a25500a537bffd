"""What a trial returns to the sweep runner: a leaf, so executors and the runner share it without a cycle."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrialResult:
    trial: str
    status: str  # FINISHED | FAILED | KILLED | SKIPPED (finished in an earlier start)
    error: str | None = None
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
