"""Tracking: the run folder's log (`run_log`), MLflow (the only mlflow importers) and the UI launcher.
Names resolve lazily so that reading a run folder does not import mlflow.
"""
from __future__ import annotations

import importlib

# name -> submodule: imported on first use, so importing one part does not load the others
_EXPORTS = {
    'default_tracking_uri': 'mlflow_store',
    'sqlite_path': 'mlflow_store',
    'default_artifact_root': 'mlflow_store',
    'ensure_store': 'mlflow_store',
    'get_or_create_experiment': 'mlflow_store',
    'git_tags': 'mlflow_store',
    'environment_tags': 'mlflow_store',
    'MlflowTracker': 'mlflow_store',
    'to_mlflow_key': 'mlflow_store',
    'from_mlflow_key': 'mlflow_store',
    'RunRecord': 'mlflow_store',
    'load_runs': 'mlflow_store',
    'fetch_artifact': 'mlflow_store',
    'TERMINAL': 'mlflow_store',
    'TERMINAL_STATUSES': 'mlflow_store',
    'find_runs': 'mlflow_store',
    'start_parent_run': 'mlflow_store',
    'create_failed_run': 'mlflow_store',
    'end_run': 'mlflow_store',
    'clear_error': 'mlflow_store',
    'log_run_text': 'mlflow_store',
    'RUN_ID_FILE': 'mlflow_store',
    'MAX_BATCH': 'mlflow_store',
    'PACKAGES': 'mlflow_store',
    'MAX_TAG_CHARS': 'mlflow_store',
    'RunLog': 'run_log',
    'read_metrics': 'run_log',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
