"""`sfm_tracks`: exact sparse targets from SfM points observed in both views (COLMAP points3D tracks).

A scene folder with `points3d.npz` + `tracks/<frame>.npz` (the converters write them from
COLMAP's points3D) puts each view's observations in the batch as `track_ids [B, V, M]` (-1 =
padding) and `track_uv [B, V, M, 2]` (pixels of the resized view, `data/tracks.py`). For a query
view i and key view j every point id observed in both gives a match: the query token containing
its uv in view i and the key token containing its uv in view j. Unlike depth on sparse points
this uses SfM's own visibility (a point is matched only where the view observed it), so an
occluded point never becomes a target. Token targets from the matches, validity and cost:
`correspondence/sparse.py` (modes `center` = the track nearest the token centre, `argmax`,
`soft`; cost 0 on observed pairs, inf elsewhere). Typically a few percent of query tokens are
supervised: SfM keeps ~1k-10k points per image at full resolution.
"""
from __future__ import annotations

import torch

from cameo_bench.correspondence.registry import register_source
from cameo_bench.correspondence.sparse import point_pairs_to_targets
from cameo_bench.correspondence.targets import CorrespondenceTargets

TRACK_KEYS = ("track_ids", "track_uv")


def track_pairs(track_ids: torch.Tensor, track_uv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(b, vi, vj, uv_i, uv_j) of every point id observed in views i != j of sample b.

    track_ids [B, V, M] long (-1 = padding), track_uv [B, V, M, 2]. A point listed twice in one
    view keeps its first observation.
    """
    ids, uv = track_ids.detach().cpu(), track_uv.detach().double().cpu()
    B, V, _ = ids.shape
    out = [], [], [], [], []
    for b in range(B):
        views = []
        for v in range(V):
            present = torch.nonzero(ids[b, v] >= 0).squeeze(1)
            order = torch.sort(ids[b, v, present], stable=True)
            first = torch.ones(len(present), dtype=torch.bool)
            first[1:] = order.values[1:] != order.values[:-1]
            views.append((order.values[first], uv[b, v, present[order.indices[first]]]))  # sorted ids, their uv
        for i in range(V):
            ids_i, uv_i = views[i]
            for j in range(V):
                ids_j, uv_j = views[j]
                if i == j or not len(ids_i) or not len(ids_j):
                    continue
                pos = torch.searchsorted(ids_j, ids_i).clamp(max=len(ids_j) - 1)
                both = ids_j[pos] == ids_i
                n = int(both.sum())
                for lst, val in zip(out, (torch.full((n,), b), torch.full((n,), i), torch.full((n,), j),
                                          uv_i[both], uv_j[pos[both]])):
                    lst.append(val)
    if not out[0]:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty, torch.zeros(0, 2, dtype=torch.float64), torch.zeros(0, 2, dtype=torch.float64)
    return tuple(torch.cat(lst) for lst in out)


@register_source("sfm_tracks", requires=(TRACK_KEYS,))
def sfm_tracks_source(batch, grid, stride, *, mode: str = "center", k: int = 4) -> CorrespondenceTargets:
    """SfM points observed in both views (track ids matched across views): exact, sparse."""
    ids = batch["track_ids"]
    return point_pairs_to_targets(ids.shape[0], grid, stride, *track_pairs(ids, batch["track_uv"]),
                                  mode=mode, k=k, device=ids.device)
