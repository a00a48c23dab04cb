"""`inspector evaluate`: how well the current version of a model sorts a labelled test set.

DIR is laid out as MVTec AD's `test/` folder: DIR/good/ holds images of good parts and
every other folder beside it is one kind of defect (DIR/scratch/, DIR/hole/, ...);
images are found recursively by suffix, as refit finds them.

Every image goes the worker's way: the file's bytes -> decode_capture with the worker's
limits -> plugin.prepare, on a thread pool that keeps a bounded window of images in
flight, overlapping with the scoring thread -> batches of worker.batch_size ->
plugin.score. A frame fails when its anomaly probability is at or over the model's
threshold, as in the worker. A file that does not decode, or that the plugin cannot
score, is named in a warning, counted and left out.

The figures come from the pure functions of inspector.tools.figures.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inspector.config import Settings
from inspector.devices import describe_device, resolve_device
from inspector.errors import ConfigError, InspectorError, StateError
from inspector.imagefiles import find_images, is_image_file
from inspector.plugin import decode_size
from inspector.stores import open_store
from inspector.tools.checks import TEST_SET_LAYOUT, check_batch_size, check_model
from inspector.tools.figures import Figures, figures
from inspector.tools.imagestream import ImageStream
from inspector.tools.progress import Progress
from inspector.tools.report import ScoredImage, write_report
from inspector.worker.decode import DecodeLimits, read_file
from inspector.worker.serving import ServedModel, load_version, score_batch

log = logging.getLogger(__name__)

GOOD = "good"
LAYOUT = TEST_SET_LAYOUT


# -- the test set on disk -------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledSet:
    """The image files of a labelled folder: good ones and those of each defect kind, sorted."""

    root: Path
    good: list[Path]
    kinds: dict[str, list[Path]]

    def labelled(self) -> list[tuple[str, Path]]:
        """(class, path) for every file; the class is `good` or the defect kind."""
        return [(GOOD, p) for p in self.good] + [(kind, p) for kind, paths in self.kinds.items() for p in paths]


def scan_test_set(data: Path) -> LabelledSet:
    """The files under `data` by class; ConfigError naming `data` and the layout when it does not fit."""
    if not data.exists():
        raise ConfigError(f"--data {data}: no such folder; {LAYOUT}")
    if not data.is_dir():
        raise ConfigError(f"--data {data}: not a folder; {LAYOUT}")
    entries = [e for e in os.scandir(data) if not e.name.startswith(".")]
    folders = sorted(e.name for e in entries if e.is_dir(follow_symlinks=True))
    if GOOD not in folders:
        hint = ""
        if (data / "test" / GOOD).is_dir():
            hint = f"; {data / 'test'} has that layout: pass --data {data / 'test'}"
        raise ConfigError(f"--data {data}: no good/ folder; {LAYOUT}{hint}")
    kinds = [name for name in folders if name != GOOD]
    if not kinds:
        raise ConfigError(f"--data {data}: no defect folder beside good/; {LAYOUT}")
    good = find_images(data / GOOD)
    if not good:
        raise ConfigError(f"--data {data}: no images in good/; {LAYOUT}")
    found = {kind: find_images(data / kind) for kind in kinds}
    if not any(found.values()):
        raise ConfigError(f"--data {data}: no images in any defect folder ({', '.join(kinds)}); {LAYOUT}")
    for kind, paths in found.items():
        if not paths:
            log.warning("--data %s: defect folder %s/ holds no images; it is left out", data, kind)
    loose = [e.name for e in entries if e.is_file() and is_image_file(Path(e.name))]
    if loose:
        log.warning("--data %s: %d image files lie directly in it, in no class folder (e.g. %s); they are left "
                    "out", data, len(loose), min(loose))
    return LabelledSet(root=data, good=good, kinds={kind: paths for kind, paths in found.items() if paths})


# -- scoring the worker's way ---------------------------------------------------------------


def read_like_a_capture(path: Path, limits: DecodeLimits, min_size: tuple[int, int] | None) -> np.ndarray:
    """A file's pixels as the worker would decode it arriving as a capture (limits, formats, JPEG scale)."""
    return read_file(path, limits, min_size)


def _batches(frames: Iterable[tuple[int, torch.Tensor]], size: int) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
    indices: list[int] = []
    tensors: list[torch.Tensor] = []
    for index, tensor in frames:
        indices.append(index)
        tensors.append(tensor)
        if len(tensors) == size:
            yield indices, tensors
            indices, tensors = [], []
    if tensors:
        yield indices, tensors


# -- the command -----------------------------------------------------------------------------


@dataclass
class EvaluateOptions:
    data: Path
    model: str
    batch_size: int
    report: Path | None = None  # also write the HTML page of tools/report.py there


@dataclass
class Evaluation:
    model: dict[str, str]
    device: str
    data: Path
    found: int
    unreadable: list[tuple[Path, str]]
    unscored: list[tuple[Path, str]]
    seconds: float
    figures: Figures

    @property
    def scored(self) -> int:
        return self.figures.good + self.figures.defective

    def as_dict(self) -> dict[str, Any]:
        """The figures and counts as plain JSON data (NaN as null)."""
        f = self.figures
        c = f.confusion
        best = f.best_f1
        data = {
            "model": self.model,
            "device": self.device,
            "data": str(self.data.resolve()),
            "threshold": f.threshold,
            "images": {"found": self.found, "scored": self.scored, "good": f.good, "defective": f.defective,
                       "unreadable": len(self.unreadable), "unscored": len(self.unscored)},
            "auroc": f.auroc,
            "average_precision": f.average_precision,
            "at_threshold": {"precision": c.precision, "recall": c.recall, "f1": c.f1,
                             "false_reject_rate": c.false_reject_rate},
            "confusion": c.as_dict(),
            "kinds": f.kinds,
            "best_f1": {"threshold": best.threshold, "next_below": best.next_below, "f1": best.f1,
                        "precision": best.precision, "recall": best.recall, "applied": False},
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.found / self.seconds, 2) if self.seconds > 0 else None,
        }
        return _json_clean(data)

    def table(self) -> str:
        """The figures as an operator reads them."""
        f, c, best = self.figures, self.figures.confusion, self.figures.best_f1
        m = self.model
        left_out = len(self.unreadable) + len(self.unscored)
        rate = f"{self.found / self.seconds:.1f} images/s" if self.seconds > 0 else ""
        lines = [
            f"model {m['name']!r}: {m['plugin']} version {m['version']} on {self.device}",
            (f"data {self.data}: {self.scored} images scored ({f.good} good, {f.defective} defective in "
             f"{len(f.kinds)} kinds), {left_out} left out ({len(self.unreadable)} unreadable, "
             f"{len(self.unscored)} not scored); {self.seconds:.1f} s, {rate}"),
            "",
            f"  {'image AUROC':<24}{_fixed(f.auroc)}",
            f"  {'average precision':<24}{_fixed(f.average_precision)}",
            f"  at the model's threshold {f.threshold:g} (a frame fails at or over it):",
            f"    {'precision':<22}{_fixed(c.precision)}",
            f"    {'recall':<22}{_fixed(c.recall)}",
            f"    {'F1':<22}{_fixed(c.f1)}",
            f"    {'false-reject rate':<22}{_percent(c.false_reject_rate)}  ({c.good_failed} of {f.good} good)",
            "",
            f"  {'defect kind':<20}{'images':>7}{'recall':>9}{'AUROC':>8}",
        ]
        for kind, k in f.kinds.items():
            lines.append(f"  {kind:<20}{k['images']:>7}{_percent(k['recall']):>9}{_fixed(k['auroc']):>8}")
        lines.append(f"  {'all defective':<20}{f.defective:>7}{_percent(c.recall):>9}{_fixed(f.auroc):>8}")
        lines += [
            "",
            f"  {'confusion':<20}{'passed':>7}{'failed':>9}",
            f"  {'good':<20}{c.good_passed:>7}{c.good_failed:>9}",
            f"  {'defective':<20}{c.defective_passed:>7}{c.defective_failed:>9}",
            "",
            (f"  F1-best threshold {best.threshold:.6g}: F1 {_fixed(best.f1)} "
             f"(precision {_fixed(best.precision)}, recall {_fixed(best.recall)})"),
            f"    for information only, not applied: the model keeps its threshold {f.threshold:g}.",
            "    Any threshold " + (f"above {best.next_below:.6g} and " if best.next_below is not None else "")
            + f"up to {best.threshold:.6g} gives the same verdicts on this set"
            + ("; the model's threshold is one of them." if self._threshold_is_best() else "."),
        ]
        return "\n".join(lines)

    def _threshold_is_best(self) -> bool:
        best, threshold = self.figures.best_f1, self.figures.threshold
        return (best.next_below is None or threshold > best.next_below) and threshold <= best.threshold


def _fixed(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1%}"


def _json_clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {key: _json_clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_clean(item) for item in value]
    return value


def load_current(settings: Settings, name: str, device: torch.device) -> ServedModel:
    """The current version of `name`, verified and warmed up; StateError (exit 1) when none is stored."""
    store = open_store(settings.store)
    if store.current(name) is None:
        try:
            stored = [info.version for info in store.versions(name)]
        except ConfigError:  # no folder for the model at all
            stored = []
        extra = (f", or make one of the stored versions ({', '.join(stored)}) current with "
                 f"`inspector models rollback {name} VERSION`") if stored else ""
        raise StateError(f"model {name!r} has no current version in the store {settings.store.path}; run "
                         f"`inspector refit --model {name} --data DIR` to fit one{extra}")
    model = settings.models[name]
    return load_version(store, name, model, device, plugin_settings=settings.plugin_settings(model.plugin))


def check_model_and_batch(settings: Settings, model: str, batch_size: int) -> None:
    """The --model and --batch-size of a tool that scores files (evaluate, explain), checked before any work."""
    check_model(settings, model)
    check_batch_size(batch_size)


def run_evaluate(settings: Settings, options: EvaluateOptions) -> Evaluation:
    """Score every image of the labelled folder with the model's current version and compute the figures."""
    check_model_and_batch(settings, options.model, options.batch_size)
    test_set = scan_test_set(options.data)
    labelled = test_set.labelled()
    device = resolve_device(settings.device)
    served = load_current(settings, options.model, device)
    log.info("evaluate model %s version %s on %s: %d images under %s (%d good, %d defective in %d kinds)",
             served.name, served.version, describe_device(device), len(labelled), options.data,
             len(test_set.good), len(labelled) - len(test_set.good), len(test_set.kinds))

    started = time.perf_counter()
    paths = [path for _, path in labelled]
    probability = np.full(len(paths), np.nan)
    unscored: list[tuple[Path, str]] = []
    workers = settings.worker.decode_threads or max(1, os.cpu_count() or 1)
    with Progress(len(paths), "evaluate") as progress:
        limits = DecodeLimits.from_settings(settings.worker)
        stream = ImageStream(served.plugin.prepare, workers, limits.max_image_pixels, progress,
                             read=functools.partial(read_like_a_capture, limits=limits,
                                                    min_size=decode_size(served.plugin)))
        for indices, tensors in _batches(stream.indexed(paths), options.batch_size):
            scores, _, failures = score_batch(served, tensors)
            probability[indices] = scores
            for index, failure in zip(indices, failures):
                if failure is not None:
                    log.warning("skipping %s: scoring_failed: %s", paths[index], failure)
                    unscored.append((paths[index], failure))
    seconds = time.perf_counter() - started

    classes = np.array([label for label, _ in labelled])
    scored = ~np.isnan(probability)
    good = probability[(classes == GOOD) & scored]
    kinds = {kind: probability[(classes == kind) & scored] for kind in test_set.kinds}
    left_out = len(stream.skipped) + len(unscored)
    if len(good) == 0 or not any(len(k) for k in kinds.values()):
        empty = "good/" if len(good) == 0 else "any defect folder"
        raise InspectorError(f"--data {options.data}: no image in {empty} could be scored ({left_out} files left "
                             "out, each named in a warning above); no figures to give")
    evaluation = Evaluation(
        model=served.identity(), device=str(device), data=options.data, found=len(paths),
        unreadable=stream.skipped, unscored=unscored, seconds=seconds,
        figures=figures(good, kinds, served.threshold),
    )
    if options.report is not None:
        started = time.perf_counter()
        images = [ScoredImage(path=path, relative=path.relative_to(options.data).as_posix(), kind=label,
                              probability=float(p)) for (label, path), p in zip(labelled, probability)]
        calibration = open_store(settings.store).info(served.name, served.version).manifest.get("calibration")
        write_report(options.report, evaluation.as_dict(), images, served, calibration,
                     read=functools.partial(read_like_a_capture, limits=limits, min_size=decode_size(served.plugin)),
                     read_full=functools.partial(read_like_a_capture, limits=limits, min_size=None),
                     batch_size=options.batch_size, workers=workers)
        log.info("report written to %s in %.1f s", options.report, time.perf_counter() - started)
    return evaluation
