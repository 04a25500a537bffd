"""Runs a sweep's plan: the parent MLflow run, the unfinished trials on an executor, the failure listing.

The executors and the MLflow store are imported only when a sweep runs, so planning and a dry run
load neither torch nor mlflow.
"""
from __future__ import annotations

import json
import pathlib
import time
from typing import Any

from cameo_bench.engine.signals import interrupted
from cameo_bench.sweep import code_snapshot
from cameo_bench.sweep.grid import Plan, Trial
from cameo_bench.sweep.results import TrialResult
from cameo_bench.tracking import keys
from cameo_bench.tracking.labels import label_extras


def payload(p: Plan, trial: Trial, parent_run_id: str | None, uri: str) -> dict[str, Any]:
    """Everything a worker needs, as plain values: the child re-parses gin from it (it never relies
    on state inherited from this process, which spawn and Slurm would not have)."""
    return {
        "trial": trial.id, "label": trial.label, "baseline": trial.baseline,
        "gin_files": list(p.gin_files), "bindings": p.trial_bindings(trial),
        "run_dir": str(p.run_root / trial.id), "sweep": p.spec.name, "experiment": p.spec.experiment_name,
        "parent_run_id": parent_run_id, "tracking_uri": uri,
        "label_extra": label_extras(trial.varied, trial.bindings),  # the run name's parts beyond run_label's
        "reuse_from": list(p.spec.reuse_from),
    }


def run(p: Plan, *, executor: str | None = None, workers: int | None = None, uri: str | None = None,
        slurm: dict[str, Any] | None = None, archive: str | pathlib.Path | None = None,
        echo=print) -> list[TrialResult]:
    """Run every unfinished trial; return one result per trial (finished ones as SKIPPED).
    `archive`: a file that `tracking.export_experiment` rewrites after every trial and at the end,
    so that a study's results are on disk, in a file that is committed, as they come in."""
    from cameo_bench import tracking
    from cameo_bench.sweep import executors as sweep_executors
    spec = p.spec
    executor = executor or spec.executor
    workers = spec.workers if workers is None else workers
    uri = tracking.ensure_store(uri)  # created once, here, before any worker touches it
    tracking.get_or_create_experiment(spec.experiment_name, uri)
    parent = tracking.start_parent_run(spec.experiment_name, f"sweep:{spec.name}",
                                       {keys.SWEEP_NAME: spec.name, keys.SWEEP_ROLE: "parent"}, uri)
    tracking.clear_error(parent, uri)  # a restarted sweep is judged afresh
    tracking.log_run_text(parent, pathlib.Path(spec.path).read_text() if pathlib.Path(spec.path).exists() else "",
                          keys.ARTIFACT_SWEEP_FILE, uri)
    tracking.log_run_text(parent, json.dumps([{"id": t.id, "label": t.label, "baseline": t.baseline,
                                               "bindings": t.binding_strings()} for t in p.trials], indent=1),
                          keys.ARTIFACT_SWEEP_TRIALS, uri)

    finished = {r["tags"].get(keys.SWEEP_TRIAL) for r in tracking.find_runs(
        spec.experiment_name, {keys.SWEEP_NAME: spec.name}, uri) if r["status"] == "FINISHED"}
    todo = [t for t in p.trials if t.id not in finished]
    results = {t.id: TrialResult(t.id, "SKIPPED") for t in p.trials if t.id in finished}
    echo(f"sweep {spec.name!r}: {len(p.trials)} trials, {len(results)} already finished, {len(todo)} to run "
         f"({executor}, {'in-process' if executor == 'local' and workers == 0 else f'{workers} workers'})")

    options = {**spec.slurm, **(slurm or {})}
    if executor == "slurm" and options.get("cluster") in (None, "slurm") and uri.startswith("sqlite"):
        echo(f"warning: trials on other machines will write to the sqlite store {uri}; it must be on a shared "
             f"filesystem, and an MLflow server (MLFLOW_TRACKING_URI=http://...) is safer for many jobs")
    start = time.perf_counter()
    payloads = {t.id: payload(p, t, parent, uri) for t in todo}
    snapshot = None
    if executor == "local" and workers > 0 and todo:
        snapshot = code_snapshot.take(p.run_root / "code", tracking.git_tags())
        echo(f"workers run the code as it is now, copied to {snapshot.root} (edits to the checkout reach "
             f"the next start of the sweep)")
        for item in payloads.values():
            item["code_tags"] = snapshot.tags
    try:
        if executor == "local":
            stream = sweep_executors.run_local(list(payloads.values()), workers, gpus=spec.local_gpus,
                                               code_root=snapshot.root if snapshot else None)
        else:
            stream = sweep_executors.run_submitit(list(payloads.values()), p.run_root / "submitit", options)
        for done, result in enumerate(stream, 1):
            if result.status != "FINISHED":
                sweep_executors.ensure_failed_in_store(result, payloads[result.trial])
            results[result.trial] = result
            echo(f"[{done}/{len(todo)}] {result.trial} {result.status:<8} {result.seconds:6.1f}s  "
                 f"{payloads[result.trial]['label']}" + (f"\n    {result.error}" if result.error else ""))
            _archive(spec.experiment_name, archive, uri, echo)
    except BaseException as err:
        status = "KILLED" if interrupted(err) else "FAILED"
        if executor == "local":  # the pool has stopped every worker by now (Slurm jobs run on)
            for trial_id, item in payloads.items():
                if trial_id not in results:
                    sweep_executors.ensure_ended_in_store(item, status, f"sweep interrupted: {type(err).__name__}: {err}")
        tracking.end_run(parent, status, f"{type(err).__name__}: {err}", uri)
        raise
    ordered = [results.get(t.id) or TrialResult(t.id, "FAILED", "no result came back") for t in p.trials]
    failed = [r for r in ordered if r.status not in ("FINISHED", "SKIPPED")]
    tracking.end_run(parent, "FAILED" if failed else "FINISHED",
                     f"{len(failed)} of {len(ordered)} trials failed" if failed else None, uri)
    _archive(spec.experiment_name, archive, uri, echo)
    echo(f"sweep {spec.name!r} done in {time.perf_counter() - start:.1f}s: "
         f"{sum(r.status == 'FINISHED' for r in ordered)} finished, "
         f"{sum(r.status == 'SKIPPED' for r in ordered)} skipped, {len(failed)} failed")
    return ordered


def _archive(experiment: str, path, uri: str, echo) -> None:
    """Rewrite the sweep's archive; a failure is reported, never a reason to stop the trials."""
    if path is None:
        return
    from cameo_bench import tracking

    try:
        count = tracking.export_experiment(experiment, path, uri)
    except Exception as err:  # noqa: BLE001 - the trials' results are in the store either way
        echo(f"warning: archive {path} not written: {type(err).__name__}: {err}")
        return
    echo(f"archived {count} runs to {path}")


def failure_report(p: Plan, results: list[TrialResult]) -> str:
    """The failed trials with their errors and where to find them; empty when none failed."""
    labels = {t.id: t.label for t in p.trials}
    failed = [r for r in results if r.status not in ("FINISHED", "SKIPPED")]
    if not failed:
        return ""
    lines = [f"{len(failed)} trial(s) FAILED:"]
    for r in failed:
        lines.append(f"  {r.trial}  {r.status:<8} {labels.get(r.trial, '')}\n    {r.error}")
    lines.append(f"  run folders: {p.run_root}/<trial id>; restart the sweep to retry only these.")
    return "\n".join(lines)
