"""Which archive images show the same part, so that folds and hold-outs keep a part's images together.

A second frame of one part (a repeated trigger, a re-saved file, a second camera pass) in another fold
lifts that part's out-of-fold score: the KDE scores much like a soft nearest neighbour, the boundary moves
up, and fresh good parts are rejected far above the target. Images are grouped by what the archive says,
as the operator configures it (a file-name pattern, a sidecar file, capture-time blocks), and by
measurement (embeddings closer than distinct good parts come), joined by union-find; folds and the
hold-out split then assign whole groups.

Pure: names, times and rows in, labels and folds out. Reading the sidecar is the one file access.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inspector.errors import ConfigError

# Image j is a twin of image i when j is among i's nearest neighbours and closer than TWIN_RATIO times the
# next neighbour beyond them: a gap that distinct good parts never show. Measured with the shipped backbone,
# the nearest distinct neighbour sat at no less than 0.32 of the second nearest on the magnetic-tile dev set
# (761 good tiles; 1st percentile 0.46) and 0.71 on the sample line. A neighbour so much closer than the rest
# is what lifts an out-of-fold score: the KDE scores as a soft nearest neighbour. A re-encoded copy that the
# backbone sees as far as another part is not caught, and does not lift the score more than another part.
TWIN_RATIO = 0.25
# Frames of one part looked for among an image's nearest neighbours.
MOST_TWINS = 8
_BLOCK_ROWS = 1024
MAX_SIDECAR_BYTES = 64 << 20


@dataclass
class Grouping:
    """Images' groups: `labels[i]` numbers image i's group, 0..groups-1 in order of first appearance."""

    labels: np.ndarray
    merged_by: dict[str, int] = field(default_factory=dict)  # images joined to another by each source

    @property
    def groups(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    @property
    def with_twin(self) -> int:
        """Images that share their group with at least one other."""
        counts = np.bincount(self.labels)
        return int(counts[counts > 1].sum())

    def summary(self) -> dict:
        return {"groups": self.groups, "images": len(self.labels), "images_with_twin": self.with_twin,
                "largest_group": int(np.bincount(self.labels).max()) if len(self.labels) else 0,
                "merged_by": dict(self.merged_by)}


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, i: int, j: int) -> bool:
        a, b = self.find(i), self.find(j)
        if a == b:
            return False
        self.parent[max(a, b)] = min(a, b)
        return True

    def labels(self) -> np.ndarray:
        roots = np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)
        _, first, inverse = np.unique(roots, return_index=True, return_inverse=True)
        rank = np.argsort(np.argsort(first))  # number groups in order of their first image
        return rank[inverse].astype(np.int64)


def group(n: int, keys: dict[str, Sequence[object | None]] | None = None,
          pairs: dict[str, Sequence[tuple[int, int]]] | None = None) -> Grouping:
    """Union-find over every source: `keys` name each image's part (None: no part named, its own group),
    `pairs` join two images. `merged_by` counts the images each source joined to another group."""
    found = _UnionFind(n)
    merged: dict[str, int] = {}
    for source, values in (keys or {}).items():
        if len(values) != n:
            raise ValueError(f"{source}: {len(values)} keys for {n} images")
        first: dict[object, int] = {}
        merged[source] = 0
        for i, key in enumerate(values):
            if key is None:
                continue
            if key in first:
                merged[source] += found.union(first[key], i)
            else:
                first[key] = i
    for source, joined in (pairs or {}).items():
        merged[source] = sum(found.union(int(i), int(j)) for i, j in joined)
    return Grouping(found.labels(), merged)


# -- what the archive says ------------------------------------------------------------------------


def compile_pattern(pattern: str, setting: str = "refit.group_pattern") -> re.Pattern[str]:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{setting} {pattern!r}: not a regular expression ({exc})") from None
    if "part" not in compiled.groupindex:
        raise ConfigError(f"{setting} {pattern!r}: needs a named group `part`, e.g. '(?P<part>[^_]+)_frame\\d+'")
    return compiled


def by_pattern(names: Sequence[str], pattern: str) -> list[str | None]:
    """Each name's part by `pattern` (searched in the path relative to the archive, '/'-separated): the text
    of its group `part`; None where the pattern does not match (the image is its own part)."""
    compiled = compile_pattern(pattern)
    parts: list[str | None] = []
    for name in names:
        match = compiled.search(name)
        parts.append(match.group("part") if match and match.group("part") is not None else None)
    return parts


def read_sidecar(path: Path) -> dict[str, str]:
    """A sidecar naming each image's part: CSV with a header holding `image` and `part` columns, or (a
    .json file) one JSON object {image: part}. Images are paths relative to the archive, '/'-separated."""
    try:
        size = path.stat().st_size
        if size > MAX_SIDECAR_BYTES:
            raise ConfigError(f"refit.group_sidecar {path}: {size} bytes, over {MAX_SIDECAR_BYTES}")
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"refit.group_sidecar {path}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"refit.group_sidecar {path}: not UTF-8 text") from None
    if path.suffix.lower() == ".json":
        try:
            table = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"refit.group_sidecar {path}: not JSON ({exc})") from None
        if not isinstance(table, dict) or not all(isinstance(v, (str, int)) for v in table.values()):
            raise ConfigError(f"refit.group_sidecar {path}: must be one JSON object of image: part")
        return {_relative(k): str(v) for k, v in table.items()}
    rows = csv.DictReader(io.StringIO(text))
    if not rows.fieldnames or not {"image", "part"} <= {f.strip() for f in rows.fieldnames}:
        raise ConfigError(f"refit.group_sidecar {path}: a CSV needs a header with `image` and `part` columns "
                          f"(found {rows.fieldnames})")
    table = {}
    for row in rows:
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if row["image"] and row["part"]:
            table[_relative(row["image"])] = row["part"]
    return table


def _relative(name: str) -> str:
    return name.strip().replace("\\", "/").removeprefix("./")


def by_sidecar(names: Sequence[str], table: dict[str, str]) -> list[str | None]:
    return [table.get(name) for name in names]


def capture_blocks(times: Sequence[float], seconds: float) -> list[int | None]:
    """Images taken within `seconds` of the previous one (in time order) form one block: a burst of
    triggers on one part. Returns each image's block number."""
    order = np.argsort(np.asarray(times, dtype=np.float64), kind="stable")
    blocks: list[int | None] = [None] * len(order)
    block, last = -1, None
    for i in order:
        t = float(times[i])
        if last is None or t - last > seconds:
            block += 1
        blocks[int(i)], last = block, t
    return blocks


# -- what the images show -------------------------------------------------------------------------


def twins(rows: np.ndarray, ratio: float = TWIN_RATIO, most: int = MOST_TWINS) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of images whose embeddings (rows) are twins: j is among the m nearest
    neighbours of i, where m (at most `most`) is the last rank at which the next neighbour is more than
    1 / `ratio` times farther. Blocks of rows at a time: memory stays at _BLOCK_ROWS x N."""
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2:
        raise ValueError(f"expected N x D rows, got shape {rows.shape}")
    n = len(rows)
    depth = min(most, n - 2)  # a gap needs a neighbour beyond the twins
    if depth < 1:
        return []
    pairs: set[tuple[int, int]] = set()
    for start in range(0, n, _BLOCK_ROWS):
        block = _distances(rows[start : start + _BLOCK_ROWS], rows)
        block[np.arange(len(block)), start + np.arange(len(block))] = np.inf
        nearest = np.argpartition(block, depth, axis=1)[:, : depth + 1]
        near = np.take_along_axis(block, nearest, 1)
        order = np.argsort(near, axis=1, kind="stable")
        nearest, near = np.take_along_axis(nearest, order, 1), np.take_along_axis(near, order, 1)
        gaps = near[:, :depth] <= ratio * near[:, 1:]
        for a in np.flatnonzero(gaps.any(axis=1)):
            m = int(np.flatnonzero(gaps[a])[-1]) + 1
            i = start + int(a)
            pairs.update((min(i, int(j)), max(i, int(j))) for j in nearest[a, :m])
    return sorted(pairs)


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    square = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(square, 0.0))


# -- folds and hold-outs by group -----------------------------------------------------------------


RANDOM = "random"
TIME = "time"
FOLD_ORDERS = (RANDOM, TIME)


def group_folds(labels: np.ndarray, k: int, seed: int, times: Sequence[float] | None = None) -> list[np.ndarray]:
    """k folds of whole groups, each a sorted array of image indices, sizes balanced to within a group.

    The groups are ordered (shuffled by `seed`: a RandomState permutation; or by their first capture time,
    given `times`) and the order is cut into k runs at the group boundaries nearest to the cuts of k equal
    runs (the first n % k one longer). With one image per group and no times these are scikit-learn's
    KFold(shuffle=True) test folds, as refit cut them before grouping."""
    labels = np.asarray(labels, dtype=np.int64)
    n, count = len(labels), int(labels.max()) + 1 if len(labels) else 0
    if not 2 <= k <= count:
        raise ValueError(f"{k} folds of {count} groups ({n} images): need 2 <= folds <= groups")
    if times is None:
        order = np.random.RandomState(seed).permutation(count)
    else:
        first = np.full(count, np.inf)
        np.minimum.at(first, labels, np.asarray(times, dtype=np.float64))
        order = np.argsort(first, kind="stable")
    sizes = np.bincount(labels, minlength=count)[order]
    ends = _cuts(np.cumsum(sizes), n, k)
    members = [np.flatnonzero(labels == g) for g in order]
    starts = [0, *ends[:-1]]
    return [np.sort(np.concatenate(members[a:b])) for a, b in zip(starts, ends)]


def _cuts(cumulative: np.ndarray, n: int, k: int) -> list[int]:
    """End positions (in groups) of k runs whose image counts come nearest to KFold's."""
    sizes = np.full(k, n // k)
    sizes[: n % k] += 1
    ideal = np.cumsum(sizes)
    count, ends, previous = len(cumulative), [], 0
    for j in range(k - 1):
        lowest, highest = previous + 1, count - (k - 1 - j)  # each run keeps at least one group
        candidates = np.arange(lowest, highest + 1)
        best = candidates[np.argmin(np.abs(cumulative[candidates - 1] - ideal[j]))]
        ends.append(int(best))
        previous = int(best)
    return [*ends, count]


def split_groups(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Image indices held out, sorted: whole groups in a seeded order (default_rng(seed).permutation) until
    the count nearest `count` is reached. One image per group: the first `count` of that permutation."""
    labels = np.asarray(labels, dtype=np.int64)
    groups = int(labels.max()) + 1 if len(labels) else 0
    if count <= 0 or groups == 0:
        return np.empty(0, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(groups)
    cumulative = np.cumsum(np.bincount(labels, minlength=groups)[order])
    taken = int(np.argmin(np.abs(cumulative - count))) + 1
    return np.flatnonzero(np.isin(labels, order[:taken]))
