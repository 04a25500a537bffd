"""The Triton kernels of the one-hot per-view CE (objectives/alignment_triton.py) under the Triton interpreter.

No GPU is needed: `TRITON_INTERPRET=1` runs the kernels' programs on the CPU with numpy, so these
check the kernels' arithmetic (tiles, masks for ragged sizes and a width D that is not a power of
two, the online log-sum-exp, the argmax, the atomics of the backward) against plain torch, and the
whole loss against the naive full map of tests/test_cameo_loss.py. They say nothing about speed.
The interpreter must be on before triton is first imported (triton's own library functions are
decorated then), so the checks run in one subprocess (this file as a script) and the tests read
its report. Skipped when triton is not installed.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

KERNEL_SHAPES = [(2, 20, 40, 36), (1, 16, 32, 32), (3, 5, 7, 70)]  # R blocks, rows per block, hw keys, D
LOSS_CASES = [(head, target, loss) for head in ("mean", "linear")
              for target, loss in (("onehot_per_view", "ce"), ("onehot_global", "ce"), ("onehot_per_view", "kl"))]


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be interpreted")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    tests_dir = pathlib.Path(__file__).parent
    env["PYTHONPATH"] = os.pathsep.join([str(tests_dir), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", [str(s) for s in KERNEL_SHAPES])
def test_kernels_match_torch(report, shape):
    """lse, target logit, argmax and both gradients of sum w (lse - z_t) against torch."""
    errors = report["kernels"][shape]
    assert errors["argmax_equal"]
    for name in ("lse", "z_target", "dQ", "dK"):
        assert errors[name] <= 1e-5, (name, errors)


@pytest.mark.parametrize("case", ["-".join(c) for c in LOSS_CASES])
def test_cameo_loss_with_the_triton_kernel_matches_the_naive_map(report, case):
    """CameoLoss(kernel='triton'): value and gradients (q, k, the linear head) against the naive
    full map; accuracy and pair counts as the torch kernel's."""
    result = report["loss"][case]
    assert result["value"] <= 1e-5 and result["grads"] <= 1e-5, result
    assert result["acc_equal"] and result["pairs_equal"], result


def test_triton_kernel_refuses_what_it_does_not_compute():
    from cameo_bench.objectives.alignment import CameoLoss

    for opts in (dict(head="mlp"), dict(head="per_head"), dict(head="mean", target="soft"), dict(head="mean", loss="l1"),
                 dict(head="mean", normalization="global"), dict(head="mean", log_eps=1e-8)):
        with pytest.raises(ValueError, match="kernel 'triton'"):
            CameoLoss(2, kernel="triton", **opts)
    with pytest.raises(ValueError, match="kernel.*valid"):
        CameoLoss(2, head="mean", kernel="cuda")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / (1 + |b|): the `assert_close(atol=rtol=1e-5)` yardstick as one number."""
    return float(((a - b).abs() / (1 + b.abs())).max())


def _check_kernels(kernels) -> dict:
    out = {}
    for R, width, hw, D in KERNEL_SHAPES:
        g = torch.Generator().manual_seed(R * 100 + hw)
        Q, K = torch.randn(R, width, D, generator=g) * 0.5, torch.randn(R, hw, D, generator=g) * 0.5
        target, w = torch.randint(0, hw, (R, width), generator=g), torch.rand(R, width, generator=g)
        lse, z_target, argmax = kernels.forward_rows(Q, K, target)
        dQ, dK = kernels.backward_rows(Q, K, target, w, lse)
        Qr, Kr = Q.clone().requires_grad_(True), K.clone().requires_grad_(True)
        S = Qr @ Kr.transpose(1, 2)  # [R, width, hw]
        (w * (S.logsumexp(-1) - S.gather(-1, target[..., None])[..., 0])).sum().backward()
        out[str((R, width, hw, D))] = dict(
            lse=_relative(lse, S.logsumexp(-1).detach()), z_target=_relative(z_target, S.gather(-1, target[..., None])[..., 0].detach()),
            argmax_equal=bool(torch.equal(argmax.long(), S.argmax(-1))), dQ=_relative(dQ, Qr.grad), dK=_relative(dK, Kr.grad))
    return out


def _check_loss() -> dict:
    from test_cameo_loss import DEFAULT, H, N, NUM_REF, make_problem, naive_loss, naive_scores, randomise_head, tap_for

    from cameo_bench.objectives.alignment import CameoLoss

    q_full, k_all, targets, _ = make_problem()
    query_idx = torch.arange(N).expand(q_full.shape[0], N)
    out = {}
    for head, target, loss in LOSS_CASES:
        opts = dict(DEFAULT, head=head, target=target, loss=loss)
        runs = {}
        for kernel in ("triton", "torch"):
            cameo = CameoLoss(H, kernel=kernel, **opts)
            randomise_head(cameo)
            leaves = [q_full.clone().requires_grad_(True), k_all.clone().requires_grad_(True), *cameo.parameters()]
            value, diag = cameo(tap_for(leaves[0], leaves[1], query_idx), targets, NUM_REF)
            runs[kernel] = (value, diag, torch.autograd.grad(value, leaves), leaves, cameo)
        value, diag, grads, leaves, cameo = runs["triton"]
        want = naive_loss(naive_scores(leaves[0], leaves[1], head, dict(cameo.named_parameters())), targets, None,
                          query_idx, opts)
        want_grads = torch.autograd.grad(want, leaves)
        torch_diag = runs["torch"][1]
        out["-".join((head, target, loss))] = dict(
            value=_relative(value.detach(), want.detach()), grads=max(_relative(a, b) for a, b in zip(grads, want_grads)),
            acc_equal=bool(diag["acc"] == torch_diag["acc"]),
            pairs_equal=bool(diag["pairs_ref"] == torch_diag["pairs_ref"] and diag["pairs_tgt"] == torch_diag["pairs_tgt"]))
    return out


if __name__ == "__main__":  # under TRITON_INTERPRET=1, from the fixture above
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from cameo_bench.objectives import alignment_triton

    print(json.dumps({"kernels": _check_kernels(alignment_triton), "loss": _check_loss()}))
