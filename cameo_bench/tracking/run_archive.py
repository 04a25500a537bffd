"""A study's runs as one file that is committed beside its report, and read back from it.

Why: a study's results live in the MLflow store, a sqlite file that is never committed (it also
holds caches of artifacts and every `train/*` scalar), and a fresh checkout has none. On 2026-12-07
one such checkout lost the viewpoint study's 18 finished trials and half the source study: their
report could no longer be rebuilt, and a rerun could copy nothing. The archive is the results
without the caches: every run of one experiment with its status, times, params, tags and the full
history of each metric (the last value logged at a step, as `load_runs` reads it), and the sweep
parent's trial list (`sweep/trials.json`, which tells the report the trials the sweep file defines).
Other artifacts (model weights, figures) stay out; the report's figures are committed as images.

`cameo-bench report --archive FILE` builds a report from it without a store, and
`cameo-bench archive import FILE` puts its runs back into a store, with their sweep tags, so that
a sweep finds its finished trials again (resume) and other sweeps can copy them (`reuse_from`).
Keys are kept in the engine's spelling (`pck@1`), escaped again on the way back into MLflow.
"""
from __future__ import annotations

import gzip
import json
import pathlib
import tempfile
from typing import Any, NamedTuple

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from cameo_bench.tracking import keys
from cameo_bench.tracking.key_escape import from_mlflow_key, to_mlflow_key
from cameo_bench.tracking.mlflow_reader import RunRecord, all_runs, experiment_id, metric_history
from cameo_bench.tracking.mlflow_writer import (MAX_PARAM_CHARS, MAX_TAG_CHARS, default_tracking_uri,
                                                get_or_create_experiment, log_in_batches)

FORMAT = "cameo_bench.run_archive/1"
ARCHIVED_FROM = "archive.run_id"  # tag of an imported run: the run id it had in the exporting store
_REMAPPED_TAGS = (keys.PARENT_RUN_ID, "mlflow.rootRunId")  # run ids of the exporting store
TEXT_ARTIFACTS = (keys.ARTIFACT_SWEEP_TRIALS,)  # small text artifacts the report reads, kept when present


def export_experiment(experiment: str, path: str | pathlib.Path, uri: str | None = None) -> int:
    """Write every active run of `experiment` to `path` (gzipped JSON; the same store gives the
    same bytes, so a re-export changes the committed file only when a run changed); returns the
    number of runs."""
    client = MlflowClient(tracking_uri=uri or default_tracking_uri())
    entries = []
    for run in all_runs(client, experiment_id(client, experiment)):
        metrics = {from_mlflow_key(key): [list(point) for point in metric_history(client, run.info.run_id, key)]
                   for key in sorted(run.data.metrics)}
        texts = _texts(client, run.info.run_id)
        entries.append({"run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
                        "start_time": run.info.start_time, "end_time": run.info.end_time,
                        "params": dict(sorted(run.data.params.items())),
                        "tags": {from_mlflow_key(k): v for k, v in sorted(run.data.tags.items())},
                        "metrics": metrics, "texts": texts})
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": FORMAT, "experiment": experiment, "runs": entries}, separators=(",", ":"))
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as out:
        out.write(text.encode())
    partial.replace(path)
    return len(entries)


def _texts(client: MlflowClient, run_id: str) -> dict[str, str]:
    texts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for artifact in TEXT_ARTIFACTS:
            try:
                texts[artifact] = pathlib.Path(client.download_artifacts(run_id, artifact, tmp)).read_text()
            except Exception:  # noqa: BLE001 - MLflow raises several types for a missing file
                pass
    return texts


def _read(path: str | pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(path)
    try:
        with gzip.open(path, "rt") as f:
            data = json.load(f)
    except (OSError, EOFError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a run archive (gzipped JSON): {type(err).__name__}: {err}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format') if isinstance(data, dict) else None!r}, "
                         f"expected {FORMAT!r}")
    return data


class Archive(NamedTuple):
    """What a report needs from an archive, read in one pass."""

    experiment: str
    runs: list[RunRecord]  # oldest first, as `load_runs` returns them
    texts: dict[tuple[str, str], str]  # (run id, artifact path) -> the text kept (`TEXT_ARTIFACTS`)


def read_archive(path: str | pathlib.Path) -> Archive:
    data = _read(path)
    records = [RunRecord(run_id=r["run_id"], name=r["name"] or r["run_id"], params=r["params"], tags=r["tags"],
                         metrics={k: [(int(s), float(v)) for s, v, _ in h] for k, h in r["metrics"].items()},
                         status=r["status"],
                         start_time=r["start_time"] / 1000 if r["start_time"] else None,
                         end_time=r["end_time"] / 1000 if r["end_time"] else None)
               for r in data["runs"]]
    texts = {(r["run_id"], name): text for r in data["runs"] for name, text in r.get("texts", {}).items()}
    return Archive(data["experiment"], records, texts)


def import_archive(path: str | pathlib.Path, uri: str | None = None) -> tuple[int, int]:
    """Recreate the archive's runs in the store (its experiment, made if new): (imported, skipped).
    A run already imported (a run of the experiment tagged `archive.run_id` with its id), or still
    in the store it came from, is skipped, so importing twice adds nothing. Parent links are
    rewritten to the new ids; terminal statuses and times are the originals (a run exported
    while RUNNING comes back KILLED: nothing in this store is training it)."""
    uri = uri or default_tracking_uri()
    data = _read(path)
    client = MlflowClient(tracking_uri=uri)
    target = get_or_create_experiment(data["experiment"], uri)
    present = {}
    for run in all_runs(client, target):
        present[run.info.run_id] = run.info.run_id
        if ARCHIVED_FROM in run.data.tags:
            present[run.data.tags[ARCHIVED_FROM]] = run.info.run_id
    new_ids = dict(present)
    # parents before their children, so that a child's parent tag can name the parent's new id
    ordered = sorted(data["runs"], key=lambda r: keys.PARENT_RUN_ID in r["tags"])
    imported = 0
    for entry in ordered:
        if entry["run_id"] in present:
            continue
        tags = {**entry["tags"], ARCHIVED_FROM: entry["run_id"]}
        for key in _REMAPPED_TAGS:
            if key in tags:
                tags[key] = new_ids.get(tags[key], tags[key])
        run_id = client.create_run(target, start_time=entry["start_time"], run_name=entry["name"]).info.run_id
        log_in_batches(
            client, run_id,
            tags=[RunTag(to_mlflow_key(k), str(v)[:MAX_TAG_CHARS]) for k, v in tags.items()],
            params=[Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in entry["params"].items()],
            metrics=[Metric(to_mlflow_key(key), value, stamp, step)
                     for key, history in entry["metrics"].items() for step, value, stamp in history])
        for name, text in entry.get("texts", {}).items():
            client.log_text(run_id, text, name)
        if entry["status"] == "RUNNING":  # its process is not in this store: a sweep trains it again
            client.set_tag(run_id, keys.ERROR, "exported while RUNNING; imported as KILLED")
            client.set_terminated(run_id, status="KILLED")
        else:
            client.set_terminated(run_id, status=entry["status"], end_time=entry["end_time"])
        new_ids[entry["run_id"]] = run_id
        imported += 1
    return imported, len(data["runs"]) - imported
