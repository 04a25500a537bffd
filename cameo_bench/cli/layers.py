"""`cameo-bench layers BACKBONE [--preset P]`: list the attention layers a tap or a loss can address.

One row per layer in forward order, with its stage and its token grid as a fraction of the image
side (`res`), i.e. exactly the words a layer selector takes (`decoder:first_cross_view`,
`decoder:1/16`; grammar in `MultiViewBackbone.resolve_layer`). The model is built on the meta
device, so paper-scale presets list their layers without allocating weights.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("backbone", help="registered backbone name (see `backbones.list_backbones()`)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--image-size", type=int, default=None,
                        help="model input size (latent size for latent models), to print token grids")
    parser.add_argument("--input-stride", type=int, default=1,
                        help="image pixels per model-input pixel (8 for SD latents): sets the `res` column")


def run(args: argparse.Namespace) -> int:
    import torch

    from backbones import create_backbone

    if args.input_stride < 1:
        raise SystemExit(f"--input-stride must be a positive integer, got {args.input_stride}")
    with torch.device("meta"):
        model = create_backbone(args.backbone, args.preset)
    print(f"{'index':>5}  {'name':<28} {'stage':<8} {'view':<10} {'heads':>5} {'head_dim':>8} {'stride':>6}"
          f" {'res':>5}" + ("  grid" if args.image_size else ""))
    for i, layer in enumerate(model.attention_layers()):
        side = args.image_size // layer.stride if args.image_size else 0
        grid = f"  {side}x{side}" if args.image_size else ""
        kind = "cross-view" if layer.cross_view else "per-view"
        res = f"1/{layer.stride * args.input_stride}"
        print(f"{i:>5}  {layer.name:<28} {layer.stage or '-':<8} {kind:<10} {layer.num_heads:>5} {layer.head_dim:>8}"
              f" {layer.stride:>6} {res:>5}{grid}")
    return 0
