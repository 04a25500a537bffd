"""Token-level correspondence targets: the one format every source produces and the loss reads.

Sparse by construction: for each query token and each key view we store at most `k` target tokens
with weights, never an N x N map.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CorrespondenceTargets:
    """Targets on one layer's token grid (V, h, w).

    idx    [B, N, V, k] long:  target token index *within* key view j (0 .. h*w-1), for query
                               token n (global view-major id, N = V*h*w).
    weight [B, N, V, k] float: weights of those tokens (one-hot: k = 1, weight 1; soft: sums to 1
                               over k for valid entries).
    valid  [B, N, V]    bool:  the pair (query n, key view j) is supervised. Always False when j is
                               the query's own view.
    """

    idx: torch.Tensor
    weight: torch.Tensor
    valid: torch.Tensor
    grid: tuple[int, int, int]  # (V, h, w)

    def __post_init__(self) -> None:
        num_views, h, w = self.grid
        B, N, V, k = self.idx.shape
        if N != num_views * h * w or V != num_views:
            raise ValueError(f"targets of shape {tuple(self.idx.shape)} do not match grid {self.grid}")
        if self.weight.shape != self.idx.shape or self.valid.shape != (B, N, V):
            raise ValueError(
                f"weight {tuple(self.weight.shape)} / valid {tuple(self.valid.shape)} "
                f"inconsistent with idx {tuple(self.idx.shape)}"
            )

    @property
    def num_views(self) -> int:
        return self.grid[0]

    def to(self, device) -> "CorrespondenceTargets":
        return CorrespondenceTargets(
            self.idx.to(device), self.weight.to(device), self.valid.to(device), self.grid
        )
