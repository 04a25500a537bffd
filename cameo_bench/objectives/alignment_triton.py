"""Triton kernels for the one-hot per-view cross-entropy of the sparse path: logits never leave the chip.

The rows are `alignment_sparse.run_pairs`'s: one row per supervised (query, key view) pair, rows
of one key block (sample, key view) scored against that block's h*w keys. For a row x with fused
query Q(x) (the heads concatenated, head weights and scale folded in), target token t and term
weight w, the loss is `w * (lse_y Q(x).K(y) - Q(x).K(t))`, and with p the row's softmax
    dL/dQ(x) = w * (sum_y p(y) K(y) - K(t)),    dL/dK(y) = sum_x w(x) (p_x(y) - [y = t(x)]) Q(x).
The forward kernel keeps a running max and sum over key tiles (the log-sum-exp), the target logit
and the argmax (for the accuracy diagnostic); the backward kernel recomputes each (row tile, key
tile) block of logits once and adds its two products into dQ and dK with atomics, so memory is
O(rows + keys) beyond Q and K, as in flash attention. The width D is covered in chunks of
BLOCK_D, so it need not be a power of two (the paper's layer 10 with the mean head: D = 640).

No GPU was available when this was written: the kernels are tested against the torch path under
the Triton interpreter (`TRITON_INTERPRET=1`, tests/test_cameo_triton.py) and are not used by the
engine; `tests/benchmarks/gpu_check.py` times them where a GPU is. Atomic adds make dQ and dK
exact to rounding but not bitwise reproducible from run to run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _logits_tile(q_ptr, k_ptr, rows, cols, row_ok, col_ok, D, stride_q, stride_k,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """S[rows, cols] = Q[rows] . K[cols] over D in chunks of BLOCK_D -> [BLOCK_M, BLOCK_N] fp32."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        d_ok = dims < D
        q = tl.load(q_ptr + rows[:, None] * stride_q + dims[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k = tl.load(k_ptr + cols[:, None] * stride_k + dims[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.dot(q, tl.trans(k), input_precision="ieee")
    return acc


@triton.jit
def _forward_kernel(q_ptr, k_ptr, t_ptr, lse_ptr, zt_ptr, arg_ptr, width, hw, D,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    block, tile = tl.program_id(0), tl.program_id(1)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < width
    q_base = q_ptr + block * width * D
    k_base = k_ptr + block * hw * D
    target = tl.load(t_ptr + block * width + rows, mask=row_ok, other=0)
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_M,), tl.float32)
    z_target = tl.zeros((BLOCK_M,), tl.float32)
    best = tl.zeros((BLOCK_M,), tl.int32)
    for n0 in range(0, hw, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hw
        S = _logits_tile(q_base, k_base, rows, cols, row_ok, col_ok, D, D, D, BLOCK_M, BLOCK_N, BLOCK_D)
        S = tl.where(col_ok[None, :], S, float("-inf"))
        tile_max = tl.max(S, axis=1)
        tile_arg = tl.argmax(S, axis=1, tie_break_left=True).to(tl.int32) + n0
        best = tl.where(tile_max > run_max, tile_arg, best)  # an earlier tile keeps a tie
        new_max = tl.maximum(run_max, tile_max)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(S - new_max[:, None]), axis=1)
        run_max = new_max
        z_target += tl.sum(tl.where(cols[None, :] == target[:, None], S, 0.0), axis=1)
    out = block * width + rows
    tl.store(lse_ptr + out, run_max + tl.log(run_sum), mask=row_ok)
    tl.store(zt_ptr + out, z_target, mask=row_ok)
    tl.store(arg_ptr + out, best, mask=row_ok)


@triton.jit
def _backward_kernel(q_ptr, k_ptr, t_ptr, g_ptr, lse_ptr, dq_ptr, dk_ptr, width, hw, D,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    block, tile, key_tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = key_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < width, cols < hw
    q_base, dq_base = q_ptr + block * width * D, dq_ptr + block * width * D
    k_base, dk_base = k_ptr + block * hw * D, dk_ptr + block * hw * D
    target = tl.load(t_ptr + block * width + rows, mask=row_ok, other=0)
    g = tl.load(g_ptr + block * width + rows, mask=row_ok, other=0.0)  # w x the total's incoming gradient
    lse = tl.load(lse_ptr + block * width + rows, mask=row_ok, other=0.0)
    S = _logits_tile(q_base, k_base, rows, cols, row_ok, col_ok, D, D, D, BLOCK_M, BLOCK_N, BLOCK_D)
    P = tl.where(col_ok[None, :], tl.exp(S - lse[:, None]), 0.0)
    dS = g[:, None] * (P - tl.where(cols[None, :] == target[:, None], 1.0, 0.0))  # [BLOCK_M, BLOCK_N]
    dS = tl.where(row_ok[:, None] & col_ok[None, :], dS, 0.0)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        d_ok = dims < D
        q_mask, k_mask = row_ok[:, None] & d_ok[None, :], col_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows[:, None] * D + dims[None, :], mask=q_mask, other=0.0)
        k = tl.load(k_base + cols[:, None] * D + dims[None, :], mask=k_mask, other=0.0)
        tl.atomic_add(dq_base + rows[:, None] * D + dims[None, :], tl.dot(dS, k, input_precision="ieee"), mask=q_mask)
        tl.atomic_add(dk_base + cols[:, None] * D + dims[None, :], tl.dot(tl.trans(dS), q, input_precision="ieee"),
                      mask=k_mask)


BLOCKS = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=32)  # tl.dot needs 16 and up


def forward_rows(Q: torch.Tensor, K: torch.Tensor, target: torch.Tensor):
    """Q [R, width, D], K [R, hw, D] fp32 contiguous, target [R, width] int -> (lse, target logit,
    argmax) [R, width] per row."""
    R, width, D = Q.shape
    hw = K.shape[1]
    lse, z_target = (Q.new_empty(R, width) for _ in range(2))
    argmax = torch.empty(R, width, dtype=torch.int32, device=Q.device)
    grid = (R, triton.cdiv(width, BLOCKS["BLOCK_M"]))
    _forward_kernel[grid](Q, K, target.to(torch.int32).contiguous(), lse, z_target, argmax, width, hw, D, **BLOCKS)
    return lse, z_target, argmax


def backward_rows(Q, K, target, g, lse):
    """dL/dQ [R, width, D], dL/dK [R, hw, D] of sum_rows g * (lse - target logit)."""
    R, width, D = Q.shape
    hw = K.shape[1]
    dQ, dK = torch.zeros_like(Q), torch.zeros_like(K)
    grid = (R, triton.cdiv(width, BLOCKS["BLOCK_M"]), triton.cdiv(hw, BLOCKS["BLOCK_N"]))
    _backward_kernel[grid](Q, K, target.to(torch.int32).contiguous(), g.contiguous(), lse, dQ, dK, width, hw, D,
                           **BLOCKS)
    return dQ, dK


class OneHotRowsCE(torch.autograd.Function):
    """sum_rows w * (lse - z_target) over pair rows, with the kernels above; also the argmax."""

    @staticmethod
    def forward(ctx, Q, K, target, w):
        Q, K = Q.contiguous(), K.contiguous()
        lse, z_target, argmax = forward_rows(Q, K, target)
        ctx.save_for_backward(Q, K, target, w, lse)
        ctx.mark_non_differentiable(argmax)
        return (w * (lse - z_target)).sum(), argmax

    @staticmethod
    def backward(ctx, grad_loss, _):
        Q, K, target, w, lse = ctx.saved_tensors
        dQ, dK = backward_rows(Q, K, target, w * grad_loss, lse)
        return dQ, dK, None, None
