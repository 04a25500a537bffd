"""Correspondence sources against analytic scenes and naive reference implementations.

Every expected target here is derived independently of `cameo_bench.geometry`: from closed-form
disparities (f b / Z), homographies, per-pixel Python loops or hand-built fundamental matrices.
"""
from __future__ import annotations

import math
from collections import Counter

import cv2
import numpy as np
import pytest
import torch

from cameo_bench.correspondence import compute_targets, get_source, list_sources, register_source
from cameo_bench.correspondence.controls import shuffle_targets
from cameo_bench.correspondence.matches import detect, verified_matches
from cameo_bench.correspondence.pointmap import token_points

SOURCES = ["depth", "pointmap_nn", "noisy_depth", "matches", "epipolar", "shuffled", "none", "sfm_tracks"]
WITH_COST = {"depth", "pointmap_nn", "noisy_depth", "shuffled", "sfm_tracks"}  # sources with a match distance


# ----------------------------------------------------------------------------- scene builders
def intrinsics(f: float, size: int) -> torch.Tensor:
    c = (size - 1) / 2
    return torch.tensor([[f, 0.0, c], [0.0, f, c], [0.0, 0.0, 1.0]], dtype=torch.float64)


def pose(R=None, t=(0.0, 0.0, 0.0)) -> torch.Tensor:
    T = torch.eye(4, dtype=torch.float64)
    if R is not None:
        T[:3, :3] = torch.as_tensor(R, dtype=torch.float64)
    T[:3, 3] = torch.tensor(t, dtype=torch.float64)
    return T


def rot_y(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])


def rot_x(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


def slab_scene(size: int, f: float, xs: list[float], Z_b: float, occluder=None) -> dict:
    """Cameras at (x, 0, 0) looking down +z at a background plane z = Z_b, optionally with a
    fronto-parallel rectangle occluder = (Z_o, x0, x1, y0, y1). Depth is ray-cast per pixel."""
    V = len(xs)
    K = intrinsics(f, size)
    c = (size - 1) / 2
    depth = np.full((V, size, size), Z_b)
    if occluder is not None:
        Z_o, x0, x1, y0, y1 = occluder
        for v, tx in enumerate(xs):
            for r in range(size):
                for col in range(size):
                    x = (col - c) * Z_o / f + tx
                    y = (r - c) * Z_o / f
                    if x0 <= x <= x1 and y0 <= y <= y1:
                        depth[v, r, col] = Z_o
    return {
        "image": torch.rand(1, V, 3, size, size, dtype=torch.float64),
        "depth": torch.from_numpy(depth)[None],
        "intrinsics": K.expand(1, V, 3, 3).clone(),
        "cam2world": torch.stack([pose(t=(tx, 0.0, 0.0)) for tx in xs])[None],
    }


def with_slab_tracks(batch: dict, num_points: int = 40, seed: int = 0) -> dict:
    """Add SfM-style tracks to a slab scene: random background points, observed in a view where
    they project inside it and the view's depth map shows the background there (not occluded)."""
    rng = np.random.default_rng(seed)
    depth = batch["depth"][0].numpy()
    K = batch["intrinsics"][0, 0].numpy()
    xs = batch["cam2world"][0, :, 0, 3].numpy()
    V, H, W = depth.shape
    Z = depth.max()
    X = np.stack([rng.uniform(-1.5, 2.5, num_points), rng.uniform(-1.5, 1.5, num_points), np.full(num_points, Z)], 1)
    ids, uvs = [], []
    for v in range(V):
        u = K[0, 0] * (X[:, 0] - xs[v]) / Z + K[0, 2]
        w = K[1, 1] * X[:, 1] / Z + K[1, 2]
        col, row = np.floor(u + 0.5).astype(int), np.floor(w + 0.5).astype(int)
        ok = (col >= 0) & (col < W) & (row >= 0) & (row < H)
        ok[ok] &= depth[v, row[ok], col[ok]] == Z
        ids.append(np.nonzero(ok)[0])
        uvs.append(np.stack([u, w], 1)[ok])
    M = max(len(i) for i in ids)
    track_ids = torch.full((1, V, M), -1, dtype=torch.long)
    track_uv = torch.zeros(1, V, M, 2, dtype=torch.float64)
    for v in range(V):
        track_ids[0, v, :len(ids[v])] = torch.from_numpy(ids[v])
        track_uv[0, v, :len(ids[v])] = torch.from_numpy(uvs[v])
    return {**batch, "track_ids": track_ids, "track_uv": track_uv}


def brute_force_slab(batch: dict, stride: int, mode: str, k: int = 4, min_visible: float = 0.5):
    """Per-pixel loop: lateral cameras, so a point at depth Z moves by f (x_i - x_j) / Z pixels and a
    landing is visible iff view j sees the same depth there. Returns {(i, q, j): (tokens, weights)}."""
    depth = batch["depth"][0].numpy()
    f = float(batch["intrinsics"][0, 0, 0, 0])
    xs = batch["cam2world"][0, :, 0, 3].numpy()
    V, H, W = depth.shape
    h, w = H // stride, W // stride
    out = {}
    for i in range(V):
        for j in range(V):
            if i == j:
                continue
            for a in range(h):
                for b in range(w):
                    if mode == "center":
                        pixels = [(a * stride + stride // 2, b * stride + stride // 2)]
                    else:
                        pixels = [(a * stride + y, b * stride + x) for y in range(stride) for x in range(stride)]
                    hits = []
                    for r, col in pixels:
                        Z = depth[i, r, col]
                        u = col + f * (xs[i] - xs[j]) / Z
                        if not (-0.5 <= u < W - 0.5):
                            continue
                        if abs(depth[j, r, int(round(u))] - Z) > 1e-9:
                            continue  # occluded in view j
                        hits.append((r // stride) * w + int(math.floor((u + 0.5) / stride)))
                    if mode == "center":
                        if hits:
                            out[(i, a * w + b, j)] = ([hits[0]], [1.0])
                        continue
                    if len(hits) < min_visible * len(pixels):
                        continue
                    top = sorted(Counter(hits).items(), key=lambda tc: (-tc[1], tc[0]))
                    top = top[: (1 if mode == "argmax" else k)]
                    total = sum(cnt for _, cnt in top)
                    out[(i, a * w + b, j)] = ([t for t, _ in top], [cnt / total for _, cnt in top])
    return out


def as_dict(targets, b: int = 0) -> dict:
    """Targets of sample b as {(i, q, j): (tokens, weights)} with zero-weight slots dropped."""
    V, h, w = targets.grid
    T = h * w
    out = {}
    for n, j in targets.valid[b].nonzero().tolist():
        keep = targets.weight[b, n, j] > 0
        out[(n // T, n % T, j)] = (targets.idx[b, n, j][keep].tolist(), targets.weight[b, n, j][keep].tolist())
    return out


def assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys(), (
        f"validity differs: {len(actual.keys() - expected.keys())} extra, "
        f"{len(expected.keys() - actual.keys())} missing"
    )
    for key, (tokens, weights) in expected.items():
        got_tokens, got_weights = actual[key]
        assert got_tokens == tokens, (key, got_tokens, tokens)
        assert np.allclose(got_weights, weights, atol=1e-6), (key, got_weights, weights)


OCCLUDER_SCENE = dict(size=32, f=32.0, xs=[0.0, 1.0], Z_b=8.0, occluder=(4.0, -0.5, 0.25, -1.0, 0.5))


# ----------------------------------------------------------------------------- registry
def test_registry_lists_every_source_and_rejects_unknown_names():
    assert sorted(SOURCES) == list_sources()
    with pytest.raises(KeyError) as err:
        get_source("dpeth")
    assert "depth" in str(err.value) and "valid sources" in str(err.value)
    with pytest.raises(ValueError, match="already registered"):
        register_source("depth")(lambda batch, grid, stride: None)


def test_missing_batch_keys_and_bad_options_fail_before_computing():
    batch = slab_scene(8, 8.0, [0.0, 1.0], 4.0)
    no_depth = {key: val for key, val in batch.items() if key != "depth"}
    with pytest.raises(KeyError, match="depth"):
        compute_targets("depth", no_depth, (2, 4, 4), 2)
    with pytest.raises(KeyError, match="point_map"):  # the message lists the alternatives
        get_source("pointmap_nn").check({"image": None})
    get_source("pointmap_nn").check({"point_map": None})  # point maps alone are enough
    with pytest.raises(TypeError, match="valid options"):
        compute_targets("depth", batch, (2, 4, 4), 2, tau=1.0)
    with pytest.raises(ValueError, match="does not fit grid"):
        compute_targets("depth", batch, (2, 4, 4), 4)
    with pytest.raises(ValueError, match="mode"):
        compute_targets("depth", batch, (2, 4, 4), 2, mode="hist")
    assert compute_targets("none", batch, (2, 4, 4), 2) is None


@pytest.mark.parametrize("name", [s for s in SOURCES if s != "none"])
def test_every_source_fills_the_sparse_format_and_never_supervises_own_view(name):
    batch = with_slab_tracks(slab_scene(16, 16.0, [0.0, 0.5, 1.0], 4.0, occluder=(2.0, -0.2, 0.3, -1.0, 1.0)))
    targets = compute_targets(name, batch, (3, 8, 8), 2)
    B, N, V, k = targets.idx.shape
    assert (B, N, V) == (1, 3 * 64, 3) and targets.valid.dtype == torch.bool
    own = torch.arange(N) // 64  # query view of each token
    assert not targets.valid[0, torch.arange(N), own].any()
    assert targets.idx.min() >= 0 and targets.idx.max() < 64
    w = targets.weight[targets.valid]
    assert torch.allclose(w.sum(-1), torch.ones(len(w)), atol=1e-5)
    assert (targets.weight[~targets.valid] == 0).all()
    assert (targets.cost is not None) == (name in WITH_COST)
    if targets.cost is not None:  # [B, N, V], inf on the own view, a distance elsewhere
        assert targets.cost.shape == (B, N, V) and torch.isinf(targets.cost[0, torch.arange(N), own]).all()
        assert (targets.cost >= 0).all() and torch.isfinite(targets.cost[targets.valid]).mean(dtype=float) > 0.9


# ----------------------------------------------------------------------------- depth
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stride", [2, 4])
@pytest.mark.parametrize("mode", ["center", "argmax", "soft"])
def test_depth_one_stride_translation_hits_the_neighbour_token(stride, mode, dtype):
    """f b / Z = s: every token moves by exactly one token per unit of camera offset."""
    size, f, Z = 16, 16.0, 4.0
    b = stride * Z / f
    batch = {key: val.to(dtype) for key, val in slab_scene(size, f, [0.0, b, 2 * b], Z).items()}
    h = w = size // stride
    targets = compute_targets("depth", batch, (3, h, w), stride, mode=mode)
    expected = {}
    for i in range(3):
        for j in range(3):
            for q in range(h * w) if i != j else []:
                col = q % w - (j - i)
                if 0 <= col < w:
                    expected[(i, q, j)] = ([q - q % w + col], [1.0])
    assert_same(as_dict(targets), expected)


def test_depth_half_token_shift_splits_the_histogram_and_applies_min_visible():
    """Shift of s/2 = 2 px: each patch lands half in token c-1 and half in token c; the border
    token keeps exactly 50 % of its pixels in view, which is valid at min_visible 0.5 only."""
    batch = slab_scene(16, 16.0, [0.0, 0.5], 4.0)  # 16 * 0.5 / 4 = 2 px
    w = 4
    soft = as_dict(compute_targets("depth", batch, (2, 4, 4), 4, mode="soft", k=3))
    for q in range(16):
        c = q % w
        if c == 0:  # pixels 0..3 -> -2..1: half out of view, the rest in token 0
            assert soft[(0, q, 1)] == ([q], [1.0])
        else:
            assert soft[(0, q, 1)][0] == [q - 1, q] and np.allclose(soft[(0, q, 1)][1], [0.5, 0.5])
    strict = compute_targets("depth", batch, (2, 4, 4), 4, mode="soft", min_visible=0.6)
    assert not strict.valid[0, [0, 4, 8, 12], 1].any() and strict.valid[0, [1, 5], 1].all()
    centre = as_dict(compute_targets("depth", batch, (2, 4, 4), 4, mode="center"))
    assert all(centre[(0, q, 1)] == ([q], [1.0]) for q in range(16))  # centre pixel 4c+2 -> 4c
    argmax = as_dict(compute_targets("depth", batch, (2, 4, 4), 4, mode="argmax"))
    assert all(argmax[(0, q, 1)][0] == [q - 1] for q in range(16) if q % w)  # tie -> lower id


@pytest.mark.parametrize("mode", ["center", "argmax", "soft"])
def test_depth_occluder_matches_brute_force_loop(mode):
    batch = slab_scene(**OCCLUDER_SCENE)
    targets = compute_targets("depth", batch, (2, 8, 8), 4, mode=mode, k=4)
    expected = brute_force_slab(batch, 4, mode, k=4)
    assert_same(as_dict(targets), expected)
    # The scene does hide something: background tokens next to the occluder lose their target.
    visible_without_occluder = brute_force_slab(slab_scene(**{**OCCLUDER_SCENE, "occluder": None}), 4, mode)
    assert len(expected) < len(visible_without_occluder)


def slab_point(batch: dict, view: int, row: int, col: int) -> np.ndarray:
    """World point of a pixel of the slab scene: lateral camera at x, depth ray-cast per pixel."""
    Z = float(batch["depth"][0, view, row, col])
    f = float(batch["intrinsics"][0, 0, 0, 0])
    c = float(batch["intrinsics"][0, 0, 0, 2])
    x = float(batch["cam2world"][0, view, 0, 3])
    return np.array([(col - c) * Z / f + x, (row - c) * Z / f, Z])


@pytest.mark.parametrize("mode", ["center", "soft"])
def test_depth_cost_is_the_distance_between_the_token_centres_points(mode):
    """cost = || X(query centre pixel in view i) - X(heaviest target token's centre pixel in
    view j) ||, each lifted with its own view's depth; inf on invalid pairs and the own view.
    Sub-token shifts (2.8 px background, 5.6 px occluder at stride 4) make the distances nonzero;
    which pairs are valid and which token they target is tested above."""
    batch = slab_scene(32, 32.0, [0.0, 0.7], 8.0, occluder=(4.0, -0.5, 0.25, -1.0, 0.5))
    stride, w, centre = 4, 8, 2
    targets = compute_targets("depth", batch, (2, 8, 8), stride, mode=mode, k=4)
    expected = torch.full((2 * 64, 2), float("inf"), dtype=torch.float64)
    for (i, q, j), (tokens, weights) in as_dict(targets).items():
        (a, b), (ta, tb) = divmod(q, w), divmod(tokens[int(np.argmax(weights))], w)
        X_q = slab_point(batch, i, a * stride + centre, b * stride + centre)
        X_t = slab_point(batch, j, ta * stride + centre, tb * stride + centre)
        expected[i * 64 + q, j] = float(np.linalg.norm(X_q - X_t))
    finite = torch.isfinite(expected)
    assert finite.sum() > 50 and (expected[finite] > 0.1).float().mean() > 0.5
    torch.testing.assert_close(targets.cost[0], expected, atol=1e-9, rtol=1e-9)


def test_depth_occluder_hides_exactly_the_hidden_tokens():
    """Background columns 8..11 of view 0 land on the occluder (columns 4..9, rows 8..19) in view 1."""
    batch = slab_scene(**OCCLUDER_SCENE)
    targets = compute_targets("depth", batch, (2, 32, 32), 1, mode="center")
    valid = targets.valid[0, :1024, 1].reshape(32, 32)
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[:, 4:] = True  # columns 0..3 leave the image (shift 4 px)
    expected[8:20, 12:18] = True  # the occluder itself (shift 8 px) lands at columns 4..9
    expected[8:20, 8:12] = False  # background hidden behind the occluder in view 1
    assert torch.equal(valid, expected)


def test_depth_pure_rotation_follows_the_homography():
    """A rotating camera maps pixels by K R_ji K^-1, whatever the depth; soft targets are compared
    with a per-pixel histogram of the homography."""
    size, f, Z, stride = 16, 14.0, 3.0, 2
    R1 = rot_y(8.0) @ rot_x(5.0)
    K = intrinsics(f, size).numpy()
    c = (size - 1) / 2
    vv, uu = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    rays = np.stack([(uu - c) / f, (vv - c) / f, np.ones_like(uu, dtype=float)], -1)
    depth1 = Z / (rays @ R1.T)[..., 2]  # plane z = Z of camera 0, seen by the rotated camera
    batch = {
        "depth": torch.from_numpy(np.stack([np.full((size, size), Z), depth1]))[None],
        "intrinsics": torch.from_numpy(np.stack([K, K]))[None],
        "cam2world": torch.stack([pose(), pose(R1)])[None],
    }
    h = w = size // stride
    Hs = {(0, 1): K @ R1.T @ np.linalg.inv(K), (1, 0): K @ R1 @ np.linalg.inv(K)}
    for mode in ("center", "soft"):
        targets = as_dict(compute_targets("depth", batch, (2, h, w), stride, mode=mode, k=4))
        for (i, j), Hm in Hs.items():
            for q in range(h * w):
                a, b = divmod(q, w)
                if mode == "center":
                    pix = [(b * stride + stride // 2, a * stride + stride // 2)]
                else:
                    pix = [(b * stride + x, a * stride + y) for y in range(stride) for x in range(stride)]
                hits = []
                for u, v in pix:
                    p = Hm @ np.array([u, v, 1.0])
                    u2, v2 = p[0] / p[2], p[1] / p[2]
                    if -0.5 <= u2 < size - 0.5 and -0.5 <= v2 < size - 0.5:
                        hits.append(int((v2 + 0.5) // stride) * w + int((u2 + 0.5) // stride))
                if mode == "center":
                    expected = ([hits[0]], [1.0]) if hits else None
                elif len(hits) >= 0.5 * len(pix):
                    top = sorted(Counter(hits).items(), key=lambda tc: (-tc[1], tc[0]))[:4]
                    expected = ([t for t, _ in top], [n / sum(n for _, n in top) for _, n in top])
                else:
                    expected = None
                assert ((i, q, j) in targets) == (expected is not None), (mode, i, q, j)
                if expected is not None:
                    assert targets[(i, q, j)][0] == expected[0], (mode, i, q)
                    assert np.allclose(targets[(i, q, j)][1], expected[1])


# ----------------------------------------------------------------------------- pointmap_nn
def naive_pointmap_nn(points: np.ndarray, tau: float, cycle: bool) -> dict:
    """Nested loops over (b, i, q, j): nearest token of view j in 3D, back to view i, tau check."""
    B, V, T, _ = points.shape
    w = int(math.isqrt(T))
    out = {}
    for i in range(V):
        for j in range(V):
            if i == j:
                continue
            for q in range(T):
                d = np.linalg.norm(points[0, j] - points[0, i, q], axis=-1)
                t = int(np.argmin(d))
                back = int(np.argmin(np.linalg.norm(points[0, i] - points[0, j, t], axis=-1)))
                if cycle and math.hypot(back % w - q % w, back // w - q // w) >= tau:
                    continue
                out[(i, q, j)] = ([t], [1.0])
    return out


@pytest.mark.parametrize("tau,cycle", [(1.5, True), (3.0, True), (1.5, False)])
def test_pointmap_nn_equals_naive_loops(tau, cycle):
    """Stride 1 makes the CAMEO resize the identity, so the NN search itself is compared."""
    g = torch.Generator().manual_seed(3)
    base = torch.rand(1, 1, 3, 6, 6, generator=g, dtype=torch.float64)
    points = base + 0.15 * torch.randn(1, 3, 3, 6, 6, generator=g, dtype=torch.float64)  # 3 noisy views
    targets = compute_targets("pointmap_nn", {"point_map": points}, (3, 6, 6), 1, tau=tau, cycle=cycle)
    flat = points.permute(0, 1, 3, 4, 2).reshape(1, 3, 36, 3).numpy()
    expected = naive_pointmap_nn(flat, tau, cycle)
    assert_same(as_dict(targets), expected)
    # cost: the nearest 3D distance in every other view, cycle check or not; inf on the own view
    want = np.full((3 * 36, 3), np.inf)
    for i in range(3):
        for t in range(36):
            for j in set(range(3)) - {i}:
                want[i * 36 + t, j] = np.linalg.norm(flat[0, j] - flat[0, i, t], axis=-1).min()
    np.testing.assert_allclose(targets.cost[0].numpy(), want, rtol=1e-9, atol=1e-9)  # cdist: ||a||^2 + ||b||^2 - 2ab


def test_pointmap_nn_on_a_plane_and_what_the_cycle_check_keeps():
    """One-stride translation: token c of view 0 is token c-1 of view 1. Column 0 has no partner;
    its nearest point is column 0 of view 1, whose nearest is column 1 of view 0: one token away,
    so tau 1.5 keeps the wrong pair (the known false keep) while tau 0.5 and the 3D gate drop it."""
    size, f, Z, stride = 16, 16.0, 4.0, 2
    batch = slab_scene(size, f, [0.0, stride * Z / f], Z)
    h = w = size // stride
    for options, keep_border in (({}, True), ({"tau": 0.5}, False), ({"gate": 0.5}, False)):
        targets = as_dict(compute_targets("pointmap_nn", batch, (2, h, w), stride, **options))
        for q in range(h * w):
            c = q % w
            if c >= 1:
                assert targets[(0, q, 1)] == ([q - 1], [1.0])
            else:
                assert ((0, q, 1) in targets) == keep_border
                if keep_border:
                    assert targets[(0, q, 1)] == ([q], [1.0])


def test_pointmap_resize_samples_token_centres_and_tracks_invalid_pixels():
    """CAMEO's bilinear resize: an affine map takes its value at the token centre (b + 1/2) s - 1/2;
    at s = 4 that mixes pixels 4b+1 and 4b+2 only, so a hole at pixel 4b leaves the token valid."""
    size, s = 16, 4
    axis = torch.arange(size, dtype=torch.float64)
    v, u = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([u, v, 2 * u + 3 * v])[None, None]  # [1, 1, 3, H, W]
    valid = torch.ones(1, 1, size, size, dtype=torch.bool)
    valid[0, 0, 0, 4] = False  # token (0, 1): corner pixel, weight 0
    valid[0, 0, 5, 9] = False  # token (1, 2): a centre pixel
    X, ok = token_points(points, valid, 4, 4)
    a, b = torch.meshgrid(torch.arange(4.0, dtype=torch.float64), torch.arange(4.0, dtype=torch.float64), indexing="ij")
    cu, cv = (b + 0.5) * s - 0.5, (a + 0.5) * s - 0.5
    expected = torch.stack([cu, cv, 2 * cu + 3 * cv], -1).reshape(16, 3)
    good = torch.ones(16, dtype=torch.bool)
    good[1 * 4 + 2] = False
    assert torch.equal(ok[0, 0], good)
    assert torch.allclose(X[0, 0][good], expected[good])


def test_pointmap_nn_cycle_drops_a_constructed_inconsistent_point():
    """Tokens sit 100 units apart and both views agree, except: q's partner in view 1 is moved
    away, k0 of view 1 is put 1 unit from q (so it becomes q's nearest), and q2 of view 0 is put
    0.5 unit from k0 (so the way back lands on q2, two rows away). Cycle check: drop q."""
    T, q, k0, q2 = 16, 5, 9, 14
    grid_pts = torch.tensor([[100.0 * (t % 4), 100.0 * (t // 4), 0.0] for t in range(T)], dtype=torch.float64)
    view0, view1 = grid_pts.clone(), grid_pts.clone()
    e = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    view1[q] = torch.tensor([1000.0, 1000.0, 0.0], dtype=torch.float64)
    view1[k0] = view0[q] + e
    view0[q2] = view0[q] + 1.5 * e
    view1[q2] = view0[q2]
    pm = torch.stack([view0, view1]).reshape(2, 4, 4, 3).permute(0, 3, 1, 2)[None]  # [1, 2, 3, 4, 4]
    with_cycle = compute_targets("pointmap_nn", {"point_map": pm}, (2, 4, 4), 1)
    without = compute_targets("pointmap_nn", {"point_map": pm}, (2, 4, 4), 1, cycle=False)
    assert without.valid[0, q, 1] and without.idx[0, q, 1, 0] == k0
    assert not with_cycle.valid[0, q, 1]
    assert with_cycle.valid[0, [0, 1, 2, 3], 1].all()  # untouched tokens stay
    assert torch.equal(with_cycle.idx[0, [0, 1, 2, 3], 1, 0], torch.tensor([0, 1, 2, 3]))


# ----------------------------------------------------------------------------- noisy depth
@pytest.mark.parametrize("mode", ["center", "soft"])
def test_noisy_depth_at_zero_noise_equals_depth(mode):
    batch = slab_scene(**OCCLUDER_SCENE)
    a = compute_targets("depth", batch, (2, 8, 8), 4, mode=mode)
    b = compute_targets("noisy_depth", batch, (2, 8, 8), 4, mode=mode, noise=0.0, seed=1)
    assert torch.equal(a.valid, b.valid) and torch.equal(a.idx, b.idx) and torch.equal(a.weight, b.weight)
    assert torch.equal(a.cost, b.cost)


def test_noisy_depth_error_grows_with_noise_and_is_seeded():
    batch = slab_scene(32, 32.0, [0.0, 1.0, 2.0], 8.0, occluder=(4.0, -0.5, 0.25, -1.0, 0.5))
    ref = compute_targets("depth", batch, (3, 16, 16), 2)
    errors = []
    for noise in (0.02, 0.3):
        noisy = compute_targets("noisy_depth", batch, (3, 16, 16), 2, noise=noise, seed=0)
        both = ref.valid & noisy.valid
        diff = (noisy.idx[..., 0] - ref.idx[..., 0])[both]
        errors.append((diff != 0).float().mean().item())
    assert errors[0] < errors[1]
    a = compute_targets("noisy_depth", batch, (3, 16, 16), 2, noise=0.1, seed=5)
    b = compute_targets("noisy_depth", batch, (3, 16, 16), 2, noise=0.1, seed=5)
    assert torch.equal(a.idx, b.idx) and torch.equal(a.valid, b.valid)


def test_noisy_depth_tolerance_grows_with_the_noise():
    """Scale error alone (each view's depth off by exp(0.1 n)) breaks a fixed 2 % occlusion test
    for most pixels; the default tolerance 0.02 + 3 * noise keeps them."""
    batch = slab_scene(32, 32.0, [0.0, 1.0, 2.0], 8.0, occluder=(4.0, -0.5, 0.25, -1.0, 0.5))
    ref = compute_targets("depth", batch, (3, 16, 16), 2).valid.sum().item()
    only_scale = dict(noise=0.1, shift=0.0, field=0.0, holes=0.0, rot_deg=0.0, trans=0.0, seed=2)
    grown = compute_targets("noisy_depth", batch, (3, 16, 16), 2, **only_scale).valid
    fixed = compute_targets("noisy_depth", batch, (3, 16, 16), 2, tol_factor=0.0, **only_scale).valid
    assert grown.sum() > 0.8 * ref and fixed.sum() < 0.6 * ref


# ----------------------------------------------------------------------------- controls
def test_shuffled_keeps_the_statistics_but_not_the_geometry():
    batch = slab_scene(32, 32.0, [0.0, 1.0, 2.0], 8.0)
    ref = compute_targets("depth", batch, (3, 16, 16), 2)
    shuf = compute_targets("shuffled", batch, (3, 16, 16), 2, seed=0)
    assert torch.equal(ref.valid, shuf.valid)
    for j in range(3):  # same multiset of targets per key view
        m = ref.valid[0, :, j]
        assert torch.equal(ref.idx[0, m, j, 0].sort().values, shuf.idx[0, m, j, 0].sort().values)
    agree = (ref.idx[..., 0] == shuf.idx[..., 0])[ref.valid].float().mean()
    assert agree < 0.1
    for j in range(3):  # the cost travels with its target: same (target, cost) pairs per key view
        m = ref.valid[0, :, j]
        pairs = lambda t: sorted(zip(t.idx[0, m, j, 0].tolist(), t.cost[0, m, j].tolist()))  # noqa: E731
        assert pairs(ref) == pairs(shuf)
    assert torch.equal(ref.cost[~ref.valid], shuf.cost[~ref.valid])
    again = compute_targets("shuffled", batch, (3, 16, 16), 2, seed=0)
    assert torch.equal(again.idx, shuf.idx)


def test_shuffle_permutes_only_within_sample_and_key_view():
    g = torch.Generator().manual_seed(0)
    B, V, T = 2, 3, 4
    from cameo_bench.correspondence.targets import CorrespondenceTargets

    idx = torch.randint(0, T, (B, V * T, V, 1), generator=g)
    idx += (torch.arange(B)[:, None, None, None] * 100 + torch.arange(V)[None, None, :, None] * 10)  # tag groups
    valid = torch.rand(B, V * T, V, generator=g) > 0.3
    t = CorrespondenceTargets(idx, torch.ones(B, V * T, V, 1), valid, (V, 2, 2))
    s = shuffle_targets(t, seed=1)
    for b in range(B):
        for j in range(V):
            m = valid[b, :, j]
            assert torch.equal(idx[b, m, j].sort(0).values, s.idx[b, m, j].sort(0).values)


# ----------------------------------------------------------------------------- epipolar
def test_epipolar_band_lies_on_the_analytic_line_and_holds_the_true_token():
    size, f, Z, stride = 32, 28.0, 5.0, 2
    R1 = rot_y(-10.0)
    C1 = np.array([0.9, 0.2, 0.1])
    K = intrinsics(f, size).numpy()
    c2w = torch.stack([pose(), pose(R1, C1)])[None]
    batch = {"intrinsics": torch.from_numpy(np.stack([K, K]))[None], "cam2world": c2w}
    h = w = size // stride
    targets = compute_targets("epipolar", batch, (2, h, w), stride)
    # Independent F for view 0 -> view 1: X1 = R X0 + t with R = R1^T, t = -R1^T C1.
    R, t = R1.T, -R1.T @ C1
    tx = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    F = np.linalg.inv(K).T @ tx @ R @ np.linalg.inv(K)
    centre = lambda tok: np.array([(tok % w + 0.5) * stride - 0.5, (tok // w + 0.5) * stride - 0.5, 1.0])  # noqa: E731
    n_true_in_band = n_true = 0
    for (i, q, j), (tokens, weights) in as_dict(targets).items():
        if (i, j) != (0, 1):
            continue
        line = F @ centre(q)
        for tok in tokens:
            assert abs(line @ centre(tok)) / np.hypot(line[0], line[1]) <= 0.75 * stride + 1e-6
        # True correspondence of the query centre on the plane z = Z of view 0.
        X1 = R @ (Z * np.linalg.inv(K) @ centre(q)) + t
        p = K @ X1 / X1[2]
        if -0.5 <= p[0] < size - 0.5 and -0.5 <= p[1] < size - 0.5:
            n_true += 1
            n_true_in_band += int((p[1] + 0.5) // stride) * w + int((p[0] + 0.5) // stride) in tokens
    assert n_true > 100 and n_true_in_band == n_true
    assert get_source("epipolar").soft_only


def test_epipolar_sideways_translation_gives_the_row_to_the_left():
    """Camera j moved right: a point at depth d lands f b / d pixels to the left, d in (0, inf), so
    the band is the query's own row from its column leftwards."""
    batch = slab_scene(16, 16.0, [0.0, 1.0], 4.0)
    targets = as_dict(compute_targets("epipolar", batch, (2, 8, 8), 2))
    for q in range(64):
        tokens, weights = targets[(0, q, 1)]
        assert sorted(tokens) == list(range(q - q % 8, q + 1))
        assert np.allclose(weights, 1 / len(tokens))


# ----------------------------------------------------------------------------- matches
def textured_pair(size: int = 128, angle: float = 10.0):
    """A non-repetitive texture on the plane z = Z seen by camera 0 and by a camera rotated by
    `angle` about the plane centre; view 1 is rendered with the plane homography."""
    rng = np.random.default_rng(0)
    big = 3 * size
    tex = sum(cv2.GaussianBlur(rng.random((big, big)), (0, 0), s) * s for s in (1.0, 2.0, 4.0))
    tex = ((tex - tex.min()) / (tex.max() - tex.min()) * 255).astype(np.uint8)
    f, Z = 1.2 * size, 4.0
    K = intrinsics(f, size).numpy()
    R1 = rot_y(angle)
    C1 = np.array([0.0, 0.0, Z]) - R1 @ np.array([0.0, 0.0, Z])  # orbit around the plane centre
    R, t = R1.T, -R1.T @ C1  # camera 0 -> camera 1
    H01 = K @ (R + np.outer(t, [0, 0, 1]) / Z) @ np.linalg.inv(K)
    crop = np.array([[1, 0, -size], [0, 1, -size], [0, 0, 1]], dtype=float)  # texture -> view 0
    img0 = cv2.warpPerspective(tex, crop, (size, size), flags=cv2.INTER_LINEAR)
    img1 = cv2.warpPerspective(tex, H01 @ crop, (size, size), flags=cv2.INTER_LINEAR)
    return img0, img1, H01, K, R1, C1


def apply_h(Hm: np.ndarray, pts: np.ndarray) -> np.ndarray:
    p = np.concatenate([pts, np.ones((len(pts), 1))], 1) @ Hm.T
    return p[:, :2] / p[:, 2:]


def test_sift_matches_are_accurate_on_a_textured_10_degree_pair():
    img0, img1, H01, *_ = textured_pair()
    pa, pb, _ = verified_matches(detect(img0), detect(img1))
    assert len(pa) >= 20
    err = np.linalg.norm(apply_h(H01, pa) - pb, axis=1)
    assert np.median(err) < 1.5


def test_matches_targets_are_sparse_and_within_one_token_of_the_truth():
    img0, img1, H01, K, R1, C1 = textured_pair()
    size, stride = 128, 8
    w = size // stride
    image = torch.from_numpy(np.stack([img0, img1]).astype(np.float32) / 255)[None, :, None].expand(1, 2, 3, size, size)
    batch = {"image": image, "intrinsics": torch.from_numpy(np.stack([K, K]))[None],
             "cam2world": torch.stack([pose(), pose(R1, C1)])[None]}
    for options in ({}, {"max_sampson": 1.0, "ransac": False}):
        targets = compute_targets("matches", batch, (2, w, w), stride, **options)
        for i, j, Hm in ((0, 1, H01), (1, 0, np.linalg.inv(H01))):
            q = targets.valid[0, i * w * w : (i + 1) * w * w, j].nonzero().squeeze(1).numpy()
            assert 10 <= len(q) < w * w  # rich texture at 128 px: many, but not all, tokens
            centres = np.stack([(q % w + 0.5) * stride - 0.5, (q // w + 0.5) * stride - 0.5], 1)
            truth = apply_h(Hm, centres)
            got = targets.idx[0, i * w * w + q, j, 0].numpy()
            cheb = np.maximum(abs(got % w - np.floor((truth[:, 0] + 0.5) / stride)),
                              abs(got // w - np.floor((truth[:, 1] + 0.5) / stride)))
            assert (cheb <= 1).mean() > 0.9, (options, i, j, (cheb <= 1).mean())


def naive_segment_distance(p, a, b) -> float:
    d = b - a
    t = 0.0 if not d.any() else np.clip((p - a) @ d / (d @ d), 0, 1)
    return float(np.linalg.norm(p - a - t * d))


@pytest.mark.parametrize("k", [3, 40])
def test_epipolar_band_tokens_equal_a_naive_selection(k):
    """Every token centre within the band when they fit in k slots, else the k nearest; checked
    against a loop over all tokens for random, degenerate, axis-aligned and off-grid segments."""
    from cameo_bench.correspondence.epipolar import band_tokens

    g = torch.Generator().manual_seed(0)
    h, w, band = 6, 7, 0.75
    q0 = torch.rand(2, 8, 2, generator=g, dtype=torch.float64) * 10 - 2
    q1 = torch.rand(2, 8, 2, generator=g, dtype=torch.float64) * 10 - 2
    q1[0, 0] = q0[0, 0]  # a point (pure rotation)
    q1[0, 1, 1] = q0[0, 1, 1] = 2.0  # horizontal, exactly on a row of centres
    q1[0, 2, 0] = q0[0, 2, 0] = 3.25  # vertical
    q0[0, 3], q1[0, 3] = torch.tensor([-5.0, -5.0]), torch.tensor([-4.0, -9.0])  # off the grid
    idx, dist, filled = band_tokens(q0, q1, band, k, h, w)
    for m in range(2):
        for q in range(8):
            a, b = q0[m, q].numpy(), q1[m, q].numpy()
            d = {r * w + c: naive_segment_distance(np.array([c, r], float), a, b) for r in range(h) for c in range(w)}
            inside = [t for t, v in d.items() if v <= band]
            expected = inside if len(inside) <= k else sorted(d, key=d.get)[:k]
            got = idx[m, q][filled[m, q]].tolist()
            assert sorted(got) == sorted(expected), (m, q)
            assert np.allclose(dist[m, q][filled[m, q]].numpy(), [d[t] for t in got])


def test_segment_distance_grid_equals_point_to_segment_loops():
    from cameo_bench.correspondence.epipolar import segment_distance_grid

    g = torch.Generator().manual_seed(0)
    q0 = torch.rand(2, 6, 2, generator=g) * 8 - 1
    q1 = torch.rand(2, 6, 2, generator=g) * 8 - 1
    q1[0, 0] = q0[0, 0]  # a degenerate segment (pure rotation: a single point)
    h, w = 5, 7
    got = segment_distance_grid(q0, q1, h, w)
    for m in range(2):
        for q in range(6):
            a, b = q0[m, q].double().numpy(), q1[m, q].double().numpy()
            for r in range(h):
                for c in range(w):
                    expected = naive_segment_distance(np.array([c, r], dtype=float), a, b)
                    assert abs(got[m, q, r * w + c].item() - expected) < 1e-4


def test_epipolar_gaussian_weights_decay_with_line_distance():
    batch = slab_scene(16, 16.0, [0.0, 1.0], 4.0)
    uniform = compute_targets("epipolar", batch, (2, 8, 8), 2, band=1.5)
    gauss = compute_targets("epipolar", batch, (2, 8, 8), 2, band=1.5, weighting="gaussian")
    assert torch.equal(uniform.valid, gauss.valid)
    q = 3 * 8 + 5  # row 3, column 5: the band is rows 2..4, columns <= 5 (+ the end disk)
    tokens, weights = as_dict(gauss)[(0, q, 1)]
    by_token = dict(zip(tokens, weights))
    assert set(tokens) == set(as_dict(uniform)[(0, q, 1)][0])
    assert by_token[3 * 8 + 2] > by_token[2 * 8 + 2]  # on the line beats one row off
    assert np.isclose(by_token[2 * 8 + 2] / by_token[3 * 8 + 2], math.exp(-0.5 * (1 / 0.75) ** 2))


def test_epipolar_depth_range_clips_the_band():
    """Depths in [2, 8] with f b = 16 move a point by 2..8 px = 1..4 tokens to the left."""
    batch = slab_scene(16, 16.0, [0.0, 1.0], 4.0)
    targets = as_dict(compute_targets("epipolar", batch, (2, 8, 8), 2, depth_range=(2.0, 8.0)))
    for q in range(64):
        c = q % 8
        expected = [q - c + col for col in range(max(c - 4, 0), c)]
        assert sorted(targets[(0, q, 1)][0]) == expected if expected else (0, q, 1) not in targets
