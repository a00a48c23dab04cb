"""`inspector refit`: a new model version from an archive of normal parts.

scan the archive -> choose the calibration -> decode in parallel, streaming -> plugin.fit
-> score good images the fit did not see -> calibrate -> store.write -> announce.

Calibration sets the threshold from good images, each scored by a model fitted without it:

- held-out: a seeded share of the archive is left out of the fit and scored;
- cross-fit: the archive is cut into k seeded folds and each fold is scored by a model fitted on
  the other k - 1, so every image gets an out-of-sample score; the model stored is then fitted
  on every image. A plugin that can embed images once (ReusesEmbeddings: DFKDE's backbone
  features) refits only the cheap part per fold; any other plugin is fitted k + 1 times.

The automatic choice cross-fits a plugin that ReusesEmbeddings at any archive size; any other plugin
holds out `refit.held_out_share` when that gives at least CROSS_FIT_BELOW images and cross-fits below
that. `--held-out SHARE` asks for a plain hold-out and `--calibration` names the method.

Decoding runs on a thread pool with a bounded window of images in flight, so the
archive is never held in memory (cross-fitting keeps one embedding per image) and the
model is fed while the next images decode. Files are read as the worker decodes captures
(decode.read_file: its formats, its TIFF tile and JPEG scan limits, refit.max_image_pixels), at
most twice refit.max_image_pixels being decoded at once whatever decode_workers is; symlinked
folders are not followed. A file that cannot be read is skipped with a warning that names it,
and the manifest counts the skipped files by reason. Nothing is written to the store unless the fit and the
calibration succeeded.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from inspector import __version__, imageformats
from inspector.broker import announce, announcement
from inspector.config import Settings
from inspector.devices import describe_device, resolve_device
from inspector.errors import BrokerError, ConfigError, FitError
from inspector.imagefiles import scan_images
from inspector.plugin import (
    Calibration, ChoosesComponents, Components, FitReport, Plugin, ReusesEmbeddings, Scores, calibrate,
    calibration_images, decode_size, get_plugin, min_images_reason, score_all,
)
from inspector.stores import is_s3_url, open_store
from inspector.tools import groups
from inspector.tools.imagestream import ImageStream
from inspector.tools.progress import Progress
from inspector.tools.refit_options import (  # noqa: F401  (RefitOptions and CALIBRATIONS: imported from here)
    AUTO, CALIBRATIONS, CROSS_FIT, HELD_OUT, RefitOptions, check_options, will_announce,
)
from inspector.worker.decode import DECODE_KINDS, DecodeLimits, read_file_kind

log = logging.getLogger(__name__)

# Calibrating from fewer images than this sets a threshold from noise.
MIN_HELD_OUT = 20
# The automatic choice cross-fits when a hold-out would give fewer images than this: 200 are the
# fewest that resolve the default target of 0.5% (one image in 200).
CROSS_FIT_BELOW = 200

@dataclass
class RefitResult:
    version: str
    found: int
    used: int
    skipped: int
    held_out: int
    seconds: float
    calibration: dict[str, Any] | None  # the manifest's record
    announced: bool
    pruned: list[str] = field(default_factory=list)
    skipped_reasons: dict[str, int] = field(default_factory=dict)  # see skip_reasons
    groups: dict[str, Any] | None = None  # see Grouping.summary
    components: Components | None = None  # the plugin's component count and why (ChoosesComponents)
    calibrated: Calibration | None = None  # what the plugin's `calibrate` said

    @property
    def images_per_second(self) -> float:
        return (self.used + self.held_out) / self.seconds if self.seconds > 0 else 0.0


def split_held_out(paths: Sequence[Path], share: float, seed: int,
                   labels: np.ndarray | None = None) -> tuple[list[Path], list[Path]]:
    """A seeded random `share` of the paths held out of the fit, for calibration: whole groups (`labels`,
    see groups.Grouping; None: one image each), so that no part has frames on both sides."""
    count = held_out_count(len(paths), share)
    labels = np.arange(len(paths)) if labels is None else labels
    held = set(groups.split_groups(labels, count, seed).tolist())
    fit = [p for i, p in enumerate(paths) if i not in held]
    return fit, [paths[i] for i in sorted(held)]


def held_out_count(found: int, share: float) -> int:
    return round(found * share)


def kfold(n: int, k: int, seed: int) -> list[np.ndarray]:
    """The k folds of n items, seeded, each sorted: the test folds of scikit-learn's
    KFold(n_splits=k, shuffle=True, random_state=seed), a RandomState permutation cut into k runs, the
    first n % k of them one longer."""
    if not 2 <= k <= n:
        raise ValueError(f"{k} folds of {n} items: need 2 <= folds <= items")
    order = np.random.RandomState(seed).permutation(n)
    sizes = np.full(k, n // k)
    sizes[: n % k] += 1
    return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]


def auto_folds(images: int, groups: int) -> int:
    """Folds when --folds is not given. Each fold's model misses 1/k of the images, and its scores drift from
    the served model's as images per dimension fall, so small archives get more folds: 20 below 100 images
    (each fold's fit keeps 95%), 10 below 1000, 5 from there (fold fits cost more, the drift is small). With
    reused embeddings a fold costs a PCA and KDE fit, not a pass over the images. Never more than groups."""
    k = 20 if images < 100 else 10 if images < 1000 else 5
    return min(k, groups)


@dataclass
class FoldPlan:
    """How a cross-fit cuts its folds: the groups the archive names (`keys`, per path), joined by measured
    twins once the images are embedded, then k folds of whole groups (`k` 0: auto_folds), seeded or in
    capture-time order (`times`)."""

    keys: dict[str, list[Any]]
    k: int
    seed: int
    times: list[float] | None = None
    measure: bool = True
    grouping: groups.Grouping | None = None  # set by folds()

    def folds(self, n: int, rows: np.ndarray | None = None, positions: np.ndarray | None = None
              ) -> list[np.ndarray]:
        pairs = {}
        if self.measure and rows is not None and positions is not None:
            pairs["embeddings"] = [(int(positions[i]), int(positions[j])) for i, j in groups.twins(rows)]
        self.grouping = groups.group(n, self.keys, pairs)
        k = self.k or auto_folds(n, self.grouping.groups)
        if k > self.grouping.groups:
            raise FitError(f"{k} folds of {self.grouping.groups} groups of the same part ({n} images): lower "
                           "--folds, or add images of more parts")
        return groups.group_folds(self.grouping.labels, k, self.seed, self.times)


class CalibrationChoice(NamedTuple):
    method: str  # CROSS_FIT or HELD_OUT
    share: float  # held out, for HELD_OUT
    automatic: bool  # chosen by the rule, not asked for


def choose_calibration(options: RefitOptions, found: int, configured_share: float, *,
                       reuses_embeddings: bool) -> CalibrationChoice:
    """The calibration for an archive of `found` images: the method asked for, a plain hold-out when a share
    was given, else the automatic rule. A plugin that ReusesEmbeddings always cross-fits (it costs what a
    hold-out costs and scores every image, so no archive size switches methods); any other holds out when
    that gives at least CROSS_FIT_BELOW images (cross-fitting refits it once per fold)."""
    share = options.held_out_share if options.held_out_share is not None else configured_share
    method = options.calibration or (HELD_OUT if options.held_out_share is not None else AUTO)
    if method != AUTO:
        return CalibrationChoice(method, share, automatic=False)
    if reuses_embeddings:
        return CalibrationChoice(CROSS_FIT, share, automatic=True)
    held = held_out_count(found, share)
    return CalibrationChoice(HELD_OUT if held >= CROSS_FIT_BELOW else CROSS_FIT, share, automatic=True)


@dataclass
class CrossFit:
    """Cross-fitting's outcome: the plugin fitted on every usable image, and a score of each usable image
    by a model fitted without its fold."""

    report: FitReport
    scores: Scores  # one per usable image, in the order of `positions`
    positions: np.ndarray  # the index in `paths` of each scored image
    folds: list[np.ndarray]
    used: int
    skipped: list[tuple[Path, str]]
    fold_seconds: float  # the fold fits and their scoring: the cost beyond one ordinary fit
    reused_embeddings: bool
    grouping: groups.Grouping | None = None  # with a FoldPlan
    components: Components | None = None  # a plugin's component count fixed for every fit (ChoosesComponents)


def cross_fit(plugin: Plugin, create: Callable[[], Plugin], paths: Sequence[Path],
              folds: list[np.ndarray] | FoldPlan, stream: Callable[[], ImageStream], batch_size: int) -> CrossFit:
    """Score each fold of `paths` with a model fitted on the others, then fit `plugin` on all of them.

    `folds`: the folds, or a FoldPlan that cuts them from groups (measured twins included, where the plugin
    embeds). A plugin that ReusesEmbeddings embeds every image once, and fits each fold with the final
    model's scale where it can (fit_fold_embeddings); any other is fitted afresh (`create`) per fold,
    reading the images again each time. A plugin with `fix_components` fits as many components in every
    fold as its rule allows the smallest fold's fit, and the final model the same.
    """
    if isinstance(plugin, ReusesEmbeddings):
        return _cross_fit_embedded(plugin, paths, folds, stream, batch_size)
    return _cross_fit_refitting(plugin, create, paths, folds, stream, batch_size)


def _fold_labels(n: int, folds: list[np.ndarray]) -> np.ndarray:
    labels = np.full(n, -1)
    for j, fold in enumerate(folds):
        labels[fold] = j
    return labels


def _cross_fit_embedded(plugin: ReusesEmbeddings, paths: Sequence[Path], folds: list[np.ndarray],
                        stream: Callable[[], ImageStream], batch_size: int) -> CrossFit:
    feed = stream()
    positions: list[int] = []
    rows: list[torch.Tensor] = []
    for indices, batch in feed.indexed_batches(paths, batch_size):
        positions += indices
        rows.append(plugin.embed(batch))
    _check_readable(feed.used, len(paths))
    embeddings = torch.cat(rows)
    plan = folds if isinstance(folds, FoldPlan) else None
    if plan is not None:
        pooled = getattr(plugin, "pooled", lambda rows: rows)(embeddings)
        folds = plan.folds(len(paths), pooled.double().numpy(), np.asarray(positions, dtype=np.int64))
    fold_of = _fold_labels(len(paths), folds)[np.asarray(positions, dtype=np.int64)]
    components = _fix_components(plugin, len(positions) - int(np.bincount(fold_of).max()))
    fit_fold = getattr(plugin, "fit_fold_embeddings", None)
    raw = np.empty(len(positions))
    probability = np.empty(len(positions))
    started = time.perf_counter()
    for j in range(len(folds)):
        inside = fold_of == j
        if not inside.any():
            continue  # every file of the fold was unreadable
        rest = embeddings[torch.from_numpy(~inside)]
        _fit_fold(plugin.fit_embeddings if fit_fold is None else lambda rows: fit_fold(rows, embeddings), rest, j,
                  len(folds))
        scores = plugin.score_embeddings(embeddings[torch.from_numpy(inside)])
        raw[inside], probability[inside] = scores.raw, scores.probability
    fold_seconds = time.perf_counter() - started
    report = plugin.fit_embeddings(embeddings)
    return CrossFit(report=report, scores=Scores(probability=probability, raw=raw),
                    positions=np.asarray(positions, dtype=np.int64), folds=folds, used=feed.used,
                    skipped=feed.skipped, fold_seconds=fold_seconds, reused_embeddings=True,
                    grouping=plan.grouping if plan else None, components=components)


def _cross_fit_refitting(plugin: Plugin, create: Callable[[], Plugin], paths: Sequence[Path],
                         folds: list[np.ndarray] | FoldPlan, stream: Callable[[], ImageStream], batch_size: int
                         ) -> CrossFit:
    started = time.perf_counter()
    plan = folds if isinstance(folds, FoldPlan) else None
    if plan is not None:
        folds = plan.folds(len(paths))
    raw = np.full(len(paths), np.nan)
    probability = np.full(len(paths), np.nan)
    fold_of = _fold_labels(len(paths), folds)
    smallest_fit = len(paths) - max(map(len, folds))
    components = _fix_components(plugin, smallest_fit)
    for j, fold in enumerate(folds):
        fold_plugin = create()
        _fix_components(fold_plugin, smallest_fit)
        rest = [path for path, label in zip(paths, fold_of) if label != j]
        _fit_fold(fold_plugin.fit, stream().batches(rest, batch_size), j, len(folds))
        for indices, batch in stream().indexed_batches([paths[i] for i in fold], batch_size):
            scores = fold_plugin.score(batch)
            raw[fold[indices]], probability[fold[indices]] = scores.raw, scores.probability
    fold_seconds = time.perf_counter() - started
    final = stream()
    report = plugin.fit(final.batches(paths, batch_size))
    _check_readable(final.used, len(paths))
    positions = np.flatnonzero(~np.isnan(raw))
    return CrossFit(report=report, scores=Scores(probability=probability[positions], raw=raw[positions]),
                    positions=positions, folds=folds, used=final.used, skipped=final.skipped,
                    fold_seconds=fold_seconds, reused_embeddings=False,
                    grouping=plan.grouping if plan else None, components=components)


def _fix_components(plugin: Any, images: int) -> Components | None:
    """The plugin's own component rule, applied once for every fit of a cross-fit (ChoosesComponents)."""
    if not isinstance(plugin, ChoosesComponents):
        return None
    try:
        return plugin.fix_components(images)
    except FitError as exc:
        raise FitError(f"cross-fitted calibration: {exc} for the smallest fold's fit. Add images, raise --folds "
                       "(each fold's fit then keeps more of them), or use --no-calibrate") from exc


def _fit_fold(fit: Callable[[Any], FitReport], data: Any, j: int, k: int) -> None:
    try:
        fit(data)
    except FitError as exc:
        raise FitError(f"cross-fitted calibration, fold {j + 1} of {k}: {exc}. Add images, raise --folds (each "
                       "fold's fit then keeps more of them), or use --calibration held-out or --no-calibrate"
                       ) from exc


def _check_readable(used: int, found: int) -> None:
    if used < MIN_HELD_OUT:
        raise FitError(f"only {used} of {found} images could be read; cross-fitted calibration needs at least "
                       f"{MIN_HELD_OUT}")


def run_refit(settings: Settings, options: RefitOptions) -> RefitResult:
    """Fit, calibrate, store and announce a new version of `options.model`."""
    check_options(settings, options)
    model_settings = settings.models[options.model]
    refit = settings.refit
    started = time.perf_counter()
    scan = scan_images(options.data)
    paths = scan.paths
    _check_store_writable(settings)
    device = resolve_device(settings.device)
    plugin_cls = get_plugin(model_settings.plugin)
    plugin_settings = settings.plugin_settings(model_settings.plugin)
    plugin = plugin_cls.create(plugin_settings, device)
    choice = choose_calibration(options, len(paths), refit.held_out_share,
                                reuses_embeddings=isinstance(plugin, ReusesEmbeddings))
    share = choice.share
    workers = refit.decode_workers or max(1, os.cpu_count() or 1)

    limits = DecodeLimits(settings.worker.max_image_bytes, refit.max_image_pixels,
                          max_jpeg_scans=settings.worker.max_jpeg_scans, pixels_setting="refit.max_image_pixels")
    decoded: dict[Path, str] = {}  # each image used, and how it decoded: the manifest's images.decoded

    def read(path: Path) -> np.ndarray:
        pixels, kind = read_file_kind(path, limits, decode_size(plugin))
        decoded[path] = kind
        return pixels
    _check_enough(paths, read, options, plugin, model_settings.plugin, share)

    def stream(progress: Progress) -> Callable[[], ImageStream]:
        return lambda: ImageStream(plugin.prepare, workers, refit.max_image_pixels, progress, read=read)

    if options.calibrate and choice.method == CROSS_FIT:
        _check_cross_fit(paths, options, plugin.min_images, model_settings.plugin)
        keys, times = archive_groups(paths, options, settings)
        plan = FoldPlan(keys, options.folds, refit.seed, times if _fold_order(options, settings) == groups.TIME
                        else None, measure=refit.group_twins)
        log.info("refit %r from %d images under %s, calibrated by cross-fitting %s folds of parts, with %s on %s",
                 options.model, len(paths), options.data, options.folds or "automatic", model_settings.plugin,
                 describe_device(device))
        passes = 1 if isinstance(plugin, ReusesEmbeddings) else (options.folds or auto_folds(len(paths), len(paths))
                                                                 ) + 1
        with Progress(passes * len(paths), "refit") as progress:
            crossed = cross_fit(plugin, lambda: plugin_cls.create(plugin_settings, device), paths, plan,
                                stream(progress), refit.batch_size)
        report, skipped, held_out = crossed.report, crossed.skipped, 0
        found_groups = crossed.grouping
        calibrated = calibrate(plugin, crossed.scores, model_settings.threshold, options.target_false_reject)
        calibration = calibrated.manifest() | {
            "folds": len(crossed.folds), "fold_order": _fold_order(options, settings), "fold_seed": refit.seed,
            "fold_seconds": round(crossed.fold_seconds, 3), "reused_embeddings": crossed.reused_embeddings,
        }
        scored = len(crossed.positions)
    else:
        keys, _ = archive_groups(paths, options, settings)
        found_groups = groups.group(len(paths), keys)
        fit_paths, held_paths = split_held_out(paths, share if options.calibrate else 0.0, refit.seed,
                                               found_groups.labels)
        _check_held_out(paths, fit_paths, held_paths, options, share, plugin.min_images, model_settings.plugin)
        log.info("refit %r from %d images under %s (%d held out) with %s on %s", options.model, len(paths),
                 options.data, len(held_paths), model_settings.plugin, describe_device(device))
        with Progress(len(paths), "refit") as progress:
            fit_stream = stream(progress)()
            try:
                report = plugin.fit(fit_stream.batches(fit_paths, refit.batch_size))
            except FitError as exc:
                if fit_stream.used >= plugin.min_images:
                    raise
                why = min_images_reason(plugin)
                raise FitError(
                    f"{model_settings.plugin} needs at least {plugin.min_images} images to fit"
                    f"{f' ({why})' if why else ''}; "
                    f"{fit_stream.used} usable of {len(fit_paths)} image files under {options.data} "
                    f"({len(fit_stream.skipped)} unreadable)"
                ) from exc
            held_stream = stream(progress)()
            held_scores = score_all(plugin, held_stream.batches(held_paths, refit.batch_size))
        skipped, held_out = fit_stream.skipped + held_stream.skipped, held_stream.used
        calibrated, calibration = None, None
        scored = held_stream.used
        if options.calibrate:
            if scored < MIN_HELD_OUT:
                raise FitError(f"only {scored} held-out images could be read; calibration needs {MIN_HELD_OUT}")
            calibrated = calibrate(plugin, held_scores, model_settings.threshold, options.target_false_reject)
            calibration = calibrated.manifest() | {"held_out_share": share}
    if calibration is not None:
        # A target too fine for the images scored is the plugin's to refuse (DFKDE: k = 0, see its calibrate).
        calibration |= {"method": choice.method, "automatic": choice.automatic, "held_out": scored,
                        "false_reject_resolution": 1.0 / scored}

    components = plugin.components if isinstance(plugin, ChoosesComponents) else None  # its rule, as it applied
    if components and components.reduced:
        log.warning("%d components fitted of the %d configured: %d images per fit carry %d at %d images per "
                    "component", components.used, components.configured, components.images_per_fit,
                    components.used, components.images_per_component)
    skipped = scan.skipped + skipped
    reasons = skip_reasons(skipped)
    if skipped:
        log.warning("%d files under %s skipped: %s", len(skipped), options.data,
                    ", ".join(f"{count} {reason}" for reason, count in reasons.items()))
    manifest = {
        "plugin": model_settings.plugin,
        "settings": plugin.describe(),
        "threshold": model_settings.threshold,
        "images": {"found": len(paths), "used": report.images, "embeddings": report.embeddings,
                   "held_out": held_out, "skipped": len(skipped), "skipped_reasons": reasons,
                   "groups": found_groups.summary(),
                   "decoded": {kind: sum(k == kind for k in decoded.values()) for kind in DECODE_KINDS}}
                  | ({"components": asdict(components)} if components else {}),
        "source": str(options.data.resolve()),
        "calibration": calibration,
        "device": str(device),
        "inspector_version": __version__,
        "torch_version": torch.__version__,
    }
    store = open_store(settings.store)
    info = store.write(options.model, plugin.save, manifest)
    pruned = store.prune(options.model, options.keep) if options.keep else []
    seconds = time.perf_counter() - started

    announced = False
    if will_announce(settings, options):
        try:
            announce(settings.broker, announcement(options.model, info.version, model_settings.plugin, "refit"))
            announced = True
        except BrokerError as exc:
            log.warning("%s", exc)
    return RefitResult(version=info.version, found=len(paths), used=report.images, skipped=len(skipped),
                       held_out=held_out, seconds=seconds, calibration=calibration, announced=announced,
                       pruned=pruned, skipped_reasons=reasons, groups=found_groups.summary(), components=components,
                       calibrated=calibrated)


def _fold_order(options: RefitOptions, settings: Settings) -> str:
    return options.fold_order or settings.refit.fold_order


def archive_groups(paths: Sequence[Path], options: RefitOptions, settings: Settings
                   ) -> tuple[dict[str, list[Any]], list[float]]:
    """What the archive says of its parts, as configured: a part key per image from the file-name pattern,
    the sidecar and capture-time blocks (groups.group joins them), and each image's capture time (mtime)."""
    refit = settings.refit
    names = [path.relative_to(options.data).as_posix() if path.is_relative_to(options.data) else path.name
             for path in paths]
    times = []
    for path in paths:
        try:
            times.append(path.stat().st_mtime)
        except OSError:
            times.append(math.inf)  # unreadable: skipped when read, its own block here
    keys: dict[str, list[Any]] = {}
    pattern = options.group_pattern if options.group_pattern is not None else refit.group_pattern
    if pattern:
        keys["pattern"] = groups.by_pattern(names, pattern)
    sidecar = options.group_sidecar if options.group_sidecar is not None else refit.group_sidecar
    if sidecar:
        keys["sidecar"] = groups.by_sidecar(names, groups.read_sidecar(Path(sidecar)))
    seconds = options.group_seconds if options.group_seconds is not None else refit.group_seconds
    if seconds > 0:
        keys["capture_time"] = groups.capture_blocks(times, seconds)
    return keys, times


def skip_reasons(skipped: Sequence[tuple[Path, str]]) -> dict[str, int]:
    """How many files were skipped for each kind of reason, most first: a frame error's code
    (image_too_many_pixels, image_too_complex, file_not_found, ...) or the reason itself."""
    kinds = Counter(_kind(reason) for _, reason in skipped)
    return dict(kinds.most_common())


def _kind(reason: str) -> str:
    head = reason.split(":", 1)[0]
    return head if head.isidentifier() else "unreadable"


def images_needed(options: RefitOptions, min_images: int, share: float, *, reuses_embeddings: bool,
                  calibrate: bool | None = None, scored: int = MIN_HELD_OUT) -> int | None:
    """The fewest readable images that what was asked can fit and calibrate from (None: no count can, e.g. a
    hold-out of share 0): the plugin's minimum for a fit, and with calibration at least `scored` images scored
    (MIN_HELD_OUT, or more where the target needs them), one per fold, and the plugin's minimum left for the
    smallest fold's or the hold-out's fit."""
    scored = max(MIN_HELD_OUT, scored)
    if not (options.calibrate if calibrate is None else calibrate):
        return min_images
    for n in range(1, 10_000_000):
        choice = choose_calibration(options, n, share, reuses_embeddings=reuses_embeddings)
        if choice.method == CROSS_FIT:
            k = options.folds or auto_folds(n, n)
            if n >= max(scored, k) and n - math.ceil(n / k) >= min_images:
                return n
        else:
            if choice.share <= 0:
                return None
            held = held_out_count(n, choice.share)
            if held >= scored and n - held >= min_images:
                return n
    return None


def _check_enough(paths: Sequence[Path], read: Callable[[Path], Any], options: RefitOptions, plugin: Plugin,
                  name: str, share: float) -> None:
    """FitError before any fitting when the archive cannot give what was asked, saying the real minimum
    (counting only the files that decode), the setting behind the plugin's, and only advice that works."""
    reuses = isinstance(plugin, ReusesEmbeddings)
    scored, target_reason = MIN_HELD_OUT, ""
    needed = calibration_images(plugin, options.target_false_reject) if options.calibrate else None
    if needed is not None:
        scored = max(MIN_HELD_OUT, needed)
        if scored > MIN_HELD_OUT:
            target_reason = (f"a false-reject rate of {options.target_false_reject:g} needs at least {scored} "
                             "calibration images, each scored by a model fitted without it")
    need = images_needed(options, plugin.min_images, share, reuses_embeddings=reuses, scored=scored)
    if need is not None and len(paths) >= need:
        return  # enough files; the fit itself counts those that do not decode
    readable = 0
    for path in paths[: min(need or len(paths), 10_000) + 1]:
        try:
            read(path)
            readable += 1
        except Exception:  # noqa: BLE001 - any failure to decode: not counted, named later by the fit's warning
            pass
    files = (f"{len(paths)} image files under {options.data}" + (f", {readable} readable" if readable < len(paths)
                                                                  else "")) if paths else (
        f"no image files under {options.data} ({imageformats.suffix_words()}, found recursively)")
    why = min_images_reason(plugin)
    fit_only = f"{name} needs at least {plugin.min_images} images to fit" + (f" ({why})" if why else "")
    if not options.calibrate:
        raise FitError(f"{fit_only}; found {files}. Add images of good parts")
    choice = choose_calibration(options, max(len(paths), 1), share, reuses_embeddings=reuses)
    asked = f"calibrating by {_method_asked(choice, options)}"
    needs = (f"{asked} needs at least {need} readable images" if need is not None
             else f"{asked} cannot work: --held-out 0 holds no image out")
    advice = []
    cross = images_needed(replace(options, calibration=CROSS_FIT, held_out_share=None), plugin.min_images, share,
                          reuses_embeddings=reuses, scored=scored)
    if options.calibration != CROSS_FIT and cross is not None and readable >= cross:
        advice.append("--calibration cross-fit (every image scored out of sample)")
    if target_reason and cross is not None and readable >= images_needed(
            replace(options, calibration=CROSS_FIT, held_out_share=None), plugin.min_images, share,
            reuses_embeddings=reuses):
        cross_flag = "" if options.calibration == CROSS_FIT else "--calibration cross-fit "
        advice.append(f"{cross_flag}--target-false-reject {_reachable_target(readable):.3g} (the lowest "
                      f"{readable} images can promise, cross-fitted)")
    if readable >= plugin.min_images:
        advice.append("--no-calibrate (keep the configured threshold; the fit alone needs "
                      f"{plugin.min_images})")
    reasons = "; ".join(filter(None, [target_reason, fit_only]))
    raise FitError(f"{needs}; found {files}. Add images of good parts"
                   + (f", or use {' or '.join(advice)}" if advice else "") + f". ({reasons})")


def _reachable_target(scored: int) -> float:
    """The lowest false-reject target `scored` calibration images can promise (k = floor(q(n + 1)) = 1),
    rounded up at three significant figures so that it still can."""
    exact = 1 / (scored + 1)
    rounded = float(f"{exact:.3g}")
    return rounded if rounded >= exact else float(f"{exact * 1.001:.3g}")


def _method_asked(choice: CalibrationChoice, options: RefitOptions) -> str:
    if choice.method == CROSS_FIT:
        return "cross-fitting" + (f" {options.folds} folds" if options.folds else "")
    return f"a hold-out of {choice.share:.0%}"


def _check_cross_fit(paths: Sequence[Path], options: RefitOptions, min_images: int, plugin: str) -> None:
    found, folds = len(paths), options.folds or auto_folds(len(paths), len(paths))
    if found < max(MIN_HELD_OUT, folds):
        raise FitError(
            f"calibration needs at least {MIN_HELD_OUT} images (and one per fold); found {found} image files under "
            f"{options.data}. Add images, or use --no-calibrate to keep the configured threshold"
        )
    smallest_fit = found - math.ceil(found / folds)  # before grouping; FoldPlan and the plugin check again
    if smallest_fit < min_images:
        raise FitError(
            f"{plugin} needs at least {min_images} images to fit, and cross-fitting {folds} folds of the "
            f"{found} image files under {options.data} leaves {smallest_fit} for a fold's fit. Add images, raise "
            "--folds, or use --no-calibrate"
        )


def _check_held_out(paths: Sequence[Path], fit_paths: Sequence[Path], held_paths: Sequence[Path],
                    options: RefitOptions, share: float, min_images: int, plugin: str) -> None:
    if options.calibrate and len(held_paths) < MIN_HELD_OUT:
        raise FitError(
            f"calibration needs at least {MIN_HELD_OUT} held-out images; {share:.0%} of the "
            f"{len(paths)} images found under {options.data} is {len(held_paths)}. Add images, raise "
            "--held-out, use --calibration cross-fit (every image scored out of sample), or --no-calibrate to "
            "keep the configured threshold"
        )
    if len(fit_paths) < min_images:
        raise FitError(
            f"{plugin} needs at least {min_images} images to fit; found "
            f"{len(fit_paths)} image files under {options.data}"
            + (f" after holding out {len(held_paths)} for calibration" if held_paths else "")
        )


def _check_store_writable(settings: Settings) -> None:
    """Fail before an hour of fitting, not after it, when the store cannot take the result: a folder that
    cannot be written, or an S3 store that cannot be reached, has no bucket or refuses the credentials."""
    if is_s3_url(settings.store.path):
        open_store(settings.store).names()
        return
    root = Path(settings.store.path)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"store.path {root}: not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"store.path {root}: cannot be created ({exc.strerror or exc})") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError(f"store.path {root}: not writable by this user")
