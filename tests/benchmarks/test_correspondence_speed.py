"""Cost of producing correspondence targets (pytest-benchmark; run with `make bench`).

Measurements only, no timing assertions: shared CI machines are too noisy for that. Sizes:
  * the issue's reference point, `depth` for 8 scenes x 4 views at 64x64 to a 16x16 grid;
  * every source at the CPU training size, 4 scenes x 3 views at 32x32 to a 16x16 grid.
"""
from __future__ import annotations

import pytest
import torch

from cameo_bench.correspondence import compute_targets
from cameo_bench.data.synthetic import SyntheticScenes


def synthetic_batch(B: int, V: int, size: int) -> dict:
    """Rendered scenes, so that validity (and hence the sparse work) is that of real training."""
    scenes = SyntheticScenes(B, V, size, 30.0, 0)
    items = [scenes[i] for i in range(B)]
    return {key: torch.stack([item[key] for item in items]) for key in ("image", "depth", "intrinsics", "cam2world")}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_depth_targets_8_scenes_4_views_64px(benchmark):
    batch = synthetic_batch(8, 4, 64)
    targets = benchmark(compute_targets, "depth", batch, (4, 16, 16), 4)
    assert targets.valid.any()


@pytest.mark.parametrize(
    "name,options",
    [
        ("depth", {}),
        ("depth", {"mode": "soft", "k": 4}),
        ("pointmap_nn", {}),
        ("noisy_depth", {"noise": 0.05, "seed": 0}),
        ("shuffled", {}),
        ("epipolar", {}),
        ("matches", {}),
    ],
    ids=["depth", "depth_soft", "pointmap_nn", "noisy_depth", "shuffled", "epipolar", "matches"],
)
def test_source_cost_4_scenes_3_views_32px(benchmark, name, options):
    batch = synthetic_batch(4, 3, 32)
    targets = benchmark(compute_targets, name, batch, (3, 16, 16), 2, **options)
    assert targets.idx.shape[:3] == (4, 3 * 256, 3)
