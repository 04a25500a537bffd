"""The one build path: an `Experiment` spec -> a `Run` (data, codec, backbone, loss, optimiser, EMA, DDP).

Everything a run is made of is built here and nowhere else, in a fixed order: the global RNG is
seeded once, and the datasets, the backbone's and the CAMEO head's initialisation then draw from it
in this order, so the same spec always gives the same initial parameters (tests/test_engine_reference.py
compares with runs made before the engine was split). Building writes nothing to the run folder:
training (`loop.fit`) opens the run's log, and `cameo-bench eval` builds a run to evaluate its
checkpoint without touching the run folder (only the latent cache beside the data may gain the
entries of the first item, which the build reads to size the model).

Checks that need the data or the model (the supervised layer exists, the source can be computed
from the batch keys, the batch splits over the ranks) fail here, before the first step; checks of
single values live in the spec dataclasses.

The codec decides the model's grid: the backbone's `in_channels` are the codec's channels, its
`sample_size` is the model-space size (image size / `codec.downsample`), and layer selectors such as
`decoder:1/16` are resolved with `input_stride = codec.downsample`. Pretrained weights
(`backbone.init_from`) are loaded here, before DDP wraps the model.
"""
from __future__ import annotations

import dataclasses
import pathlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from backbones import TapRequest, create_backbone, get_backbone_spec
from cameo_bench.config.spec import Experiment
from cameo_bench.correspondence import get_source, list_sources
from cameo_bench.data import loading
from cameo_bench.data.batch import collate
from cameo_bench.engine import checkpoint, distributed
from cameo_bench.engine.distributed import DistInfo
from cameo_bench.objectives.alignment import CameoLoss
from cameo_bench.objectives.codecs import Codec, PixelCodec, VaeCodec, random_vae
from cameo_bench.objectives.diffusion import MultiViewDiffusion


class ExperimentError(ValueError):
    """An experiment that cannot run as configured, found before the first step."""


@dataclass
class RunState:
    """What changes from step to step besides the weights (saved in every checkpoint)."""

    step: int = 0
    skipped_steps: int = 0
    train_seconds: float = 0.0  # the training clock: excludes eval and checkpointing
    last_metrics: dict[str, float] = field(default_factory=dict)
    zero_pair_steps: int = 0  # consecutive steps whose CAMEO term had no pair (engine/step.py; not checkpointed)


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

    def forward(self, batch: dict, draws, tap: TapRequest | None, targets):
        """`draws`: the step's `SampleDraws` -> (diffusion loss, cond_mask [B, V], alignment loss or
        None, CAMEO diagnostics)."""
        diff_loss, aux = self.diffusion.training_loss(
            self.backbone, batch, t=draws.t, tap=tap, camera_drop=draws.camera_drop, noise=draws.noise)
        if self.cameo_loss is None:
            return diff_loss, aux["cond_mask"], None, {}
        align, diag = self.cameo_loss(aux["tap"], targets, num_ref=batch["num_ref"])
        return diff_loss, aux["cond_mask"], align, diag


@dataclass(eq=False)
class Run:
    """Everything one training run is made of, as `build_run` made it. `step`, `loop` and
    `checkpoint` read it; only `state` (and the weights) change while it trains."""

    exp: Experiment
    dist: DistInfo
    device: torch.device
    run_dir: pathlib.Path
    ckpt_path: pathlib.Path
    resume: bool  # a resumed run keeps its log up to the checkpoint's step; a fresh one starts it anew
    train_set: Any
    eval_set: Any
    codec: Codec
    diffusion: MultiViewDiffusion
    model: nn.Module  # the backbone
    layer: str | None  # the supervised layer's name; None for a baseline
    cameo_loss: CameoLoss | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: torch.optim.swa_utils.AveragedModel | None
    step_module: StepModule
    ddp_model: nn.Module  # `step_module`, DDP-wrapped under torchrun
    state: RunState = field(default_factory=RunState)

    @property
    def eval_model(self) -> nn.Module:
        """The weights evaluation and figures use: the EMA's when the run keeps one."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def shown_layer(self) -> str:
        """The supervised layer; for a baseline, the one `cameo.layer` would supervise, so that its
        figures and the `cameo.layer_resolved` tag name the layer a CAMEO run compares against."""
        return self.layer or self.model.resolve_layer(self.exp.cameo.layer, input_stride=self.codec.downsample)

    def eval_batches(self) -> Iterator[dict]:
        e = self.exp.eval
        return loading.eval_batches(self.eval_set, e.num_scenes, e.batch_size, self.device)


def run_dir_of(exp: Experiment) -> pathlib.Path:
    """`<output_dir>/<name>`: the run folder (log, configs, checkpoints)."""
    return pathlib.Path(exp.output_dir) / exp.name


def warmup_lambda(warmup_steps: int):
    """LR factor of a linear warm-up over `warmup_steps` optimizer steps, then 1."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def build_codec(exp: Experiment) -> Codec:
    """The space the diffusion runs in (`codec.*`): pixels, or the latents of a local VAE folder.
    A shrunk experiment (`run_experiment.shrink`) without a `vae_path` gets a random micro VAE.
    Making a codec never draws from the global random stream (the run's initialisation stays the
    same whatever the codec)."""
    c = exp.codec
    if c.kind == "pixel":
        return PixelCodec()
    options = dict(sample=c.encoding == "sample", decode_batch=c.decode_batch, encode_batch=c.encode_batch)
    if not c.vae_path:
        if exp.shrink:
            return VaeCodec(random_vae(seed=exp.seed), **options)
        raise ExperimentError("codec.kind = 'vae' needs codec.vae_path: a local diffusers AutoencoderKL folder "
                              "(config.json + diffusion_pytorch_model.safetensors, e.g. SD-2.1's vae/)")
    try:
        return VaeCodec.from_folder(c.vae_path, **options)
    except (OSError, ValueError) as err:  # no folder, not a VAE, or no readable weights in it
        raise ExperimentError(f"codec.vae_path = {c.vae_path!r}: {err}") from None


def model_size(exp: Experiment, codec: Codec, probe: dict) -> tuple[int, int]:
    """(h, w) of the model's input grid: the latent's, or the image's / codec.downsample."""
    if "latent" in probe:
        return tuple(probe["latent"].shape[-2:])
    H, W = probe["image"].shape[-2:]
    ds = codec.downsample
    if H % ds or W % ds:
        raise ExperimentError(f"data.image_size {H}x{W} is not divisible by the codec's downsample {ds} "
                              f"(codec.kind = {exp.codec.kind!r}): use a multiple of {ds}")
    return H // ds, W // ds


def backbone_kwargs(exp: Experiment, codec: Codec, size: tuple[int, int]) -> dict[str, Any]:
    """Overrides, plus the input channels the codec gives and the model-space size the data implies.

    `in_channels` always comes from the codec (a preset's own value, e.g. sd21's 4, is a default
    for latents, not a fact about this run's data); an override that disagrees is an error.
    """
    kwargs = dict(exp.backbone.overrides)
    fields = get_backbone_spec(exp.backbone.name).config_fields() or []
    if "in_channels" in fields:
        given = kwargs.get("in_channels", codec.channels)
        if given != codec.channels:
            raise ExperimentError(
                f"backbone.overrides sets in_channels = {given}, but codec.kind = {exp.codec.kind!r} gives "
                f"{codec.channels} channels: drop the override (the codec decides)")
        kwargs["in_channels"] = codec.channels
    if "sample_size" in fields:  # the model-space side: the latent's under a VAE, the image's in pixels
        kwargs.setdefault("sample_size", size[-1])
    return kwargs


def create_model(exp: Experiment, codec: Codec, size: tuple[int, int]) -> nn.Module:
    """The backbone: random from its preset, or initialised from `backbone.init_from`, whose
    architecture then comes from the source (only the overrides are passed on) and must eat the
    codec's channels."""
    b = exp.backbone
    if not b.init_from:
        return create_backbone(b.name, b.preset, **backbone_kwargs(exp, codec, size))
    if not pathlib.Path(b.init_from).exists():
        raise ExperimentError(
            f"backbone.init_from = {b.init_from!r} does not exist: give a local diffusers SD UNet folder "
            f"(mv_unet), a facebookresearch DiT checkpoint .pt/.safetensors (mv_dit), a save_pretrained "
            f"folder, or '' for a random initialisation")
    model = create_backbone(b.name, b.preset, init_from=b.init_from, **b.overrides)
    channels = getattr(model.config, "in_channels", codec.channels)
    if channels != codec.channels:
        raise ExperimentError(
            f"backbone.init_from = {b.init_from!r} takes {channels} input channels, but codec.kind = "
            f"{exp.codec.kind!r} gives {codec.channels}: pretrained latent models need codec.kind = 'vae'")
    return model


def latent_cache_root(exp: Experiment) -> pathlib.Path:
    """Where folder data's latents are cached: `codec.cache_dir`, else `<data.root>/latents`."""
    return pathlib.Path(exp.codec.cache_dir or pathlib.Path(exp.data.root) / "latents")


def uses_latent_cache(exp: Experiment) -> bool:
    return exp.codec.kind == "vae" and exp.codec.cache and exp.data.kind == "folder"


def supervised_layer(exp: Experiment, model, probe: dict, input_stride: int = 1) -> str | None:
    """The supervised layer's name (None for a baseline), after checking that the correspondence
    source can be computed from this data and fits the loss's target. `input_stride`: image pixels
    per model-input pixel (the codec's downsample), for selectors such as `decoder:1/16`."""
    c = exp.cameo
    if not c.enabled:
        return None
    layer = model.resolve_layer(c.layer, input_stride=input_stride)
    try:
        source = get_source(c.source)
        source.check(probe, **c.source_options)
    except (KeyError, TypeError) as err:
        message = err.args[0] if err.args else str(err)
        raise ExperimentError(
            f"{message}. Choose a source this dataset can feed (sources: {list_sources()}), "
            f"or 'none' / cameo.weight = 0 for the baseline") from None
    if source.soft_only and c.target != "soft":
        raise ExperimentError(
            f"correspondence source {c.source!r} gives a band of candidate tokens, not one match: "
            f"use cameo.target = 'soft' with it (got {c.target!r})")
    return layer


def build_cameo_loss(exp: Experiment, model, layer: str, dist: DistInfo) -> CameoLoss:
    """The alignment loss and its head. Under DDP its means run over the global batch's terms."""
    c = exp.cameo
    return CameoLoss(
        num_heads=model.get_attention_layer(layer).num_heads, head=c.head, normalization=c.normalization,
        target=c.target, loss=c.loss, query_views=c.query_views, key_views=c.key_views,
        queries_per_view=c.queries_per_view, chunk_size=c.chunk_size, log_eps=c.log_eps, impl=c.impl,
        reduce_counts=distributed.reduce_term_counts if dist.world > 1 else None)


def ema_update(decay: float, warmup: int):
    """AveragedModel's multi_avg_fn for an EMA whose decay ramps up as min(decay, (1+n)/(warmup+n)).

    Without a ramp (warmup 0) the average starts at the random initialisation and, at decay 0.999,
    still weighs it e^-1 after 1000 steps: a short run's EMA is worse than its raw weights.
    """
    if warmup <= 0:
        return torch.optim.swa_utils.get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (warmup + n))
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    return update


def build_run(exp: Experiment, *, device: str | torch.device | None = None, resume: bool = False) -> Run:
    """A ready-to-train run of `exp` on `device` (default: this rank's GPU, else CPU); with
    `resume`, restored from the run folder's latest checkpoint when there is one.

    The order below is the order of global-RNG draws: keep it, or the same spec stops giving the
    same run.
    """
    dist, device = distributed.init_distributed(device)
    if exp.data.batch_size % dist.world:
        raise ExperimentError(f"data.batch_size {exp.data.batch_size} not divisible by world size {dist.world}")
    torch.manual_seed(exp.seed)

    train_set, eval_set = loading.build_datasets(exp.data, exp.eval)
    codec = build_codec(exp).to(device)  # draws nothing from the global stream
    if uses_latent_cache(exp):  # training reads cached latents, no image; evaluation encodes its images
        from cameo_bench.data.latents import LatentCache, with_latent_cache

        train_set = with_latent_cache(train_set, LatentCache.for_codec(latent_cache_root(exp), codec, train_set))
    train_set = loading.MemoryCache(train_set)
    probe = collate([train_set[0]])
    model = create_model(exp, codec, model_size(exp, codec, probe))
    if exp.train.camera_inert:  # a model that ignores its cameras (engine/pretrained.py): before the EMA copy
        from cameo_bench.engine.pretrained import make_camera_inert

        make_camera_inert(model)
    if exp.backbone.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.to(device)
    diffusion = MultiViewDiffusion(**dataclasses.asdict(exp.diffusion), codec=codec)
    layer = supervised_layer(exp, model, probe, input_stride=codec.downsample)
    cameo_loss = build_cameo_loss(exp, model, layer, dist).to(device) if layer is not None else None

    params = list(model.parameters()) + (list(cameo_loss.parameters()) if cameo_loss is not None else [])
    o = exp.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(o.warmup_steps))
    ema = None
    if o.ema_decay:
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update(o.ema_decay, o.ema_warmup))
    if exp.train.compile:  # in place, after the EMA copy (which stays eager): same module, same state_dict keys
        model.compile()
    step_module = StepModule(model, cameo_loss, diffusion)
    ddp_model = step_module
    if dist.world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None)

    run_dir = run_dir_of(exp)
    run = Run(exp=exp, dist=dist, device=device, run_dir=run_dir, ckpt_path=checkpoint.latest_path(run_dir),
              resume=resume, train_set=train_set, eval_set=eval_set, codec=codec, diffusion=diffusion, model=model,
              layer=layer, cameo_loss=cameo_loss, optimizer=optimizer, scheduler=scheduler, ema=ema,
              step_module=step_module, ddp_model=ddp_model)
    if resume and run.ckpt_path.exists():
        checkpoint.load_into(run, checkpoint.load(run.ckpt_path))
    return run
