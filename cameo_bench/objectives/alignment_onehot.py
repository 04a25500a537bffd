"""The CAMEO loss's common case in few, large operations: one-hot targets, per-view softmax, cross-entropy, heads linear in the logits.

The quickstart's loss (mean head, `onehot_per_view`, `per_view`, `ce`, every query) on a tiny
model is a few million multiply-adds; what it cost beyond them was op count: each chunk of the
general path (`alignment_sparse.run_pairs`) runs ~50 small operations for target merging, loss
choices and padding, and on a CPU step of 0.1 s each op is ~10 us. Here a (query, key view)
term is `lse_j(z(x, .)) - z(x, t)` and its gradient w.r.t. the block's logits is `w (p - e_t)`,
so a chunk is: one matmul for the logits, max, exp, sum (the log-sum-exp and the softmax in
three passes, no log-softmax buffer), the target logit by one gather, and two matmuls for
dL/dQ = dS K and dL/dK = dS^T Q (`run_onehot`). Rows are laid out per key block (sample, key
view) with the block's active queries first (one stable sort of the activity mask; padding rows
carry weight 0), so invalid pairs cost nothing and nothing but the sort and one small
device-to-host read (the widest block) depends on the data.

Same value and gradients as the general path (tests/test_cameo_loss.py checks both against the
naive full map to 1e-5); `CameoLoss` picks it for `mean`, `linear` and `per_head` heads with
`per_view` normalisation, a one-hot target, `ce` or `kl` (equal for a one-hot target) and
`log_eps = 0`.
"""
from __future__ import annotations

import torch

# Largest logit block one chunk holds (fp32 elements over every block of the chunk: rows x keys).
# 1 M (4 MB): at the paper's layer-10 shape the loss's peak extra memory is then ~59 MB (2 M: ~70 MB,
# 512 K: no less, the rest being the O(N H d) query and key buffers), at the same speed; the tiny
# presets' whole loss fits in one chunk either way. `chunk_size` can only lower it.
BLOCK_ELEMENTS = 1 << 20


def run_onehot(qx, kx, idx, t, w, group, *, chunk: int, want_q: bool, want_k: bool, want_params: bool,
               loss: str, log_eps: float, head=None, kernel: str = "torch"):
    """qx [B, Hx, Qs, D] (the scaled, folded queries), kx [B, Hx, N, D]; idx [B, Qs, V, 1] target
    token in key view j, t [B, Qs, V, 1] target mass (0 = no target in that view), w [B, Qs, V] term
    weights, group [B, Qs] 0 reference / 1 target query -> (losses [2], correct, scored,
    dL/dqx or None, dL/dkx or None, []); the signature of `alignment_sparse.run_pairs`."""
    if head is not None or loss not in ("ce", "kl") or log_eps != 0 or kernel != "torch" or idx.shape[-1] != 1:
        raise ValueError("run_onehot scores one-hot ce/kl terms of heads linear in the logits, with log_eps 0")
    B, Hx, Qs, D = qx.shape
    V = idx.shape[2]
    N = kx.shape[2]
    hw = N // V
    losses = kx.new_zeros(2)
    active = (w > 0) & (t[..., 0] > 0)  # [B, Qs, V] terms with a target
    counts = active.sum(1)  # [B, V] active rows per key block
    summary = torch.cat([counts.amax(0), counts.sum(0)]).tolist()  # the one read back: widths, used key views
    used = [j for j in range(V) if summary[V + j] > 0]
    width = max(summary[:V]) if used else 0
    if not used:
        grad_q = qx.new_zeros(qx.shape) if want_q else None
        grad_k = kx.new_zeros(kx.shape) if want_k else None
        return losses, losses.new_zeros(()), losses.new_zeros(()), grad_q, grad_k, []
    Vk = len(used)
    every_view = Vk == V
    pick = (lambda x: x) if every_view else (lambda x: x[:, used])  # noqa: E731  [B, V, ...] -> [B, Vk, ...]
    # per key block (b, j): its active queries first, in query order (stable), then padding
    act_blocks = pick(active.transpose(1, 2))  # [B, Vk, Qs]
    order = torch.sort((~act_blocks).to(torch.uint8), dim=-1, stable=True).indices[..., :width]  # [B, Vk, W]
    pad = torch.arange(width, device=kx.device) >= pick(counts)[..., None]  # [B, Vk, W] padding rows
    w_p = pick((w * t[..., 0]).transpose(1, 2)).gather(-1, order).masked_fill_(pad, 0.0)  # [B, Vk, W]
    t_p = pick(idx[..., 0].transpose(1, 2)).gather(-1, order)  # [B, Vk, W] target token in the block
    g_p = group[:, None, :].expand(B, Vk, Qs).gather(-1, order)  # [B, Vk, W]
    rows = order + torch.arange(B, device=kx.device)[:, None, None] * Qs  # [B, Vk, W] rows of (b, query)

    R = B * Vk * Hx  # logit blocks: (sample, key view, map)
    q_rows = qx.reshape(B * Qs, D) if Hx == 1 else qx.transpose(1, 2).reshape(B * Qs, Hx, D)
    K = kx.view(B, V, hw, D) if Hx == 1 else kx.view(B, Hx, V, hw, D).transpose(1, 2)  # [B, V, (Hx,) hw, D]
    K = (K if every_view else K[:, used]).reshape(R, hw, D)

    def block_queries(r: torch.Tensor) -> torch.Tensor:  # rows [B, Vk, c] -> their queries [R, c, D]
        c = r.shape[-1]
        picked = q_rows.index_select(0, r.flatten())  # [(B Vk c), (Hx,) D]
        if Hx == 1:
            return picked.view(R, c, D)
        return picked.view(B, Vk, c, Hx, D).transpose(2, 3).reshape(R, c, D)

    def add_query_grads(r: torch.Tensor, g: torch.Tensor) -> None:  # g [R, c, D] into grad_rows
        c = r.shape[-1]
        if Hx > 1:
            g = g.view(B, Vk, Hx, c, D).transpose(2, 3).reshape(-1, Hx, D)
        grad_rows.index_add_(0, r.flatten(), g.reshape(-1, *grad_rows.shape[1:]))

    # per map: the (b, j) block's weights, targets, groups
    expand = (lambda x: x.view(B * Vk, 1, width).expand(B * Vk, Hx, width).reshape(R, width)) if Hx > 1 else (
        lambda x: x.view(R, width))  # noqa: E731
    w_r, t_r, g_r = expand(w_p), expand(t_p), expand(g_p)

    # Queries are gathered, and their gradients scattered back, one chunk at a time: a query sits in
    # up to V - 1 key blocks, so gathering every block's rows at once would hold (V - 1) copies of q.
    c = max(1, min(chunk, BLOCK_ELEMENTS // (R * hw), width))
    grad_rows = q_rows.new_zeros(q_rows.shape) if want_q else None  # [(B Qs), (Hx,) D]
    grad_K = None
    correct = losses.new_zeros(())
    for s in range(0, width, c):
        e = min(s + c, width)
        r_c = rows[..., s:e]  # [B, Vk, c]
        Q_c, t_c, w_c = block_queries(r_c), t_r[:, s:e, None], w_r[:, s:e, None]  # [R, c, D], [R, c, 1], [R, c, 1]
        S = torch.bmm(Q_c, K.transpose(1, 2))  # [R, c, hw] the chunk's fused logits
        m = S.amax(-1, keepdim=True)  # [R, c, 1]
        z_t = S.gather(-1, t_c)  # [R, c, 1] target logits
        correct = correct + ((z_t == m) & (w_c > 0)).sum()  # ties count as hits, as in the general path
        P = S.sub_(m).exp_()  # the exponentials, in S's buffer
        total = P.sum(-1, keepdim=True)  # [R, c, 1]
        nll = m + total.log() - z_t  # lse - z_t
        losses.index_add_(0, g_r[:, s:e].flatten(), (w_c * nll).flatten())
        if not (want_q or want_k):
            continue
        dS = P.mul_(w_c / total).scatter_add_(-1, t_c, -w_c)  # w (p - e_t) [R, c, hw]
        if want_q:  # padding rows carry zeros (weight 0)
            add_query_grads(r_c, torch.bmm(dS, K))  # [R, c, D]
        if want_k:  # [R, hw, D]
            grad_K = torch.bmm(dS.transpose(1, 2), Q_c) if grad_K is None else grad_K.baddbmm_(dS.transpose(1, 2), Q_c)
    scored = (~pad).sum().to(losses.dtype)
    correct = correct.to(losses.dtype) / Hx

    grad_qx = grad_kx = None
    if want_q:
        grad_qx = grad_rows.view(B, 1, Qs, D) if Hx == 1 else grad_rows.view(B, Qs, Hx, D).transpose(1, 2)
    if want_k:
        blocks = grad_K.view(B, Vk, Hx, hw, D)
        if not every_view:
            blocks = grad_K.new_zeros(B, V, Hx, hw, D).index_copy_(1, torch.tensor(used, device=kx.device), blocks)
        grad_kx = blocks.transpose(1, 2).reshape(B, Hx, N, D)  # a view when Hx = 1
    return losses, correct, scored, grad_qx, grad_kx, []
