"""What the converters write through the scene-folder writer beyond images and cameras: sparse
tracks (points3d.npz + tracks/<frame>.npz, interface D) and already encoded or lazily produced
frames; each checked against the arrays and bytes handed in."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from cameo_bench.data.scene_format import (
    EncodedImage,
    SceneFolderError,
    SparseTracks,
    read_cameras,
    read_scene,
    write_scene,
)

H, W = 10, 14
K = np.array([[12.0, 0, 6.5], [0, 12.0, 4.5], [0, 0, 1]])


def images(n):
    return np.random.default_rng(0).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


def tracks(n):
    ids = np.array([4, 9, 2, 30], dtype=np.int64)
    xyz = np.arange(12, dtype=np.float64).reshape(4, 3) / 10
    frames = [(ids[[0, 2]], np.array([[0.0, 0.0], [W - 0.5, H - 0.5]])), (ids[[3]], np.array([[5.25, 3.5]]))]
    return SparseTracks(ids, xyz, frames[:n])


def test_tracks_round_trip(tmp_path):
    write_scene(tmp_path / "s", images(2), np.stack([K] * 2), np.stack([np.eye(4)] * 2), tracks=tracks(2))
    cams = read_cameras(tmp_path / "s")
    assert cams.has_tracks and json.loads((tmp_path / "s" / "cameras.json").read_text())["tracks"] is True
    with np.load(tmp_path / "s" / "points3d.npz") as f:  # the interface: names and dtypes
        assert f["xyz"].dtype == np.float32 and f["ids"].dtype == np.int64
    with np.load(tmp_path / "s" / "tracks" / "000001.npz") as f:
        assert f["point_ids"].dtype == np.int64 and f["uv"].dtype == np.float32
        np.testing.assert_array_equal(f["point_ids"], [30])
        np.testing.assert_array_equal(f["uv"], [[5.25, 3.5]])
    scene = read_scene(tmp_path / "s")
    np.testing.assert_array_equal(scene.tracks.ids, [4, 9, 2, 30])
    np.testing.assert_allclose(scene.tracks.xyz, np.arange(12).reshape(4, 3) / 10, rtol=1e-7)
    np.testing.assert_array_equal(scene.tracks.frames[0][0], [4, 2])
    write_scene(tmp_path / "plain", images(2), np.stack([K] * 2), np.stack([np.eye(4)] * 2))
    assert not read_cameras(tmp_path / "plain").has_tracks and read_scene(tmp_path / "plain").tracks is None


def test_bad_tracks_are_refused_naming_the_frame(tmp_path):
    t = tracks(2)
    t.frames[1] = (np.array([30]), np.array([[W - 0.4, 2.0]]))  # just off the right edge
    with pytest.raises(SceneFolderError, match=r"tracks.frames\[1\] \(frame '000001'\): 1 observations lie outside"):
        write_scene(tmp_path / "a", images(2), np.stack([K] * 2), np.stack([np.eye(4)] * 2), tracks=t)
    t = tracks(2)
    t.frames[0] = (np.array([4, 5]), np.zeros((2, 2)))
    with pytest.raises(SceneFolderError, match=r"point ids \[5\] are not in tracks.ids"):
        write_scene(tmp_path / "b", images(2), np.stack([K] * 2), np.stack([np.eye(4)] * 2), tracks=t)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    write_scene(tmp_path / "c", images(2), np.stack([K] * 2), np.stack([np.eye(4)] * 2), tracks=tracks(2))
    (tmp_path / "c" / "tracks" / "000000.npz").unlink()
    with pytest.raises(SceneFolderError, match=r"field 'tracks' is true but .*tracks/000000.npz is missing"):
        read_cameras(tmp_path / "c")


def test_encoded_and_lazy_frames(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(images(1)[0]).save(buf, format="JPEG", quality=90)
    jpg = buf.getvalue()
    lazy_calls = []

    def lazy():
        lazy_calls.append(1)
        return images(2)[1]

    write_scene(tmp_path / "s", [EncodedImage(jpg, "chunk.torch [0] images[0]"), lazy],
                np.stack([K] * 2), np.stack([np.eye(4)] * 2))
    cams = read_cameras(tmp_path / "s")
    assert cams.image_paths[0].suffix == ".jpg" and cams.image_paths[0].read_bytes() == jpg
    np.testing.assert_array_equal(read_scene(tmp_path / "s").images[1], images(2)[1])
    assert lazy_calls == [1]
    with pytest.raises(SceneFolderError, match=r"chunk.torch \[0\] images\[1\]: cannot decode image"):
        write_scene(tmp_path / "bad", [EncodedImage(jpg, "x"), EncodedImage(jpg[:60], "chunk.torch [0] images[1]")],
                    np.stack([K] * 2), np.stack([np.eye(4)] * 2))
    with pytest.raises(SceneFolderError, match=r"origin-name: not a png or jpg"):
        write_scene(tmp_path / "bad2", [EncodedImage(b"GIF89a....", "origin-name")], K[None], np.eye(4)[None])
