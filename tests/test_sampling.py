"""Sampling scene folders from gin: the knobs, the scene and frame splits, and the warnings.

Expected frames come from images that encode their own frame index (grey level 10 i) and from
hand-listed hold-outs; the batch order of a small set is checked against its definition.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from cameo_bench import config
from cameo_bench.config.spec import DataSpec, SpecError
from cameo_bench.data.loading import batch_indices, build_datasets
from cameo_bench.data.scene_dataset import SceneFolderDataset
from cameo_bench.data.scene_format import DatasetWriter, SceneFolderError
from cameo_bench.data.splits import FrameSplit

SMOKE = "gin/experiments/smoke.gin"


def look_at_x(num_frames: int, step: float = 0.1) -> np.ndarray:
    """Cameras translating along x, looking down +z (OpenCV)."""
    c2w = np.stack([np.eye(4)] * num_frames)
    c2w[:, 0, 3] = step * np.arange(num_frames)
    return c2w


def K_for(h: int, w: int, f: float = 10.0) -> np.ndarray:
    return np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1]])


def index_images(num_frames: int, h: int = 8, w: int = 8) -> np.ndarray:
    return np.stack([np.full((h, w, 3), 10 * i, np.uint8) for i in range(num_frames)])


def frames_of(item) -> list[int]:
    return [int(round(v)) for v in (item["image"][:, 0].mean(dim=(-1, -2)) * 255 / 10).tolist()]


def make_dataset(root, scenes: dict[str, tuple[str, int]], h: int = 8, w: int = 8):
    """scenes: id -> (split, number of frames)."""
    with DatasetWriter(root) as writer:
        for scene_id, (split, n) in scenes.items():
            writer.add(scene_id, split, images=index_images(n, h, w), K=np.stack([K_for(h, w)] * n), c2w=look_at_x(n))
    return root


def folder_spec(root, **fields) -> DataSpec:
    return DataSpec(kind="folder", root=str(root), **fields)


# ------------------------------------------------------------------------------------------------
# gin -> dataset


def test_gin_sampling_knobs_reach_the_dataset(tmp_path):
    root = make_dataset(tmp_path / "ds", {"a": ("train", 12), "b": ("test", 12)}, h=8, w=6)
    exp = config.parse([SMOKE], [
        "data.kind = 'folder'", f"data.root = '{root}'", "data.image_size = (8, 6)", "data.samples_per_scene = 5",
        "data.frame_spacing = (1, 3)", "data.view_change_deg = (0.0, 90.0)", "data.resize_mode = 'stretch'",
        "data.num_views = 3", "data.num_ref = 2"])
    train, test = build_datasets(exp.data)
    assert train.image_size == (8, 6) and train.samples_per_scene == 5 and train.frame_spacing == (1, 3)
    assert train.max_view_change_deg == (0.0, 90.0) and train.resize_mode == "stretch" and train.num_ref == 2
    assert len(train) == 5 and len(test) == 5 and train.scene_ids == ["a"] and test.scene_ids == ["b"]
    item = train[3]
    assert item["image"].shape == (3, 3, 8, 6) and item["num_ref"] == 2
    frames = frames_of(item)
    assert set(np.diff(sorted(frames)).tolist()) <= {1, 2, 3}


@pytest.mark.parametrize("fields, binding", [
    (dict(frame_spacing=(3, 1)), "data.frame_spacing"),
    (dict(frame_spacing=(0, 2)), "data.frame_spacing"),
    (dict(view_change_deg=(50.0, 10.0)), "data.view_change_deg"),
    (dict(view_change_deg=(0.0, 200.0)), "data.view_change_deg"),
    (dict(samples_per_scene=0), "data.samples_per_scene"),
    (dict(split="frames"), "data.split"),
    (dict(test_every=1), "data.test_every"),
    (dict(test_frames=("a", "a")), "data.test_frames"),
    (dict(test_frames=(-1,)), "data.test_frames"),
    (dict(resize_mode="crop"), "data.resize_mode"),
    (dict(image_size=(16, 0)), "data.image_size"),
    (dict(match_image_size=(4,)), "data.match_image_size"),
])
def test_bad_sampling_values_name_the_binding(fields, binding):
    with pytest.raises(SpecError) as err:
        folder_spec("/data", **fields)
    assert binding in err.value.bindings and binding in str(err.value)


def test_folder_knobs_on_synthetic_data_are_an_error():
    with pytest.raises(SpecError, match="data.samples_per_scene = 4 applies to scene folders"):
        DataSpec(samples_per_scene=4)
    with pytest.raises(SpecError, match="data.split"):
        DataSpec(split="frame")
    DataSpec(image_size=(16, 24))  # synthetic scenes take (H, W) too


# ------------------------------------------------------------------------------------------------
# frame split


def test_frame_split_train_and_test_never_share_a_target_frame(tmp_path):
    root = make_dataset(tmp_path / "ds", {"capture": ("train", 20)})
    train, test = build_datasets(folder_spec(root, split="frame", test_every=5, samples_per_scene=40,
                                             frame_spacing=(1, 2), num_views=3, num_ref=1, image_size=8, batch_size=2))
    held_out = {0, 5, 10, 15}
    train_frames = set()
    for i in range(len(train)):
        frames = frames_of(train[i])
        assert train.sample_frames(i)[1] == frames
        train_frames |= set(frames)  # references and targets alike: training never reads a held-out frame
    assert train_frames.isdisjoint(held_out) and train_frames == set(range(20)) - held_out
    # one item per pair of held-out frames (2 targets), references = the nearest training frame
    assert [test.sample_frames(i)[1] for i in range(len(test))] == [[1, 0, 5], [9, 10, 15]]
    for i in range(len(test)):
        frames = frames_of(test[i])
        assert set(frames[1:]) <= held_out and frames[0] not in held_out


def test_frame_split_by_names_and_indices_with_references_nearest_in_index(tmp_path):
    root = make_dataset(tmp_path / "ds", {"capture": ("train", 9)})
    by_name = SceneFolderDataset(root, 3, "test", num_ref=2, frame_split=FrameSplit(frames=("000004",)))
    by_index = SceneFolderDataset(root, 3, "test", num_ref=2, frame_split=FrameSplit(frames=(4,)))
    # num_targets = 1: the single held-out frame; references 3 and 5 (distance 1; the next, 2 and 6, are farther)
    assert by_name.sample_frames(0) == by_index.sample_frames(0) == ("capture", [3, 5, 4])
    last = SceneFolderDataset(root, 3, "test", num_ref=1, frame_split=FrameSplit(frames=(8, 0, 4)))
    # 3 held-out frames, 2 targets per item: the last item overlaps the one before
    assert [last.sample_frames(i)[1] for i in range(len(last))] == [[1, 0, 4], [3, 4, 8]]
    with pytest.raises(SceneFolderError, match=r"names frame 'x'.*lacks"):
        SceneFolderDataset(root, 3, "train", frame_split=FrameSplit(frames=("x",)))
    with pytest.raises(SceneFolderError, match="out of range"):
        SceneFolderDataset(root, 3, "train", frame_split=FrameSplit(frames=(9,)))


def test_frame_split_alternates_scenes_in_the_test_set(tmp_path):
    root = make_dataset(tmp_path / "ds", {"a": ("train", 9), "b": ("test", 9)})
    test = SceneFolderDataset(root, 2, "test", frame_split=FrameSplit(every=4))  # held out: 0, 4, 8
    assert [test.sample_frames(i)[0] for i in range(len(test))] == ["a", "b"] * 3


# ------------------------------------------------------------------------------------------------
# scene split


def test_scene_split_refuses_shared_scenes_and_a_missing_test_split(tmp_path):
    shared = make_dataset(tmp_path / "shared", {"a": ("train", 6)})
    index = json.loads((shared / "dataset.json").read_text())
    index["splits"]["test"] = ["a"]  # the same scene in both splits
    (shared / "dataset.json").write_text(json.dumps(index))
    with pytest.raises(SceneFolderError, match=r"both list scene\(s\) \['a'\].*data.split = 'frame'"):
        build_datasets(folder_spec(shared))
    only_train = make_dataset(tmp_path / "one", {"a": ("train", 6)})
    with pytest.raises(SceneFolderError, match=r"no split 'test'.*data.split = 'frame'"):
        build_datasets(folder_spec(only_train))


def test_scenes_alternate_so_the_first_held_out_items_cover_every_scene(tmp_path):
    root = make_dataset(tmp_path / "ds", {"a": ("test", 6), "b": ("test", 6), "c": ("test", 6)})
    ds = SceneFolderDataset(root, 2, "test", samples_per_scene=4)
    assert len(ds) == 12 and [ds.sample_frames(i)[0] for i in range(6)] == ["a", "b", "c"] * 2


# ------------------------------------------------------------------------------------------------
# batches of distinct samples


def test_fewer_distinct_samples_than_a_batch_warns_and_the_batch_is_still_full(tmp_path):
    root = make_dataset(tmp_path / "ds", {"a": ("train", 3), "b": ("test", 3)})
    # 3 frames, 3 views, spacing 1: one window; the reference is one of 3 frames -> 3 distinct samples
    with pytest.warns(UserWarning, match=r"3 distinct sample\(s\), fewer than data.batch_size = 4"):
        train, _ = build_datasets(folder_spec(root, samples_per_scene=50, batch_size=4))
    assert len(train) == 50
    idx = batch_indices(1, 4, step=7, seed=0)
    assert idx == [0, 0, 0, 0]
    idx = batch_indices(3, 8, step=2, seed=1)
    assert len(idx) == 8 and sorted(idx[:3]) == [0, 1, 2] and sorted(idx[3:6]) == [0, 1, 2]
    assert idx == batch_indices(3, 8, step=2, seed=1) and idx != batch_indices(3, 8, step=3, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_datasets(folder_spec(root, samples_per_scene=50, batch_size=3))  # 3 distinct: enough


def test_batch_order_of_a_set_at_least_one_batch_large_is_unchanged():
    """The epochs-of-permutations definition, written out: slot s of epoch e of a seeded permutation."""
    for n, bs, seed in ((16, 2, 0), (10, 3, 5), (4, 4, 1)):
        per_epoch = n // bs
        for step in range(7):
            epoch, slot = divmod(step, per_epoch)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            assert batch_indices(n, bs, step, seed) == perm[slot * bs:(slot + 1) * bs].tolist()


# ------------------------------------------------------------------------------------------------
# resize: portrait frames


def test_portrait_frames_keep_a_portrait_size_and_a_square_size_warns(tmp_path):
    root = make_dataset(tmp_path / "ds", {"p": ("train", 4), "q": ("test", 4)}, h=32, w=24)  # 4:3 portrait
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the frames' aspect: no crop, no warning
        train, _ = build_datasets(folder_spec(root, image_size=(16, 12), num_views=2, batch_size=1))
    item = train[0]
    assert item["image"].shape[-2:] == (16, 12)
    K = item["intrinsics"][0]
    assert torch.allclose(K[:2, 2], torch.tensor([5.5, 7.5]))  # (w - 1)/2, (h - 1)/2: nothing was cut off
    with pytest.warns(UserWarning, match=r"32x24 \(HxW\) are centre-cropped.*cutting off 25%.*\(16, 12\)"):
        SceneFolderDataset(root, 2, image_size=16)
