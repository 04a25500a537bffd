"""One training run: the step and the loop, checkpoint/resume, DDP-aware.

The step is deliberately small: noise -> forward with a tap on the supervised layer -> diffusion
loss + weight x alignment loss -> optimizer. Every random draw of step `s` comes from a generator
seeded by (seed, s), so a resumed run replays exactly the draws an uninterrupted run would make.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist

from backbones import TapRequest, create_backbone
from cameo_bench import checkpoint as ckpt
from cameo_bench.cameo import CameoLoss
from cameo_bench.correspondence import compute_targets, get_source, list_sources
from cameo_bench.data.batch import collate
from cameo_bench.diffusion import MultiViewDiffusion
from cameo_bench.run_log import RunLog
from cameo_bench.spec import Experiment


class NonFiniteLossError(FloatingPointError):
    """Training stopped on a NaN/inf loss; a checkpoint of the state before the step was written."""


class ExperimentError(ValueError):
    """An experiment that cannot run as configured, found before the first step."""


# ---------------------------------------------------------------------------------------------
# data


def build_datasets(exp: Experiment):
    """Train and held-out eval datasets. Synthetic eval scenes use a disjoint seed."""
    data = exp.data
    if data.kind == "synthetic":
        from cameo_bench.data.synthetic import SyntheticScenes

        train = SyntheticScenes(data.num_scenes, data.num_views, data.image_size, data.azimuth_step_deg, data.seed)
        held_out = SyntheticScenes(
            data.num_eval_scenes, data.num_views, data.image_size, data.azimuth_step_deg, data.seed + 1_000_003
        )
        return train, held_out
    if data.kind == "folder":
        from cameo_bench.data.scene_folder import SceneFolderDataset

        if not data.root:
            raise ExperimentError("data.kind = 'folder' needs data.root (a scene-folder dataset root)")
        kwargs = dict(num_views=data.num_views, num_ref=data.num_ref, image_size=data.image_size, seed=data.seed)
        return SceneFolderDataset(data.root, split="train", **kwargs), SceneFolderDataset(data.root, split="test", **kwargs)
    raise ExperimentError(f"unknown data.kind {data.kind!r}; valid: ['synthetic', 'folder']")


class MemoryCache:
    """Items of a deterministic dataset, rendered once. Synthetic scenes are cheap to keep."""

    def __init__(self, dataset, limit_bytes: int = 2 << 30):
        self.dataset = dataset
        self.items: dict[int, dict] = {}
        self.limit = limit_bytes
        self.size = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        if index in self.items:
            return self.items[index]
        item = self.dataset[index]
        nbytes = sum(v.numel() * v.element_size() for v in item.values() if torch.is_tensor(v))
        if self.size + nbytes <= self.limit:
            self.items[index] = item
            self.size += nbytes
        return item


def batch_indices(num_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Scene indices of global batch `step`: epochs of seeded permutations, no state to save."""
    per_epoch = max(num_items // batch_size, 1)
    epoch, slot = divmod(step, per_epoch)
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[slot * batch_size:(slot + 1) * batch_size].tolist()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# distributed


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """torchrun sets WORLD_SIZE/RANK; a plain `python -m cameo_bench train` stays single-process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    return info


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class RunState:
    step: int = 0
    skipped_steps: int = 0
    train_seconds: float = 0.0  # the training clock: excludes eval and checkpointing
    last_metrics: dict[str, float] = field(default_factory=dict)


def warmup_lambda(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


class Trainer:
    def __init__(self, exp: Experiment, *, resume: bool = False, trackers: list | None = None,
                 device: str | torch.device | None = None):
        self.exp = exp
        self.dist = init_distributed()
        self.device = torch.device(device or (f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu"))
        self.run_dir = pathlib.Path(exp.output_dir) / exp.name
        self.ckpt_path = self.run_dir / "checkpoints" / ckpt.LATEST
        torch.manual_seed(exp.seed)

        self.train_set, self.eval_set = build_datasets(exp)
        self.train_set = MemoryCache(self.train_set)
        probe = collate([self.train_set[0]])
        self.model = create_backbone(exp.backbone.name, exp.backbone.preset, **self._backbone_kwargs(probe))
        if exp.backbone.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.model.to(self.device)
        self.diffusion = MultiViewDiffusion(**dataclasses.asdict(exp.diffusion))
        self.layer = None
        self.cameo_loss = None
        self.validate(probe)
        if exp.cameo.enabled:
            c = exp.cameo
            self.cameo_loss = CameoLoss(
                num_heads=self.model.get_attention_layer(self.layer).num_heads, head=c.head,
                normalization=c.normalization, target=c.target, loss=c.loss, query_views=c.query_views,
                key_views=c.key_views, queries_per_view=c.queries_per_view, chunk_size=c.chunk_size,
            ).to(self.device)

        params = list(self.model.parameters()) + (list(self.cameo_loss.parameters()) if self.cameo_loss else [])
        o = exp.optim
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_lambda(o.warmup_steps))
        self.ema = None
        if o.ema_decay:
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(o.ema_decay))
        self.ddp_model = self.model
        if self.dist.world > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None)

        self.state = RunState()
        if resume and self.ckpt_path.exists():
            self._load(ckpt.load(self.ckpt_path))
        self.log = RunLog(self.run_dir, resume_step=self.state.step if resume else None) if self.dist.is_main else None
        self.trackers = [t for t in (trackers or [])] if self.dist.is_main else []

    # -- configuration checks -------------------------------------------------------------------

    def _backbone_kwargs(self, probe: dict) -> dict[str, Any]:
        from backbones import get_backbone_spec

        kwargs = dict(self.exp.backbone.overrides)
        fields = get_backbone_spec(self.exp.backbone.name).config_fields() or []
        if "in_channels" in fields:
            kwargs.setdefault("in_channels", probe["image"].shape[2])
        if "sample_size" in fields:  # pixel-space models here: the image is the sample
            kwargs.setdefault("sample_size", probe["image"].shape[-1])
        return kwargs

    def validate(self, probe: dict) -> None:
        """Fail before the first step, saying what would be valid."""
        c = self.exp.cameo
        if c.weight < 0 or not math.isfinite(c.weight):
            raise ExperimentError(f"cameo.weight must be a finite number >= 0 (0 = baseline), got {c.weight}")
        if self.exp.train.nonfinite not in ("stop", "skip"):
            raise ExperimentError(f"train.nonfinite must be 'stop' or 'skip', got {self.exp.train.nonfinite!r}")
        if self.exp.data.batch_size % self.dist.world:
            raise ExperimentError(f"data.batch_size {self.exp.data.batch_size} not divisible by world size {self.dist.world}")
        if not c.enabled:
            return
        self.layer = self.model.resolve_layer(c.layer)
        try:
            get_source(c.source).check(probe, **c.source_options)
        except (KeyError, TypeError) as err:
            message = err.args[0] if err.args else str(err)
            raise ExperimentError(
                f"{message}. Choose a source this dataset can feed (sources: {list_sources()}), "
                f"or 'none' / cameo.weight = 0 for the baseline") from None

    # -- checkpoints ----------------------------------------------------------------------------

    def _payload(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "cameo_head": self.cameo_loss.state_dict() if self.cameo_loss else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            "step": self.state.step,
            "data_position": self.state.step * self.exp.data.batch_size,
            "skipped_steps": self.state.skipped_steps,
            "train_seconds": self.state.train_seconds,
            "experiment": self.exp.flat_params(),
        }

    def _load(self, payload: dict[str, Any]) -> None:
        self.model.load_state_dict(payload["model"])
        if self.ema is not None and payload.get("ema") is not None:
            self.ema.load_state_dict(payload["ema"])
        if self.cameo_loss is not None and payload.get("cameo_head") is not None:
            self.cameo_loss.load_state_dict(payload["cameo_head"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        ckpt.set_rng_state(payload["rng"])
        self.state.step = int(payload["step"])
        self.state.skipped_steps = int(payload.get("skipped_steps", 0))
        self.state.train_seconds = float(payload.get("train_seconds", 0.0))

    def save_checkpoint(self) -> pathlib.Path | None:
        if not self.dist.is_main:
            return None
        path = ckpt.save(self.ckpt_path, self._payload())
        for tracker in self.trackers:
            tracker.flush()
        if self.log:
            self.log.flush()
        return path

    # -- the step -------------------------------------------------------------------------------

    def _autocast(self):
        precision = self.exp.train.precision
        if precision == "bf16" or (precision == "auto" and self.device.type == "cuda"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _global_batch(self, step: int) -> dict:
        idx = batch_indices(len(self.train_set), self.exp.data.batch_size, step, self.exp.data.seed)
        per_rank = len(idx) // self.dist.world
        mine = idx[self.dist.rank * per_rank:(self.dist.rank + 1) * per_rank]
        return to_device(collate([self.train_set[i] for i in mine]), self.device)

    def train_step(self, step: int) -> dict[str, float]:
        exp = self.exp
        generator = torch.Generator(device="cpu").manual_seed(exp.seed * 7_919 + step * 104_729 + self.dist.rank)
        accum = max(exp.optim.grad_accum, 1)
        self.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        for micro in range(accum):
            batch = self._global_batch(step * accum + micro)
            tap, targets = None, None
            if self.cameo_loss is not None:
                grid, stride = self._layer_grid(batch)
                with torch.no_grad():
                    targets = compute_targets(exp.cameo.source, batch, grid, stride, **exp.cameo.source_options)
                query_idx = self.cameo_loss.select_queries(targets, batch["num_ref"], generator)
                tap = TapRequest(self.layer, query_idx)
            with self._autocast():
                diff_loss, aux = self.diffusion.training_loss(self.ddp_model, batch, generator=generator, tap=tap)
            terms = {"diffusion": diff_loss}
            total = diff_loss
            if self.cameo_loss is not None:
                align, diag = self.cameo_loss(aux["tap"], targets, num_ref=batch["num_ref"])
                terms["cameo"] = align
                total = total + exp.cameo.weight * align
                metrics.update({f"train/cameo_{k}": float(v) for k, v in diag.items()})
            for name, value in terms.items():
                if not torch.isfinite(value):
                    return self._nonfinite(step, name, value)
            (total / accum).backward()
            for name, value in terms.items():
                metrics[f"train/loss_{name}"] = metrics.get(f"train/loss_{name}", 0.0) + float(value.detach()) / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for g in self.optimizer.param_groups for p in g["params"]], exp.optim.grad_clip or float("inf"))
        if not torch.isfinite(grad_norm):
            return self._nonfinite(step, "grad_norm", grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        metrics["train/grad_norm"] = float(grad_norm)
        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    def _nonfinite(self, step: int, term: str, value: torch.Tensor) -> dict[str, float]:
        if self.exp.train.nonfinite == "skip":
            self.optimizer.zero_grad(set_to_none=True)
            self.state.skipped_steps += 1
            return {"train/skipped_steps": float(self.state.skipped_steps)}
        path = self.save_checkpoint()
        raise NonFiniteLossError(
            f"non-finite {term} loss ({float(value)}) at step {step}; state before this step saved to {path}. "
            f"Lower optim.lr, raise optim.warmup_steps, or set train.nonfinite = 'skip'.")

    def _layer_grid(self, batch: dict) -> tuple[tuple[int, int, int], int]:
        layer = self.model.get_attention_layer(self.layer)
        V, H, W = batch["image"].shape[1], batch["image"].shape[-2], batch["image"].shape[-1]
        return (V, H // layer.stride, W // layer.stride), layer.stride

    # -- the loop -------------------------------------------------------------------------------

    def eval_batches(self) -> Iterator[dict]:
        n, bs = min(self.exp.eval.num_scenes, len(self.eval_set)), self.exp.eval.batch_size
        for start in range(0, n, bs):
            yield to_device(collate([self.eval_set[i] for i in range(start, min(start + bs, n))]), self.device)

    def evaluate(self) -> dict[str, float]:
        from cameo_bench.evaluation import evaluate

        model = self.ema.module if self.ema is not None else self.model
        return evaluate(model, self.diffusion, list(self.eval_batches()), self.exp.eval, seed=self.exp.seed,
                        supervised_layer=self.layer)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.log:
            self.log.log_metrics(metrics, step)
        for tracker in self.trackers:
            tracker.log_metrics(metrics, step)

    def fit(self) -> dict[str, float]:
        exp = self.exp
        if self.log:
            self.log.log_params(exp.flat_params())
        for tracker in self.trackers:
            tracker.log_params(exp.flat_params())
        progress = None
        if exp.train.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            progress = tqdm(total=exp.train.steps, initial=self.state.step, desc=exp.name, dynamic_ncols=True)
        try:
            if self.state.step == 0 and exp.eval.at_start and exp.eval.every > 0 and self.dist.is_main:
                self.state.last_metrics = self.evaluate()
                self.log_metrics(self.state.last_metrics, 0)
            while self.state.step < exp.train.steps:
                step = self.state.step
                tic = time.perf_counter()
                self.model.train()
                metrics = self.train_step(step)
                self.state.step = step + 1
                dt = time.perf_counter() - tic
                self.state.train_seconds += dt
                metrics["time/step_seconds"] = dt
                metrics["time/train_seconds"] = self.state.train_seconds
                if self.state.step % exp.train.log_every == 0 or self.state.step == exp.train.steps:
                    self.log_metrics(metrics, self.state.step)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(
                        loss=f"{metrics.get('train/loss_diffusion', float('nan')):.4f}",
                        cameo=f"{metrics.get('train/loss_cameo', 0.0):.3f}", s_step=f"{dt:.2f}")
                done = self.state.step == exp.train.steps
                if exp.eval.every > 0 and (self.state.step % exp.eval.every == 0 or done) and self.dist.is_main:
                    self.state.last_metrics = self.evaluate()
                    self.log_metrics(self.state.last_metrics, self.state.step)
                if exp.train.checkpoint_every > 0 and (self.state.step % exp.train.checkpoint_every == 0 or done):
                    self.save_checkpoint()
        except BaseException as err:
            self._finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", f"{type(err).__name__}: {err}")
            raise
        finally:
            if progress is not None:
                progress.close()
        self._finish("FINISHED", None)
        return self.state.last_metrics

    def _finish(self, status: str, error: str | None) -> None:
        if self.log:
            self.log.finish(status, error)
        for tracker in self.trackers:
            tracker.finish(status, error)
