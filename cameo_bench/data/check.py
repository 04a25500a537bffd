"""Validate a scene-folder dataset before using it: frames decode, cameras are sane, splits are consistent.

`cameo-bench data check ROOT` runs `check_dataset` (every file decoded) and prints its summary;
training runs `check_frames` on the scenes it will read before step 0, the fast path: image
headers and end markers, depth array headers, no decoding. Both report every bad file at once,
each line naming the file and what is wrong, so a corrupt frame is found before a run, not in a
DataLoader worker hours into one.

Camera sanity beyond what `scene_format.read_cameras` already enforces (finite, pinhole K, rigid
c2w): the principal point lies on the image, the horizontal field of view is within
`FOV_RANGE_DEG` (normalised intrinsics, i.e. K not multiplied by the image size, fail here), and
fy / fx is within `ASPECT_RANGE` (swapped axes fail here).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from cameo_bench.data.scene_format import (SceneCameras, SceneFolderError, read_cameras,
    read_dataset_index, read_depth, read_image, read_mask, read_pointmap, read_tracks, scene_dir)

FOV_RANGE_DEG = (1.0, 170.0)
ASPECT_RANGE = (0.5, 2.0)
PNG_END = b"IEND"
JPEG_END = b"\xff\xd9"


@dataclass
class CheckReport:
    """What `check_dataset` found: problems (each names a file), warnings, and what the data holds."""

    root: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    splits: dict[str, list[str]] = field(default_factory=dict)
    frames: dict[str, int] = field(default_factory=dict)  # scene id -> frames
    resolutions: Counter = field(default_factory=Counter)  # (h, w) -> frames
    depth: set[str] = field(default_factory=set)  # scene ids with depth
    tracks: set[str] = field(default_factory=set)
    pointmaps: dict[str, set[str]] = field(default_factory=dict)  # source -> scene ids
    num_points: int = 0
    num_observations: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        scenes = sorted({s for ids in self.splits.values() for s in ids})
        lines = [f"{self.root}: {len(scenes)} scenes, {sum(self.frames.values())} frames"]
        for split, ids in self.splits.items():
            lines.append(f"  split {split}: {len(ids)} scenes, {sum(self.frames.get(s, 0) for s in ids)} frames")
        res = ", ".join(f"{h}x{w} ({n} frames)" for (h, w), n in self.resolutions.most_common())
        lines.append(f"  resolution (HxW): {res or 'none read'}")
        lines.append(f"  depth: {len(self.depth)}/{len(scenes)} scenes")
        pm = ", ".join(f"{src} {len(ids)}/{len(scenes)} scenes" for src, ids in sorted(self.pointmaps.items()))
        lines.append(f"  point maps: {pm or 'none'}")
        lines.append(f"  tracks: {len(self.tracks)}/{len(scenes)} scenes"
                     + (f" ({self.num_points} points, {self.num_observations} observations)" if self.tracks else ""))
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"BAD {p}" for p in self.problems]
        lines.append(f"{len(self.problems)} problem(s)" if self.problems else "ok")
        return "\n".join(lines)


def check_camera(K: np.ndarray, hw: tuple[int, int], where: str) -> list[str]:
    """Problems of one pinhole camera against its image size (see the module docstring)."""
    h, w = hw
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    problems = []
    if not (-0.5 <= cx <= w - 0.5 and -0.5 <= cy <= h - 0.5):
        problems.append(f"{where}: principal point ({cx:.4g}, {cy:.4g}) is off the {h}x{w} image")
    fov = math.degrees(2 * math.atan(w / (2 * fx)))
    if not FOV_RANGE_DEG[0] <= fov <= FOV_RANGE_DEG[1]:
        problems.append(f"{where}: horizontal field of view {fov:.4g} deg (fx = {fx:.4g} for width {w}) is outside "
                        f"{list(FOV_RANGE_DEG)}; normalised intrinsics must be multiplied by the image size")
    if not ASPECT_RANGE[0] <= fy / fx <= ASPECT_RANGE[1]:
        problems.append(f"{where}: fy / fx = {fy / fx:.4g} is outside {list(ASPECT_RANGE)} (swapped axes?)")
    return problems


def image_header_problem(path: Path, hw: tuple[int, int]) -> str | None:
    """Fast check of a png/jpg: header, size, and the end marker a truncated file lacks. For JPEG
    the end marker is looked for anywhere (phones append videos after it); PNG ends with IEND."""
    try:
        with Image.open(path) as im:
            size, fmt = (im.height, im.width), im.format
    except (OSError, ValueError, SyntaxError) as e:
        return f"{path}: cannot read image header ({e})"
    if size != tuple(hw):
        return f"{path}: image is {size[0]}x{size[1]} (HxW) but cameras.json says {hw[0]}x{hw[1]}"
    if fmt not in ("PNG", "JPEG"):
        return None
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 64))
        tail = f.read()
    if fmt == "PNG" and PNG_END not in tail:
        return f"{path}: truncated PNG (no IEND chunk at the end)"
    if fmt == "JPEG" and not tail.endswith(JPEG_END) and JPEG_END not in path.read_bytes()[2:]:
        return f"{path}: truncated JPEG (no end-of-image marker)"  # whole file read only if the tail lacks it
    return None


def _depth_header_problem(path: Path, hw: tuple[int, int]) -> str | None:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # header + size check, no read
    except (OSError, ValueError, EOFError) as e:
        return f"{path}: cannot read depth array ({e})"
    if array.shape != tuple(hw) or not np.issubdtype(array.dtype, np.floating):
        return f"{path}: depth must be a float array of shape {tuple(hw)}, got {array.dtype} {array.shape}"
    return None


def check_scene(cams: SceneCameras, *, decode: bool = True, cameras: bool = True,
                report: CheckReport | None = None) -> list[str]:
    """Problems of one scene whose cameras.json parsed; `decode=False` is the fast path. With a
    `report`, the scene's track counts are added to it."""
    problems = []
    for i, name in enumerate(cams.names):
        hw = (int(cams.sizes[i][0]), int(cams.sizes[i][1]))
        where = f"{cams.folder / 'cameras.json'}: frames[{i}] ({name})"
        if cameras:
            problems += check_camera(cams.K[i], hw, f"{where}.K")
        try:
            if decode:
                read_image(cams.image_paths[i], hw)
            elif (p := image_header_problem(cams.image_paths[i], hw)) is not None:
                problems.append(p)
            if cams.depth_paths is not None:
                if decode:
                    read_depth(cams.depth_paths[i], hw)
                elif (p := _depth_header_problem(cams.depth_paths[i], hw)) is not None:
                    problems.append(p)
            if decode and cams.mask_paths is not None:
                read_mask(cams.mask_paths[i], hw)
            if decode:
                for source in cams.pointmap_sources:
                    read_pointmap(cams.pointmap_path(source, i))
        except SceneFolderError as e:
            problems.append(str(e))
    if decode and cams.has_tracks:
        try:
            tracks = read_tracks(cams)
            if report is not None:
                report.num_points += len(tracks.ids)
                report.num_observations += sum(len(ids) for ids, _ in tracks.frames)
            for i, (_, uv) in enumerate(tracks.frames):
                h, w = (int(v) for v in cams.sizes[i])
                off = (uv[:, 0] < -0.5) | (uv[:, 0] > w - 0.5) | (uv[:, 1] < -0.5) | (uv[:, 1] > h - 0.5)
                if off.any():
                    problems.append(f"{cams.track_path(i)}: {int(off.sum())} observations lie off the "
                                    f"{h}x{w} image, e.g. uv = {uv[off][0].tolist()}")
        except SceneFolderError as e:
            problems.append(str(e))
    return problems


def check_dataset(root: str | Path, *, decode: bool = True) -> CheckReport:
    """Check a dataset root (dataset.json) or a single scene folder (cameras.json)."""
    root = Path(root)
    report = CheckReport(root)
    if not (root / "dataset.json").is_file() and (root / "cameras.json").is_file():
        report.splits = {"(scene folder)": ["."]}
        _check_one(report, root, ".", decode)
        return report
    try:
        index = read_dataset_index(root)
    except SceneFolderError as e:
        report.problems.append(str(e))
        return report
    report.splits = {k: list(v) for k, v in index["splits"].items()}
    seen: dict[str, str] = {}
    for split, ids in report.splits.items():
        if not ids:
            report.warnings.append(f"{root / 'dataset.json'}: split {split!r} is empty")
        for scene_id, count in Counter(ids).items():
            if count > 1:
                report.problems.append(f"{root / 'dataset.json'}: split {split!r} lists scene {scene_id!r} "
                                       f"{count} times")
        for scene_id in dict.fromkeys(ids):
            if scene_id in seen:
                report.warnings.append(f"{root / 'dataset.json'}: scene {scene_id!r} is in splits {seen[scene_id]!r} "
                                       f"and {split!r}: evaluation would sample training frames unless the "
                                       "split is by frame (data.split)")
                continue
            seen[scene_id] = split
            _check_one(report, scene_dir(root, scene_id), scene_id, decode)
    on_disk = {p.parent.relative_to(root / "scenes").as_posix() for p in (root / "scenes").rglob("cameras.json")}
    if unlisted := sorted(on_disk - set(seen)):
        report.warnings.append(f"{root / 'dataset.json'}: {len(unlisted)} scene folders are in no split, "
                               f"e.g. {unlisted[:3]}")
    return report


def _check_one(report: CheckReport, folder: Path, scene_id: str, decode: bool) -> None:
    try:
        cams = read_cameras(folder)
    except SceneFolderError as e:
        report.problems.append(str(e))
        return
    report.frames[scene_id] = len(cams)
    report.resolutions.update(tuple(int(v) for v in hw) for hw in cams.sizes)
    if cams.depth_paths is not None:
        report.depth.add(scene_id)
    for source in cams.pointmap_sources:
        report.pointmaps.setdefault(source, set()).add(scene_id)
    if cams.has_tracks:
        report.tracks.add(scene_id)
    report.problems += check_scene(cams, decode=decode, report=report)


def check_frames(scenes: Iterable[SceneCameras], max_listed: int = 20) -> None:
    """The pre-training fast path over the scenes a dataset will read: raises one `SceneFolderError`
    naming every bad file (image headers and end markers, depth headers; no decoding)."""
    unique = {str(cams.folder): cams for cams in scenes}  # train and test may share scenes (frame split)
    problems = [p for cams in unique.values() for p in check_scene(cams, decode=False, cameras=False)]
    if problems:
        more = f"\n  ... and {len(problems) - max_listed} more" if len(problems) > max_listed else ""
        raise SceneFolderError(f"{len(problems)} bad files in the training data (run `cameo-bench data check "
                               "ROOT` for a full check):\n  " + "\n  ".join(problems[:max_listed]) + more)
