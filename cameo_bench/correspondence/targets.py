"""The one format every correspondence source produces and the loss reads: sparse token targets.

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
    cost   [B, N, V]    float or None: 3D distance of query n's best match in key view j (lower is
                               nearer), inf on the query's own view and where view j holds no match.
                               It is what lets the released code's `onehot_global` target pick
                               the one key view holding the nearest point; each source documents
                               what its distance is. It need not be finite exactly where `valid`
                               is (`pointmap_nn` has a nearest point even where the cycle check
                               drops the pair, as in the released code).
    """

    idx: torch.Tensor
    weight: torch.Tensor
    valid: torch.Tensor
    grid: tuple[int, int, int]  # (V, h, w)
    cost: torch.Tensor | None = None

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
        if self.cost is not None and (self.cost.shape != (B, N, V) or not self.cost.is_floating_point()):
            raise ValueError(
                f"cost must be a float tensor of shape (B, N, V) = {(B, N, V)} like valid, "
                f"got {self.cost.dtype} {tuple(self.cost.shape)}"
            )

    @property
    def num_views(self) -> int:
        return self.grid[0]

    def to(self, device) -> "CorrespondenceTargets":
        return CorrespondenceTargets(
            self.idx.to(device), self.weight.to(device), self.valid.to(device), self.grid,
            None if self.cost is None else self.cost.to(device),
        )

    def select(self, rows: slice | torch.Tensor) -> "CorrespondenceTargets":
        """The targets of some samples (`rows` indexes the batch axis), every field included."""
        return CorrespondenceTargets(
            self.idx[rows], self.weight[rows], self.valid[rows], self.grid,
            None if self.cost is None else self.cost[rows],
        )
