"""Training items from a scene-folder dataset: which frames form a sample, and resizing them with their K.

Reading and validating the files is `scene_format`'s job; this module only decides which frames
of which scene make item `i` (deterministically, so DataLoader workers agree) and brings the views
to one image size with the matching intrinsics update.
"""
from __future__ import annotations

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
        raise ValueError(f"resize mode {mode!r} is not one of ('center_crop', 'stretch')")
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
    Item `i` depends only on (seed, i), so runs and DataLoader workers agree.

    Items follow the batch format without the batch dimension: image [V,3,H,W] in [0,1],
    intrinsics [V,3,3], cam2world [V,4,4], depth [V,H,W] (if the scene has depth and `load_depth`),
    point_map [V,3,H,W] (if `point_map_source` is given), num_ref. `image_size` (int or (H, W))
    resizes every view with the matching K update, after a centre crop to the target aspect
    (`resize_mode="center_crop"`) or by stretching (`"stretch"`).
    """

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
    ):
        self.root = Path(root)
        if not 1 <= num_ref < num_views:
            raise ValueError(f"num_ref must be in [1, num_views - 1] = [1, {num_views - 1}], got {num_ref}")
        lo, hi = (int(v) for v in frame_spacing)
        if not 1 <= lo <= hi:
            raise ValueError(f"frame_spacing must be (min, max) with 1 <= min <= max, got {frame_spacing}")
        if max_view_change_deg is not None and not 0 <= max_view_change_deg[0] <= max_view_change_deg[1]:
            raise ValueError(f"max_view_change_deg must be (lo, hi) with 0 <= lo <= hi, got {max_view_change_deg}")
        if resize_mode not in ("center_crop", "stretch"):
            raise ValueError(f"resize_mode {resize_mode!r} is not one of ('center_crop', 'stretch')")
        self.num_views, self.num_ref, self.frame_spacing = num_views, num_ref, (lo, hi)
        self.max_view_change_deg = max_view_change_deg
        if image_size is not None:
            image_size = (image_size, image_size) if isinstance(image_size, int) else image_size
            image_size = tuple(int(s) for s in image_size)
        self.image_size = image_size
        self.seed, self.resize_mode, self.load_depth = seed, resize_mode, load_depth
        self.point_map_source, self.samples_per_scene, self.max_tries = point_map_source, samples_per_scene, max_tries

        index = read_dataset_index(self.root)
        if split not in index["splits"]:
            raise SceneFolderError(f"{self.root / 'dataset.json'}: no split {split!r}; "
                                   f"available: {sorted(index['splits'])}")
        self.scene_ids = list(index["splits"][split])
        if not self.scene_ids:
            raise SceneFolderError(f"{self.root / 'dataset.json'}: split {split!r} is empty")
        self.cameras = [read_cameras(scene_dir(self.root, s)) for s in self.scene_ids]
        needed = (num_views - 1) * lo + 1
        for cams in self.cameras:
            if len(cams) < needed:
                raise SceneFolderError(f"{cams.folder / 'cameras.json'}: field 'frames' has {len(cams)} frames, "
                                       f"fewer than the {needed} needed for {num_views} views at spacing >= {lo}")
            if point_map_source is not None and point_map_source not in cams.pointmap_sources:
                raise SceneFolderError(f"{cams.folder / 'cameras.json'}: no point maps from {point_map_source!r} "
                                       f"(pointmap_sources = {cams.pointmap_sources})")

    def __len__(self) -> int:
        return len(self.scene_ids) * self.samples_per_scene

    def sample_frames(self, index: int) -> tuple[str, list[int]]:
        """(scene id, frame indices references first) of item `index`; deterministic in (seed, index)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        cams = self.cameras[index // self.samples_per_scene]
        rng = np.random.default_rng([self.seed, index])
        for _ in range(self.max_tries):
            frames = self._draw_window(rng, len(cams))
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
        return self.scene_ids[index // self.samples_per_scene], [int(f) for f in (*refs, *targets)]

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

    def __getitem__(self, index: int) -> dict:
        scene_id, frames = self.sample_frames(index)
        cams = self.cameras[index // self.samples_per_scene]
        views = [self._load_view(cams, f) for f in frames]
        sizes = {tuple(v["image"].shape[-2:]) for v in views}
        if len(sizes) > 1:
            raise SceneFolderError(f"{cams.folder}: frames {frames} have different sizes {sorted(sizes)}; "
                                   "set image_size to resize them to one size")
        item = {key: torch.stack([v[key] for v in views]) for key in views[0]}
        item["num_ref"] = self.num_ref
        return validate_batch(item, batched=False)

    def _load_view(self, cams: SceneCameras, i: int) -> dict[str, torch.Tensor]:
        hw = tuple(int(s) for s in cams.sizes[i])
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
        if self.image_size is not None:
            A, box = crop_resize_matrix(hw, self.image_size, self.resize_mode)
            K = A @ K
            image = _resample(image, box, self.image_size, "bilinear").clamp(0, 1)
            if depth is not None:
                depth = _resample(depth, box, self.image_size, "nearest-exact")
            if point_map is not None:
                point_map = _resample(point_map, box, self.image_size, "nearest-exact")
        view["image"] = image
        view["intrinsics"] = torch.from_numpy(K).float()
        view["cam2world"] = torch.from_numpy(cams.c2w[i]).float()
        if depth is not None:
            view["depth"] = depth[0]
        if point_map is not None:
            view["point_map"] = point_map
        return view
