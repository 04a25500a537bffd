"""A sweep's bookkeeping in MLflow: its parent run, and its trials' runs found again, failed or ended.

A sweep is one experiment with a parent run and one child run per trial, found again by tags
(`sweep.name`, `sweep.role`, `sweep.trial`) so that starting a sweep twice resumes it.
"""
from __future__ import annotations

from typing import Any

from mlflow.tracking import MlflowClient

from cameo_bench.tracking import keys
from cameo_bench.tracking.mlflow_writer import MAX_TAG_CHARS, default_tracking_uri, get_or_create_experiment, git_tags


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
    all_tags = {keys.RUN_NAME: run_name, **git_tags(), **tags}
    return client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id


def create_failed_run(experiment: str, run_name: str, tags: dict[str, str], error: str,
                      parent_run_id: str | None = None, uri: str | None = None) -> str:
    """Record a trial that died before it could open its own run (e.g. its worker crashed)."""
    client = MlflowClient(tracking_uri=uri or default_tracking_uri())
    all_tags = {keys.RUN_NAME: run_name, **tags}
    if parent_run_id:
        all_tags[keys.PARENT_RUN_ID] = parent_run_id
    run_id = client.create_run(get_or_create_experiment(experiment, uri), run_name=run_name, tags=all_tags).info.run_id
    end_run(run_id, "FAILED", error, uri)
    return run_id


def end_run(run_id: str, status: str, error: str | None = None, uri: str | None = None) -> None:
    """Mark a run terminated from outside its process (the sweep's parent, or a crashed trial)."""
    client = MlflowClient(tracking_uri=uri or default_tracking_uri())
    if error:
        client.set_tag(run_id, keys.ERROR, error[:MAX_TAG_CHARS])
    client.set_terminated(run_id, status=status)


def clear_error(run_id: str, uri: str | None = None) -> None:
    """Drop the `error` tag of a run that is being restarted, so a later success carries no stale error."""
    client = MlflowClient(tracking_uri=uri or default_tracking_uri())
    if keys.ERROR in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, keys.ERROR)


def log_run_text(run_id: str, text: str, name: str, uri: str | None = None) -> None:
    """A text artifact on a run this process holds no tracker for (the sweep file on the parent)."""
    MlflowClient(tracking_uri=uri or default_tracking_uri()).log_text(run_id, text, name)
