"""One optimizer step of a `Run`: noise -> forward with a tap -> diffusion + weight x alignment loss -> update.

Every random draw of a sample comes from a generator seeded by (seed, batch number, position in the
global batch), so a resumed run replays exactly the draws an uninterrupted run would make, on any
number of ranks (`cameo_bench.engine.distributed` says how N ranks give one process's parameters).
A non-finite loss is a global decision: every rank skips the step together, or every rank stops
after rank 0 wrote a checkpoint of the state before the step.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from backbones import TapRequest
from cameo_bench.data.batch import batch_to, collate
from cameo_bench.data.loading import batch_indices
from cameo_bench.engine import checkpoint, distributed
from cameo_bench.engine.build import Run
from cameo_bench.engine.target_cache import step_targets
from cameo_bench.tracking import keys


class NonFiniteLossError(FloatingPointError):
    """Training stopped on a NaN/inf loss; a checkpoint of the state before the step was written."""


class ZeroPairsError(RuntimeError):
    """The CAMEO term had no supervised pair for `cameo.max_zero_pair_steps` consecutive steps: the
    run would train a baseline while being labelled CAMEO."""


@dataclass
class SampleDraws:
    """The random inputs of one (micro-)batch shard, drawn per global sample (see `draw`)."""

    generators: list[torch.Generator]  # one per sample, positioned after t, drop and noise
    t: torch.Tensor  # [B] long
    camera_drop: torch.Tensor  # [B] bool
    noise: torch.Tensor  # [B, V, C, h, w]


def local_batch(run: Run, batch_no: int) -> tuple[dict, range]:
    """This rank's slice of global batch `batch_no`, and the slice's positions in it."""
    per_rank = run.exp.data.batch_size // run.dist.world
    positions = range(run.dist.rank * per_rank, (run.dist.rank + 1) * per_rank)
    return batch_to(collate([run.train_set[i] for i in batch_items(run, batch_no, positions)]), run.device), positions


@functools.lru_cache(maxsize=8)
def _batch_indices(num_items: int, batch_size: int, batch_no: int, seed: int) -> tuple[int, ...]:
    return tuple(batch_indices(num_items, batch_size, batch_no, seed))


def batch_items(run: Run, batch_no: int, positions: range) -> list[int]:
    """Training-set indices of the samples at `positions` of global batch `batch_no`."""
    data = run.exp.data
    idx = _batch_indices(len(run.train_set), data.batch_size, batch_no, data.seed)
    return [idx[p] for p in positions]


def draw(run: Run, batch: dict, batch_no: int, positions: range) -> SampleDraws:
    """t, camera drop and noise of each sample, from that sample's own generator: the draws of
    global sample p of batch `batch_no` are the same whichever rank holds it."""
    generators = distributed.sample_generators(run.exp.seed, batch_no, positions)
    T, p_drop = run.diffusion.num_train_timesteps, run.diffusion.config.camera_dropout
    shape = tuple(run.diffusion.model_shape(batch)[1:])  # [V, C, h, w], without encoding
    t = torch.cat([torch.randint(0, T, (1,), generator=g) for g in generators])  # [B]
    drop = torch.cat([torch.rand(1, generator=g) for g in generators]) < p_drop  # [B]
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])  # [B, V, C, h, w]
    return SampleDraws(generators, t.to(run.device), drop.to(run.device), noise.to(run.device))


def select_queries(cameo_loss, targets, num_ref: int, generators: list[torch.Generator]) -> torch.Tensor | None:
    """Query ids [B, Qs] for the tap, sampled per sample, each from its own generator (world-size
    invariant); None when every token of every view is a query, so the tap hands out q as it is
    instead of gathering a copy of it (and scattering its gradient back)."""
    if cameo_loss.query_sampling == "all":  # nothing drawn: the same ids for every sample, in one call
        ids = cameo_loss.select_queries(targets, num_ref)
        num_views, h, w = targets.grid
        return None if ids.shape[1] == num_views * h * w else ids  # views are distinct: all of them
    return torch.cat([cameo_loss.select_queries(targets.select(slice(b, b + 1)), num_ref, g)
                      for b, g in enumerate(generators)])


@contextlib.contextmanager
def rng_scope(run: Run, batch_no: int, positions: range):
    """Anything still drawing from torch's global generator (dropout, a source without its own
    seed) sees a stream fixed by (seed, batch, shard), not by what ran before."""
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        torch.manual_seed(distributed.sample_seed(run.exp.seed, batch_no, 1 << 32 | positions.start))
        yield


def autocast(run: Run):
    """bf16 autocast when asked for, or on CUDA with `precision = 'auto'`; fp32 otherwise."""
    precision = run.exp.train.precision
    if precision == "bf16" or (precision == "auto" and run.device.type == "cuda"):
        return torch.autocast(run.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def layer_grid(run: Run, batch: dict) -> tuple[tuple[int, int, int], int]:
    """((V, h, w) token grid, stride in image pixels) of the supervised layer on this batch.

    The stride in image pixels is the codec's downsample x the layer's stride on the model input,
    so targets are computed from image-resolution depth/point maps on the layer's own grid (8 x 2 =
    16 px per token at SD's VAE and a 1/2-resolution layer); the batch may carry no image (cached latents).
    """
    layer = run.model.get_attention_layer(run.layer)
    stride = run.codec.downsample * layer.stride
    V = batch["intrinsics"].shape[1]
    H, W = run.diffusion.image_size(batch)
    return (V, H // stride, W // stride), stride


def forward_micro_batch(run: Run, module, batch: dict, batch_no: int, positions: range):
    """Draws, correspondence targets, query selection and the forward of one micro-batch: the part of
    a step that the training step and the FLOP count (`engine.compute`) share. `batch` is
    `local_batch(run, batch_no)`'s: the targets of deterministic sources come from the training
    set's cache of them (`engine/target_cache.py`), by item.

    -> (diffusion loss, cond_mask [B, V], alignment loss or None, CAMEO diagnostics, targets or None).
    """
    exp = run.exp
    with rng_scope(run, batch_no, positions):
        draws = draw(run, batch, batch_no, positions)
        tap, targets = None, None
        if run.cameo_loss is not None:
            grid, stride = layer_grid(run, batch)
            with torch.no_grad():
                targets = step_targets(run.train_set, batch_items(run, batch_no, positions), exp.cameo.source,
                                       exp.cameo.source_options, batch, grid, stride, exp.cameo.target_cache_mb)
            tap = TapRequest(run.layer, select_queries(run.cameo_loss, targets, batch["num_ref"], draws.generators))
        with autocast(run):
            diff_loss, cond_mask, align, diag = module(batch, draws, tap, targets)
    return diff_loss, cond_mask, align, diag, targets


def train_step(run: Run, step: int) -> dict[str, float]:
    """One optimizer step over `optim.grad_accum` micro-batches of `data.batch_size` each.

    Every rank must call it for the same step. Returned metrics are this rank's values of the
    globally normalised losses; `reduce_metrics` averages them over ranks before logging.
    """
    exp = run.exp
    accum = max(exp.optim.grad_accum, 1)
    world = run.dist.world
    run.optimizer.zero_grad(set_to_none=True)
    metrics: dict[str, float] = {}
    pairs = torch.zeros(2, dtype=torch.float64)  # this step's (source pairs, loss terms), all ranks
    for micro in range(accum):
        batch_no = step * accum + micro
        batch, positions = local_batch(run, batch_no)
        # Gradients are all-reduced once, on the last micro-step.
        sync = run.ddp_model.no_sync() if world > 1 and micro < accum - 1 else contextlib.nullcontext()
        with sync:
            diff_loss, cond_mask, align, diag, targets = forward_micro_batch(run, run.ddp_model, batch, batch_no,
                                                                             positions)
            terms = {"diffusion": diff_loss} if align is None else {"diffusion": diff_loss, "cameo": align}
            # One all-reduce: the global count of supervised target views, and which terms are
            # non-finite on any rank (the skip/stop decision must be the same everywhere).
            local_views = cond_mask.detach().float().sum()
            flags = torch.stack([(~torch.isfinite(v.detach())).float() for v in terms.values()])
            local_pairs = pair_counts(targets, diag, local_views.device)  # [2]: source pairs, loss terms
            reduced = distributed.all_reduce_sum(torch.cat([local_views[None], flags, local_pairs]))
            pairs += reduced[-2:].detach().double().cpu()
            for (name, value), bad in zip(terms.items(), reduced[1:1 + len(terms)]):
                if bad > 0:
                    return _nonfinite(run, step, name, value)
            # DDP averages gradients over ranks: scale the local mean so the average is the
            # mean over the global batch (identity in one process).
            terms["diffusion"] = diff_loss * (world * local_views / reduced[0])
            total = terms["diffusion"] if align is None else terms["diffusion"] + exp.cameo.weight * align
            (total / accum).backward()
        for name, value in terms.items():
            key = keys.train_loss(name)
            metrics[key] = metrics.get(key, 0.0) + float(value.detach()) / accum
        metrics.update({keys.cameo_diagnostic(k): float(v) for k, v in diag.items()})
        if targets is not None:  # this rank's count, summed over micro-batches (reduce_metrics sums ranks)
            metrics[keys.CAMEO_PAIRS_SOURCE] = metrics.get(keys.CAMEO_PAIRS_SOURCE, 0.0) + float(local_pairs[0])
    if run.cameo_loss is not None:
        check_zero_pairs(run, step, batch, float(pairs[0]), float(pairs[1]))
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for g in run.optimizer.param_groups for p in g["params"]], exp.optim.grad_clip or float("inf"))
    if not torch.isfinite(grad_norm):  # computed from all-reduced gradients: equal on every rank
        return _nonfinite(run, step, "grad_norm", grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update_parameters(run.model)
    metrics[keys.GRAD_NORM] = float(grad_norm)
    metrics[keys.LR] = run.scheduler.get_last_lr()[0]
    return metrics


def pair_counts(targets, diag: dict, device) -> torch.Tensor:  # [2] float
    """(pairs the source supervises, terms the CAMEO loss scored) of one micro-batch on this rank;
    zeros without CAMEO. The source's count is every valid (query token, key view) pair; the loss's
    is what remains after query sampling and `cameo.query_views` / `key_views`."""
    if targets is None:
        return torch.zeros(2, device=device)
    source = targets.valid.sum().float().to(device)
    loss = (torch.as_tensor(diag.get("pairs_ref", 0.0)) + torch.as_tensor(diag.get("pairs_tgt", 0.0))).float()
    return torch.stack([source, loss.to(device)])


def check_zero_pairs(run: Run, step: int, batch: dict, source_pairs: float, loss_pairs: float) -> None:
    """Stop a run whose CAMEO term has had no pair for `cameo.max_zero_pair_steps` steps in a row.

    The counts are global (all-reduced), so every rank takes the same decision. A loss of 0 from no
    pairs is not CAMEO: without this, a source the data cannot feed (`depth` on SfM-sparse depth)
    trains a baseline for the whole run while it is logged as a CAMEO run.
    """
    c = run.exp.cameo
    run.state.zero_pair_steps = run.state.zero_pair_steps + 1 if loss_pairs == 0 else 0
    if c.max_zero_pair_steps == 0 or run.state.zero_pair_steps < c.max_zero_pair_steps:
        return
    grid, stride = layer_grid(run, batch)
    why = (f"the source gave {source_pairs:.0f} pairs but the loss scored none (cameo.query_views = "
           f"{c.query_views!r}, cameo.key_views = {c.key_views!r})" if source_pairs > 0 else
           "the source found no (query token, key view) pair in any batch")
    hint = _ZERO_PAIR_HINTS.get(c.source, "")
    raise ZeroPairsError(
        f"the CAMEO term had 0 supervised pairs for {run.state.zero_pair_steps} consecutive steps (up to step "
        f"{step}): {why}. Source {c.source!r} with options {c.source_options}, layer {run.layer!r} on a token "
        f"grid (V, h, w) = {tuple(grid)} of {stride} px per token, batch keys {sorted(batch)}. {hint}Use a "
        "source this data feeds (scene folders with SfM tracks: 'sfm_tracks'; without depth: 'matches' with "
        "data.match_image_size at the stored size, or 'epipolar' with cameo.target = 'soft'), a layer with "
        "more tokens, or set cameo.weight = 0 for a baseline; cameo.max_zero_pair_steps = 0 never stops.")


_ZERO_PAIR_HINTS = {
    "sfm_tracks": "No SfM point is observed in two views of a sample: the sampled frames share no point "
                  "(lower data.frame_spacing) or the track files are wrong (cameo-bench data check). ",
    "depth": "Without dense depth 'depth' reads 'sparse_depth' (the SfM points): none of a view's points "
             "landed in another view of the sample, or the views have no points. ",
    "matches": "SIFT found no verified match; on 32-64 px model inputs set data.match_image_size. ",
}


def _nonfinite(run: Run, step: int, term: str, value: torch.Tensor) -> dict[str, float]:
    """Skip or stop; every rank gets here together (the decision was all-reduced)."""
    if run.exp.train.nonfinite == "skip":
        run.optimizer.zero_grad(set_to_none=True)
        run.state.skipped_steps += 1
        return {keys.SKIPPED_STEPS: float(run.state.skipped_steps)}
    path = checkpoint.save_run(run)  # the weights, optimizer and RNG are still those before the step
    value = float(value.detach())
    seen = f"{value}" if run.dist.world == 1 else f"on some of {run.dist.world} ranks; {value} here"
    raise NonFiniteLossError(
        f"non-finite {term} loss ({seen}) at step {step}; state before this step saved to "
        f"{path or run.ckpt_path}. Lower optim.lr, raise optim.warmup_steps, or set train.nonfinite = 'skip'.")


def reduce_metrics(run: Run, metrics: dict[str, float]) -> dict[str, float]:
    """Means over ranks (the losses are globally normalised, so their mean is the global value);
    CAMEO pair counts are summed. Every rank must call it with the same keys."""
    if run.dist.world == 1:
        return metrics
    names = sorted(metrics)
    values = distributed.all_reduce_sum(torch.tensor([metrics[k] for k in names], dtype=torch.float64,
                                                     device=run.device))
    return {k: float(v) if k in keys.SUMMED_OVER_RANKS else float(v) / run.dist.world
            for k, v in zip(names, values.tolist())}
