"""Where trials run: the worker function, a local spawn pool, and submitit (Slurm, or its local
and debug backends for tests).

The worker gets a payload of plain values and re-parses gin from it. Under spawn, forkserver or
Slurm the child does not inherit the parent's gin state, and relying on it silently trains with
defaults (measured; see notes/scale_and_tracking.md section 2.2). This module must not import torch
at module level: the pool initializer sets CUDA_VISIBLE_DEVICES before torch is first imported.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Iterator

from cameo_bench.sweep.results import TrialResult


def run_trial(payload: dict[str, Any]) -> TrialResult:
    """Train one trial in this process; never raises for a trial error (the result says FAILED).

    It logs what `cameo-bench train` logs (same tags, raw and operative gin config, environment,
    checkpoint path), plus the sweep tags, and always resumes: a restarted trial continues from
    its run folder's checkpoint and MLflow run.
    """
    import signal
    import threading

    from cameo_bench.engine.tracked_run import Terminated, on_sigterm

    start = time.perf_counter()
    uri = payload["tracking_uri"]
    os.environ["MLFLOW_TRACKING_URI"] = uri
    if payload.get("threads"):
        import torch

        torch.set_num_threads(payload["threads"])
    installed = (threading.current_thread() is threading.main_thread()
                 and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
    if installed:
        signal.signal(signal.SIGTERM, on_sigterm)  # a killed worker's run ends KILLED, not RUNNING forever
    try:
        return _run_trial(payload, start, Terminated)
    finally:
        if installed:  # an in-process trial (--workers 0, debug executor) must not leave it behind
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run_trial(payload: dict, start: float, Terminated: type) -> "TrialResult":
    from cameo_bench import config, tracking
    from cameo_bench.engine.tracked_run import OperativeConfigLog, run_tags

    uri = payload["tracking_uri"]
    run_dir = pathlib.Path(payload["run_dir"])
    tracker, fitting = None, False

    def result(status: str, error: str | None = None, metrics: dict | None = None) -> TrialResult:
        return TrialResult(payload["trial"], status, error, tracker.run_id if tracker else None, dict(metrics or {}),
                           time.perf_counter() - start)

    try:
        exp = config.parse(payload["gin_files"], payload["bindings"])
        exp.train.progress = False  # several trials share one terminal
        tags = {**run_tags(exp, 1), "sweep.name": payload["sweep"], "sweep.trial": payload["trial"],
                "sweep.label": payload["label"]}
        tracker = tracking.MlflowTracker(payload["experiment"], payload["label"], run_dir=run_dir, uri=uri,
                                         parent_run_id=payload["parent_run_id"], tags=tags, resume=True)
        tracking.clear_error(tracker.run_id, uri)  # a restarted trial must not keep its old error
        tracker.log_text(config.config_str(), "config/raw.gin")
        tracker.log_text(json.dumps(payload, indent=1, default=str), "config/trial.json")

        from cameo_bench.engine.trainer import Trainer

        trainer = Trainer(exp, resume=True, trackers=[tracker, OperativeConfigLog(tracker, config.operative_config)],
                          device=payload.get("device"))
        if trainer.log is not None:
            trainer.log.log_text(config.operative_config(), "config.gin")
            trainer.log.log_text(json.dumps(payload, indent=1, default=str), "trial.json")
        tracker.set_tags({**tracking.environment_tags(str(trainer.device)),
                          "checkpoint.path": str(trainer.ckpt_path.absolute()), "run_dir": str(run_dir.absolute())})
        tracker.log_params({"cameo.layer_resolved": trainer.layer or "none"})
        fitting = True  # from here on, Trainer.fit marks the run itself
        return result("FINISHED", metrics=trainer.fit())
    except Terminated as err:
        if tracker is not None and not fitting:
            tracker.finish("KILLED", f"Terminated: {err}")
        return result("KILLED", f"terminated ({err}); restart the sweep to resume from the last checkpoint")
    except Exception as err:  # noqa: BLE001 - a trial's error of any kind is its result
        error = f"{type(err).__name__}: {err}"
        if tracker is not None:
            try:
                tracker.log_text(traceback.format_exc(), "error.txt")
                if not fitting:
                    tracker.finish("FAILED", error)
            except Exception as log_err:  # noqa: BLE001 - the parent retries marking it
                print(f"warning: could not record the failure of trial {payload['trial']}: {log_err}", file=sys.stderr)
        return result("FAILED", error)


def ensure_failed_in_store(result: TrialResult, payload: dict[str, Any]) -> None:
    """Make the MLflow record of a failed trial say FAILED, also when its worker died before it
    could (a crash, an out-of-memory kill, a Slurm timeout)."""
    from cameo_bench import tracking
    uri, error = payload["tracking_uri"], result.error or "failed"
    try:
        runs = tracking.find_runs(payload["experiment"], {"sweep.name": payload["sweep"], "sweep.trial": result.trial}, uri)
        if not runs:
            result.run_id = tracking.create_failed_run(
                payload["experiment"], payload["label"],
                {"sweep.name": payload["sweep"], "sweep.trial": result.trial, "sweep.label": payload["label"],
                 "variant": "baseline" if payload["baseline"] else "cameo"},
                error, payload["parent_run_id"], uri)
        elif runs[0]["status"] not in tracking.TERMINAL:
            tracking.end_run(runs[0]["run_id"], "FAILED", error, uri)
    except Exception as err:  # noqa: BLE001 - the sweep still reports the failure on the console
        print(f"warning: could not mark trial {result.trial} FAILED in MLflow: {err}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# local pool

def _init_worker(counter, gpus: list[int] | None) -> None:
    """Runs first in each spawned worker, before torch is imported: pin one GPU per worker."""
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus[index % len(gpus)])


def run_local(payloads: list[dict[str, Any]], workers: int, gpus: list[int] | None = None) -> Iterator[TrialResult]:
    """Trials on a spawn process pool, yielded as they finish. `workers = 0` runs them one after
    another in this process (for debugging; gin is still re-parsed for every trial)."""
    if not payloads:
        return
    if workers == 0:
        for item in payloads:
            yield run_trial(item)
        return
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    workers = min(workers, len(payloads))
    threads = None if "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // workers)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(ctx.Value("i", 0), list(gpus or [])))
    try:
        futures = {pool.submit(run_trial, {**item, "threads": threads}): item for item in payloads}
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception as err:  # noqa: BLE001 - e.g. BrokenProcessPool when a worker is killed
                yield TrialResult(futures[future]["trial"], "FAILED", f"worker died: {type(err).__name__}: {err}")
    finally:  # on Ctrl-C: queued trials never start; running ones got the SIGINT too and end KILLED
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# submitit

SUBMITIT_DEFAULTS = {"timeout_min": 240, "name": "cameo-sweep"}  # submitit's own default time is 5 min


def run_submitit(payloads: list[dict[str, Any]], folder: pathlib.Path, options: dict[str, Any]) -> Iterator[TrialResult]:
    """One job per trial (a job array) through submitit's AutoExecutor.

    `options` are AutoExecutor parameters: generic ones (`timeout_min`, `gpus_per_node`,
    `cpus_per_task`, `mem_gb`, `nodes`, `tasks_per_node`) and cluster-specific ones prefixed with
    the cluster name (`slurm_partition`, `slurm_array_parallelism`, `slurm_account`, ...), plus
    `cluster` (default: detected; 'local' and 'debug' run on this machine, for tests) and
    `poll_seconds` (how often job states are read).
    """
    if not payloads:
        return
    import submitit

    options = dict(options)
    cluster = options.pop("cluster", None)
    poll = float(options.pop("poll_seconds", 30 if cluster in (None, "slurm") else 1))
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    executor.update_parameters(**{**SUBMITIT_DEFAULTS, **options})
    jobs = executor.map_array(run_trial, payloads)
    by_job = {job.job_id: item for job, item in zip(jobs, payloads)}
    print(f"submitted {len(jobs)} jobs to {executor.cluster} (logs in {folder})")
    for job in submitit.helpers.as_completed(jobs, poll_frequency=poll):
        item = by_job[job.job_id]
        try:
            yield job.result()
        except Exception as err:  # noqa: BLE001 - job-level failure (timeout, node failure, cancelled)
            message = str(err).strip().splitlines()
            yield TrialResult(item["trial"], "FAILED", f"job {job.job_id} failed: {type(err).__name__}: "
                              + (message[-1] if message else ""))
