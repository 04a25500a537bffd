"""The CAMEO loss from the log-sum-exp and the target logits alone: no dense target rows, no log-softmax graph.

A (query, key view) term needs the log-sum-exp of the fused logits over the block it is
normalised over (the key view, or every supported key under `global`) and the fused logits at
its few target tokens; its gradient w.r.t. the block's logits is `alpha * p + beta`, p the
block's softmax and beta nonzero only at the targets. For targets t_a at tokens idx_a (T_a: the
target mass at entry a's token with duplicates merged, f_a: a is the first entry naming its
token, p_a = exp(z_a - lse)), every loss and target admits this (`score_chunk`):
- ce / kl (any log_eps): term = [kl: sum_a t_a log T_a] - sum_a t_a log(p_a + eps) (eps = 0:
  log p_a = z_a - lse exactly); alpha = sum_a t_a r_a, beta_a = -t_a r_a, r_a = p_a / (p_a + eps).
- l1: p sums to 1 over the block, so sum_y |p_y - T_y| = 1 - sum_a f_a p_a + sum_a f_a |p_a - T_a|
  (under `global` the other views' mass is in the same block: same formula); with
  c_a = f_a (sign(p_a - T_a) - 1): alpha = -sum_a c_a p_a, beta_a = c_a p_a.
For heads linear in the per-head logits the head folds into the query, z(x, y) =
(scale * w ⊙ Q(x)) . K(y) with Q, K the heads concatenated (mean: w_h = 1/H), so a chunk of
queries is one matmul for its logits, one softmax, and two matmuls for dL/dQ = dS K and
dL/dK = dS^T Q, all in the forward; nothing is kept for the backward but the gradients
(flash-attention style: the logits exist only as the chunk's block). The `mlp` head runs on the
chunk's per-head logits and is differentiated by autograd for that chunk only.

Why not SDPA with K as the values (`_scaled_dot_product_flash_attention_for_cpu` returns the
log-sum-exp and E_p[K], the q-gradient, in one pass)? Its K-gradient needs a second pass over all
(query, key) pairs (an attention with the roles swapped), the accuracy diagnostic a third (the
argmax), and on this CPU one such pass costs about two matmuls: 5 matmul-equivalents against the 3
here (reports/benchmarks/README.md, "Alignment loss").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.autograd.function import once_differentiable

from cameo_bench.objectives.alignment_plan import from_rows, row_grads


# Largest logit block a chunk holds (fp32 elements, rows x keys x logit maps over the stacked rows;
# the MLP head's hidden layer is 4x that): 2 MB (8 MB hidden) was fastest on this CPU at the tiny
# presets and the paper's layer-10 shape, larger blocks fall out of cache and smaller ones add
# per-chunk overhead. `chunk_size` can only lower it.
BLOCK_ELEMENTS = 1 << 19


def chunk_rows(chunk_size: int, stacked: int, maps: int, keys: int) -> int:
    """Query rows per chunk: at most `chunk_size`, and a block of at most BLOCK_ELEMENTS."""
    return max(1, min(chunk_size, BLOCK_ELEMENTS // max(1, stacked * maps * keys)))


def merged_targets(idx: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """idx, t [..., k] -> (T [..., k]: target mass at entry a's token with duplicates summed,
    first [..., k] bool: entry a is the first one naming its token)."""
    k = idx.shape[-1]
    if k == 1:
        return t, torch.ones_like(t, dtype=torch.bool)
    same = idx[..., :, None] == idx[..., None, :]  # [..., k, k]
    T = (same * t[..., None, :]).sum(-1)
    earlier = torch.ones(k, k, dtype=torch.bool, device=idx.device).tril(-1)
    return T, ~(same & earlier).any(-1)


def target_token(idx: torch.Tensor, T: torch.Tensor, hw: int) -> torch.Tensor:
    """The argmax of the dense target row (first token among equal masses) [...] from its entries."""
    if idx.shape[-1] == 1:
        return idx[..., 0]
    best = T == T.amax(-1, keepdim=True)
    return torch.where(best, idx, hw).amin(-1)


def score_chunk(S, idx, t, w, *, per_view: bool, loss: str, log_eps: float, want_grad: bool):
    """One chunk of fused logits S [R, Ho, c, Vk*hw] against targets idx / t [R, c, Vk, k] with term
    weights w [R, c, Vk] -> (weighted terms per query [R, c], correct, scored, dL/dS or None).

    dL/dS overwrites the softmax buffer; S itself is left as it was.
    """
    R, Ho, c, Nk = S.shape
    Vk, k = idx.shape[-2:]
    hw = Nk // Vk
    blocks = Vk if per_view else 1
    S_view = S.view(R, Ho, c, Vk, hw)
    idx_h = idx[:, None].expand(R, Ho, c, Vk, k)
    z = S_view.gather(-1, idx_h)  # [R, Ho, c, Vk, k] target logits
    view_max = S_view.amax(-1)  # [R, Ho, c, Vk]
    P = S.view(R, Ho, c, blocks, Nk // blocks).softmax(-1)
    # The softmax's largest entry is exp(0) / sum, so this is the log-sum-exp without another pass.
    block_max = view_max if per_view else view_max.amax(-1, keepdim=True)
    lse = block_max - P.amax(-1).log()  # [R, Ho, c, blocks]
    logp = z - lse[..., None]  # [R, Ho, c, Vk, k] (global: one lse for every view)

    t_h, w_h = t[:, None], w[:, None]  # [R, 1, c, Vk, k], [R, 1, c, Vk]
    need_merge = loss == "l1" or loss == "kl" or idx.shape[-1] > 1
    T, first = merged_targets(idx, t) if need_merge else (t, None)
    if loss == "l1":
        p = logp.exp()
        f = first[:, None].to(p.dtype)
        T_h = T[:, None]
        term = 1 - (f * p).sum(-1) + (f * (p - T_h).abs()).sum(-1)  # [R, Ho, c, Vk]
        cp = f * ((p - T_h).sign() - 1) * p
        beta, alpha = w_h[..., None] * cp, -(w_h * cp.sum(-1))
    else:
        if log_eps == 0:
            term, coef = -(t_h * logp).sum(-1), t_h
        else:  # the released code's log(p + eps)
            p = logp.exp()
            term, coef = -(t_h * (p + log_eps).log()).sum(-1), t_h * (p / (p + log_eps))
        if loss == "kl":
            term = term + torch.xlogy(t, T).sum(-1)[:, None]
        beta, alpha = -(w_h[..., None] * coef), w_h * coef.sum(-1)
    rows = (term * w_h).sum((1, 3))  # [R, c]

    with torch.no_grad():
        has_target = (t.sum(-1) > 0) & (w > 0)  # [R, c, Vk]
        token = target_token(idx, T, hw)  # [R, c, Vk]
        z_target = S_view.gather(-1, token[:, None, ..., None].expand(R, Ho, c, Vk, 1))[..., 0]
        hit = (z_target == view_max) & has_target[:, None]  # ties count as hits
        correct, scored = hit.sum().float() / Ho, has_target.sum().float()
    if not want_grad:
        return rows, correct, scored, None
    if not per_view:
        alpha = alpha.sum(-1, keepdim=True)
    grad = P.mul_(alpha[..., None]).view(R, Ho, c, Vk, hw).scatter_add_(-1, idx_h, beta.expand(R, Ho, c, Vk, k))
    return rows, correct, scored, grad.view(R, Ho, c, Nk)


class MlpHead:
    """The `mlp` head on a chunk's per-head logits Z [R, H, c, n] -> fused logits [R, 1, c, n]
    (H -> 4H -> GELU -> 1, kept channels-first so each layer is one GEMM over all pairs)."""

    def __init__(self, lin1: torch.nn.Linear, lin2: torch.nn.Linear):
        self.lin1, self.lin2 = lin1, lin2
        self.params = [p for p in (lin1.weight, lin1.bias, lin2.weight) if p.requires_grad]

    def __call__(self, Z: torch.Tensor) -> torch.Tensor:
        R, H, c, n = Z.shape
        w1, b1, w2 = self.lin1.weight.float(), self.lin1.bias.float(), self.lin2.weight.float()
        hidden = torch.baddbmm(b1[None, :, None], w1.expand(R, -1, -1), Z.reshape(R, H, c * n))  # [R, 4H, c*n]
        return torch.bmm(w2.expand(R, -1, -1), F.gelu(hidden)).view(R, 1, c, n)


def chunk_step(q_c, K, R: int, score, head: MlpHead | None, want_q: bool, want_k: bool, want_params: bool,
               grad_K: torch.Tensor | None):
    """One chunk: q_c [R*Hx, c, D] against K [R*Hx, n, D] -> (score's rows, correct, scored,
    dL/dq_c, dL/dK so far (added into `grad_K`, the previous chunks' sum, when given), dL/d head
    parameters). Without a head the Hx logit maps are the fused logits and the gradients are two
    matmuls; the MLP head is differentiated by autograd, for this chunk only."""
    c, n = q_c.shape[1], K.shape[1]
    if head is None:
        S = torch.bmm(q_c, K.transpose(1, 2)).view(R, -1, c, n)  # the chunk's fused logits
        rows, hit, count, dS = score(S, want_grad=want_q or want_k)
        if dS is None:
            return rows, hit, count, None, grad_K, []
        dS = dS.view(-1, c, n)
        gq = torch.bmm(dS, K) if want_q else None  # [R*Hx, c, D]
        if want_k:  # [R*Hx, n, D], accumulated in place
            grad_K = torch.bmm(dS.transpose(1, 2), q_c) if grad_K is None else grad_K.baddbmm_(dS.transpose(1, 2), q_c)
        return rows, hit, count, gq, grad_K, []
    with torch.enable_grad():
        q_leaf = q_c.detach().requires_grad_(want_q)
        k_leaf = K.detach().requires_grad_(want_k)
        fused = head(torch.bmm(q_leaf, k_leaf.transpose(1, 2)).view(R, -1, c, n))  # [R, 1, c, n]
    leaves = [t for t, want in ((q_leaf, want_q), (k_leaf, want_k)) if want] + (head.params if want_params else [])
    rows, hit, count, dF = score(fused.detach(), want_grad=bool(leaves))
    if not leaves:
        return rows, hit, count, None, grad_K, []
    found = iter(torch.autograd.grad(fused, leaves, dF))
    gq = next(found) if want_q else None
    if want_k:
        gk = next(found)
        grad_K = gk if grad_K is None else grad_K.add_(gk)
    return rows, hit, count, gq, grad_K, list(found)


class _Accumulator:
    """Sums of losses [2], correct, scored and the head's parameter gradients over chunks."""

    def __init__(self, like: torch.Tensor):
        self.losses = like.new_zeros(2)
        self.correct, self.scored = like.new_zeros(()), like.new_zeros(())
        self.param_grads: list[torch.Tensor] = []

    def add(self, hit, count, param_grads) -> None:
        self.correct, self.scored = self.correct + hit, self.scored + count
        if not self.param_grads:
            self.param_grads = list(param_grads)
        else:
            for acc, g in zip(self.param_grads, param_grads):
                acc += g


def run_stack(Q, K, idx, t, w, group_of_row, acc: _Accumulator, *, chunk: int, want_q: bool, want_k: bool,
              want_params: bool, head: MlpHead | None, **options):
    """Q [R, Hx, P, D], K [R, Hx, Nk, D] (R = G*b rows of one stack) -> (dL/dQ, dL/dK), each None
    unless wanted; losses, counts and head gradients go to `acc`."""
    R, Hx, P, D = Q.shape
    Nk = K.shape[2]
    chunk = chunk_rows(chunk, R, Hx, Nk)
    Qf = Q.reshape(R * Hx, P, D)
    Kf = K.reshape(R * Hx, Nk, D)
    grad_q_parts, grad_k = [], None
    for start in range(0, P, chunk):
        end = min(start + chunk, P)
        score = lambda S, want_grad: score_chunk(  # noqa: E731
            S, idx[:, start:end], t[:, start:end], w[:, start:end], want_grad=want_grad, **options)
        rows, hit, count, gq, grad_k, gp = chunk_step(Qf[:, start:end], Kf, R, score, head, want_q, want_k,
                                                      want_params, grad_k)
        acc.losses.index_add_(0, group_of_row, rows.sum(1))
        acc.add(hit, count, gp)
        if gq is not None:
            grad_q_parts.append(gq)
    grad_q = None
    if grad_q_parts:
        grad_q = (grad_q_parts[0] if len(grad_q_parts) == 1 else torch.cat(grad_q_parts, 1)).view(R, Hx, P, D)
    return grad_q, None if grad_k is None else grad_k.view(R, Hx, Nk, D)


class QueryRows:
    """The maps' query rows, made a chunk at a time from the tap's q [B, H, Qs, d]: row b*Qs + x of
    `weight ⊙ q` (weight [H] or a scalar), the heads concatenated (`concat`, one map) or not (H
    maps). `shape` is that of the full qx [B, Hx, Qs, D], which is never built."""

    def __init__(self, q: torch.Tensor, weight, concat: bool):
        B, H, Qs, d = q.shape
        self.q, self.concat = q, concat
        self.weight = weight[None, :, None] if torch.is_tensor(weight) else weight
        self.shape = (B, 1, Qs, H * d) if concat else (B, H, Qs, d)

    def select(self, rows: torch.Tensor) -> torch.Tensor:  # [n] -> [n, Hx, D]
        Qs = self.q.shape[2]
        picked = self.q[rows // Qs, :, rows % Qs] * self.weight  # [n, H, d]
        return picked.reshape(rows.numel(), 1, -1) if self.concat else picked


def run_pairs(qx, kx, idx, t, w, group, *, chunk: int, want_q: bool, want_k: bool, want_params: bool, loss: str,
              log_eps: float, head: MlpHead | None = None, kernel: str = "torch"):
    """`per_view` normalisation, one row per supervised (query, key view) pair: rows are grouped
    by key block (sample, key view) and scored against its h*w keys, so pairs without a term
    (invalid, unsupported, or a zero `onehot_global` row) cost nothing and no key is copied per
    query view. qx [B, Hx, Qs, D] (a tensor or `QueryRows`), kx [B, Hx, N, D]; idx / t [B, Qs, V, k]; w [B, Qs, V] term
    weights; group [B, Qs] 0 reference / 1 target query -> (losses [2], correct, scored, dL/dqx,
    dL/dkx, dL/d head parameters) (gradients None unless wanted). `kernel="triton"` scores the
    rows with `alignment_triton` (one-hot targets, ce/kl, one fused map, log_eps 0)."""
    B, Hx, Qs, D = qx.shape
    V, k = idx.shape[2:]
    N = kx.shape[2]
    hw = N // V
    maps = 1 if head is not None else Hx  # fused logit maps per pair
    acc = _Accumulator(kx)
    tsum = t.sum(-1)  # [B, Qs, V]
    counted = w > 0
    if loss == "l1":  # a counted row without target mass scores sum_y |p_y - 0| = 1 per map, with no gradient
        acc.losses.index_add_(0, group.flatten(), (w * (counted & (tsum <= 0))).sum(-1).flatten() * maps)
    active = counted & (tsum > 0)
    b, j, q = active.permute(0, 2, 1).nonzero(as_tuple=True)  # pairs, grouped by key block (b, j)
    block = b * V + j  # [M]
    counts = torch.bincount(block, minlength=B * V)
    used = counts.nonzero().flatten()  # key blocks holding pairs [R]
    R, width = used.numel(), int(counts.max()) if block.numel() else 0
    every_block = R == B * V
    grad_q = kx.new_zeros(B * Qs, Hx, D) if want_q else None  # rows; dL/dkx is assembled from the key blocks
    if R == 0:
        grad_k = kx.new_zeros(kx.shape) if want_k else None
        return acc.losses, acc.correct, acc.scored, _from_rows(grad_q, B, Hx, Qs, D), grad_k, []
    slot_of_block = torch.full((B * V,), -1, dtype=torch.long, device=kx.device)
    slot_of_block[used] = torch.arange(R, device=kx.device)
    start = counts.cumsum(0) - counts
    flat = slot_of_block[block] * width + torch.arange(block.numel(), device=kx.device) - start[block]  # [M]
    pad = lambda x, *tail: x.new_zeros(R * width, *tail).index_copy_(0, flat, x)  # noqa: E731
    q_row = pad(b * Qs + q).view(R, width)  # padding rows read query 0 with weight 0
    idx_p = pad(idx[b, q, j], k).view(R, width, 1, k)
    t_p = pad(t[b, q, j], k).view(R, width, 1, k)
    w_p = pad(w[b, q, j]).view(R, width, 1)
    g_p = pad(group[b, q]).view(R, width)
    select = qx.select if isinstance(qx, QueryRows) else qx.transpose(1, 2).reshape(B * Qs, Hx, D).index_select
    K = kx.view(B, Hx, V, hw, D).transpose(1, 2).reshape(B * V, Hx, hw, D)
    K = (K if every_block else K.index_select(0, used)).reshape(R * Hx, hw, D)  # [R*Hx, hw, D]
    if kernel == "triton":
        return _triton_rows(qx, K, q_row, idx_p, w_p, g_p, acc, grad_q, B, V, hw, used, every_block, want_q, want_k)
    chunk = chunk_rows(chunk, R, Hx, hw)
    grad_K = None
    for s in range(0, width, chunk):
        e = min(s + chunk, width)
        rows_c = q_row[:, s:e].reshape(-1)  # [R*c] the chunk's query rows, gathered per chunk
        q_c = select(rows_c) if isinstance(qx, QueryRows) else select(0, rows_c)  # [R*c, Hx, D]
        q_c = q_c.view(R, e - s, Hx, D).transpose(1, 2).reshape(R * Hx, e - s, D)
        score = lambda S, want_grad: score_chunk(  # noqa: E731
            S, idx_p[:, s:e], t_p[:, s:e], w_p[:, s:e], per_view=True, loss=loss, log_eps=log_eps, want_grad=want_grad)
        rows, hit, count, gq, grad_K, gp = chunk_step(q_c, K, R, score, head, want_q, want_k, want_params, grad_K)
        acc.losses.index_add_(0, g_p[:, s:e].flatten(), rows.flatten())
        acc.add(hit, count, gp)
        if gq is not None:  # [R*Hx, c, D] into the query rows
            grad_q.index_add_(0, rows_c, gq.view(R, Hx, e - s, D).transpose(1, 2).reshape(R * (e - s), Hx, D))
    if grad_K is not None:  # key blocks back to [B, Hx, N, D]
        blocks = grad_K.view(R, Hx, hw, D)
        if not every_block:
            blocks = grad_K.new_zeros(B * V, Hx, hw, D).index_copy_(0, used, blocks)
        grad_k = blocks.view(B, V, Hx, hw, D).transpose(1, 2).reshape(B, Hx, N, D)  # a view when Hx = 1
        return acc.losses, acc.correct, acc.scored, _from_rows(grad_q, B, Hx, Qs, D), grad_k, acc.param_grads
    return acc.losses, acc.correct, acc.scored, _from_rows(grad_q, B, Hx, Qs, D), None, acc.param_grads


def _triton_rows(qx, K, q_row, idx_p, w_p, g_p, acc, grad_q, B, V, hw, used, every_block, want_q, want_k):
    """`run_pairs`'s rows through the Triton kernels: one fused map (Hx = 1), one-hot targets."""
    from cameo_bench.objectives import alignment_triton

    R, width = q_row.shape
    D = K.shape[-1]
    select = qx.select if isinstance(qx, QueryRows) else qx.transpose(1, 2).reshape(-1, 1, D).index_select
    Q = (select(q_row.flatten()) if isinstance(qx, QueryRows) else select(0, q_row.flatten())).view(R, width, D)
    target, w = idx_p[:, :, 0, 0], w_p[:, :, 0]  # [R, width]
    lse, z_target, argmax = alignment_triton.forward_rows(Q.contiguous(), K.contiguous(), target)
    acc.losses.index_add_(0, g_p.flatten(), (w * (lse - z_target)).flatten())
    has_target = w > 0
    acc.add(((argmax.long() == target) & has_target).sum().float(), has_target.sum().float(), [])
    grad_k = None
    if want_q or want_k:
        dQ, dK = alignment_triton.backward_rows(Q.contiguous(), K.contiguous(), target, w, lse)
        if want_q:
            grad_q.index_add_(0, q_row.flatten(), dQ.view(R * width, 1, D))
        if want_k:
            blocks = dK.view(R, 1, hw, D)
            if not every_block:
                blocks = dK.new_zeros(B * V, 1, hw, D).index_copy_(0, used, blocks)
            grad_k = blocks.view(B, V, 1, hw, D).transpose(1, 2).reshape(B, 1, V * hw, D)
    Qs = qx.shape[2]
    return acc.losses, acc.correct, acc.scored, _from_rows(grad_q, B, 1, Qs, D), grad_k, []


def _from_rows(rows, B, Hx, n, D):
    return None if rows is None else rows.view(B, n, Hx, D).transpose(1, 2)


def run_plan(qx, kx, work, *, want_q: bool, want_k: bool, want_params: bool, head: MlpHead | None = None,
             **options):
    """Every stack of the plan (whole query rows; `global` normalisation): qx [B, Hx, Qs, D],
    kx [B, Hx, N, D], `work` = (stack, idx, t, w, chunk) per stack -> like `run_pairs`."""
    grad_q, grad_k = row_grads(qx, kx, want_q, want_k)
    acc = _Accumulator(qx)
    for stack, idx, t, w, chunk in work:
        Q, K = stack.gather(qx, kx)  # [G*b, Hx, P, D], [G*b, Hx, Vk*hw, D]
        gq, gk = run_stack(Q, K, idx, t, w, stack.group_of_row, acc, chunk=chunk, want_q=want_q, want_k=want_k,
                           want_params=want_params, head=head, **options)
        stack.add_grads(grad_q, grad_k, gq, gk)
    return acc.losses, acc.correct, acc.scored, from_rows(grad_q, qx), from_rows(grad_k, kx), acc.param_grads


class Fold:
    """How the tap's q [B, H, Qs, d] and k [B, H, N, d] become the logit maps the path scores,
    and how their gradients go back. `concat` (mean, linear): one map of width H*d,
    qx = scale * mix ⊙ q with the heads concatenated, so the fused logit is one dot product;
    `heads` (per_head, mlp): H maps of width d, qx = scale * q."""

    def __init__(self, kind: str, scale: float, mix: torch.Tensor | None = None):
        self.kind, self.scale, self.mix = kind, scale, mix

    def inputs(self, q: torch.Tensor, k: torch.Tensor, rows: bool = False):
        """(qx [B, Hx, Qs, D], kx [B, Hx, N, D]); with `rows` qx is a `QueryRows` (made per chunk)."""
        weight = self.scale if self.kind == "heads" else self.mix.detach() * self.scale
        kx = k if self.kind == "heads" else rearrange(k, "b H n d -> b 1 n (H d)")  # [B, 1, N, H*d]
        if rows:
            return QueryRows(q, weight, concat=self.kind == "concat"), kx
        if self.kind == "heads":
            return q * self.scale, kx
        return rearrange(q * weight[None, :, None, None], "b H q d -> b 1 q (H d)"), kx  # [B, 1, Qs, H*d]

    # Gradients come back contiguous in the layout of q and k: the backbone's backward adds them to
    # SDPA's and runs norms' backward on them, which strided views would slow down.
    def q_grad(self, q, gqx, want_q: bool, want_mix: bool):
        """(dL/dq [B, H, Qs, d], dL/dmix [H]) from dL/dqx, each None unless wanted."""
        if gqx is None:
            return None, None
        if self.kind == "heads":
            return (torch.mul(gqx, self.scale, out=torch.empty_like(q)) if want_q else None), None
        B, H, Qs, d = q.shape
        g = gqx.reshape(B, Qs, H, d).permute(0, 2, 1, 3)  # dL/d(scale * mix * q) [B, H, Qs, d]
        g_mix = torch.einsum("bhqd,bhqd->h", q, g) * self.scale if want_mix else None
        gq = None
        if want_q:
            gq = torch.mul(g, (self.mix.detach() * self.scale)[None, :, None, None], out=torch.empty_like(q))
        return gq, g_mix

    def k_grad(self, gkx, q_shape):
        """dL/dk [B, H, N, d] from dL/dkx."""
        if gkx is None or self.kind == "heads":
            return None if gkx is None else gkx.contiguous()
        B, H, _, d = q_shape
        return gkx.reshape(B, -1, H, d).permute(0, 2, 1, 3).contiguous()


class SparseTargetLoss(torch.autograd.Function):
    """The loss with its gradients computed in the forward (`run`: `run_pairs` or `run_plan`
    with its arguments bound, on the maps `fold` makes); backward scales them, in place, by the
    incoming gradient of the total. Nothing but the gradients is kept. One backward, no double
    backward."""

    @staticmethod
    def forward(ctx, q, k, fold, run, mix, *head_params):
        want_mix = mix is not None and mix.requires_grad
        want_params = any(p.requires_grad for p in head_params)
        qx, kx = fold.inputs(q.detach(), k.detach(), rows=run.func is run_pairs)
        losses, correct, scored, gqx, gkx, gp = run(qx, kx, want_q=q.requires_grad or want_mix,
                                                    want_k=k.requires_grad, want_params=want_params)
        del qx, kx
        # one gradient buffer at a time goes to the layout of q and k, the other's raw one freed first
        gk = fold.k_grad(gkx, q.shape) if k.requires_grad else None
        del gkx
        gq, g_mix = fold.q_grad(q.detach(), gqx, q.requires_grad, want_mix)
        del gqx
        if want_params and not gp:  # no pair was scored: the head still gets a (zero) gradient, as DDP expects
            gp = [torch.zeros_like(p) for p in head_params if p.requires_grad]
        ctx.param_mask = [p.requires_grad for p in head_params]
        ctx.save_for_backward(gq, gk, g_mix, *gp)
        total = losses.sum()
        ctx.mark_non_differentiable(losses, correct, scored)
        return total, losses, correct, scored

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, *_):
        # The stored gradients are scaled in place (no second copy at the step's peak), so a
        # second backward through the same graph (retain_graph=True) must not reuse them.
        if getattr(ctx, "spent", False):
            raise RuntimeError("CameoLoss's sparse path supports one backward per forward (got retain_graph=True "
                               "and a second backward); use impl='dense' for that")
        ctx.spent = True
        gq, gk, g_mix, *gp = ctx.saved_tensors
        scale = lambda g: None if g is None else g.mul_(grad_total)  # noqa: E731
        found = iter(gp)
        param_grads = [scale(next(found, None)) if needed else None for needed in ctx.param_mask]
        return scale(gq), scale(gk), None, None, scale(g_mix), *param_grads


def sparse_target_loss(q, k, fold: Fold, run, mix=None, head_params=()):
    """(total, losses [2] of reference and target queries, correct, scored) of `run(qx, kx,
    want_q=, want_k=, want_params=)` on the maps `fold` makes of q [B, H, Qs, d] and k [B, H, N, d];
    differentiable in q, k, `mix` (the linear head's weights) and `head_params` (the MLP's) when
    they require grad and grad mode is on."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, mix, *head_params)):
        return SparseTargetLoss.apply(q, k, fold, run, mix, *head_params)
    with torch.no_grad():
        qx, kx = fold.inputs(q, k, rows=run.func is run_pairs)
        losses, correct, scored, *_ = run(qx, kx, want_q=False, want_k=False, want_params=False)
    return losses.sum(), losses, correct, scored
