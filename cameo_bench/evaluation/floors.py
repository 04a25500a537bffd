"""Floors and ceiling of novel-view quality: trivial predictors and a depth-warp oracle, scored like the samples.

A PSNR means nothing without them: on the default synthetic scenes a constant image scores more
than every model the first studies trained (issue 13). So every evaluation scores, on the same
target views and with the same metrics as the model's samples,
  * `mean_colour`: each target view filled with its references' mean colour (per channel, over all
    reference pixels of that sample): what a model that learned only the palette produces;
  * `copy_nearest`: the reference with the smallest camera rotation to the target: what a model
    that ignores the camera produces (at small viewpoint steps it beats the mean colour);
  * `depth_warp` (only where ground-truth depth exists): an oracle, not a floor: every target pixel
    is reprojected into the nearest reference by the TRUE depth and cameras and takes that
    reference's colour where the occlusion test says it is visible, the mean colour elsewhere. It
    is what perfect geometry plus copying gives, so a model near it has learned the geometry.
None of them depends on the model: an engine logs them once per run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from cameo_bench import geometry
from cameo_bench.evaluation.metrics import image_metrics, reduce_metric, view_bins
from cameo_bench.tracking import keys

__all__ = ["mean_colour", "nearest_reference", "copy_nearest", "depth_warp", "floor_images", "FloorScores"]


def mean_colour(images: torch.Tensor, num_ref: int) -> torch.Tensor:  # [B, T, 3, H, W]
    """Every target view of images [B, V, 3, H, W] filled with the mean colour of the sample's references."""
    colour = images[:, :num_ref].float().mean(dim=(1, 3, 4))  # [B, 3]
    T = images.shape[1] - num_ref
    return colour[:, None, :, None, None].expand(-1, T, -1, *images.shape[-2:])


def nearest_reference(cam2world: torch.Tensor, num_ref: int) -> torch.Tensor:  # [B, T] long
    """Index of the reference whose camera rotation is closest to each target's (first one on ties)."""
    angle = geometry.rotation_angle_deg(cam2world[:, num_ref:, None], cam2world[:, None, :num_ref])  # [B, T, R]
    return angle.argmin(-1)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, V, ...] at view index [B, T] -> [B, T, ...]."""
    rows = torch.arange(x.shape[0], device=x.device)[:, None]  # [B, 1]
    return x[rows, index.to(x.device)]


def copy_nearest(batch: dict) -> torch.Tensor:  # [B, T, 3, H, W]
    """Each target view replaced by its nearest reference (by rotation)."""
    num_ref = int(batch["num_ref"])
    return _take(batch["image"].float(), nearest_reference(batch["cam2world"], num_ref))


def depth_warp(batch: dict) -> torch.Tensor:  # [B, T, 3, H, W]
    """The depth-warp oracle: target pixels reprojected into the nearest reference by the true depth
    (`geometry.reproject`, occlusion test against the reference's depth), coloured by bilinear
    lookup there where visible and by the references' mean colour where not (holes, out of frame)."""
    num_ref = int(batch["num_ref"])
    image, depth = batch["image"].float(), batch["depth"]
    K, c2w = batch["intrinsics"], batch["cam2world"]
    ref = nearest_reference(c2w, num_ref)  # [B, T]
    uv, visible = geometry.reproject(depth[:, num_ref:], K[:, num_ref:], c2w[:, num_ref:],
                                     _take(K, ref), _take(c2w, ref), _take(depth, ref))  # [B, T, H, W, 2], [B, T, H, W]
    H, W = image.shape[-2:]
    grid = torch.stack([uv[..., 0] / max(W - 1, 1) * 2 - 1, uv[..., 1] / max(H - 1, 1) * 2 - 1], -1)  # [B, T, H, W, 2]
    source = rearrange(_take(image, ref), "b t c h w -> (b t) c h w")
    warped = F.grid_sample(source, rearrange(grid, "b t h w two -> (b t) h w two").to(source),
                           mode="bilinear", padding_mode="border", align_corners=True)  # [(B T), 3, H, W]
    warped = rearrange(warped, "(b t) c h w -> b t c h w", b=image.shape[0])
    return torch.where(visible[:, :, None], warped, mean_colour(image, num_ref))


def floor_images(batch: dict) -> dict[str, torch.Tensor]:
    """{predictor or oracle name: target-view predictions [B, T, 3, H, W]}; the oracle only with depth."""
    num_ref = int(batch["num_ref"])
    out = {keys.FLOOR_MEAN_COLOUR: mean_colour(batch["image"], num_ref), keys.FLOOR_COPY_NEAREST: copy_nearest(batch)}
    if "depth" in batch:
        out[keys.ORACLE_DEPTH_WARP] = depth_warp(batch)
    return out


def _metric_name(predictor: str, metric: str) -> str:
    if predictor == keys.ORACLE_DEPTH_WARP:
        return keys.oracle_metric(predictor, metric)
    return keys.floor_metric(predictor, metric)


class FloorScores:
    """Per-image PSNR / SSIM (and LPIPS with the evaluation's scorers) of every floor, over batches,
    reduced by the same conventions as the samples' metrics.

    `add` is called with each evaluation batch, `metrics` once at the end: `eval/floor/<p>/<m>`,
    `eval/oracle/depth_warp/<m>` and their per-viewpoint-bin values `.../<m>/<bin>` (same bins and
    angles as the samples' `eval/<m>/<bin>`).
    """

    def __init__(self, scorers=(), conventions: dict[str, str] | None = None):
        self.scorers = [s for s in scorers if s.available]
        self.conventions = conventions
        self.per_image: dict[str, dict[str, list[torch.Tensor]]] = {}  # predictor -> metric -> [N_b]
        self.angles: dict[str, list[torch.Tensor]] = {}  # predictor -> [N_b]

    def add(self, batch: dict, angles: torch.Tensor) -> None:
        """batch: an evaluation batch; angles [(B T)]: each target's rotation to its nearest reference."""
        num_ref = int(batch["num_ref"])
        gt = rearrange(batch["image"][:, num_ref:].float(), "b v c h w -> (b v) c h w")
        for name, pred in floor_images(batch).items():
            pred = rearrange(pred, "b v c h w -> (b v) c h w").to(gt)
            scores = self.per_image.setdefault(name, {})
            for metric, value in image_metrics(pred, gt, self.conventions).items():
                scores.setdefault(metric, []).append(value.cpu())
            for scorer in self.scorers:
                scores.setdefault(f"lpips_{scorer.net}", []).append(scorer(pred, gt).cpu())
            self.angles.setdefault(name, []).append(angles.flatten().cpu())

    def metrics(self) -> dict[str, float]:
        out = {}
        for name, scores in self.per_image.items():
            angle = torch.cat(self.angles[name])  # [N]
            for metric, values in scores.items():
                value = torch.cat(values)  # [N]
                out[_metric_name(name, metric)] = reduce_metric(metric, value, self.conventions)
                for bin_name, sel in view_bins(angle):
                    out[_metric_name(name, keys.in_bin(metric, bin_name))] = reduce_metric(metric, value[sel],
                                                                                             self.conventions)
        return out
