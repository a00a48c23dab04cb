"""Anomaly maps for DFKDE: where the backbone's local features are unlike the good parts' features.

Chosen by measurement against pixel masks of real defects (bench/anomaly_maps.py, docs/tools.md "Anomaly
maps"). The score is a KDE over each image's pooled features; the map looks at the same feature maps
before pooling: every location of every layer is scored by its squared distance to the good parts'
features, channel by channel in units of their spread (a diagonal Gaussian, one for all positions,
since parts are not registered), averaged over each layer's channels, then over the layers on the
finest grid. So the map reuses the scoring pass's feature maps and never changes a score.

The statistics are each channel's mean and mean square over every location of every good image. Both
are averages of per-image averages, so a fit keeps two sums (bounded memory) and cross-fitting
carries them in its embedding rows (`moments`): the pooled features and the pooled squares, then the
features at a few of the image's locations, which set the map's scale.

The map is 1 - exp(-(distance / scale) ** POWER). It rises strictly, so no two distances tie (a floor
below which the map is 0 cost 0.08 of pixel AUROC on magnetic-tile: ties), and its scale is the model's,
not the image's: fitted from the good parts' own locations, so that their GOOD_QUANTILE location is drawn at
GOOD_LEVEL on every model, and "good" looks the same whatever the backbone, layers or line. A good location
scores 1 on average by construction, but how far good locations spread above that depends on how correlated
a layer's channels are: on the sample line, 1% of good pixels of the smoothed distance lie over 3.0 with
layers blocks.2+4 and over 2.0 with blocks.4+6; on magnetic-tile over 2.2 with blocks.4+6. Each image's rows
carry its features at SAMPLED_LOCATIONS of its locations (chosen from its pixels, so they differ between
images and cover the grid), a seeded sample of MAX_SAMPLED_IMAGES images' of them is kept, and the scale
puts their GOOD_QUANTILE distance at GOOD_LEVEL. A version saved before the scale existed draws with the
fixed SCALE it always drew with.

A channel whose spread on the good parts is nearly nil would turn any small change into a huge standardised
square and saturate the map; each channel's variance is floored at VARIANCE_FLOOR_SHARE of the median
channel variance of its own layer (a layer's channels have comparable spreads; the layers' do not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The map is 1 - exp(-(distance / scale) ** POWER), distance 1 being the good parts' average. SCALE is the
# scale of versions saved before each model had its own (tuned on magnetic-tile, where it puts the good
# parts' 99th-percentile location, 2.2, at 0.15: GOOD_LEVEL below keeps that look on every model).
SCALE = 4.0
POWER = 3.0
GOOD_QUANTILE = 0.99
GOOD_LEVEL = 0.15  # what SCALE gave magnetic-tile: the overlay's colour floor (MAP_FLOOR) keeps its meaning
# Locations per image whose features travel in its rows, and the most images whose sampled locations are
# kept (a seeded reservoir): 4096 locations bound the scale's sample; memory stays under 4 x 1024 x features.
SAMPLED_LOCATIONS = 4
MAX_SAMPLED_IMAGES = 1024
# The smoothing: a Gaussian of sigma 4 pixels at the shipped 128 px input (a share of the input size); half
# that measured the same on magnetic-tile (bench/anomaly_maps.py).
SMOOTH_SHARE = 4 / 128
# A channel whose spread is below this share of its layer's median channel variance is treated as having
# that spread, so a channel nearly constant on the good parts cannot make the map explode: at most 1/share
# (here 20) times the standardised square a typical channel of the layer gives for the same deviation.
VARIANCE_FLOOR_SHARE = 0.05


class LocalStats(nn.Module):
    """Each channel's mean and variance over every location of the good parts' feature maps, and the map's scale."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("variance", torch.empty(0))
        self.register_buffer("scale", torch.empty(0))  # empty: a version saved before it existed (SCALE)

    @property
    def fitted(self) -> bool:
        return self.mean.numel() > 0

    @property
    def map_scale(self) -> float:
        return float(self.scale.reshape(())) if self.scale.numel() else SCALE

    @staticmethod
    def width(features: int) -> int:
        """The columns `moments` gives for a backbone of `features` channels."""
        return (1 + SAMPLED_LOCATIONS) * features

    @staticmethod
    def moments(maps: Sequence[Tensor], images: Tensor) -> Tensor:
        """B x width: each image's per-channel mean square over its locations (the pooled features are the
        means), then its features at SAMPLED_LOCATIONS locations of the finest grid (each layer's cell there),
        chosen from the image's pixel sum so that they are the same for the same image on every pass. Rows of
        these fit the statistics (LocalSums)."""
        squares = torch.cat([F.adaptive_avg_pool2d(m * m, 1).flatten(1) for m in maps], dim=1)
        height, width = max((m.shape[-2:] for m in maps), key=lambda hw: hw[0] * hw[1])
        key = images.reshape(images.shape[0], -1).double().sum(1).round().long().cpu()
        steps = torch.tensor(_LOCATION_STEPS[:SAMPLED_LOCATIONS], dtype=torch.long)
        cells = (key[:, None] * steps + torch.arange(SAMPLED_LOCATIONS) * 7919) % (height * width)  # B x K
        rows, cols = cells // width, cells % width
        picked = []
        for m in maps:
            h, w = m.shape[-2:]
            r = ((2 * rows + 1) * h // (2 * height)).to(m.device)
            c = ((2 * cols + 1) * w // (2 * width)).to(m.device)
            picked.append(m[torch.arange(m.shape[0], device=m.device)[:, None], :, r, c])  # B x K x C
        return torch.cat([squares, torch.cat(picked, dim=2).flatten(1)], dim=1)

    def fit(self, sums: "LocalSums", channels: Sequence[int]) -> "LocalStats":
        """From the sums of rows of pooled features and `moments`, each layer of `channels` channels."""
        d = sums.features
        if sums.count < 1 or sums.total is None:
            raise ValueError("local statistics need at least one image")
        if sum(channels) != d:
            raise ValueError(f"layers of {list(channels)} channels do not make {d} features")
        mean = sums.total[:d] / sums.count
        variance = (sums.total[d : 2 * d] / sums.count - mean * mean).clamp_min(0)
        floored, offset = [], 0
        for c in channels:
            layer = variance[offset : offset + c]
            typical = float(torch.quantile(layer, 0.5)) or float(layer.mean())  # ReLU layers: most may be dead
            if not typical > 0:
                raise ValueError("all local features of a layer are constant; use more varied images")
            floored.append(layer.clamp_min(VARIANCE_FLOOR_SHARE * typical))
            offset += c
        self.mean = mean.float()
        self.variance = torch.cat(floored).float()
        located = sums.sampled().reshape(-1, d)  # every sampled location of the kept images
        good = _layer_mean(((located.double() - mean) ** 2 / self.variance.double()), channels)
        top = float(torch.quantile(good, GOOD_QUANTILE))
        if not (top > 0 and math.isfinite(top)):
            raise ValueError("the good parts' sampled locations are all at their mean; use more varied images")
        self.scale = torch.tensor([top / (-math.log1p(-GOOD_LEVEL)) ** (1 / POWER)], dtype=torch.float32)
        return self

    def distance(self, maps: Sequence[Tensor]) -> Tensor:
        """B x h x w on the finest grid: each location's mean standardised square over a layer's channels,
        averaged over the layers (each layer weighs the same: weighing channels alike let the deep layer's
        320 channels drown the finer one's 112 and cost 0.02 of pixel AUROC and 0.1 of PRO on magnetic-tile)."""
        if not self.fitted:
            raise RuntimeError("local statistics are not fitted")
        height, width = maps[0].shape[-2:]
        total, offset = None, 0
        for m in maps:
            c = m.shape[1]
            mean = self.mean[offset : offset + c].view(1, c, 1, 1)
            variance = self.variance[offset : offset + c].view(1, c, 1, 1)
            layer = ((m.float() - mean) ** 2 / variance).mean(1, keepdim=True)
            if layer.shape[-2:] != (height, width):
                layer = F.interpolate(layer, size=(height, width), mode="bilinear", align_corners=False)
            total = layer if total is None else total + layer
            offset += c
        return total[:, 0] / len(maps)


# Multipliers that spread an image's pixel sum over the grid's cells (odd, far apart).
_LOCATION_STEPS = (2654435761, 40503, 2246822519, 3266489917, 668265263, 374761393, 1103515245, 12345)


def _layer_mean(squares: Tensor, channels: Sequence[int]) -> Tensor:
    """N x features standardised squares -> N: each layer's channel mean, averaged over the layers."""
    parts = torch.split(squares, list(channels), dim=1)
    return torch.stack([part.mean(1) for part in parts]).mean(0)


class LocalSums:
    """What LocalStats is fitted from, fed rows of `embed` (pooled features, then `moments`) in their images'
    order: column sums in float64 over every image, and a seeded sample (Algorithm R) of MAX_SAMPLED_IMAGES
    images' sampled locations. Memory is bounded whatever the archive's size."""

    def __init__(self, seed: int = 0) -> None:
        self.features = 0  # from the first rows' width: pooled, squares, sampled locations
        self.total: Tensor | None = None
        self.count = 0
        self.rng = np.random.default_rng(seed)
        self.kept: Tensor | None = None

    def add(self, rows: Tensor) -> None:
        if not self.features:
            self.features = rows.shape[1] // (2 + SAMPLED_LOCATIONS)
        d = self.features
        if rows.ndim != 2 or rows.shape[1] != (2 + SAMPLED_LOCATIONS) * d:
            raise ValueError(f"rows of {tuple(rows.shape)} are not rows of `embed` for {d} features")
        summed = rows[:, : 2 * d].double().sum(0)
        self.total = summed if self.total is None else self.total + summed
        located = rows[:, 2 * d :]
        if self.kept is None:
            self.kept = torch.empty((MAX_SAMPLED_IMAGES, located.shape[1]), dtype=located.dtype)
        for row in located:
            if self.count < MAX_SAMPLED_IMAGES:
                self.kept[self.count] = row
            else:
                slot = int(self.rng.integers(0, self.count + 1))
                if slot < MAX_SAMPLED_IMAGES:
                    self.kept[slot] = row
            self.count += 1

    def sampled(self) -> Tensor:
        """The kept images' sampled locations: images x (SAMPLED_LOCATIONS x features)."""
        if self.kept is None:
            return torch.empty(0, SAMPLED_LOCATIONS * self.features)
        return self.kept[: min(self.count, MAX_SAMPLED_IMAGES)]


def draw(distance: Tensor, size: tuple[int, int], input_size: int, scale: float = SCALE) -> np.ndarray:
    """One image's distance grid (h x w) -> its map at (width, height): smoothed at the model's input size,
    then resized; float32 in [0, 1] on the model's scale (LocalStats.map_scale)."""
    width, height = size
    grid = distance.float()[None, None]
    grid = F.interpolate(grid, size=(input_size, input_size), mode="bilinear", align_corners=False)
    grid = _blur(grid, SMOOTH_SHARE * input_size)
    grid = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
    ratio = grid[0, 0].clamp_min(0) / scale
    return (-torch.expm1(-ratio**POWER)).cpu().numpy().astype(np.float32, copy=False)


def _blur(grid: Tensor, sigma: float) -> Tensor:
    """A separable Gaussian blur of 1 x 1 x H x W, reflecting at the edges."""
    radius = max(1, min(int(3 * sigma + 0.5), grid.shape[-1] - 1, grid.shape[-2] - 1))
    x = torch.arange(-radius, radius + 1, dtype=grid.dtype, device=grid.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    grid = F.conv2d(F.pad(grid, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(grid, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
