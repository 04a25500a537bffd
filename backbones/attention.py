"""The one multi-view attention implementation shared by every backbone.

Both the UNet's diffusers processor and the DiT block call `multiview_attention` with q, k, v in
the view-major token layout. SDPA stays the kernel for every layer; a tapped layer additionally
hands out the q rows and the k it used (same tensors, same graph), so a loss can rebuild exactly
the logits the forward saw without an N x N map ever being stored by the backbone.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from einops import rearrange

from backbones.interface import TapResult, TapState


def multiview_attention(
    q: torch.Tensor,  # [B, H, N, d], N = V*h*w view-major, already q/k-normalised
    k: torch.Tensor,  # [B, H, N, d]
    v: torch.Tensor,  # [B, H, N, d]
    *,
    grid: tuple[int, int, int],  # (V, h, w)
    cross_view: bool,
    layer_name: str,
    state: TapState | None,
    upcast: bool = False,
) -> torch.Tensor:  # [B, H, N, d]
    """`upcast` (SD's `upcast_attention`, set by SD-2.x configs) computes attention in float32
    whatever the input precision, autocast included; the output returns to the input dtype and
    the tap hands out the float32 q and k that SDPA used. A no-op on float32 inputs."""
    num_views, h, w = grid
    B, H, N, d = q.shape
    if N != num_views * h * w:
        raise ValueError(f"{layer_name}: {N} tokens do not match grid {grid}")
    scale = d**-0.5
    dtype = v.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()

    with torch.autocast(device_type=q.device.type, enabled=False) if upcast else contextlib.nullcontext():
        if state is not None and state.perturb.get(layer_name) == "identity":
            out = v  # attention replaced by identity: each token keeps its own value
        elif cross_view:
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            qv, kv, vv = (rearrange(t, "b H (v n) d -> (b v) H n d", v=num_views) for t in (q, k, v))
            out = F.scaled_dot_product_attention(qv, kv, vv, scale=scale)  # [(B V), H, hw, d]
            out = rearrange(out, "(b v) H n d -> b H (v n) d", v=num_views)
    out = out.to(dtype)

    if state is not None and state.request is not None and state.request.layer == layer_name:
        # The gather runs again when gradient checkpointing recomputes this layer, even though the
        # result is discarded: non-reentrant checkpointing needs the recomputation to save the
        # same tensors as the forward (the gather's index), or the tap's backward fails.
        req = state.request
        if req.query_idx is None:  # every token: q itself (no gather, and no scatter in the backward)
            query_idx = torch.arange(N, device=q.device).expand(B, N)
            q_sel = q  # [B, H, N, d]
        else:
            query_idx = req.query_idx.to(q.device)
            q_sel = torch.gather(q, 2, query_idx[:, None, :, None].expand(B, H, -1, d))  # [B,H,Qs,d]
        if state.result is None:  # write-once: checkpoint recomputation must not overwrite
            features = rearrange(out, "b H n d -> b n (H d)") if req.want_features else None
            state.result = TapResult(
                q=q_sel, k=k, scale=scale, grid=grid, query_idx=query_idx,
                layer=layer_name, cross_view=cross_view, features=features,
            )
    return out
