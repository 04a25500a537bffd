"""The correspondence stage's API: registered sources turn a batch into sparse token targets on a layer's grid.

    targets = compute_targets("depth", batch, grid=(V, h, w), stride=s, mode="soft", k=4)

Registered sources (see each module): `depth` (default), `pointmap_nn` (the official CAMEO
method), `noisy_depth`, `matches`, `epipolar` (soft only), `sfm_tracks` (SfM points seen in both
views), and the controls `shuffled` and `none`
(`none` returns None: the engine runs no tap). `get_source(name).check(batch)` fails before
training when the data lacks what a source needs.
"""
from cameo_bench.correspondence.registry import (
    Source,
    compute_targets,
    get_source,
    list_sources,
    register_source,
)
from cameo_bench.correspondence.targets import CorrespondenceTargets

# Importing the source modules registers them.
from cameo_bench.correspondence import depth, pointmap, noisy_depth, matches, epipolar, controls  # noqa: E402,F401
from cameo_bench.correspondence import sfm_tracks  # noqa: E402,F401

__all__ = [
    "CorrespondenceTargets",
    "Source",
    "compute_targets",
    "get_source",
    "list_sources",
    "register_source",
]
