"""Training step time and peak memory with and without CAMEO, for both tiny presets (CPU).

The step is the engine's (`cameo_bench.engine.step.train_step`: targets, tap, diffusion + lambda x alignment loss,
AdamW) at the CPU benchmark size: batch 8, 3 views (1 reference), 32x32 pixels, one thread, CAMEO
as released (MLP head, every query token) on the analogue of the paper's layer 10. The benchmark
times the CAMEO step; a baseline step runs before every CAMEO round (pytest-benchmark's untimed
`setup`, timed here), so both arms see the same machine load and their ratio is meaningful on a
shared machine. Peak memory of each arm comes from `gpu_check.py --scale tiny` in a fresh process
(the same code the GPU check runs). Everything lands in `extra_info` of the benchmark JSON.

    make bench    # or: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/benchmarks/test_bench_train_step.py --benchmark-enable

With benchmarks disabled (the default suite) each test is one micro-preset round, no subprocess.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import gpu_check  # noqa: E402

TINY = gpu_check.SCALES["tiny"]
# Smoke size for the default suite: pixel space like TINY, micro presets, one scene.
SMOKE = dataclasses.replace(
    TINY, batch_size=1, image_size=16, chunk_size=64,
    unet=gpu_check.BackboneChoice("mv_unet", "micro", "up.00.attn.00"),
    dit=gpu_check.BackboneChoice("mv_dit", "micro", "depth:0.5"),
)
ROUNDS = 5


def peak_memory_in_subprocess(part: str, out: pathlib.Path) -> dict:
    """Peak RSS of one warm step of `part` at the tiny scale, in a process of its own."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(pathlib.Path(gpu_check.__file__)), "--part", part, "--scale", "tiny",
           "--device", "cpu", "--warmup", "1", "--steps", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    record_path = out / "parts" / f"{part}.json"
    if not record_path.exists():
        raise RuntimeError(f"{' '.join(cmd)} wrote no record (exit {done.returncode}):\n{done.stderr[-3000:]}")
    record = json.loads(record_path.read_text())
    if record["status"] != "ok":
        raise RuntimeError(f"{part}: {record['status']}: {record.get('traceback', record.get('error'))}")
    return record


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_train_step_with_and_without_cameo(benchmark, measuring, tmp_path, backbone):
    scale = TINY if measuring else SMOKE
    from cameo_bench.engine.step import train_step

    baseline = gpu_check.build_arm(scale, backbone, cameo=False, device="cpu", workdir=tmp_path / "baseline")
    cameo = gpu_check.build_arm(scale, backbone, cameo=True, device="cpu", workdir=tmp_path / "cameo")
    baseline_steps, cameo_steps = itertools.count(), itertools.count()
    baseline_seconds: list[float] = []
    baseline_metrics: dict = {}

    def baseline_step():  # runs before each CAMEO round, outside pytest-benchmark's timer
        start = time.perf_counter()
        baseline_metrics.update(train_step(baseline, next(baseline_steps)))
        baseline_seconds.append(time.perf_counter() - start)

    warmup = 1 if measuring else 0
    metrics = benchmark.pedantic(lambda: train_step(cameo, next(cameo_steps)), setup=baseline_step,
                                 rounds=ROUNDS if measuring else 1, warmup_rounds=warmup, iterations=1)

    # The arms differ by exactly the alignment loss: the CAMEO step computed it, the baseline did not.
    assert math.isfinite(metrics["train/loss_cameo"]) and metrics["train/loss_cameo"] > 0
    assert metrics["train/cameo_pairs_ref"] + metrics["train/cameo_pairs_tgt"] > 0
    assert "train/loss_cameo" not in baseline_metrics
    assert math.isfinite(baseline_metrics["train/loss_diffusion"])

    info = gpu_check.describe_arm(cameo, scale, backbone)
    info["cameo"] = dict(weight=scale.cameo_weight, head=scale.cameo_head, chunk_size=scale.chunk_size,
                         source=scale.source, queries="all")
    if not measuring:
        benchmark.extra_info.update(info)
        return
    base_median = statistics.median(baseline_seconds[warmup:])
    cameo_median = benchmark.stats.stats.median
    memory = {arm: peak_memory_in_subprocess(f"{backbone}_{arm}", tmp_path / "memory") for arm in ("baseline", "cameo")}
    info.update(
        baseline_median_s=round(base_median, 4), cameo_median_s=round(cameo_median, 4),
        baseline_seconds=[round(s, 4) for s in baseline_seconds[warmup:]],
        time_ratio_cameo_over_baseline=round(cameo_median / base_median, 3),
        baseline_peak_mb=memory["baseline"]["peak_mb"], cameo_peak_mb=memory["cameo"]["peak_mb"],
        baseline_step_extra_mb=memory["baseline"]["extra_mb"], cameo_step_extra_mb=memory["cameo"]["extra_mb"],
        peak_ratio_cameo_over_baseline=round(memory["cameo"]["peak_mb"] / memory["baseline"]["peak_mb"], 3),
        memory_method=memory["cameo"]["memory_method"], threads=1,
    )
    benchmark.extra_info.update(info)
    print(f"\n{backbone}: {json.dumps({k: v for k, v in info.items() if 'ratio' in k or 'median' in k or 'peak' in k})}")
