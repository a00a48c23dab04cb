"""Where the defect is, as a line reads it: the regions of an anomaly map at a calibrated level.

A region is a connected set of map cells at or over the level (8-connected: cells touching at a corner are
one region), found on the map drawn at a grid of at most GRID cells on the longer side (a map is smooth
far below that: the shipped localisation map has 16 x 16 locations), and reported in the image's own
pixels: its bounding box, its peak map value and its area. Largest first, at most `limit`. Pure numpy: the
worker, explain and the report share it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

GRID = 96  # cells on the longer side of the grid the regions are found on
MAX_REGIONS = 8  # the most regions a result may carry (the contract's bound)


@dataclass(frozen=True)
class Region:
    """One region in the image's own pixels: box [x, y, width, height], its peak map value, its area."""

    x: int
    y: int
    width: int
    height: int
    peak: float
    area: int

    def as_json(self) -> dict[str, object]:
        return {"box": [self.x, self.y, self.width, self.height], "peak": round(self.peak, 6), "area": self.area}


def grid_size(size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the grid the regions of an image of `size` are found on: its own size, shrunk to
    GRID cells on the longer side."""
    width, height = size
    shrink = max(1.0, max(width, height) / GRID)
    return max(1, round(width / shrink)), max(1, round(height / shrink))


def find_regions(map_of: Callable[[tuple[int, int]], np.ndarray], size: tuple[int, int], level: float,
                 limit: int = MAX_REGIONS) -> list[Region]:
    """The regions of the map that `map_of((width, height))` draws, for an image of `size`."""
    grid = grid_size(size)
    return regions_of(map_of(grid), level, size, limit)


def regions_of(anomaly_map: np.ndarray, level: float, size: tuple[int, int], limit: int = MAX_REGIONS
               ) -> list[Region]:
    """The regions of a map (h x w, any resolution) at or over `level`, in the pixels of an image of `size`
    (width, height): largest first (then highest peak), at most `limit`."""
    if not (isinstance(level, float | int) and math.isfinite(level)):
        raise ValueError(f"region level must be a finite number, got {level!r}")
    values = np.asarray(anomaly_map, dtype=np.float32)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"an anomaly map must be a non-empty 2-D array, got shape {values.shape}")
    labels, count = label(values >= level)
    if count == 0 or limit < 1:
        return []
    width, height = size
    gh, gw = values.shape
    sx, sy = width / gw, height / gh
    flat = labels.ravel()
    cells = np.bincount(flat, minlength=count + 1)[1:]
    peaks = np.full(count + 1, -np.inf)
    np.maximum.at(peaks, flat, values.ravel())
    rows, cols = np.nonzero(labels)
    ids = labels[rows, cols]
    top = np.full(count + 1, gh)
    left = np.full(count + 1, gw)
    bottom = np.full(count + 1, -1)
    right = np.full(count + 1, -1)
    np.minimum.at(top, ids, rows)
    np.minimum.at(left, ids, cols)
    np.maximum.at(bottom, ids, rows)
    np.maximum.at(right, ids, cols)
    found = []
    for r in range(1, count + 1):
        x0, y0 = math.floor(left[r] * sx), math.floor(top[r] * sy)
        x1, y1 = min(width, math.ceil((right[r] + 1) * sx)), min(height, math.ceil((bottom[r] + 1) * sy))
        found.append(Region(x=x0, y=y0, width=max(1, x1 - x0), height=max(1, y1 - y0), peak=float(peaks[r]),
                            area=max(1, round(int(cells[r - 1]) * sx * sy))))
    found.sort(key=lambda region: (-region.area, -region.peak, region.y, region.x))
    return found[:limit]


def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean h x w mask: (labels 1..n, 0 outside; n), numbered in the order
    of their first cell in row-major order. Runs of each row are joined to the runs of the row above that
    touch them (overlapping or diagonal), through a union-find over runs."""
    mask = np.asarray(mask, dtype=bool)
    runs: list[tuple[int, int, int]] = []  # (row, start, end exclusive)
    parent: list[int] = []
    previous: list[int] = []  # indices into runs of the row above

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for row in range(mask.shape[0]):
        edges = np.flatnonzero(np.diff(np.concatenate(([0], mask[row].view(np.int8), [0]))))
        current = []
        for start, end in zip(edges[0::2], edges[1::2]):
            index = len(runs)
            runs.append((row, int(start), int(end)))
            parent.append(index)
            for above in previous:
                _, a_start, a_end = runs[above]
                if a_start <= end and start <= a_end:  # touching, diagonals included
                    ra, rb = find(above), find(index)
                    if ra != rb:
                        parent[max(ra, rb)] = min(ra, rb)
            current.append(index)
        previous = current
    labels = np.zeros(mask.shape, dtype=np.int32)
    numbers: dict[int, int] = {}
    for index, (row, start, end) in enumerate(runs):
        root = find(index)
        if root not in numbers:
            numbers[root] = len(numbers) + 1
        labels[row, start:end] = numbers[root]
    return labels, len(numbers)
