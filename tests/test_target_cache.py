"""The per-item cache of correspondence targets: the same targets as computing them, only for sources without per-batch randomness.

References are `compute_targets` itself on the same batch (the cache must return what it would),
on each sample alone and on other batch compositions (what makes a per-item cache exact), and a
training run with the cache off (`cameo.target_cache_mb = 0`).
"""
from __future__ import annotations

import pytest
import torch

from cameo_bench import config
from cameo_bench.correspondence import compute_targets
from cameo_bench.data.batch import collate
from cameo_bench.data.loading import MemoryCache
from cameo_bench.data.synthetic import SyntheticScenes
from cameo_bench.engine import target_cache
from cameo_bench.engine.build import build_run
from cameo_bench.engine.step import train_step

GRID, STRIDE = (3, 8, 8), 2  # 16 px scenes, 2 px per token


@pytest.fixture(scope="module")
def scenes():
    return SyntheticScenes(6, 3, 16, 30.0, seed=3, num_ref=1)


def batch_of(dataset, items):
    return collate([dataset[i] for i in items])


def assert_same(a, b):
    assert a.grid == b.grid and a.idx.shape == b.idx.shape
    for name in ("idx", "weight", "valid", "cost"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name


def sparse_depth_batch(batch):
    """Only a few pixels keep their depth (SfM-like sparse depth; 0 = no point)."""
    keep = torch.zeros_like(batch["depth"], dtype=torch.bool)
    keep[..., ::3, ::5] = True
    return {**batch, "sparse_depth": torch.where(keep, batch["depth"], torch.zeros_like(batch["depth"]))}


CASES = [
    ("depth", {}),
    ("depth", {"mode": "soft", "k": 4}),
    ("depth", {"depth_key": "sparse_depth"}),
    ("pointmap_nn", {}),
    ("epipolar", {"band": 1.0}),
    ("matches", {}),
]


@pytest.mark.parametrize("source, options", CASES, ids=[f"{s}-{o}" for s, o in CASES])
def test_cached_sources_are_per_sample_and_batch_invariant(scenes, source, options):
    """What a per-item cache relies on: sample b's targets inside any batch are, bit for bit,
    the targets of sample b computed alone."""
    assert source in target_cache.PER_SAMPLE_SOURCES
    prep = sparse_depth_batch if options.get("depth_key") == "sparse_depth" else (lambda b: b)
    alone = [compute_targets(source, prep(batch_of(scenes, [i])), GRID, STRIDE, **options) for i in range(4)]
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        together = compute_targets(source, prep(batch_of(scenes, order)), GRID, STRIDE, **options)
        for b, i in enumerate(order):
            assert_same(target_cache.sample_part(together, b), alone[i])


@pytest.mark.parametrize("source, options", CASES[:2] + CASES[3:5], ids=[f"{s}-{o}" for s, o in CASES[:2] + CASES[3:5]])
def test_step_targets_from_the_cache_equal_computed_ones(scenes, monkeypatch, source, options):
    train = MemoryCache(scenes)
    first = [0, 1, 2, 3]
    got = target_cache.step_targets(train, first, source, options, batch_of(train, first), GRID, STRIDE, 64)
    assert_same(got, compute_targets(source, batch_of(scenes, first), GRID, STRIDE, **options))
    assert len(train.derived_values) == 4

    later = [2, 0, 3, 0]  # another order, a repeated item: every item is kept
    expected = compute_targets(source, batch_of(scenes, later), GRID, STRIDE, **options)
    monkeypatch.setattr(target_cache, "compute_targets", lambda *a, **k: pytest.fail("recomputed a kept batch"))
    assert_same(target_cache.step_targets(train, later, source, options, batch_of(train, later), GRID, STRIDE, 64),
                expected)


def test_a_partly_kept_batch_is_computed_and_keeps_the_rest(scenes):
    train = MemoryCache(scenes)
    target_cache.step_targets(train, [0, 1], "depth", {}, batch_of(train, [0, 1]), GRID, STRIDE, 64)
    got = target_cache.step_targets(train, [1, 4], "depth", {}, batch_of(train, [1, 4]), GRID, STRIDE, 64)
    assert_same(got, compute_targets("depth", batch_of(scenes, [1, 4]), GRID, STRIDE))
    assert sorted(i for i, _ in train.derived_values) == [0, 1, 4]


def test_the_key_separates_grids_strides_and_options(scenes):
    train = MemoryCache(scenes)
    items = [0, 1]
    for grid, stride, options in [((3, 8, 8), 2, {}), ((3, 4, 4), 4, {}), ((3, 8, 8), 2, {"mode": "soft"})]:
        for _ in range(2):  # the second call reads the cache
            got = target_cache.step_targets(train, items, "depth", options, batch_of(train, items), grid, stride, 64)
            assert_same(got, compute_targets("depth", batch_of(scenes, items), grid, stride, **options))
    assert len(train.derived_values) == 6


def test_memory_is_bounded_and_only_held_items_are_kept(scenes):
    one = target_cache.nbytes(target_cache.sample_part(compute_targets("depth", batch_of(scenes, [0]), GRID, STRIDE), 0))
    train = MemoryCache(scenes)
    items = list(range(6))
    target_cache.step_targets(train, items, "depth", {}, batch_of(train, items), GRID, STRIDE, 1)
    assert train.derived_size == 6 * one <= 1 << 20
    # a limit of 2.5 items' targets keeps 2 of them
    small = MemoryCache(scenes)
    batch = batch_of(small, items)
    limit = int(2.5 * one)
    kept = [small.keep(i, "key", target_cache.sample_part(compute_targets("depth", batch, GRID, STRIDE), i), one, limit)
            for i in items]
    assert kept == [True, True, False, False, False, False] and small.derived_size == 2 * one
    # an item the cache does not hold (over its item limit) gets no derived value: it could be re-read differently
    unheld = MemoryCache(scenes, limit_bytes=0)
    got = target_cache.step_targets(unheld, [0, 1], "depth", {}, batch_of(unheld, [0, 1]), GRID, STRIDE, 64)
    assert_same(got, compute_targets("depth", batch_of(scenes, [0, 1]), GRID, STRIDE))
    assert unheld.derived_values == {} and unheld.items == {}
    # no cache at all: a dataset that is not a MemoryCache, or a limit of 0
    for dataset, limit in ((scenes, 64), (MemoryCache(scenes), 0)):
        got = target_cache.step_targets(dataset, [0, 1], "depth", {}, batch_of(scenes, [0, 1]), GRID, STRIDE, limit)
        assert_same(got, compute_targets("depth", batch_of(scenes, [0, 1]), GRID, STRIDE))
        assert getattr(dataset, "derived_values", {}) == {}


@pytest.mark.parametrize("source, options", [("noisy_depth", {}), ("noisy_depth", {"seed": 0}), ("shuffled", {})])
def test_sources_with_per_batch_randomness_are_never_cached(scenes, source, options):
    """noisy_depth draws its corruption per call (global stream) or, seeded, for the whole batch
    from one generator; shuffled permutes over the batch: a sample's targets depend on its batch."""
    assert source not in target_cache.PER_SAMPLE_SOURCES
    assert target_cache.cache_key(source, options, GRID, STRIDE, "cpu") is None
    a = compute_targets(source, batch_of(scenes, [0, 1]), GRID, STRIDE, **options)
    b = compute_targets(source, batch_of(scenes, [1, 0]), GRID, STRIDE, **options)
    assert not (torch.equal(a.idx[0], b.idx[1]) and torch.equal(a.valid[0], b.valid[1]))  # why it is not cached
    train = MemoryCache(scenes)
    for _ in range(2):
        target_cache.step_targets(train, [0, 1], source, options, batch_of(train, [0, 1]), GRID, STRIDE, 64)
    assert train.derived_values == {}


def test_a_run_with_the_cache_trains_exactly_like_one_without(tmp_path):
    """Two scenes, batch 2: from step 1 on every step reads the cache; losses and weights match."""
    runs = {}
    for mb in (0, 16):
        exp = config.parse(["gin/experiments/smoke.gin"], [
            f"run_experiment.output_dir = '{tmp_path}'", f"run_experiment.name = 'cache_{mb}'", "train.progress = False",
            "eval.every = 0", "train.checkpoint_every = 0", "data.num_scenes = 2", "data.batch_size = 2",
            f"cameo.target_cache_mb = {mb}"])
        run = runs[mb] = build_run(exp)
        runs[mb, "metrics"] = [train_step(run, step) for step in range(3)]
    assert runs[16].train_set.derived_size > 0 and runs[0].train_set.derived_values == {}
    assert runs[0, "metrics"] == runs[16, "metrics"]
    for p, q in zip(runs[0].model.parameters(), runs[16].model.parameters()):
        assert torch.equal(p, q)
