"""Tracking: what a run records, where, under which names; the package's names resolve lazily.

Every logged name (`keys`), the run folder's log (`run_log`), MLflow writing, reading and sweep
bookkeeping (`mlflow_writer`, `mlflow_reader`, `sweep_runs`: the only mlflow importers, with
`key_escape` for MLflow's spelling of metric names), run labels (`labels`) and the UI launcher (`ui`).

Names resolve lazily so that reading a run folder, or importing `keys` or `labels`, does not import mlflow.
"""
from __future__ import annotations

import importlib

# name -> submodule: imported on first use, so importing one part does not load the others
_EXPORTS = {
    'default_tracking_uri': 'mlflow_writer',
    'sqlite_path': 'mlflow_writer',
    'default_artifact_root': 'mlflow_writer',
    'ensure_store': 'mlflow_writer',
    'get_or_create_experiment': 'mlflow_writer',
    'git_tags': 'mlflow_writer',
    'environment_tags': 'mlflow_writer',
    'MlflowTracker': 'mlflow_writer',
    'TERMINAL_STATUSES': 'mlflow_writer',
    'RUN_ID_FILE': 'mlflow_writer',
    'MAX_BATCH': 'mlflow_writer',
    'PACKAGES': 'mlflow_writer',
    'MAX_TAG_CHARS': 'mlflow_writer',
    'to_mlflow_key': 'key_escape',
    'from_mlflow_key': 'key_escape',
    'RunRecord': 'mlflow_reader',
    'load_runs': 'mlflow_reader',
    'fetch_artifact': 'mlflow_reader',
    'find_runs': 'sweep_runs',
    'start_parent_run': 'sweep_runs',
    'create_failed_run': 'sweep_runs',
    'end_run': 'sweep_runs',
    'clear_error': 'sweep_runs',
    'log_run_text': 'sweep_runs',
    'run_label': 'labels',
    'RunLog': 'run_log',
    'read_metrics': 'run_log',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
