"""Correspondence targets of a training step, computed once per training item for deterministic per-sample sources.

The `depth` targets of a synthetic scene depend on its geometry only, never on the step's noise
or timestep, yet computing them was the largest part of what CAMEO added to a tiny-model step
(2.5-3.5% of a quickstart DiT step; reports/benchmarks/README.md). A source qualifies when the
targets of sample b are a deterministic function of sample b's own batch entries
(`PER_SAMPLE_SOURCES`; tests/test_target_cache.py checks that, bit for bit, against computing
each sample alone and inside other batches). Not cached: `noisy_depth` (it draws its corruption
from torch's global stream, or with a `seed` from one generator over the whole batch, so a
sample's noise depends on its batch), `shuffled` (one permutation over the batch's valid
queries), `sfm_tracks` (not checked here) and any unregistered source.

Where the values live: the run's `MemoryCache` (`data/loading.py`), next to the item they were
computed from, and only for items it holds: a held item is the same tensors at every read, so
its targets stay exact for the run, whatever the dataset (a scene folder's frame draw of item i
is part of item i). The key is (source, options, layer grid, stride, device); at most
`cameo.target_cache_mb` MB are kept, after which the remaining items are computed every step. A
step whose samples are not all kept computes the whole batch, as without a cache.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from cameo_bench.correspondence import CorrespondenceTargets, compute_targets
from cameo_bench.data.loading import MemoryCache

# Sources whose targets for a sample depend on that sample's batch entries alone, deterministically.
PER_SAMPLE_SOURCES = frozenset({"depth", "pointmap_nn", "epipolar", "matches"})


def cache_key(source: str, options: Mapping, grid, stride: int, device) -> tuple | None:
    """The key of a source's targets on one layer grid, or None when the source must be computed every step."""
    if source not in PER_SAMPLE_SOURCES:
        return None
    return ("cameo_targets", source, repr(sorted(options.items())), tuple(int(g) for g in grid), int(stride),
            str(device))


def sample_part(targets: CorrespondenceTargets, b: int) -> CorrespondenceTargets:
    """Sample b of the targets, as tensors of its own: indexing by a tensor copies, where a slice
    would keep the whole batch alive."""
    return targets.select(torch.tensor([b], device=targets.idx.device))


def nbytes(targets: CorrespondenceTargets) -> int:
    return sum(t.numel() * t.element_size() for t in (targets.idx, targets.weight, targets.valid, targets.cost)
               if t is not None)


def stack(parts: Sequence[CorrespondenceTargets]) -> CorrespondenceTargets | None:
    """The batch of per-sample parts [1, ...] -> [B, ...]; None when their shapes differ."""
    first = parts[0]
    if any(p.idx.shape != first.idx.shape or (p.cost is None) != (first.cost is None) for p in parts):
        return None
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    return CorrespondenceTargets(cat("idx"), cat("weight"), cat("valid"), first.grid,
                                 None if first.cost is None else cat("cost"))


def step_targets(train_set, items: Sequence[int], source: str, options: Mapping, batch: Mapping,
                 grid, stride: int, limit_mb: int) -> CorrespondenceTargets | None:
    """`compute_targets(source, batch, grid, stride, **options)` for the batch of training items
    `items` (dataset indices, in batch order), from the cache when every item's targets are kept.

    `batch` must be the collated items `items` of `train_set` (what `engine.step.local_batch` makes)."""
    key = cache_key(source, options, grid, stride, batch["intrinsics"].device)
    if key is None or limit_mb <= 0 or not isinstance(train_set, MemoryCache):
        return compute_targets(source, batch, grid, stride, **options)
    parts = [train_set.derived(i, key) for i in items]
    if all(p is not None for p in parts):
        stacked = stack(parts)
        if stacked is not None:
            return stacked
    targets = compute_targets(source, batch, grid, stride, **options)
    if targets is not None:
        for b, (i, kept) in enumerate(zip(items, parts)):
            if kept is None:
                part = sample_part(targets, b)
                train_set.keep(i, key, part, nbytes(part), limit_mb << 20)
    return targets
