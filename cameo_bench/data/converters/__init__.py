"""Converters from real multi-view datasets to scene folders (notes/data.md §1.2, §1.4).

Each converter reads one foreign layout and yields `ConvertedScene`s that are already in the
project convention (OpenCV axes, camera-to-world, pixel K with integer pixel centres, z-depth, no
lens distortion): foreign conventions are undone there, once, and nowhere else. `convert` writes
them through a `DatasetWriter`, so a conversion that fails leaves nothing at the output path.

Formats (one module each; the module docstring gives the expected layout and the conventions):
`colmap` (text or binary sparse models, distortion undone, points3D tracks kept), `nerfstudio`
(transforms.json of nerfstudio / instant-ngp / NeRF-synthetic / DL3DV), `llff` (poses_bounds.npy),
`re10k` (RealEstate10K camera txt files + extracted frames), `re10k_chunks` (pixelSplat .torch
chunks), `co3dv2` (frame_annotations.jgz). The shared parts live in `base`; this package only
collects the modules, whose import registers them.
"""
from cameo_bench.data.converters import co3dv2, colmap, llff, nerfstudio, re10k, re10k_chunks  # noqa: F401
from cameo_bench.data.converters.base import (
    CONVERTERS,
    ConvertedScene,
    ConvertOptions,
    convert,
    get_converter,
    list_converters,
    register_converter,
)

__all__ = ["CONVERTERS", "ConvertedScene", "ConvertOptions", "convert", "get_converter", "list_converters",
           "register_converter"]
