"""CameoLoss (query chunks, gradients fused into the forward) against the naive full N x N map.

Paper shape (CAT3D layer 10): B=1, 4 views x 32x32 tokens (N=4096), 10 heads, d=64, every query,
MLP head, forward + backward. Run with `OMP_NUM_THREADS=1 .venv/bin/python -m pytest
tests/benchmarks/test_bench_cameo_loss.py --benchmark-enable` (about 5-10 min on one shared thread;
the naive map peaks near 8.4 GB). With benchmarks disabled (the default addopt) the timed tests
use a micro shape and the memory comparison is skipped, so the normal suite stays fast.

Measured on the 2-core CPU box, one thread, chunk_size 128 (load average ~6, so wall times are
inflated; CPU seconds are the fairer number): chunked peak +358 MB, 17.1 s CPU (40.6 s wall);
naive peak +8395 MB, 58.6 s CPU (108 s wall); same loss value.

Peak memory is measured in a fresh subprocess per implementation: it resets the kernel's
peak-RSS mark (`/proc/self/clear_refs` = 5) after building the inputs and reads `VmHWM` after
forward + backward. torch's CPU allocator has no peak counter and tracemalloc does not see its
allocations; large tensors are mmap-backed, so RSS follows them closely.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from backbones.interface import TapResult
from cameo_bench.objectives.alignment import CameoLoss
from cameo_bench.correspondence.targets import CorrespondenceTargets

PAPER = dict(B=1, V=4, side=32, H=10, d=64)
MICRO = dict(B=1, V=3, side=4, H=2, d=8)
NUM_REF = 1
CHUNK = 128  # the CameoLoss default


def make_inputs(B, V, side, H, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    hw = side * side
    N = V * hw
    q = (torch.randn(B, H, N, d, generator=g) / d**0.25).requires_grad_(True)
    k = (torch.randn(B, H, N, d, generator=g) / d**0.25).requires_grad_(True)
    idx = torch.randint(0, hw, (B, N, V, 1), generator=g)
    valid = torch.rand(B, N, V, generator=g) < 0.7
    valid &= (torch.arange(N) // hw)[None, :, None] != torch.arange(V)[None, None, :]
    targets = CorrespondenceTargets(idx, torch.ones(B, N, V, 1), valid, (V, side, side))
    return q, k, targets


def naive_full_map(q, k, targets, mlp, num_ref):
    """CAMEO's released computation: the whole logit map, the head MLP on every pair, a softmax
    per key view, CE on the valid (query, key view) rows, references and targets averaged apart."""
    B, H, N, d = q.shape
    V, h, w = targets.grid
    logits = q @ k.transpose(-1, -2) * d**-0.5  # [B, H, N, N]
    fused = mlp(logits.permute(0, 2, 3, 1))[..., 0]  # [B, N, N]
    logp = fused.view(B, N, V, h * w).log_softmax(-1)  # [B, N, V, hw]
    nll = -logp.gather(-1, targets.idx).squeeze(-1)  # [B, N, V]
    is_ref = (torch.arange(N) // (h * w) < num_ref)[None, :, None]
    total = 0.0
    for group in (targets.valid & is_ref, targets.valid & ~is_ref):
        total = total + (nll * group).sum() / group.sum().clamp_min(1)
    return total


def step(impl: str, shape: dict, chunk_size: int = CHUNK):
    """One forward + backward; returns a closure so timing excludes input construction."""
    torch.manual_seed(0)
    q, k, targets = make_inputs(**shape)
    cameo = CameoLoss(shape["H"], head="mlp", chunk_size=chunk_size)
    B, _, N, _ = q.shape
    tap = TapResult(q=q, k=k, scale=shape["d"] ** -0.5, grid=targets.grid,
                    query_idx=torch.arange(N).expand(B, N))

    def run():
        q.grad = k.grad = None
        cameo.zero_grad(set_to_none=True)
        if impl == "chunked":
            loss, _ = cameo(tap, targets, NUM_REF)
        else:
            loss = naive_full_map(q, k, targets, cameo.head, NUM_REF)
        loss.backward()
        return loss.detach()

    return run


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def measure_in_subprocess(impl: str, shape: dict, chunk_size: int = CHUNK) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = subprocess.run(
        [sys.executable, __file__, impl, json.dumps(shape), str(chunk_size)],
        capture_output=True, text=True, env=env, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("impl", ["chunked", "naive"])
def test_bench_cameo_loss_forward_backward(benchmark, measuring, impl):
    shape = PAPER if measuring else MICRO
    run = step(impl, shape)
    benchmark.extra_info.update(shape=shape, chunk_size=CHUNK)
    loss = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    assert torch.isfinite(loss)


def test_chunked_peak_memory_and_time_vs_naive_map(measuring):
    if not measuring:
        pytest.skip("paper-shape memory comparison runs with --benchmark-enable (needs ~10 GB RAM)")
    chunked = measure_in_subprocess("chunked", PAPER)
    naive = measure_in_subprocess("naive", PAPER)
    print(f"\ncameo loss at {PAPER}: chunked {chunked}  naive {naive}")
    assert abs(chunked["loss"] - naive["loss"]) < 1e-4
    assert chunked["peak_mb"] * 8 <= naive["peak_mb"], (chunked, naive)
    # CPU time, not wall time: the comparison must hold on a shared machine too
    assert chunked["cpu_seconds"] <= naive["cpu_seconds"], (chunked, naive)


if __name__ == "__main__":  # one measurement, in a process of its own
    impl_arg, shape_arg, chunk_arg = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    runner = step(impl_arg, shape_arg, chunk_arg)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS (inputs and model already allocated)
    base_kb = _status_kb("VmRSS")
    start, start_cpu = time.perf_counter(), time.process_time()
    value = runner()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    peak_mb = (_status_kb("VmHWM") - base_kb) / 1024
    print(json.dumps({"impl": impl_arg, "peak_mb": round(peak_mb, 1), "seconds": round(seconds, 3),
                      "cpu_seconds": round(cpu_seconds, 3),
                      "loss": float(value)}))
