"""`cameo-bench data`: write synthetic scenes or convert real datasets into scene folders.

    cameo-bench data synth --scenes 100 --views 4 --size 64 --azimuth-step 30 OUT
    cameo-bench data convert --format {re10k,co3dv2,colmap} SRC OUT

Both write into a temporary folder next to OUT and rename it at the end, so a failed run leaves
nothing behind. The expected source layouts are documented in `cameo_bench/data/converters/`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

# Kept here (and checked against the converter registry by a test) so that building the CLI parser
# for any subcommand does not import numpy/PIL/torch through the converters.
FORMATS = ("co3dv2", "colmap", "re10k")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True)

    synth = sub.add_parser("synth", help="render the embedded synthetic scenes into a scene-folder dataset")
    synth.add_argument("out", type=Path, help="output dataset folder (must not exist unless --overwrite)")
    synth.add_argument("--scenes", type=int, required=True, help="number of scenes")
    synth.add_argument("--views", type=int, default=4, help="frames per scene (default 4)")
    synth.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    synth.add_argument("--azimuth-step", type=float, default=30.0,
                       help="azimuth change between consecutive views in degrees (default 30)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--test-scenes", type=int, default=0,
                       help="the last N scenes go to the 'test' split, the others to 'train' (default 0)")
    synth.add_argument("--point-maps", action="store_true", help="also store the exact world point maps")
    synth.add_argument("--overwrite", action="store_true")

    conv = sub.add_parser("convert", help="convert a real dataset into a scene-folder dataset")
    conv.add_argument("--format", required=True, choices=FORMATS, help="source format")
    conv.add_argument("src", type=Path, help="source folder (layout: see cameo_bench/data/converters/)")
    conv.add_argument("out", type=Path, help="output dataset folder (must not exist unless --overwrite)")
    conv.add_argument("--split", default="train",
                      help="split for scenes whose source has no split of its own (default train)")
    conv.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        splits = write_synthetic(args.out, args.scenes, args.views, args.size, args.azimuth_step, args.seed,
                                 test_scenes=args.test_scenes, point_maps=args.point_maps,
                                 overwrite=args.overwrite)
    else:
        from cameo_bench.data.converters import convert

        splits = convert(args.format, args.src, args.out, split=args.split, overwrite=args.overwrite)
    counts = ", ".join(f"{split}: {len(ids)}" for split, ids in splits.items())
    print(f"wrote {args.out} ({counts} scenes)")
    return 0


def write_synthetic(out: Path, num_scenes: int, num_views: int, image_size: int, azimuth_step_deg: float,
                    seed: int, *, test_scenes: int = 0, point_maps: bool = False,
                    overwrite: bool = False, render_batch: int = 16) -> dict[str, list[str]]:
    """Materialise `SyntheticScenes` so that the scene-folder code path is exercised by the same scenes."""
    from cameo_bench.data.scene_format import DatasetWriter
    from cameo_bench.data.synthetic import SyntheticScenes

    if not 0 <= test_scenes <= num_scenes:
        raise ValueError(f"--test-scenes must be in [0, {num_scenes}], got {test_scenes}")
    dataset = SyntheticScenes(num_scenes, num_views, image_size, azimuth_step_deg, seed)
    with DatasetWriter(out, name=Path(out).name, overwrite=overwrite) as writer:
        for start in range(0, num_scenes, render_batch):
            indices = list(range(start, min(start + render_batch, num_scenes)))
            batch = dataset.render_scenes(indices)
            for n, index in enumerate(indices):
                pm = None
                if point_maps and "point_map" in batch:
                    xyz = batch["point_map"][n].permute(0, 2, 3, 1)  # [V, H, W, 3]
                    pm = {"synthetic": (xyz, (batch["depth"][n] > 0).float())}
                writer.add(
                    f"{index:06d}", "test" if index >= num_scenes - test_scenes else "train",
                    batch["image"][n], batch["intrinsics"][n], batch["cam2world"][n],
                    depth=batch["depth"][n], point_maps=pm,
                    meta={"source_format": "synthetic", "seed": seed, "index": index,
                          "azimuth_step_deg": azimuth_step_deg, "num_ref": int(batch["num_ref"])},
                    depth_source="synthetic",
                )
        return dict(writer.splits)
