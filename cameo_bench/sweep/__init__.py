"""Sweeps: a grid of trials from one sweep file (`grid`), what a trial returns (`results`), where trials run
(`executors`) and the loop that runs them (`runner`).
"""
from __future__ import annotations

import importlib

# name -> submodule: imported on first use, so importing one part does not load the others
_EXPORTS = {
    'SweepError': 'grid',
    'SweepSpec': 'grid',
    'Trial': 'grid',
    'Plan': 'grid',
    'load': 'grid',
    'validate': 'grid',
    'expand': 'grid',
    'plan': 'grid',
    'describe': 'grid',
    'trial_id': 'grid',
    'resolve_gin_file': 'grid',
    'EXECUTORS': 'grid',
    'REPO': 'grid',
    'TrialResult': 'results',
    'payload': 'runner',
    'run': 'runner',
    'failure_report': 'runner',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
