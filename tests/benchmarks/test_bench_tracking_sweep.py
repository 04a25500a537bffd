"""Costs of the tracking and sweep machinery (issue: tracking overhead <= 2% of a tiny step; a
sweep of 8 trials on 2 workers in about half the time of 1 worker on a 2-core machine)."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import pytest

from cameo_bench import config
from cameo_bench.tracking import MlflowTracker
from cameo_bench.engine.build import build_run
from cameo_bench.engine.step import train_step

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_tracking_overhead_per_step(benchmark, tmp_path, measuring, monkeypatch):
    """Buffered MLflow logging of one step's metrics (amortised flush included) vs a tiny step."""
    monkeypatch.chdir(tmp_path)
    exp = config.parse([REPO / "gin/experiments/quickstart.gin"], [
        f"run_experiment.output_dir = '{tmp_path}'", "train.progress = False", "eval.every = 0",
        "backbone.overrides = {'patch_size': 4}", "data.num_scenes = 16",
        *([] if measuring else ["backbone.preset = 'micro'", "data.image_size = 16", "data.batch_size = 2"])])
    run = build_run(exp)
    steps = 6 if measuring else 2
    tic = time.perf_counter()
    metrics = [train_step(run, s) for s in range(steps)]
    step_seconds = (time.perf_counter() - tic) / steps

    tracker = MlflowTracker("bench-tracking", "overhead", uri=f"sqlite:///{tmp_path}/mlflow.db", flush_every=200)
    metrics = {**metrics[-1], "time/step_seconds": step_seconds}
    counter = iter(range(10**9))

    def log_one_step():
        tracker.log_metrics(metrics, next(counter))

    rounds = 2000 if measuring else 50
    benchmark.pedantic(log_one_step, rounds=rounds, iterations=1)
    tic = time.perf_counter()
    tracker.flush()
    last_flush = time.perf_counter() - tic
    per_step = benchmark.stats.stats.mean + last_flush / rounds if benchmark.stats else 0.0
    benchmark.extra_info.update(step_seconds=step_seconds, tracking_seconds_per_step=per_step,
                                overhead_fraction=per_step / step_seconds, metrics_per_step=len(metrics))
    tracker.finish()
    if measuring:
        assert per_step / step_seconds < 0.02


@pytest.mark.slow
def test_sweep_two_workers_vs_one(benchmark, tmp_path, measuring):
    """Wall time of the same 8-trial sweep (tiny DiT, 60 steps each: trials long enough that
    start-up and the sqlite store do not dominate) with 1 and with 2 workers."""
    if not measuring:
        pytest.skip("spawns 8+8 training processes: run with `make bench`")
    sweep_file = tmp_path / "eight.gin"
    sweep_file.write_text(
        "sweep.name = 'eight'\n"
        "sweep.base = ['gin/experiments/quickstart.gin']\n"
        "sweep.fixed = ['train.steps = 60', 'eval.every = 0', 'data.batch_size = 4', 'data.num_scenes = 32']\n"
        "sweep.axes = {'cameo.weight': [0.1, 0.5], 'run_experiment.seed': [0, 1, 2, 3]}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    times = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        cmd = [sys.executable, "-m", "cameo_bench", "sweep", str(sweep_file), "--workers", str(workers),
               "--gin_param", f"sweep.output_dir = '{out}'", "--gin_param", f"sweep.experiment = 'eight-w{workers}'"]
        tic = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True)
        times[workers] = time.perf_counter() - tic
    benchmark.extra_info.update(one_worker_s=times[1], two_workers_s=times[2], speedup=times[1] / times[2])
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
