"""SfM tracks: into the batch like K, exact sparse token targets, depth on sparse depth, SIFT at
the match-image size, and the run that stops when its CAMEO term has no pair.

Fixtures are written in the scene-folder track layout itself (`points3d.npz`, `tracks/<frame>.npz`,
`"tracks": true` in cameras.json: interface D), from points projected with closed-form pinhole
cameras. Expected token ids are hand-computed (token of pixel u = floor((u + 1/2) / s)) or come
from per-point Python loops; none from the code under test.
"""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch

from backbones import TapResult
from cameo_bench import config
from cameo_bench.correspondence import compute_targets
from cameo_bench.data.batch import collate
from cameo_bench.data.loading import batch_indices
from cameo_bench.data.scene_dataset import SceneFolderDataset
from cameo_bench.data.scene_format import DatasetWriter
from cameo_bench.engine.build import build_run
from cameo_bench.engine.loop import fit
from cameo_bench.engine.step import ZeroPairsError
from cameo_bench.objectives.alignment import CameoLoss
from cameo_bench.tracking.run_log import read_metrics

SMOKE = "gin/experiments/smoke.gin"


# ------------------------------------------------------------------------------------------------
# fixture: a scene folder with tracks, written in the track layout (interface D)


def write_tracks(folder, ids: np.ndarray, xyz: np.ndarray, observations: list[tuple[np.ndarray, np.ndarray]]):
    """points3d.npz (xyz float32 [P, 3], ids int64 [P]), tracks/<frame>.npz (point_ids, uv), flag."""
    cams = json.loads((folder / "cameras.json").read_text())
    np.savez(folder / "points3d.npz", xyz=xyz.astype(np.float32), ids=ids.astype(np.int64))
    (folder / "tracks").mkdir()
    for frame, (point_ids, uv) in zip(cams["frames"], observations):
        np.savez(folder / "tracks" / f"{frame['name']}.npz", point_ids=point_ids.astype(np.int64),
                 uv=uv.astype(np.float32).reshape(-1, 2))
    cams["tracks"] = True
    (folder / "cameras.json").write_text(json.dumps(cams))


def rot_y(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])


def cameras(num_frames: int) -> np.ndarray:
    """Cameras stepping along x and turning a little about y (OpenCV c2w)."""
    c2w = np.stack([np.eye(4)] * num_frames)
    for f in range(num_frames):
        c2w[f, :3, :3] = rot_y(3.0 * f)
        c2w[f, 0, 3] = 0.25 * f
    return c2w


def project(K, c2w, X):  # X [n, 3] -> uv [n, 2], z [n]
    cam = (X - c2w[:3, 3]) @ c2w[:3, :3]
    p = cam @ K.T
    return p[:, :2] / p[:, 2:], cam[:, 2]


def hidden(p: int, f: int) -> bool:
    """Which observations the 'SfM' did not make (occluded / not detected): a fixed pattern."""
    return (p + 2 * f) % 5 == 0


def tracked_scene(root, num_frames=6, H=24, W=32, num_points=150, seed=0, split="train", covisible=True,
                  observed=True):
    K = np.array([[30.0, 0, 15.3], [0, 33.0, 11.8], [0, 0, 1]])
    c2w = cameras(num_frames)
    rng = np.random.default_rng(seed)
    xyz = np.stack([rng.uniform(-1.0, 2.2, num_points), rng.uniform(-0.7, 0.7, num_points),
                    rng.uniform(3.0, 5.0, num_points)], 1)
    ids = np.arange(num_points) * 7 + 3  # ids need not be positions
    observations = []
    for f in range(num_frames):
        uv, z = project(K, c2w[f], xyz)
        seen = (z > 0) & (uv[:, 0] >= -0.5) & (uv[:, 0] < W - 0.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] < H - 0.5)
        seen &= np.array([not hidden(p, f) for p in range(num_points)])
        if not covisible:  # each point observed in one frame only: no pair anywhere
            seen &= np.arange(num_points) % num_frames == f
        if not observed:  # empty track files: no sparse depth either
            seen[:] = False
        observations.append((ids[seen], uv[seen]))
    images = rng.integers(0, 256, (num_frames, H, W, 3), dtype=np.uint8)
    with DatasetWriter(root) as writer:
        writer.add("s", split, images=images, K=np.stack([K] * num_frames), c2w=c2w)
    write_tracks(root / "scenes" / "s", ids, xyz, observations)
    return root, K, c2w, ids, xyz, observations


# ------------------------------------------------------------------------------------------------
# the source on hand-built tracks


def track_batch(tracks: list[list[tuple[int, float, float]]], H: int, W: int) -> dict:
    """tracks[v] = [(point id, u, v), ...] -> a batch with track_ids/track_uv (padded with -1)."""
    M = max(len(t) for t in tracks) + 1  # one padding slot at least
    ids = torch.full((1, len(tracks), M), -1, dtype=torch.long)
    uv = torch.zeros(1, len(tracks), M, 2)
    for v, obs in enumerate(tracks):
        for m, (p, u, w) in enumerate(obs):
            ids[0, v, m], uv[0, v, m] = p, torch.tensor([u, w])
    return {"image": torch.zeros(1, len(tracks), 3, H, W), "track_ids": ids, "track_uv": uv}


def pairs_of(targets) -> dict:
    V, h, w = targets.grid
    T = h * w
    out = {}
    for n, j in targets.valid[0].nonzero().tolist():
        keep = targets.weight[0, n, j] > 0
        out[(n // T, n % T, j)] = (targets.idx[0, n, j][keep].tolist(),
                                   [round(x, 6) for x in targets.weight[0, n, j][keep].tolist()])
    return out


def test_hand_computed_token_targets_on_a_non_square_grid():
    # H x W = 4 x 8 at stride 2: a 2 x 4 token grid; token of (u, v) = floor((v+.5)/2) * 4 + floor((u+.5)/2)
    batch = track_batch([
        [(7, 1.2, 0.3), (3, 6.4, 3.1), (9, 2.0, 2.0)],  # view 0: tokens 0, 7, 5
        [(7, 5.0, 2.6), (3, 0.0, 0.0), (11, 3.0, 1.0)],  # view 1: tokens 6, 0, 1
        [(3, 7.4, 3.4), (11, -0.7, 1.0)],  # view 2: token 7; point 11 lies left of the image (u < -1/2)
    ], H=4, W=8)
    targets = compute_targets("sfm_tracks", batch, (3, 2, 4), 2)
    expected = {  # (query view, query token, key view): ([target token], [weight])
        (0, 0, 1): ([6], [1.0]),  # point 7
        (1, 6, 0): ([0], [1.0]),
        (0, 7, 1): ([0], [1.0]),  # point 3, seen in all three views
        (0, 7, 2): ([7], [1.0]),
        (1, 0, 0): ([7], [1.0]),
        (1, 0, 2): ([7], [1.0]),
        (2, 7, 0): ([7], [1.0]),
        (2, 7, 1): ([0], [1.0]),
    }  # point 9: one view only; point 11: its second observation is outside view 2
    assert pairs_of(targets) == expected
    cost = targets.cost[0]
    assert (cost[targets.valid[0]] == 0).all() and torch.isinf(cost[~targets.valid[0]]).all()


def test_several_tracks_in_one_query_token_center_argmax_soft():
    # query token 0 of view 0 (pixels [-.5, 1.5)^2, centre (0.5, 0.5)) holds three tracks:
    #   a (0.4, 0.6): 0.14 px from the centre -> view 1 (6.0, 0.0): token 3
    #   b (1.3, 1.3): 1.13 px                 -> view 1 (2.0, 2.0): token 5
    #   c (-0.3, 1.2): 1.06 px                -> view 1 (2.4, 2.2): token 5
    batch = track_batch([[(1, 0.4, 0.6), (2, 1.3, 1.3), (3, -0.3, 1.2)],
                         [(1, 6.0, 0.0), (2, 2.0, 2.0), (3, 2.4, 2.2)]], H=4, W=8)
    grid = (2, 2, 4)
    assert pairs_of(compute_targets("sfm_tracks", batch, grid, 2, mode="center"))[(0, 0, 1)] == ([3], [1.0])
    assert pairs_of(compute_targets("sfm_tracks", batch, grid, 2, mode="argmax"))[(0, 0, 1)] == ([5], [1.0])
    soft = pairs_of(compute_targets("sfm_tracks", batch, grid, 2, mode="soft", k=4))
    assert soft[(0, 0, 1)] == ([5, 3], [round(2 / 3, 6), round(1 / 3, 6)])
    # the other way: token 5 of view 1 holds b and c, both back in token 0 of view 0
    assert soft[(1, 5, 0)] == ([0], [1.0]) and soft[(1, 3, 0)] == ([0], [1.0])


def naive_track_targets(tracks, V, H, W, stride):
    """Per point and view pair: the track nearest the query token centre wins (ties: listed first)."""
    h, w = H // stride, W // stride
    token = lambda u, v: int((v + 0.5) // stride) * w + int((u + 0.5) // stride)  # noqa: E731
    inside = lambda u, v: -0.5 <= u < W - 0.5 and -0.5 <= v < H - 0.5  # noqa: E731
    best = {}
    for i in range(V):
        obs_i = {p: (u, v) for p, u, v in reversed(tracks[i])}  # first observation of a point wins
        for j in range(V):
            if i == j:
                continue
            obs_j = {p: (u, v) for p, u, v in reversed(tracks[j])}
            for n, (p, u, v) in enumerate(tracks[i]):
                if (u, v) != obs_i[p] or p not in obs_j or not inside(u, v) or not inside(*obs_j[p]):
                    continue
                q = token(u, v)
                cu, cv = (q % w + 0.5) * stride - 0.5, (q // w + 0.5) * stride - 0.5
                d = math.hypot(u - cu, v - cv)
                if (i, q, j) not in best or d < best[(i, q, j)][0]:
                    best[(i, q, j)] = (d, token(*obs_j[p]))
    return {key: ([t], [1.0]) for key, (_, t) in best.items()}


@pytest.mark.parametrize("stride, H, W", [(1, 6, 10), (2, 8, 12), (4, 8, 16), (3, 9, 6)])
def test_sfm_tracks_equal_a_naive_loop(stride, H, W):
    rng = np.random.default_rng(stride)
    V = 3
    tracks = []
    for v in range(V):
        ids = rng.choice(40, size=25, replace=False)
        tracks.append([(int(p), float(rng.uniform(-1, W)), float(rng.uniform(-1, H))) for p in ids])
    tracks[1].append(tracks[1][0][:1] + (1.0, 1.0))  # a duplicate observation: the first one counts
    targets = compute_targets("sfm_tracks", track_batch(tracks, H, W), (V, H // stride, W // stride), stride)
    expected = naive_track_targets(tracks, V, H, W, stride)
    assert len(expected) > 10 and pairs_of(targets) == expected


def test_onehot_global_trains_on_sfm_track_targets():
    batch = track_batch([[(1, 0.4, 0.6), (2, 5.0, 1.0)], [(1, 6.0, 0.0), (2, 2.0, 2.0)], [(2, 1.0, 3.0)]], H=4, W=8)
    targets = compute_targets("sfm_tracks", batch, (3, 2, 4), 2)
    N = 24
    tap = TapResult(q=torch.zeros(1, 1, N, 2), k=torch.randn(1, 1, N, 2), scale=1.0, grid=(3, 2, 4),
                    query_idx=torch.arange(N)[None])
    for target in ("onehot_global", "onehot_per_view"):
        value, diag = CameoLoss(1, head="mean", target=target)(tap, targets, num_ref=1)
        assert torch.isfinite(value) and float(diag["pairs_ref"]) + float(diag["pairs_tgt"]) > 0


# ------------------------------------------------------------------------------------------------
# tracks in the batch


@pytest.mark.filterwarnings("ignore:.*centre-cropped")  # the crop is the point here
def test_dataset_puts_tracks_in_the_batch_transformed_like_K(tmp_path):
    root, K, c2w, ids, xyz, observations = tracked_scene(tmp_path / "ds")
    ds = SceneFolderDataset(root, num_views=2, image_size=(12, 12))  # 24x32 -> crop 24x24 at x0 = 4, then / 2
    item = ds[0]
    # K' by hand: crop (cx - 4), scale by 1/2 with the half-pixel term: c' = (c + 1/2)/2 - 1/2
    K_new = np.array([[15.0, 0, (15.3 - 4 + 0.5) / 2 - 0.5], [0, 16.5, (11.8 + 0.5) / 2 - 0.5], [0, 0, 1]])
    _, frames = ds.sample_frames(0)
    for v, f in enumerate(frames):
        np.testing.assert_allclose(item["intrinsics"][v].numpy(), K_new, atol=1e-5)
        uv_new, z = project(K_new, c2w[f], xyz)  # every point, in the resized view
        obs_ids = observations[f][0]
        inside = (uv_new[:, 0] >= -0.5) & (uv_new[:, 0] < 11.5) & (uv_new[:, 1] >= -0.5) & (uv_new[:, 1] < 11.5)
        want = [p for p, ok in zip(ids, inside) if ok and p in set(obs_ids.tolist())]
        got_ids = item["track_ids"][v]
        got = got_ids[got_ids >= 0]
        assert sorted(got.tolist()) == sorted(want) and 0 < len(want) < len(obs_ids)  # the crop cut some off
        row = {p: n for n, p in enumerate(ids.tolist())}
        for m, p in enumerate(got.tolist()):  # the stored uv were exact projections: they map like K
            np.testing.assert_allclose(item["track_uv"][v, m].numpy(), uv_new[row[p]], atol=2e-4)
        depth = np.zeros((12, 12))
        for p in want:  # nearest observed point per pixel, at its projection
            u, w = uv_new[row[p]]
            r, c = int(np.floor(w + 0.5)), int(np.floor(u + 0.5))
            if depth[r, c] == 0 or z[row[p]] < depth[r, c]:
                depth[r, c] = z[row[p]]
        np.testing.assert_allclose(item["sparse_depth"][v].numpy(), depth, atol=1e-5)
    # token targets of the analytic projections (12 x 12 px at stride 4 and 3: 3 x 3 and 4 x 4 tokens)
    row = {p: n for n, p in enumerate(ids.tolist())}
    tracks = []
    for f in frames:
        uv_new, _ = project(K_new, c2w[f], xyz)
        tracks.append([(int(p), *uv_new[row[int(p)]]) for p in observations[f][0]])
    for stride in (4, 3):
        targets = compute_targets("sfm_tracks", collate([item]), (2, 12 // stride, 12 // stride), stride)
        expected = naive_track_targets(tracks, 2, 12, 12, stride)
        assert len(expected) > 4 and pairs_of(targets) == expected


def test_collate_pads_the_observations_with_minus_one(tmp_path):
    root, *_ = tracked_scene(tmp_path / "ds", num_frames=6)
    ds = SceneFolderDataset(root, num_views=3, image_size=(12, 16), samples_per_scene=4, frame_spacing=(1, 2))
    items = [ds[i] for i in range(4)]
    sizes = [int((it["track_ids"] >= 0).sum(-1).max()) for it in items]
    batch = collate(items)
    M = max(it["track_ids"].shape[1] for it in items)
    assert batch["track_ids"].shape == (4, 3, M) and batch["track_uv"].shape == (4, 3, M, 2)
    for n, it in enumerate(items):
        m = it["track_ids"].shape[1]
        assert torch.equal(batch["track_ids"][n, :, :m], it["track_ids"]) and (batch["track_ids"][n, :, m:] == -1).all()
    assert len(set(sizes)) > 1  # the items really differ in length


# ------------------------------------------------------------------------------------------------
# depth on sparse depth


def lateral_batch():
    """Two cameras 0.5 apart along x, both looking down +z; three points, one hidden in view 1."""
    H, W, f = 8, 12, 10.0
    K = torch.tensor([[f, 0, 5.5], [0, f, 3.5], [0, 0, 1.0]], dtype=torch.float64)
    c2w = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    c2w[1, 0, 3] = 0.5
    sparse = torch.zeros(1, 2, H, W, dtype=torch.float64)
    # view 0 pixels (col, row, z): all three project inside view 1 at u - f * 0.5 / z
    points = [(6, 2, 2.0), (9, 5, 5.0), (2, 6, 2.5)]
    for c, r, z in points:
        sparse[0, 0, r, c] = z
    return {"image": torch.zeros(1, 2, 3, H, W), "sparse_depth": sparse, "intrinsics": K[None].repeat(1, 2, 1, 1),
            "cam2world": c2w[None]}, points


def test_depth_on_sparse_depth_reprojects_every_point_without_an_occlusion_test():
    batch, points = lateral_batch()
    targets = compute_targets("depth", batch, (2, 4, 6), 2)  # no dense depth: sparse_depth is used
    # u' = c - f b / z on the same row; token = floor((r + 1/2) / 2) * 6 + floor((u + 1/2) / 2):
    #   (6, 2, z 2.0) -> u' 3.5: token 9 -> 8; (9, 5, z 5.0) -> u' 8: 16 -> 16; (2, 6, z 2.5) -> u' 0: 19 -> 18
    expected = {(0, 9, 1): ([8], [1.0]), (0, 16, 1): ([16], [1.0]), (0, 19, 1): ([18], [1.0])}
    assert pairs_of(targets) == expected and len(expected) == 3
    # with tracks in which the third point is not observed in view 1 (occluded there), sfm_tracks drops it
    tracks = track_batch([[(p, float(c), float(r)) for p, (c, r, _) in enumerate(points)],
                          [(p, c - 10.0 * 0.5 / z, float(r)) for p, (c, r, z) in enumerate(points) if p != 2]], 8, 12)
    sfm = pairs_of(compute_targets("sfm_tracks", tracks, (2, 4, 6), 2))
    assert {k for k in sfm if k[0] == 0} == {(0, 9, 1), (0, 16, 1)}


def test_depth_key_chooses_dense_or_sparse_depth():
    batch, _ = lateral_batch()
    with pytest.raises(KeyError, match="'depth'"):
        compute_targets("depth", batch, (2, 4, 6), 2, depth_key="depth")
    with pytest.raises(ValueError, match="depth_key"):
        compute_targets("depth", batch, (2, 4, 6), 2, depth_key="sparse")
    dense = {**batch, "depth": torch.full((1, 2, 8, 12), 4.0, dtype=torch.float64)}
    assert int(compute_targets("depth", dense, (2, 4, 6), 2).valid.sum()) > 20  # the dense map wins on auto
    assert int(compute_targets("depth", dense, (2, 4, 6), 2, depth_key="sparse_depth").valid.sum()) == 3


# ------------------------------------------------------------------------------------------------
# matches at the match-image size


def textured_pair(size: int, angle: float = 8.0):
    """A non-repetitive texture on a plane seen head-on and from a camera rotated about its centre."""
    rng = np.random.default_rng(0)
    big = 3 * size
    tex = sum(cv2.GaussianBlur(rng.random((big, big)), (0, 0), s) * s for s in (1.0, 2.0, 4.0))
    tex = ((tex - tex.min()) / (tex.max() - tex.min()) * 255).astype(np.uint8)
    f, Z = 1.2 * size, 4.0
    K = np.array([[f, 0, (size - 1) / 2], [0, f, (size - 1) / 2], [0, 0, 1]])
    R1 = rot_y(angle)
    C1 = np.array([0.0, 0.0, Z]) - R1 @ np.array([0.0, 0.0, Z])
    R, t = R1.T, -R1.T @ C1
    H01 = K @ (R + np.outer(t, [0, 0, 1]) / Z) @ np.linalg.inv(K)
    crop = np.array([[1, 0, -size], [0, 1, -size], [0, 0, 1]], dtype=float)
    img0 = cv2.warpPerspective(tex, crop, (size, size), flags=cv2.INTER_LINEAR)
    img1 = cv2.warpPerspective(tex, H01 @ crop, (size, size), flags=cv2.INTER_LINEAR)
    c2w = np.stack([np.eye(4), np.eye(4)])
    c2w[1, :3, :3], c2w[1, :3, 3] = R1, C1
    return np.stack([img0, img1]), H01, K, c2w


def test_matches_at_the_match_image_size_supervise_more_tokens_and_land_right():
    big, small, stride = 128, 32, 4
    images, H01, K_big, c2w = textured_pair(big)
    hr = torch.from_numpy(images.astype(np.float32) / 255)[None, :, None].expand(1, 2, 3, big, big)
    model = torch.nn.functional.interpolate(hr[0], size=(small, small), mode="bilinear", antialias=True,
                                            align_corners=False)[None].clamp(0, 1)
    s = small / big
    A = np.array([[s, 0, 0.5 * (s - 1)], [0, s, 0.5 * (s - 1)], [0, 0, 1]])  # big -> small pixels
    batch = {"image": model, "match_image": hr, "intrinsics": torch.from_numpy(np.stack([A @ K_big] * 2))[None],
             "cam2world": torch.from_numpy(c2w)[None]}
    w = small // stride
    counts = {}
    for key, options in (("image", {}), ("match_image", {}), ("match_image", {"max_sampson": 1.0, "ransac": False})):
        targets = compute_targets("matches", batch, (2, w, w), stride, image_key=key, **options)
        q = targets.valid[0, :w * w, 1].nonzero().squeeze(1).numpy()
        counts[(key, bool(options))] = len(q)
        if key == "match_image":  # truth: token centre -> big pixels -> homography -> small pixels -> token
            centres = np.stack([(q % w + 0.5) * stride - 0.5, (q // w + 0.5) * stride - 0.5, np.ones(len(q))], 1)
            p = centres @ (A @ H01 @ np.linalg.inv(A)).T
            truth = p[:, :2] / p[:, 2:]
            got = targets.idx[0, q, 1, 0].numpy()
            cheb = np.maximum(abs(got % w - np.floor((truth[:, 0] + 0.5) / stride)),
                              abs(got // w - np.floor((truth[:, 1] + 0.5) / stride)))
            assert (cheb <= 1).mean() > 0.9, (options, (cheb <= 1).mean())
    assert counts[("match_image", False)] >= 20 and counts[("match_image", True)] >= 20
    assert counts[("match_image", False)] > 2 * counts[("image", False)]


# ------------------------------------------------------------------------------------------------
# pair counts and the zero-pair stop


def folder_run(tmp_path, root, *bindings):
    exp = config.parse([SMOKE], [
        f"run_experiment.output_dir = '{tmp_path}'", "train.progress = False", "data.kind = 'folder'",
        f"data.root = '{root}'", "data.image_size = (12, 16)", "data.split = 'frame'", "data.test_every = 4",
        "data.samples_per_scene = 8", "data.frame_spacing = (1, 2)", "cameo.source = 'sfm_tracks'",
        "cameo.layer = 'blocks.01.attn'", "eval.every = 0", "train.checkpoint_every = 0", *bindings])
    return build_run(exp)


@pytest.mark.parametrize("source, scene", [
    ("sfm_tracks", dict(covisible=False)),  # every point seen by one frame only
    ("depth", dict(observed=False)),  # no dense depth, and SfM-sparse depth without a point
])
def test_a_run_with_no_pairs_stops_naming_source_grid_and_keys(tmp_path, source, scene):
    root, *_ = tracked_scene(tmp_path / "ds", num_frames=8, **scene)
    run = folder_run(tmp_path, root, "train.steps = 10", "cameo.max_zero_pair_steps = 3", f"cameo.source = '{source}'")
    with pytest.raises(ZeroPairsError) as err:
        fit(run)
    message = str(err.value)
    for part in ("0 supervised pairs for 3 consecutive steps (up to step 2)", f"'{source}'", "blocks.01.attn",
                 "(V, h, w) = (3, 6, 8) of 2 px per token", "'sparse_depth'", "cameo.max_zero_pair_steps = 0"):
        assert part in message, (part, message)
    history = read_metrics(tmp_path / "smoke")
    assert [v for _, v in history["train/cameo_pairs_source"]] == [0.0, 0.0]  # steps 1 and 2 were logged
    assert json.loads((tmp_path / "smoke" / "status.json").read_text())["status"] == "FAILED"


def test_one_scene_capture_trains_on_distinct_samples_and_logs_the_source_pair_count(tmp_path):
    root, *_ = tracked_scene(tmp_path / "ds", num_frames=8)
    run = folder_run(tmp_path, root, "train.steps = 3", "cameo.max_zero_pair_steps = 1")
    fit(run)
    history = read_metrics(tmp_path / "smoke")
    logged = history["train/cameo_pairs_source"]
    assert [s for s, _ in logged] == [1, 2, 3]
    exp = run.exp
    for step, value in logged:  # the source's count on that step's batch, recomputed
        idx = batch_indices(len(run.train_set), exp.data.batch_size, step - 1, exp.data.seed)
        samples = [run.train_set.dataset.sample_frames(i) for i in idx]
        assert len({(s, tuple(f)) for s, f in samples}) == len(idx)  # distinct samples in the batch
        held_out = {0, 4}
        assert all(held_out.isdisjoint(f) for _, f in samples)
        targets = compute_targets("sfm_tracks", collate([run.train_set[i] for i in idx]), (3, 6, 8), 2)
        assert value == float(targets.valid.sum()) > 0
