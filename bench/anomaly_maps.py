"""Anomaly maps of DFKDE against pixel ground truth: the shipped method, the rejected candidates, two baselines.

The model is the shipped [plugins.dfkde] defaults fitted on train/good (decoded as refit decodes them).
Every test image (defects and good parts; a good image's pixels are all normal) gets a map from each
method at its own size; the maps are judged against ground_truth/<kind>/NAME.png (white = defect):

- pixel AUROC (sklearn's roc_auc_score) over a seeded uniform sample of the pixels (--pixel-share of
  them), overall and per defect kind (that kind's images with the good ones);
- PRO up to a false-positive rate of 0.3, normalised to 0..1 (MVTec AD's per-region overlap): every
  connected defect region counts alike, whatever its size; thresholds from the sampled normal pixels;
- cost: ms per frame of each map's own work on the CPU beyond the batch's scoring (median over batches);
  then, on 32 test frames in batches of 4 in alternating rounds, `score` against `explain` per batch and
  `map_of` per frame at the image's own size.

Methods (see plugins/dfkde/patchmap.py for the one shipped):
- patch density (shipped, plugins/dfkde/patchmap.py; drawn through the plugin's own `explain` and `map_of`):
  a pass of its own on the prepared image enlarged twice (256 px), the backbone's stride-16 layer (16 x 16
  locations), each location's features averaged over its 3 x 3 neighbourhood, through a PCA to 64 and scored
  by a Gaussian KDE over 40,000 sampled locations of the good parts, smoothed; fitted in the same fit.
- local diagonal (shipped before, plugins/dfkde/maps.py; what a version without the patch map draws):
  every location of every layer scored by its features' squared distance to the good parts' per-channel
  mean in units of their per-channel spread (one diagonal Gaussian for all positions, fitted alongside
  the KDE from two sums), averaged over each layer's channels, then over the layers on the finest grid,
  smoothed, on the model's fixed scale.
- local gaussian, full cov: the same with a full covariance over the concatenated local features
  (PaDiM without positions). Its statistics cannot be summed from per-image rows of bounded size, so
  cross-fitted refits (DFKDE's embed / fit_embeddings) could not carry them.
- feature occlusion: how much the pooled KDE log-density rises when one location's features are replaced
  by the good parts' mean (leave-one-location-out of the pooled embedding the score is made of).
- gradient x feature: the first-order form of feature occlusion (the log-density's gradient at the pooled
  embedding dotted with each location's share).
- local kde: each location's features projected through the fitted PCA and scored by the pooled KDE.
- input gradient: |d log-density / d pixel| through the backbone, summed over colours, smoothed (on every
  --gradient-every'th batch of 4 test images, for its cost).
- occlusion: the rise of the log-density when a mean-colour 32 px patch covers each part of the 128 px
  input, stride 16 (49 backbone passes a frame; on every --occlusion-every'th batch only, for its cost).
- centre prior: a Gaussian blob at the image centre (sigma a quarter of each side).
- mean good: |image - mean good image| (grey levels; the mean of train/good resized to 256 x 256,
  brought back to each image's size), smoothed.

    .venv/bin/python bench/anomaly_maps.py   # --data PATH (or $MAGNETIC_TILE): 40 s on 2 idle cores (13 min when busy)
    .venv/bin/python bench/anomaly_maps.py --data DIR --json
    .venv/bin/python bench/anomaly_maps.py --data sample-line   # `inspector samples --out sample-line` writes masks
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

import datasets
from inspector.imagefiles import find_images, read_image
from inspector.regions import regions_of
from inspector_dfkde.plugin import DfkdePlugin, DfkdeSettings, _MapDrawer

ROOT = Path(__file__).resolve().parents[1]
MAGNETIC_TILE = datasets.magnetic_tile()
BATCH = 4  # worker.batch_size
MAX_PIXELS = 10**8
PRO_FPR = 0.3
MEAN_SIZE = 256
SHIPPED = "patch density (shipped)"
BEFORE = "local diagonal (before)"
SMOOTH_SIGMA = 4.0  # pixels of the 128 px model input, as anomalib smooths at 4 of 256


# -- data -----------------------------------------------------------------------------------------------


def test_set(data: Path) -> list[tuple[Path, str, Path | None]]:
    """(image, kind, mask or None for good parts) for every test image."""
    items = []
    for path in find_images(data / "test"):
        kind = path.parent.name
        mask = None if kind == "good" else data / "ground_truth" / kind / (path.stem + ".png")
        if mask is not None and not mask.is_file():
            raise SystemExit(f"{path}: no ground truth at {mask}")
        items.append((path, kind, mask))
    return items


def read_mask(path: Path | None, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    if path is None:
        return np.zeros((height, width), dtype=bool)
    mask = read_image(path, MAX_PIXELS)[:, :, 0] > 127
    if mask.shape != (height, width):
        raise SystemExit(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image {width}x{height}")
    return mask


# -- map helpers ----------------------------------------------------------------------------------------


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """B x h x w, blurred with a separable Gaussian (reflect padding)."""
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    m = maps[:, None]
    m = F.conv2d(F.pad(m, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return m[:, 0]


def to_size(grid: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """h x w -> height x width (bilinear)."""
    width, height = size
    out = F.interpolate(grid[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def smoothed(grids: torch.Tensor, input_size: int) -> torch.Tensor:
    """Low-resolution grids -> the model's input size, smoothed as anomalib does."""
    up = F.interpolate(grids[:, None], size=(input_size, input_size), mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(up, SMOOTH_SIGMA)


def local_features(maps: list[torch.Tensor]) -> torch.Tensor:
    """Feature maps -> B x (h w) x D on the finest grid (nearest, so their mean is the pooled embedding)."""
    h, w = maps[0].shape[-2:]
    up = [m if m.shape[-2:] == (h, w) else F.interpolate(m, size=(h, w), mode="nearest") for m in maps]
    return torch.cat(up, dim=1).flatten(2).transpose(1, 2)


def log_density(plugin: DfkdePlugin, features: torch.Tensor) -> torch.Tensor:
    """The pooled KDE's log-density of rows of raw features, differentiable (plain logsumexp)."""
    model = plugin.model
    scaled, _ = model.preprocess(model.pca_model.transform(features), model.max_length)
    kde = model.kde_model
    q = scaled @ kde.bw_transform
    logits = q @ kde.whitened.T + kde.neg_half_sq_norm
    return torch.logsumexp(logits, dim=1) - 0.5 * (q * q).sum(1) + kde.log_norm


# -- candidates: each (plugin, prepared batch, feature maps) -> B x S x S maps at the model's input size ----


class LocalGaussian:
    """One Gaussian over every location's local features of the good parts (PaDiM without positions)."""

    def __init__(self, plugin: DfkdePlugin, train_batches: list[torch.Tensor]) -> None:
        d = plugin.model.feature_dim
        total, outer, n = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64), 0
        for batch in train_batches:
            x = local_features(plugin.model.get_feature_maps(batch)).reshape(-1, d).double()
            total += x.sum(0)
            outer += x.T @ x
            n += x.shape[0]
        mean = total / n
        cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
        cov += 0.01 * torch.eye(d, dtype=torch.float64) * cov.diagonal().mean()
        self.mean = mean.float()
        self.precision_chol = torch.linalg.cholesky(torch.linalg.inv(cov)).float()

    def __call__(self, plugin: DfkdePlugin, batch: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
        x = local_features(maps)
        z = (x - self.mean) @ self.precision_chol
        h, w = maps[0].shape[-2:]
        return smoothed((z * z).sum(-1).sqrt().reshape(-1, h, w), plugin.model.input_size)


def feature_occlusion(plugin: DfkdePlugin, batch: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
    x = local_features(maps)
    b, n, d = x.shape
    pooled = x.mean(1)
    mean = plugin.model.pca_model.mean
    replaced = pooled[:, None] + (mean - x) / n
    evaluate = plugin.model.evaluate
    rise = (evaluate(replaced.reshape(-1, d), as_log_likelihood=True).reshape(b, n)
            - evaluate(pooled, as_log_likelihood=True)[:, None])
    h, w = maps[0].shape[-2:]
    return smoothed(rise.reshape(b, h, w), plugin.model.input_size)


def gradient_x_feature(plugin: DfkdePlugin, batch: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
    x = local_features(maps)
    b, n, d = x.shape
    with torch.enable_grad():
        pooled = x.mean(1).clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(log_density(plugin, pooled).sum(), pooled)
    rise = ((plugin.model.pca_model.mean - x) / n * grad[:, None]).sum(-1)
    h, w = maps[0].shape[-2:]
    return smoothed(rise.reshape(b, h, w), plugin.model.input_size)


def local_kde(plugin: DfkdePlugin, batch: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
    x = local_features(maps)
    b, n, d = x.shape
    h, w = maps[0].shape[-2:]
    density = plugin.model.evaluate(x.reshape(-1, d), as_log_likelihood=True)
    return smoothed(-density.reshape(b, h, w), plugin.model.input_size)


def input_gradient(plugin: DfkdePlugin, batch: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
    model = plugin.model
    with torch.enable_grad():
        x = model.normalise_input(batch).requires_grad_(True)
        pooled = model.pool([m.float() for m in model.feature_extractor(x)])
        (grad,) = torch.autograd.grad(log_density(plugin, pooled).sum(), x)
    return gaussian_blur(grad.abs().sum(1), SMOOTH_SIGMA)


def occlusion(plugin: DfkdePlugin, batch: torch.Tensor, maps: list[torch.Tensor], patch: int = 32) -> torch.Tensor:
    """Grey patch (the normalised input's zero, i.e. the mean colour) at every patch position, stride patch/2."""
    model = plugin.model
    x = model.normalise_input(batch)
    size = model.input_size
    base = model.evaluate(model.pool(_normalised_maps(model, x)), as_log_likelihood=True)
    out = torch.zeros(x.shape[0], size, size)
    hits = torch.zeros(size, size)
    stride = patch // 2
    for top in range(0, size - patch + 1, stride):
        for left in range(0, size - patch + 1, stride):
            covered = x.clone()
            covered[:, :, top : top + patch, left : left + patch] = 0
            rise = model.evaluate(model.pool(_normalised_maps(model, covered)), as_log_likelihood=True) - base
            out[:, top : top + patch, left : left + patch] += rise[:, None, None]
            hits[top : top + patch, left : left + patch] += 1
    return gaussian_blur(out / hits, SMOOTH_SIGMA)


@torch.inference_mode()
def _normalised_maps(model: Any, x: torch.Tensor) -> list[torch.Tensor]:
    return [m.float() for m in model.feature_extractor(x.contiguous(memory_format=torch.channels_last))]


# -- baselines --------------------------------------------------------------------------------------------


def grey(image: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1).float().mean(0, keepdim=True)[None]
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0, 0]


def centre_prior(size: tuple[int, int]) -> np.ndarray:
    width, height = size
    y = (np.arange(height) - (height - 1) / 2) / (height / 4)
    x = (np.arange(width) - (width - 1) / 2) / (width / 4)
    return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2)).astype(np.float32)


# -- figures ----------------------------------------------------------------------------------------------


class Pixels:
    """The sampled pixels of every image (labels, scores per method), and every defect region's scores."""

    def __init__(self, share: float, seed: int = 0) -> None:
        self.share = share
        self.rng = np.random.default_rng(seed)
        self.labels: list[np.ndarray] = []
        self.kinds: list[np.ndarray] = []
        self.scores: dict[str, list[np.ndarray]] = {}
        self.regions: dict[str, list[np.ndarray]] = {}
        self.image: list[np.ndarray] = []  # which image each sampled pixel came from
        self.count = 0

    def add_image(self, mask: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, int]:
        """Choose this image's sampled pixels; returns (sample index, region labels, regions)."""
        chosen = np.flatnonzero(self.rng.random(mask.size) < self.share)
        self.labels.append(mask.ravel()[chosen])
        self.kinds.append(np.full(chosen.size, kind, dtype=object))
        self.image.append(np.full(chosen.size, self.count))
        self.count += 1
        regions, n = scipy.ndimage.label(mask)
        return chosen, regions, n

    def add_map(self, method: str, image: int, chosen: np.ndarray, regions: np.ndarray, n: int,
                anomaly_map: np.ndarray) -> None:
        self.scores.setdefault(method, [None] * 0)
        while len(self.scores[method]) < image:
            self.scores[method].append(None)
        self.scores[method].append(anomaly_map.ravel()[chosen].astype(np.float32))
        flat = regions.ravel()
        values = anomaly_map.ravel()
        for r in range(1, n + 1):
            self.regions.setdefault(method, []).append(np.sort(values[flat == r]))

    def figures(self, method: str) -> dict[str, Any]:
        parts = self.scores[method]
        keep = [i for i, p in enumerate(parts) if p is not None]
        scores = np.concatenate([parts[i] for i in keep])
        labels = np.concatenate([self.labels[i] for i in keep])
        kinds = np.concatenate([self.kinds[i] for i in keep])
        result = {"images": len(keep), "pixels": int(labels.size), "defect_pixels": int(labels.sum()),
                  "auroc": float(roc_auc_score(labels, scores)), "kinds": {}}
        for kind in sorted(set(kinds) - {"good"}):
            inside = (kinds == kind) | (kinds == "good")
            result["kinds"][kind] = float(roc_auc_score(labels[inside], scores[inside]))
        result["pro"] = pro(np.sort(scores[~labels]), self.regions[method])
        return result


def pro(normal: np.ndarray, regions: list[np.ndarray], limit: float = PRO_FPR, steps: int = 300) -> float:
    """Area under per-region overlap against false-positive rate, up to `limit`, over `limit` (0..1).

    Thresholds are the normal pixels' quantiles at FPR 0..limit; a region's overlap at a threshold is the
    share of its pixels at or above it."""
    fpr = np.linspace(0.0, limit, steps + 1)
    thresholds = np.quantile(normal, 1.0 - fpr)
    real_fpr = 1.0 - np.searchsorted(normal, thresholds, side="left") / normal.size
    overlap = np.mean([1.0 - np.searchsorted(r, thresholds, side="left") / r.size for r in regions], axis=0)
    order = np.argsort(real_fpr)
    x, y = real_fpr[order], overlap[order]
    x, y = np.append(x, limit), np.append(y, np.interp(limit, x, y))
    inside = x <= limit
    return float(np.trapezoid(y[inside], x[inside]) / limit)


class Located:
    """Regions at the calibrated level against the defect regions: how many of those a box overlaps, and how
    many good images get any box."""

    def __init__(self) -> None:
        self.good_images = self.good_with_boxes = self.defects = self.defects_hit = self.boxes = 0

    def add(self, boxes: list, truth: np.ndarray, n: int) -> None:
        self.boxes += len(boxes)
        if n == 0:
            self.good_images += 1
            self.good_with_boxes += bool(boxes)
            return
        hit: set[int] = set()
        for box in boxes:
            hit |= set(np.unique(truth[box.y : box.y + box.height, box.x : box.x + box.width]).tolist())
        self.defects += n
        self.defects_hit += len(hit - {0})

    def figures(self, level: float | None) -> dict[str, Any]:
        return {"level": level, "defect_regions": self.defects,
                "region_recall": self.defects_hit / max(1, self.defects),
                "good_images": self.good_images, "good_with_boxes": self.good_with_boxes / max(1, self.good_images),
                "boxes": self.boxes}


# -- the run ----------------------------------------------------------------------------------------------


def fit(data: Path, every: int = 1) -> tuple[DfkdePlugin, list[torch.Tensor], torch.Tensor]:
    """The shipped defaults fitted on train/good, the prepared training batches, and the mean good image."""
    plugin = DfkdePlugin.create(DfkdeSettings(), torch.device("cpu"))
    paths = find_images(data / "train" / "good")[:: max(1, every)]
    prepared, total = [], torch.zeros(MEAN_SIZE, MEAN_SIZE)
    for path in paths:
        prepared.append(plugin.prepare(read_image(path, MAX_PIXELS, plugin.decode_size)))
        total += grey(read_image(path, MAX_PIXELS), MEAN_SIZE)
    batches = [torch.stack(prepared[i : i + 16]) for i in range(0, len(prepared), 16)]
    plugin.fit(iter(batches))
    return plugin, batches, total / len(paths)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=MAGNETIC_TILE, help=datasets.HELP)
    parser.add_argument("--pixel-share", type=float, default=0.1, help="share of pixels sampled for AUROC")
    parser.add_argument("--occlusion-every", type=int, default=16,
                        help="occlusion on every N'th batch of 4 test images, for its cost (0: none)")
    parser.add_argument("--gradient-every", type=int, default=2,
                        help="input gradients on every N'th batch of 4 test images, for their cost (0: none)")
    parser.add_argument("--cost-rounds", type=int, default=5, help="rounds of the explain / score timing")
    parser.add_argument("--candidates", action=argparse.BooleanOptionalAction, default=True,
                        help="the rejected candidates too (--no-candidates: the two DFKDE maps and the baselines)")
    parser.add_argument("--train-every", type=int, default=1,
                        help="fit on every N'th good training image (a quicker run on a busy machine)")
    parser.add_argument("--test-every", type=int, default=1,
                        help="judge every N'th test image, of each kind alike (a quicker run on a busy machine)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine's cores: 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    if not (args.data / "train" / "good").is_dir() or not (args.data / "ground_truth").is_dir():
        parser.error(f"--data {args.data}: needs train/good/, test/ and ground_truth/ (MVTec AD's layout)")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    plugin, train_batches, mean_good = fit(args.data, args.train_every)
    fit_seconds = time.perf_counter() - started
    methods: dict[str, Callable[..., Any]] = {SHIPPED: None, BEFORE: None}
    if args.candidates:
        methods |= {"local gaussian, full cov": LocalGaussian(plugin, train_batches),
                    "feature occlusion": feature_occlusion, "gradient x feature": gradient_x_feature,
                    "local kde": local_kde, "input gradient": input_gradient, "occlusion": occlusion}
    every = {"input gradient": args.gradient_every, "occlusion": args.occlusion_every}
    items = test_set(args.data)[:: max(1, args.test_every)]
    pixels = Pixels(args.pixel_share)
    located = Located()
    cost: dict[str, list[float]] = {name: [] for name in methods}
    for start in range(0, len(items), BATCH):
        chunk = items[start : start + BATCH]
        images = [read_image(path, MAX_PIXELS) for path, _, _ in chunk]
        batch = torch.stack([plugin.prepare(read_image(path, MAX_PIXELS, plugin.decode_size)) for path, _, _ in chunk])
        maps = plugin.model.get_feature_maps(batch)
        explained = plugin.explain(batch)
        sampled = []
        for image, (path, kind, mask_path) in zip(images, chunk):
            size = (image.shape[1], image.shape[0])
            sampled.append((pixels.count, size, *pixels.add_image(read_mask(mask_path, size), kind)))
        for name, method in methods.items():
            if name in every and not (every[name] and (start // BATCH) % every[name] == 0):
                continue
            t0 = time.perf_counter()
            if name == SHIPPED:  # the plugin's own maps, as the worker and the tools ask for them
                drawn = [explained.map_of(i, s[1]) for i, s in enumerate(sampled)]
            elif name == BEFORE:  # the scoring pass's map, as a version without a patch map draws it
                before = _MapDrawer(plugin.model, maps)
                drawn = [before(i, s[1]) for i, s in enumerate(sampled)]
            else:
                grids = method(plugin, batch, maps)
                drawn = [to_size(grid, s[1]) for grid, s in zip(grids, sampled)]
            cost[name].append(1000 * (time.perf_counter() - t0) / len(chunk))
            for anomaly_map, (index, size, chosen, regions, n) in zip(drawn, sampled):
                pixels.add_map(name, index, chosen, regions, n, anomaly_map)
                if name == SHIPPED and plugin.region_level is not None:
                    located.add(regions_of(anomaly_map, plugin.region_level, size), regions, n)
        for image, (index, size, chosen, regions, n) in zip(images, sampled):
            pixels.add_map("centre prior", index, chosen, regions, n, centre_prior(size))
            diff = gaussian_blur((grey(image, MEAN_SIZE) - mean_good).abs()[None], 2 * SMOOTH_SIGMA)[0]
            pixels.add_map("mean good", index, chosen, regions, n, to_size(diff, size))
        elapsed = time.perf_counter() - started
        print(f"[{elapsed:6.0f} s] {start + len(chunk)}/{len(items)}", file=sys.stderr, flush=True)
    report = {"seconds": time.perf_counter() - started, "fit_seconds": fit_seconds, "data": str(args.data),
              "explain_vs_score": explain_cost(plugin, items, args.cost_rounds),
              "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "pixel_share": args.pixel_share, "methods": {},
              "regions": located.figures(plugin.region_level), "localisation_map": plugin.patch_map.density.figures
              if plugin.patch_map else None}
    for name in [m for m in list(methods) + ["centre prior", "mean good"] if m in pixels.scores]:  # --*-every 0: none
        report["methods"][name] = pixels.figures(name) | (
            {"ms_per_frame": statistics.median(cost[name])} if cost.get(name) else {})
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(table(report))
    return 0


def explain_cost(plugin: DfkdePlugin, items: list, rounds: int, frames: int = 32) -> dict[str, float]:
    """ms per batch of 4 of `score` and of `explain` on the same prepared frames, in rounds alternating the two
    (their order swapped each round); ms per frame of `map_of` at each image's own size."""
    chosen = items[:: max(1, len(items) // frames)][:frames]
    sizes, prepared = [], []
    for path, _, _ in chosen:
        image = read_image(path, MAX_PIXELS, plugin.decode_size)
        sizes.append(image_size(path))
        prepared.append(plugin.prepare(image))
    batches = [torch.stack(prepared[i : i + BATCH]) for i in range(0, len(prepared), BATCH)]
    calls = {"score": plugin.score, "explain": plugin.explain}
    for call in calls.values():  # warm-up
        call(batches[0])
    times: dict[str, list[float]] = {name: [] for name in calls}
    drawing: list[float] = []
    for r in range(rounds):
        explained = []
        for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
            t0 = time.perf_counter()
            results = [calls[name](batch) for batch in batches]
            times[name].append(1000 * (time.perf_counter() - t0) / len(batches))
            explained = results if name == "explain" else explained
        t0 = time.perf_counter()
        for b, batch_maps in enumerate(explained):
            for i in range(batches[b].shape[0]):
                batch_maps.map_of(i, sizes[b * BATCH + i])
        drawing.append(1000 * (time.perf_counter() - t0) / len(prepared))
    return {"score_ms_per_batch": statistics.median(times["score"]),
            "explain_ms_per_batch": statistics.median(times["explain"]),
            "map_of_ms_per_frame": statistics.median(drawing), "frames": len(prepared), "rounds": rounds,
            "mean_size": [float(np.mean([s[0] for s in sizes])), float(np.mean([s[1] for s in sizes]))]}


def image_size(path: Path) -> tuple[int, int]:
    image = read_image(path, MAX_PIXELS)
    return image.shape[1], image.shape[0]


def table(report: dict[str, Any]) -> str:
    kinds = sorted(next(iter(report["methods"].values()))["kinds"])
    lines = [f"bench/anomaly_maps.py on {report['data']}: {report['seconds']:.0f} s, torch threads "
             f"{report['torch_threads']}; pixel AUROC over a {report['pixel_share']:.0%} uniform sample of pixels",
             f"  {'method':<26}{'images':>7}{'AUROC':>7}{'PRO.3':>7}" + "".join(f"{k[:8]:>9}" for k in kinds)
             + f"{'ms/frame':>10}"]
    for name, f in report["methods"].items():
        ms = f"{f['ms_per_frame']:.1f}" if "ms_per_frame" in f else "-"
        lines.append(f"  {name:<26}{f['images']:>7}{f['auroc']:>7.3f}{f['pro']:>7.3f}"
                     + "".join(f"{f['kinds'][k]:>9.3f}" for k in kinds) + f"{ms:>10}")
    r = report["regions"]
    if r["level"] is not None:
        lines += ["", (f"regions at the calibrated level {r['level']:.4f}: a box overlaps {r['region_recall']:.1%} of "
                       f"the {r['defect_regions']} defect regions; {r['good_with_boxes']:.1%} of the "
                       f"{r['good_images']} good images get any box ({r['boxes']} boxes in all)")]
    c = report["explain_vs_score"]
    lines += ["", (f"cost on the CPU, {c['frames']} test frames in batches of {BATCH}, median of {c['rounds']} rounds: "
                   f"score {c['score_ms_per_batch']:.1f} ms per batch, explain {c['explain_ms_per_batch']:.1f} ms "
                   f"per batch; map_of {c['map_of_ms_per_frame']:.1f} ms per frame (at each image's own size, "
                   f"{c['mean_size'][0]:.0f} x {c['mean_size'][1]:.0f} on average)")]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
