"""A finished run found again by its configuration, and copied into another experiment.

Why: studies overlap. The backbones study's DiT arms are the loss study's baseline, λ 0.05 and
λ 0.5, and the viewpoint and source studies contain them again. Training is deterministic for a
configuration (same seed and code: the loss study's baseline reproduced the backbones study's to the
last bit of every metric), so training it again buys nothing but hours. A sweep that names
experiments in `sweep.reuse_from` copies such a run in instead of training it: params, tags, every
metric's full history, the artifacts and the source's start and end times (so compute spans stay
true). The copy carries `reused_from` (the source run; the original one if the source was itself
a copy) and keeps the source's git tags, which say the code that produced it.

A configuration is the run's logged params except the run folder's name and location (and
whether it drew a progress bar): equal
params, equal training. Runs whose param sets differ at all (a newer version that logs one more
setting) never match, and params name files (an init checkpoint, a dataset) by path, so a run
that started before those files last changed is no source either: reuse errs towards training.
"""
from __future__ import annotations

import tempfile
from typing import Any, Iterable, Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from cameo_bench.tracking import keys
from cameo_bench.tracking.mlflow_writer import MAX_PARAM_CHARS, MAX_TAG_CHARS, default_tracking_uri, log_in_batches

IGNORED_PARAMS = keys.PLACEMENT_PARAMS
# tags that place a run in its own sweep and experiment: the copy gets its own
_PLACEMENT_TAGS = (keys.RUN_NAME, keys.PARENT_RUN_ID, "mlflow.rootRunId", keys.SWEEP_NAME, keys.SWEEP_ROLE,
                   keys.SWEEP_TRIAL, keys.SWEEP_LABEL, keys.ERROR, keys.REUSED_FROM, keys.REUSED_FROM_EXPERIMENT)


def _configuration(params: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in params.items() if key not in IGNORED_PARAMS}


def find_equivalent(experiments: Iterable[str], params: dict[str, str], uri: str | None = None, *,
                    started_after_ms: int = 0, extendable: str | None = None,
                    defaults: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """A FINISHED run of `experiments` whose logged params equal `params` (but for the run folder's
    name and place) and that started after `started_after_ms` (when the files it read by path last
    changed): `{run_id, experiment, tags, params, extends: False}`, the newest such run; or None.

    With `extendable` (a param holding an int: the step count), when no run is equal, the run equal
    in everything but a smaller `extendable` (the longest one) with `extends: True`: a run that a
    caller may continue, not copy. Unknown experiments are skipped.

    `defaults`: the value each knob has by default, as it would be logged. A run logged before a
    knob existed lacks its param; it counts as having the default, since a knob is added with a
    default that keeps the behaviour it had before (tests/test_engine_reference.py replays runs
    of older commits to hold the engine to it)."""
    client = MlflowClient(tracking_uri=uri or default_tracking_uri())
    wanted = _configuration({key: str(value)[:MAX_PARAM_CHARS] for key, value in params.items()})
    implied = {key: str(value)[:MAX_PARAM_CHARS] for key, value in (defaults or {}).items() if key in wanted}
    exact, shorter = None, []
    for name in experiments:
        found = client.get_experiment_by_name(name)
        if found is None:
            continue
        token = None
        while True:
            page = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'", max_results=1000,
                                      order_by=["attributes.start_time DESC"], page_token=token)
            for run in page:
                if run.info.start_time <= started_after_ms:
                    continue
                have = _configuration({**implied, **run.data.params})
                hit = {"run_id": run.info.run_id, "experiment": name, "tags": dict(run.data.tags),
                       "params": dict(run.data.params), "extends": False}
                if have == wanted:
                    exact = exact or hit
                elif extendable and _shorter(have, wanted, extendable):
                    shorter.append((int(have[extendable]), hit))
            token = page.token
            if not token:
                break
        if exact:
            return exact
    if shorter:
        return {**max(shorter, key=lambda item: item[0])[1], "extends": True}
    return None


def _shorter(have: dict[str, str], wanted: dict[str, str], key: str) -> bool:
    """`have` equals `wanted` but for a smaller int `key`."""
    if have.keys() != wanted.keys() or key not in have:
        return False
    try:
        if not 0 < int(have[key]) < int(wanted[key]):
            return False
    except ValueError:
        return False
    return all(have[k] == wanted[k] for k in have if k != key)


def copy_run(source_id: str, experiment_id: str, run_name: str, *, params: dict[str, str], tags: dict[str, str],
             source_experiment: str, uri: str | None = None, finish: bool = True) -> str:
    """Copy run `source_id` into `experiment_id` as a FINISHED run named `run_name` with `params`
    (the source's, re-placed) and the source's tags overlaid by `tags`; returns the new run id.
    `finish=False` leaves the copy RUNNING, for a training that continues it. A copy that fails
    half way is marked FAILED (a retry copies afresh) and the error is raised."""
    client = MlflowClient(tracking_uri=uri or default_tracking_uri())
    source = client.get_run(source_id)
    original = source.data.tags.get(keys.REUSED_FROM, source_id)
    all_tags = {key: value for key, value in source.data.tags.items() if key not in _PLACEMENT_TAGS}
    all_tags.update({keys.RUN_NAME: run_name, keys.REUSED_FROM: original,
                     keys.REUSED_FROM_EXPERIMENT: source.data.tags.get(keys.REUSED_FROM_EXPERIMENT, source_experiment),
                     **tags})
    run_id = client.create_run(experiment_id, start_time=source.info.start_time, run_name=run_name).info.run_id
    try:
        log_in_batches(
            client, run_id, tags=[RunTag(key, str(value)[:MAX_TAG_CHARS]) for key, value in all_tags.items()],
            params=[Param(key, str(value)[:MAX_PARAM_CHARS]) for key, value in params.items()],
            metrics=[Metric(m.key, m.value, m.timestamp, m.step)
                     for key in source.data.metrics for m in client.get_metric_history(source_id, key)])
        with tempfile.TemporaryDirectory() as tmp:
            if client.list_artifacts(source_id):
                client.log_artifacts(run_id, client.download_artifacts(source_id, "", tmp))
    except BaseException as err:
        client.set_tag(run_id, keys.ERROR, f"copy of run {source_id} failed: {type(err).__name__}: {err}"[:MAX_TAG_CHARS])
        client.set_terminated(run_id, status="FAILED")
        raise
    if finish:
        client.set_terminated(run_id, status="FINISHED", end_time=source.info.end_time)
    return run_id


def final_eval_metrics(run_id: str, uri: str | None = None) -> dict[str, float]:
    """The latest value of every `eval/` metric of a run (what a trial returns after training)."""
    from cameo_bench.tracking.key_escape import from_mlflow_key

    client = MlflowClient(tracking_uri=uri or default_tracking_uri())
    metrics = client.get_run(run_id).data.metrics
    return {from_mlflow_key(key): value for key, value in metrics.items() if from_mlflow_key(key).startswith(keys.EVAL)}
