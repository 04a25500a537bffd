"""Which query rows the CAMEO loss scores against which key views, batched into stacks, built once per layout.

A *group* is the queries of one view (for a set of samples) with the key views they are scored
against; groups with the same number of samples, queries and key views form a *stack*, scored by
one batched matmul per chunk of queries instead of one per group. The plan holds only index
tensors that depend on the layout (batch size, query ids per view, grid, number of references,
options), never on the targets, so the engine's layout (every query, or `queries_per_view` per
view, view after view, the same for every sample) is planned once and reused every step; checking
that a step's query ids still have that layout is one small device-to-host read. Any other layout
(hand-built query ids in tests and analyses) is planned from the ids themselves, a sample at a
time when the samples differ.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Stack:
    """G groups of b samples x P queries, each scored against Vk key views of hw tokens."""

    q_rows: torch.Tensor  # [G*b*P] long: rows of the (B*Qs) selected queries, sample-major
    k_rows: torch.Tensor  # [G*b*Vk*hw] long: rows of the (B*N) keys
    key_views: torch.Tensor  # [G, Vk] long
    group_of_row: torch.Tensor  # [G*b] long: 0 reference queries, 1 target queries
    group_ids: tuple[int, ...]  # [G] the same per group, on the host
    groups: int  # G
    samples: int  # b
    queries: int  # P
    num_key_views: int  # Vk

    def gather(self, qx: torch.Tensor, kx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """qx [B, Hx, Qs, Dx], kx [B, Hx, N, Dx] -> [G*b, Hx, P, Dx], [G*b, Hx, Vk*hw, Dx] (differentiable)."""
        B, Hx, Qs, Dx = qx.shape
        N = kx.shape[2]
        rows = self.groups * self.samples
        q = qx.transpose(1, 2).reshape(B * Qs, Hx, Dx).index_select(0, self.q_rows)  # [G*b*P, Hx, Dx]
        k = kx.transpose(1, 2).reshape(B * N, Hx, Dx).index_select(0, self.k_rows)  # [G*b*Nk, Hx, Dx]
        q = q.view(rows, self.queries, Hx, Dx).transpose(1, 2)
        k = k.view(rows, -1, Hx, Dx).transpose(1, 2)
        return q, k

    def add_grads(self, grad_q_rows, grad_k_rows, stack_q, stack_k) -> None:
        """Adds the stack's gradients [G*b, Hx, P, Dx], [G*b, Hx, Nk, Dx] into row buffers
        [B*Qs, Hx, Dx] and [B*N, Hx, Dx] (`row_grads`; either pair may be None). Groups are added in
        plan order, so a key shared by several groups sums their parts in that order."""
        for rows_buf, part, rows in ((grad_q_rows, stack_q, self.q_rows), (grad_k_rows, stack_k, self.k_rows)):
            if rows_buf is not None and part is not None:
                rows_buf.index_add_(0, rows, part.transpose(1, 2).reshape(-1, *rows_buf.shape[1:]))

    def targets(self, pair_w, idx, weight):
        """Per-query targets [B, Qs, V(, k)] -> this stack's idx, weight [G*b, P, Vk, k] and pair
        weights [G*b, P, Vk]."""
        B, Qs, V, k = idx.shape
        G, Vk = self.groups, self.num_key_views
        rows = self.samples * self.queries
        views = self.key_views[:, None, :]  # [G, 1, Vk]

        def pick(t, tail):  # [B, Qs, V, *tail] -> [G*b, P, Vk, *tail]
            t = t.reshape(B * Qs, V, *tail).index_select(0, self.q_rows).view(G, rows, V, *tail)
            at = views.reshape(G, 1, Vk, *(1 for _ in tail)).expand(G, rows, Vk, *tail)
            return t.gather(2, at).view(G * self.samples, self.queries, Vk, *tail)

        return pick(idx, (k,)), pick(weight, (k,)), pick(pair_w, ())


@dataclass(frozen=True)
class Plan:
    stacks: list[Stack]


def row_grads(q: torch.Tensor, k: torch.Tensor, want_q: bool, want_k: bool):
    """Zero gradient buffers in row layout [B*n, Hx, Dx] for q [B, Hx, Qs, Dx] and k [B, Hx, N, Dx]
    (None where that gradient is not wanted)."""
    return tuple(t.new_zeros(t.shape[0] * t.shape[2], t.shape[1], t.shape[3]) if want else None
                 for t, want in ((q, want_q), (k, want_k)))


def from_rows(rows: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """A row buffer [B*n, Hx, Dx] back in the layout of `like` [B, Hx, n, Dx]."""
    if rows is None:
        return None
    B, Hx, n, Dx = like.shape
    return rows.view(B, n, Hx, Dx).transpose(1, 2)


def block_layout(query_views: list[int], Qs: int, device) -> torch.Tensor | None:
    """The query view of every position [Qs] when `Qs` splits into equal blocks of `query_views`
    (what `CameoLoss.select_queries` returns), else None."""
    if not query_views or Qs % len(query_views):
        return None
    per_view = Qs // len(query_views)
    return torch.tensor(query_views, device=device).repeat_interleave(per_view)


def build_plan(groups, support: torch.Tensor, num_ref: int, B: int, Qs: int, grid) -> Plan:
    """`groups`: (sample rows [b] long, query positions [P] long, view) triples -> stacks.

    Groups whose view has no supported key view are dropped; the others are stacked by
    (b, P, number of key views)."""
    num_views, h, w = grid
    hw, N = h * w, num_views * h * w
    support = support.cpu()
    buckets: dict[tuple[int, int, int], list] = {}
    for rows, pos, view in groups:
        keys = support[view].nonzero().flatten()
        if keys.numel() == 0:
            continue
        buckets.setdefault((rows.numel(), pos.numel(), keys.numel()), []).append((rows.cpu(), pos.cpu(), view, keys))
    stacks = []
    device = groups[0][1].device if groups else support.device
    for (b, P, Vk), members in buckets.items():
        q_rows = torch.stack([rows[:, None] * Qs + pos[None, :] for rows, pos, _, _ in members])  # [G, b, P]
        tokens = torch.stack([(keys[:, None] * hw + torch.arange(hw)).flatten() for *_, keys in members])  # [G, Nk]
        k_rows = torch.stack([rows[:, None] * N + tok[None, :] for (rows, *_), tok in zip(members, tokens)])
        key_views = torch.stack([keys for *_, keys in members])  # [G, Vk]
        group_of_row = torch.tensor([int(view >= num_ref) for _, _, view, _ in members]).repeat_interleave(b)
        stacks.append(Stack(
            q_rows=q_rows.flatten().to(device), k_rows=k_rows.flatten().to(device),
            key_views=key_views.to(device), group_of_row=group_of_row.to(device),
            group_ids=tuple(int(view >= num_ref) for _, _, view, _ in members), groups=len(members), samples=b, queries=P, num_key_views=Vk,
        ))
    return Plan(stacks)


def groups_of(query_view: torch.Tensor):
    """(sample rows, query positions, view) of arbitrary query ids: all samples together when they
    share one layout, else one sample at a time."""
    B = query_view.shape[0]
    device = query_view.device
    if bool((query_view == query_view[:1]).all()):
        selectors = [(torch.arange(B, device=device), query_view[0])]
    else:
        selectors = [(torch.tensor([b], device=device), query_view[b]) for b in range(B)]
    for rows, views in selectors:
        for view in views.unique().tolist():
            yield rows, (views == view).nonzero().flatten(), view
