"""The evaluation protocol: an explicit evaluation index, the named metric conventions, metrics left out rather than NaN.

Published NVS results (pixelSplat, MVSplat and the papers that compare to them) are computed on a
fixed list of (scene, context frames, target frames) and with particular metric code. Reproducing
them needs both: `eval.index` reads that list in pixelSplat's own JSON format and `eval.conventions`
names the metric code (`evaluation.metrics`). Every evaluation output states the conventions
(`conventions_record`: eval.json's `conventions`, the run's `eval.convention.*` params), and a
metric that could not be computed is left out with its reason (`drop_uncomputed`), never logged as
NaN.

The evaluation index (pixelSplat `assets/evaluation_index_re10k.json`, MVSplat the same)::

    {"5aca87f95a9412c6": {"context": [58, 133], "target": [84, 102, 129]},
     "e74ceac9043aa1b8": null, ...}

Keys are scene ids (`<root>/scenes/<key>/`), numbers are positions in the scene's frame order
(`cameras.json` "frames", the order the converter wrote: for RE10K chunks, the chunk's timestamp
order, as pixelSplat indexes them), `null` marks a scene the protocol skips. A target may repeat a
context frame (pixelSplat's index does). Context frames are the references (first in the batch),
target frames the scored views.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from cameo_bench.config.spec import DataSpec, EvalSpec, Experiment, resolve_conventions
from cameo_bench.data.scene_dataset import SceneFolderDataset
from cameo_bench.data.scene_format import SceneFolderError, read_cameras, scene_dir
from cameo_bench.tracking import keys

__all__ = ["EvaluationIndex", "IndexedEvalSet", "conventions_record", "convention_params", "drop_uncomputed",
           "read_evaluation_index", "resolve_conventions"]


# ----------------------------------------------------------------------------------------------
# The evaluation index


class EvaluationIndex(list):
    """Entries `(scene_id, context [i, ...], target [k, ...])` in file order, nulls dropped; `path`
    is the file, `skipped` the scene ids it marks null."""

    def __init__(self, entries, path: Path, skipped: list[str]):
        super().__init__(entries)
        self.path, self.skipped = path, skipped


def _frames(value, path: Path, scene: str, field: str) -> list[int]:
    ok = (isinstance(value, list) and value
          and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))
    if not ok:
        raise SceneFolderError(f"{path}: scene {scene!r} field {field!r} = {value!r} is not a non-empty list of "
                               "frame indices (ints >= 0)")
    return list(value)


def read_evaluation_index(path: str | Path) -> EvaluationIndex:
    """Parse and validate a pixelSplat/MVSplat evaluation index JSON (format in the module doc)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise SceneFolderError(f"eval.index: {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise SceneFolderError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise SceneFolderError(f"{path}: an evaluation index is a JSON object {{scene: {{'context': [...], "
                               f"'target': [...]}} or null}}, got a {type(raw).__name__}")
    entries, skipped = [], []
    for scene, entry in raw.items():
        if entry is None:
            skipped.append(scene)
            continue
        if not isinstance(entry, dict) or set(entry) - {"context", "target"} or not {"context", "target"} <= set(entry):
            raise SceneFolderError(f"{path}: scene {scene!r} must be null or {{'context': [...], 'target': [...]}}, "
                                   f"got {entry!r}")
        entries.append((scene, _frames(entry["context"], path, scene, "context"),
                        _frames(entry["target"], path, scene, "target")))
    if not entries:
        raise SceneFolderError(f"{path}: no entries (every scene is null)")
    shapes = {(len(c), len(t)) for _, c, t in entries}
    if len(shapes) > 1:
        first = entries[0]
        odd = next(e for e in entries if (len(e[1]), len(e[2])) != (len(first[1]), len(first[2])))
        raise SceneFolderError(
            f"{path}: entries must all have the same numbers of context and target frames (they are batched): "
            f"scene {first[0]!r} has {len(first[1])} + {len(first[2])}, scene {odd[0]!r} {len(odd[1])} + {len(odd[2])}")
    return EvaluationIndex(entries, path, skipped)


class IndexedEvalSet(SceneFolderDataset):
    """The held-out items an evaluation index names, loaded like scene-folder items (same resize,
    crop, K update, depth, tracks): item e = entry e's context frames (references), then its targets.

    Scenes missing under `root` are an error naming them (`missing = 'skip'`: left out with a
    warning); a frame beyond a scene's frame count is always an error.

    `SceneFolderDataset.__init__` is not called: it chooses scenes from a dataset.json split and
    checks them for random frame draws, neither of which applies. This sets the view-loading fields
    and the fixed item list (`fixed`, as the frame-split test set has) that its `__getitem__` reads,
    so items are loaded by exactly the training loader's code (tests/test_protocol.py checks it).
    """

    def __init__(self, root: str | Path, index: EvaluationIndex | str | Path, *, image_size=None,
                 resize_mode: str = "center_crop", seed: int = 0, missing: str = "error",
                 load_depth: bool = True, match_image_size=None):
        index = index if isinstance(index, EvaluationIndex) else read_evaluation_index(index)
        root = Path(root)
        if missing not in ("error", "skip"):
            raise ValueError(f"missing = {missing!r} is not one of ('error', 'skip')")
        absent = [scene for scene, _, _ in index if not (scene_dir(root, scene) / "cameras.json").is_file()]
        if absent and (missing == "error" or len(absent) == len(index)):
            raise SceneFolderError(
                f"{index.path}: {len(absent)} of its {len(index)} scenes are not scene folders under {root / 'scenes'} "
                f"(e.g. {absent[:5]}); convert them, point eval.index_root at their dataset, or set "
                "eval.index_missing = 'skip' to evaluate the scenes that are there")
        if absent:
            warnings.warn(f"{index.path}: {len(absent)} of {len(index)} index scenes are not under {root} and are "
                          f"skipped (eval.index_missing = 'skip'), e.g. {absent[:5]}")
        gone = set(absent)
        entries = [e for e in index if e[0] not in gone]
        scene_ids = list(dict.fromkeys(scene for scene, _, _ in entries))
        self._init_fields(root, num_views=len(entries[0][1]) + len(entries[0][2]), num_ref=len(entries[0][1]),
                          image_size=image_size, resize_mode=resize_mode, seed=seed, load_depth=load_depth,
                          match_image_size=match_image_size)
        self.scene_ids = scene_ids
        self.cameras = [read_cameras(scene_dir(root, s)) for s in scene_ids]
        position = {s: p for p, s in enumerate(scene_ids)}
        self.fixed = []
        for scene, context, target in entries:
            cams = self.cameras[position[scene]]
            for field, frames in (("context", context), ("target", target)):
                bad = [f for f in frames if f >= len(cams)]
                if bad:
                    raise SceneFolderError(f"{index.path}: scene {scene!r} field {field!r} names frame(s) {bad}, but "
                                           f"{cams.folder / 'cameras.json'} has {len(cams)} frames (0..{len(cams) - 1})")
            self.fixed.append((position[scene], [*context, *target]))
        self.index = index
        self.entries = entries
        self.pools = [None] * len(scene_ids)
        self.tracks_on = self._decide_tracks(None)
        self._points = {}
        self._warn_about_crops()

    def _init_fields(self, root: Path, *, num_views: int, num_ref: int, image_size, resize_mode: str, seed: int,
                     load_depth: bool, match_image_size) -> None:
        """The view-loading settings `SceneFolderDataset` reads; sampling settings do not apply."""
        def hw(size):
            if size is None:
                return None
            return (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)

        self.root = root
        self.num_views, self.num_ref, self.frame_spacing, self.max_view_change_deg = num_views, num_ref, (1, 1), None
        self.image_size, self.match_image_size = hw(image_size), hw(match_image_size)
        self.seed, self.resize_mode, self.load_depth = seed, resize_mode, load_depth
        self.point_map_source, self.samples_per_scene, self.max_tries, self.frame_split = None, 1, 1, None

    @classmethod
    def from_spec(cls, data: DataSpec, spec: EvalSpec) -> IndexedEvalSet:
        """`eval.index` on `eval.index_root` (default `data.root`) at the data's image size and crop."""
        root = spec.index_root or data.root
        dataset = cls(root, spec.index, image_size=data.image_size, resize_mode=getattr(data, "resize_mode", "center_crop"),
                      seed=data.seed, missing=spec.index_missing,
                      match_image_size=getattr(data, "match_image_size", None))
        if len(dataset) > spec.num_scenes:
            warnings.warn(f"eval.index {spec.index} has {len(dataset)} entries; eval.num_scenes = {spec.num_scenes} "
                          f"evaluates the first {spec.num_scenes}. Set eval.num_scenes >= {len(dataset)} for the "
                          "full protocol")
        return dataset


# ----------------------------------------------------------------------------------------------
# Conventions, stated


def _hw_text(size) -> str:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return f"{h}x{w}"


def preprocessing(data: DataSpec) -> str:
    """What the loader does to images before the metrics see them, in words."""
    size = _hw_text(data.image_size)
    if data.kind == "synthetic":
        return f"rendered at {size} (HxW); metrics at {size} on images clamped to [0, 1]"
    mode = getattr(data, "resize_mode", "center_crop")
    how = (f"centre crop to the aspect of {size}, then bilinear antialiased resize to {size}" if mode == "center_crop"
           else f"bilinear antialiased resize of the whole frame to {size} (aspect not kept)")
    return f"{mode}: {how} (HxW; K updated to match); metrics at {size} on images clamped to [0, 1]"


def conventions_record(exp: Experiment) -> dict[str, str]:
    """Every convention behind the evaluation's numbers by name: psnr, ssim, lpips (metrics.py), the
    preprocessing, the index (or 'none') and the attention truth. What reports print."""
    record = dict(resolve_conventions(exp.eval.conventions))
    record["preprocess"] = preprocessing(exp.data)
    record["index"] = exp.eval.index or "none"
    record["attention_truth"] = exp.eval.attention_truth
    return record


def convention_params(exp: Experiment) -> dict[str, str]:
    """`eval.convention.<name>` -> value: the record as run params (RunLog and MLflow alike)."""
    return {keys.eval_convention(name): value for name, value in conventions_record(exp).items()}


def drop_uncomputed(metrics: dict[str, float], omitted: dict[str, str]) -> dict[str, float]:
    """`metrics` without NaN values, each recorded in `omitted` (metric -> why) unless already there:
    a metric that could not be computed is left out (and tagged), never stored as NaN."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, float) and math.isnan(value):
            omitted.setdefault(key, "not a number (computed over nothing)")
            continue
        out[key] = value
    return out
