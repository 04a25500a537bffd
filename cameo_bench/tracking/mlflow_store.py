"""MLflow tracking: the only module that imports mlflow.

Metrics are buffered and sent with `log_batch` (one `log_metric` per value costs ~25 ms on sqlite),
flushed at evaluation, at checkpoints and on exit, including on error. A run that dies is marked
FAILED with the error text as a tag, and a resumed training run continues the same MLflow run
(its id is kept in the run folder).
"""
from __future__ import annotations

import os
import pathlib
import platform
import re
import socket
import subprocess
import sys
import time
from importlib import metadata
from typing import Any
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
RUN_ID_FILE = "mlflow_run_id"
PACKAGES = ("torch", "diffusers", "timm", "gin-config", "mlflow", "mlflow-skinny", "torchmetrics", "cameo_bench")
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
MAX_TAG_CHARS = 5000  # MLflow 3 accepts 8000; the rest of a long traceback goes to an artifact


def default_tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else a sqlite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{pathlib.Path.cwd() / 'mlflow.db'}"


def sqlite_path(uri: str) -> pathlib.Path | None:
    """The database file of a `sqlite:///` URI (relative paths are relative to the working
    directory, as SQLAlchemy reads them), None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else pathlib.Path(path).absolute()


def default_artifact_root(uri: str | None = None) -> str | None:
    """`mlruns/` next to a sqlite database (so a store moved or opened from another directory
    keeps its artifacts), None for a server or a database server, whose own default applies."""
    uri = uri or default_tracking_uri()
    db = sqlite_path(uri)
    if db is not None:
        return (db.parent / "mlruns").as_uri()
    scheme = urlparse(uri).scheme
    return None if scheme else (pathlib.Path.cwd() / "mlruns").as_uri()


def ensure_store(uri: str | None = None) -> str:
    """Create the tracking database once, before any worker starts (concurrent first-time
    creation of a sqlite store crashes workers: the schema migrations race)."""
    uri = uri or default_tracking_uri()
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    client.search_experiments(max_results=1)
    return uri


def get_or_create_experiment(name: str, uri: str | None = None) -> str:
    uri = uri or default_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    root = default_artifact_root(uri)
    # the folder name is only for people browsing mlruns/: runs inside it have unique ids
    location = f"{root}/{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}" if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # another worker created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def git_tags(repo: pathlib.Path | None = None) -> dict[str, str]:
    repo = repo or pathlib.Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip() != ""
    except (OSError, subprocess.CalledProcessError):
        return {"git.sha": "unknown", "git.dirty": "unknown"}
    return {"git.sha": sha, "git.dirty": str(dirty).lower()}


def environment_tags(device: str = "cpu") -> dict[str, str]:
    tags = {"host": socket.gethostname(), "python": platform.python_version(), "device": device}
    for package in PACKAGES:
        try:
            tags[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return tags


class MlflowTracker:
    """Same calls as `cameo_bench.run_log.RunLog`, mirrored to one MLflow run.

    Metrics wait in memory and go out in one `log_batch` per flush: every `flush_every` values,
    whenever an `eval/` metric arrives (an evaluation is a point worth keeping at once), at each
    checkpoint (the trainer calls `flush`) and in `finish`. With `resume=True` the run id kept in
    `run_dir` is reused, so a resumed training run continues the same MLflow run.
    """

    def __init__(self, experiment: str, run_name: str, *, run_dir: str | os.PathLike | None = None,
                 uri: str | None = None, parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 resume: bool = False, flush_every: int = 200, flush_on: tuple[str, ...] = ("eval/",)):
        self.uri = ensure_store(uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_dir = pathlib.Path(run_dir) if run_dir else None
        self.flush_every = flush_every
        self.flush_on = flush_on
        self._metrics: list[Metric] = []
        self._params_logged: set[str] = set()
        self.resumed = False
        existing = self._existing_run_id() if resume else None
        if existing and self._in_store(existing):
            self.run_id = existing
            self.resumed = True
            self.client.update_run(existing, status="RUNNING")
            if tags:
                self.set_tags(tags)
        else:
            if existing:
                print(f"warning: run {existing} named in {self.run_dir / RUN_ID_FILE} is not in {self.uri}; "
                      f"starting a new MLflow run", file=sys.stderr)
            experiment_id = get_or_create_experiment(experiment, self.uri)
            all_tags = {"mlflow.runName": run_name, **git_tags(), **(tags or {})}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            all_tags = {k: str(v)[:MAX_TAG_CHARS] for k, v in all_tags.items()}
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
            if self.run_dir:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / RUN_ID_FILE).write_text(self.run_id)

    def _existing_run_id(self) -> str | None:
        path = self.run_dir / RUN_ID_FILE if self.run_dir else None
        return path.read_text().strip() if path and path.exists() else None

    def _in_store(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except mlflow.exceptions.MlflowException:
            return False

    def set_tags(self, tags: dict[str, Any]) -> None:
        now = [RunTag(k, str(v)[:MAX_TAG_CHARS]) for k, v in tags.items()]
        for start in range(0, len(now), 100):  # LogBatch takes at most 100 tags
            self.client.log_batch(self.run_id, tags=now[start:start + 100])

    def log_params(self, params: dict[str, Any]) -> None:
        """MLflow params are immutable: keys the run already has (e.g. on resume) are not resent;
        a resumed run whose value changed keeps the old one and says so."""
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in self._params_logged]
        if not new:
            return
        if self.resumed:
            logged = self.client.get_run(self.run_id).data.params
            changed = sorted(p.key for p in new if p.key in logged and logged[p.key] != p.value)
            if changed:
                print(f"warning: MLflow params are immutable; run {self.run_id} keeps its logged values of "
                      f"{changed}", file=sys.stderr)
            new = [p for p in new if p.key not in logged]
        for start in range(0, len(new), 100):  # LogBatch takes at most 100 params
            self.client.log_batch(self.run_id, params=new[start:start + 100])
        self._params_logged.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        stamp = int(time.time() * 1000)
        self._metrics += [Metric(to_mlflow_key(k), float(v), stamp, int(step)) for k, v in metrics.items()]
        if len(self._metrics) >= self.flush_every or any(k.startswith(self.flush_on) for k in metrics):
            self.flush()

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_artifact(self, path: str | os.PathLike, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def flush(self) -> None:
        while self._metrics:
            chunk = self._metrics[:MAX_BATCH]
            self.client.log_batch(self.run_id, metrics=chunk)
            del self._metrics[:len(chunk)]  # only once stored: a failed flush keeps them for the next

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        """Flush and mark the run terminated. A flush that fails turns the run FAILED; its error is
        raised after the run is marked, unless the run was already ending with an error of its own
        (which the caller is about to raise)."""
        requested, status = status, status.upper()
        failing = error is not None or status != "FINISHED"
        if status not in TERMINAL_STATUSES:
            error = f"{error or ''} (unknown run status {requested!r})".strip()
            status = "FAILED"
        flush_error = None
        try:
            self.flush()
        except Exception as err:  # noqa: BLE001 - the run must still be marked terminated
            flush_error = err
            status = "FAILED"
            error = "; ".join(e for e in (error, f"metrics not stored: {type(err).__name__}: {err}") if e)
        if error:
            self.set_tags({"error": error})
        self.client.set_terminated(self.run_id, status=status)
        if flush_error is not None and not failing:
            raise flush_error


# --- reading runs (used by cameo_bench.report) ----------------------------------------------
# Plain dataclasses, so that the report is written and tested against data, not against mlflow.

from dataclasses import dataclass, field  # noqa: E402

# MLflow accepts only `[/\w.\- :]` in metric names, but the engine's names use "@" and "+"
# (`attn/<layer>/pck@1/90+`). Escape on the way in, unescape on the way out, so that everything
# outside this module sees the engine's names.
_KEY_ESCAPES = (("@", "_at_"), ("+", "_plus"))


def to_mlflow_key(key: str) -> str:
    for raw, escaped in _KEY_ESCAPES:
        key = key.replace(raw, escaped)
    return key


def from_mlflow_key(key: str) -> str:
    for raw, escaped in reversed(_KEY_ESCAPES):
        key = key.replace(escaped, raw)
    return key


@dataclass
class RunRecord:
    """One MLflow run as plain data: params and tags are strings, as MLflow stores them;
    `metrics` maps a key to its history `[(step, value), ...]` sorted by step (the last value
    logged at a step wins, as in a resumed run that re-evaluates a step)."""

    run_id: str
    name: str
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    status: str = "FINISHED"
    start_time: float | None = None  # seconds since the epoch (MLflow stores milliseconds)
    end_time: float | None = None


def load_runs(experiment_name: str, uri: str | None = None,
              metric_prefixes: tuple[str, ...] = ("eval/", "attn/")) -> list[RunRecord]:
    """Every active run of an experiment with the full history of the metrics whose key starts
    with one of `metric_prefixes` (histories cost one query per key and run: fetch what a
    report reads, not every `train/*` scalar)."""
    client = MlflowClient(tracking_uri=uri or default_tracking_uri())
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments(max_results=1000))
        raise KeyError(f"no MLflow experiment named {experiment_name!r} at {client.tracking_uri}; found: {names}")
    runs, token = [], None
    while True:
        page = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"],
                                  max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    records = []
    for run in runs:
        histories = {}
        for key in sorted(run.data.metrics):
            if key.startswith(metric_prefixes):
                by_step = {}
                for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp)):
                    by_step[int(m.step)] = float(m.value)
                histories[from_mlflow_key(key)] = sorted(by_step.items())
        records.append(RunRecord(run_id=run.info.run_id, name=run.info.run_name or run.info.run_id,
                                 params=dict(run.data.params), tags=dict(run.data.tags), metrics=histories,
                                 status=run.info.status,
                                 start_time=run.info.start_time / 1000 if run.info.start_time else None,
                                 end_time=run.info.end_time / 1000 if run.info.end_time else None))
    return records


def fetch_artifact(run_id: str, artifact_path: str, dst: str | pathlib.Path, uri: str | None = None) -> pathlib.Path | None:
    """Copy one logged file of a run to `dst` (a file path); None when the run did not log it
    (figures are best effort: a run may have been drawn without them)."""
    import shutil
    import tempfile

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


# --- sweep support ---
# A sweep is one experiment with a parent run and one child run per trial, found again by tags
# (`sweep.name`, `sweep.role`, `sweep.trial`) so that starting a sweep twice resumes it.

TERMINAL = ("FINISHED", "FAILED", "KILLED")


def _tag_filter(tags: dict[str, str]) -> str:
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())


def find_runs(experiment: str, tags: dict[str, str], uri: str | None = None) -> list[dict[str, Any]]:
    """Runs of `experiment` carrying all `tags`, newest first: `{run_id, status, tags}` each."""
    client = MlflowClient(tracking_uri=uri or default_tracking_uri())
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], _tag_filter(tags), max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs += [{"run_id": r.info.run_id, "status": r.info.status, "tags": dict(r.data.tags)} for r in page]
        token = page.token
        if not token:
            return runs


def start_parent_run(experiment: str, run_name: str, tags: dict[str, str], uri: str | None = None) -> str:
    """The newest run of `experiment` with `tags`, set RUNNING again, or a new one."""
    client = MlflowClient(tracking_uri=uri or default_tracking_uri())
    existing = find_runs(experiment, tags, uri)
    if existing:
        run_id = existing[0]["run_id"]
        client.update_run(run_id, status="RUNNING")
        return run_id
    experiment_id = get_or_create_experiment(experiment, uri)
    all_tags = {"mlflow.runName": run_name, **git_tags(), **tags}
    return client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id


def create_failed_run(experiment: str, run_name: str, tags: dict[str, str], error: str,
                      parent_run_id: str | None = None, uri: str | None = None) -> str:
    """Record a trial that died before it could open its own run (e.g. its worker crashed)."""
    client = MlflowClient(tracking_uri=uri or default_tracking_uri())
    all_tags = {"mlflow.runName": run_name, **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run_id = client.create_run(get_or_create_experiment(experiment, uri), run_name=run_name, tags=all_tags).info.run_id
    end_run(run_id, "FAILED", error, uri)
    return run_id


def end_run(run_id: str, status: str, error: str | None = None, uri: str | None = None) -> None:
    client = MlflowClient(tracking_uri=uri or default_tracking_uri())
    if error:
        client.set_tag(run_id, "error", error[:MAX_TAG_CHARS])
    client.set_terminated(run_id, status=status)


def clear_error(run_id: str, uri: str | None = None) -> None:
    """Drop the `error` tag of a run that is being restarted, so a later success carries no stale error."""
    client = MlflowClient(tracking_uri=uri or default_tracking_uri())
    if "error" in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, "error")


def log_run_text(run_id: str, text: str, name: str, uri: str | None = None) -> None:
    MlflowClient(tracking_uri=uri or default_tracking_uri()).log_text(run_id, text, name)
