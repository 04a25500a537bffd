"""Lens distortion undone once, at conversion: OpenCV remap of the images, the same model for 2D points.

Every converted scene is a pinhole camera (the scene format has no distortion field), so a source
camera with distortion is turned into a pinhole one here: the image is resampled and the new K is
written out; its 2D observations (COLMAP points3D tracks) are moved by the same model, so tracks
stay exact after undistortion.

Distortion model (OpenCV's radial-tangential model; COLMAP's SIMPLE_RADIAL, RADIAL, OPENCV and
FULL_OPENCV and nerfstudio / instant-ngp's k1 k2 k3 p1 p2 are special cases of it). With
(x, y) = ((u - cx) / fx, (v - cy) / fy) the ideal (pinhole) normalised coordinates and
r^2 = x^2 + y^2, the camera observes

    x_d = x * radial + 2 p1 x y + p2 (r^2 + 2 x^2)
    y_d = y * radial + p1 (r^2 + 2 y^2) + 2 p2 x y
    radial = (1 + k1 r^2 + k2 r^4 + k3 r^6) / (1 + k4 r^2 + k5 r^4 + k6 r^6)

at pixel (fx x_d + cx, fy y_d + cy). Coefficients are kept in OpenCV's order
(k1, k2, p1, p2[, k3[, k4, k5, k6]]). SIMPLE_RADIAL (f, cx, cy, k) is k1 = k; RADIAL (k1, k2).

The new K: `cv2.getOptimalNewCameraMatrix(K, dist, size, alpha=0)` at the source image size, i.e.
the pinhole camera whose whole image maps inside the source image, so the stored frame holds no
invented (black) pixels: barrel distortion zooms out a little, pincushion zooms in. (OpenCV finds
that rectangle from a grid of border samples, so a row of edge pixels may still come from just
outside the source.) The image is resampled with `cv2.initUndistortRectifyMap` + bilinear
`cv2.remap`; points with `cv2.undistortPoints(P=new K)` iterated to 1e-12, so a point maps to where
its content lands in the undistorted image.

Pixel convention: cv2 works in pixel indices, centre of the top-left pixel at (0, 0), the
project's convention; K and points must already be in it (COLMAP's are shifted by -0.5 first; the
distortion is defined on normalised coordinates, so the shift of u and cx together changes nothing).

Images are read with EXIF orientation ignored (as COLMAP and PIL read them: the stored pixel grid)
and written back in the source's format: PNG losslessly, JPEG at quality `JPEG_QUALITY`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from cameo_bench.data.scene_format import EncodedImage, SceneFolderError

JPEG_QUALITY = 95
POINT_CRITERIA = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-12)


def is_distorted(coeffs) -> bool:
    return bool(np.any(np.asarray(coeffs, dtype=np.float64) != 0))


@dataclass
class Undistorter:
    """Undistortion of one camera (K in the project's pixel convention, OpenCV coefficients, size)."""

    K: np.ndarray  # [3, 3] distorted camera
    coeffs: np.ndarray  # OpenCV order, 4, 5 or 8 values
    hw: tuple[int, int]
    K_new: np.ndarray = field(init=False)  # [3, 3] pinhole camera of the undistorted image
    _maps: tuple | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.K = np.asarray(self.K, dtype=np.float64)
        self.coeffs = np.asarray(self.coeffs, dtype=np.float64)
        h, w = self.hw
        K_new, _ = cv2.getOptimalNewCameraMatrix(self.K, self.coeffs, (w, h), 0, (w, h))
        if not np.isfinite(K_new).all() or K_new[0, 0] <= 0 or K_new[1, 1] <= 0:
            raise SceneFolderError(f"distortion {self.coeffs.tolist()} of camera {self.K.tolist()} has no valid "
                                   "undistorted pinhole camera (coefficients too strong?)")
        self.K_new = K_new

    def maps(self) -> tuple[np.ndarray, np.ndarray]:
        """Per undistorted pixel, the source pixel to sample (computed once per camera)."""
        if self._maps is None:
            h, w = self.hw
            self._maps = cv2.initUndistortRectifyMap(self.K, self.coeffs, None, self.K_new, (w, h), cv2.CV_32FC1)
        return self._maps

    def image_array(self, bgr: np.ndarray) -> np.ndarray:
        """[H, W, 3] source -> [H, W, 3] undistorted (bilinear; outside the source: black)."""
        map_x, map_y = self.maps()
        return cv2.remap(bgr, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)

    def image(self, src: Path) -> EncodedImage:
        """Read `src`, undistort, encode as its own format."""
        bgr = cv2.imread(str(src), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if bgr is None:
            raise SceneFolderError(f"{src}: cannot decode image")
        if bgr.shape[:2] != tuple(self.hw):
            raise SceneFolderError(f"{src}: image is {bgr.shape[0]}x{bgr.shape[1]} (HxW), its camera "
                                   f"{self.hw[0]}x{self.hw[1]}")
        out = self.image_array(bgr)
        if src.suffix.lower() in (".jpg", ".jpeg"):
            ok, data = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        else:
            ok, data = cv2.imencode(".png", out, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise SceneFolderError(f"{src}: cannot encode the undistorted image")
        return EncodedImage(data.tobytes(), origin=f"{src} (undistorted)", hw=out.shape[:2])

    def points(self, uv: np.ndarray) -> np.ndarray:
        """[n, 2] observed pixels of the source -> [n, 2] pixels of the undistorted image (K_new)."""
        uv = np.asarray(uv, dtype=np.float64).reshape(-1, 1, 2)
        if len(uv) == 0:
            return np.zeros((0, 2))
        out = cv2.undistortPoints(uv, self.K, self.coeffs, R=None, P=self.K_new, criteria=POINT_CRITERIA)
        return out.reshape(-1, 2)


class UndistorterCache:
    """One `Undistorter` per distinct camera, so the remap tables of a shared camera are built once."""

    def __init__(self):
        self._items: dict[bytes, Undistorter] = {}

    def get(self, K: np.ndarray, coeffs, hw: tuple[int, int]) -> Undistorter:
        K, coeffs = np.asarray(K, dtype=np.float64), np.asarray(coeffs, dtype=np.float64)
        key = K.tobytes() + coeffs.tobytes() + np.asarray(hw, dtype=np.int64).tobytes()
        if key not in self._items:
            self._items[key] = Undistorter(K, coeffs, tuple(int(v) for v in hw))
        return self._items[key]


def inside(uv: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """[n] bool: the point lies on the image (pixel centres at integers, edges at -0.5 and W - 0.5)."""
    h, w = hw
    return (uv[:, 0] >= -0.5) & (uv[:, 0] <= w - 0.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] <= h - 0.5)
