"""Do calibrated false-reject rates hold as the PCA components grow? Per archive size and component rule.

For archives of good images of several sizes, each rule for how many components an archive carries, and
targets of 1% and 5%: refit's own cross-fit (`cross_fit` with a FoldPlan as `inspector refit` builds it:
automatic folds, twins grouped, the components fixed from the smallest fold's fit) and the plugin's own
split-conformal `calibrate`, then the false-reject rate of the final model on fresh good images the fit never
saw, with a 95% Clopper-Pearson interval (pooled over disjoint archives of the same size, so the figure is the
rate averaged over archives, which is what split-conformal promises: k / (n + 1) <= target).

Every image is decoded as refit decodes it and embedded once (the backbone is the cost); each refit then
reuses the embeddings, as refit itself does for DFKDE. Beside the final model's rate, two candidate causes
of a broken promise are measured on the same fresh frames and boundary:

- fold: the rate of a fold's model (fitted without the archive's first fold), against the final model's;
- png (sample line): fresh frames sent as PNG to a model fitted on JPEG frames, as `inspector bench`
  sends its second encoding; test (magnetic-tile): the test/good images, beside the train/good leftovers.

A row is flagged `!` when its fails are unlikely (under 2.5%) if every archive's boundary kept its promise:
each boundary's own rate is Beta(k, n + 1 - k), so the fails are beta-binomial; the Clopper-Pearson interval
shown counts only the fresh frames' spread and is too narrow at small k.

Data: the synthetic sample line at the bench's resolution and encoding (`inspector bench --failing`: 1024 px
JPEG at quality 90 to fit, fresh frames from another seed as JPEG and PNG), and the magnetic-tile good images
(archives drawn from train/good, the fresh frames the rest of train/good and test/good).

    nice .venv/bin/python bench/components_calibration.py                     # both data sets, every rule
    .venv/bin/python bench/components_calibration.py --datasets sample-line --rules "2/48,shipped" --json
    .venv/bin/python bench/components_calibration.py --tabulate --rules 2/24,2/48   # the cached results again

The first run writes 800 frames of 1024 px (about 10 min on 2 busy cores) and embeds every image once; the
cross-fits then take about 3 min per data set for five rules.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets
from inspector_dfkde.conformal import boundary_rank
from inspector_dfkde.plugin import DfkdePlugin, DfkdeSettings
from quality import CONFIDENCE, clopper_pearson

from inspector.config import ModelSettings, RefitSettings, WorkerSettings
from inspector.imagefiles import find_images
from inspector.tools import samples
from inspector.tools.bench.frames import write_encoded
from inspector.tools.bench.options import ENCODINGS
from inspector.tools.refit import FoldPlan, cross_fit
from inspector.worker.decode import DecodeLimits, read_file

ARCHIVES = (40, 60, 100, 200, 400)
TARGETS = (0.01, 0.025, 0.05)  # each where the archive can promise it (k >= 1)
# A rule: "I/C" is one component per I images of a fit, at most C; "shipped" is the plugin's components_for.
RULES = ("2/24", "3/24", "4/24", "6/24", "2/48", "3/48", "4/48", "6/48", "shipped")
RESOLUTION = 1024  # inspector bench's default
FIT_POOL = 400  # sample-line frames archives are drawn from (disjoint prefixes)
FRESH = 400  # fresh sample-line frames (another seed)
FRESH_SEED = 11
log = logging.getLogger("components_calibration")
THRESHOLD = ModelSettings.model_fields["threshold"].default
BATCH = 32


@dataclass
class Pool:
    """One data set's embedded images: archive candidates, and fresh good frames per encoding."""

    name: str
    archive: torch.Tensor  # rows of `embed`, N x width
    fresh: dict[str, torch.Tensor]  # encoding -> rows; the first ("jpeg", or "as-is") is the main one


def _frames(args: tuple[int, int, int, int]) -> list[np.ndarray]:
    start, count, seed, size = args
    return samples.make_images(start + count, seed=seed, size=size)[start:]


def write_sample_line(root: Path, size: int, fit: int, fresh: int) -> None:
    """The fit frames (seed 0, JPEG, as `inspector bench` fits) and fresh ones (FRESH_SEED, JPEG and PNG)."""
    if (root / "done").exists():
        return
    with ProcessPoolExecutor(2) as pool:
        for folder, seed, count, encodings in (("fit", 0, fit, ("jpeg",)), ("fresh", FRESH_SEED, fresh,
                                                                              ("jpeg", "png"))):
            step = 25
            jobs = [(s, min(step, count - s), seed, size) for s in range(0, count, step)]
            images = [image for part in pool.map(_frames, jobs) for image in part]
            for encoding in encodings:
                write_encoded(root / f"{folder}-{encoding}", images, ENCODINGS[encoding])
    (root / "done").write_text("")


def embed_paths(plugin: DfkdePlugin, paths: list[Path]) -> torch.Tensor:
    """Rows of `embed` for each file, decoded as refit decodes archive files (decode.read_file, the plugin's
    decode size)."""
    worker, refit = WorkerSettings(), RefitSettings()
    limits = DecodeLimits(worker.max_image_bytes, refit.max_image_pixels, max_jpeg_scans=worker.max_jpeg_scans)
    size = plugin.decode_size

    def load(path: Path) -> torch.Tensor:
        return plugin.prepare(read_file(path, limits, size))

    rows = []
    with ThreadPoolExecutor(2) as pool:
        for start in range(0, len(paths), BATCH):
            batch = torch.stack(list(pool.map(load, paths[start : start + BATCH])))
            rows.append(plugin.embed(batch))
    return torch.cat(rows)


def _cached(cache: Path, key: str, plugin: DfkdePlugin, paths: list[Path]) -> torch.Tensor:
    file = cache / f"{key}.safetensors"  # tensors only: nothing in the cache is unpickled
    if file.exists():
        return load_file(str(file))["rows"]
    started = time.perf_counter()
    rows = embed_paths(plugin, paths)
    save_file({"rows": rows.contiguous()}, str(file))
    log.info("embedded %d images (%s) in %.0f s", len(paths), key, time.perf_counter() - started)
    return rows


def sample_line_pool(plugin: DfkdePlugin, cache: Path, size: int) -> Pool:
    root = cache / f"sample-line-{size}"
    write_sample_line(root, size, FIT_POOL, FRESH)
    fresh = {e: _cached(cache, f"sample-line-{size}-fresh-{e}", plugin, find_images(root / f"fresh-{e}"))
             for e in ("jpeg", "png")}
    return Pool("sample-line", _cached(cache, f"sample-line-{size}-fit", plugin, find_images(root / "fit-jpeg")),
                fresh)


def magnetic_tile_pool(plugin: DfkdePlugin, cache: Path, data: Path) -> Pool:
    train = _cached(cache, "magnetic-tile-train", plugin, find_images(data / "train" / "good"))
    test = _cached(cache, "magnetic-tile-test", plugin, find_images(data / "test" / "good"))
    order = np.random.default_rng(0).permutation(len(train))
    return Pool("magnetic-tile", train[torch.from_numpy(order)], {"test": test})


class CachedStream:
    """What cross_fit reads an archive through, serving rows embedded before (see `reuse`)."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows, self.used, self.skipped = rows, 0, []

    def indexed_batches(self, paths: list[Path], size: int):
        self.used = len(paths)
        for start in range(0, len(paths), size):
            indices = list(range(start, min(len(paths), start + size)))
            yield indices, self.rows[start : start + len(indices)]


def rule_of(name: str) -> Callable[[DfkdePlugin], None]:
    """Apply a rule to a plugin: its components_for replaced, or the shipped one kept."""
    if name == "shipped":
        return lambda plugin: None
    per, cap = (int(v) for v in name.split("/"))

    def apply(plugin: DfkdePlugin) -> None:
        plugin.configured_components = cap
        plugin.components_for = lambda images: min(cap, images // per)

    return apply


def one_archive(make: Callable[[], DfkdePlugin], rule: str, rows: torch.Tensor, fresh: dict[str, torch.Tensor]
                ) -> dict[str, Any]:
    """Cross-fit and calibrate on `rows` as refit does, then count fresh fails per target and encoding, for the
    final model and for the model of the archive's first fold."""
    plugin = make()
    rule_of(rule)(plugin)
    plugin.embed = lambda batch: batch  # the stream serves embedded rows
    refit = RefitSettings()
    plan = FoldPlan({}, 0, refit.seed, None, measure=refit.group_twins)
    paths = [Path(f"{i:05d}") for i in range(len(rows))]
    crossed = cross_fit(plugin, lambda: None, paths, plan, lambda: CachedStream(rows), BATCH)
    out: dict[str, Any] = {"images": len(rows), "folds": len(crossed.folds), "components": crossed.components.used,
                           "groups": crossed.grouping.groups if crossed.grouping else None, "targets": {}}
    boundaries = {}
    for target in TARGETS:
        if boundary_rank(len(rows), target) < 1:
            continue
        calibrated = plugin.calibrate(crossed.scores, THRESHOLD, target)
        boundaries[target] = calibrated.boundary
        entry = {"k": calibrated.promise.k, "expected": calibrated.promise.expected}
        for encoding, fresh_rows in fresh.items():
            scores = plugin.score_embeddings(fresh_rows)
            entry[encoding] = [int((scores.probability >= THRESHOLD).sum()), len(fresh_rows)]
        out["targets"][str(target)] = entry
    out["out_of_fold_median"] = float(np.median(crossed.scores.raw))
    main = next(iter(fresh))
    out["final_fresh_median"] = float(np.median(plugin.score_embeddings(fresh[main]).raw))
    first = np.zeros(len(rows), dtype=bool)
    first[crossed.folds[0]] = True
    plugin.fit_fold_embeddings(rows[torch.from_numpy(~first)], rows)
    fold_raw = plugin.score_embeddings(fresh[main]).raw
    out["fold_fresh_median"] = float(np.median(fold_raw))
    for target, boundary in boundaries.items():
        out["targets"][str(target)]["fold"] = [int((fold_raw <= boundary).sum()), len(fold_raw)]
    return out


def measure(pool: Pool, make: Callable[[], DfkdePlugin], rules: list[str], archives: list[int], replicates: int
            ) -> list[dict[str, Any]]:
    results = []
    for size in archives:
        count = min(replicates, len(pool.archive) // size)
        for rule in rules:
            started = time.perf_counter()
            runs = []
            for j in range(count):
                inside = np.zeros(len(pool.archive), dtype=bool)
                inside[j * size : (j + 1) * size] = True
                fresh = dict(pool.fresh)
                if pool.name == "magnetic-tile":  # the archive's own leftovers are fresh too, and come first
                    fresh = {"as-is": pool.archive[torch.from_numpy(~inside)], **fresh}
                runs.append(one_archive(make, rule, pool.archive[torch.from_numpy(inside)], fresh))
            results.append({"dataset": pool.name, "archive": size, "rule": rule, "runs": runs})
            log.info("%s %d images, rule %s: %d archives in %.1f s", pool.name, size, rule, count,
                         time.perf_counter() - started)
    return results


def promised_p_value(archives: list[tuple[int, int, int]], fails: int, draws: int = 20000) -> float:
    """How likely at least `fails` fresh frames fail in all, if each archive's boundary kept its promise: per
    archive (k, n, fresh frames), a rate from Beta(k, n + 1 - k), the boundary's own spread, then that many
    frames at that rate (a beta-binomial). The Clopper-Pearson interval counts only the frames' spread; this
    counts the boundary's too, which dominates at small k."""
    rng = np.random.default_rng(0)
    total = np.zeros(draws, dtype=np.int64)
    for k, n, frames in archives:
        total += rng.binomial(frames, rng.beta(k, n + 1 - k, draws))
    return float((total >= fails).mean())


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """Pooled fails per target and encoding over the archives of one size and rule, with intervals."""
    runs = result["runs"]
    out = {"dataset": result["dataset"], "archive": result["archive"], "rule": result["rule"],
           "archives": len(runs), "components": sorted({r["components"] for r in runs}),
           "median_shift_final": float(np.mean([r["final_fresh_median"] - r["out_of_fold_median"] for r in runs])),
           "median_shift_fold": float(np.mean([r["fold_fresh_median"] - r["out_of_fold_median"] for r in runs])),
           "targets": {}}
    for target in map(str, TARGETS):
        if target not in runs[0]["targets"]:
            continue
        entry = {"expected": float(np.mean([r["targets"][target]["expected"] for r in runs]))}
        for key in runs[0]["targets"][target]:
            if key in ("k", "expected"):
                continue
            fails = sum(r["targets"][target][key][0] for r in runs)
            total = sum(r["targets"][target][key][1] for r in runs)
            low, high = clopper_pearson(fails, total, CONFIDENCE)
            promised = [(r["targets"][target]["k"], r["images"], r["targets"][target][key][1]) for r in runs]
            entry[key] = {"fails": fails, "frames": total, "rate": fails / total, "low": low, "high": high,
                          "p_value": promised_p_value(promised, fails)}
        out["targets"][target] = entry
    return out


def table(rows: list[dict[str, Any]]) -> str:
    heading = ("false rejects of fresh good frames at the calibrated boundary "
               f"({CONFIDENCE:.0%} Clopper-Pearson, pooled over the archives of a size); `!` where so many fails "
               "had under 2.5% chance if every boundary kept its promise (beta-binomial: the boundary's own "
               "Beta(k, n + 1 - k) spread and the frames')")
    columns = (f"  {'data':<14}{'images':>7}{'rule':>8}{'comps':>8}{'arch':>5}  {'target':>6}  "
               f"{'final model':<27}{'a fold model':<27}{'png / test':<27}  shift final/fold")
    lines = [heading, columns]
    for row in rows:
        for target, entry in row["targets"].items():
            cells = []
            line = row["dataset"] == "sample-line"
            for key in ("jpeg" if line else "as-is", "fold", "png" if line else "test"):
                e = entry.get(key)
                if e is None:
                    cells.append(f"{'':<27}")
                    continue
                flag = "!" if e["p_value"] < 0.025 else " "
                cells.append(f"{e['rate']:>6.1%} [{e['low']:.1%}, {e['high']:.1%}]{flag}".ljust(27))
            comps = ",".join(map(str, row["components"]))
            lines.append(f"  {row['dataset']:<14}{row['archive']:>7}{row['rule']:>8}{comps:>8}{row['archives']:>5}  "
                         f"{float(target):>6.1%}  {''.join(cells)}  {row['median_shift_final']:+.1f}/"
                         f"{row['median_shift_fold']:+.1f}")
    lines.append("  final model: fresh frames of the archive's own kind (sample line: JPEG; magnetic-tile: train/good "
                 "images outside the archive); png / test: PNG frames to a JPEG-fitted model, or the test/good images")
    lines.append("  shift: the fresh frames' median log-density less the out-of-fold scores' median, nats (final "
                 "model / the first fold's model)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="sample-line,magnetic-tile")
    parser.add_argument("--rules", default=",".join(RULES), help="I/C (I images a component, at most C) or shipped")
    parser.add_argument("--archives", default=",".join(map(str, ARCHIVES)))
    parser.add_argument("--replicates", type=int, default=3, help="disjoint archives of each size, at most")
    parser.add_argument("--resolution", type=int, default=RESOLUTION, help="sample-line frames' side, px")
    parser.add_argument("--magnetic-tile", type=Path, default=datasets.magnetic_tile(), help=datasets.HELP)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/components-calibration"),
                        help="generated frames and embeddings, reused by later runs")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--tabulate", action="store_true", help="only the table of the last runs' results (cache)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.tabulate:
        rules = set(args.rules.split(","))
        found = [r for name in args.datasets.split(",") for r in json.loads((args.cache / f"results-{name}.json")
                                                                              .read_text()) if r["rule"] in rules]
        rows = [summary(r) for r in found]
        print(json.dumps(rows, indent=1) if args.json else table(rows))
        return 0
    settings = DfkdeSettings(localisation_maps=False)

    embedder = DfkdePlugin.create(settings, torch.device("cpu"))

    def make() -> DfkdePlugin:
        """A fresh plugin, sharing the loaded backbone (creating one loads it again, a second each time)."""
        plugin = DfkdePlugin(embedder.model, torch.device("cpu"), embedder.jpeg_reduced_decode, False)
        plugin.model.use_components(settings.n_comps)
        plugin.configured_components = settings.n_comps
        return plugin
    rows = []
    for name in args.datasets.split(","):
        pool = (sample_line_pool(embedder, args.cache, args.resolution) if name == "sample-line"
                else magnetic_tile_pool(embedder, args.cache, args.magnetic_tile))
        found = measure(pool, make, args.rules.split(","), [int(v) for v in args.archives.split(",")],
                        args.replicates)
        rows += [summary(r) for r in found]
        (args.cache / f"results-{name}.json").write_text(json.dumps(found))
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
