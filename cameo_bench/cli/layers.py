"""`cameo-bench layers BACKBONE [--preset P]`: the attention layers a tap or a loss can address."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("backbone", help="registered backbone name (see `backbones.list_backbones()`)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--image-size", type=int, default=None, help="input size, to print token grids")


def run(args: argparse.Namespace) -> int:
    import torch

    from backbones import create_backbone

    with torch.device("meta"):  # paper-scale presets list their layers without allocating weights
        model = create_backbone(args.backbone, args.preset)
    print(f"{'index':>5}  {'name':<28} {'view':<10} {'heads':>5} {'head_dim':>8} {'stride':>6}"
          + ("  grid" if args.image_size else ""))
    for i, layer in enumerate(model.attention_layers()):
        grid = f"  {args.image_size // layer.stride}x{args.image_size // layer.stride}" if args.image_size else ""
        kind = "cross-view" if layer.cross_view else "per-view"
        print(f"{i:>5}  {layer.name:<28} {kind:<10} {layer.num_heads:>5} {layer.head_dim:>8} {layer.stride:>6}{grid}")
    return 0
