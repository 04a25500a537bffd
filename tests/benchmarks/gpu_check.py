"""Cost of CAMEO at paper scale on one GPU: training step time, peak memory and tokens/s with and
without the alignment loss, for the two paper recipes as written (gin/experiments/cat3d_sd21.gin,
mvdit_xl2.gin) and for the SD-2.1-layout `mv_unet` and the `B/2` `mv_dit`, and the chunked loss
against the naive full attention map.

Run it through `tests/benchmarks/gpu_check.sh` (one process per part, timeouts, a failed or
out-of-memory part is recorded and the others go on). Directly:

    python tests/benchmarks/gpu_check.py --part unet_cameo --out DIR      # one part -> DIR/parts/
    python tests/benchmarks/gpu_check.py --summarize --out DIR           # -> DIR/gpu_check.{json,md}
    python tests/benchmarks/gpu_check.py --dry-run --part all --out DIR  # micro shapes on CPU (CI)

The training step is the engine's own (`cameo_bench.engine.step.train_step`: targets, tap,
diffusion loss + weight x alignment loss, AdamW), so what is measured is what a run pays. Paper
scale (cameo_method.md, notes/scale_and_tracking.md §4.1): 4 views (1 reference), batch 3 scenes,
bf16 autocast with the CAMEO branch in fp32, gradient checkpointing, 64x64x4 latents, so the
supervised layer sees 32x32 tokens per view (N = 4096): `up.02.attn.00` (layer index 10, 10 heads)
of the UNet, a middle block of the DiT at patch 2. CAMEO as released: MLP head, every query token,
lambda 0.02.

Weights are random (no checkpoint is needed): the backbone (`backbone.init_from = ''`) and the VAE,
a random AutoencoderKL of SD's shape written to a temporary folder. The batch is what a run on the
latent cache sees: synthetic scenes at the image size (for depth targets), encoded once by the VAE,
images dropped, so the step pays no VAE encode. The recipe parts parse the gin file itself (only
the weights, the data source and the evaluation schedule are replaced); `--dry-run` parses it with
`run_experiment.shrink = True`.

The CPU benchmarks (test_bench_train_step.py) reuse `build_arm` and the `tiny` scale, and run
parts in a subprocess to read their peak memory, so CI exercises the code the GPU check runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

RECIPES = {"cat3d_sd21": "gin/experiments/cat3d_sd21.gin", "mvdit_xl2": "gin/experiments/mvdit_xl2.gin"}
# scenes per step on one GPU: the paper's 3 per GPU for the UNet (the recipe's 6 is 2 GPUs x 3)
RECIPE_BATCH = {"cat3d_sd21": 3, "mvdit_xl2": 8}
BATCH_OVERRIDE: int | None = None  # --batch-size, which applies to the recipes too
RECIPE_PARTS = tuple(f"{recipe}_{arm}" for recipe in RECIPES for arm in ("baseline", "cameo"))
STEP_PARTS = ("unet_baseline", "unet_cameo", "dit_baseline", "dit_cameo")
# the alignment loss alone: `chunked` = CameoLoss(impl='dense'), `sparse` = the default path, `naive` = the
# full map; with the scale's head (the released MLP), and `_mean` with the quickstart's mean head
LOSS_PARTS = ("loss_chunked", "loss_naive", "loss_sparse", "loss_chunked_mean", "loss_naive_mean", "loss_sparse_mean")
PARTS = RECIPE_PARTS + STEP_PARTS + LOSS_PARTS
MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# what is measured, as data


@dataclass(frozen=True)
class BackboneChoice:
    name: str
    preset: str
    layer: str  # a name or a selector (`MultiViewBackbone.resolve_layer`)
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Scale:
    views: int
    batch_size: int
    image_size: int  # model-input side: pixels, or the latent side when `latent_channels` is set (images 8x)
    precision: str  # train.precision: "bf16" autocast or "fp32"
    gradient_checkpointing: bool
    latent_channels: int | None  # None: pixel-space diffusion (the CPU presets)
    unet: BackboneChoice
    dit: BackboneChoice
    loss_shape: dict[str, int]  # B, V, side (tokens per view = side^2), H heads, d head dim
    warmup: int
    steps: int
    num_ref: int = 1
    cameo_weight: float = 0.02  # the paper's lambda
    cameo_head: str = "mlp"  # the released default
    chunk_size: int = 1024
    source: str = "depth"


SCALES = {
    "paper": Scale(
        views=4, batch_size=3, image_size=64, precision="bf16", gradient_checkpointing=True, latent_channels=4,
        unet=BackboneChoice("mv_unet", "sd21", "up.02.attn.00", {"in_channels": 4}),
        dit=BackboneChoice("mv_dit", "B/2", "depth:0.5", {"in_channels": 4, "sample_size": 64}),
        loss_shape=dict(B=3, V=4, side=32, H=10, d=64), warmup=2, steps=8,
    ),
    # the CPU benchmark size (pixel space, what `make quickstart` trains); the UNet layer is the
    # analogue of layer 10: first decoder attention at the highest 3D resolution (16x16 at 32 px)
    "tiny": Scale(
        views=3, batch_size=8, image_size=32, precision="fp32", gradient_checkpointing=False, latent_channels=None,
        unet=BackboneChoice("mv_unet", "tiny", "up.01.attn.00"),
        dit=BackboneChoice("mv_dit", "tiny", "depth:0.5"),
        loss_shape=dict(B=1, V=3, side=16, H=4, d=32), warmup=1, steps=2,
    ),
    # --dry-run: the paper configuration (latents, bf16, checkpointing) at micro shapes, for CI
    "micro": Scale(
        views=3, batch_size=1, image_size=16, precision="bf16", gradient_checkpointing=True, latent_channels=4,
        unet=BackboneChoice("mv_unet", "micro", "up.00.attn.00", {"in_channels": 4}),
        dit=BackboneChoice("mv_dit", "micro", "depth:0.5", {"in_channels": 4, "sample_size": 16}),
        loss_shape=dict(B=1, V=3, side=4, H=2, d=8), warmup=1, steps=1, chunk_size=16,
    ),
}


# ---------------------------------------------------------------------------------------------
# peak memory


class PeakMemory:
    """Peak memory of a region: CUDA allocator counters on a GPU, the kernel's peak-RSS mark on CPU.

    torch's CPU allocator has no peak counter, so on CPU the peak-RSS mark is reset
    (`/proc/self/clear_refs` = 5, Linux) at `start` and `VmHWM` read at `stop`; large tensors are
    mmap-backed, so RSS follows them closely. Without clear_refs the process-lifetime peak is
    reported and `method` says so.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base_mb = self.peak_mb = float("nan")
        self.method = "cuda_max_memory_allocated" if device.type == "cuda" else "VmHWM"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mb = torch.cuda.memory_allocated(self.device) / MIB
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.method = "VmHWM (process lifetime: clear_refs unavailable)"
        self.base_mb = _proc_status_kb("VmRSS") / 1024

    def stop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / MIB
        else:
            self.peak_mb = _proc_status_kb("VmHWM") / 1024

    def as_dict(self) -> dict[str, Any]:
        out = dict(peak_mb=round(self.peak_mb, 1), base_mb=round(self.base_mb, 1),
                   extra_mb=round(self.peak_mb - self.base_mb, 1), memory_method=self.method)
        if self.device.type == "cuda":
            out["peak_reserved_mb"] = round(torch.cuda.max_memory_reserved(self.device) / MIB, 1)
        return out


def _proc_status_kb(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource  # no /proc: the lifetime peak is the best available

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# the training step


class EncodedOnce:
    """Items as the latent cache gives them: `latent` encoded once by the run's VAE codec, no
    `image` (depth and cameras, for the targets, stay the rendered ones)."""

    def __init__(self, items, codec):
        self.items, self.codec = items, codec
        self.cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        if index not in self.cache:
            item = dict(self.items[index])
            image = item.pop("image")  # [V, 3, H, W]
            self.cache[index] = {**item, "latent": self.codec.encode(image[None])[0].cpu()}  # [V, C, h, w]
        return self.cache[index]


def random_vae_folder(workdir: str | os.PathLike, full: bool) -> str:
    """A random AutoencoderKL in diffusers' folder layout: SD's shape (`full`) or the micro one."""
    from cameo_bench.objectives.codecs import MICRO_VAE_CONFIG, SD_VAE_CONFIG, random_vae

    folder = pathlib.Path(workdir) / ("vae_sd" if full else "vae_micro")
    if not (folder / "config.json").exists():
        random_vae(SD_VAE_CONFIG if full else MICRO_VAE_CONFIG).save_pretrained(folder)
    return str(folder)


def build_arm(scale: Scale, backbone: str, cameo: bool, device: str | torch.device, workdir: str | os.PathLike):
    """The engine's run (`build_run`) for one arm: `backbone` is "unet" or "dit", `cameo` False = baseline.

    Only `batch_size` scenes exist, so every step reuses the same (cached) batch and times the
    step, not rendering. Latent scales diffuse the latents of a random VAE (images 8x larger)."""
    from cameo_bench.config.spec import (BackboneSpec, CameoSpec, CodecSpec, DataSpec, EvalSpec, Experiment,
                                         OptimSpec, TrainSpec)
    from cameo_bench.engine.build import build_run

    choice = {"unet": scale.unet, "dit": scale.dit}[backbone]
    latent = scale.latent_channels is not None
    codec = CodecSpec(kind="vae", vae_path=random_vae_folder(workdir, scale.image_size >= 32)) if latent else CodecSpec()
    exp = Experiment(
        name=f"{backbone}_{'cameo' if cameo else 'baseline'}", output_dir=str(workdir), seed=0,
        backbone=BackboneSpec(choice.name, choice.preset, dict(choice.overrides), scale.gradient_checkpointing),
        codec=codec,
        data=DataSpec(num_scenes=scale.batch_size, num_eval_scenes=1, num_views=scale.views, num_ref=scale.num_ref,
                      image_size=scale.image_size * (8 if latent else 1), batch_size=scale.batch_size),
        cameo=CameoSpec(weight=scale.cameo_weight if cameo else 0.0, layer=choice.layer, source=scale.source,
                        head=scale.cameo_head, chunk_size=scale.chunk_size),
        optim=OptimSpec(warmup_steps=0),
        train=TrainSpec(precision=scale.precision, progress=False, checkpoint_every=0),
        eval=EvalSpec(every=0, at_start=False),
    )
    run = build_run(exp, device=device)
    if latent:
        run.train_set = EncodedOnce(run.train_set, run.codec)
    return run


def recipe_experiment(recipe: str, cameo: bool, scale: Scale, workdir: str | os.PathLike, shrink: bool):
    """The recipe's gin file with random weights, synthetic scenes at its image size, no evaluation
    or checkpoint; `shrink` = its CI version (`run_experiment.shrink = True`)."""
    from cameo_bench import config

    bindings = [f"run_experiment.output_dir = '{workdir}'", f"run_experiment.name = '{recipe}'",
                "train.progress = False", "train.checkpoint_every = 0", "eval.every = 0", "eval.at_start = False"]
    if shrink:
        bindings.append("run_experiment.shrink = True")
    else:
        batch = BATCH_OVERRIDE or RECIPE_BATCH[recipe]
        bindings += ["backbone.init_from = ''", f"codec.vae_path = '{random_vae_folder(workdir, True)}'",
                     "data.kind = 'synthetic'", "data.root = None", f"data.num_scenes = {batch}",
                     "data.num_eval_scenes = 1", f"data.batch_size = {batch}"]
    if not cameo:
        bindings.append("cameo.weight = 0.0")
    return config.parse([REPO / RECIPES[recipe]], bindings)


def build_recipe(recipe: str, cameo: bool, scale: Scale, device, workdir, shrink: bool):
    from cameo_bench.engine.build import build_run

    run = build_run(recipe_experiment(recipe, cameo, scale, workdir, shrink), device=device)
    run.train_set = EncodedOnce(run.train_set, run.codec)
    return run


def describe_run(run) -> dict[str, Any]:
    """What a recipe run trains on: the supervised (or, for a baseline, the compared) layer's grid."""
    exp, model = run.exp, run.model
    layer = model.get_attention_layer(run.shown_layer)
    latent = run.train_set[0]["latent"]  # [V, C, h, w]
    V, C, h, w = latent.shape
    tokens_per_view = (h // layer.stride) * (w // layer.stride)
    return dict(
        recipe=exp.name, backbone=exp.backbone.name, preset=exp.backbone.preset, layer=layer.name,
        layer_index=layer.index, heads=layer.num_heads, head_dim=layer.head_dim, tokens_per_view=tokens_per_view,
        tokens=V * tokens_per_view, batch_size=exp.data.batch_size, views=V, image_size=h * run.codec.downsample,
        input_size=h, latent_channels=C, precision=exp.train.precision,
        gradient_checkpointing=exp.backbone.gradient_checkpointing, shrink=exp.shrink,
        params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
    )


def describe_arm(run, scale: Scale, backbone: str) -> dict[str, Any]:
    choice = {"unet": scale.unet, "dit": scale.dit}[backbone]
    model = run.model
    layer = model.get_attention_layer(model.resolve_layer(choice.layer))
    side = scale.image_size // layer.stride
    return dict(
        backbone=choice.name, preset=choice.preset, layer=layer.name, layer_index=layer.index,
        heads=layer.num_heads, head_dim=layer.head_dim, tokens_per_view=side * side,
        tokens=scale.views * side * side, batch_size=scale.batch_size, views=scale.views,
        input_size=scale.image_size, latent_channels=scale.latent_channels, precision=scale.precision,
        gradient_checkpointing=scale.gradient_checkpointing,
        params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
    )


def measure_step(scale: Scale, backbone: str, cameo: bool, device: torch.device, workdir,
                 recipe: str | None = None, shrink: bool = False) -> dict[str, Any]:
    """Time `scale.steps` training steps after `scale.warmup` of one arm: a built-in backbone
    choice of `scale`, or the recipe `recipe` (its own batch, layer and loss)."""
    tic = time.perf_counter()
    from cameo_bench.engine.step import train_step

    if recipe is None:
        run = build_arm(scale, backbone, cameo, device, workdir)
        info = describe_arm(run, scale, backbone)
        if cameo:
            info["cameo"] = dict(weight=scale.cameo_weight, head=scale.cameo_head, chunk_size=scale.chunk_size,
                                 source=scale.source, queries="all")
    else:
        run = build_recipe(recipe, cameo, scale, device, workdir, shrink)
        info = describe_run(run)
        if cameo:
            c = run.exp.cameo
            info["cameo"] = dict(weight=c.weight, head=c.head, chunk_size=c.chunk_size, source=c.source,
                                 queries="all" if c.queries_per_view is None else c.queries_per_view)
    info["build_s"] = round(time.perf_counter() - tic, 2)
    step = 0
    for _ in range(scale.warmup):  # first steps: kernels, Adam state, caches
        train_step(run, step)
        step += 1
    memory = PeakMemory(device)
    memory.start()
    seconds = []
    for _ in range(scale.steps):
        _sync(device)
        start = time.perf_counter()
        metrics = train_step(run, step)
        _sync(device)
        seconds.append(time.perf_counter() - start)
        step += 1
    memory.stop()
    median = _median(seconds)
    info.update(memory.as_dict(), step_seconds=[round(s, 4) for s in seconds], median_s=round(median, 4),
                loss_diffusion=metrics.get("train/loss_diffusion"), loss_cameo=metrics.get("train/loss_cameo"))
    if "tokens" in info and median > 0:  # tokens of the supervised layer's grid, all views, per second
        info["tokens_per_s"] = round(info["batch_size"] * info["tokens"] / median, 1)
    return info


# ---------------------------------------------------------------------------------------------
# the loss against the naive full map


def loss_inputs(B: int, V: int, side: int, H: int, d: int, device, seed: int = 0):
    """q, k [B, H, N, d] with grad, and one-hot targets at random tokens, valid ~70% of the
    (query, other view) pairs: the sparsity of real targets, which the chunked loss exploits."""
    from cameo_bench.correspondence.targets import CorrespondenceTargets

    g = torch.Generator().manual_seed(seed)
    hw = side * side
    N = V * hw
    q = (torch.randn(B, H, N, d, generator=g) / d**0.25).to(device).requires_grad_(True)
    k = (torch.randn(B, H, N, d, generator=g) / d**0.25).to(device).requires_grad_(True)
    idx = torch.randint(0, hw, (B, N, V, 1), generator=g)  # [B, N, V, 1]
    valid = torch.rand(B, N, V, generator=g) < 0.7
    valid &= (torch.arange(N) // hw)[None, :, None] != torch.arange(V)[None, None, :]  # never the own view
    targets = CorrespondenceTargets(idx.to(device), torch.ones(B, N, V, 1, device=device), valid.to(device),
                                    (V, side, side))
    return q, k, targets


def naive_full_map_loss(q, k, targets, head: torch.nn.Module | None, num_ref: int) -> torch.Tensor:
    """CAMEO as released: every logit of the N x N map, the head MLP on each (None: the head mean),
    a softmax per key view, cross-entropy on valid pairs, reference and target queries averaged
    apart and summed."""
    B, H, N, d = q.shape
    V, h, w = targets.grid
    logits = q @ k.transpose(-1, -2) * d**-0.5  # [B, H, N, N]
    fused = logits.mean(1) if head is None else head(logits.permute(0, 2, 3, 1))[..., 0]  # [B, N, N]
    logp = fused.reshape(B, N, V, h * w).log_softmax(-1)  # [B, N, V, hw]
    nll = -logp.gather(-1, targets.idx).squeeze(-1)  # [B, N, V]
    is_ref = (torch.arange(N, device=q.device) // (h * w) < num_ref)[None, :, None]  # [1, N, 1]
    total = q.new_zeros(())
    for group in (targets.valid & is_ref, targets.valid & ~is_ref):
        total = total + (nll * group).sum() / group.sum().clamp_min(1)
    return total


def measure_loss(scale: Scale, impl: str, device: torch.device, head: str | None = None) -> dict[str, Any]:
    """`impl`: "chunked" (CameoLoss impl 'dense'), "sparse" or "naive"; `head` default: the scale's."""
    from backbones.interface import TapResult
    from cameo_bench.objectives.alignment import CameoLoss

    shape = scale.loss_shape
    head = head or scale.cameo_head
    q, k, targets = loss_inputs(**shape, device=device)
    torch.manual_seed(0)
    cameo = CameoLoss(shape["H"], head=head, chunk_size=scale.chunk_size,
                      impl="sparse" if impl == "sparse" else "dense").to(device)
    B, _, N, _ = q.shape
    tap = TapResult(q=q, k=k, scale=shape["d"] ** -0.5, grid=targets.grid,
                    query_idx=torch.arange(N, device=device).expand(B, N))

    def run() -> torch.Tensor:  # forward + backward, as in a step
        q.grad = k.grad = None
        cameo.zero_grad(set_to_none=True)
        if impl != "naive":
            loss, _ = cameo(tap, targets, scale.num_ref)
        else:
            loss = naive_full_map_loss(q, k, targets, getattr(cameo, "head", None), scale.num_ref)
        loss.backward()
        return loss.detach()

    for _ in range(scale.warmup):
        run()
    memory = PeakMemory(device)
    memory.start()
    seconds = []
    for _ in range(max(scale.steps // 2, 1)):
        _sync(device)
        start = time.perf_counter()
        value = run()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    memory.stop()
    return dict(impl=impl, shape=shape, tokens=shape["V"] * shape["side"] ** 2, head=head,
                chunk_size=scale.chunk_size if impl != "naive" else None, precision="fp32",
                loss=float(value), step_seconds=[round(s, 4) for s in seconds], median_s=round(_median(seconds), 4),
                **memory.as_dict())


# ---------------------------------------------------------------------------------------------
# parts and their records


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()


def device_info(device: torch.device) -> dict[str, Any]:
    info = dict(device=str(device), torch=torch.__version__, python=platform.python_version(),
                host=platform.node(), cpu_threads=torch.get_num_threads())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        info.update(device_name=platform.processor() or platform.machine())
    return info


def run_part(name: str, scale_name: str, device: torch.device, out: pathlib.Path,
             measure: Callable[..., dict] | None = None) -> dict[str, Any]:
    """Measure one part and write `out/parts/<name>.json`; a failure (out of memory included) is
    recorded there with its message instead of propagating, so the next part still runs."""
    if name not in PARTS:
        raise ValueError(f"unknown part {name!r}; valid: {list(PARTS)} or 'all'")
    scale = SCALES[scale_name]
    record: dict[str, Any] = dict(part=name, scale=scale_name, **device_info(device))
    tic = time.perf_counter()
    try:
        if measure is None:
            if name in RECIPE_PARTS:
                recipe, arm = name.rsplit("_", 1)
                with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
                    record.update(measure_step(scale, "", arm == "cameo", device, workdir, recipe=recipe,
                                               shrink=scale_name == "micro"))
            elif name in STEP_PARTS:
                backbone, arm = name.split("_")
                with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
                    record.update(measure_step(scale, backbone, arm == "cameo", device, workdir))
            else:
                record.update(measure_loss(scale, name.split("_")[1], device, "mean" if name.endswith("_mean") else None))
        else:
            record.update(measure(name, scale, device))
        record["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - every failure becomes a record; the run goes on
        record["status"] = "oom" if _is_oom(err) else "error"
        record["error"] = f"{type(err).__name__}: {str(err)[:2000]}"
        record["traceback"] = traceback.format_exc()[-4000:]
        print(f"[gpu_check] part {name}: {record['status']}: {record['error'][:300]}", file=sys.stderr)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record["wall_s"] = round(time.perf_counter() - tic, 2)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    (out / "parts" / f"{name}.json").write_text(json.dumps(record, indent=1, default=str))
    return record


# ---------------------------------------------------------------------------------------------
# summary


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _ratio(a: dict, b: dict, key: str) -> float | None:
    if a.get("status") != "ok" or b.get("status") != "ok" or not b.get(key):
        return None
    return round(a[key] / b[key], 3)


def summarize(out: pathlib.Path) -> dict[str, Any]:
    parts = {}
    for name in PARTS:
        path = out / "parts" / f"{name}.json"
        parts[name] = json.loads(path.read_text()) if path.exists() else dict(part=name, status="missing")
    ratios: dict[str, Any] = {}
    for backbone in (*RECIPES, "unet", "dit"):
        base, cam = parts[f"{backbone}_baseline"], parts[f"{backbone}_cameo"]
        ratios[backbone] = dict(time=_ratio(cam, base, "median_s"), peak=_ratio(cam, base, "peak_mb"),
                                extra=_ratio(cam, base, "extra_mb"))
    chunked, naive = parts["loss_chunked"], parts["loss_naive"]
    ratios["loss_naive_over_chunked"] = dict(time=_ratio(naive, chunked, "median_s"),
                                             extra=_ratio(naive, chunked, "extra_mb"))
    if chunked.get("status") == "ok" and naive.get("status") == "ok":
        ratios["loss_abs_diff"] = abs(chunked["loss"] - naive["loss"])
    for suffix in ("", "_mean"):  # the sparse path against both
        sparse = parts[f"loss_sparse{suffix}"]
        ratios[f"loss_over_sparse{suffix}"] = {
            other: dict(time=_ratio(parts[f"loss_{other}{suffix}"], sparse, "median_s"),
                        extra=_ratio(parts[f"loss_{other}{suffix}"], sparse, "extra_mb")) for other in ("chunked", "naive")}
        if sparse.get("status") == "ok" and parts[f"loss_naive{suffix}"].get("status") == "ok":
            ratios[f"loss_abs_diff_sparse{suffix}"] = abs(sparse["loss"] - parts[f"loss_naive{suffix}"]["loss"])
    ok = [p for p in parts.values() if p.get("status") == "ok"]
    machine = {k: ok[0].get(k) for k in ("device_name", "device_memory_gib", "torch", "cuda", "host")} if ok else {}
    summary = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   git_sha=_git_sha(), scale=next((p["scale"] for p in ok), None), machine=machine,
                   failed=[n for n, p in parts.items() if p.get("status") != "ok"], ratios=ratios, parts=parts)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(summary))
    return summary


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _gib(part: dict, key: str) -> str:
    return _fmt(part[key] / 1024, 2) if part.get("status") == "ok" else part.get("status", "?").upper()


def _sec(part: dict) -> str:
    return _fmt(part["median_s"], 3) if part.get("status") == "ok" else part.get("status", "?").upper()


def markdown(summary: dict) -> str:
    parts, ratios, m = summary["parts"], summary["ratios"], summary["machine"]
    lines = [
        f"# CAMEO cost check ({summary['scale']} scale)", "",
        f"{m.get('device_name', '?')} ({m.get('device_memory_gib', '?')} GiB), torch {m.get('torch', '?')}, "
        f"CUDA {m.get('cuda', '-')}, git {summary['git_sha'][:12]}, {summary['date']}.", "",
        "Training step = `engine.step.train_step` (targets + forward with tap + diffusion loss + lambda x CAMEO loss "
        "+ AdamW). Peak = allocator peak during the timed steps; extra = peak minus memory held before them "
        "(weights, optimizer state).", "",
        "| backbone | layer (index), tokens | batch x views | baseline s/step | CAMEO s/step | time ratio "
        "| baseline peak / extra GiB | CAMEO peak / extra GiB | peak ratio | extra ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    recipe_lines = [
        "The paper recipes as written (gin/experiments/), random weights; tokens/s = scenes x views x "
        "supervised-layer tokens per view / s.", "",
        "| recipe | backbone, input | layer (index), tokens | batch x views | baseline s/step | CAMEO s/step "
        "| CAMEO overhead | baseline / CAMEO peak GiB | CAMEO tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for recipe in RECIPES:
        base, cam = parts[f"{recipe}_baseline"], parts[f"{recipe}_cameo"]
        ref = cam if cam.get("status") == "ok" else base
        r = ratios[recipe]
        overhead = "-" if r["time"] is None else f"{(r['time'] - 1) * 100:+.1f}%"
        recipe_lines.append(
            f"| {recipe} | {ref.get('backbone', '?')} {ref.get('preset', '')}, {ref.get('image_size', '?')} px -> "
            f"{ref.get('input_size', '?')}x{ref.get('input_size', '?')}x{ref.get('latent_channels', '?')} | "
            f"{ref.get('layer', '?')} ({ref.get('layer_index', '?')}), {ref.get('tokens', '?')} | "
            f"{ref.get('batch_size', '?')} x {ref.get('views', '?')} | {_sec(base)} | {_sec(cam)} | {overhead} | "
            f"{_gib(base, 'peak_mb')} / {_gib(cam, 'peak_mb')} | {_fmt(cam.get('tokens_per_s'), 1)} |")
    for backbone in ("unet", "dit"):
        base, cam = parts[f"{backbone}_baseline"], parts[f"{backbone}_cameo"]
        ref = cam if cam.get("status") == "ok" else base
        r = ratios[backbone]
        layer = f"{ref.get('layer', '?')} ({ref.get('layer_index', '?')}), {ref.get('tokens', '?')}"
        lines.append(
            f"| {ref.get('backbone', backbone)} {ref.get('preset', '')} | {layer} | "
            f"{ref.get('batch_size', '?')} x {ref.get('views', '?')} | {_sec(base)} | {_sec(cam)} | {_fmt(r['time'])} | "
            f"{_gib(base, 'peak_mb')} / {_gib(base, 'extra_mb')} | {_gib(cam, 'peak_mb')} / {_gib(cam, 'extra_mb')} | "
            f"{_fmt(r['peak'])} | {_fmt(r['extra'])} |")
    lines = lines[:6] + recipe_lines + ["", "Built-in paper-scale choices (latents of a random VAE):", ""] + lines[6:]
    chunked, naive = parts["loss_chunked"], parts["loss_naive"]
    r = ratios["loss_naive_over_chunked"]
    shape = chunked.get("shape") or naive.get("shape") or {}
    lines += [
        "", f"Alignment loss alone, forward + backward, fp32, shape {shape}, head {chunked.get('head', '?')}:", "",
        "| implementation | s | extra GiB |", "|---|---|---|",
        f"| chunked (chunk {chunked.get('chunk_size', '?')}) | {_sec(chunked)} | {_gib(chunked, 'extra_mb')} |",
        f"| naive full map | {_sec(naive)} | {_gib(naive, 'extra_mb')} |",
        f"| naive / chunked | {_fmt(r['time'])} | {_fmt(r['extra'])} |",
    ]
    if "loss_abs_diff" in ratios:
        lines.append(f"\n|loss chunked - loss naive| = {ratios['loss_abs_diff']:.2e}")
    for suffix, head in (("", chunked.get("head", "?")), ("_mean", "mean")):
        sparse, r = parts[f"loss_sparse{suffix}"], ratios[f"loss_over_sparse{suffix}"]
        lines += ["", f"Sparse path (CameoLoss default) against both, head {head}:", "",
                  "| implementation | s | extra GiB | / sparse: time | / sparse: extra |", "|---|---|---|---|---|",
                  f"| sparse | {_sec(sparse)} | {_gib(sparse, 'extra_mb')} | 1 | 1 |"]
        for other, label in (("chunked", "chunked (impl dense)"), ("naive", "naive full map")):
            part = parts[f"loss_{other}{suffix}"]
            lines.append(f"| {label} | {_sec(part)} | {_gib(part, 'extra_mb')} | {_fmt(r[other]['time'])} | "
                         f"{_fmt(r[other]['extra'])} |")
        if f"loss_abs_diff_sparse{suffix}" in ratios:
            lines.append(f"\n|loss sparse - loss naive| = {ratios[f'loss_abs_diff_sparse{suffix}']:.2e}")
    if summary["failed"]:
        lines += ["", "Not measured: " + ", ".join(
            f"{n} ({parts[n].get('status')}: {str(parts[n].get('error', ''))[:120]})" for n in summary["failed"])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=pathlib.Path, help="results folder")
    parser.add_argument("--part", help=f"one of {list(PARTS)}, or 'all' (in this process)")
    parser.add_argument("--summarize", action="store_true",
                        help="merge DIR/parts/*.json into gpu_check.{json,md} (after --part, if given)")
    parser.add_argument("--strict", action="store_true", help="with --summarize: exit 1 when a part is not ok")
    parser.add_argument("--dry-run", action="store_true", help="micro shapes on CPU (same as --scale micro --device cpu)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="paper")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before measuring")
    parser.add_argument("--steps", type=int, default=None, help="timed steps")
    parser.add_argument("--batch-size", type=int, default=None, help="scenes per step (paper: 3)")
    args = parser.parse_args(argv)

    if not (args.part or args.summarize):
        parser.error("give --part NAME|all, --summarize, or both")
    if args.part:
        run_parts(args)
    if not args.summarize:
        return 0
    summary = summarize(args.out)
    print(markdown(summary))
    return 1 if args.strict and summary["failed"] else 0


def run_parts(args: argparse.Namespace) -> None:
    scale_name, device = args.scale, args.device
    if args.dry_run:
        scale_name, device = "micro", "cpu"
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    overrides = {k: v for k, v in (("warmup", args.warmup), ("steps", args.steps),
                                   ("batch_size", args.batch_size)) if v is not None}
    if overrides:  # a variant of a named scale; the record keeps the name, the fields show the values
        SCALES[scale_name] = dataclasses.replace(SCALES[scale_name], **overrides)
    global BATCH_OVERRIDE
    BATCH_OVERRIDE = args.batch_size
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = PARTS if args.part == "all" else tuple(args.part.split(","))
    for name in names:
        record = run_part(name, scale_name, device, args.out)
        shown = {k: record.get(k) for k in ("status", "median_s", "peak_mb", "extra_mb", "wall_s")}
        print(f"[gpu_check] {name}: {shown}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
