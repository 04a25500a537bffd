"""The loaders a training run reads from: train/eval datasets of a `DataSpec`, the cache, batch order.

Batch order is a pure function of (seed, batch number): no sampler state has to be saved, so a
resumed run, or a run on another number of ranks, reads exactly the scenes an uninterrupted
one-process run would.
"""
from __future__ import annotations

import warnings
from typing import Iterator

import torch

from cameo_bench.config.spec import DataSpec, EvalSpec
from cameo_bench.data.batch import batch_to, collate

# Offset of the held-out synthetic scenes' seed: far from any seed a user would pick for training.
EVAL_SEED_OFFSET = 1_000_003


def build_datasets(data: DataSpec, eval: EvalSpec | None = None):
    """(train, held-out eval) datasets. Synthetic eval scenes use a disjoint seed. With `eval.index`
    the held-out set is that evaluation index's entries (`evaluation.protocol.IndexedEvalSet`)."""
    if data.kind == "synthetic":
        from cameo_bench.data.synthetic import SyntheticScenes

        options = dict(num_ref=data.num_ref, reference_placement=data.reference_placement, **data.scene_options)
        train = SyntheticScenes(data.num_scenes, data.num_views, data.image_size, data.azimuth_step_deg, data.seed,
                                **options)
        held_out = SyntheticScenes(data.num_eval_scenes, data.num_views, data.image_size, data.azimuth_step_deg,
                                   data.seed + EVAL_SEED_OFFSET, **options)
        warn_if_few_samples(len(train), data)
        return train, held_out
    if data.kind == "folder":
        if not data.root:
            raise ValueError("data.kind = 'folder' needs data.root (a scene-folder dataset root)")
        train, held_out = folder_datasets(data)
        if eval is not None and eval.index is not None:
            from cameo_bench.evaluation.protocol import IndexedEvalSet

            held_out = IndexedEvalSet.from_spec(data, eval)
        return train, held_out
    raise ValueError(f"unknown data.kind {data.kind!r}; valid: ['synthetic', 'folder']")


def folder_datasets(data: DataSpec):
    """(train, test) scene-folder datasets of `data.split`: held-out scenes or held-out frames."""
    from cameo_bench.data.scene_dataset import SceneFolderDataset
    from cameo_bench.data.splits import FrameSplit, check_scene_split

    kwargs = dict(num_views=data.num_views, num_ref=data.num_ref, image_size=data.image_size, seed=data.seed,
                  frame_spacing=tuple(data.frame_spacing), resize_mode=data.resize_mode,
                  samples_per_scene=data.samples_per_scene, match_image_size=data.match_image_size,
                  max_view_change_deg=None if data.view_change_deg is None else tuple(data.view_change_deg))
    if data.split == "frame":
        kwargs["frame_split"] = FrameSplit(every=data.test_every, frames=tuple(data.test_frames))
    else:
        check_scene_split(data.root)
    train = SceneFolderDataset(data.root, split="train", **kwargs)
    with warnings.catch_warnings():  # the same crop warning as the training set's
        warnings.simplefilter("ignore")
        test = SceneFolderDataset(data.root, split="test", **kwargs)
    from cameo_bench.data.check import check_frames

    check_frames([*train.cameras, *test.cameras])  # a corrupt frame is named now, not mid-run (headers only)
    warn_if_few_samples(distinct_samples(train), data)
    return train, test


def distinct_samples(dataset, limit: int = 20_000) -> int:
    """How many items of a scene-folder dataset hold different (scene, frames) draws: a 3-frame
    scene has few, however many `samples_per_scene` it is asked for. Counted from the draws alone
    (no image is read); datasets beyond `limit` items are taken as all distinct."""
    if not hasattr(dataset, "sample_frames") or len(dataset) > limit:
        return len(dataset)
    return len({(scene, tuple(frames)) for scene, frames in map(dataset.sample_frames, range(len(dataset)))})


def warn_if_few_samples(num_items: int, data: DataSpec) -> None:
    """A training set of fewer distinct samples than one batch repeats samples inside every batch: say so."""
    if num_items >= data.batch_size:
        return
    more = ("raise data.samples_per_scene (distinct frame draws per scene)" if data.kind == "folder"
            else "raise data.num_scenes")
    warnings.warn(f"the training set has {num_items} distinct sample(s), fewer than data.batch_size = "
                  f"{data.batch_size}: every batch repeats samples. To train on distinct samples, {more} "
                  "or lower data.batch_size", stacklevel=2)


class MemoryCache:
    """Items of a deterministic dataset, rendered once. Synthetic scenes are cheap to keep.

    It also keeps values computed from a held item (`keep` / `derived`; the correspondence
    targets of a deterministic source, `engine/target_cache.py`): a held item is the same tensors
    at every read, so a value computed from them stays exact for as long as the cache lives.
    """

    def __init__(self, dataset, limit_bytes: int = 2 << 30):
        self.dataset = dataset
        self.items: dict[int, dict] = {}
        self.limit = limit_bytes
        self.size = 0
        self.derived_values: dict[tuple, object] = {}  # (index, key) -> value computed from item `index`
        self.derived_size = 0

    def derived(self, index: int, key):
        """The value `keep` stored for item `index` under `key`, or None."""
        return self.derived_values.get((index, key))

    def keep(self, index: int, key, value, nbytes: int, limit_bytes: int) -> bool:
        """Store `value`, computed from item `index` as this cache returns it, under `key`; only
        for an item the cache holds, and while all kept values stay within `limit_bytes`."""
        if index not in self.items or (index, key) in self.derived_values or self.derived_size + nbytes > limit_bytes:
            return False
        self.derived_values[(index, key)] = value
        self.derived_size += nbytes
        return True

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
    """Item indices of global batch `step`: epochs of seeded permutations, no state to save.

    Always `batch_size` indices: a set smaller than one batch fills it with successive
    permutations (samples repeat; `warn_if_few_samples` says so), instead of a short batch that
    would also not split over the ranks.
    """
    if num_items >= batch_size:
        per_epoch = num_items // batch_size
        epoch, slot = divmod(step, per_epoch)
        perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        return perm[slot * batch_size:(slot + 1) * batch_size].tolist()
    rounds = -(-batch_size // num_items)
    perms = [torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + step * rounds + r))
             for r in range(rounds)]
    return torch.cat(perms)[:batch_size].tolist()


def eval_batches(dataset, num_scenes: int, batch_size: int, device: torch.device) -> Iterator[dict]:
    """The first `num_scenes` held-out scenes, in order, as batches of `batch_size` on `device`."""
    n = min(num_scenes, len(dataset))
    for start in range(0, n, batch_size):
        yield batch_to(collate([dataset[i] for i in range(start, min(start + batch_size, n))]), device)
