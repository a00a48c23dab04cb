"""Localisation maps for DFKDE: a pass of their own, at a resolution chosen to find the defect.

The score's feature maps are coarse (8 x 8 at the shipped 128 px input), so a map drawn from them is a
blob over most of a part. The plugin contract draws maps later, off the scoring thread, for the frames that
want one, so this map comes from its own pass: the prepared image enlarged MAP_ZOOM times, the backbone's
stride-16 layer (the same architecture and weights as the scoring backbone, built apart from it so that its
runtime never touches the score's), each location's features averaged over its LOCAL_AVERAGE x LOCAL_AVERAGE
neighbourhood (PatchCore's local aggregation: a location sees a little of its context), projected by a PCA to
COMPONENTS and scored by a Gaussian KDE over a bounded sample of the good parts' locations (patch-level density,
in the spirit of PaDiM and PatchCore, without positions since parts are not registered). Chosen by measurement on the
Magnetic Tile Defect set's pixel masks (bench/anomaly_maps.py, docs/quality.md). Never touches a score.

Fitted in the same refit from the same images: every image the plugin embeds also passes through this
extractor (PatchSampler); every HOLD_OUT_EVERY'th image is held out of the map's fit, and those images' maps
(drawn by a model that never saw them) set the map's scale and the regions' level: the level that a
(1 - good_region_rate) share of the held-out good parts' peaks stay under (a split-conformal rank, as the
image threshold's). Fitted once on all images' samples after any cross-fitting folds (the folds' models
draw no maps). Memory is bounded: MAX_PATCHES locations and MAX_CALIBRATION_IMAGES grids, whatever the
archive's size. Saved in its own safetensors file beside the state, its format and local average in the header;
a version without it scores as before, and a file of an earlier format draws as it was fitted.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from inspector.errors import StateError, StoreUnavailable
from inspector_dfkde.backbones import create_backbone
from inspector_dfkde.kde import GaussianKDE
from inspector_dfkde.pca import PCA

FILE = "patchmap.safetensors"
FORMAT = "dfkde.patchmap/2"
# Files of earlier formats load as they were fitted: format -> (local average, most components); /1 had neither
EARLIER_FORMATS = {"dfkde.patchmap/1": (1, 32)}
MAP_ZOOM = 2  # the map pass's input: the prepared image enlarged (bilinear) twice, 256 px at the shipped 128
MAP_STRIDE = 16  # the backbone layer whose features are scored: 16 x 16 locations at 256 px
COMPONENTS = 64
LOCAL_AVERAGE = 3  # each location's features: the mean over its 3 x 3 neighbourhood (edges: the ones inside)
MAX_PATCHES = 40000  # the KDE's points: a seeded reservoir over the fit images' sampled locations
PATCHES_PER_IMAGE = 64
HOLD_OUT_EVERY = 5  # every 5th image embedded is held out of the map's fit; its map calibrates
MAX_CALIBRATION_IMAGES = 256  # a seeded reservoir of the held-out images' grids
GOOD_REGION_RATE = 0.05  # the share of good parts that may get a region at the calibrated level, by default
# What `[plugins.dfkde] good_region_rate` may be: 0.004 needs 249 held-out images, within MAX_CALIBRATION_IMAGES
REGION_RATE_BOUNDS = (0.004, 0.5)
SMOOTH_SHARE = 4 / 128  # a Gaussian of sigma 8 px at 256 px, as the scoring maps' 4 at 128
# The map is the logistic 1 / (1 + exp(-a (s - b))) of the smoothed score s (negative log-density): strictly
# rising, so no two scores tie (in float32 until 6.4 times the good parts' spread above their top), and on
# the model's own scale: the held-out good parts' median pixel is drawn at
# GOOD_MEDIAN_LEVEL and their GOOD_QUANTILE pixel at GOOD_LEVEL (the scoring maps' look, plugins/dfkde/maps.py).
GOOD_QUANTILE = 0.99
GOOD_LEVEL = 0.15
GOOD_MEDIAN_LEVEL = 0.01
# Above the logit TAIL_START (0.9933) the map's logit grows as log(1 + the excess): the drawn look is the same,
# but strong defects no longer all round to exactly 1.0 in float32 (they did from 6.4 spreads above the good
# parts' top, tying every defect pixel with the brightest normal ones), only from about 10^5.
TAIL_START = 5.0
MAX_HEADER_BYTES = 1 << 20


def map_layer(architecture: str) -> str:
    """The backbone layer of stride MAP_STRIDE (the deepest such), for any timm architecture with one."""
    with torch.device("meta"):
        info = timm.create_model(architecture, features_only=True, pretrained=False).feature_info
    layers = [n for n, r in zip(info.module_name(), info.reduction()) if r == MAP_STRIDE]
    if not layers:
        raise ValueError(f"{architecture} has no stride-{MAP_STRIDE} layer for localisation maps")
    return layers[-1]


class PatchExtractor:
    """The map pass's backbone: the scoring backbone's architecture and weights, to its stride-16 layer."""

    def __init__(self, architecture: str, weights: str, input_size: int, seed: int = 0) -> None:
        self.size = MAP_ZOOM * input_size
        self.layer = map_layer(architecture)
        with torch.random.fork_rng(devices=[]):  # random weights ("none", tests) the same on every build
            torch.manual_seed(seed)
            backbone = create_backbone(architecture, [self.layer], weights)
        self.extractor = backbone.extractor.eval()
        self.mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(backbone.std).view(1, 3, 1, 1)
        self.channels = backbone.channels[0]

    def to(self, device: torch.device) -> "PatchExtractor":
        self.extractor = self.extractor.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    @torch.inference_mode()
    def __call__(self, batch: Tensor) -> Tensor:
        """Prepared images (B x 3 x S x S, uint8 or 0..1) -> B x C x g x g float32 features."""
        x = batch.to(self.mean.device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.extractor(((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last))[0].float()


class PatchSampler:
    """What a PatchDensity is fitted from, fed the map pass's features in the images' order: a seeded reservoir
    of MAX_PATCHES locations of the fit images (PATCHES_PER_IMAGE each), and one of MAX_CALIBRATION_IMAGES grids
    of the held-out ones (every HOLD_OUT_EVERY'th image)."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.images = 0
        self.patches: Tensor | None = None
        self.patches_seen = 0
        self.held: list[Tensor] = []
        self.held_seen = 0

    def add(self, grids: Tensor) -> None:
        grids = grids.detach().float().cpu()
        for grid in grids:
            if self.images % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1:
                self._hold(grid)
            else:
                rows = local_average(grid[None], LOCAL_AVERAGE)[0].flatten(1).T  # locations x C
                chosen = self.rng.choice(rows.shape[0], min(PATCHES_PER_IMAGE, rows.shape[0]), replace=False)
                self._keep(rows[torch.from_numpy(chosen)])
            self.images += 1

    def _hold(self, grid: Tensor) -> None:
        if self.held_seen < MAX_CALIBRATION_IMAGES:
            self.held.append(grid.clone())
        else:
            slot = int(self.rng.integers(0, self.held_seen + 1))
            if slot < MAX_CALIBRATION_IMAGES:
                self.held[slot] = grid.clone()
        self.held_seen += 1

    def _keep(self, rows: Tensor) -> None:
        if self.patches is None:
            self.patches = torch.empty((MAX_PATCHES, rows.shape[1]))
        for row in rows:
            if self.patches_seen < MAX_PATCHES:
                self.patches[self.patches_seen] = row
            else:
                slot = int(self.rng.integers(0, self.patches_seen + 1))
                if slot < MAX_PATCHES:
                    self.patches[slot] = row
            self.patches_seen += 1

    def sample(self) -> Tensor:
        if self.patches is None:
            return torch.empty(0)
        return self.patches[: min(self.patches_seen, MAX_PATCHES)]


class PatchDensity(nn.Module):
    """The fitted map: PCA, the KDE over good locations, the scale, and the regions' level."""

    def __init__(self, size: int, pool: int = LOCAL_AVERAGE, region_rate: float = GOOD_REGION_RATE) -> None:
        super().__init__()
        self.region_rate = region_rate  # the share of good parts that may get a region (the level's rank)
        self.size = size  # the map pass's input side, where the scores are smoothed
        self.pool = pool  # the local average's width the density was fitted with (1: none)
        self.pca = PCA(COMPONENTS)
        self.kde = GaussianKDE()
        self.register_buffer("scale", torch.empty(0))  # (a, b) of the map's transform
        self.register_buffer("level", torch.empty(0))  # the regions' calibrated level; empty: none
        self.figures: dict[str, Any] = {}

    @property
    def fitted(self) -> bool:
        return self.kde.fitted

    @property
    def region_level(self) -> float | None:
        return float(self.level.reshape(())) if self.level.numel() else None

    def fit(self, sampler: PatchSampler) -> "PatchDensity":
        """PCA and KDE on the fit images' locations; scale and level from the held-out images' maps.
        ValueError when the locations are too few or degenerate."""
        self.pool = LOCAL_AVERAGE  # what the sampler's locations were averaged with
        patches = sampler.sample()
        components = min(COMPONENTS, patches.shape[1], max(1, patches.shape[0] - 2 - 1))
        if patches.shape[0] < 4:
            raise ValueError(f"localisation maps need the locations of more images, got {patches.shape[0]}")
        self.pca = PCA(components).fit(patches)
        self.kde = GaussianKDE().fit(self.pca.transform(patches))
        held = torch.stack(sampler.held) if sampler.held else None
        if held is not None:
            smoothed = self.smoothed_scores(held)  # N x S x S, drawn by a model that never saw them
            pixels = smoothed.flatten()
            peaks = smoothed.flatten(1).max(1).values.double().numpy()
        else:  # too few images to hold any out: the scale from the fit's own locations, no regions
            pixels = self._scores(self.pca.transform(patches))
            peaks = np.empty(0)
        median, top = _quantiles(pixels, (0.5, GOOD_QUANTILE))
        rise = max(top - median, 1e-6 * max(1.0, abs(top)))
        a = (_logit(GOOD_LEVEL) - _logit(GOOD_MEDIAN_LEVEL)) / rise
        b = top - _logit(GOOD_LEVEL) / a
        self.scale = torch.tensor([a, b], dtype=torch.float32)
        self.figures = {"components": components, "patches": int(patches.shape[0]),
                        "map_size": self.size, "local_average": self.pool,
                        "fit_images": sampler.images - sampler.held_seen, "held_out_images": len(peaks),
                        "good_region_rate": self.region_rate}
        k = region_rank(len(peaks), self.region_rate)
        if k is None:
            self.level = torch.empty(0)
            self.figures["regions"] = (f"not calibrated: {len(peaks)} held-out images, "
                                       f"{images_for_regions(self.region_rate)} needed")
        else:
            level = float(np.sort(peaks)[k - 1])
            self.level = torch.tensor([float(self.transform(torch.tensor(level)))], dtype=torch.float32)
            drawn = self.transform(torch.from_numpy(peaks).float()).numpy()
            self.figures |= {"region_level": self.region_level, "rank": k,
                             "held_out_with_regions": float(np.mean(drawn >= self.region_level))}
        return self

    def _scores(self, projected: Tensor) -> Tensor:
        return -self.kde.log_density(projected)

    @torch.inference_mode()
    def smoothed_scores(self, grids: Tensor) -> Tensor:
        """B x C x g x g features -> B x size x size smoothed negative log-densities."""
        grids = local_average(grids, self.pool)
        b, c, h, w = grids.shape
        rows = grids.permute(0, 2, 3, 1).reshape(-1, c)
        scores = self._scores(self.pca.transform(rows.to(self.pca.mean.device))).reshape(b, 1, h, w)
        up = F.interpolate(scores, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return _blur(up, SMOOTH_SHARE * self.size)[:, 0]

    def transform(self, scores: Tensor) -> Tensor:
        """Smoothed scores -> the map's values in (0, 1), on the model's scale."""
        a, b = (float(v) for v in self.scale)
        z = a * (scores.double() - b)
        over = (z.abs() - TAIL_START).clamp(min=0)  # beyond it the logit grows as a logarithm: no float32 ties
        return torch.sigmoid(torch.sign(z) * (z.abs() - over + torch.log1p(over))).float()

    def draw(self, grid: Tensor, size: tuple[int, int]) -> np.ndarray:
        """One image's features (C x g x g) -> its map at (width, height), float32 in [0, 1]."""
        return self.resized(self.smoothed_scores(grid[None])[0], size)

    def resized(self, smoothed: Tensor, size: tuple[int, int]) -> np.ndarray:
        """One image's smoothed scores (size x size) -> its map at (width, height), float32 in [0, 1]."""
        width, height = size
        resized = F.interpolate(smoothed[None, None], size=(height, width), mode="bilinear", align_corners=False)
        return self.transform(resized[0, 0]).cpu().numpy().astype(np.float32, copy=False)

    # -- files ----------------------------------------------------------------------------------------

    def save(self, folder: Path, layer: str) -> str:
        tensors = {"pca.mean": self.pca.mean, "pca.components": self.pca.components,
                   "pca.explained_variance": self.pca.explained_variance, "kde.whitened": self.kde.whitened,
                   "kde.neg_half_sq_norm": self.kde.neg_half_sq_norm, "kde.bw_transform": self.kde.bw_transform,
                   "kde.log_norm": self.kde.log_norm, "scale": self.scale}
        if self.level.numel():
            tensors["level"] = self.level
        meta = {"format": FORMAT, "layer": layer, "map_size": str(self.size), "local_average": str(self.pool),
                "figures": json.dumps(self.figures)}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / FILE), metadata=meta)
        return FILE

    @classmethod
    def load(cls, folder: Path, layer: str, channels: int, size: int) -> "PatchDensity | None":
        """The saved map of a version, checked; None for a version saved without one."""
        path = folder / FILE
        if not path.exists():
            return None
        pool = _check_header(path, layer, channels, size)
        try:
            tensors = load_file(str(path))
        except SafetensorError as exc:
            raise StateError(f"{path}: cannot read the localisation map ({exc}); refit the model") from None
        except OSError as exc:
            raise StoreUnavailable(f"{path}: cannot read the localisation map ({exc})") from None
        density = cls(size, pool)
        k = tensors["pca.components"].shape[1]
        density.pca = PCA(k)
        density.pca.mean, density.pca.components = tensors["pca.mean"], tensors["pca.components"]
        density.pca.explained_variance = tensors["pca.explained_variance"]
        for name in ("whitened", "neg_half_sq_norm", "bw_transform", "log_norm"):
            setattr(density.kde, name, tensors[f"kde.{name}"])
        density.scale = tensors["scale"]
        density.level = tensors.get("level", torch.empty(0))
        if not (torch.isfinite(density.scale).all() and float(density.scale[0]) > 0):
            raise StateError(f"{path}: the map's scale must be finite and rising; refit the model")
        if density.level.numel() and not 0.0 < float(density.level.reshape(())) <= 1.0:
            raise StateError(f"{path}: the regions' level must lie in (0, 1]; refit the model")
        return density


def region_rank(n: int, rate: float) -> int | None:
    """The rank k (1-based) of the held-out peaks whose value is the regions' level: the smallest k with
    k >= (1 - rate)(n + 1), so that a fresh good part's peak exceeds the k-th of n exchangeable peaks with
    probability at most rate; None when n is too small (k > n)."""
    k = math.ceil((1.0 - rate) * (n + 1) - 1e-9)
    return k if 1 <= k <= n else None


def images_for_regions(rate: float) -> int:
    """The fewest held-out images for which region_rank has an answer."""
    return math.ceil(1.0 / rate - 1.0 - 1e-9)


def local_average(grids: Tensor, width: int) -> Tensor:
    """B x C x h x w -> each location's mean over its width x width neighbourhood, of the locations inside the
    grid (so an edge is not darkened by padding); width 1: the grids as they are."""
    if width == 1:
        return grids
    return F.avg_pool2d(grids, width, stride=1, padding=width // 2, count_include_pad=False)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _quantiles(values: Tensor, qs: tuple[float, ...]) -> list[float]:
    flat = values.detach().double().flatten().cpu().numpy()
    return [float(v) for v in np.quantile(flat, qs)]


def _blur(grid: Tensor, sigma: float) -> Tensor:
    """A separable Gaussian blur of B x 1 x H x W, reflecting at the edges."""
    radius = max(1, min(int(3 * sigma + 0.5), grid.shape[-1] - 1, grid.shape[-2] - 1))
    x = torch.arange(-radius, radius + 1, dtype=grid.dtype, device=grid.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    grid = F.conv2d(F.pad(grid, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(grid, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))


def _check_header(path: Path, layer: str, channels: int, size: int) -> int:
    """The file's header alone, checked against what the version's backbone implies, before any tensor is read;
    the local average's width the map was fitted with."""
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8).ljust(8, b"\xff"), "little")
            if length > MAX_HEADER_BYTES:
                raise StateError(f"{path}: a header of {length} bytes is not a localisation map's")
            header = json.loads(handle.read(length))
    except OSError as exc:
        raise StoreUnavailable(f"{path}: cannot be read ({exc})") from None
    except (ValueError, RecursionError) as exc:
        raise StateError(f"{path}: cannot read the localisation map's header ({exc!r:.100})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("layer") != layer:
        raise StateError(f"{path}: not a localisation map for layer {layer}; refit the model")
    if meta.get("format") in EARLIER_FORMATS:
        pool, most = EARLIER_FORMATS[meta["format"]]
    elif meta.get("format") == FORMAT and meta.get("local_average") in {str(w) for w in (1, 3, 5, 7)}:
        pool, most = int(meta["local_average"]), COMPONENTS
    else:
        raise StateError(f"{path}: a localisation map of format {meta.get('format')!r:.40}, not one this version "
                         f"reads ({FORMAT} or {', '.join(EARLIER_FORMATS)}); a refit draws the maps anew")
    if meta.get("map_size") != str(size):
        raise StateError(f"{path}: drawn at {meta.get('map_size')!r:.20} px, this version draws at {size}; "
                         "refit the model")
    shape = lambda key: header.get(key, {}).get("shape") if isinstance(header.get(key), dict) else None  # noqa: E731
    components = shape("pca.components")
    rows = shape("kde.whitened")
    if not (isinstance(components, list) and len(components) == 2 and components[0] == channels
            and 1 <= components[1] <= most):
        raise StateError(f"{path}: pca.components is {components!r:.40}, not {channels} x at most {most}")
    k = components[1]
    if not (isinstance(rows, list) and len(rows) == 2 and 1 <= rows[0] <= MAX_PATCHES and rows[1] == k):
        raise StateError(f"{path}: kde.whitened is {rows!r:.40}, not at most {MAX_PATCHES} x {k}")
    expected = {"pca.mean": [channels], "pca.components": [channels, k], "pca.explained_variance": [k],
                "kde.whitened": [rows[0], k], "kde.neg_half_sq_norm": [rows[0]], "kde.bw_transform": [k, k],
                "kde.log_norm": [], "scale": [2], "level": [1]}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if key not in expected or not isinstance(entry, dict) or entry.get("dtype") != "F32" \
                or entry.get("shape") != expected[key]:
            raise StateError(f"{path}: unexpected tensor {key!r:.40} ({entry!r:.60}); refit the model")
    missing = sorted(set(expected) - {"level"} - set(header))
    if missing:
        raise StateError(f"{path}: missing tensors {missing}; refit the model")
    return pool


class PatchMap:
    """A fitted localisation map with its extractor: what the plugin keeps and draws from."""

    def __init__(self, extractor: PatchExtractor, density: PatchDensity) -> None:
        self.extractor = extractor
        self.density = density

    @property
    def region_level(self) -> float | None:
        return self.density.region_level

    def drawer(self, batch: Tensor) -> "PatchDrawer":
        return PatchDrawer(self, batch)


class PatchDrawer:
    """A batch's maps, each frame's pass and density run on first request and kept (regions and evidence may
    both ask, at different sizes)."""

    def __init__(self, patch_map: PatchMap, batch: Tensor) -> None:
        self.patch_map = patch_map
        self.batch = batch
        self.grids: dict[int, Tensor] = {}
        self.lock = threading.Lock()

    def __call__(self, index: int, size: tuple[int, int]) -> np.ndarray:
        density = self.patch_map.density
        with self.lock:
            smoothed = self.grids.get(index)
            if smoothed is None:
                grid = self.patch_map.extractor(self.batch[index : index + 1])
                smoothed = self.grids[index] = density.smoothed_scores(grid)[0]
        return density.resized(smoothed, size)
