"""Figures drawn at evaluation: generated views beside the ground truth, and where a layer's attention looks.

The drawing functions take plain tensors and return matplotlib `Figure`s built without pyplot
(no global state, no display: the Agg canvas), so they are tested without a model and are safe in
worker processes. `eval_figures` is the one function that runs a model: the engine calls it at
evaluation and hands the files to its trackers. The attention drawn is `attention.key_view_attention`,
the same quantity the attention metrics score.
"""
from __future__ import annotations

import math
import pathlib
from typing import Sequence

import torch
from einops import rearrange
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cameo_bench.evaluation.attention import key_view_attention, layer_tap, real_cameras, token_ground_truth
from cameo_bench.tracking import keys

PANEL_INCHES = 1.6
GT_COLOR = (0.0, 1.0, 0.0)  # lime: absent from the heat colour map, so it stays findable
QUERY_COLOR = (0.0, 1.0, 1.0)  # cyan
HEAT_CMAP = "magma"


def _new_figure(rows: int, cols: int) -> tuple[Figure, list[list]]:
    fig = Figure(figsize=(cols * PANEL_INCHES, rows * PANEL_INCHES + 0.3), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def _to_hwc(image: torch.Tensor):
    """[3, H, W] in [0, 1] -> numpy [H, W, 3], clipped (samples can overshoot)."""
    return rearrange(image.detach().float().clamp(0, 1).cpu(), "c h w -> h w c").numpy()


def _show(ax, image: torch.Tensor) -> None:
    # the default imshow extent puts pixel centres on integer coordinates, (0, 0) at the top-left
    # pixel: the project's pixel convention, so markers are drawn in plain pixel coordinates
    ax.imshow(_to_hwc(image), interpolation="nearest")


def save_figure(fig: Figure, path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _check_images(name: str, images: torch.Tensor) -> None:
    if images.ndim != 5 or images.shape[2] != 3:
        raise ValueError(f"{name} must be [B, V, 3, H, W], got {tuple(images.shape)}")


def sample_grid(generated: torch.Tensor, ground_truth: torch.Tensor, *, num_ref: int,
                max_scenes: int = 4) -> Figure:
    """Two rows per scene, ground truth above generated, one column per view.

    generated, ground_truth: [B, V, 3, H, W] in [0, 1]. Reference columns are titled `ref` (the
    model was given them), target columns `target i`.
    """
    _check_images("generated", generated)
    _check_images("ground_truth", ground_truth)
    if generated.shape != ground_truth.shape:
        raise ValueError(f"generated {tuple(generated.shape)} and ground_truth {tuple(ground_truth.shape)} differ")
    B, V = min(generated.shape[0], max_scenes), generated.shape[1]
    fig, axes = _new_figure(2 * B, V)
    for b in range(B):
        for v in range(V):
            _show(axes[2 * b][v], ground_truth[b, v])
            _show(axes[2 * b + 1][v], generated[b, v])
            if b == 0:
                axes[0][v].set_title("ref" if v < num_ref else f"target {v}", fontsize=8)
        axes[2 * b][0].set_ylabel(f"scene {b}\nground truth", fontsize=7)
        axes[2 * b + 1][0].set_ylabel("generated", fontsize=7)
    fig.tight_layout()
    return fig


def attention_figure(images: torch.Tensor, query_view: int, query_xy: Sequence[float], attention: torch.Tensor,
                     *, gt_xy: torch.Tensor | None = None, title: str = "") -> Figure:
    """The query point in its view, then the attention over every other view with the true location.

    images [V, 3, H, W] in [0, 1]; query_xy (x, y) in pixels of the query view; attention [V, h, w]
    for this query (the token grid may be coarser than the image: each token covers stride x
    stride pixels); gt_xy [V, 2] true (x, y) pixels in each view, NaN where unknown or occluded.
    Drawn: heat map of the attention (its own colour range per view), a lime circle at the true
    location, a cyan cross at the query.
    """
    V, _, H, W = images.shape
    if attention.ndim != 3 or attention.shape[0] != V:
        raise ValueError(f"attention must be [V={V}, h, w], got {tuple(attention.shape)}")
    if gt_xy is not None and tuple(gt_xy.shape) != (V, 2):
        raise ValueError(f"gt_xy must be [V={V}, 2] pixel coordinates, got {tuple(gt_xy.shape)}")
    key_views = [v for v in range(V) if v != query_view]
    fig, axes = _new_figure(1, len(key_views) + 1)
    ax = axes[0][0]
    _show(ax, images[query_view])
    ax.plot([query_xy[0]], [query_xy[1]], marker="x", color=QUERY_COLOR, markersize=9, markeredgewidth=2)
    ax.set_title(f"query (view {query_view})", fontsize=8)
    for ax, v in zip(axes[0][1:], key_views):
        _show(ax, images[v])
        # the token grid stretched over the image: token (ty, tx) covers its stride x stride pixels
        ax.imshow(attention[v].detach().float().cpu().numpy(), cmap=HEAT_CMAP, alpha=0.6,
                  interpolation="nearest", extent=(-0.5, W - 0.5, H - 0.5, -0.5))
        ax.set_xlim(-0.5, W - 0.5)
        ax.set_ylim(H - 0.5, -0.5)
        if gt_xy is not None and bool(torch.isfinite(gt_xy[v]).all()):
            ax.plot([float(gt_xy[v, 0])], [float(gt_xy[v, 1])], marker="o", color=GT_COLOR,
                    markersize=6, markeredgewidth=0, linestyle="none")
        ax.set_title(f"view {v}: max {float(attention[v].max()):.2f}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# at evaluation


def _query_token(valid: torch.Tensor, h: int, w: int) -> int:
    """The token closest to the grid centre among those seen in the most key views.
    valid [V_keys, h*w]."""
    counts = valid.sum(0).float()  # [h*w]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dist = ((ys.flatten() - (h - 1) / 2) ** 2 + (xs.flatten() - (w - 1) / 2) ** 2).float()
    return int(torch.argmax(counts * (h * h + w * w + 1) - dist))


@torch.no_grad()
def eval_figures(model, diffusion, batch: dict, folder: str | pathlib.Path, *, layer: str | None,
                 sampler_steps: int, guidance_scale: float = 1.0, seed: int = 0, timestep: int = 500,
                 sampler_eta: float = 0.0,
                 max_scenes: int = 2) -> list[pathlib.Path]:
    """`samples.png` (generated vs ground truth of the first scenes of `batch`) and, when `layer`
    is given, `attention.png` (one query of the first target view at noise level `timestep`,
    with its true location from depth when the batch has depth). Returns the files written."""
    folder = pathlib.Path(folder)
    was_training = model.training
    model.eval()
    try:
        batch = {k: v[:max_scenes] if torch.is_tensor(v) else v for k, v in batch.items()}
        num_ref = int(batch["num_ref"])
        generated = diffusion.sample(model, batch, num_steps=sampler_steps, guidance_scale=guidance_scale,
                                     generator=torch.Generator().manual_seed(seed * 1_000_003), eta=sampler_eta)
        fig = sample_grid(generated, batch["image"], num_ref=num_ref, max_scenes=max_scenes)
        paths = [save_figure(fig, folder / keys.SAMPLES_FIGURE)]
        if layer is None or batch["image"].shape[1] < 2:  # one view: no other view to attend to
            return paths

        spec = model.get_attention_layer(layer)
        stride = spec.stride * diffusion.codec.downsample  # token stride in image pixels (latents: x8)
        _, V, _, H, W = batch["image"].shape
        grid = (V, H // stride, W // stride)
        _, h, w = grid
        # measured with the real cameras, as the attention metrics are
        tap = layer_tap(model, real_cameras(diffusion), batch, layer, timestep=timestep, seed=seed)
        query_view = num_ref if num_ref < V else 0
        key_views = [v for v in range(V) if v != query_view]
        gt_px = torch.full((V, 2), math.nan)
        if "depth" in batch:
            gt_tok, gt_valid, _ = token_ground_truth(batch, grid, stride)  # [B, V, V, hw, 2], [B, V, V, hw]
            gt_tok, gt_valid = gt_tok[0, query_view].float().cpu(), gt_valid[0, query_view].cpu()  # [V, hw, 2], [V, hw]
            token = _query_token(gt_valid[key_views], h, w)
            gt_px = torch.where(gt_valid[:, token, None], (gt_tok[:, token] + 0.5) * stride - 0.5,
                                torch.tensor(math.nan))  # [V, 2] pixels in each view
        else:
            token = (h // 2) * w + w // 2
        query = query_view * h * w + token
        attention = key_view_attention(tap.q[0][:, query:query + 1], tap.k[0], tap.scale, grid)[0]  # [V, h, w]
        query_xy = ((token % w + 0.5) * stride - 0.5, (token // w + 0.5) * stride - 0.5)
        fig = attention_figure(batch["image"][0], query_view, query_xy, attention, gt_xy=gt_px.cpu(),
                               title=f"{layer} at t={timestep}")
        paths.append(save_figure(fig, folder / keys.ATTENTION_FIGURE))
        return paths
    finally:
        model.train(was_training)
