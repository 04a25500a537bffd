"""Reading runs back from an MLflow store as plain data (`RunRecord`), for the report.

The report is written and tested against these dataclasses, not against mlflow, so its numbers
can be checked without a store; this module is the one place that turns a store into them.
"""
from __future__ import annotations

import pathlib
import shutil
import tempfile
from dataclasses import dataclass, field

from mlflow.tracking import MlflowClient

from cameo_bench.tracking import keys
from cameo_bench.tracking.key_escape import from_mlflow_key
from cameo_bench.tracking.mlflow_writer import default_tracking_uri


@dataclass
class RunRecord:
    """One MLflow run as plain data: params and tags are strings, as MLflow stores them;
    `metrics` maps a key (its current name) to its history `[(step, value), ...]` sorted by step (the last value
    logged at a step wins, as in a resumed run that re-evaluates a step)."""

    run_id: str
    name: str
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    status: str = "FINISHED"
    start_time: float | None = None  # seconds since the epoch (MLflow stores milliseconds)
    end_time: float | None = None

    def __post_init__(self):
        """Metrics go by their current names (`keys.current_name`), so a run logged before a
        rename (`attn/<layer>/...`) is read like one logged today."""
        self.metrics = {keys.current_name(k): h for k, h in self.metrics.items()}


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of an existing experiment; KeyError naming the ones there are."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments(max_results=1000))
        raise KeyError(f"no MLflow experiment named {name!r} at {client.tracking_uri}; found: {names}")
    return experiment.experiment_id


def all_runs(client: MlflowClient, experiment_id: str) -> list:
    """Every active run of an experiment, oldest first (all pages of `search_runs`)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"], max_results=1000,
                                  page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def metric_history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float, int]]:
    """`[(step, value, timestamp), ...]` of one metric (its MLflow key), sorted by step; of several
    values logged at one step the last one (a resumed run re-evaluating a step) counts."""
    by_step: dict[int, tuple[float, int]] = {}
    for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
        by_step[int(m.step)] = (float(m.value), int(m.timestamp))
    return [(step, value, stamp) for step, (value, stamp) in sorted(by_step.items())]


def load_runs(experiment_name: str, uri: str | None = None,
              metric_prefixes: tuple[str, ...] = (keys.EVAL, keys.ATTN)) -> list[RunRecord]:
    """Every active run of an experiment with the full history of the metrics whose key starts
    with one of `metric_prefixes` (histories cost one query per key and run: fetch what a
    report reads, not every `train/*` scalar)."""
    client = MlflowClient(tracking_uri=uri or default_tracking_uri())
    records = []
    for run in all_runs(client, experiment_id(client, experiment_name)):
        histories = {}
        for key in sorted(run.data.metrics):
            name = keys.current_name(from_mlflow_key(key))  # old stores: `attn/...` reads as today's name
            if name.startswith(metric_prefixes):
                histories[name] = [(step, value) for step, value, _ in metric_history(client, run.info.run_id, key)]
        records.append(RunRecord(run_id=run.info.run_id, name=run.info.run_name or run.info.run_id,
                                 params=dict(run.data.params), tags=dict(run.data.tags), metrics=histories,
                                 status=run.info.status,
                                 start_time=run.info.start_time / 1000 if run.info.start_time else None,
                                 end_time=run.info.end_time / 1000 if run.info.end_time else None))
    return records


def fetch_artifact(run_id: str, artifact_path: str, dst: str | pathlib.Path, uri: str | None = None) -> pathlib.Path | None:
    """Copy one logged file of a run to `dst` (a file path); None when the run did not log it
    (figures are best effort: a run may have been drawn without them)."""
    client = MlflowClient(tracking_uri=uri or default_tracking_uri())
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, artifact_path, tmp)
        except Exception:  # noqa: BLE001 - MLflow raises several types for a missing file
            return None
        dst = pathlib.Path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, dst)
    return dst
