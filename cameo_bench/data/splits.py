"""Which scenes and frames the train and test sets of a scene-folder dataset may read.

Two protocols (gin `data.split`):
  * `scene`: the dataset.json splits `train` and `test` hold different scenes. A scene named in
    both is an error: evaluation would score the very samples training saw.
  * `frame`: every scene of dataset.json is in both sets, its frames are not. The held-out frames
    are an explicit list (`data.test_frames`, names or indices) or every n-th frame (0, n, 2n, ...:
    `data.test_every`, LLFF / mip-NeRF 360's hold-out of every 8th image). Training never reads a
    held-out frame, not even as a reference; evaluation uses held-out frames as targets and
    training frames as references (the standard NVS protocol: the inputs are known views, the
    scored views are unseen). So train and test never share a target frame; they do share
    reference frames, by design.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cameo_bench.data.scene_format import SceneCameras, SceneFolderError, read_dataset_index


@dataclass(frozen=True)
class FrameSplit:
    """Held-out frames per scene: `frames` (names or indices) if given, else every `every`-th."""

    every: int = 8
    frames: tuple = ()

    def __post_init__(self) -> None:
        if not self.frames and self.every < 2:
            raise ValueError(f"FrameSplit.every must be >= 2 (every n-th frame held out), got {self.every}")

    def test_indices(self, cams: SceneCameras) -> np.ndarray:
        """Sorted indices of the held-out frames of one scene; names or indices it lacks are errors."""
        where = cams.folder / "cameras.json"
        if not self.frames:
            return np.arange(0, len(cams), self.every)
        position = {name: i for i, name in enumerate(cams.names)}
        out = []
        for f in self.frames:
            if isinstance(f, str):
                if f not in position:
                    raise SceneFolderError(f"{where}: data.test_frames names frame {f!r}, which this scene lacks "
                                           f"(its frames: {cams.names[:5]}{' ...' if len(cams) > 5 else ''})")
                out.append(position[f])
            else:
                if not 0 <= int(f) < len(cams):
                    raise SceneFolderError(f"{where}: data.test_frames index {f} is out of range for "
                                           f"{len(cams)} frames")
                out.append(int(f))
        return np.unique(np.array(out, dtype=np.int64))

    def train_indices(self, cams: SceneCameras) -> np.ndarray:
        return np.setdiff1d(np.arange(len(cams)), self.test_indices(cams))


def all_scenes(root: str | Path) -> list[str]:
    """Every scene dataset.json lists, in order of first appearance (the frame split's scenes)."""
    seen: dict[str, None] = {}
    for ids in read_dataset_index(root)["splits"].values():
        seen.update(dict.fromkeys(ids))
    return list(seen)


def check_scene_split(root: str | Path) -> None:
    """The scene split needs disjoint `train` and `test` splits in dataset.json."""
    path = Path(root) / "dataset.json"
    splits = read_dataset_index(root)["splits"]
    for name in ("train", "test"):
        if name not in splits:
            raise SceneFolderError(
                f"{path}: no split {name!r} (available: {sorted(splits)}). data.split = 'scene' trains on "
                "'train' and evaluates on 'test'; for a capture without a test scene set data.split = 'frame' "
                "(every data.test_every-th frame held out, or data.test_frames)")
    shared = sorted(set(splits["train"]) & set(splits["test"]))
    if shared:
        raise SceneFolderError(
            f"{path}: splits 'train' and 'test' both list scene(s) {shared[:5]}{' ...' if len(shared) > 5 else ''}: "
            "with data.split = 'scene' evaluation would score training samples. Make the splits disjoint, "
            "or hold out frames instead with data.split = 'frame'")
