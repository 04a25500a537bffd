"""Data-side costs: correspondence targets per batch against the training step, and synthetic
rendering rate.

Targets are computed every CAMEO step, so the issue's budget is that producing them costs under
5% of the step they feed. Reference step: the tiny `mv_dit` CAMEO step (the quickstart backbone;
both tiny backbones cost about the same) on the very batch the targets come from: 8 scenes x 3 views at
32x32, targets on its supervised layer's 16x16 grid, one thread. The ratio is asserted under
`--benchmark-enable` (both numbers measured in the same run, so machine load largely cancels).
Rendering rate: scenes/s of `SyntheticScenes` at 32 and 64 px, per item (what the engine's
cache does) and batched (`render_scenes`, what a DataLoader's `__getitems__` uses).

    make bench    # or: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/benchmarks/test_bench_data.py --benchmark-enable

With benchmarks disabled each test is one call at micro size; the step is not measured.
"""
from __future__ import annotations

import dataclasses
import pathlib
import statistics
import sys
import time

import pytest
import torch

from cameo_bench.correspondence import compute_targets, list_sources
from cameo_bench.data.batch import collate
from cameo_bench.data.synthetic import SyntheticScenes
from cameo_bench.engine.step import train_step

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import gpu_check  # noqa: E402

BUDGET = 0.05  # targets may cost at most this fraction of the training step
SOURCES = [name for name in list_sources() if name != "none"]  # `none` is the baseline: no work
REFERENCE = gpu_check.SCALES["tiny"]
SMOKE = dataclasses.replace(REFERENCE, batch_size=1, image_size=16,
                            dit=gpu_check.BackboneChoice("mv_dit", "micro", "depth:0.5"))


def with_tracks(batch: dict, per_view: int = 64, seed: int = 0) -> dict:
    """SfM-like tracks for `sfm_tracks`: `per_view` random pixels of each view lifted by its depth and
    observed in every view that sees them (the occlusion test of `geometry.reproject`)."""
    from cameo_bench.geometry import reproject

    depth, K, c2w = batch["depth"], batch["intrinsics"], batch["cam2world"]
    B, V, H, W = depth.shape
    picks = torch.randperm(H * W, generator=torch.Generator().manual_seed(seed))[:per_view]  # [P]
    ids = [[[] for _ in range(V)] for _ in range(B)]
    uvs = [[[] for _ in range(V)] for _ in range(B)]
    for i in range(V):
        for j in range(V):
            uv, ok = reproject(depth[:, i], K[:, i], c2w[:, i], K[:, j], c2w[:, j], depth[:, j])  # [B, H, W, 2]
            uv, ok = uv.flatten(1, 2)[:, picks], ok.flatten(1, 2)[:, picks]  # [B, P, 2], [B, P]
            for b in range(B):
                ids[b][j].append((i * H * W + picks)[ok[b]])
                uvs[b][j].append(uv[b][ok[b]].float())
    M = max(sum(len(x) for x in ids[b][j]) for b in range(B) for j in range(V))
    track_ids = torch.full((B, V, M), -1, dtype=torch.long)
    track_uv = torch.zeros(B, V, M, 2)
    for b in range(B):
        for j in range(V):
            got_ids, got_uv = torch.cat(ids[b][j]), torch.cat(uvs[b][j])
            track_ids[b, j, :len(got_ids)], track_uv[b, j, :len(got_ids)] = got_ids, got_uv
    return {**batch, "track_ids": track_ids, "track_uv": track_uv}


@dataclasses.dataclass
class Reference:
    batch: dict
    grid: tuple[int, int, int]
    stride: int
    step_s: float | None  # median CAMEO training step on `batch`; None when not measuring


@pytest.fixture(scope="module")
def reference(measuring, tmp_path_factory) -> Reference:
    scale = REFERENCE if measuring else SMOKE
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the per-test one-thread fixture
    try:
        run = gpu_check.build_arm(scale, "dit", cameo=True, device="cpu",
                                          workdir=tmp_path_factory.mktemp("reference_step"))
        batch = collate([run.train_set[i] for i in range(scale.batch_size)])
        layer = run.model.get_attention_layer(run.layer)
        V, H, W = batch["image"].shape[1], batch["image"].shape[-2], batch["image"].shape[-1]
        grid = (V, H // layer.stride, W // layer.stride)
        step_s = None
        if measuring:
            train_step(run, 0)  # warm-up
            seconds = []
            for step in range(1, 4):
                start = time.perf_counter()
                train_step(run, step)
                seconds.append(time.perf_counter() - start)
            step_s = statistics.median(seconds)
    finally:
        torch.set_num_threads(threads)
    return Reference(with_tracks(batch), grid, layer.stride, step_s)


@pytest.mark.parametrize("source", SOURCES)
def test_target_cost_vs_training_step(benchmark, measuring, reference, source):
    targets = benchmark.pedantic(compute_targets, args=(source, reference.batch, reference.grid, reference.stride),
                                 rounds=5 if measuring else 1, warmup_rounds=1 if measuring else 0, iterations=1)
    B, V = reference.batch["image"].shape[:2]
    assert targets.grid == reference.grid
    assert targets.idx.shape[:3] == (B, reference.grid[0] * reference.grid[1] * reference.grid[2], V)
    benchmark.extra_info.update(batch=f"{B} scenes x {V} views, {reference.batch['image'].shape[-1]} px",
                                grid=list(reference.grid), stride=reference.stride)
    if not measuring:
        return
    fraction = benchmark.stats.stats.median / reference.step_s
    benchmark.extra_info.update(step_s=round(reference.step_s, 4), fraction_of_step=round(fraction, 4))
    assert fraction < BUDGET, (
        f"{source}: targets take {fraction:.1%} of the training step "
        f"({benchmark.stats.stats.median:.4f} s vs {reference.step_s:.4f} s), budget {BUDGET:.0%}")


@pytest.mark.parametrize("mode", ["per_item", "batched"])
@pytest.mark.parametrize("size", [32, 64])
def test_synthetic_render_rate(benchmark, measuring, size, mode):
    num_scenes = 16 if measuring else 1
    scenes = SyntheticScenes(num_scenes, 3, size, 30.0, seed=0)  # items are rendered on every access

    def render():
        if mode == "batched":
            return scenes.render_scenes(list(range(num_scenes)))
        return collate([scenes[i] for i in range(num_scenes)])

    batch = benchmark.pedantic(render, rounds=3 if measuring else 1, warmup_rounds=1 if measuring else 0,
                               iterations=1)
    assert batch["image"].shape == (num_scenes, 3, 3, size, size)
    assert batch["depth"].gt(0).any()
    benchmark.extra_info.update(num_scenes=num_scenes, views=3, image_size=size, mode=mode)
    if measuring:
        benchmark.extra_info["scenes_per_s"] = round(num_scenes / benchmark.stats.stats.median, 2)
