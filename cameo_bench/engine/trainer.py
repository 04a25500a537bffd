"""One training run: the step and the loop, checkpoint/resume, DDP-aware.

The step is deliberately small: noise -> forward with a tap on the supervised layer -> diffusion
loss + weight x alignment loss -> optimizer. Every random draw of a sample comes from a generator
seeded by (seed, batch number, position in the global batch), so a resumed run replays exactly the
draws an uninterrupted run would make, on any number of ranks.

Under torchrun the same loop runs on every rank with DDP, and N ranks give the parameters one
process would give with the same global batch; `cameo_bench.engine.distributed` says how. Rank 0 logs,
evaluates and writes checkpoints while the others wait at a barrier.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from backbones import TapRequest, create_backbone
from cameo_bench.engine import checkpoint as ckpt
from cameo_bench.engine import distributed
from cameo_bench.engine.distributed import DistInfo, GlobalCameoLoss, init_distributed  # noqa: F401 (re-exported)
from cameo_bench.correspondence import compute_targets, get_source, list_sources
from cameo_bench.data.batch import collate
from cameo_bench.objectives.diffusion import MultiViewDiffusion
from cameo_bench.tracking.run_log import RunLog
from cameo_bench.config.spec import Experiment


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
# the run


@dataclass
class RunState:
    step: int = 0
    skipped_steps: int = 0
    train_seconds: float = 0.0  # the training clock: excludes eval and checkpointing
    last_metrics: dict[str, float] = field(default_factory=dict)


def warmup_lambda(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


@dataclass
class SampleDraws:
    """The random inputs of one (micro-)batch shard, drawn per global sample (see `draw`)."""

    generators: list[torch.Generator]  # one per sample, positioned after t, drop and noise
    t: torch.Tensor  # [B] long
    camera_drop: torch.Tensor  # [B] bool
    noise: torch.Tensor  # [B, V, C, h, w]


class StepModule(nn.Module):
    """Backbone + CAMEO head: the one module DDP wraps.

    The head's parameters (linear/mlp heads) must be all-reduced like the backbone's. Inside one
    DDP module, used at every step on every rank, they are, with no `find_unused_parameters`
    graph walk. The diffusion object is plain Python (no parameters).
    """

    def __init__(self, backbone: nn.Module, cameo_loss: nn.Module | None, diffusion: MultiViewDiffusion):
        super().__init__()
        self.backbone = backbone
        self.cameo_loss = cameo_loss
        self.diffusion = diffusion

    def forward(self, batch: dict, draws: SampleDraws, tap: TapRequest | None, targets):
        """-> (diffusion loss, cond_mask [B, V], alignment loss or None, CAMEO diagnostics)."""
        diff_loss, aux = self.diffusion.training_loss(
            self.backbone, batch, t=draws.t, tap=tap, camera_drop=draws.camera_drop, noise=draws.noise)
        if self.cameo_loss is None:
            return diff_loss, aux["cond_mask"], None, {}
        align, diag = self.cameo_loss(aux["tap"], targets, num_ref=batch["num_ref"])
        return diff_loss, aux["cond_mask"], align, diag


class Trainer:
    def __init__(self, exp: Experiment, *, resume: bool = False, trackers: list | None = None,
                 device: str | torch.device | None = None):
        self.exp = exp
        self.dist, self.device = init_distributed(device)
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
            self.cameo_loss = GlobalCameoLoss(
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
        self.step_module = StepModule(self.model, self.cameo_loss, self.diffusion)
        self.ddp_model = self.step_module
        if self.dist.world > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

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
        if get_source(c.source).soft_only and c.target != "soft":
            raise ExperimentError(
                f"correspondence source {c.source!r} gives a band of candidate tokens, not one match: "
                f"use cameo.target = 'soft' with it (got {c.target!r})")

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
            "world_size": self.dist.world,  # informational: a checkpoint resumes on any world size
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
        """Rank 0 writes (parameters are equal on every rank), the others wait; every rank must
        call it. Returns the path on rank 0, None elsewhere."""
        path = None
        if self.dist.is_main:
            path = ckpt.save(self.ckpt_path, self._payload())
            for tracker in self.trackers:
                tracker.flush()
            if self.log:
                self.log.flush()
        distributed.barrier()
        return path

    # -- the step -------------------------------------------------------------------------------

    def _autocast(self):
        precision = self.exp.train.precision
        if precision == "bf16" or (precision == "auto" and self.device.type == "cuda"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _local_batch(self, batch_no: int) -> tuple[dict, range]:
        """This rank's slice of global batch `batch_no`, and the slice's positions in it."""
        idx = batch_indices(len(self.train_set), self.exp.data.batch_size, batch_no, self.exp.data.seed)
        per_rank = len(idx) // self.dist.world
        positions = range(self.dist.rank * per_rank, (self.dist.rank + 1) * per_rank)
        return to_device(collate([self.train_set[idx[p]] for p in positions]), self.device), positions

    def draw(self, batch: dict, batch_no: int, positions: range) -> SampleDraws:
        """t, camera drop and noise of each sample, from that sample's own generator: the draws of
        global sample p of batch `batch_no` are the same whichever rank holds it."""
        generators = distributed.sample_generators(self.exp.seed, batch_no, positions)
        T, p_drop = self.diffusion.num_train_timesteps, self.diffusion.config.camera_dropout
        shape = tuple(self.diffusion.to_model_space(batch).shape[1:])  # [V, C, h, w]
        t = torch.cat([torch.randint(0, T, (1,), generator=g) for g in generators])  # [B]
        drop = torch.cat([torch.rand(1, generator=g) for g in generators]) < p_drop  # [B]
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])  # [B, V, C, h, w]
        return SampleDraws(generators, t.to(self.device), drop.to(self.device), noise.to(self.device))

    def _select_queries(self, targets, num_ref, generators: list[torch.Generator]) -> torch.Tensor:  # [B, Qs]
        """Query sampling per sample, each from its own generator (world-size invariant)."""
        rows = [
            self.cameo_loss.select_queries(
                dataclasses.replace(targets, idx=targets.idx[b:b + 1], weight=targets.weight[b:b + 1],
                                    valid=targets.valid[b:b + 1]),
                num_ref, g)
            for b, g in enumerate(generators)
        ]
        return torch.cat(rows)

    @contextlib.contextmanager
    def _rng_scope(self, batch_no: int, positions: range):
        """Anything still drawing from torch's global generator (dropout, a source without its own
        seed) sees a stream fixed by (seed, batch, shard), not by what ran before."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(distributed.sample_seed(self.exp.seed, batch_no, 1 << 32 | positions.start))
            yield

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over `optim.grad_accum` micro-batches of `data.batch_size` each.

        Every rank must call it for the same step. Returned metrics are this rank's values of the
        globally normalised losses; `fit` averages them over ranks before logging.
        """
        exp = self.exp
        accum = max(exp.optim.grad_accum, 1)
        world = self.dist.world
        self.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        for micro in range(accum):
            batch_no = step * accum + micro
            batch, positions = self._local_batch(batch_no)
            # Gradients are all-reduced once, on the last micro-step.
            sync = self.ddp_model.no_sync() if world > 1 and micro < accum - 1 else contextlib.nullcontext()
            with sync:
                with self._rng_scope(batch_no, positions):
                    draws = self.draw(batch, batch_no, positions)
                    tap, targets = None, None
                    if self.cameo_loss is not None:
                        grid, stride = self._layer_grid(batch)
                        with torch.no_grad():
                            targets = compute_targets(exp.cameo.source, batch, grid, stride, **exp.cameo.source_options)
                        tap = TapRequest(self.layer, self._select_queries(targets, batch["num_ref"], draws.generators))
                    with self._autocast():
                        diff_loss, cond_mask, align, diag = self.ddp_model(batch, draws, tap, targets)
                terms = {"diffusion": diff_loss} if align is None else {"diffusion": diff_loss, "cameo": align}
                # One all-reduce: the global count of supervised target views, and which terms are
                # non-finite on any rank (the skip/stop decision must be the same everywhere).
                local_views = cond_mask.detach().float().sum()
                flags = torch.stack([(~torch.isfinite(v.detach())).float() for v in terms.values()])
                reduced = distributed.all_reduce_sum(torch.cat([local_views[None], flags]))
                for (name, value), bad in zip(terms.items(), reduced[1:]):
                    if bad > 0:
                        return self._nonfinite(step, name, value)
                # DDP averages gradients over ranks: scale the local mean so the average is the
                # mean over the global batch (identity in one process).
                terms["diffusion"] = diff_loss * (world * local_views / reduced[0])
                total = terms["diffusion"] if align is None else terms["diffusion"] + exp.cameo.weight * align
                (total / accum).backward()
            for name, value in terms.items():
                metrics[f"train/loss_{name}"] = metrics.get(f"train/loss_{name}", 0.0) + float(value.detach()) / accum
            metrics.update({f"train/cameo_{k}": float(v) for k, v in diag.items()})
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for g in self.optimizer.param_groups for p in g["params"]], exp.optim.grad_clip or float("inf"))
        if not torch.isfinite(grad_norm):  # computed from all-reduced gradients: equal on every rank
            return self._nonfinite(step, "grad_norm", grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        metrics["train/grad_norm"] = float(grad_norm)
        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    def _nonfinite(self, step: int, term: str, value: torch.Tensor) -> dict[str, float]:
        """Every rank gets here together (the decision was all-reduced)."""
        if self.exp.train.nonfinite == "skip":
            self.optimizer.zero_grad(set_to_none=True)
            self.state.skipped_steps += 1
            return {"train/skipped_steps": float(self.state.skipped_steps)}
        path = self.save_checkpoint()
        value = float(value.detach())
        seen = f"{value}" if self.dist.world == 1 else f"on some of {self.dist.world} ranks; {value} here"
        raise NonFiniteLossError(
            f"non-finite {term} loss ({seen}) at step {step}; state before this step saved to "
            f"{path or self.ckpt_path}. Lower optim.lr, raise optim.warmup_steps, or set train.nonfinite = 'skip'.")

    def _reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Means over ranks (the losses are globally normalised, so their mean is the global value);
        CAMEO pair counts are summed. Every rank must call it with the same keys."""
        if self.dist.world == 1:
            return metrics
        keys = sorted(metrics)
        values = distributed.all_reduce_sum(torch.tensor([metrics[k] for k in keys], dtype=torch.float64,
                                                         device=self.device))
        summed = ("train/cameo_pairs_ref", "train/cameo_pairs_tgt")
        return {k: float(v) if k in summed else float(v) / self.dist.world for k, v in zip(keys, values.tolist())}

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
        from cameo_bench.evaluation.evaluate import evaluate

        model = self.ema.module if self.ema is not None else self.model
        return evaluate(model, self.diffusion, list(self.eval_batches()), self.exp.eval, seed=self.exp.seed,
                        supervised_layer=self.layer)

    def _evaluate_on_main(self, step: int) -> None:
        """Rank 0 evaluates (on the unwrapped model: no collectives), the others wait."""
        if self.dist.is_main:
            self.state.last_metrics = self.evaluate()
            self.log_metrics(self.state.last_metrics, step)
            self.log_figures(step)
        distributed.barrier()

    def log_figures(self, step: int) -> None:
        """Generated vs ground-truth views and the supervised layer's attention for the first eval
        scenes, for the trackers that keep files (MLflow). Drawing never stops a training run."""
        sinks = [t for t in self.trackers if hasattr(t, "log_artifact")]
        if not sinks or not self.exp.eval.figures:
            return
        from cameo_bench.evaluation.figures import eval_figures

        folder = f"figures/step_{step:07d}"
        try:
            # a baseline has no supervised layer: show the one CAMEO would supervise
            layer = self.layer or self.model.resolve_layer(self.exp.cameo.layer)
            paths = eval_figures(self.ema.module if self.ema is not None else self.model, self.diffusion,
                                 next(self.eval_batches()), self.run_dir / folder, layer=layer,
                                 sampler_steps=self.exp.eval.sampler_steps, guidance_scale=self.exp.eval.guidance_scale,
                                 seed=self.exp.seed, timestep=self.exp.eval.attention_timestep)
        except Exception as err:  # noqa: BLE001 - a figure is not worth a run
            warnings.warn(f"eval figures at step {step} not drawn: {type(err).__name__}: {err}")
            return
        for tracker in sinks:
            for path in paths:
                tracker.log_artifact(path, folder)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.log:
            self.log.log_metrics(metrics, step)
        for tracker in self.trackers:
            tracker.log_metrics(metrics, step)

    def fit(self) -> dict[str, float]:
        """Train to `train.steps`; returns the last evaluation's metrics (empty on ranks > 0).
        Under torchrun every rank calls it."""
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
            if self.state.step == 0 and exp.eval.at_start and exp.eval.every > 0:
                self._evaluate_on_main(0)
            while self.state.step < exp.train.steps:
                step = self.state.step
                tic = time.perf_counter()
                self.step_module.train()
                metrics = self.train_step(step)
                self.state.step = step + 1
                dt = time.perf_counter() - tic
                self.state.train_seconds += dt
                metrics["time/step_seconds"] = dt
                metrics["time/train_seconds"] = self.state.train_seconds
                if self.state.step % exp.train.log_every == 0 or self.state.step == exp.train.steps:
                    self.log_metrics(self._reduce_metrics(metrics), self.state.step)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(
                        loss=f"{metrics.get('train/loss_diffusion', float('nan')):.4f}",
                        cameo=f"{metrics.get('train/loss_cameo', 0.0):.3f}", s_step=f"{dt:.2f}")
                done = self.state.step == exp.train.steps
                if exp.eval.every > 0 and (self.state.step % exp.eval.every == 0 or done):
                    self._evaluate_on_main(self.state.step)
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
