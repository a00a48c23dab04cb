"""`inspector demo`: fit the configured model on the synthetic line and show how it ranks defects.

A first run on a new machine: it exercises the plugin, the backbone weights and the
device end to end without a broker or an archive, and prints figures a line
engineer can judge (AUROC, probabilities per defect kind, throughput).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from inspector.config import Settings
from inspector.devices import describe_device, resolve_device
from inspector.plugin import calibrate, get_plugin, score_all
from inspector.tools import samples

log = logging.getLogger(__name__)
BATCH = 16
# A demo holds out few images, so it calibrates for a rate those few can resolve.
DEMO_FALSE_REJECT = 0.05


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    scores = np.concatenate([negatives, positives])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    unique, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    positive_ranks = ranks[len(negatives) :].sum()
    n_pos, n_neg = len(positives), len(negatives)
    return float((positive_ranks - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _batches(plugin, images: Sequence[np.ndarray]) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), BATCH):
        yield torch.stack([plugin.prepare(image) for image in images[start : start + BATCH]])


def _score(plugin, images: Sequence[np.ndarray]) -> np.ndarray:
    return score_all(plugin, _batches(plugin, images)).probability


def run_demo(settings: Settings, *, train: int, test: int, seed: int) -> int:
    model = settings.models[settings.default_model]
    device = resolve_device(settings.device)
    plugin_cls = get_plugin(model.plugin)
    plugin_settings = settings.plugin_settings(model.plugin)
    print(f"model {settings.default_model!r}: plugin {model.plugin} on {describe_device(device)}")
    plugin = plugin_cls.create(plugin_settings, device)
    print(f"settings: {plugin.describe()}")

    good_train = samples.make_images(train, seed=seed)
    started = time.perf_counter()
    report = plugin.fit(_batches(plugin, good_train))
    fit_seconds = time.perf_counter() - started
    print(f"fitted on {report.images} good images ({report.embeddings} embeddings) in {fit_seconds:.1f} s "
          f"({report.images / fit_seconds:.1f} images/s)")

    # Calibrate as refit does, on good images held out of the fit, so the verdicts below mean something.
    held_out = samples.make_images(max(20, train // 5), seed=seed + 3)
    held_scores = score_all(plugin, _batches(plugin, held_out))
    calibration = calibrate(plugin, held_scores, model.threshold, DEMO_FALSE_REJECT)
    where = "" if calibration.boundary is None else f" at {calibration.score_name} {calibration.boundary:.3f}"
    print(f"calibrated on {len(held_out)} held-out good images for a {DEMO_FALSE_REJECT:.0%} false-reject rate: "
          f"probability {calibration.threshold}{where}")

    good = _score(plugin, samples.make_images(test, seed=seed + 1))
    rng = np.random.default_rng(seed + 2)
    per_kind = max(1, test // len(samples.DEFECT_KINDS))
    defective = {kind: [samples.defective_part(rng, kind=kind) for _ in range(per_kind)]
                 for kind in samples.DEFECT_KINDS}
    started = time.perf_counter()
    scored = {kind: _score(plugin, images) for kind, images in defective.items()}
    score_seconds = time.perf_counter() - started
    all_defective = np.concatenate(list(scored.values()))
    threshold = model.threshold

    print(f"\n{'images':<16}{'n':>5}{'mean p':>10}{'failed':>9}{'AUROC':>9}")
    print(f"{'good (fresh)':<16}{len(good):>5}{good.mean():>10.3f}{(good >= threshold).mean():>9.0%}{'':>9}")
    for kind, probs in scored.items():
        print(f"{kind:<16}{len(probs):>5}{probs.mean():>10.3f}{(probs >= threshold).mean():>9.0%}"
              f"{auroc(good, probs):>9.3f}")
    print(f"{'all defects':<16}{len(all_defective):>5}{all_defective.mean():>10.3f}"
          f"{(all_defective >= threshold).mean():>9.0%}{auroc(good, all_defective):>9.3f}")
    print(f"\nscoring: {len(all_defective) / score_seconds:.1f} images/s on {device} (batches of {BATCH})")
    return 0
