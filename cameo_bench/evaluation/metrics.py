"""Novel-view quality metrics: per-image PSNR and SSIM, LPIPS when its weights are on disk, means per viewpoint bin.

The viewpoint-change bins are defined here once and shared with the attention metrics, so a quality
gain and a correspondence gain are read against the same viewpoint change.
"""
from __future__ import annotations

import logging
import pathlib
from typing import Iterator

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from cameo_bench import geometry
from cameo_bench.tracking import keys

log = logging.getLogger(__name__)

VIEW_BINS = ((0.0, 30.0), (30.0, 60.0), (60.0, 90.0), (90.0, 1e9))  # degrees, [lo, hi)


def bin_name(lo: float, hi: float) -> str:
    return f"{int(lo)}-{int(hi)}" if hi < 1e8 else f"{int(lo)}+"


def view_bins(angle: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """(bin name, mask [N]) of each viewpoint bin that holds at least one of the angles [N].

    Empty bins are skipped rather than reported as NaN or 0, so a mean is never taken over nothing.
    """
    for lo, hi in VIEW_BINS:
        sel = (angle >= lo) & (angle < hi)  # [N]
        if sel.any():
            yield bin_name(lo, hi), sel


def target_view_angles(cam2world: torch.Tensor, num_ref: int) -> torch.Tensor:  # [B, V - num_ref]
    """Viewpoint change of each target view: its rotation angle (degrees) to the NEAREST reference.

    A target close to any reference can borrow its content, so the nearest one decides how hard
    it is to synthesise (the paper bins its quality gains the same way).
    """
    angle = geometry.rotation_angle_deg(cam2world[:, num_ref:, None], cam2world[:, None, :num_ref])  # [B, T, R]
    return angle.amin(-1)


def quality_by_bin(per_image: dict[str, torch.Tensor], angle: torch.Tensor) -> dict[str, float]:
    """`eval/{psnr,ssim,...}/<bin>` means and `eval/count/<bin>` over images [N] with angles [N]."""
    out = {}
    for name, sel in view_bins(angle):
        for key, value in per_image.items():
            out[keys.eval_by_bin(key, name)] = float(value[sel].mean())
        out[keys.eval_by_bin(keys.COUNT, name)] = float(sel.sum())
    return out


def image_metrics(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image PSNR and SSIM [N] for images [N, 3, H, W] in [0, 1].

    SSIM's 11-pixel window does not fit the 16-pixel images of the unit tests and micro runs; below
    32 pixels it shrinks to 7.
    """
    pred, gt = pred.float().clamp(0, 1), gt.float().clamp(0, 1)
    psnr = peak_signal_noise_ratio(pred, gt, data_range=1.0, reduction="none", dim=(1, 2, 3))
    kernel = 7 if min(gt.shape[-2:]) < 32 else 11
    ssim = structural_similarity_index_measure(pred, gt, data_range=1.0, reduction="none", kernel_size=kernel)
    return {"psnr": psnr, "ssim": ssim}


class LpipsScorer:
    """LPIPS when the ImageNet backbone weights are already on disk; never downloads.

    The lpips wheel ships only its linear heads; the VGG/AlexNet trunks come from torchvision's
    hub cache. When they are missing we say so once and report nothing rather than a fake number.
    """

    WEIGHTS = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
    _warned: set[str] = set()

    def __init__(self, net: str):
        self.net = net
        self.model = None
        path = pathlib.Path(torch.hub.get_dir()) / "checkpoints" / self.WEIGHTS[net]
        if not path.exists():
            if net not in LpipsScorer._warned:
                log.warning("LPIPS-%s unavailable: backbone weights not found at %s (no download is attempted); "
                            "LPIPS is not reported.", net, path)
                LpipsScorer._warned.add(net)
            return
        import lpips

        self.model = lpips.LPIPS(net=net, verbose=False).eval()

    @property
    def available(self) -> bool:
        return self.model is not None

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:  # [N]
        self.model.to(pred.device)
        return self.model(pred.float() * 2 - 1, gt.float() * 2 - 1, normalize=False).flatten()
