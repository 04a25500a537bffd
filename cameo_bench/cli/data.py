"""`cameo-bench data`: write synthetic scenes, convert real datasets into scene folders, check them.

    cameo-bench data synth --scenes 100 --views 4 --size 64 --azimuth-step 30 OUT
    cameo-bench data convert --format {colmap,nerfstudio,llff,re10k,re10k_chunks,co3dv2} SRC OUT
        [--images DIR] [--downscale N] [--skip-missing] [--split NAME]
    cameo-bench data check ROOT [ROOT ...] [--fast]
    cameo-bench data encode --vae FOLDER --image-size 512 SCENES OUT   (the latent cache: data/latents.py)

synth and convert write into a temporary folder next to OUT and rename it at the end, so a failed
run leaves nothing behind; a conversion that fails prints one line naming the file and the field
and exits with code 2. The expected source layouts are documented in `cameo_bench/data/converters/`.
check decodes every frame and exits with code 1 naming each bad file.
"""
from __future__ import annotations

import argparse
from pathlib import Path

# Kept here (and checked against the converter registry by a test) so that building the CLI parser
# for any subcommand does not import numpy/PIL/torch through the converters.
FORMATS = ("co3dv2", "colmap", "llff", "nerfstudio", "re10k", "re10k_chunks")
EXIT_BAD_INPUT = 2


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
    conv.add_argument("src", type=Path, help="source folder or file (layout: see cameo_bench/data/converters/)")
    conv.add_argument("out", type=Path, help="output dataset folder (must not exist unless --overwrite)")
    conv.add_argument("--split", default="train",
                      help="split for scenes whose source has no split of its own (default train)")
    conv.add_argument("--images", default=None, metavar="DIR",
                      help="colmap, llff: folder of the images if not where the format keeps them "
                           "(a relative path is looked up in each scene folder first)")
    conv.add_argument("--downscale", type=int, default=None, metavar="N",
                      help="colmap, llff, nerfstudio: read the downsampled copy images_N/, intrinsics rescaled")
    conv.add_argument("--skip-missing", action="store_true",
                      help="nerfstudio: drop listed frames whose image file is missing instead of failing")
    conv.add_argument("--overwrite", action="store_true")

    check = sub.add_parser("check", help="check scene-folder datasets: frames, cameras, splits, tracks")
    check.add_argument("roots", type=Path, nargs="+", metavar="ROOT",
                       help="dataset root (dataset.json) or single scene folder (cameras.json)")
    check.add_argument("--fast", action="store_true",
                       help="image headers and end markers only, no decoding (what training runs before step 0)")

    enc = sub.add_parser("encode", help="fill the latent cache: every frame encoded once by a local VAE")
    enc.add_argument("--vae", required=True, type=Path, help="local diffusers AutoencoderKL folder (codec.vae_path)")
    enc.add_argument("scenes", type=Path, help="scene-folder dataset root (dataset.json)")
    enc.add_argument("out", type=Path, help="cache folder (give it to training as codec.cache_dir; "
                                            "training's default is SCENES/latents)")
    enc.add_argument("--image-size", required=True, help="the training resolution data.image_size: N or HxW")
    enc.add_argument("--resize-mode", default="center_crop", choices=("center_crop", "stretch"),
                     help="data.resize_mode (default center_crop)")
    enc.add_argument("--batch", type=int, default=16, help="frames per VAE call (default 16)")
    enc.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def run(args: argparse.Namespace) -> int:
    if args.data_command == "check":
        return run_check(args.roots, fast=args.fast)
    if args.data_command == "encode":
        from cameo_bench.data.latents import encode_command

        return encode_command(args.vae, args.scenes, args.out, args.image_size, args.resize_mode,
                              batch=args.batch, device=args.device)
    if args.data_command == "synth":
        splits = write_synthetic(args.out, args.scenes, args.views, args.size, args.azimuth_step, args.seed,
                                 test_scenes=args.test_scenes, point_maps=args.point_maps,
                                 overwrite=args.overwrite)
    else:
        splits = run_convert(args)
        if splits is None:
            return EXIT_BAD_INPUT
    counts = ", ".join(f"{split}: {len(ids)}" for split, ids in splits.items())
    print(f"wrote {args.out} ({counts} scenes)")
    return 0


def run_convert(args: argparse.Namespace) -> dict[str, list[str]] | None:
    """Convert; a bad source prints one line naming the file and the field (None: failed)."""
    import sys

    from cameo_bench.data.converters import ConvertOptions, convert
    from cameo_bench.data.scene_format import SceneFolderError

    if args.downscale is not None and args.downscale < 1:
        print(f"cameo-bench data convert: error: --downscale must be >= 1, got {args.downscale}", file=sys.stderr)
        return None
    options = ConvertOptions(images=args.images, skip_missing=args.skip_missing, downscale=args.downscale)
    try:
        return convert(args.format, args.src, args.out, split=args.split, overwrite=args.overwrite,
                       options=options)
    except (SceneFolderError, OSError) as e:
        message = " ".join(str(e).split())  # one line, whatever the message held
        print(f"cameo-bench data convert: error: {message}", file=sys.stderr)
        return None


def run_check(roots: list[Path], fast: bool = False) -> int:
    from cameo_bench.data.check import check_dataset

    bad = 0
    for root in roots:
        report = check_dataset(root, decode=not fast)
        print(report.summary())
        bad += len(report.problems)
    return 1 if bad else 0


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
