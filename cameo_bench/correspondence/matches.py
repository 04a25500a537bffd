"""`matches`: the source of sparse targets from classical SIFT matches (OpenCV); most queries have none.

What a dataset without depth or point maps can still offer. Per view: SIFT keypoints and
descriptors; per unordered view pair: nearest neighbours both ways, Lowe's ratio test, mutual check,
then optional geometric verification (RANSAC fundamental matrix, and/or a Sampson-distance filter
under the known poses). A query token is supervised in view j iff it holds a surviving keypoint;
with several, the match with the smallest descriptor distance wins. Both directions (i -> j and
j -> i) come from the same match set, so the targets are symmetric.
Measured on repetitive procedural textures (notes/data.md 2c): few matches at 64 px and a collapse
beyond ~30 degrees; meaningful on larger, non-repetitive images.
The loop over pairs is in Python because OpenCV is per image; cost is ~ms per pair.
Resolution: SIFT needs pixels. On the 32-64 px model input few keypoints survive, so when the batch
has a `match_image` (the same crop at a larger size: gin `data.match_image_size`, e.g. the stored
size) the source detects and matches there (`image_key = "auto"`, the default) and maps keypoints
to model pixels, u = (u_match + 1/2) W / W_match - 1/2 per axis; `ransac_threshold` and
`max_sampson` are then in match-image pixels.
The targets carry no `cost` (no 3D distance without depth): `onehot_global` falls back to the
first valid key view.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from cameo_bench.correspondence.registry import batch_key, register_source
from cameo_bench.correspondence.targets import CorrespondenceTargets
from cameo_bench.correspondence.tokens import assemble, view_pairs

IMAGE_KEYS = ("auto", "image", "match_image")
from cameo_bench.geometry import relative_pose


def _gray_uint8(image: torch.Tensor) -> np.ndarray:  # [B, V, 3, H, W] in [0, 1] -> [B, V, H, W]
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32)
    gray = torch.einsum("bvchw,c->bvhw", image.detach().float().cpu(), weights)
    return (gray.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def fundamental_from_poses(K_i, c2w_i, K_j, c2w_j) -> np.ndarray:
    """F with p_j^T F p_i = 0 (pixels, integer-centre convention): K_j^-T [t]x R K_i^-1."""
    T = relative_pose(c2w_i, c2w_j).double().cpu().numpy()
    R, t = T[:3, :3], T[:3, 3]
    tx = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    Ki_inv = np.linalg.inv(K_i.double().cpu().numpy())
    Kj_inv = np.linalg.inv(K_j.double().cpu().numpy())
    return Kj_inv.T @ tx @ R @ Ki_inv


def sampson_distance(F: np.ndarray, p_i: np.ndarray, p_j: np.ndarray) -> np.ndarray:  # [n] pixels
    x_i = np.concatenate([p_i, np.ones((len(p_i), 1))], axis=1)
    x_j = np.concatenate([p_j, np.ones((len(p_j), 1))], axis=1)
    Fx = x_i @ F.T  # rows: F x_i
    Ftx = x_j @ F  # rows: F^T x_j
    num = np.einsum("nc,nc->n", x_j, Fx) ** 2
    den = Fx[:, 0] ** 2 + Fx[:, 1] ** 2 + Ftx[:, 0] ** 2 + Ftx[:, 1] ** 2
    return np.sqrt(num / np.maximum(den, 1e-24))


def match_pair(
    desc_a: np.ndarray, desc_b: np.ndarray, ratio: float, mutual: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index in a, index in b, descriptor distance) of the matches that pass the tests."""
    empty = (np.zeros(0, int), np.zeros(0, int), np.zeros(0))
    if desc_a is None or desc_b is None or len(desc_a) < 1 or len(desc_b) < 2:
        return empty
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    ia, ib, dist = [], [], []
    for pair in matcher.knnMatch(desc_a, desc_b, k=2):
        if len(pair) == 2 and pair[0].distance < ratio * pair[1].distance:
            ia.append(pair[0].queryIdx)
            ib.append(pair[0].trainIdx)
            dist.append(pair[0].distance)
    if not ia:
        return empty
    ia, ib, dist = np.array(ia), np.array(ib), np.array(dist)
    if mutual:
        back = np.array([m[0].trainIdx if m else -1 for m in matcher.knnMatch(desc_b, desc_a, k=1)])
        keep = back[ib] == ia
        ia, ib, dist = ia[keep], ib[keep], dist[keep]
    return ia, ib, dist


def _tokens_np(pts: np.ndarray, stride: int, h: int, w: int) -> np.ndarray:
    """numpy twin of tokens.pixel_to_token for OpenCV keypoints [n, 2] (same pixel convention)."""
    col = np.clip(np.floor((pts[:, 0] + 0.5) / stride), 0, w - 1)
    row = np.clip(np.floor((pts[:, 1] + 0.5) / stride), 0, h - 1)
    return (row * w + col).astype(np.int64)


def _to_model(pts: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Match-image pixels [n, 2] -> model-image pixels (pixel-centre convention, per axis)."""
    return np.stack([(pts[:, 0] + 0.5) / sx - 0.5, (pts[:, 1] + 0.5) / sy - 0.5], axis=1) if len(pts) else pts


def _fill(idx, valid, best, pts_q, pts_k, dist, stride, h, w) -> None:
    """Write one direction's matches into one pair's arrays [T]; the smallest descriptor distance
    wins when a query token holds several keypoints."""
    for q, t, d in zip(_tokens_np(pts_q, stride, h, w), _tokens_np(pts_k, stride, h, w), dist):
        if d < best[q]:
            best[q], idx[q], valid[q] = d, t, True


def detect(gray: np.ndarray, contrast_threshold: float = 0.02, max_keypoints: int = 0):
    """SIFT keypoint positions [n, 2] (pixels, integer-centre convention) and descriptors [n, 128]."""
    sift = cv2.SIFT_create(nfeatures=max_keypoints, contrastThreshold=contrast_threshold)
    keypoints, desc = sift.detectAndCompute(gray, None)
    return np.array([kp.pt for kp in keypoints], dtype=np.float64).reshape(-1, 2), desc


def verified_matches(
    feat_a, feat_b, *, ratio: float = 0.8, mutual: bool = True, ransac: bool = True,
    ransac_threshold: float = 1.0, F_ab: np.ndarray | None = None, max_sampson: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Matched pixel positions (p_a [m, 2], p_b [m, 2]) and descriptor distances [m] after the
    ratio/mutual tests, RANSAC on a fundamental matrix (needs >= 8 matches) and, when F_ab (with
    p_b^T F_ab p_a = 0) is given, the Sampson filter."""
    (pts_a, desc_a), (pts_b, desc_b) = feat_a, feat_b
    ia, ib, dist = match_pair(desc_a, desc_b, ratio, mutual)
    pa, pb = pts_a[ia], pts_b[ib]
    if ransac and len(pa) >= 8:
        F, mask = cv2.findFundamentalMat(pa, pb, cv2.FM_RANSAC, ransac_threshold, 0.999)
        if F is not None and mask is not None:
            keep = mask.ravel().astype(bool)
            pa, pb, dist = pa[keep], pb[keep], dist[keep]
    if F_ab is not None and max_sampson is not None and len(pa):
        keep = sampson_distance(F_ab, pa, pb) < max_sampson
        pa, pb, dist = pa[keep], pb[keep], dist[keep]
    return pa, pb, dist


@register_source("matches", requires=(("image",),))
def matches_source(
    batch,
    grid,
    stride,
    *,
    ratio: float = 0.8,
    mutual: bool = True,
    ransac: bool = True,
    ransac_threshold: float = 1.0,
    max_sampson: float | None = None,
    contrast_threshold: float = 0.02,
    max_keypoints: int = 0,
    seed: int = 0,
    image_key: str = "auto",
) -> CorrespondenceTargets:
    """SIFT (OpenCV) + ratio test + mutual check + optional RANSAC F / Sampson filter; sparse.

    `max_sampson` (pixels) filters with the fundamental matrix of the known poses (needs
    intrinsics and cam2world); on repetitive textures it cannot reject matches that slide along the
    epipolar line. `seed` seeds OpenCV's RANSAC so that the targets are reproducible.
    `image_key`: where SIFT runs: `auto` = `match_image` when the batch has it, else `image`.
    """
    V, h, w = grid
    image = batch["image"]
    B = image.shape[0]
    key = batch_key(batch, "image_key", image_key, IMAGE_KEYS, preferred="match_image", fallback="image",
                    source="matches", hint=" (gin data.match_image_size)")
    if max_sampson is not None and not {"intrinsics", "cam2world"} <= set(batch):
        raise KeyError("matches with max_sampson needs batch keys ['intrinsics', 'cam2world']")
    source = batch[key]
    H, W = image.shape[-2:]
    sy, sx = source.shape[-2] / H, source.shape[-1] / W  # match-image pixels per model pixel
    to_source = np.array([[sx, 0, 0.5 * (sx - 1)], [0, sy, 0.5 * (sy - 1)], [0, 0, 1.0]])  # model -> source px
    gray = _gray_uint8(source)
    features = [[detect(gray[b, v], contrast_threshold, max_keypoints) for v in range(V)] for b in range(B)]

    vi, vj = view_pairs(V)
    pair_of = {(int(i), int(j)): p for p, (i, j) in enumerate(zip(vi, vj))}
    T = h * w
    idx = np.zeros((B, len(pair_of), T), dtype=np.int64)
    valid = np.zeros((B, len(pair_of), T), dtype=bool)
    best = np.full((B, len(pair_of), T), np.inf)
    cv2.setRNGSeed(seed)
    for b in range(B):
        for a in range(V):
            for c in range(a + 1, V):
                F_ac = None
                if max_sampson is not None:
                    K, c2w = batch["intrinsics"][b], batch["cam2world"][b]
                    if (sx, sy) != (1.0, 1.0):
                        K = torch.as_tensor(to_source, dtype=K.dtype, device=K.device) @ K  # [V, 3, 3] source px
                    F_ac = fundamental_from_poses(K[a], c2w[a], K[c], c2w[c])
                pa, pc, dist = verified_matches(
                    features[b][a], features[b][c], ratio=ratio, mutual=mutual, ransac=ransac,
                    ransac_threshold=ransac_threshold, F_ab=F_ac, max_sampson=max_sampson,
                )
                if (sx, sy) != (1.0, 1.0):
                    pa, pc = _to_model(pa, sx, sy), _to_model(pc, sx, sy)
                p_ac, p_ca = pair_of[(a, c)], pair_of[(c, a)]
                _fill(idx[b, p_ac], valid[b, p_ac], best[b, p_ac], pa, pc, dist, stride, h, w)
                _fill(idx[b, p_ca], valid[b, p_ca], best[b, p_ca], pc, pa, dist, stride, h, w)

    device = image.device
    idx_t = torch.from_numpy(idx)[..., None].to(device)  # [B, P, T, 1]
    valid_t = torch.from_numpy(valid).to(device)  # [B, P, T]
    return assemble(idx_t, valid_t[..., None].float(), valid_t, grid, vi.to(device), vj.to(device))
