"""`inspector refit`: a new model version from an archive of normal parts.

scan the archive -> seeded split (fit / held out) -> decode in parallel, streaming
-> plugin.fit -> score the held-out images -> calibrate -> store.write -> announce.

Decoding runs on a thread pool with a bounded window of images in flight, so the
archive is never held in memory and the model is fed while the next images decode.
A file that cannot be read is skipped with a warning that names it. Nothing is
written to the store unless the fit and the calibration succeeded.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inspector import __version__
from inspector.broker import announce, announcement
from inspector.config import Settings
from inspector.devices import describe_device, resolve_device
from inspector.errors import BrokerError, ConfigError, FitError
from inspector.imagefiles import find_images
from inspector.plugin import decode_size, get_plugin, score_all
from inspector.store import ModelStore
from inspector.tools.imagestream import ImageStream
from inspector.tools.progress import Progress

log = logging.getLogger(__name__)

# Calibrating from fewer held-out images than this sets a threshold from noise.
MIN_HELD_OUT = 20


@dataclass
class RefitOptions:
    data: Path
    model: str
    calibrate: bool = True
    target_false_reject: float = 0.005
    held_out_share: float = 0.1
    keep: int = 0
    announce: bool = True


@dataclass
class RefitResult:
    version: str
    found: int
    used: int
    skipped: int
    held_out: int
    seconds: float
    calibration: dict[str, Any] | None
    announced: bool
    pruned: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return (self.used + self.held_out) / self.seconds if self.seconds > 0 else 0.0


def split_held_out(paths: Sequence[Path], share: float, seed: int) -> tuple[list[Path], list[Path]]:
    """A seeded random `share` of the paths held out of the fit, for calibration."""
    count = int(round(len(paths) * share))
    order = np.random.default_rng(seed).permutation(len(paths))
    held = set(order[:count].tolist())
    fit = [p for i, p in enumerate(paths) if i not in held]
    return fit, [paths[i] for i in sorted(held)]


def run_refit(settings: Settings, options: RefitOptions) -> RefitResult:
    """Fit, calibrate, store and announce a new version of `options.model`."""
    if options.model not in settings.models:
        raise ConfigError(f"--model {options.model!r} is not a configured model; configured: {sorted(settings.models)}")
    if not 0 < options.target_false_reject < 1:
        raise ConfigError(f"--target-false-reject {options.target_false_reject}: must be between 0 and 1")
    if not 0 <= options.held_out_share < 1:
        raise ConfigError(f"--held-out {options.held_out_share}: must be at least 0 and below 1")
    model_settings = settings.models[options.model]
    refit = settings.refit
    started = time.perf_counter()
    paths = find_images(options.data)
    _check_store_writable(settings.store.path)
    share = options.held_out_share if options.calibrate else 0.0
    fit_paths, held_paths = split_held_out(paths, share, refit.seed)
    if options.calibrate and len(held_paths) < MIN_HELD_OUT:
        raise FitError(
            f"calibration needs at least {MIN_HELD_OUT} held-out images; {options.held_out_share:.0%} of the "
            f"{len(paths)} images found under {options.data} is {len(held_paths)}. Add images, raise "
            "--held-out, or use --no-calibrate to keep the configured threshold"
        )

    device = resolve_device(settings.device)
    plugin_cls = get_plugin(model_settings.plugin)
    plugin = plugin_cls.create(settings.plugin_settings(model_settings.plugin), device)
    log.info("refit %r from %d images under %s (%d held out) with %s on %s", options.model, len(paths),
             options.data, len(held_paths), model_settings.plugin, describe_device(device))
    if len(fit_paths) < plugin.min_images:
        raise FitError(
            f"{model_settings.plugin} needs at least {plugin.min_images} images to fit; found "
            f"{len(fit_paths)} image files under {options.data}"
            + (f" after holding out {len(held_paths)} for calibration" if held_paths else "")
        )

    workers = refit.decode_workers or max(1, os.cpu_count() or 1)
    with Progress(len(paths), "refit") as progress:
        fit_stream = ImageStream(plugin.prepare, workers, refit.max_image_pixels, progress, decode_size(plugin))
        try:
            report = plugin.fit(fit_stream.batches(fit_paths, refit.batch_size))
        except FitError as exc:
            if fit_stream.used >= plugin.min_images:
                raise
            raise FitError(
                f"{model_settings.plugin} needs at least {plugin.min_images} images to fit; "
                f"{fit_stream.used} usable of {len(fit_paths)} image files under {options.data} "
                f"({len(fit_stream.skipped)} unreadable)"
            ) from exc
        held_stream = ImageStream(plugin.prepare, workers, refit.max_image_pixels, progress, decode_size(plugin))
        held_scores = score_all(plugin, held_stream.batches(held_paths, refit.batch_size))
    skipped = fit_stream.skipped + held_stream.skipped
    calibration = None
    if options.calibrate:
        if held_stream.used < MIN_HELD_OUT:
            raise FitError(f"only {held_stream.used} held-out images could be read; calibration needs {MIN_HELD_OUT}")
        calibration = plugin.calibrate(held_scores, model_settings.threshold, options.target_false_reject)
        calibration["held_out"] = held_stream.used
        if held_stream.used * options.target_false_reject < 1:
            log.warning("a false-reject rate of %s cannot be resolved from %d held-out images: the threshold "
                        "rests on the few lowest-scoring ones; hold out at least %d images for it",
                        options.target_false_reject, held_stream.used, math.ceil(1 / options.target_false_reject))

    manifest = {
        "plugin": model_settings.plugin,
        "settings": plugin.describe(),
        "threshold": model_settings.threshold,
        "images": {"found": len(paths), "used": report.images, "embeddings": report.embeddings,
                   "held_out": held_stream.used, "skipped": len(skipped)},
        "source": str(options.data.resolve()),
        "calibration": calibration,
        "device": str(device),
        "inspector_version": __version__,
        "torch_version": torch.__version__,
    }
    store = ModelStore(settings.store.path)
    info = store.write(options.model, plugin.save, manifest)
    pruned = store.prune(options.model, options.keep) if options.keep else []
    seconds = time.perf_counter() - started

    announced = False
    if options.announce:
        try:
            announce(settings.broker, announcement(options.model, info.version, model_settings.plugin, "refit"))
            announced = True
        except BrokerError as exc:
            log.warning("%s", exc)
    return RefitResult(version=info.version, found=len(paths), used=report.images, skipped=len(skipped),
                       held_out=held_stream.used, seconds=seconds, calibration=calibration, announced=announced,
                       pruned=pruned)


def _check_store_writable(root: Path) -> None:
    """Fail before an hour of fitting, not after it, when the store cannot take the result."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"store.path {root}: not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"store.path {root}: cannot be created ({exc.strerror or exc})") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError(f"store.path {root}: not writable by this user")
