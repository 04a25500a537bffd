"""Held-out evaluation: novel-view quality, attention correspondence per layer, multi-view consistency.

Quality is measured on sampled target views against the ground truth. Attention correspondence is
measured on EVERY attention layer (not only the supervised one) so emergent correspondence can be
profiled, with the ground truth taken from depth reprojection of each query token's centre pixel,
binned by the viewpoint change between query and key view.
"""
from __future__ import annotations

import logging
import pathlib
import dataclasses
from typing import Iterable

import torch
from einops import rearrange
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from backbones import TapRequest
from cameo_bench import geometry
from cameo_bench.config.spec import EvalSpec

log = logging.getLogger(__name__)


class _Perturbed:
    """Calls the model with a fixed `perturb` mapping, whatever the caller passes."""

    def __init__(self, model, perturb: dict[str, str] | None):
        self.model, self.perturb = model, perturb

    def __call__(self, *args, **kwargs):
        kwargs["perturb"] = self.perturb
        return self.model(*args, **kwargs)

VIEW_BINS = ((0.0, 30.0), (30.0, 60.0), (60.0, 90.0), (90.0, 1e9))
PCK_THRESHOLDS = (0.5, 1.0, 2.0)


def bin_name(lo: float, hi: float) -> str:
    return f"{int(lo)}-{int(hi)}" if hi < 1e8 else f"{int(lo)}+"


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
    for lo, hi in VIEW_BINS:
        sel = (angle >= lo) & (angle < hi)
        if not sel.any():
            continue
        name = bin_name(lo, hi)
        for key, value in per_image.items():
            out[f"eval/{key}/{name}"] = float(value[sel].mean())
        out[f"eval/count/{name}"] = float(sel.sum())
    return out


# ---------------------------------------------------------------------------------------------
# image quality


def image_metrics(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image PSNR and SSIM for images [N, 3, H, W] in [0, 1]."""
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


# ---------------------------------------------------------------------------------------------
# attention correspondence


def token_ground_truth(batch: dict, grid: tuple[int, int, int], stride: int):
    """Continuous token coordinates in view j of each query token's centre pixel in view i.

    Returns xy [B, V, V, h*w, 2] (x, y in tokens of view j), valid [B, V, V, h*w] (never on i == j),
    and the relative rotation angle [B, V, V] in degrees.
    """
    V, h, w = grid
    depth, K, c2w = batch["depth"], batch["intrinsics"], batch["cam2world"]
    B = depth.shape[0]
    # the exact token centre ((a + 1/2) s - 1/2) falls between pixels for even strides: average
    # the landing points of the 1 or 2 x 2 pixels around it, valid only if all of them are valid
    offsets = sorted({(stride - 1) // 2, stride // 2})
    rows = [torch.arange(h, device=depth.device) * stride + o for o in offsets]
    cols = [torch.arange(w, device=depth.device) * stride + o for o in offsets]
    xy = depth.new_zeros(B, V, V, h * w, 2)
    valid = torch.zeros(B, V, V, h * w, dtype=torch.bool, device=depth.device)
    for i in range(V):
        for j in range(V):
            if i == j:
                continue
            uv, ok = geometry.reproject(depth[:, i], K[:, i], c2w[:, i], K[:, j], c2w[:, j], depth[:, j])
            uv_c = sum(uv[:, r][:, :, c] for r in rows for c in cols) / (len(rows) * len(cols))  # [B, h, w, 2]
            ok_c = torch.stack([ok[:, r][:, :, c] for r in rows for c in cols]).all(0)  # [B, h, w]
            xy[:, i, j] = rearrange((uv_c + 0.5) / stride - 0.5, "b h w c -> b (h w) c")
            valid[:, i, j] = rearrange(ok_c, "b h w -> b (h w)")
    angle = geometry.rotation_angle_deg(c2w[:, :, None], c2w[:, None, :])  # [B, V, V]
    return xy, valid, angle


def attention_scores(tap, grid: tuple[int, int, int], gt_xy, gt_valid, angle) -> dict[str, torch.Tensor]:
    """Per (scene, query view, key view, query): argmax end-point error and mass near the truth.

    Uses the head-mean logits with a softmax over the keys of each key view, the same quantity
    CAMEO's per-view loss supervises.
    """
    V, h, w = grid
    n = h * w
    key_xy = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy"), -1)
    key_xy = key_xy.reshape(n, 2).to(gt_xy)  # [hw, 2] (x, y)
    q = rearrange(tap.q.float(), "b H (v n) d -> b H v n d", v=V)
    k = rearrange(tap.k.float(), "b H (v n) d -> b H v n d", v=V)
    epe, mass, bins = [], [], []
    for i in range(V):
        for j in range(V):
            if i == j:
                continue
            logits = torch.einsum("bhqd,bhkd->bqk", q[:, :, i], k[:, :, j]) * tap.scale / q.shape[1]  # [B,n,n]
            probs = logits.softmax(-1)
            pred = key_xy[logits.argmax(-1)]  # [B, n, 2]
            target = gt_xy[:, i, j]  # [B, n, 2]
            dist = (key_xy[None, None] - target[:, :, None]).norm(dim=-1)  # [B, n, hw]
            ok = gt_valid[:, i, j]
            epe.append((pred - target).norm(dim=-1)[ok])
            mass.append((probs * (dist <= 1.0)).sum(-1)[ok])
            bins.append(angle[:, i, j, None].expand(-1, n)[ok])
    return {"epe": torch.cat(epe), "mass": torch.cat(mass), "angle": torch.cat(bins)}


def summarise_attention(scores: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    epe, mass, angle = scores["epe"], scores["mass"], scores["angle"]
    if epe.numel() == 0:
        return out
    out[f"{prefix}/epe"] = float(epe.mean())
    out[f"{prefix}/mass1"] = float(mass.mean())
    for t in PCK_THRESHOLDS:
        out[f"{prefix}/pck@{t:g}"] = float((epe <= t).float().mean())
    for lo, hi in VIEW_BINS:
        sel = (angle >= lo) & (angle < hi)
        if sel.any():
            out[f"{prefix}/pck@1/{bin_name(lo, hi)}"] = float((epe[sel] <= 1.0).float().mean())
            out[f"{prefix}/count/{bin_name(lo, hi)}"] = float(sel.sum())
    return out


@torch.no_grad()
def attention_metrics(model, diffusion, batches: list[dict], *, timestep: int, seed: int,
                      layers: Iterable[str] | None = None) -> dict[str, float]:
    """Attention-correspondence metrics for each attention layer at one noise level."""
    layer_specs = {layer.name: layer for layer in model.attention_layers()}
    names = list(layers) if layers is not None else list(layer_specs)
    collected: dict[str, dict[str, list[torch.Tensor]]] = {n: {"epe": [], "mass": [], "angle": []} for n in names}
    # attention is measured with the real cameras: no classifier-free camera dropout here
    diffusion = type(diffusion)(dataclasses.replace(diffusion.config, camera_dropout=0.0), codec=diffusion.codec)
    for b, batch in enumerate(batches):
        if "depth" not in batch:
            return {}
        generator = torch.Generator().manual_seed(seed * 31 + b)
        B, V, _, H, W = batch["image"].shape
        t = torch.full((B,), timestep, dtype=torch.long)
        for name in names:
            layer = layer_specs[name]
            grid = (V, H // layer.stride, W // layer.stride)
            gt_xy, gt_valid, angle = token_ground_truth(batch, grid, layer.stride)
            _, aux = diffusion.training_loss(model, batch, t=t, generator=torch.Generator().manual_seed(generator.initial_seed()),
                                             tap=TapRequest(name))
            scores = attention_scores(aux["tap"], grid, gt_xy, gt_valid, angle)
            for key, value in scores.items():
                collected[name][key].append(value.cpu())
    out: dict[str, float] = {}
    for name, parts in collected.items():
        out.update(summarise_attention({k: torch.cat(v) for k, v in parts.items()}, f"attn/{name}"))
    return out


# ---------------------------------------------------------------------------------------------
# multi-view consistency of generated views


def warp_error(images: torch.Tensor, batch: dict, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """Mean absolute colour difference between view i and view j warped into i by GT geometry."""
    depth, K, c2w = batch["depth"], batch["intrinsics"], batch["cam2world"]
    H, W = images.shape[-2:]
    errors = []
    for i, j in pairs:
        uv, ok = geometry.reproject(depth[:, i], K[:, i], c2w[:, i], K[:, j], c2w[:, j], depth[:, j])
        grid = torch.stack([uv[..., 0] / (W - 1) * 2 - 1, uv[..., 1] / (H - 1) * 2 - 1], -1)
        warped = torch.nn.functional.grid_sample(images[:, j].float(), grid.float(), align_corners=True)
        diff = (warped - images[:, i].float()).abs().mean(1)  # [B, H, W]
        if ok.any():
            errors.append(diff[ok])
    return torch.cat(errors) if errors else torch.zeros(0)


def consistency_pairs(num_views: int, num_ref: int) -> list[tuple[int, int]]:
    targets = list(range(num_ref, num_views))
    if len(targets) >= 2:
        return [(i, j) for i in targets for j in targets if i != j]
    return [(t, r) for t in targets for r in range(num_ref)]


# ---------------------------------------------------------------------------------------------
# the whole evaluation


@torch.no_grad()
def evaluate(model, diffusion, batches: list[dict], spec: EvalSpec, *, seed: int = 0,
             supervised_layer: str | None = None, perturb: dict[str, str] | None = None) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        per_image: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": [], "lpips_vgg": [], "lpips_alex": []}
        consistency, consistency_gt, angles = [], [], []
        scorers = [LpipsScorer(net) for net in ("vgg", "alex")] if spec.lpips else []
        for b, batch in enumerate(batches):
            num_ref = int(batch["num_ref"])
            generator = torch.Generator().manual_seed(seed * 1_000_003 + b)
            images = diffusion.sample(_Perturbed(model, perturb) if perturb else model, batch,
                                      num_steps=spec.sampler_steps, guidance_scale=spec.guidance_scale,
                                      generator=generator)
            pred = rearrange(images[:, num_ref:], "b v c h w -> (b v) c h w")
            gt = rearrange(batch["image"][:, num_ref:], "b v c h w -> (b v) c h w")
            angles.append(target_view_angles(batch["cam2world"], num_ref).flatten().cpu())  # [(b v)]
            for key, value in image_metrics(pred, gt).items():
                per_image[key].append(value.cpu())
            for scorer in scorers:
                if scorer.available:
                    per_image[f"lpips_{scorer.net}"].append(scorer(pred, gt).cpu())
            if "depth" in batch:
                pairs = consistency_pairs(images.shape[1], num_ref)
                consistency.append(warp_error(images, batch, pairs).cpu())
                consistency_gt.append(warp_error(batch["image"], batch, pairs).cpu())
        per_image = {k: torch.cat(v) for k, v in per_image.items() if v}
        out = {f"eval/{k}": float(v.mean()) for k, v in per_image.items()}
        out.update(quality_by_bin(per_image, torch.cat(angles)))
        if consistency:
            out["eval/consistency_l1"] = float(torch.cat(consistency).mean())
            out["eval/consistency_l1_gt"] = float(torch.cat(consistency_gt).mean())
        if spec.attention and perturb is None:
            out.update(attention_metrics(model, diffusion, batches, timestep=spec.attention_timestep, seed=seed))
            if supervised_layer is not None:
                for key in [k for k in out if k.startswith(f"attn/{supervised_layer}/")]:
                    out["attn/supervised/" + key.split("/", 2)[2]] = out[key]
        return out
    finally:
        model.train(was_training)


def perturbation_analysis(model, diffusion, batches: list[dict], spec: EvalSpec, *, seed: int = 0,
                          layers: Iterable[str] | None = None) -> dict[str, float]:
    """Quality drop when one layer's attention is replaced by identity (causality analysis)."""
    quiet = EvalSpec(**{**spec.__dict__, "attention": False, "lpips": False})
    base = evaluate(model, diffusion, batches, quiet, seed=seed)
    out = {f"perturb/base/{k.split('/', 1)[1]}": v for k, v in base.items()}
    for name in layers if layers is not None else [layer.name for layer in model.attention_layers()]:
        hit = evaluate(model, diffusion, batches, quiet, seed=seed, perturb={name: "identity"})
        for key in ("eval/psnr", "eval/ssim"):
            out[f"perturb/{name}/{key.split('/', 1)[1]}_drop"] = base[key] - hit[key]
    return out
