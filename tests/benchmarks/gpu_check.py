"""Cost of CAMEO at paper scale on one GPU: training step time and peak memory with and without
the alignment loss, for the SD-2.1-layout `mv_unet` and the `B/2` `mv_dit`, and the chunked loss
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
lambda 0.02. Latents are random: a VAE would only add a constant cost to both arms.

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

STEP_PARTS = ("unet_baseline", "unet_cameo", "dit_baseline", "dit_cameo")
LOSS_PARTS = ("loss_chunked", "loss_naive")
PARTS = STEP_PARTS + LOSS_PARTS
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
    image_size: int  # pixels of the rendered scenes = latent size when `latent_channels` is set
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


class WithLatents:
    """Adds a fixed random `latent [V, C, H, W]` to every item, standing in for VAE latents: the
    model then diffuses those, while depth and cameras (for the targets) stay the rendered ones."""

    def __init__(self, items, channels: int):
        self.items, self.channels = items, channels
        self.cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        if index not in self.cache:
            item = dict(self.items[index])
            V, _, H, W = item["image"].shape
            g = torch.Generator().manual_seed(index)
            item["latent"] = torch.randn(V, self.channels, H, W, generator=g)  # [V, C, H, W]
            self.cache[index] = item
        return self.cache[index]


def build_arm(scale: Scale, backbone: str, cameo: bool, device: str | torch.device, workdir: str | os.PathLike):
    """The engine's run (`build_run`) for one arm: `backbone` is "unet" or "dit", `cameo` False = baseline.

    Only `batch_size` scenes exist, so every step reuses the same (cached) batch and times the
    step, not rendering."""
    from cameo_bench.config.spec import BackboneSpec, CameoSpec, DataSpec, EvalSpec, Experiment, OptimSpec, TrainSpec
    from cameo_bench.engine.build import build_run

    choice = {"unet": scale.unet, "dit": scale.dit}[backbone]
    exp = Experiment(
        name=f"{backbone}_{'cameo' if cameo else 'baseline'}", output_dir=str(workdir), seed=0,
        backbone=BackboneSpec(choice.name, choice.preset, dict(choice.overrides), scale.gradient_checkpointing),
        data=DataSpec(num_scenes=scale.batch_size, num_eval_scenes=1, num_views=scale.views, num_ref=scale.num_ref,
                      image_size=scale.image_size, batch_size=scale.batch_size),
        cameo=CameoSpec(weight=scale.cameo_weight if cameo else 0.0, layer=choice.layer, source=scale.source,
                        head=scale.cameo_head, chunk_size=scale.chunk_size),
        optim=OptimSpec(warmup_steps=0),
        train=TrainSpec(precision=scale.precision, progress=False, checkpoint_every=0),
        eval=EvalSpec(every=0, at_start=False),
    )
    run = build_run(exp, device=device)
    if scale.latent_channels is not None:
        run.train_set = WithLatents(run.train_set, scale.latent_channels)
    return run


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


def measure_step(scale: Scale, backbone: str, cameo: bool, device: torch.device, workdir) -> dict[str, Any]:
    tic = time.perf_counter()
    from cameo_bench.engine.step import train_step

    run = build_arm(scale, backbone, cameo, device, workdir)
    info = describe_arm(run, scale, backbone)
    info["build_s"] = round(time.perf_counter() - tic, 2)
    if cameo:
        info["cameo"] = dict(weight=scale.cameo_weight, head=scale.cameo_head, chunk_size=scale.chunk_size,
                             source=scale.source, queries="all")
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
    info.update(memory.as_dict(), step_seconds=[round(s, 4) for s in seconds], median_s=round(_median(seconds), 4),
                loss_diffusion=metrics.get("train/loss_diffusion"), loss_cameo=metrics.get("train/loss_cameo"))
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


def naive_full_map_loss(q, k, targets, head: torch.nn.Module, num_ref: int) -> torch.Tensor:
    """CAMEO as released: every logit of the N x N map, the head MLP on each, a softmax per key
    view, cross-entropy on valid pairs, reference and target queries averaged apart and summed."""
    B, H, N, d = q.shape
    V, h, w = targets.grid
    logits = q @ k.transpose(-1, -2) * d**-0.5  # [B, H, N, N]
    fused = head(logits.permute(0, 2, 3, 1))[..., 0]  # [B, N, N]
    logp = fused.reshape(B, N, V, h * w).log_softmax(-1)  # [B, N, V, hw]
    nll = -logp.gather(-1, targets.idx).squeeze(-1)  # [B, N, V]
    is_ref = (torch.arange(N, device=q.device) // (h * w) < num_ref)[None, :, None]  # [1, N, 1]
    total = q.new_zeros(())
    for group in (targets.valid & is_ref, targets.valid & ~is_ref):
        total = total + (nll * group).sum() / group.sum().clamp_min(1)
    return total


def measure_loss(scale: Scale, impl: str, device: torch.device) -> dict[str, Any]:
    from backbones.interface import TapResult
    from cameo_bench.objectives.alignment import CameoLoss

    shape = scale.loss_shape
    q, k, targets = loss_inputs(**shape, device=device)
    torch.manual_seed(0)
    cameo = CameoLoss(shape["H"], head=scale.cameo_head, chunk_size=scale.chunk_size).to(device)
    B, _, N, _ = q.shape
    tap = TapResult(q=q, k=k, scale=shape["d"] ** -0.5, grid=targets.grid,
                    query_idx=torch.arange(N, device=device).expand(B, N))

    def run() -> torch.Tensor:  # forward + backward, as in a step
        q.grad = k.grad = None
        cameo.zero_grad(set_to_none=True)
        if impl == "chunked":
            loss, _ = cameo(tap, targets, scale.num_ref)
        else:
            loss = naive_full_map_loss(q, k, targets, cameo.head, scale.num_ref)
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
    return dict(impl=impl, shape=shape, tokens=shape["V"] * shape["side"] ** 2, head=scale.cameo_head,
                chunk_size=scale.chunk_size if impl == "chunked" else None, precision="fp32",
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
            if name in STEP_PARTS:
                backbone, arm = name.split("_")
                with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
                    record.update(measure_step(scale, backbone, arm == "cameo", device, workdir))
            else:
                record.update(measure_loss(scale, name.split("_")[1], device))
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
    for backbone in ("unet", "dit"):
        base, cam = parts[f"{backbone}_baseline"], parts[f"{backbone}_cameo"]
        ratios[backbone] = dict(time=_ratio(cam, base, "median_s"), peak=_ratio(cam, base, "peak_mb"),
                                extra=_ratio(cam, base, "extra_mb"))
    chunked, naive = parts["loss_chunked"], parts["loss_naive"]
    ratios["loss_naive_over_chunked"] = dict(time=_ratio(naive, chunked, "median_s"),
                                             extra=_ratio(naive, chunked, "extra_mb"))
    if chunked.get("status") == "ok" and naive.get("status") == "ok":
        ratios["loss_abs_diff"] = abs(chunked["loss"] - naive["loss"])
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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = PARTS if args.part == "all" else tuple(args.part.split(","))
    for name in names:
        record = run_part(name, scale_name, device, args.out)
        shown = {k: record.get(k) for k in ("status", "median_s", "peak_mb", "extra_mb", "wall_s")}
        print(f"[gpu_check] {name}: {shown}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
