"""Training items from a scene-folder dataset: which frames form a sample, and resizing them with their K.

Reading and validating the files is `scene_format`'s job, which frames each split may use is
`splits`'s, SfM tracks as batch keys are `tracks`'s; this module decides which frames of which
scene make item `i` (deterministically, so DataLoader workers agree) and brings the views to one
image size with the matching intrinsics update.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from cameo_bench import geometry
from cameo_bench.data.batch import validate_batch
from cameo_bench.data.scene_format import (
    SceneCameras,
    SceneFolderError,
    read_cameras,
    read_dataset_index,
    read_depth,
    read_image,
    read_pointmap,
    scene_dir,
)
from cameo_bench.data.splits import FrameSplit, all_scenes
from cameo_bench.data.tracks import ScenePoints, has_tracks, pad_views, view_tracks

RESIZE_MODES = ("center_crop", "stretch")  # config/spec.py keeps the same tuple


# ----------------------------------------------------------------------------------------------
# Resizing with the matching intrinsics update


def crop_resize_matrix(in_hw: tuple[int, int], out_hw: tuple[int, int], mode: str) -> tuple[np.ndarray, tuple]:
    """Pixel map A (K' = A @ K) and crop box (y0, x0, h, w) for `center_crop` or `stretch`.

    With the pixel-centre convention a resize by s maps u to s (u + 0.5) - 0.5, not s u: the
    half-pixel term is what keeps a 3D point on the same image content after resizing.
    """
    (H, W), (oh, ow) = in_hw, out_hw
    if mode == "stretch":
        y0, x0, ch, cw = 0, 0, H, W
    elif mode == "center_crop":
        if W * oh > H * ow:  # too wide for the target aspect: crop columns
            ch, cw = H, max(1, round(H * ow / oh))
        else:
            ch, cw = max(1, round(W * oh / ow)), W
        y0, x0 = (H - ch) // 2, (W - cw) // 2
    else:
        raise ValueError(f"resize mode {mode!r} is not one of {RESIZE_MODES}")
    sx, sy = ow / cw, oh / ch
    crop = np.array([[1.0, 0, -x0], [0, 1, -y0], [0, 0, 1]])
    scale = np.array([[sx, 0, 0.5 * (sx - 1)], [0, sy, 0.5 * (sy - 1)], [0, 0, 1]])
    return scale @ crop, (y0, x0, ch, cw)


def _resample(t: torch.Tensor, box: tuple, out_hw: tuple[int, int], mode: str) -> torch.Tensor:
    """Crop `t [C, H, W]` to box and resize; `bilinear` antialiases, `nearest-exact` keeps samples."""
    y0, x0, ch, cw = box
    t = t[:, y0:y0 + ch, x0:x0 + cw]
    if tuple(t.shape[-2:]) == tuple(out_hw):
        return t
    if mode == "bilinear":
        return torch.nn.functional.interpolate(t[None], size=out_hw, mode="bilinear", align_corners=False,
                                               antialias=True)[0]
    return torch.nn.functional.interpolate(t[None], size=out_hw, mode="nearest-exact")[0]


class SceneFolderDataset(torch.utils.data.Dataset):
    """Samples `num_views` frames per scene of a scene-folder dataset, references first.

    Frames are chosen as an increasing sequence whose consecutive index gaps are drawn from
    `frame_spacing = (min, max)` (the baseline knob for video datasets, as MVGenMaster does);
    `num_ref` of them, chosen at random, become the references and come first, each group in
    frame order. With `max_view_change_deg = (lo, hi)` a sample is redrawn (up to `max_tries`)
    until the largest relative rotation between any reference and any target lies in [lo, hi].
    Item `i` is draw `i // S` of scene `i % S` (S scenes; scenes alternate so that the first
    items of a held-out set cover distinct scenes) and depends only on (seed, i), so runs and
    DataLoader workers agree. There are `samples_per_scene` items per scene.

    `frame_split` (a `splits.FrameSplit`) holds out frames instead of scenes: every scene that
    dataset.json lists is used, and `split` is the role. `"train"` draws as above from the
    training frames only (spacing counts positions among them); `"test"` has one fixed item per
    group of `num_views - num_ref` consecutive held-out frames (the last group overlaps the one
    before when they do not divide evenly) whose references are the `num_ref` training frames
    nearest in frame index (ties: the earlier frame); `samples_per_scene`, spacing and view
    change do not apply to it.

    Items follow the batch format without the batch dimension: image [V,3,H,W] in [0,1],
    intrinsics [V,3,3], cam2world [V,4,4], depth [V,H,W] (if the scene has depth and `load_depth`),
    point_map [V,3,H,W] (if `point_map_source` is given), track_ids [V,M] / track_uv [V,M,2] /
    sparse_depth [V,H,W] (scenes with SfM tracks, see `data.tracks`; `load_tracks=None` loads them
    when every scene has them), match_image [V,3,h,w] (with `match_image_size`: the same crop at
    another size, for SIFT), num_ref. `image_size` (int or (H, W)) resizes every view with the
    matching K update, after a centre crop to the target aspect (`resize_mode="center_crop"`,
    with a warning when that cuts off more than 1% of a frame) or by stretching (`"stretch"`).
    """

    # Set by `data.latents.with_latent_cache`: a callable (cams, frames) -> {"latent": [V, C, h, w], ...};
    # items then carry cached latents instead of `image`, and no image file is read.
    latents = None

    @property
    def load_images(self) -> bool:
        return self.latents is None

    def __init__(
        self,
        root: str | Path,
        num_views: int,
        split: str = "train",
        num_ref: int = 1,
        frame_spacing: tuple[int, int] = (1, 1),
        max_view_change_deg: tuple[float, float] | None = None,
        image_size: int | tuple[int, int] | None = None,
        seed: int = 0,
        *,
        resize_mode: str = "center_crop",
        load_depth: bool = True,
        point_map_source: str | None = None,
        samples_per_scene: int = 1,
        max_tries: int = 100,
        frame_split: FrameSplit | None = None,
        load_tracks: bool | None = None,
        match_image_size: int | tuple[int, int] | None = None,
    ):
        self.root = Path(root)
        if not 1 <= num_ref < num_views:
            raise ValueError(f"num_ref must be in [1, num_views - 1] = [1, {num_views - 1}], got {num_ref}")
        lo, hi = (int(v) for v in frame_spacing)
        if not 1 <= lo <= hi:
            raise ValueError(f"frame_spacing must be (min, max) with 1 <= min <= max, got {frame_spacing}")
        if max_view_change_deg is not None and not 0 <= max_view_change_deg[0] <= max_view_change_deg[1]:
            raise ValueError(f"max_view_change_deg must be (lo, hi) with 0 <= lo <= hi, got {max_view_change_deg}")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {resize_mode!r} is not one of {RESIZE_MODES}")
        if int(samples_per_scene) < 1:
            raise ValueError(f"samples_per_scene must be >= 1, got {samples_per_scene}")
        self.num_views, self.num_ref, self.frame_spacing = num_views, num_ref, (lo, hi)
        self.max_view_change_deg = max_view_change_deg
        self.image_size = _hw(image_size)
        self.match_image_size = _hw(match_image_size)
        self.seed, self.resize_mode, self.load_depth = seed, resize_mode, load_depth
        self.point_map_source, self.samples_per_scene, self.max_tries = point_map_source, int(samples_per_scene), max_tries
        self.frame_split = frame_split

        if frame_split is None:
            index = read_dataset_index(self.root)
            if split not in index["splits"]:
                raise SceneFolderError(f"{self.root / 'dataset.json'}: no split {split!r}; "
                                       f"available: {sorted(index['splits'])}")
            self.scene_ids = list(index["splits"][split])
        else:
            if split not in ("train", "test"):
                raise ValueError(f"with a frame split, split is the role 'train' or 'test', got {split!r}")
            self.scene_ids = all_scenes(self.root)
        if not self.scene_ids:
            raise SceneFolderError(f"{self.root / 'dataset.json'}: split {split!r} is empty")
        self.cameras = [read_cameras(scene_dir(self.root, s)) for s in self.scene_ids]
        for cams in self.cameras:
            if point_map_source is not None and point_map_source not in cams.pointmap_sources:
                raise SceneFolderError(f"{cams.folder / 'cameras.json'}: no point maps from {point_map_source!r} "
                                       f"(pointmap_sources = {cams.pointmap_sources})")

        # pools[s]: the frames item draws of scene s choose from; fixed: the frame-split test items
        self.pools = [np.arange(len(c)) if frame_split is None else frame_split.train_indices(c)
                      for c in self.cameras]
        self.fixed: list[tuple[int, list[int]]] | None = None
        if frame_split is not None and split == "test":
            self.fixed = self._held_out_items()
        else:
            needed = (num_views - 1) * lo + 1
            for cams, pool in zip(self.cameras, self.pools):
                if len(pool) < needed:
                    which = "frames" if frame_split is None else "training frames (after the frame hold-out)"
                    raise SceneFolderError(f"{cams.folder / 'cameras.json'}: field 'frames' has {len(pool)} {which}, "
                                           f"fewer than the {needed} needed for {num_views} views at spacing >= {lo}")
        self.tracks_on = self._decide_tracks(load_tracks)
        self._points: dict[int, ScenePoints] = {}
        self._warn_about_crops()

    # ------------------------------------------------------------------------------ which frames
    def __len__(self) -> int:
        if self.fixed is not None:
            return len(self.fixed)
        return len(self.scene_ids) * self.samples_per_scene

    def scene_of(self, index: int) -> int:
        """Position in `scene_ids` of item `index`'s scene."""
        return self.fixed[index][0] if self.fixed is not None else index % len(self.scene_ids)

    def sample_frames(self, index: int) -> tuple[str, list[int]]:
        """(scene id, frame indices references first) of item `index`; deterministic in (seed, index)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        s = self.scene_of(index)
        if self.fixed is not None:
            return self.scene_ids[s], list(self.fixed[index][1])
        cams, pool = self.cameras[s], self.pools[s]
        rng = np.random.default_rng([self.seed, index])
        for _ in range(self.max_tries):
            frames = pool[self._draw_window(rng, len(pool))]
            ref_pos = np.sort(rng.choice(self.num_views, self.num_ref, replace=False))
            refs = frames[ref_pos]
            targets = np.delete(frames, ref_pos)
            if self.max_view_change_deg is None:
                break
            # relative rotation angle: for orbit cameras the azimuth step whatever the elevation, the
            # same measure as the synthetic set's `azimuth_step_deg`
            change = float(geometry.rotation_angle_deg(cams.c2w[refs][:, None], cams.c2w[targets][None]).max())
            if self.max_view_change_deg[0] <= change <= self.max_view_change_deg[1]:
                break
        else:
            raise SceneFolderError(
                f"{cams.folder}: no sample of {self.num_views} views with frame spacing {self.frame_spacing} "
                f"has a max reference-target rotation within {self.max_view_change_deg} deg after "
                f"{self.max_tries} tries; widen the range or the spacing")
        return self.scene_ids[s], [int(f) for f in (*refs, *targets)]

    def _draw_window(self, rng: np.random.Generator, num_frames: int) -> np.ndarray:
        """Increasing frame indices whose gaps lie in frame_spacing and which fit in the scene."""
        lo, hi = self.frame_spacing
        gaps = []
        slack = num_frames - 1 - (self.num_views - 1) * lo  # >= 0, checked in __init__
        for _ in range(self.num_views - 1):
            gap = int(rng.integers(lo, min(hi, lo + slack) + 1))
            slack -= gap - lo
            gaps.append(gap)
        offsets = np.concatenate([[0], np.cumsum(gaps)]).astype(np.int64)
        start = int(rng.integers(0, num_frames - offsets[-1]))
        return start + offsets

    def _held_out_items(self) -> list[tuple[int, list[int]]]:
        """Frame-split test items, scenes alternating: (scene position, references + targets)."""
        num_targets = self.num_views - self.num_ref
        per_scene = []
        for s, (cams, train) in enumerate(zip(self.cameras, self.pools)):
            test = self.frame_split.test_indices(cams)
            where = cams.folder / "cameras.json"
            if len(test) < num_targets:
                raise SceneFolderError(f"{where}: {len(test)} held-out frame(s) {test.tolist()}, fewer than the "
                                       f"{num_targets} targets of a sample; hold out more frames")
            if len(train) < self.num_ref:
                raise SceneFolderError(f"{where}: {len(train)} training frame(s) left after the hold-out, fewer "
                                       f"than the {self.num_ref} references of a sample")
            starts = list(range(0, len(test) - num_targets + 1, num_targets))
            if starts[-1] + num_targets < len(test):
                starts.append(len(test) - num_targets)
            items = []
            for start in starts:
                targets = test[start:start + num_targets]
                gap = np.abs(train[:, None] - targets[None, :]).min(axis=1)  # distance to the nearest target
                refs = np.sort(train[np.lexsort((train, gap))[:self.num_ref]])
                items.append((s, [int(f) for f in (*refs, *targets)]))
            per_scene.append(items)
        longest = max(len(items) for items in per_scene)
        return [items[k] for k in range(longest) for items in per_scene if k < len(items)]

    # ------------------------------------------------------------------------------ checks
    def _decide_tracks(self, load_tracks: bool | None) -> bool:
        have = [has_tracks(c) for c in self.cameras]
        if load_tracks is False or not any(have):
            if load_tracks:
                raise SceneFolderError(f"{self.cameras[0].folder}: load_tracks=True but no scene has SfM tracks")
            return False
        if not all(have):
            lacking = [s for s, h in zip(self.scene_ids, have) if not h]
            if load_tracks:
                raise SceneFolderError(f"{self.root}: load_tracks=True but scene(s) {lacking[:5]} have no tracks")
            warnings.warn(f"{self.root}: SfM tracks not loaded: scene(s) {lacking[:5]} have none (a batch needs "
                          "the same keys in every sample)")
            return False
        return True

    def _warn_about_crops(self) -> None:
        """A centre crop to another aspect cuts off image content: say so once, with the fix."""
        if self.image_size is None or self.resize_mode != "center_crop":
            return
        cut = {}
        for cams in self.cameras:
            for h, w in {tuple(int(v) for v in hw) for hw in cams.sizes}:
                _, (_, _, ch, cw) = crop_resize_matrix((h, w), self.image_size, "center_crop")
                lost = 1 - ch * cw / (h * w)
                if lost > 0.01:
                    cut[(h, w)] = lost
        if cut:
            (h, w), lost = max(cut.items(), key=lambda kv: kv[1])
            H, W = self.image_size
            portrait = f" e.g. data.image_size = ({H}, {max(1, round(H * w / h))})"
            warnings.warn(
                f"{self.root}: frames of {h}x{w} (HxW) are centre-cropped to the {H}x{W} aspect of "
                f"image_size (gin data.image_size), cutting off {100 * lost:.0f}% of each frame"
                + (f" ({len(cut)} frame sizes affected)" if len(cut) > 1 else "")
                + f". Give the frames' aspect,{portrait}, or set data.resize_mode = 'stretch'")

    # ------------------------------------------------------------------------------ loading
    def __getitem__(self, index: int) -> dict:
        scene_id, frames = self.sample_frames(index)
        s = self.scene_of(index)
        cams = self.cameras[s]
        views = [self._load_view(s, cams, f) for f in frames]
        sizes = {tuple(v["image"].shape[-2:]) for v in views if "image" in v}
        if len(sizes) > 1:
            raise SceneFolderError(f"{cams.folder}: frames {frames} have different sizes {sorted(sizes)}; "
                                   "set image_size to resize them to one size")
        ragged = {"track_ids", "track_uv"}
        item = {key: torch.stack([v[key] for v in views]) for key in views[0] if key not in ragged}
        if self.tracks_on:
            item["track_ids"], item["track_uv"] = pad_views([v["track_ids"] for v in views],
                                                            [v["track_uv"] for v in views])
        if self.latents is not None:
            item.update(self.latents(cams, frames))
        item["num_ref"] = self.num_ref
        return validate_batch(item, batched=False)

    def _scene_points(self, s: int) -> ScenePoints:
        if s not in self._points:
            self._points[s] = ScenePoints(self.cameras[s])
        return self._points[s]

    def _load_view(self, s: int, cams: SceneCameras, i: int) -> dict[str, torch.Tensor]:
        hw = tuple(int(v) for v in cams.sizes[i])
        image = None  # not read when training on cached latents (`load_images = False`, data.latents)
        if self.load_images or self.match_image_size is not None:
            image = torch.from_numpy(read_image(cams.image_paths[i], hw)).permute(2, 0, 1).float() / 255.0  # [3, H, W]
        K = cams.K[i]
        view = {}
        depth = None
        if self.load_depth and cams.depth_paths is not None:
            depth = torch.from_numpy(read_depth(cams.depth_paths[i], hw))[None]  # [1, H, W]
        point_map = None
        if self.point_map_source is not None:
            xyz, _ = read_pointmap(cams.pointmap_path(self.point_map_source, i))
            point_map = torch.from_numpy(xyz).permute(2, 0, 1)  # [3, h, w]
            if tuple(point_map.shape[-2:]) != hw:  # point maps may come at the model's resolution
                point_map = _resample(point_map, (0, 0, *point_map.shape[-2:]), hw, "nearest-exact")
        out_hw = self.image_size or hw
        A, box = crop_resize_matrix(hw, out_hw, self.resize_mode)
        if self.match_image_size is not None:  # before `image` is resized: from the stored pixels
            view["match_image"] = _resample(image, box, self.match_image_size, "bilinear").clamp(0, 1)
        if self.image_size is not None:
            K = A @ K
            image = _resample(image, box, self.image_size, "bilinear").clamp(0, 1) if self.load_images else None
            if depth is not None:
                depth = _resample(depth, box, self.image_size, "nearest-exact")
            if point_map is not None:
                point_map = _resample(point_map, box, self.image_size, "nearest-exact")
        if self.load_images:
            view["image"] = image
        view["intrinsics"] = torch.from_numpy(K).float()
        view["cam2world"] = torch.from_numpy(cams.c2w[i]).float()
        if depth is not None:
            view["depth"] = depth[0]
        if point_map is not None:
            view["point_map"] = point_map
        if self.tracks_on:
            ids, uv, xyz = self._scene_points(s).frame(i)
            view["track_ids"], view["track_uv"], view["sparse_depth"] = view_tracks(
                ids, uv, xyz, A, K, cams.c2w[i], out_hw)
        return view


def _hw(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    size = (size, size) if isinstance(size, int) else size
    return tuple(int(s) for s in size)
