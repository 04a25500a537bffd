"""Tracking: what a run records, where, under which names; the package's names resolve lazily.

Every logged name (`keys`), the run folder's log (`run_log`), MLflow writing, reading and sweep
bookkeeping (`mlflow_writer`, `mlflow_reader`, `sweep_runs`, `run_copy`, `run_archive`: the only mlflow importers, with
`key_escape` for MLflow's spelling of metric names), run labels (`labels`) and the UI launcher (`ui`).

Names resolve lazily so that reading a run folder, or importing `keys` or `labels`, does not import mlflow.
"""
from __future__ import annotations

from cameo_bench.lazy import exports

# submodule -> the names it provides; each submodule is imported on first use of one of its names
_EXPORTS = {
    'mlflow_writer': ('default_tracking_uri', 'sqlite_path', 'default_artifact_root', 'ensure_store',
                      'get_or_create_experiment', 'git_tags', 'environment_tags', 'MlflowTracker',
                      'TERMINAL_STATUSES', 'RUN_ID_FILE', 'MAX_BATCH', 'PACKAGES', 'MAX_TAG_CHARS'),
    'key_escape': ('to_mlflow_key', 'from_mlflow_key'),
    'mlflow_reader': ('RunRecord', 'load_runs', 'fetch_artifact'),
    'sweep_runs': ('find_runs', 'start_parent_run', 'create_failed_run', 'end_run', 'clear_error', 'log_run_text'),
    'run_copy': ('find_equivalent', 'copy_run', 'final_eval_metrics'),
    'run_archive': ('Archive', 'export_experiment', 'read_archive', 'import_archive'),
    'labels': ('run_label',),
    'run_log': ('RunLog', 'read_metrics'),
}
__getattr__ = exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
