"""The loaders a training run reads from: train/eval datasets of a `DataSpec`, the cache, batch order.

Batch order is a pure function of (seed, batch number): no sampler state has to be saved, so a
resumed run, or a run on another number of ranks, reads exactly the scenes an uninterrupted
one-process run would.
"""
from __future__ import annotations

from typing import Iterator

import torch

from cameo_bench.config.spec import DataSpec
from cameo_bench.data.batch import batch_to, collate

# Offset of the held-out synthetic scenes' seed: far from any seed a user would pick for training.
EVAL_SEED_OFFSET = 1_000_003


def build_datasets(data: DataSpec):
    """(train, held-out eval) datasets. Synthetic eval scenes use a disjoint seed."""
    if data.kind == "synthetic":
        from cameo_bench.data.synthetic import SyntheticScenes

        options = dict(num_ref=data.num_ref, reference_placement=data.reference_placement, **data.scene_options)
        train = SyntheticScenes(data.num_scenes, data.num_views, data.image_size, data.azimuth_step_deg, data.seed,
                                **options)
        held_out = SyntheticScenes(data.num_eval_scenes, data.num_views, data.image_size, data.azimuth_step_deg,
                                   data.seed + EVAL_SEED_OFFSET, **options)
        return train, held_out
    if data.kind == "folder":
        from cameo_bench.data.scene_dataset import SceneFolderDataset

        if not data.root:
            raise ValueError("data.kind = 'folder' needs data.root (a scene-folder dataset root)")
        kwargs = dict(num_views=data.num_views, num_ref=data.num_ref, image_size=data.image_size, seed=data.seed)
        return SceneFolderDataset(data.root, split="train", **kwargs), SceneFolderDataset(data.root, split="test", **kwargs)
    raise ValueError(f"unknown data.kind {data.kind!r}; valid: ['synthetic', 'folder']")


class MemoryCache:
    """Items of a deterministic dataset, rendered once. Synthetic scenes are cheap to keep."""

    def __init__(self, dataset, limit_bytes: int = 2 << 30):
        self.dataset = dataset
        self.items: dict[int, dict] = {}
        self.limit = limit_bytes
        self.size = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        if index in self.items:
            return self.items[index]
        item = self.dataset[index]
        nbytes = sum(v.numel() * v.element_size() for v in item.values() if torch.is_tensor(v))
        if self.size + nbytes <= self.limit:
            self.items[index] = item
            self.size += nbytes
        return item


def batch_indices(num_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Scene indices of global batch `step`: epochs of seeded permutations, no state to save."""
    per_epoch = max(num_items // batch_size, 1)
    epoch, slot = divmod(step, per_epoch)
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[slot * batch_size:(slot + 1) * batch_size].tolist()


def eval_batches(dataset, num_scenes: int, batch_size: int, device: torch.device) -> Iterator[dict]:
    """The first `num_scenes` held-out scenes, in order, as batches of `batch_size` on `device`."""
    n = min(num_scenes, len(dataset))
    for start in range(0, n, batch_size):
        yield batch_to(collate([dataset[i] for i in range(start, min(start + batch_size, n))]), device)
