"""Plain-value description of one experiment.

The engine only ever sees these dataclasses; `cameo_bench.config` fills them from gin, so the
engine stays importable and testable without gin, and every knob has one documented default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BackboneSpec:
    name: str = "mv_dit"
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool = False


@dataclass
class DataSpec:
    """`kind="synthetic"` renders embedded scenes; `kind="folder"` reads scene folders at `root`."""

    kind: str = "synthetic"
    root: str | None = None
    num_scenes: int = 512
    num_eval_scenes: int = 16
    num_views: int = 3
    num_ref: int = 1
    image_size: int = 32
    azimuth_step_deg: float = 30.0
    seed: int = 0
    batch_size: int = 8


@dataclass
class DiffusionSpec:
    prediction_type: str = "v_prediction"
    beta_schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000
    snr_shift: float = 1.0
    rescale_zero_terminal_snr: bool = False
    camera_dropout: float = 0.1


@dataclass
class CameoSpec:
    """The three CAMEO knobs (weight, layer, source) plus the loss variants.

    `weight = 0` or `source = "none"` is the baseline: no tap, no extra cost.
    `layer` is a layer name or a selector understood by `MultiViewBackbone.resolve_layer`.
    """

    weight: float = 0.0
    layer: str = "depth:0.5"
    source: str = "depth"
    source_options: dict[str, Any] = field(default_factory=dict)
    head: str = "mean"
    normalization: str = "per_view"
    target: str = "onehot_per_view"
    loss: str = "ce"
    query_views: str = "both"
    key_views: str = "all_but_self"
    queries_per_view: int | None = None
    chunk_size: int = 1024

    @property
    def enabled(self) -> bool:
        return self.weight > 0 and self.source != "none"


@dataclass
class OptimSpec:
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 50
    grad_clip: float = 1.0
    ema_decay: float | None = None
    grad_accum: int = 1


@dataclass
class TrainSpec:
    steps: int = 1000
    log_every: int = 10
    checkpoint_every: int = 250
    nonfinite: str = "stop"  # or "skip": drop the update, count it, go on
    precision: str = "auto"  # "auto" = bf16 autocast on CUDA, fp32 on CPU; or "fp32" / "bf16"
    progress: bool = True


@dataclass
class EvalSpec:
    every: int = 250
    num_scenes: int = 16
    batch_size: int = 8
    sampler_steps: int = 20
    guidance_scale: float = 1.0
    attention: bool = True  # attention-correspondence metrics for every layer
    attention_timestep: int = 500  # noise level at which attention correspondence is measured
    lpips: bool = True  # used only when the backbone weights are on disk
    at_start: bool = True
    figures: bool = True  # sample grid + attention figure of the first eval scenes, as tracker artifacts


@dataclass
class TrackingSpec:
    """MLflow tracking of `cameo-bench train`; its command-line flags win over these."""

    enabled: bool = True
    experiment: str | None = None  # default: run_experiment.name
    uri: str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db


@dataclass
class Experiment:
    name: str = "experiment"
    output_dir: str = "runs"
    seed: int = 0
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    data: DataSpec = field(default_factory=DataSpec)
    diffusion: DiffusionSpec = field(default_factory=DiffusionSpec)
    cameo: CameoSpec = field(default_factory=CameoSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat_params(self) -> dict[str, str]:
        """`section.key -> str(value)`, the form trackers store as parameters."""
        flat: dict[str, str] = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                for key, value in values.items():
                    flat[f"{section}.{key}"] = str(value)
            else:
                flat[section] = str(values)
        return flat
