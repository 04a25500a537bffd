"""The evaluation protocol against hand-computed values and independent implementations: PSNR per
image vs global by formula, SSIM conventions against a numpy loop over the gaussian-window formula
(and skimage when installed), attention PCK/EPE against hand-built SfM tracks and SIFT matches of a
known shift, no NaN ever returned, and evaluation on a pixelSplat-format index over scene folders
the tests write."""
import json
import math
import types

import numpy as np
import pytest
import torch

from backbones import create_backbone
from cameo_bench.config.spec import DataSpec, EvalSpec, Experiment, SpecError, resolve_conventions
from cameo_bench.data import scene_format
from cameo_bench.data.loading import build_datasets, eval_batches
from cameo_bench.evaluation import attention as A
from cameo_bench.evaluation import evaluate as E
from cameo_bench.evaluation import metrics as M
from cameo_bench.evaluation import protocol as P
from cameo_bench.objectives.diffusion import MultiViewDiffusion
from cameo_bench.tracking import keys

# ---------------------------------------------------------------------------------------------
# PSNR


def test_psnr_per_image_and_global_by_formula():
    """Two images with MSE 0.01 and 0.0001: per-image PSNRs 20 and 40 (mean 30); global PSNR of the
    pooled MSE 0.00505 is -10 log10(0.00505) = 22.967."""
    gt = torch.full((2, 3, 8, 8), 0.5)
    pred = gt.clone()
    pred[0] += 0.1  # every pixel off by 0.1: MSE 0.01
    pred[1] += 0.01  # MSE 1e-4
    per_image = M.image_metrics(pred, gt)["psnr"]
    assert per_image.tolist() == pytest.approx([20.0, 40.0], abs=1e-3)
    assert M.reduce_metric("psnr", per_image) == pytest.approx(30.0, abs=1e-3)
    glob = resolve_conventions({"psnr": "global"})
    assert M.reduce_metric("psnr", per_image, glob) == pytest.approx(-10 * math.log10(0.00505), abs=1e-3)
    assert M.summarise_quality({"psnr": per_image}, glob) == {keys.PSNR: pytest.approx(22.9671, abs=1e-3)}
    # pooled the same way inside a viewpoint bin; SSIM stays a mean under either PSNR convention
    by_bin = M.quality_by_bin({"psnr": per_image, "ssim": torch.tensor([0.2, 0.4])}, torch.tensor([5.0, 10.0]), glob)
    assert by_bin[keys.eval_by_bin("psnr", "0-30")] == pytest.approx(22.9671, abs=1e-3)
    assert by_bin[keys.eval_by_bin("ssim", "0-30")] == pytest.approx(0.3)


# ---------------------------------------------------------------------------------------------
# SSIM


def ssim_by_loops(x: np.ndarray, y: np.ndarray, sample_covariance: bool, padded: bool = False) -> float:
    """Wang et al.'s SSIM with an 11 x 11 gaussian window (sigma 1.5), written out per window
    position: weighted means, (co)variances (x N/(N-1) for the sample version), the SSIM formula,
    averaged over the positions where the window fits, then over channels. x, y [C, H, W].
    `padded`: first reflect-pad by 5 (edge pixel not repeated) and clamp variances at 0: a window
    centred on every pixel, as torchmetrics does."""
    if padded:
        x, y = (np.pad(a, ((0, 0), (5, 5), (5, 5)), mode="reflect") for a in (x, y))
    r = np.arange(11) - 5
    g = np.exp(-(r ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    norm = 121 / 120 if sample_covariance else 1.0
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    per_channel = []
    for a, b in zip(x.astype(np.float64), y.astype(np.float64)):
        values = []
        for i in range(a.shape[0] - 10):
            for j in range(a.shape[1] - 10):
                pa, pb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va = norm * ((w * pa * pa).sum() - ma * ma)
                vb = norm * ((w * pb * pb).sum() - mb * mb)
                if padded:
                    va, vb = max(va, 0.0), max(vb, 0.0)
                cov = norm * ((w * pa * pb).sum() - ma * mb)
                values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
        per_channel.append(np.mean(values))
    return float(np.mean(per_channel))


def _image_pair(H=14, W=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(2, 3, H, W, generator=g)
    pred = (gt + 0.2 * torch.randn(2, 3, H, W, generator=g)).clamp(0, 1)
    return pred, gt


@pytest.mark.parametrize("convention,sample", [("gaussian11", True), ("gaussian11_population", False)])
def test_ssim_gaussian11_matches_the_window_formula(convention, sample):
    pred, gt = _image_pair()
    got = M.image_metrics(pred, gt, resolve_conventions({"ssim": convention}))["ssim"]
    expected = [ssim_by_loops(p.numpy(), t.numpy(), sample) for p, t in zip(pred, gt)]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_ssim_gaussian11_equals_skimage_as_pixelsplat_calls_it():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    pred, gt = _image_pair(H=20, W=23)
    got = M.image_metrics(pred, gt, resolve_conventions("pixelsplat"))["ssim"]
    expected = [skimage_metrics.structural_similarity(t.numpy(), p.numpy(), win_size=11, gaussian_weights=True,
                                                      channel_axis=0, data_range=1.0) for p, t in zip(pred, gt)]
    assert got.tolist() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("size", [16, 32])
def test_ssim_torchmetrics_default_is_the_padded_window_formula(size):
    """The default (torchmetrics) averages a window centred on every pixel of the reflect-padded
    image, whatever kernel_size it is passed (7 below 32 px): the same formula with 11 taps, padded."""
    pred, gt = _image_pair(H=size, W=size, seed=1)
    tm = M.image_metrics(pred, gt)["ssim"]
    expected = [ssim_by_loops(p.numpy(), t.numpy(), False, padded=True) for p, t in zip(pred, gt)]
    assert tm.tolist() == pytest.approx(expected, abs=1e-5)


def test_default_conventions_are_todays_torchmetrics_call():
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    pred, gt = _image_pair(H=16, W=16)
    got = M.image_metrics(pred, gt)
    assert torch.equal(got["ssim"], tm_ssim(pred, gt, data_range=1.0, reduction="none", kernel_size=7))
    assert torch.equal(got["ssim"], M.image_metrics(pred, gt, resolve_conventions("default"))["ssim"])
    with pytest.raises(ValueError, match="at least 11 x 11"):
        M.image_metrics(pred[..., :10, :10], gt[..., :10, :10], resolve_conventions("pixelsplat"))


def test_conventions_resolve_and_reject_with_valid_names():
    assert resolve_conventions("pixelsplat") == {"psnr": "per_image", "ssim": "gaussian11", "lpips": "vgg"}
    assert resolve_conventions({"psnr": "global"})["ssim"] == "torchmetrics"
    assert M.lpips_nets(resolve_conventions("default")) == ("vgg", "alex")
    for bad, valid in [("pixelsplatt", "pixelsplat"), ({"ssim": "gauss"}, "gaussian11"), ({"lpip": "vgg"}, "lpips")]:
        with pytest.raises(SpecError, match=valid):
            EvalSpec(conventions=bad)


def test_lpips_unavailable_reason_is_exposed(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    scorer = M.LpipsScorer("vgg")
    assert not scorer.available and str(tmp_path) in scorer.reason and scorer.metric == "lpips_vgg"


# ---------------------------------------------------------------------------------------------
# Attention metrics against sparse truth


def plane_batch(V=2, H=16, W=16, f=16.0, Z=4.0, shift_px=2.0, image=None):
    """Fronto-parallel plane at depth Z seen by cameras translated along x: view v sees it shifted
    by -v * shift_px pixels. No depth key: the truth has to come from tracks or matches."""
    b = shift_px * Z / f
    K = torch.tensor([[f, 0, (W - 1) / 2], [0, f, (H - 1) / 2], [0, 0, 1.0]])
    c2w = torch.eye(4).repeat(V, 1, 1)
    c2w[:, 0, 3] = torch.arange(V) * b
    return {"image": torch.rand(1, V, 3, H, W) if image is None else image,
            "intrinsics": K.expand(1, V, 3, 3).clone(), "cam2world": c2w[None], "num_ref": 1}


def hand_tracks():
    """ids 0 and 2 seen in both views; id 1 only in view 0, id 5 only in view 1; -1 = padding."""
    ids = torch.tensor([[[0, 1, 2, -1], [2, 0, 5, -1]]])
    uv = torch.tensor([[[[3.0, 3.0], [8.0, 5.0], [12.6, 9.0], [0.0, 0.0]],
                        [[10.6, 9.0], [1.0, 3.0], [4.0, 4.0], [0.0, 0.0]]]])
    return ids, uv


# (query view, query token, key view) -> the key token the fake attention peaks at, and the truth
# by hand: query token = floor((u + 1/2) / 2) on the 8 x 8 grid, truth = (u + 1/2) / 2 - 1/2
HAND = {  # (i, query token, j): (peak token (x, y), truth (x, y))
    (0, 1 * 8 + 1, 1): ((0, 1), (0.25, 1.25)),  # id 0: (3, 3) -> (1, 3)
    (0, 4 * 8 + 6, 1): ((5, 4), (5.05, 4.25)),  # id 2: (12.6, 9) -> (10.6, 9)
    (1, 1 * 8 + 0, 0): ((3, 1), (1.25, 1.25)),  # id 0 back
    (1, 4 * 8 + 5, 0): ((6, 4), (6.05, 4.25)),  # id 2 back
}


def peaked_tap(grid, peaks, heads=2, sharp=50.0):
    """q . k is `sharp` exactly for the (query, key) pairs in `peaks`, 0 elsewhere."""
    V, h, w = grid
    n, N = h * w, V * h * w
    k = torch.eye(N)[None, None].repeat(1, heads, 1, 1) * sharp
    q = torch.zeros(1, heads, N, N)
    for (i, p, j), ((x, y), _) in peaks.items():
        q[0, :, i * n + p, j * n + y * w + x] = 1.0
    return types.SimpleNamespace(q=q, k=k, scale=float(heads))


def test_track_pairs_are_the_co_observed_points_both_ways():
    ids, uv = hand_tracks()
    batch = {**plane_batch(), "track_ids": ids, "track_uv": uv}
    pairs = A.track_pairs(batch)
    got = sorted(zip(pairs.i.tolist(), pairs.j.tolist(), (tuple(round(v, 4) for v in uv) for uv in pairs.uv_i.tolist()),
                     (tuple(round(v, 4) for v in uv) for uv in pairs.uv_j.tolist())))
    assert got == sorted([(0, 1, (3.0, 3.0), (1.0, 3.0)), (0, 1, (12.6, 9.0), (10.6, 9.0)),
                          (1, 0, (1.0, 3.0), (3.0, 3.0)), (1, 0, (10.6, 9.0), (12.6, 9.0))])


def test_sparse_scores_against_hand_computed_epe_and_pck():
    ids, uv = hand_tracks()
    batch = {**plane_batch(), "track_ids": ids, "track_uv": uv}
    grid = (2, 8, 8)
    angle = torch.zeros(1, 2, 2)
    scores = A.sparse_attention_scores(peaked_tap(grid, HAND), grid, 2, A.track_pairs(batch), angle)
    pairs = A.track_pairs(batch)
    for s in range(len(pairs.b)):  # each pair's EPE is the distance from its peak to its truth
        i, j = int(pairs.i[s]), int(pairs.j[s])
        col, row = (pairs.uv_i[s] + 0.5).div(2).floor().long().tolist()
        (px, py), (tx, ty) = HAND[(i, row * 8 + col, j)]
        assert float(scores["epe"][s]) == pytest.approx(math.hypot(px - tx, py - ty), abs=1e-5)
    metrics = A.summarise_attention(scores, "blocks.00.attn", keys.TRUTH_TRACKS)

    def name(metric):
        return keys.attn("blocks.00.attn", keys.attn_truth(keys.TRUTH_TRACKS, metric))

    epes = [0.353553, 0.254951, 1.767767, 0.254951]
    assert metrics[name(keys.EPE)] == pytest.approx(sum(epes) / 4, abs=1e-5)
    assert metrics[name(keys.pck(0.5))] == 0.75 and metrics[name(keys.pck(1.0))] == 0.75
    assert metrics[name(keys.pck(2.0))] == 1.0
    assert metrics[name(keys.in_bin(keys.COUNT, "0-30"))] == 4
    assert metrics[name(keys.MASS1)] == pytest.approx(0.75, abs=1e-3)  # the far peak holds no mass within 1 token
    assert not any(k.startswith(keys.attn_prefix("blocks.00.attn") + keys.PCK1) for k in metrics)  # no dense names


def test_attention_metrics_without_depth_use_tracks_and_label_them():
    torch.manual_seed(0)
    model = create_backbone("mv_dit", "micro", sample_size=16)
    ids, uv = hand_tracks()
    batch = {**plane_batch(), "track_ids": ids, "track_uv": uv}
    layer = "blocks.00.attn"
    assert A.attention_metrics(model, MultiViewDiffusion(), [batch], timestep=500, seed=0, layers=[layer]) == {}
    omitted = {}
    out = A.attention_metrics(model, MultiViewDiffusion(), [batch], timestep=500, seed=0, layers=[layer],
                              truth="auto", omitted=omitted)
    count = keys.attn(layer, keys.attn_truth(keys.TRUTH_TRACKS, keys.in_bin(keys.COUNT, "0-30")))
    assert out[count] == 4 and not omitted
    assert 0 <= out[keys.attn(layer, keys.attn_truth(keys.TRUTH_TRACKS, keys.PCK1))] <= 1
    # the supervised layer's copy keeps the label
    copy = A.supervised_copy(out, layer)
    assert copy[keys.attn(keys.SUPERVISED_LAYER, keys.attn_truth(keys.TRUTH_TRACKS, keys.in_bin(keys.COUNT, "0-30")))] == 4


def textured_pair(shift: int = 3, size: int = 64, seed: int = 0):
    """Two views of a textured plane, view 1 = view 0 moved by -shift pixels in x (cameras to match)."""
    g = torch.Generator().manual_seed(seed)
    texture = torch.nn.functional.interpolate(torch.rand(1, 3, size // 4, size // 4 + 4, generator=g),
                                              scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    image = torch.stack([texture[..., :size], texture[..., shift:shift + size]], 1)  # [1, 2, 3, H, W]
    return plane_batch(V=2, H=size, W=size, f=float(size), shift_px=float(shift), image=image)


def test_sift_match_truth_follows_the_known_shift():
    pairs = A.match_pairs(textured_pair(shift=3))
    assert len(pairs.b) >= 10
    step = (pairs.j - pairs.i).double()  # +1: view 0 -> 1, -1: back
    error = torch.stack([pairs.uv_j[:, 0] - pairs.uv_i[:, 0] + 3 * step, pairs.uv_j[:, 1] - pairs.uv_i[:, 1]], 1).norm(dim=1)
    assert error.median() < 0.25 and error.max() < 1.0  # SIFT's sub-pixel error at 64 px, nothing gross
    # SIFT at the larger match_image, matches mapped back to the model image (half the size: a
    # 1.5 px shift); the cameras are the model image's
    big = textured_pair(shift=3)
    small = plane_batch(V=2, H=32, W=32, f=32.0, shift_px=1.5, image=torch.nn.functional.avg_pool2d(
        big["image"][0], 2)[None])
    pairs = A.match_pairs({**small, "match_image": big["image"]})
    step = (pairs.j - pairs.i).double()
    error = torch.stack([pairs.uv_j[:, 0] - pairs.uv_i[:, 0] + 1.5 * step, pairs.uv_j[:, 1] - pairs.uv_i[:, 1]], 1).norm(dim=1)
    assert len(pairs.b) >= 10 and error.median() < 0.15 and pairs.uv_i.max() < 32
    assert A.batch_truth(textured_pair(), "auto") == keys.TRUTH_MATCHES
    assert A.batch_truth({**textured_pair(), "depth": torch.ones(1, 2, 64, 64)}, "auto") == "depth"


# ---------------------------------------------------------------------------------------------
# Nothing uncomputable is returned


def test_evaluate_leaves_out_what_it_cannot_compute_and_says_why(tmp_path, monkeypatch):
    """Zero depth (SfM-sparse data) used to give consistency = NaN, stored as "nan"; no depth, no
    LPIPS weights and no correspondence truth now give absent metrics with reasons."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    torch.manual_seed(0)
    model = create_backbone("mv_dit", "micro", sample_size=16)
    spec = EvalSpec(sampler_steps=2, attention_truth="depth")
    zero_depth = {**plane_batch(V=3), "depth": torch.zeros(1, 3, 16, 16)}
    omitted = {}
    out = E.evaluate(model, MultiViewDiffusion(), [zero_depth], spec, omitted=omitted, floors=False)
    assert not any(isinstance(v, float) and math.isnan(v) for v in out.values())
    assert keys.CONSISTENCY not in out and "lands" in omitted[keys.CONSISTENCY]
    assert keys.LPIPS_VGG not in out and "not found" in omitted[keys.LPIPS_VGG]
    assert keys.ATTN in omitted and math.isfinite(out[keys.PSNR])
    omitted = {}
    E.evaluate(model, MultiViewDiffusion(), [plane_batch(V=3)], EvalSpec(sampler_steps=2, lpips=False, attention=False),
               omitted=omitted, floors=False)
    assert omitted == {keys.CONSISTENCY: "no evaluation batch has depth", keys.CONSISTENCY_GT: "no evaluation batch has depth"}


def test_drop_uncomputed_removes_nan_and_records_it():
    omitted = {"eval/a": "known reason"}
    out = P.drop_uncomputed({"eval/a": float("nan"), "eval/b": float("nan"), "eval/c": 1.0, "eval/d": math.inf}, omitted)
    assert out == {"eval/c": 1.0, "eval/d": math.inf}
    assert omitted == {"eval/a": "known reason", "eval/b": "not a number (computed over nothing)"}


# ---------------------------------------------------------------------------------------------
# Evaluation index


def write_dataset(root, scenes=("s0", "s1"), frames=6, size=(12, 16)):
    """Scenes whose frame f is filled with grey level 10 f + 40 * scene, so an item's frames can be
    read back from its pixels."""
    H, W = size
    with scene_format.DatasetWriter(root) as writer:
        for s, scene in enumerate(scenes):
            images = [np.full((H, W, 3), 10 * f + 40 * s, np.uint8) for f in range(frames)]
            K = np.tile(np.array([[20.0, 0, (W - 1) / 2], [0, 20.0, (H - 1) / 2], [0, 0, 1]]), (frames, 1, 1))
            c2w = np.tile(np.eye(4), (frames, 1, 1))
            c2w[:, 0, 3] = np.arange(frames) * 0.1
            writer.add(scene, "test" if s else "train", images, K, c2w)
    return root


def write_index(path, entries):
    path.write_text(json.dumps(entries))
    return path


def grey_levels(item) -> list[int]:
    return [round(float(v) * 255) for v in item["image"][:, 0, 0, 0]]


def test_index_file_builds_the_evaluation_set_in_its_order(tmp_path):
    root = write_dataset(tmp_path / "data")
    index = write_index(tmp_path / "index.json", {"s1": {"context": [0, 5], "target": [2, 3, 5]}, "gone": None,
                                                  "s0": {"context": [1, 4], "target": [1, 2, 3]}})
    dataset = P.IndexedEvalSet(root, index, image_size=(6, 8))
    assert len(dataset) == 2 and dataset.index.skipped == ["gone"]
    first, second = dataset[0], dataset[1]
    assert first["num_ref"] == 2 and first["image"].shape == (5, 3, 6, 8)
    assert grey_levels(first) == [40 + 0, 40 + 50, 40 + 20, 40 + 30, 40 + 50]
    assert grey_levels(second) == [10, 40, 10, 20, 30]
    cams = scene_format.read_cameras(scene_format.scene_dir(root, "s0"))
    assert torch.allclose(second["cam2world"][1].double(), torch.from_numpy(cams.c2w[4]))


def test_eval_index_through_the_data_loader_and_spec(tmp_path):
    root = write_dataset(tmp_path / "data")
    index = write_index(tmp_path / "index.json", {"s1": {"context": [0], "target": [2, 4]},
                                                  "s0": {"context": [5], "target": [0, 1]}})
    data = DataSpec(kind="folder", root=str(root), image_size=(6, 8), num_views=2, num_ref=1, batch_size=1)
    spec = EvalSpec(index=str(index), num_scenes=8, batch_size=2)
    _, held_out = build_datasets(data, spec)
    batch, = eval_batches(held_out, spec.num_scenes, spec.batch_size, torch.device("cpu"))
    assert batch["image"].shape == (2, 3, 3, 6, 8) and int(batch["num_ref"]) == 1
    with pytest.raises(SpecError, match="eval.index"):
        Experiment(eval=spec)  # synthetic data has no scene folders to index
    with pytest.warns(UserWarning, match="eval.num_scenes = 1"):
        build_datasets(data, EvalSpec(index=str(index), num_scenes=1))


def test_index_errors_name_the_file_scene_and_frame(tmp_path):
    root = write_dataset(tmp_path / "data")
    unknown = write_index(tmp_path / "a.json", {"s0": {"context": [0], "target": [1]}, "nope": {"context": [0], "target": [1]}})
    with pytest.raises(scene_format.SceneFolderError, match=r"a\.json.*1 of its 2 scenes.*nope.*index_missing"):
        P.IndexedEvalSet(root, unknown)
    with pytest.warns(UserWarning, match="skipped"):
        assert len(P.IndexedEvalSet(root, unknown, missing="skip")) == 1
    frame = write_index(tmp_path / "b.json", {"s0": {"context": [0], "target": [6]}})
    with pytest.raises(scene_format.SceneFolderError, match=r"b\.json: scene 's0' field 'target' names frame\(s\) \[6\].*6 frames"):
        P.IndexedEvalSet(root, frame)
    for bad, match in [({"s0": {"context": [], "target": [1]}}, "'context'"),
                       ({"s0": {"context": [0], "target": [1.5]}}, "'target'"),
                       ({"s0": {"context": [0], "targets": [1]}}, "must be null"),
                       ({"s0": {"context": [0], "target": [1]}, "s1": {"context": [0], "target": [1, 2]}}, "same numbers"),
                       ([], "JSON object")]:
        with pytest.raises(scene_format.SceneFolderError, match=match):
            P.read_evaluation_index(write_index(tmp_path / "c.json", bad))


def test_conventions_record_names_everything_behind_the_numbers(tmp_path):
    exp = Experiment(data=DataSpec(kind="folder", root=str(tmp_path), image_size=(32, 48)),
                     eval=EvalSpec(conventions="pixelsplat", index="idx.json"))
    record = P.conventions_record(exp)
    assert record["ssim"] == "gaussian11" and record["lpips"] == "vgg" and record["index"] == "idx.json"
    assert "center_crop" in record["preprocess"] and "32x48" in record["preprocess"]
    assert P.convention_params(exp)[keys.eval_convention("psnr")] == "per_image"
