"""The synthetic line: images of one machined part, good and defective.

Tests, the demo, benchmarks and the camera simulator need a supply of plausible
inspection frames without a camera or a data set. Every image shows the same
product: a square, face-turned metal plate with rounded corners and a central
bore, lying on a dark matte belt. Good images differ only in nuisance (a few
pixels of shift, a few degrees of rotation, lighting gain, offset and gradient
of a few percent, turning-mark phase and tool chatter, sensor noise); a
defective image is drawn from exactly the same nuisance distribution and then
gets one local defect, so only the defect tells the two apart.

The amounts are tuned so that DFKDE on a random-weight ResNet-18 (what the
tests use) ranks defects first, and small changes can undo that. Such a network
(timm zero-initialises the last norm of each residual block) sees only 11-pixel
patches 32 pixels apart at a 256 input, and it takes a flat change of brightness
or colour over a patch for a change of light. Hence defects that spread over a
region (a scuff, a cluster of pits, a branching crack, a stain with a rim), a
plate whose edges fall between those patches, and no per-channel colour jitter
(a machine-vision camera's white balance is fixed): undoing any one of them cost
from a few to 25 points of AUROC in the tuning runs.

Everything is numpy and deterministic from a `numpy.random.Generator`; a
256 x 256 frame takes a few milliseconds. The nuisance, sensor noise included,
is drawn before anything about the defect, so `good_part(rng)` and
`defective_part(rng)` from the same generator state show the same part under
the same light and differ only where the defect is.

Each defect's ground truth (`defective_part_and_mask`) comes from the drawing
itself, not from the pixels, so pixel-level judging of anomaly maps has exact
masks; `write_line` writes them where MVTec AD keeps its own (`ground_truth/`).
"""

from __future__ import annotations

import functools
import math
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from inspector import imageformats

DEFECT_KINDS: tuple[str, ...] = ("scratch", "hole", "stain", "crack", "missing_corner")
"""Every kind of defect the line produces; `write_folder` makes one folder per kind."""

_MIN_SIZE = 32

# The product. Lengths in part units are fractions of the plate's half-width.
_HALF_WIDTH = 0.31  # of the image; at 0.36 or 0.4 the edges cross a random ResNet's patches (see above)
_CORNER_RADIUS = 0.14
_BORE_RADIUS = 0.17
_CHAMFER = 0.05
_TURNING_PITCH_PX = 4.2  # at size 256; scales with the image, but never under _MIN_PITCH_PX
_MIN_PITCH_PX = 2.5  # finer marks would alias into moire on small frames
_MIN_LINE_PX = 1.0  # scratches and cracks stay visible on small frames
_LIGHT_ANGLE = -0.75 * math.pi  # the ring light's brightest side, in the image: upper left
# How much each nuisance varies (uniform half-ranges or standard deviations, as drawn below).
_SHIFT = 0.012  # fraction of the image size
_ANGLE_DEG = 3.0
_SCALE = 0.01
_GAIN = 0.02
_OFFSET = 0.01
_GRADIENT = 0.02
# How strong each texture is, in units of full scale.
_RINGS = 0.025
_CHATTER = 0.01
_CHATTER_RINGS = 6.0  # how many neighbouring rings a chatter swell spans
_SHEEN = 0.05
_SECTOR = 0.007
_BELT_MOTTLE = 0.012
_NOISE_FLOOR = 0.004
_NOISE_SHOT = 0.007
_METAL_RGB = np.array([0.96, 1.0, 1.05], dtype=np.float32)
_BELT_RGB = np.array([0.92, 1.0, 0.96], dtype=np.float32)
_STAIN_TINTS = (
    np.array([0.86, 0.60, 0.38], dtype=np.float32),  # rust
    np.array([0.52, 0.48, 0.62], dtype=np.float32),  # oil film, dark with a violet cast
    np.array([1.22, 1.18, 0.92], dtype=np.float32),  # dried coolant, yellowish white
)
_STAIN_EDGE_TINT = np.array([0.62, 0.52, 0.42], dtype=np.float32)  # what collects at a dried drop's edge


@dataclass(frozen=True)
class _Nuisance:
    """What varies between good parts: pose, light, surface finish and sensor noise."""

    shift: tuple[float, float]  # pixels, x and y
    angle: float  # radians
    scale: float
    gain: float
    offset: float
    gradient: tuple[float, float]  # lighting slope across the frame, x and y
    ring_phase: float
    chatter: np.ndarray  # per-ring brightness variation of the turning marks
    sector: np.ndarray  # slow brightness variation around the part: cos, sin of 1 and 2 theta
    belt: np.ndarray  # coarse grid of belt mottling
    noise: np.ndarray  # sensor noise, 3 x H x W (channels first, see _render), zero mean, unit variance


@dataclass(frozen=True)
class _Defect:
    kind: str
    params: dict


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < _MIN_SIZE:
        raise ValueError(f"size must be an integer >= {_MIN_SIZE}, got {size!r}")


def _draw_nuisance(rng: np.random.Generator, size: int) -> _Nuisance:
    """Draw every nuisance of one frame, in a fixed order, before anything about a defect."""
    return _Nuisance(
        shift=(float(rng.uniform(-_SHIFT, _SHIFT) * size), float(rng.uniform(-_SHIFT, _SHIFT) * size)),
        angle=float(np.deg2rad(rng.uniform(-_ANGLE_DEG, _ANGLE_DEG))),
        scale=float(rng.uniform(1.0 - _SCALE, 1.0 + _SCALE)),
        gain=float(rng.normal(1.0, _GAIN)),
        offset=float(rng.normal(0.0, _OFFSET)),
        gradient=(float(rng.normal(0.0, _GRADIENT)), float(rng.normal(0.0, _GRADIENT))),
        ring_phase=float(rng.uniform(0.0, 2 * math.pi)),
        chatter=_chatter(rng),
        sector=rng.normal(0.0, 1.0, 4).astype(np.float32),
        belt=rng.normal(0.0, 1.0, (6, 6)).astype(np.float32),
        noise=_sensor_noise(rng, size),
    )


def _chatter(rng: np.random.Generator, n_rings: int = 512) -> np.ndarray:
    """Brightness of each turning mark: tool vibration swells and fades over several
    rings, so neighbouring rings are alike rather than independent static."""
    knots = int(n_rings / _CHATTER_RINGS) + 2
    swell = _interpolation_matrix(n_rings, knots) @ rng.normal(0.0, 1.0, knots).astype(np.float32)
    return (swell * math.sqrt(1.5)).astype(np.float32)  # linear interpolation loses a third of the variance


def _sensor_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Unit-variance triangular noise from random bytes: close enough to Gaussian for a
    sensor, and several times faster than `standard_normal`, which would dominate a frame."""
    b = np.frombuffer(rng.bytes(2 * 3 * size * size), dtype=np.uint8).reshape(2, 3, size, size)
    noise = b[0].astype(np.float32)
    noise -= b[1]
    noise *= 1.0 / 104.5  # std of the difference of two uniform bytes
    return noise


def _draw_defect(rng: np.random.Generator, kind: str | None) -> _Defect:
    """Draw one defect's shape, in part coordinates, so it moves with the part.

    Local defects spread over a region a fifth to a third of the plate wide (a scuff
    of several scratches, a cluster of pits, a branching crack, a wide stain) rather
    than one tiny mark: real damage looks like that, and it is what a detector that
    pools coarse features can see at all (a random-weight ResNet looks at 11-pixel
    patches 32 pixels apart).
    """
    if kind is None:
        kind = DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))]
    if kind == "missing_corner":
        corner = (float(rng.choice([-1.0, 1.0])), float(rng.choice([-1.0, 1.0])))
        return _Defect(
            kind,
            {
                "corner": corner,
                "leg": float(rng.uniform(0.45, 0.70)),  # length cut off each side, part units
                "tilt": float(rng.uniform(-0.25, 0.25)),  # radians off the 45 degree cut
                "jag": rng.normal(0.0, 1.0, (4, 2)).astype(np.float32),  # break roughness harmonics
                "facets": rng.normal(0.0, 1.0, (6, 2)).astype(np.float32),  # grain of the broken face
            },
        )
    cu, cv = _surface_point(rng)
    if kind == "scratch":
        # a scuff: a few nearly parallel strokes of one drag, each bright (burnished) or dark (gouged)
        direction = float(rng.uniform(0.0, math.pi))
        length = float(rng.uniform(0.6, 1.0))
        n = int(rng.integers(3, 7))
        strands = []
        for _ in range(n):
            a = direction + float(rng.normal(0.0, 0.05))
            du, dv = math.cos(a), math.sin(a)
            offset = float(rng.uniform(-0.12, 0.12))
            start, stop = sorted(rng.uniform(-0.5, 0.5, 2) * length)
            start, stop = min(start, -0.25 * length), max(stop, 0.25 * length)
            t = np.linspace(start, stop, 6)
            bow = float(rng.uniform(-0.04, 0.04)) * (1 - (2 * t / length) ** 2)
            su, sv = cu - offset * dv, cv + offset * du
            strands.append(np.stack([su + t * du - bow * dv, sv + t * dv + bow * du], axis=1))
        return _Defect(
            kind,
            {
                "strands": strands,
                "widths": rng.uniform(0.022, 0.04, n).astype(np.float32),  # 1.7 to 3.2 pixels at size 256
                "contrasts": (rng.choice([-1.0, 1.0]) * rng.uniform(0.35, 0.55, n)).astype(np.float32),
            },
        )
    if kind == "hole":
        # porosity: one pit and a few smaller ones around it
        n = int(rng.integers(4, 8))
        offsets = np.concatenate([[[0.0, 0.0]], rng.uniform(-0.25, 0.25, (n - 1, 2))])
        radii = np.concatenate([[rng.uniform(0.09, 0.13)], rng.uniform(0.04, 0.07, n - 1)])
        pits = np.column_stack([offsets + (cu, cv), radii]).astype(np.float32)
        return _Defect(kind, {"pits": pits, "depth": float(rng.uniform(0.85, 0.95))})
    if kind == "stain":
        return _Defect(
            kind,
            {
                "centre": (cu, cv),
                "radius": float(rng.uniform(0.22, 0.32)),
                # outline wobble; higher harmonics weaker, so the blob is irregular but not boxy
                "harmonics": (rng.normal(0.0, 0.12, (4, 2)) / np.arange(1, 5)[:, None]).astype(np.float32),
                "tint": _STAIN_TINTS[int(rng.integers(len(_STAIN_TINTS)))],
                "strength": float(rng.uniform(0.7, 1.0)),
                "mottle": rng.normal(0.0, 1.0, (9, 9)).astype(np.float32),  # blotchy, uneven drying
                "rim": float(rng.uniform(0.5, 0.9)),  # a dried drop leaves its edge darker
            },
        )
    # crack: a jagged walk that keeps its general course (the heading is pulled back
    # towards it at every kink), with one or two side branches
    course = float(rng.uniform(0.0, 2 * math.pi))
    walk = _jagged_walk(rng, (cu, cv), course, int(rng.integers(12, 19)), (0.045, 0.07))
    walk -= walk.mean(axis=0) - (cu, cv)  # centre the crack where it was placed
    paths = [walk]
    for _ in range(int(rng.integers(2, 4))):
        at = int(rng.integers(2, len(walk) - 2))
        side = course + float(rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.1))
        paths.append(_jagged_walk(rng, tuple(walk[at]), side, int(rng.integers(3, 7)), (0.035, 0.06)))
    return _Defect(
        kind,
        {
            "paths": paths,
            "width": float(rng.uniform(0.024, 0.036)),  # 1.9 to 2.9 pixels at size 256
            "darkness": float(rng.uniform(0.7, 0.85)),
        },
    )


def _jagged_walk(
    rng: np.random.Generator, start: tuple[float, float], course: float, n: int, step: tuple[float, float]
) -> np.ndarray:
    """n kinked steps from start, keeping to `course`: the outline of a crack."""
    points = [np.asarray(start, dtype=np.float64)]
    heading = course
    for length, turn in zip(rng.uniform(*step, n), rng.normal(0.0, 0.6, n)):
        heading = course + 0.4 * (heading - course) + float(turn)
        points.append(points[-1] + length * np.array([math.cos(heading), math.sin(heading)]))
    return np.stack(points)


def _surface_point(rng: np.random.Generator) -> tuple[float, float]:
    """A point on the flat face, clear of the bore and the rim, where a local defect can sit."""
    while True:
        u, v = rng.uniform(-0.6, 0.6, 2)
        if math.hypot(u, v) > _BORE_RADIUS + _CHAMFER + 0.2:
            return float(u), float(v)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


@functools.lru_cache(maxsize=32)
def _interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation from n_in samples to n_out, as a matrix (n_out x n_in)."""
    t = np.linspace(0.0, n_in - 1.0, n_out)
    i = np.minimum(t.astype(np.int64), n_in - 2)
    f = t - i
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), i] = 1 - f
    m[np.arange(n_out), i + 1] = f
    m.setflags(write=False)
    return m


def _upsample(grid: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Bilinear upsampling of a small grid: cheap low-frequency variation (two small matrix products)."""
    return _interpolation_matrix(rows, grid.shape[0]) @ grid @ _interpolation_matrix(cols, grid.shape[1]).T


def _polyline_distance(
    u: np.ndarray, v: np.ndarray, path: np.ndarray, reach: float, pixels: np.ndarray
) -> np.ndarray:
    """Distance from each point of a window to a polyline, in part units; inf beyond `reach`.

    u, v: the window's part coordinates; pixels: the path's vertices in the window's
    pixel coordinates (column, row). Each segment is measured only in its own
    bounding box, which keeps long, many-kinked cracks cheap.
    """
    best = np.full(u.shape, np.inf, dtype=np.float32)
    h, w = u.shape
    for i in range(len(path) - 1):
        (x0, y0), (x1, y1) = pixels[i], pixels[i + 1]
        r0, r1 = max(int(min(y0, y1) - reach) - 1, 0), min(int(max(y0, y1) + reach) + 2, h)
        c0, c1 = max(int(min(x0, x1) - reach) - 1, 0), min(int(max(x0, x1) + reach) + 2, w)
        if r0 >= r1 or c0 >= c1:
            continue
        su, sv = u[r0:r1, c0:c1], v[r0:r1, c0:c1]
        (u0, v0), (u1, v1) = path[i], path[i + 1]
        du, dv = u1 - u0, v1 - v0
        t = np.clip(((su - u0) * du + (sv - v0) * dv) / max(du * du + dv * dv, 1e-12), 0.0, 1.0)
        eu, ev = su - u0 - t * du, sv - v0 - t * dv
        np.minimum(best[r0:r1, c0:c1], np.sqrt(eu * eu + ev * ev), out=best[r0:r1, c0:c1])
    return best


def _lines(u, v, paths, widths, halo: float, half: float, to_pixels):
    """Profiles of polylines over the window they cover: (rows, cols, cores, glow).

    cores[i] is 1 on path i and falls to 0 one width from it; glow, over all paths,
    falls to 0 `halo` widths away: the dulled or discoloured margin real marks have.
    """
    widths = [max(float(w), _MIN_LINE_PX / half) for w in widths]
    pixels = [np.array([to_pixels(q) for q in path]) for path in paths]
    rows, cols = _window(np.concatenate(pixels), halo * max(widths) * half, u.shape[0])
    uw, vw = u[rows, cols], v[rows, cols]
    origin = np.array([cols.start, rows.start])
    cores, glow = [], np.zeros(uw.shape, dtype=np.float32)
    for path, px, width in zip(paths, pixels, widths):
        d = _polyline_distance(uw, vw, path, halo * width * half + 1, px - origin)
        cores.append(_smoothstep(1.0 - d / width))
        np.maximum(glow, _smoothstep(1.0 - d / (halo * width)), out=glow)
    return rows, cols, cores, glow


def _window(points_px: np.ndarray, margin_px: float, size: int) -> tuple[slice, slice]:
    """The rows and columns around a defect; drawing only there keeps a frame cheap."""
    lo = np.floor(points_px.min(axis=0) - margin_px - 2).astype(int)
    hi = np.ceil(points_px.max(axis=0) + margin_px + 3).astype(int)
    return slice(max(lo[1], 0), min(hi[1], size)), slice(max(lo[0], 0), min(hi[0], size))


def _draw_local_defect(
    defect: _Defect, u: np.ndarray, v: np.ndarray, metal: np.ndarray, half: float, to_pixels
) -> tuple[tuple[slice, slice, np.ndarray] | None, tuple[slice, slice, np.ndarray]]:
    """Mark a scratch, hole or crack into the surface brightness, in place; return (stain, extent).

    A stain changes colour, not brightness alone, so it is returned instead: the
    window it covers and a 3 x h x w factor for the metal's colour there (None for
    the others). The extent is where the defect is, for its ground-truth mask: the
    window and a boolean mask in it, taken from the same profiles the drawing used,
    so the mask follows the drawing rather than a guess from the pixels.
    """
    size = u.shape[0]
    p = defect.params
    if defect.kind == "scratch":
        rows, cols, cores, haze = _lines(u, v, p["strands"], p["widths"], 4.0, half, to_pixels)
        window = metal[rows, cols]
        window += (0.6 - window) * (0.5 * haze)  # abrasion dulls the turning marks around a scuff
        for contrast, core in zip(p["contrasts"], cores):
            window += contrast * core
        return None, (rows, cols, np.max(cores, axis=0) > 0)  # the strokes; the faint haze is no defect
    if defect.kind == "hole":
        pits = p["pits"]
        margin = float(pits[:, 2].max() + 0.04) * half  # the largest pit and its burr
        rows, cols = _window(np.array([to_pixels(q) for q in pits[:, :2]]), margin, size)
        uw, vw = u[rows, cols], v[rows, cols]
        window = metal[rows, cols]
        where = np.zeros(window.shape, dtype=bool)
        light_u, light_v = math.cos(_LIGHT_ANGLE), math.sin(_LIGHT_ANGLE)
        for a, b, rr in pits:
            eu, ev = uw - a, vw - b
            d = np.sqrt(eu * eu + ev * ev)
            facing = (eu * light_u + ev * light_v) / np.maximum(d, 1e-6)  # cos of the angle to the light
            inside = np.clip(0.5 - (d - rr) * half, 0.0, 1.0)
            # the far wall catches the light, the near one is in shadow; a raised burr rings the pit
            wall = 0.6 * (1 - p["depth"]) + 0.12 * np.clip(-facing, 0.0, 1.0) * (d / rr)
            window[:] = window * (1 - inside) + wall * inside
            rim = _smoothstep(1.0 - np.abs(d - rr - 0.018) * half / 2.0) * (1 - inside)
            window += 0.15 * rim * np.clip(facing, -0.5, 1.0)
            where |= (inside >= 0.5) | (rim >= 0.5)  # the pit and its burr
        return None, (rows, cols, where)
    if defect.kind == "stain":
        cu, cv = p["centre"]
        reach = p["radius"] * (1 + np.abs(p["harmonics"]).sum())
        rows, cols = _window(np.array([to_pixels((cu, cv))]), reach * half, size)
        uw, vw = u[rows, cols] - cu, v[rows, cols] - cv
        phi = np.arctan2(vw, uw)  # only inside the window: cheap
        wobble = np.ones_like(phi)
        for k, (a, b) in enumerate(p["harmonics"], start=1):
            wobble += a * np.cos(k * phi) + b * np.sin(k * phi)
        d = np.sqrt(uw * uw + vw * vw) / (p["radius"] * wobble)  # 1 on the stain's outline
        mottle = np.clip(0.75 + 0.35 * _upsample(p["mottle"], *uw.shape), 0.2, 1.3)
        body = p["strength"] * mottle * _smoothstep((1.0 - d) / 0.3)
        rim = p["rim"] * _smoothstep(1.0 - np.abs(d - 0.85) / 0.15)
        factor = 1.0 - body[None] * (1.0 - p["tint"])[:, None, None]
        factor *= 1.0 - rim[None] * (1.0 - _STAIN_EDGE_TINT)[:, None, None]
        return (rows, cols, factor), (rows, cols, d < 1.0)  # body and rim end at the outline
    # crack: where branches meet, the darker wins rather than both darkening twice;
    # the opened edges leave a faint shadowed margin
    rows, cols, cores, margin = _lines(u, v, p["paths"], [p["width"]] * len(p["paths"]), 3.0, half, to_pixels)
    core = np.max(cores, axis=0)
    metal[rows, cols] *= (1.0 - p["darkness"] * core) * (1.0 - 0.15 * margin)
    return None, (rows, cols, (core > 0) | (margin >= 0.5))  # the opening and its shadowed edges


def _shifted(field: np.ndarray, dy: int, dx: int, fill: float) -> np.ndarray:
    """`field` moved down by dy and right by dx pixels; what comes in from the edge is `fill`."""
    out = np.full_like(field, fill)
    h, w = field.shape
    out[dy:, dx:] = field[: h - dy, : w - dx]
    return out


def _render(nz: _Nuisance, defect: _Defect | None, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw the frame: outline, turned face, defect, belt with shadow, light, noise.

    Returns the frame and, for a defect, where it is (H x W bool; None for a good part).
    """
    half = _HALF_WIDTH * size * nz.scale  # pixels per part unit
    cx = (size - 1) / 2 + nz.shift[0]
    cy = (size - 1) / 2 + nz.shift[1]
    cos_a, sin_a = math.cos(nz.angle), math.sin(nz.angle)
    xs = (np.arange(size, dtype=np.float32) - cx) / half
    ys = (np.arange(size, dtype=np.float32) - cy) / half
    # part coordinates of every pixel: the frame's grid turned back by the part's angle
    u = xs[None, :] * cos_a + ys[:, None] * sin_a
    v = -xs[None, :] * sin_a + ys[:, None] * cos_a

    def to_pixels(q) -> tuple[float, float]:
        return (cx + half * (q[0] * cos_a - q[1] * sin_a), cy + half * (q[0] * sin_a + q[1] * cos_a))

    # outline: a rounded square (signed distance, negative inside), minus a chipped corner
    qu = np.abs(u) - (1.0 - _CORNER_RADIUS)
    qv = np.abs(v) - (1.0 - _CORNER_RADIUS)
    mu, mv = np.maximum(qu, 0), np.maximum(qv, 0)
    outline = np.sqrt(mu * mu + mv * mv) + np.minimum(np.maximum(qu, qv), 0) - _CORNER_RADIUS
    fracture = truth = None
    if defect is not None and defect.kind == "missing_corner":
        p = defect.params
        su, sv = p["corner"]
        angle = math.pi / 4 + p["tilt"]
        nu, nv = su * math.cos(angle), sv * math.sin(angle)
        # the break passes through the point `leg` in from the corner, on the diagonal
        reach = (1.0 - p["leg"] / 2) * (nu * su + nv * sv)
        along = -nv * u + nu * v
        jag = sum(a / k * np.sin(along * (9.0 * k) + b) for k, (a, b) in enumerate(p["jag"], start=1))
        cut = nu * u + nv * v - reach - 0.012 * jag
        truth = (outline < 0) & (cut >= 0)  # plate before the break, belt after it
        outline = np.maximum(outline, cut)
        # the broken face, seen from above: a band a few pixels wide of bright and dark facets
        band = _smoothstep(1.0 - np.abs(cut) * (half / 5.0)) * (outline <= 0)
        grain = sum(a * np.sin(along * (23.0 * k) + b) for k, (a, b) in enumerate(p["facets"], start=1))
        fracture = band * (0.1 + 0.08 * grain)
        truth |= band >= 0.5
    part = np.clip(0.5 - outline * half, 0.0, 1.0)

    # face-turned surface: concentric marks with per-ring chatter, a bow-tie sheen, the bore.
    # Angles enter only through cos and sin of theta and 2 theta, taken from u, v and r,
    # which keeps arctan2 and interpolation (the slow parts) out of every frame.
    r = np.sqrt(u * u + v * v)
    inv_r = 1.0 / np.maximum(r, 1e-6)
    cos1, sin1 = u * inv_r, v * inv_r
    cos2, sin2 = cos1 * cos1 - sin1 * sin1, 2.0 * cos1 * sin1
    pitch = max(_TURNING_PITCH_PX * size / 256, _MIN_PITCH_PX) / half
    rings = np.sin(r * (2 * math.pi / pitch) + nz.ring_phase)
    chatter = nz.chatter.take((r * (1.0 / pitch)).astype(np.int32), mode="clip")
    light = _LIGHT_ANGLE - nz.angle  # the light is fixed in the frame, so it turns against the part
    sheen = cos2 * math.cos(2 * light) + sin2 * math.sin(2 * light)  # cos(2 (theta - light))
    a1, b1, a2, b2 = nz.sector
    sector = a1 * cos1 + b1 * sin1 + a2 * cos2 + b2 * sin2
    metal = (
        0.60
        + _RINGS * rings * (0.7 + 0.3 * sheen)
        + _CHATTER * chatter
        + _SHEEN * sheen * np.minimum(r, 1.0)
        + _SECTOR * sector
    ).astype(np.float32)
    # damage is on the face, so it goes on before the bore is cut through it
    stain = extent = None
    if defect is not None and defect.kind != "missing_corner":
        stain, extent = _draw_local_defect(defect, u, v, metal, half, to_pixels)
    chamfer = _smoothstep((r - _BORE_RADIUS) / _CHAMFER)
    facing = cos1 * math.cos(light) + sin1 * math.sin(light)  # cos(theta - light)
    metal = metal * (0.55 + 0.45 * chamfer) + 0.18 * (1 - chamfer) * (0.5 + 0.5 * facing)
    bore = np.clip(0.5 - (_BORE_RADIUS - r) * half, 0.0, 1.0)  # 1 on the face, 0 down the bore
    metal = metal * bore + 0.05 * (1 - bore)
    if extent is not None:  # face damage shows only on the face: not down the bore, not past the edge
        rows, cols, where = extent
        truth = np.zeros((size, size), dtype=bool)
        truth[rows, cols] = where & (bore[rows, cols] >= 0.5) & (part[rows, cols] >= 0.5)
    if fracture is not None:
        metal += fracture

    # the belt, with a soft shadow the part casts down and to the right
    step = max(size // 80, 1)
    shadow = _smoothstep((_shifted(outline, step, step, 1.0) * half + 1.0) / (3.0 * step))
    belt = (0.15 + _BELT_MOTTLE * _upsample(nz.belt, size, size)) * (0.55 + 0.45 * shadow)

    # light: gain and a gentle gradient, then the colours of metal and belt. Colour is worked
    # channels-first (3 x H x W) so numpy's inner loops run along rows: broadcasting over a
    # trailing axis of 3 is several times slower.
    lighting = nz.gain * (1.0 + _HALF_WIDTH * (nz.gradient[0] * xs[None, :] + nz.gradient[1] * ys[:, None]))
    lit_metal = metal * part * lighting
    lit_belt = belt * (1 - part) * lighting
    metal_rgb = _METAL_RGB[:, None, None]
    img = lit_metal[None] * metal_rgb
    img += lit_belt[None] * _BELT_RGB[:, None, None]
    if stain is not None:
        rows, cols, factor = stain
        img[:, rows, cols] += lit_metal[None, rows, cols] * metal_rgb * (factor - 1.0)
    img += nz.offset

    # sensor: noise that grows with the signal, then 8 bits
    img += nz.noise * (_NOISE_FLOOR + _NOISE_SHOT * img)
    img *= 255.0
    img += 0.5
    np.clip(img, 0.0, 255.0, out=img)
    return np.ascontiguousarray(img.astype(np.uint8).transpose(1, 2, 0)), truth


def good_part(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A defect-free frame, H x W x 3 uint8 RGB."""
    _check_size(size)
    return _render(_draw_nuisance(rng, size), None, size)[0]


def defective_part(rng: np.random.Generator, size: int = 256, kind: str | None = None) -> np.ndarray:
    """A frame with one defect of `kind` (a random one when None), H x W x 3 uint8 RGB.

    The nuisance is drawn first, exactly as `good_part` draws it, so both from the
    same generator state differ only where the defect is.
    """
    return defective_part_and_mask(rng, size, kind)[0]


def defective_part_and_mask(
    rng: np.random.Generator, size: int = 256, kind: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`defective_part`'s frame and its ground truth: H x W bool, True where the defect was drawn.

    The mask covers the defect itself (a scratch's or crack's strokes, the pits with
    their burrs, the stain to its outline, the broken-off corner with its fracture
    face), not the faint margins around it nor the part's shadow on the belt.
    """
    _check_size(size)
    if kind is not None and kind not in DEFECT_KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; known kinds: {', '.join(DEFECT_KINDS)}")
    nuisance = _draw_nuisance(rng, size)  # first, exactly as good_part, so the two pair up
    image, mask = _render(nuisance, _draw_defect(rng, kind), size)
    return image, mask


def _stream(seed: int, *key: int) -> np.random.Generator:
    """An independent generator per (seed, purpose), so streams never share frames."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def make_images(n: int, *, defective: bool = False, seed: int = 0, size: int = 256) -> list[np.ndarray]:
    """`n` frames from `seed`; defective ones cycle through DEFECT_KINDS so every kind is covered.

    Good and defective frames of one seed come from independent streams: a
    defective frame is never a training frame with a mark added, which would
    flatter or sink a detector for the wrong reason.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_size(size)
    rng = _stream(seed, int(defective))
    if not defective:
        return [good_part(rng, size) for _ in range(n)]
    return [defective_part(rng, size, DEFECT_KINDS[i % len(DEFECT_KINDS)]) for i in range(n)]


def write_folder(
    root: pathlib.Path,
    n_good: int,
    n_defective_per_kind: int = 0,
    *,
    seed: int = 0,
    size: int = 256,
    fmt: str = "png",
    masks: pathlib.Path | None = None,
) -> dict[str, int]:
    """Write an MVTec-AD-like tree, root/good/000.png and root/<kind>/000.png; return counts per folder.

    The good frames are `make_images(n_good, seed=seed)`; each kind has its own
    stream, so asking for more of one kind does not change the others. With
    `masks`, each defective frame's ground truth goes to masks/<kind>/<its name>.png
    (0 background, 255 defect; PNG whatever `fmt` is, so it stays exact).
    """
    from PIL import Image  # only writing needs pillow

    ext = fmt.lower().lstrip(".")
    written = imageformats.encoded_by_suffix(ext)
    if written is None:
        raise ValueError(f"unknown image format {fmt!r}; known formats: {imageformats.suffix_words()}")
    if n_good < 0 or n_defective_per_kind < 0:
        raise ValueError(
            f"counts must be >= 0, got n_good={n_good}, n_defective_per_kind={n_defective_per_kind}"
        )
    _check_size(size)
    root = pathlib.Path(root)

    def save(
        folder: str, images: list[np.ndarray] | Iterator[np.ndarray], n: int, truth: pathlib.Path | None = None
    ) -> int:
        """Write `images` (each a frame, or with `truth` a frame and its mask) to root/folder."""
        path = root / folder
        path.mkdir(parents=True, exist_ok=True)
        if truth is not None:
            truth.mkdir(parents=True, exist_ok=True)
        digits = max(3, len(str(n - 1)))  # names sort in order however many there are
        count = 0
        for i, image in enumerate(images):
            if truth is not None:
                image, mask = image
                Image.fromarray(mask.astype(np.uint8) * 255).save(truth / f"{i:0{digits}d}.png", format="PNG")
            Image.fromarray(image).save(path / f"{i:0{digits}d}.{ext}", format=written.pil_format)
            count += 1
        return count

    counts = {"good": save("good", make_images(n_good, seed=seed, size=size), n_good)}
    if n_defective_per_kind:
        for k, kind in enumerate(DEFECT_KINDS):
            rng = _stream(seed, 2, k)
            if masks is None:
                frames = (defective_part(rng, size, kind) for _ in range(n_defective_per_kind))
                counts[kind] = save(kind, frames, n_defective_per_kind)
            else:
                pairs = (defective_part_and_mask(rng, size, kind) for _ in range(n_defective_per_kind))
                counts[kind] = save(kind, pairs, n_defective_per_kind, pathlib.Path(masks) / kind)
    return counts


def write_line(
    root: pathlib.Path,
    *,
    train: int = 200,
    test: int = 40,
    defective_per_kind: int = 10,
    seed: int = 0,
    size: int = 256,
    fmt: str = "png",
) -> dict[str, dict[str, int]]:
    """A sample line in MVTec AD's layout: root/train/good, root/test/good, root/test/<kind> and the
    defects' masks in root/ground_truth/<kind>/ (the same names, as PNG), which pixel-level judging
    (bench/anomaly_maps.py) reads.

    Training and test frames come from different seeds, so no test frame was seen in the fit.
    """
    root = pathlib.Path(root)
    counts = {
        "train": write_folder(root / "train", train, seed=seed, size=size, fmt=fmt),
        "test": write_folder(root / "test", test, defective_per_kind, seed=seed + 1_000_003, size=size, fmt=fmt,
                             masks=root / "ground_truth"),
    }
    if defective_per_kind:
        counts["ground_truth"] = {kind: n for kind, n in counts["test"].items() if kind != "good"}
    return counts
