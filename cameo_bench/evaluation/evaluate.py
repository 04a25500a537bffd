"""The held-out evaluation: sampled target views scored for quality and consistency, plus attention correspondence.

`evaluate` is the one entry point the engine and `cameo-bench eval` call; the metrics themselves live
in `metrics` (image quality, viewpoint bins), `consistency` (warp error), `attention` (per-layer
correspondence), `floors` (trivial predictors and the depth-warp oracle on the same target views) and
`convergence` (fixed-noise held-out loss and one-step x0 PSNR). `perturbation_analysis` reuses it to
ask which layers the samples depend on.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
from einops import rearrange

from cameo_bench.config.spec import EvalSpec
from cameo_bench.evaluation.attention import attention_metrics, supervised_copy
from cameo_bench.evaluation.consistency import consistency_pairs, warp_error
from cameo_bench.evaluation.convergence import convergence_metrics
from cameo_bench.evaluation.floors import FloorScores
from cameo_bench.evaluation.metrics import (LpipsScorer, image_metrics, lpips_nets, quality_by_bin, summarise_quality,
                                            target_view_angles)
from cameo_bench.evaluation.protocol import drop_uncomputed, resolve_conventions
from cameo_bench.tracking import keys


# Why an evaluation of samples without references (data.num_ref = 0: a single-view image prior)
# leaves out every metric that compares a sample with its ground-truth view.
NO_REFERENCES = ("no reference views (data.num_ref = 0): samples are unconditional, so they reconstruct no "
                 "ground-truth view; the held-out loss and one-step x0 PSNR still measure the model")


def unconditional_omissions(lpips: list[str], floors: bool) -> dict[str, str]:
    """{metric or prefix: why} for an evaluation whose batches have no references (`lpips`: the
    LPIPS metrics that would otherwise have been scored)."""
    names = [keys.PSNR, keys.SSIM, *lpips]
    if floors:
        names += [keys.FLOOR, keys.ORACLE]
    return dict.fromkeys(names, NO_REFERENCES)


class _Perturbed:
    """Calls the model with a fixed `perturb` mapping, whatever the caller passes."""

    def __init__(self, model, perturb: dict[str, str] | None):
        self.model, self.perturb = model, perturb

    def __call__(self, *args, **kwargs):
        kwargs["perturb"] = self.perturb
        return self.model(*args, **kwargs)


@torch.no_grad()
def evaluate(model, diffusion, batches: list[dict], spec: EvalSpec, *, seed: int = 0,
             supervised_layer: str | None = None, perturb: dict[str, str] | None = None,
             floors: bool = True, omitted: dict[str, str] | None = None) -> dict[str, float]:
    """`eval/*` metrics of DDIM samples of the target views of `batches` and, when `spec.attention`,
    `attn/*` metrics of every layer (repeated under `attn/supervised/` for `supervised_layer`).

    With `floors`, also `eval/floor/*` and `eval/oracle/*` (they do not depend on the model: the
    engine asks for them once per run); with `spec.convergence_timesteps`, `eval/heldout_loss*` and
    `eval/x0_psnr/*` and `eval/reference_use`. Sampling noise of batch b comes from `seed * 1_000_003 + b`, so two runs
    evaluated with the same seed see the same noise. The model's train/eval mode is restored on return.
    Metrics follow `spec.conventions` (evaluation/metrics.py); one that cannot be computed (no LPIPS
    weights, no depth, no correspondence truth) is left out, never NaN, and `omitted` (if given)
    gets `{metric: why}`.
    """
    omitted = {} if omitted is None else omitted
    conventions = resolve_conventions(spec.conventions)
    was_training = model.training
    model.eval()
    try:
        per_image: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": [], "lpips_vgg": [], "lpips_alex": []}
        consistency, consistency_gt, angles = [], [], []
        scorers = [LpipsScorer(net) for net in lpips_nets(conventions)] if spec.lpips else []
        omitted.update({keys.eval_metric(s.metric): s.reason for s in scorers if not s.available})
        floor_scores = FloorScores(scorers, conventions) if floors else None
        for b, batch in enumerate(batches):
            num_ref = int(batch["num_ref"])
            if num_ref == 0:  # no reference (an image prior): a sample is unconditional, it reconstructs no view
                continue
            generator = torch.Generator().manual_seed(seed * 1_000_003 + b)
            images = diffusion.sample(_Perturbed(model, perturb) if perturb else model, batch,
                                      num_steps=spec.sampler_steps, guidance_scale=spec.guidance_scale,
                                      generator=generator, eta=spec.sampler_eta)  # [B, V, 3, H, W]
            pred = rearrange(images[:, num_ref:], "b v c h w -> (b v) c h w")
            gt = rearrange(batch["image"][:, num_ref:], "b v c h w -> (b v) c h w")
            angles.append(target_view_angles(batch["cam2world"], num_ref).flatten().cpu())  # [(b v)]
            if floor_scores is not None:
                floor_scores.add(batch, angles[-1])
            for key, value in image_metrics(pred, gt, conventions).items():
                per_image[key].append(value.cpu())
            for scorer in scorers:
                if scorer.available:
                    per_image[f"lpips_{scorer.net}"].append(scorer(pred, gt).cpu())
            if "depth" in batch:
                pairs = consistency_pairs(images.shape[1], num_ref)
                consistency.append(warp_error(images, batch, pairs).cpu())
                consistency_gt.append(warp_error(batch["image"], batch, pairs).cpu())
        per_image = {k: torch.cat(v) for k, v in per_image.items() if v}
        out = summarise_quality(per_image, conventions)
        if angles:
            out.update(quality_by_bin(per_image, torch.cat(angles), conventions))
        else:
            scored = [keys.eval_metric(s.metric) for s in scorers if s.available]
            omitted.update(unconditional_omissions(scored, floors=floor_scores is not None))
            floor_scores = None
        if consistency and torch.cat(consistency).numel():
            out[keys.CONSISTENCY] = float(torch.cat(consistency).mean())
            out[keys.CONSISTENCY_GT] = float(torch.cat(consistency_gt).mean())
        else:
            why = ("no pixel of a generated view lands in another view" if consistency
                   else NO_REFERENCES if not angles else "no evaluation batch has depth")
            omitted.update({keys.CONSISTENCY: why, keys.CONSISTENCY_GT: why})
        if floor_scores is not None:
            out.update(floor_scores.metrics())
        if spec.convergence_timesteps and perturb is None:
            out.update(convergence_metrics(model, diffusion, batches, seed=seed, num_timesteps=spec.convergence_timesteps))
        if spec.attention and perturb is None and max(batch["image"].shape[1] for batch in batches) < 2:
            omitted[keys.ATTN] = "one view per sample: attention correspondence needs 2 or more views"
        elif spec.attention and perturb is None:
            out.update(attention_metrics(model, diffusion, batches, timestep=spec.attention_timestep, seed=seed,
                                         truth=spec.attention_truth, omitted=omitted))
            if supervised_layer is not None:
                out.update(supervised_copy(out, supervised_layer))
                if keys.SUPERVISED_PCK1 in out:  # the headline copy: MLflow shows it with eval/psnr
                    out[keys.PCK_SUPERVISED] = out[keys.SUPERVISED_PCK1]
        return drop_uncomputed(out, omitted)
    finally:
        model.train(was_training)


def perturbation_analysis(model, diffusion, batches: list[dict], spec: EvalSpec, *, seed: int = 0,
                          layers: Iterable[str] | None = None) -> dict[str, float]:
    """Quality drop when one layer's attention is replaced by identity (causality analysis).

    `perturb/base/<metric>` is the unperturbed evaluation, `perturb/<layer>/{psnr,ssim}_drop` the
    fall with that layer's attention output replaced by its values; same seed, so same noise.
    """
    quiet = dataclasses.replace(spec, attention=False, lpips=False, convergence_timesteps=0)
    base = evaluate(model, diffusion, batches, quiet, seed=seed, floors=False)
    out = {keys.perturb_metric(keys.PERTURB_BASE, k.removeprefix(keys.EVAL)): v for k, v in base.items()}
    for name in layers if layers is not None else [layer.name for layer in model.attention_layers()]:
        hit = evaluate(model, diffusion, batches, quiet, seed=seed, perturb={name: "identity"}, floors=False)
        for metric in ("psnr", "ssim"):
            key = keys.eval_metric(metric)
            out[keys.perturb_metric(name, metric + keys.DROP)] = base[key] - hit[key]
    return out
