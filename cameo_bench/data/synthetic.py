"""Embedded procedural multi-view scenes: a batched pure-torch ray caster.

Why a ray caster of our own: no package renders procedural multi-view scenes with exact depth and
cameras offline (notes/data.md, section 3.1), and correspondence ground truth needs exactly that.
Everything here is chosen so that a correspondence is *exactly* photo-consistent:
  * textures live in object coordinates (they move with the object, never with the camera);
  * Lambert + ambient shading under one fixed world light (colour does not depend on the view);
  * no anti-aliasing (it would blend surfaces at silhouettes and break the colour match).

World frame: z up, floor at z = 0, scene centre at (0, 0, target_height). Cameras: OpenCV axes,
look-at the scene centre, intrinsics in pixels (integer pixel centres), z-depth, 0 = invalid
(rays that hit nothing; with the default room every ray hits a surface).

Rendering is deferred: the intersection pass keeps only the nearest hit distance and a surface id
per ray; normals and textures are evaluated once per pixel afterwards. Rays are built with camera
z = 1, so the ray parameter of a hit *is* its z-depth.

Determinism: scene i is drawn from `torch.Generator().manual_seed(seed + i)` with draws of fixed size,
and rendering uses only per-element IEEE ops and exact min-reductions (no matmul or sums whose
blocking could depend on the batch size; trigonometry happens once per scene, at sampling time), so
an item is bit-identical whether rendered alone, in any batch, or in any worker.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from cameo_bench.geometry import look_at

__all__ = ["SceneConfig", "Scene", "SyntheticScenes", "sample_scene", "render"]

# Surface ids 0..5 are the room faces (-x, +x, -y, +y, floor, ceiling); the floor disk used when
# there is no room reuses id 4. Objects follow from id 6 on.
NUM_ROOM_FACES = 6
FLOOR_ID = 4
_ROOM_NORMALS = torch.tensor(  # inward-facing, indexed by face id
    [[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]]
)

# Where the references sit on the orbit arc: "first" = the first num_ref views (the targets extrapolate
# away from them); "ends" = the two ends of the arc (num_ref = 2), the targets interpolate between them.
REFERENCE_PLACEMENTS = ("first", "ends")

# Texture kinds. The first two repeat (a match is ambiguous up to the period); the rest do not.
TEXTURES = ("checker", "stripes", "noise", "noise_ramp", "blobs")
REPETITIVE = (0, 1)
NON_REPETITIVE = (2, 3, 4)

_LATTICE = 16  # periodic value-noise lattice per scene (period = 16 cells, far larger than objects)
_OCTAVES = 3
_NOISE_CONTRAST = 2.5  # fBm values cluster around 0.5; stretch them to use the colour range
_RAYS_PER_CALL = 65536
_EPS = 1e-4  # minimum hit distance along a ray (z-depth units): rejects hits behind the camera


@dataclass(frozen=True)
class SceneConfig:
    """Knobs of the scene distribution. Ranges are (low, high), drawn uniformly per scene."""

    num_objects: tuple[int, int] = (3, 6)
    box_prob: float = 0.5  # probability that an object is a box rather than a sphere
    repetitive_prob: float = 0.2  # probability of a checker/stripes texture (ambiguous matches)
    room: bool = True  # enclosing textured room (every ray hits); else a floor disk + empty background
    room_half_size: tuple[float, float] = (5.5, 7.0)
    room_height: tuple[float, float] = (4.0, 5.5)
    floor_radius: float = 4.0  # floor disk when room=False
    placement_radius: float = 1.6  # object centres lie in this disk around the scene centre
    sphere_radius: tuple[float, float] = (0.3, 0.7)
    box_half_size: tuple[float, float] = (0.2, 0.6)
    object_texture_freq: tuple[float, float] = (1.5, 3.0)  # texture cells per world unit
    room_texture_freq: tuple[float, float] = (0.6, 1.2)
    target_height: float = 0.5  # scene centre (look-at target) above the floor
    fov_deg: tuple[float, float] = (50.0, 60.0)  # horizontal field of view
    camera_radius: tuple[float, float] = (3.6, 4.4)
    radius_jitter: float = 0.15  # per-view offset of the orbit radius, uniform +-
    elevation_deg: tuple[float, float] = (15.0, 35.0)
    elevation_jitter_deg: float = 4.0  # per-view offset of the elevation, uniform +-
    ambient: float = 0.4
    light_dir: tuple[float, float, float] = (0.4, 0.25, 1.0)  # towards the light, world frame
    background: float = 0.0  # colour of rays that hit nothing (room=False only)

    def __post_init__(self) -> None:
        lo, hi = self.num_objects
        if not 0 <= lo <= hi:
            raise ValueError(f"num_objects must be (low, high) with 0 <= low <= high, got {self.num_objects}")
        reach = self.placement_radius + max(self.sphere_radius[1], self.box_half_size[1] * math.sqrt(2))
        if self.camera_radius[0] - self.radius_jitter <= reach:
            raise ValueError(f"cameras (radius >= {self.camera_radius[0] - self.radius_jitter}) could be "
                             f"inside objects (reach {reach:.2f}); shrink placement_radius or object sizes")
        far = self.camera_radius[1] + self.radius_jitter
        top = self.target_height + far * math.sin(math.radians(self.elevation_deg[1] + self.elevation_jitter_deg))
        if self.room and (far >= self.room_half_size[0] or top >= self.room_height[0]):
            raise ValueError(f"cameras (radius <= {far}, height <= {top:.2f}) could leave the room "
                             f"(half size >= {self.room_half_size[0]}, height >= {self.room_height[0]})")


@dataclass
class Scene:
    """One sampled scene: cameras plus the primitive and texture tables the renderer reads.

    Surface tables have K = 6 + M rows (room faces, then object slots; inactive slots are padding).
    Tests and metrics read the primitives for analytic references.
    """

    intrinsics: torch.Tensor  # [V, 3, 3]
    cam2world: torch.Tensor  # [V, 4, 4]
    room_half_size: float
    room_height: float
    active: torch.Tensor  # [M] bool
    is_box: torch.Tensor  # [M] bool
    centre: torch.Tensor  # [M, 3]
    yaw: torch.Tensor  # [M] radians (boxes rotate about z)
    yaw_cos_sin: torch.Tensor  # [M, 2]
    size: torch.Tensor  # [M, 3] box half extents; spheres use size[:, 0] as radius
    tex_kind: torch.Tensor  # [K] long index into TEXTURES
    tex_colors: torch.Tensor  # [K, 3, 3] three RGB albedos
    tex_freq: torch.Tensor  # [K]
    tex_offset: torch.Tensor  # [K, 3]
    tex_rot: torch.Tensor  # [K, 3, 3] object-to-world rotation of the texture frame
    lattice: torch.Tensor  # [L, L, L, 2] value-noise lattice


class _Draws:
    """Hands out consecutive slices of one uniform draw. One generator call per scene (and numpy for
    the per-scene arithmetic on a few dozen numbers) keeps sampling cheap next to rendering, and the
    fixed layout keeps every scene reproducible."""

    def __init__(self, g: torch.Generator, n: int) -> None:
        self.values = torch.rand(n, generator=g, dtype=torch.float64).numpy()
        self.used = 0

    def uniform(self, lo: float, hi: float, *shape: int) -> np.ndarray:
        n = math.prod(shape)
        out = self.values[self.used : self.used + n].reshape(shape)
        self.used += n
        return lo + (hi - lo) * out


def _num_scene_draws(M: int, K: int) -> int:
    return 3 + 8 * M + 18 * K


def _num_camera_draws(V: int) -> int:
    return 4 + 5 * V


def _quaternion_rotation(u: np.ndarray) -> np.ndarray:  # [n, 3] uniforms -> [n, 3, 3]
    """Uniform random rotations from three uniforms each (Shoemake's subgroup algorithm)."""
    a, b = np.sqrt(1 - u[:, 0]), np.sqrt(u[:, 0])
    t1, t2 = 2 * math.pi * u[:, 1], 2 * math.pi * u[:, 2]
    w, x, y, z = b * np.cos(t2), a * np.sin(t1), a * np.cos(t1), b * np.sin(t2)
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=-2,
    )


def _rot_z(cos: np.ndarray, sin: np.ndarray) -> np.ndarray:  # [..., 3, 3]
    zero, one = np.zeros_like(cos), np.ones_like(cos)
    return np.stack(
        [np.stack([cos, -sin, zero], -1), np.stack([sin, cos, zero], -1), np.stack([zero, zero, one], -1)], -2
    )


def sample_scene(
    index: int,
    *,
    seed: int,
    num_views: int,
    image_size: tuple[int, int],
    azimuth_step_deg: float | None,
    camera_mode: str = "orbit",
    config: SceneConfig = SceneConfig(),
    reference_placement: str = "first",
) -> Scene:
    """Draw scene `index` from its own generator, `torch.Generator().manual_seed(seed + index)`.

    Scene draws have a size fixed by num_objects[1] and camera draws come last, so the number of
    views or the camera mode never changes the scene content. `reference_placement` only reorders
    the views along the orbit arc (see `SyntheticScenes`), so it never changes the cameras drawn.
    """
    if camera_mode not in ("orbit", "random"):
        raise ValueError(f"camera_mode must be 'orbit' or 'random', got {camera_mode!r}")
    if reference_placement not in REFERENCE_PLACEMENTS:
        raise ValueError(f"reference_placement must be one of {list(REFERENCE_PLACEMENTS)}, got {reference_placement!r}")
    if camera_mode == "orbit" and azimuth_step_deg is None:
        raise ValueError("camera_mode='orbit' needs azimuth_step_deg")
    cfg = config
    H, W = image_size
    M = cfg.num_objects[1]
    K = NUM_ROOM_FACES + M
    V = num_views
    g = torch.Generator().manual_seed(seed + index)
    draw = _Draws(g, _num_scene_draws(M, K))
    lattice = torch.rand(_LATTICE, _LATTICE, _LATTICE, 2, generator=g)

    # --- room and objects: 3 + 8M draws -------------------------------------------------------
    room_half = float(draw.uniform(*cfg.room_half_size, 1)[0])
    room_height = float(draw.uniform(*cfg.room_height, 1)[0])
    lo, hi = cfg.num_objects
    n_obj = min(hi, lo + int(draw.uniform(0, hi - lo + 1, 1)[0]))
    active = np.arange(M) < n_obj
    is_box = draw.uniform(0, 1, M) < cfg.box_prob
    radius_xy = cfg.placement_radius * np.sqrt(draw.uniform(0, 1, M))
    angle = draw.uniform(0, 2 * math.pi, M)
    yaw = draw.uniform(0, 2 * math.pi, M)
    sphere_r = draw.uniform(*cfg.sphere_radius, M)
    box_half = draw.uniform(*cfg.box_half_size, M, 3)
    size = np.where(is_box[:, None], box_half, sphere_r[:, None])
    # Objects rest on the floor (overlaps are allowed: they make occlusions, which we want).
    centre = np.stack([radius_xy * np.cos(angle), radius_xy * np.sin(angle), size[:, 2]], axis=-1)
    yaw_cos, yaw_sin = np.cos(yaw), np.sin(yaw)

    # --- textures: 18K draws ---------------------------------------------------------------
    repetitive = draw.uniform(0, 1, K) < cfg.repetitive_prob
    pick = draw.uniform(0, 1, K)
    rep_kind = np.asarray(REPETITIVE)[(pick * len(REPETITIVE)).astype(int)]  # pick < 1: in range
    non_kind = np.asarray(NON_REPETITIVE)[(pick * len(NON_REPETITIVE)).astype(int)]
    tex_kind = np.where(repetitive, rep_kind, non_kind)
    tex_colors = draw.uniform(0.08, 0.95, K, 3, 3)
    freq_u = draw.uniform(0, 1, K)
    room_f, obj_f = cfg.room_texture_freq, cfg.object_texture_freq
    tex_freq = np.concatenate(
        [room_f[0] + (room_f[1] - room_f[0]) * freq_u[:NUM_ROOM_FACES],
         obj_f[0] + (obj_f[1] - obj_f[0]) * freq_u[NUM_ROOM_FACES:]]
    )
    tex_offset = draw.uniform(0, _LATTICE, K, 3)
    sphere_rot = _quaternion_rotation(draw.uniform(0, 1, K, 3)[NUM_ROOM_FACES:])
    obj_rot = np.where(is_box[:, None, None], _rot_z(yaw_cos, yaw_sin), sphere_rot)  # boxes: follow faces
    tex_rot = np.concatenate([np.broadcast_to(np.eye(3), (NUM_ROOM_FACES, 3, 3)), obj_rot])

    assert draw.used == draw.values.size, "draw layout out of sync with _num_scene_draws"

    # --- cameras: 4 + 5V draws -------------------------------------------------------------
    draw = _Draws(g, _num_camera_draws(V))
    fov = float(draw.uniform(*cfg.fov_deg, 1)[0])
    azimuth0 = draw.uniform(0, 360, 1)
    elevation0 = draw.uniform(*cfg.elevation_deg, 1)
    radius0 = draw.uniform(*cfg.camera_radius, 1)
    jitter_el = draw.uniform(-cfg.elevation_jitter_deg, cfg.elevation_jitter_deg, V)
    jitter_r = draw.uniform(-cfg.radius_jitter, cfg.radius_jitter, V)
    random_az = draw.uniform(0, 360, V)
    random_el = draw.uniform(*cfg.elevation_deg, V)
    random_r = draw.uniform(*cfg.camera_radius, V)
    assert draw.used == draw.values.size, "draw layout out of sync with _num_camera_draws"
    if camera_mode == "orbit":
        azimuth = azimuth0 + float(azimuth_step_deg) * np.arange(V)
        elevation = elevation0 + jitter_el
        radius = radius0 + jitter_r
    else:
        azimuth, elevation, radius = random_az, random_el, random_r
    if reference_placement == "ends":  # views 0 and 1 are the arc's two ends, the targets lie between
        order = np.array([0, V - 1, *range(1, V - 1)])
        azimuth, elevation, radius = azimuth[order], elevation[order], radius[order]
    az, el = np.deg2rad(azimuth), np.deg2rad(elevation)
    target = np.array([0.0, 0.0, cfg.target_height])
    eye = target + radius[:, None] * np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1)
    cam2world = look_at(torch.from_numpy(eye), torch.from_numpy(target).expand(V, 3))  # [V, 4, 4], z-up

    focal = (W / 2) / math.tan(math.radians(fov) / 2)
    intrinsics = torch.tensor(
        [[focal, 0.0, (W - 1) / 2], [0.0, focal, (H - 1) / 2], [0.0, 0.0, 1.0]], dtype=torch.float32
    ).expand(V, 3, 3)

    def f32(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    return Scene(
        intrinsics=intrinsics.contiguous(),
        cam2world=cam2world.to(torch.float32),
        room_half_size=room_half,
        room_height=room_height,
        active=torch.from_numpy(active),
        is_box=torch.from_numpy(is_box),
        centre=f32(centre),
        yaw=f32(yaw),
        yaw_cos_sin=f32(np.stack([yaw_cos, yaw_sin], -1)),
        size=f32(size),
        tex_kind=torch.from_numpy(tex_kind.astype(np.int64)),
        tex_colors=f32(tex_colors),
        tex_freq=f32(tex_freq),
        tex_offset=f32(tex_offset),
        tex_rot=f32(tex_rot),
        lattice=lattice,
    )


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _pack(scenes: Sequence[Scene], kind_is_box: bool) -> tuple[torch.Tensor, ...]:
    """Gather the active spheres (or boxes) of every scene into padded [S, m] tables.

    Padding slots get an infinite minimum hit distance, so they never win. Returns
    (centre [S,m,3], size [S,m,3], yaw cos/sin [S,m,2], surface id [S,m], min_t [S,m]).
    """
    picks = [torch.nonzero(s.active & (s.is_box == kind_is_box)).flatten() for s in scenes]
    m = max(1, max(len(p) for p in picks))
    S = len(scenes)
    centre, size = torch.zeros(S, m, 3), torch.ones(S, m, 3)
    yaw, ids = torch.zeros(S, m, 2), torch.zeros(S, m, dtype=torch.long)
    min_t = torch.full((S, m), math.inf)
    for n, (scene, p) in enumerate(zip(scenes, picks)):
        k = len(p)
        centre[n, :k], size[n, :k], yaw[n, :k] = scene.centre[p], scene.size[p], scene.yaw_cos_sin[p]
        ids[n, :k] = p + NUM_ROOM_FACES
        min_t[n, :k] = _EPS
    return centre, size, yaw, ids, min_t


def _slot(x: torch.Tensor) -> torch.Tensor:
    """[S, m] per-slot value -> [S, 1, m, 1], to broadcast against rays [S, V, 1, P]."""
    return x[:, None, :, None]


def _take_nearest(t: torch.Tensor, ids: torch.Tensor, t_best: torch.Tensor, best: torch.Tensor):
    """Merge the nearest slot hit (t [S, V, m, P], ids [S, m]) into the running best [S, V, P]."""
    t_min, slot = t.min(dim=2)
    S, V, _ = t_min.shape
    surface = torch.gather(ids[:, None, :].expand(S, V, -1), 2, slot)
    closer = t_min < t_best
    return torch.where(closer, t_min, t_best), torch.where(closer, surface, best)


def _intersect(scenes: Sequence[Scene], origin: torch.Tensor, d: tuple[torch.Tensor, ...], cfg: SceneConfig):
    """Nearest hit per ray. origin [S,V,3], d = 3 x [S,V,P] -> (t [S,V,P], inf = miss; id [S,V,P]).

    Division by a zero direction component gives +-inf, which the comparisons below handle; NaN
    (0 * inf, a ray origin exactly on a slab plane) compares false and counts as a miss.
    """
    dx, dy, dz = d
    ox, oy, oz = (c[..., None] for c in origin.unbind(-1))  # [S, V, 1] each
    inv_x, inv_y, inv_z = 1 / dx, 1 / dy, 1 / dz

    # Environment: the inside of an axis-aligned room box (exit face), or a floor disk.
    if cfg.room:
        L = torch.tensor([s.room_half_size for s in scenes])[:, None, None]
        Hc = torch.tensor([s.room_height for s in scenes])[:, None, None]
        # The sign of 1/d (not of d) picks the wall, so that d = -0.0 still gives +inf.
        tx = torch.where(inv_x > 0, L - ox, -L - ox) * inv_x
        ty = torch.where(inv_y > 0, L - oy, -L - oy) * inv_y
        tz = torch.where(inv_z > 0, Hc - oz, -oz) * inv_z
        t_best = torch.minimum(torch.minimum(tx, ty), tz)
        best = torch.where(
            t_best == tx,
            (inv_x > 0).long(),
            torch.where(t_best == ty, 2 + (inv_y > 0).long(), 4 + (inv_z > 0).long()),
        )
    else:
        t_floor = -oz * inv_z
        hx, hy = ox + t_floor * dx, oy + t_floor * dy
        hit = (inv_z < 0) & (hx * hx + hy * hy < cfg.floor_radius**2)
        t_best = torch.where(hit, t_floor, math.inf)
        best = torch.full_like(t_floor, FLOOR_ID, dtype=torch.long)

    dx, dy, dz = dx[:, :, None], dy[:, :, None], dz[:, :, None]  # [S, V, 1, P]

    # Spheres: |o + t d - c|^2 = r^2 with a = |d|^2 (d is not unit length): nearer root.
    # (Clamping before sqrt is not cosmetic: producing NaNs makes sqrt several times slower.)
    c, size, _, ids, min_t = _pack(scenes, kind_is_box=False)
    ocx, ocy, ocz = (origin[:, :, None, k, None] - _slot(c[..., k]) for k in range(3))  # [S, V, m, 1]
    cc = ocx * ocx + ocy * ocy + ocz * ocz - _slot(size[..., 0]) ** 2
    a = dx * dx + dy * dy + dz * dz  # [S, V, 1, P]
    b = dx * ocx + dy * ocy + dz * ocz  # [S, V, m, P]
    disc = b * b - a * cc
    t = (b + disc.clamp(min=0).sqrt()) * (-1 / a)
    t = torch.where((disc >= 0) & (t > _slot(min_t)), t, math.inf)
    t_best, best = _take_nearest(t, ids, t_best, best)

    # Boxes (yaw about z): slab test in the box frame.
    c, size, yaw, ids, min_t = _pack(scenes, kind_is_box=True)
    cos, sin = _slot(yaw[..., 0]), _slot(yaw[..., 1])
    px, py, pz = (origin[:, :, None, k, None] - _slot(c[..., k]) for k in range(3))  # [S, V, m, 1]
    local_o = (cos * px + sin * py, -sin * px + cos * py, pz)  # ray origin in the box frame
    local_inv = (1 / (cos * dx + sin * dy), 1 / (cos * dy - sin * dx), inv_z[:, :, None])  # 1 / direction
    t_near = t_far = None
    for k in range(3):
        half = _slot(size[..., k])
        t1, t2 = (-half - local_o[k]) * local_inv[k], (half - local_o[k]) * local_inv[k]
        lo, hi = torch.minimum(t1, t2), torch.maximum(t1, t2)
        t_near = lo if t_near is None else torch.maximum(t_near, lo)
        t_far = hi if t_far is None else torch.minimum(t_far, hi)
    t = torch.where((t_near <= t_far) & (t_near > _slot(min_t)), t_near, math.inf)
    return _take_nearest(t, ids, t_best, best)


# Rows of the packed per-surface table read by the shading pass (one gather for all of them).
_TABLE_ROWS = {
    "centre": 3, "size": 3, "yaw_cos_sin": 2, "normal": 3, "kind": 1,
    "tex_kind": 1, "tex_colors": 9, "tex_freq": 1, "tex_offset": 3, "tex_rot": 9,
}


def _surface_table(scenes: Sequence[Scene]) -> torch.Tensor:  # [F, S*K]
    """Per-surface parameters of all scenes, one column per surface, so one index_select serves all
    pixels and every parameter comes out as a contiguous row."""
    K = NUM_ROOM_FACES + scenes[0].active.numel()
    if any(NUM_ROOM_FACES + s.active.numel() != K for s in scenes):
        raise ValueError("scenes rendered together must share SceneConfig.num_objects[1]")
    F, M = NUM_ROOM_FACES, K - NUM_ROOM_FACES
    columns = []
    for s in scenes:
        parts = {
            "centre": torch.cat([torch.zeros(F, 3), s.centre]),
            "size": torch.cat([torch.ones(F, 3), s.size]),
            "yaw_cos_sin": torch.cat([torch.tensor([[1.0, 0.0]]).expand(F, 2), s.yaw_cos_sin]),
            "normal": torch.cat([_ROOM_NORMALS, torch.zeros(M, 3)]),
            "kind": torch.cat([torch.zeros(F), 1.0 + s.is_box.float()])[:, None],  # room 0, sphere 1, box 2
            "tex_kind": s.tex_kind.float()[:, None],
            "tex_colors": s.tex_colors.reshape(K, 9),
            "tex_freq": s.tex_freq[:, None],
            "tex_offset": s.tex_offset,
            "tex_rot": s.tex_rot.reshape(K, 9),
        }
        columns.append(torch.cat([parts[name] for name in _TABLE_ROWS], dim=1))
    return torch.cat(columns).T.contiguous()


def _split_table(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, width in _TABLE_ROWS.items():
        out[name] = rows[start : start + width]
        start += width
    return out


def _noise_volume(scenes: Sequence[Scene]) -> torch.Tensor:  # [S, 2, L+1, L+1, L+1]
    """Each scene's periodic lattice with its first plane repeated at the end, so that trilinear
    interpolation across the wrap-around needs no index arithmetic."""
    lat = torch.stack([s.lattice for s in scenes]).permute(0, 4, 1, 2, 3)  # [S, 2, L, L, L]
    lat = torch.cat([lat, lat[:, :, :1]], dim=2)
    lat = torch.cat([lat, lat[:, :, :, :1]], dim=3)
    return torch.cat([lat, lat[:, :, :, :, :1]], dim=4)


def _fbm(volume: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Multi-octave smooth value noise, contrast-stretched to [0, 1]. q [3, S, N] -> [2, S, N].

    Trilinear sampling at `cell + smoothstep(frac)` is exactly value noise with a smoothstep fade
    (no visible lattice creases), and grid_sample does all octaves in one call.
    """
    grids = []
    for octave in range(_OCTAVES):
        p = q * (2**octave) + torch.tensor([5.3, 11.7, 2.9])[:, None, None] * octave  # decorrelate octaves
        p = p - _LATTICE * torch.floor(p * (1 / _LATTICE))  # wrap into [0, L)
        cell = p.floor()
        f = p - cell
        grids.append((cell + f * f * (3 - 2 * f)) * (2 / _LATTICE) - 1)
    grid = torch.stack(grids, dim=-1).permute(1, 3, 2, 0)[:, :, :, None, :]  # [S, O, N, 1, 3]
    values = torch.nn.functional.grid_sample(volume, grid, mode="bilinear", align_corners=True)  # [S, 2, O, N, 1]
    total, norm = 0, 0.0
    for octave in range(_OCTAVES):
        total = total + 0.5**octave * values[:, :, octave, :, 0]
        norm += 0.5**octave
    return (0.5 + (total * (1 / norm) - 0.5) * _NOISE_CONTRAST).clamp(0, 1).transpose(0, 1)


def _lerp(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return a + (b - a) * w


def _albedo(tex: dict[str, torch.Tensor], n: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Colour [3, N] from the texture kind, its colours, noise n [2, N] and texture coordinates q [3, N]."""
    c0, c1, c2 = tex["tex_colors"][0:3], tex["tex_colors"][3:6], tex["tex_colors"][6:9]
    kind = tex["tex_kind"][0]
    cell = q.floor()
    checker = (cell[0] + cell[1] + cell[2]) % 2
    stripes = cell[0] % 2
    n0, n1 = n[0], n[1]
    two_tone = _lerp(c0, c1, torch.where(kind == 0, checker, torch.where(kind == 1, stripes, n0)))
    shade = 0.75 + 0.5 * (n1 - 0.5)  # second channel: slow brightness variation
    ramp = torch.where(n0 < 0.5, _lerp(c0, c1, 2 * n0), _lerp(c1, c2, 2 * n0 - 1))
    blob = ((n0 - 0.4) * 5).clamp(0, 1)
    blob = _lerp(c0, c2, blob * blob * (3 - 2 * blob))
    return torch.where(kind <= 2, two_tone, torch.where(kind == 3, ramp, blob) * shade)


def _shade(scenes, cfg, points: torch.Tensor, hit: torch.Tensor, surface: torch.Tensor) -> torch.Tensor:
    """Deferred shading, once per pixel: points [3, S, VP], hit/surface [S, VP] -> rgb [3, S, VP].

    Works on all pixels densely (misses are shaded as surface 0 and then painted background):
    cheaper than compacting, and no data-dependent shapes.
    """
    _, S, N = points.shape
    K = NUM_ROOM_FACES + scenes[0].active.numel()
    flat = (torch.arange(S)[:, None] * K + torch.where(hit, surface, 0)).reshape(-1)
    tex = _split_table(_surface_table(scenes).index_select(1, flat).reshape(-1, S, N))  # rows [*, S, N]
    rel = points - tex["centre"]  # [3, S, N]

    # Normals: room faces from the table, spheres radial, boxes from the dominant local axis.
    cos, sin = tex["yaw_cos_sin"][0], tex["yaw_cos_sin"][1]
    local = (cos * rel[0] + sin * rel[1], cos * rel[1] - sin * rel[0], rel[2])
    ax, ay, az = (local[k].abs() / tex["size"][k] for k in range(3))  # the hit face has the largest
    on_x = (ax >= ay) & (ax >= az)
    on_y = ~on_x & (ay >= az)
    nx, ny = torch.where(on_x, local[0].sign(), 0), torch.where(on_y, local[1].sign(), 0)
    nz = torch.where(on_x | on_y, 0, local[2].sign())
    n_box = torch.stack([cos * nx - sin * ny, sin * nx + cos * ny, nz])
    n_sphere = rel / tex["size"][:1]
    kind = tex["kind"]
    normal = torch.where(kind == 0, tex["normal"], torch.where(kind == 1, n_sphere, n_box))

    # Texture coordinates in the object frame: q = freq * R^T (x - c) + offset.
    R = tex["tex_rot"]  # row-major 3x3: R[k, i] is row 3k + i
    q = R[0:3] * rel[0] + R[3:6] * rel[1] + R[6:9] * rel[2]
    q = q * tex["tex_freq"] + tex["tex_offset"]
    albedo = _albedo(tex, _fbm(_noise_volume(scenes), q), q)  # [3, S, N]

    light = torch.tensor(cfg.light_dir, dtype=torch.float64)
    light = (light / light.norm()).tolist()
    lambert = (normal[0] * light[0] + normal[1] * light[1] + normal[2] * light[2]).clamp(min=0)
    rgb = (albedo * (cfg.ambient + (1 - cfg.ambient) * lambert)).clamp(0, 1)
    return torch.where(hit, rgb, float(cfg.background))


def render(scenes: Sequence[Scene], image_size: tuple[int, int], config: SceneConfig = SceneConfig()) -> dict:
    """Render scenes that share the view count and image size into a batch (B = len(scenes)).

    Returns image [S,V,3,H,W], depth [S,V,H,W] (z-depth, 0 = miss), point_map [S,V,3,H,W] (world,
    0 = miss), intrinsics [S,V,3,3], cam2world [S,V,4,4].
    """
    H, W = image_size
    K = torch.stack([s.intrinsics for s in scenes])  # [S, V, 3, 3]
    c2w = torch.stack([s.cam2world for s in scenes])  # [S, V, 4, 4]
    S, V = K.shape[:2]

    # Camera-frame rays with z = 1 (so the hit distance is the z-depth), rotated to the world.
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    u, v = u.reshape(1, 1, -1), v.reshape(1, 1, -1)  # [1, 1, P]
    xc = (u - K[:, :, 0, 2, None]) / K[:, :, 0, 0, None]  # [S, V, P]
    yc = (v - K[:, :, 1, 2, None]) / K[:, :, 1, 1, None]
    R = c2w[:, :, :3, :3, None]  # [S, V, 3, 3, 1]
    d = tuple(xc * R[:, :, k, 0] + yc * R[:, :, k, 1] + R[:, :, k, 2] for k in range(3))  # 3 x [S, V, P]
    origin = c2w[:, :, :3, 3]  # [S, V, 3]

    t, surface = _intersect(scenes, origin, d, config)  # [S, V, P]
    hit = torch.isfinite(t)
    depth = torch.where(hit, t, 0)
    points = torch.stack([origin[:, :, k, None] + depth * d[k] for k in range(3)])  # [3, S, V, P]
    points = torch.where(hit, points, 0)
    rgb = _shade(scenes, config, points.reshape(3, S, -1), hit.reshape(S, -1), surface.reshape(S, -1))

    def to_image(x):  # [3, S, V*P] -> [S, V, 3, H, W]
        return x.reshape(3, S, V, H, W).permute(1, 2, 0, 3, 4).contiguous()

    return {
        "image": to_image(rgb),
        "depth": depth.reshape(S, V, H, W),
        "point_map": to_image(points),
        "intrinsics": K,
        "cam2world": c2w,
    }


class SyntheticScenes(Dataset):
    """Procedural multi-view scenes in the batch format (items have no batch dimension).

    Item i is a deterministic function of (seed + i) and the arguments; nothing is stored.
    `azimuth_step_deg` is the azimuth change between consecutive views (the baseline knob);
    `camera_mode="random"` places every view at a random azimuth/elevation/radius instead.
    `reference_placement="ends"` (with num_ref=2) puts the two references at the ends of the orbit
    arc and the targets between them: interpolation, where most of every target is seen by some
    reference (on 32 px scenes at 20 degree steps the depth-warp oracle reaches ~22.7 dB against
    ~15.7 dB for the best trivial predictor, vs 18.6 vs 15.6 dB when one reference extrapolates
    30 and 60 degrees: there most of a target is unseen, so no model can beat the floors by much).
    `num_ref=0` makes every view a target: unconditional samples, e.g. `num_views=1` for the
    single-view image prior that a multi-view model is then initialised from (SD -> CAT3D).
    Extra keyword arguments are `SceneConfig` fields.
    """

    def __init__(
        self,
        num_scenes: int,
        num_views: int,
        image_size: int | tuple[int, int],
        azimuth_step_deg: float | None,
        seed: int,
        *,
        num_ref: int = 1,
        camera_mode: str = "orbit",
        reference_placement: str = "first",
        render_batch_size: int | None = None,
        **scene_options: Any,
    ) -> None:
        valid = {f.name for f in dataclasses.fields(SceneConfig)}
        unknown = sorted(set(scene_options) - valid)
        if unknown:
            raise TypeError(f"unknown SyntheticScenes option(s) {unknown}; valid: {sorted(valid)}")
        if not 0 <= num_ref < num_views:
            raise ValueError(f"need 0 <= num_ref < num_views, got num_ref={num_ref}, num_views={num_views}")
        self.num_scenes = int(num_scenes)
        self.num_views = int(num_views)
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be an int or (H, W) of positive ints, got {image_size}")
        self.azimuth_step_deg = azimuth_step_deg
        self.seed = int(seed)
        self.num_ref = int(num_ref)
        self.camera_mode = camera_mode
        if reference_placement == "ends" and (num_ref != 2 or camera_mode != "orbit"):
            raise ValueError("reference_placement='ends' puts the 2 references at the ends of the orbit arc: "
                             f"it needs num_ref=2 and camera_mode='orbit', got num_ref={num_ref}, {camera_mode!r}")
        self.reference_placement = reference_placement
        # Default: about 64k rays per render call. Fewer means Python overhead dominates, more
        # means the per-slot intersection tensors fall out of cache (measured on one thread).
        rays_per_scene = self.num_views * self.image_size[0] * self.image_size[1]
        self.render_batch_size = int(render_batch_size or max(1, _RAYS_PER_CALL // rays_per_scene))
        self.config = SceneConfig(**scene_options)
        self.scene(0)  # fail now, not in a worker, on bad camera settings

    def __len__(self) -> int:
        return self.num_scenes

    def scene(self, index: int) -> Scene:
        """The sampled primitives and cameras of scene `index` (analytic geometry for tests/metrics)."""
        if not 0 <= index < self.num_scenes:
            raise IndexError(f"scene index {index} out of range [0, {self.num_scenes})")
        return sample_scene(
            index,
            seed=self.seed,
            num_views=self.num_views,
            image_size=self.image_size,
            azimuth_step_deg=self.azimuth_step_deg,
            camera_mode=self.camera_mode,
            config=self.config,
            reference_placement=self.reference_placement,
        )

    def render_scenes(self, indices: Sequence[int]) -> dict[str, Any]:
        """Render several scenes at once into a batch [B, ...]; identical to stacking items."""
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError("render_scenes needs at least one scene index")
        parts = []
        for start in range(0, len(indices), self.render_batch_size):
            chunk = [self.scene(i) for i in indices[start : start + self.render_batch_size]]
            parts.append(render(chunk, self.image_size, self.config))
        batch = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        batch["num_ref"] = self.num_ref
        return batch

    def __getitem__(self, index: int) -> dict[str, Any]:
        batch = self.render_scenes([index])
        return {key: (value[0] if isinstance(value, torch.Tensor) else value) for key, value in batch.items()}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Batched fetch used by DataLoader: one render call per batch instead of one per item."""
        batch = self.render_scenes(indices)
        return [
            {key: (value[n] if isinstance(value, torch.Tensor) else value) for key, value in batch.items()}
            for n in range(len(indices))
        ]
