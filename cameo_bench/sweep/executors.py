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
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Iterator

from cameo_bench.engine.signals import Terminated, interrupted, sigterm_as_interrupt, sigterm_received
from cameo_bench.sweep import code_snapshot
from cameo_bench.sweep.results import TrialResult


def run_trial(payload: dict[str, Any]) -> TrialResult:
    """Train one trial in this process; never raises for a trial error (the result says FAILED).

    The trial goes through the same tracked launch as `cameo-bench train` (same tags, raw and
    operative gin config, environment, checkpoint path, failure record), plus the sweep tags, and
    always resumes: a restarted trial continues from its run folder's checkpoint and MLflow run.
    """
    start = time.perf_counter()
    if sigterm_received():  # this worker was stopped during an earlier trial: one queued to it must not start
        return TrialResult(payload["trial"], "KILLED", "the sweep was stopped before this trial started")
    os.environ["MLFLOW_TRACKING_URI"] = payload["tracking_uri"]
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a copied run's artifacts: one bar per file
    if payload.get("threads"):
        import torch

        torch.set_num_threads(payload["threads"])
    with sigterm_as_interrupt():  # a killed worker's run ends KILLED, not RUNNING forever
        return _run_trial(payload, start)


def _run_trial(payload: dict, start: float) -> TrialResult:
    from cameo_bench import config
    from cameo_bench.engine.tracked_run import MlflowRun, Note, TrackedRun
    from cameo_bench.tracking import keys

    tracked = None

    def result(status: str, error: str | None = None, metrics: dict | None = None) -> TrialResult:
        run_id = tracked.tracker.run_id if tracked is not None and tracked.tracker is not None else None
        return TrialResult(payload["trial"], status, error, run_id, dict(metrics or {}), time.perf_counter() - start)

    try:
        exp = config.parse(payload["gin_files"], payload["bindings"])
        exp.train.progress = False  # several trials share one terminal
        if payload.get("reuse_from"):
            copied = _reuse(payload, exp)
            if copied is not None:
                return copied
        mlflow = MlflowRun(payload["experiment"], uri=payload["tracking_uri"],  # named by `run_label`
                           parent_run_id=payload["parent_run_id"], clear_error=True,
                           label_extra=payload.get("label_extra", ()),
                           tags={keys.SWEEP_NAME: payload["sweep"], keys.SWEEP_TRIAL: payload["trial"],
                                 keys.SWEEP_LABEL: payload["label"], **payload.get("code_tags", {})})
        trial = json.dumps(payload, indent=1, default=str)
        tracked = TrackedRun(exp, resume=True, device=payload.get("device"), mlflow=mlflow,
                             notes=[Note(keys.RUN_TRIAL, keys.ARTIFACT_TRIAL, trial)])
        return result("FINISHED", metrics=tracked.fit())
    except (Terminated, Exception) as err:  # noqa: BLE001 - a trial's error of any kind is its result
        if interrupted(err):  # the SIGTERM itself, or an error raised while it was handled
            return result("KILLED", f"terminated ({type(err).__name__}: {err}); restart the sweep to resume from "
                                    "the last checkpoint")
        return result("FAILED", f"{type(err).__name__}: {err}")


def _reuse(payload: dict[str, Any], exp) -> TrialResult | None:
    """The trial as a copy of a FINISHED run of the same configuration in one of the sweep's
    `reuse_from` experiments (`tracking.run_copy`), or None: then it trains. A run equal but for
    fewer steps is continued: copied unfinished with its run folder, and the training resumes from
    its last checkpoint (`_continuable`), which is the same as training from step 0."""
    from cameo_bench import tracking
    from cameo_bench.engine.build import run_dir_of
    from cameo_bench.engine.loop import logged_params
    from cameo_bench.engine.tracked_run import run_name
    from cameo_bench.tracking import keys
    from cameo_bench.tracking.labels import honest_params, params_are_baseline

    start = time.perf_counter()
    uri = payload["tracking_uri"]
    run_dir = run_dir_of(exp)
    if (run_dir / tracking.RUN_ID_FILE).exists():  # this trial trained (or was continued) before: resume it
        return None
    params = logged_params(exp)
    defaults = honest_params(type(exp)().flat_params(), baseline=params_are_baseline(params))
    source = tracking.find_equivalent(payload["reuse_from"], params, uri, started_after_ms=_inputs_modified_ms(exp),
                                      extendable=keys.TRAIN_STEPS, defaults=defaults)
    if source is None:
        return None
    old_dir = pathlib.Path(source["tags"].get(keys.RUN_DIR, ""))
    if source["extends"] and not _continuable(exp, source, old_dir):
        return None
    # the source's tags (same configuration: same labels, the layer its selector resolved to) stay
    tags = {keys.SWEEP_NAME: payload["sweep"], keys.SWEEP_TRIAL: payload["trial"], keys.SWEEP_LABEL: payload["label"]}
    if payload["parent_run_id"]:
        tags[keys.PARENT_RUN_ID] = payload["parent_run_id"]
    layer = source["tags"].get(keys.LAYER_RESOLVED)
    name = run_name(exp, None if layer in (None, keys.NONE) else layer, payload.get("label_extra", ()))
    run_id = tracking.copy_run(source["run_id"], tracking.get_or_create_experiment(payload["experiment"], uri), name,
                               params=params, tags=tags, source_experiment=source["experiment"], uri=uri,
                               finish=not source["extends"])
    what = f"run {source['run_id']} of experiment {source['experiment']!r}"
    if source["extends"]:
        import shutil

        shutil.copytree(old_dir, run_dir, dirs_exist_ok=True)
        (run_dir / tracking.RUN_ID_FILE).write_text(run_id)
        print(f"trial {payload['trial']}: continues {what} (same configuration, "
              f"{source['params'][keys.TRAIN_STEPS]} of {exp.train.steps} steps) as MLflow run {run_id}", file=sys.stderr)
        return None
    print(f"trial {payload['trial']}: copied {what} (same configuration) as MLflow run {run_id}", file=sys.stderr)
    return TrialResult(payload["trial"], "FINISHED", None, run_id, tracking.final_eval_metrics(run_id, uri),
                       time.perf_counter() - start)


def _continuable(exp, source: dict[str, Any], old_dir: pathlib.Path) -> bool:
    """Whether resuming the source's run folder to `exp.train.steps` gives what training from step 0
    would: its checkpoint is at its last step, and that step is one where the longer run also logs,
    evaluates and checkpoints (so the continued record has no extra or missing point). Nothing
    else in training depends on the step count (the LR schedule is a warm-up, then constant):
    tests/test_sweep.py checks a continued run against one trained from scratch, bit for bit."""
    from cameo_bench.engine import checkpoint
    from cameo_bench.tracking import keys

    steps = int(source["params"][keys.TRAIN_STEPS])
    t, e = exp.train, exp.eval
    if t.checkpoint_every <= 0 or steps % t.checkpoint_every or steps % t.log_every or (e.every > 0 and steps % e.every):
        return False
    path = checkpoint.latest_path(old_dir)
    if not path.exists():
        return False
    try:
        return int(checkpoint.load(path)["step"]) == steps
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is simply not continued
        return False


def _inputs_modified_ms(exp) -> int:
    """When the files a run reads by path last changed (the init checkpoint, the VAE, a dataset
    root, the evaluation index), in ms since the epoch; 0 without any. Params name these by path,
    not content: a run that started before they last changed may have read other bytes, so it is
    no copy source (a prior retrained in place is not mistaken for the old one)."""
    paths = [exp.backbone.init_from, exp.codec.vae_path, exp.data.root, exp.eval.index, exp.eval.index_root]
    newest = 0.0
    for path in filter(None, paths):
        path = pathlib.Path(path)
        files = [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()) if path.is_dir() else ()
        for file in files:
            newest = max(newest, file.stat().st_mtime)
    return int(newest * 1000)


def ensure_failed_in_store(result: TrialResult, payload: dict[str, Any]) -> None:
    """Make the MLflow record of a failed trial say FAILED, also when its worker died before it
    could (a crash, an out-of-memory kill, a Slurm timeout)."""
    result.run_id = _end_in_store(payload, "FAILED", result.error or "failed", create=True) or result.run_id


def ensure_ended_in_store(payload: dict[str, Any], status: str, error: str) -> None:
    """End the trial's MLflow run with `status` if it is still open: the sweep was interrupted and
    this trial's result never came back (its worker may have been stopped before it could record
    it, or lost the race for the sqlite store). A trial that never started gets no run."""
    _end_in_store(payload, status, error, create=False)


def _end_in_store(payload: dict[str, Any], status: str, error: str, create: bool) -> str | None:
    from cameo_bench import tracking
    from cameo_bench.tracking import keys

    uri = payload["tracking_uri"]
    trial_tags = {keys.SWEEP_NAME: payload["sweep"], keys.SWEEP_TRIAL: payload["trial"]}
    try:
        runs = tracking.find_runs(payload["experiment"], trial_tags, uri)
        if not runs and create:
            return tracking.create_failed_run(
                payload["experiment"], payload["label"],
                {**trial_tags, keys.SWEEP_LABEL: payload["label"],
                 keys.VARIANT: "baseline" if payload["baseline"] else "cameo"},
                error, payload["parent_run_id"], uri)
        if runs and runs[0]["status"] not in tracking.TERMINAL_STATUSES:
            tracking.end_run(runs[0]["run_id"], status, error, uri)
    except Exception as err:  # noqa: BLE001 - the sweep still reports the failure on the console
        print(f"warning: could not mark trial {payload['trial']} {status} in MLflow: {err}", file=sys.stderr)
    return None


# ---------------------------------------------------------------------------------------------
# local pool

def _init_worker(counter, gpus: list[int] | None) -> None:
    """Runs first in each spawned worker, before torch is imported: pin one GPU per worker."""
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus[index % len(gpus)])


def run_local(payloads: list[dict[str, Any]], workers: int, gpus: list[int] | None = None,
              code_root: pathlib.Path | None = None) -> Iterator[TrialResult]:
    """Trials on a spawn process pool, yielded as they finish. `workers = 0` runs them one after
    another in this process (for debugging; gin is still re-parsed for every trial). The workers
    import the code under `code_root` when given (`code_snapshot`), this process's checkout if not."""
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
    # Held while the pool lives: a worker copies sys.path when it starts (at a submit), and this
    # process's own later imports then come from the same code as its workers'.
    with code_snapshot.first_on_path(code_root):
        try:
            futures = {pool.submit(run_trial, {**item, "threads": threads}): item for item in payloads}
            for future in as_completed(futures):
                try:
                    yield future.result()
                except Exception as err:  # noqa: BLE001 - e.g. BrokenProcessPool when a worker is killed
                    yield TrialResult(futures[future]["trial"], "FAILED", f"worker died: {type(err).__name__}: {err}")
        finally:  # queued trials never start; running ones end KILLED (Ctrl-C reaches them from the terminal)
            if sigterm_received():  # the sweep was sent SIGTERM (a plain `kill`), its workers were not: pass it on
                _terminate_workers(pool)
            pool.shutdown(wait=True, cancel_futures=True)


def _terminate_workers(pool: ProcessPoolExecutor) -> None:
    """SIGTERM to each live worker: its trial ends KILLED, flushed, resumable from its checkpoint.
    Without it a killed sweep leaves its workers training on as orphans (seen in a study run)."""
    for process in list((pool._processes or {}).values()):  # the pool has no public handle on them
        if process.is_alive():
            process.terminate()


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
