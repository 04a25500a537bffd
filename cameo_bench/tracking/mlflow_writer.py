"""Writing runs to an MLflow store: where the store is, creating it, provenance tags, `MlflowTracker`.

`MlflowTracker` is the engine's tracker (the calls of `run_log.RunLog`) mirrored to one MLflow run.

Metrics are buffered and sent with `log_batch` (one `log_metric` per value costs ~25 ms on sqlite),
flushed at evaluation, at checkpoints and on exit, including on error. A run that dies is marked
FAILED with the error text as a tag, and a resumed training run continues the same MLflow run
(its id is kept in the run folder).
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import platform
import re
import socket
import subprocess
import sys
import time
from importlib import metadata
from typing import Any, Iterator, Sequence
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from cameo_bench.tracking import keys
from cameo_bench.tracking.key_escape import to_mlflow_key

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
RUN_ID_FILE = keys.RUN_ID_FILE
PACKAGES = ("torch", "diffusers", "timm", "gin-config", "mlflow", "mlflow-skinny", "torchmetrics", "cameo_bench")
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")  # MLflow run statuses after which a run is over
MAX_TAG_CHARS = 5000  # MLflow 3 accepts 8000; the rest of a long traceback goes to an artifact
MAX_PARAM_CHARS = 6000  # the stored part of a param value (a long gin list)
MAX_TAGS_PARAMS = 100  # MLflow's limit of tags, and of params, per log_batch call


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
    """Create the tracking database if it is new. Processes that create one sqlite store at the
    same moment crash: MLflow's schema migrations race (3 of 4 `cameo-bench train` started together
    on a fresh folder failed, every time). A sweep calls this before its workers start; separate
    commands take turns through a lock on the database's folder."""
    uri = uri or default_tracking_uri()
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(db.parent) if db is not None else contextlib.nullcontext():
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    return uri


@contextlib.contextmanager
def _folder_lock(folder: pathlib.Path) -> Iterator[None]:
    """An exclusive lock held on `folder` itself (flock on its descriptor: no lock file is left
    behind); where flock does not exist (Windows), no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def get_or_create_experiment(name: str, uri: str | None = None) -> str:
    """The experiment's id; created with its artifacts under `default_artifact_root` when new
    (several sweep workers may race to create it: the loser reads the winner's)."""
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
    """The commit a run's code came from, and whether tracked files had uncommitted changes."""
    repo = repo or pathlib.Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip() != ""
    except (OSError, subprocess.CalledProcessError):
        return {keys.GIT_SHA: "unknown", keys.GIT_DIRTY: "unknown"}
    return {keys.GIT_SHA: sha, keys.GIT_DIRTY: str(dirty).lower()}


def environment_tags(device: str = "cpu") -> dict[str, str]:
    """Where a run ran and with which package versions, so a result can be traced to its setup."""
    tags = {keys.HOST: socket.gethostname(), keys.PYTHON: platform.python_version(), keys.DEVICE: device}
    for package in PACKAGES:
        try:
            tags[keys.version_tag(package)] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return tags


def log_in_batches(client: MlflowClient, run_id: str, *, tags: Sequence[RunTag] = (), params: Sequence[Param] = (),
                   metrics: Sequence[Metric] = ()) -> None:
    """Log any number of tags, params and metrics in as few `log_batch` calls as MLflow's limits allow."""
    for start in range(0, len(tags), MAX_TAGS_PARAMS):
        client.log_batch(run_id, tags=list(tags[start:start + MAX_TAGS_PARAMS]))
    for start in range(0, len(params), MAX_TAGS_PARAMS):
        client.log_batch(run_id, params=list(params[start:start + MAX_TAGS_PARAMS]))
    for start in range(0, len(metrics), MAX_BATCH):
        client.log_batch(run_id, metrics=list(metrics[start:start + MAX_BATCH]))


class MlflowTracker:
    """Same calls as `cameo_bench.tracking.run_log.RunLog`, mirrored to one MLflow run.

    Metrics wait in memory and go out in one `log_batch` per flush: every `flush_every` values,
    whenever an `eval/` metric arrives (an evaluation is a point worth keeping at once), at each
    checkpoint (the trainer calls `flush`) and in `finish`. With `resume=True` the run id kept in
    `run_dir` is reused, so a resumed training run continues the same MLflow run.
    """

    def __init__(self, experiment: str, run_name: str, *, run_dir: str | os.PathLike | None = None,
                 uri: str | None = None, parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 resume: bool = False, flush_every: int = 200, flush_on: tuple[str, ...] = (keys.EVAL,)):
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
            all_tags = {keys.RUN_NAME: run_name, **git_tags(), **(tags or {})}
            if parent_run_id:
                all_tags[keys.PARENT_RUN_ID] = parent_run_id
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
        """Keys are escaped like metric names: `not_computed.<metric>` tags carry metric names."""
        log_in_batches(self.client, self.run_id,
                       tags=[RunTag(to_mlflow_key(k), str(v)[:MAX_TAG_CHARS]) for k, v in tags.items()])

    def log_params(self, params: dict[str, Any]) -> None:
        """MLflow params are immutable: keys the run already has (e.g. on resume) are not resent;
        a resumed run whose value changed keeps the old one and says so."""
        new = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items() if k not in self._params_logged]
        if not new:
            return
        if self.resumed:
            logged = self.client.get_run(self.run_id).data.params
            changed = sorted(p.key for p in new if p.key in logged and logged[p.key] != p.value)
            if changed:
                print(f"warning: MLflow params are immutable; run {self.run_id} keeps its logged values of "
                      f"{changed}", file=sys.stderr)
            new = [p for p in new if p.key not in logged]
        log_in_batches(self.client, self.run_id, params=new)
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

    def log_figure(self, path: str | os.PathLike, step: int) -> None:
        """A figure (PNG) where the UI compares runs, besides its file under `figures/step_*/`: as an
        MLflow image with key `keys.figure_key(name)` and `step` (the chart view's image-by-step
        cards), and as the latest copy at the artifact root (the compare page shows only root files
        that every compared run has: it said "No common artifacts to display")."""
        from PIL import Image

        with Image.open(path) as image:
            self.client.log_image(self.run_id, image.convert("RGB"), key=keys.figure_key(pathlib.Path(path).name),
                                  step=int(step))
        self.client.log_artifact(self.run_id, str(path))

    def rename(self, name: str) -> None:
        """Set the run's name (the UI's run column) once more is known, e.g. the resolved layer."""
        self.client.update_run(self.run_id, name=name)

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
            self.set_tags({keys.ERROR: error})
        self.client.set_terminated(self.run_id, status=status)
        if flush_error is not None and not failing:
            raise flush_error
