"""Sparse SfM tracks of a scene folder as batch keys: observations after resize/crop, and sparse depth.

A scene with `points3d.npz` + `tracks/<frame>.npz` (written by the converters, read and validated
by `scene_format`) says which 3D point each frame observes where. Per loaded view this module
gives what the batch carries (design.md, Conventions; interface D of the wave-2 brief):

    track_ids    [V, M] long   point id of each observation, -1 = padding
    track_uv     [V, M, 2]     its pixel position in the RESIZED view (same map A as K' = A K)
    sparse_depth [V, H, W]     z of the view's observed points projected with K', 0 = no point

Observations that the crop cuts off are dropped. Sparse depth is placed where the 3D point
projects (not where the detector saw it: the two differ by the SfM reprojection error), so that
reprojecting it with the batch's cameras gives back the point; only points the view observes go
in (SfM's visibility), the nearest one where several land on one pixel.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cameo_bench.data.scene_format import SceneCameras, SceneFolderError, read_points3d, read_track

PAD_ID = -1


class ScenePoints:
    """A scene's 3D points sorted by id, for id -> xyz lookups (loaded once per scene)."""

    def __init__(self, cams: SceneCameras):
        self.cams = cams
        ids, xyz = read_points3d(cams.points3d_path)
        order = np.argsort(ids, kind="stable")
        self.ids, self.xyz = ids[order], xyz[order].astype(np.float64)

    def frame(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(point ids [n], uv [n, 2] stored-image pixels, xyz [n, 3]) of frame i, one entry per id."""
        path = self.cams.track_path(i)
        point_ids, uv = read_track(path)
        point_ids, first = np.unique(point_ids, return_index=True)  # a point is observed once per frame
        uv = uv[first]
        pos = np.searchsorted(self.ids, point_ids)
        known = (pos < len(self.ids)) & (self.ids[np.minimum(pos, len(self.ids) - 1)] == point_ids)
        if not known.all():
            raise SceneFolderError(f"{path}: field 'point_ids' has ids not in {self.cams.points3d_path} "
                                   f"(e.g. {point_ids[~known][:5].tolist()})")
        return point_ids, uv, self.xyz[pos]


def view_tracks(
    point_ids: np.ndarray, uv: np.ndarray, xyz: np.ndarray, A: np.ndarray, K: np.ndarray, c2w: np.ndarray,
    out_hw: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One view's observations in the resized image: (ids [n] long, uv [n, 2] float32, sparse depth [H, W]).

    A is the stored -> resized pixel map (K = A K_stored), K and c2w the view's resized camera.
    """
    H, W = out_hw
    uv = uv.astype(np.float64) @ A[:2, :2].T + A[:2, 2]  # [n, 2]
    inside = (uv[:, 0] >= -0.5) & (uv[:, 0] < W - 0.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] < H - 0.5)
    point_ids, uv, xyz = point_ids[inside], uv[inside], xyz[inside]
    depth = np.zeros((H, W), np.float32)
    if len(xyz):
        R, t = c2w[:3, :3], c2w[:3, 3]
        cam = (xyz - t) @ R  # [n, 3] camera frame: R^T (X - t), row-wise
        z = cam[:, 2]
        front = z > 1e-6
        proj = cam[front] @ K.T
        col = np.floor(proj[:, 0] / proj[:, 2] + 0.5).astype(np.int64)
        row = np.floor(proj[:, 1] / proj[:, 2] + 0.5).astype(np.int64)
        ok = (col >= 0) & (col < W) & (row >= 0) & (row < H)
        flat = np.full(H * W, np.inf)
        np.minimum.at(flat, row[ok] * W + col[ok], z[front][ok])  # nearest point per pixel
        depth = np.where(np.isfinite(flat), flat, 0.0).reshape(H, W).astype(np.float32)
    return (torch.from_numpy(point_ids.astype(np.int64)), torch.from_numpy(uv.astype(np.float32)),
            torch.from_numpy(depth))


def pad_views(ids: list[torch.Tensor], uv: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-view ids [n_v] and uv [n_v, 2] -> track_ids [V, M] (-1 padded) and track_uv [V, M, 2]."""
    M = max((len(i) for i in ids), default=0)
    out_ids = torch.full((len(ids), M), PAD_ID, dtype=torch.long)
    out_uv = torch.zeros(len(ids), M, 2)
    for v, (i, u) in enumerate(zip(ids, uv)):
        out_ids[v, :len(i)] = i
        out_uv[v, :len(i)] = u
    return out_ids, out_uv


def has_tracks(cams: SceneCameras) -> bool:
    return bool(getattr(cams, "has_tracks", False)) and Path(cams.points3d_path).is_file()
