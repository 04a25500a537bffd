"""Novel-view quality metrics: per-image PSNR and SSIM, LPIPS when its weights are on disk, means per viewpoint bin.

The viewpoint-change bins are defined here once and shared with the attention metrics, so a quality
gain and a correspondence gain are read against the same viewpoint change.

Published NVS numbers differ by convention as much as by method, so each convention is named
(`eval.conventions`; the valid names live in `config.spec`) and stated in every evaluation output:
- PSNR `per_image` (default): the mean over images of 10 log10(1 / MSE_image); `global`: 10 log10(1 /
  MSE) with the MSE over all pixels of all images (pooled per viewpoint bin the same way).
- SSIM `torchmetrics` (default, the numbers of before): torchmetrics'
  `structural_similarity_index_measure` (1.x): an 11-tap gaussian (sigma 1.5; the window size comes
  from sigma alone, so the `kernel_size` passed is ignored), images reflect-padded by 5 px and the SSIM
  map averaged over the WHOLE image, padded borders included; population (co)variances, variances
  clamped at 0. Needs images of at least 6 px.
  `gaussian11`: exactly what pixelSplat/MVSplat call, skimage `structural_similarity(win_size=11,
  gaussian_weights=True, channel_axis=0, data_range=1.0)`: an 11-tap gaussian (sigma 1.5,
  truncate 3.5), SAMPLE covariance (skimage's default: x 121/120), mean over the valid region of each
  channel, then over channels. `gaussian11_population`: the same with `use_sample_covariance=False`
  (Wang et al. 2004). Both differ from `torchmetrics` by its padded borders (~1e-3 on 32 px images).
- LPIPS `vgg+alex` (default), `vgg` (pixelSplat's) or `alex`: images mapped to [-1, 1] (lpips'
  `normalize=True`), scored only when the trunk's weights are on disk.
Images are clamped to [0, 1] first; what the loader did to them (crop, resize) is stated by
`evaluation.protocol.conventions_record`.
"""
from __future__ import annotations

import logging
import math
import pathlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from cameo_bench import geometry
from cameo_bench.config.spec import CONVENTION_PRESETS, resolve_conventions
from cameo_bench.tracking import keys

DEFAULT_CONVENTIONS = CONVENTION_PRESETS["default"]

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


def reduce_metric(name: str, values: torch.Tensor, conventions: dict[str, str] | None = None) -> float:
    """One number from per-image values [N] of metric `name`: their mean, except PSNR under the
    `global` convention, 10 log10(1 / mean MSE), the per-image MSE being 10^(-PSNR/10) (data range 1)."""
    conventions = conventions or DEFAULT_CONVENTIONS
    if name == "psnr" and conventions["psnr"] == "global":
        mse = torch.pow(10.0, -values.double() / 10).mean()
        return float(-10 * torch.log10(mse)) if mse > 0 else math.inf
    return float(values.mean())


def summarise_quality(per_image: dict[str, torch.Tensor], conventions: dict[str, str] | None = None) -> dict[str, float]:
    """`eval/<metric>` over the per-image values [N] of each metric, reduced by the conventions."""
    return {keys.eval_metric(k): reduce_metric(k, v, conventions) for k, v in per_image.items()}


def quality_by_bin(per_image: dict[str, torch.Tensor], angle: torch.Tensor,
                   conventions: dict[str, str] | None = None) -> dict[str, float]:
    """`eval/{psnr,ssim,...}/<bin>` (reduced by the conventions) and `eval/count/<bin>` over images [N]
    with angles [N]."""
    out = {}
    for name, sel in view_bins(angle):
        for key, value in per_image.items():
            out[keys.eval_by_bin(key, name)] = reduce_metric(key, value[sel], conventions)
        out[keys.eval_by_bin(keys.COUNT, name)] = float(sel.sum())
    return out


def image_metrics(pred: torch.Tensor, gt: torch.Tensor, conventions: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Per-image PSNR and SSIM [N] for images [N, 3, H, W] in [0, 1], SSIM by the named convention.

    The `torchmetrics` call passes kernel_size 7 below 32 pixels, as it always has; torchmetrics
    ignores kernel_size for gaussian windows (11 taps from sigma 1.5 either way), so the numbers are
    those of an 11-tap window. The `gaussian11` conventions need images of at least 11 pixels.
    """
    conventions = conventions or DEFAULT_CONVENTIONS
    pred, gt = pred.float().clamp(0, 1), gt.float().clamp(0, 1)
    psnr = peak_signal_noise_ratio(pred, gt, data_range=1.0, reduction="none", dim=(1, 2, 3))
    if conventions["ssim"] == "torchmetrics":
        kernel = 7 if min(gt.shape[-2:]) < 32 else 11
        ssim = structural_similarity_index_measure(pred, gt, data_range=1.0, reduction="none", kernel_size=kernel)
    else:
        ssim = ssim_gaussian11(pred, gt, sample_covariance=conventions["ssim"] == "gaussian11")
    return {"psnr": psnr, "ssim": ssim}


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:  # [size] float64, sums to 1
    """scipy.ndimage's gaussian taps for sigma 1.5, truncate 3.5: radius int(3.5 sigma + 0.5) = 5."""
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def ssim_gaussian11(pred: torch.Tensor, gt: torch.Tensor, *, sample_covariance: bool) -> torch.Tensor:  # [N]
    """skimage's gaussian SSIM (win_size 11, sigma 1.5, K1 0.01, K2 0.03, data range 1) of images
    [N, C, H, W]: the SSIM map over the valid region (no padding reaches it), averaged per channel,
    then over channels. `sample_covariance` scales (co)variances by 121/120 as skimage's default does.
    Computed in float64 (skimage keeps float32 inputs in float32: differences ~1e-7)."""
    N, C, H, W = gt.shape
    if min(H, W) < 11:
        raise ValueError(f"SSIM convention 'gaussian11' needs images of at least 11 x 11 pixels, got {H} x {W}; "
                         "use eval.conventions = {'ssim': 'torchmetrics'} for smaller images")
    g = gaussian_window().to(gt.device)
    rows, cols = g.view(1, 1, 11, 1).repeat(C, 1, 1, 1), g.view(1, 1, 1, 11).repeat(C, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, C, H - 10, W - 10]
        return F.conv2d(F.conv2d(t, rows, groups=C), cols, groups=C)

    x, y = pred.double(), gt.double()
    ux, uy = blur(x), blur(y)
    cov_norm = 121 / 120 if sample_covariance else 1.0
    vx = cov_norm * (blur(x * x) - ux * ux)
    vy = cov_norm * (blur(y * y) - uy * uy)
    vxy = cov_norm * (blur(x * y) - ux * uy)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))  # [N, C, h, w]
    return s.mean((2, 3)).mean(1).to(gt.dtype)


def lpips_nets(conventions: dict[str, str] | None = None) -> tuple[str, ...]:
    """The LPIPS trunks the `lpips` convention scores, e.g. ('vgg', 'alex') for 'vgg+alex'."""
    return tuple((conventions or DEFAULT_CONVENTIONS)["lpips"].split("+"))


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
        self.reason: str | None = None  # why LPIPS-<net> is not reported (a tag value), None when it is
        path = pathlib.Path(torch.hub.get_dir()) / "checkpoints" / self.WEIGHTS[net]
        if not path.exists():
            self.reason = f"backbone weights not found at {path} (no download is attempted)"
            if net not in LpipsScorer._warned:
                log.warning("LPIPS-%s unavailable: backbone weights not found at %s (no download is attempted); "
                            "LPIPS is not reported.", net, path)
                LpipsScorer._warned.add(net)
            return
        import lpips

        self.model = lpips.LPIPS(net=net, verbose=False).eval()

    @property
    def metric(self) -> str:
        """The per-image metric name (`lpips_vgg`); `keys.eval_metric` of it is what is logged."""
        return f"lpips_{self.net}"

    @property
    def available(self) -> bool:
        return self.model is not None

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:  # [N]
        self.model.to(pred.device)
        return self.model(pred.float() * 2 - 1, gt.float() * 2 - 1, normalize=False).flatten()
