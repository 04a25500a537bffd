"""Sweeps: a grid of trials from one sweep file (`grid`), what a trial returns (`results`), where trials run
(`executors`), the copy of the code a local pool runs (`code_snapshot`) and the loop that runs them (`runner`).
"""
from __future__ import annotations

from cameo_bench.lazy import exports

# submodule -> the names it provides; each submodule is imported on first use of one of its names
_EXPORTS = {
    'grid': ('SweepError', 'SweepSpec', 'Trial', 'Plan', 'load', 'validate', 'expand', 'plan', 'describe',
             'trial_id', 'resolve_gin_file', 'EXECUTORS', 'REPO'),
    'results': ('TrialResult',),
    'runner': ('payload', 'run', 'failure_report'),
}
__getattr__ = exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
