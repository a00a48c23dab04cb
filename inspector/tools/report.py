"""`inspector evaluate --report FILE.html`: one self-contained page for people.

The figures of the evaluation (the same numbers `--json` prints), the ROC curve, the score histograms of
good and defective parts with the threshold and the calibration's target, the confusion matrix, recall
per defect kind, and three galleries: the false rejects, the missed defects and the closest calls,
each image drawn as `inspector explain` draws it (with its anomaly map when the model draws maps, and the
map's regions outlined when the version has a calibrated region level: on every image shown, passing or
failing, so a missed defect's box shows too; each caption counts them).

Every image is embedded as a data: URI and the page has no executable script and no link, so it opens from a
mail attachment or an air-gapped share as it does here. The ROC points are embedded as JSON data
(`<script type="application/json" id="roc-data">`, never run) for tools and the tests.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inspector.plugin import can_explain, region_level
from inspector.regions import Region, regions_of
from inspector.timestamps import utc_now
from inspector.tools.maps import answers, full_size
from inspector.tools.overlay import MAP_FLOOR, Header, overlay
from inspector.tools.progress import Progress
from inspector.worker.serving import ServedModel

log = logging.getLogger(__name__)

GALLERY_MAX = 12  # images per gallery
THUMBNAIL_SIDE = 256


@dataclass(frozen=True)
class Thumbnail:
    """One gallery image as drawn: its PNG, and its map's regions (None when its version has no level)."""

    png: bytes
    regions: list[Region] | None = None


@dataclass(frozen=True)
class ScoredImage:
    """One image of the test set as evaluate scored it: NaN probability when it was left out."""

    path: Path
    relative: str
    kind: str  # good, or the defect kind
    probability: float

    @property
    def good(self) -> bool:
        return self.kind == "good"


@dataclass(frozen=True)
class Gallery:
    key: str
    title: str
    note: str
    images: list[ScoredImage]


def galleries(images: list[ScoredImage], threshold: float, size: int = GALLERY_MAX) -> list[Gallery]:
    """False rejects (good parts failed, highest first), missed defects (defective parts passed, lowest
    first) and the closest calls (the other scored images nearest the threshold on either side)."""
    scored = [image for image in images if not math.isnan(image.probability)]
    false_rejects = sorted((i for i in scored if i.good and i.probability >= threshold),
                           key=lambda i: -i.probability)
    missed = sorted((i for i in scored if not i.good and i.probability < threshold), key=lambda i: i.probability)
    shown = {id(i) for i in false_rejects[:size] + missed[:size]}
    closest = sorted((i for i in scored if id(i) not in shown), key=lambda i: abs(i.probability - threshold))
    return [
        Gallery("false-rejects", "False rejects", f"good parts that failed: {len(false_rejects)}",
                false_rejects[:size]),
        Gallery("missed-defects", "Missed defects", f"defective parts that passed: {len(missed)}", missed[:size]),
        Gallery("closest-calls", "Closest calls", "the other images nearest the threshold, either side",
                closest[:size]),
    ]


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png_of(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _percent(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1%}"


def _figure_row(key: str, label: str, value: Any, shown: str) -> str:
    data = "" if value is None else f' data-value="{html.escape(repr(float(value)))}"'
    return f'<tr><th>{html.escape(label)}</th><td data-figure="{key}"{data}>{html.escape(shown)}</td></tr>'


def calibration_target(calibration: dict | None, good: np.ndarray) -> tuple[float, float] | None:
    """(target false-reject rate, the probability at which that share of these good parts scores at or
    over), or None when the version was not calibrated for a rate or there are no good scores."""
    rate = (calibration or {}).get("target_false_reject")
    if not isinstance(rate, (int, float)) or not 0 < rate < 1 or len(good) == 0:
        return None
    return float(rate), float(np.quantile(good, 1.0 - rate))


def render(summary: dict, images: list[ScoredImage], calibration: dict | None,
           thumbnails: dict[int, Thumbnail], maps_note: str, regions_note: str = "") -> str:
    """The page's HTML from the evaluation's figures (as `evaluate --json` gives them), every image's
    score and the thumbnails drawn for the galleries (by id of the ScoredImage)."""
    from inspector.tools import report_figures as plots  # matplotlib: imported only when a page is made

    threshold = float(summary["threshold"])
    scored = [i for i in images if not math.isnan(i.probability)]
    labels = np.array([not i.good for i in scored])
    scores = np.array([i.probability for i in scored])
    good, defective = scores[~labels], scores[labels]
    fpr, tpr, cuts = plots.roc_points(labels, scores)
    c = summary["confusion"]
    at = summary["at_threshold"]
    operating = (c["good_failed"] / max(c["good_passed"] + c["good_failed"], 1),
                 c["defective_failed"] / max(c["defective_passed"] + c["defective_failed"], 1))
    target = calibration_target(calibration, good)
    model = summary["model"]
    counts = summary["images"]
    title = f"inspector evaluate: {model['name']} {model['version']}"
    roc_data = json.dumps({"fpr": fpr.tolist(), "tpr": tpr.tolist(),
                           "thresholds": [None if math.isinf(t) else t for t in cuts.tolist()]})
    roc_data = roc_data.replace("</", "<\\/")  # JSON in a script element: nothing may close it
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        (f'<p class="meta">model <b>{html.escape(model["name"])}</b> ({html.escape(model["plugin"])}, version '
         f'{html.escape(model["version"])}) on {html.escape(summary["device"])}; data '
         f'{html.escape(summary["data"])}: {counts["scored"]} images scored ({counts["good"]} good, '
         f'{counts["defective"]} defective in {len(summary["kinds"])} kinds), '
         f'{counts["unreadable"] + counts["unscored"]} left out; {summary["seconds"]:.1f} s; '
         f"written {html.escape(utc_now())}</p>"),
        '<section id="figures"><h2>Figures</h2><table class="figures">',
        _figure_row("auroc", "image AUROC", summary["auroc"], _number(summary["auroc"])),
        _figure_row("average_precision", "average precision", summary["average_precision"],
                    _number(summary["average_precision"])),
        _figure_row("threshold", "threshold (a part fails at or over it)", threshold, f"{threshold:g}"),
        _figure_row("precision", "precision at the threshold", at["precision"], _number(at["precision"])),
        _figure_row("recall", "recall at the threshold", at["recall"], _number(at["recall"])),
        _figure_row("f1", "F1 at the threshold", at["f1"], _number(at["f1"])),
        _figure_row("false_reject_rate", "false-reject rate", at["false_reject_rate"],
                    f"{_percent(at['false_reject_rate'])} ({c['good_failed']} of {counts['good']} good)"),
        _figure_row("calibration_target", "calibrated for a false-reject rate of",
                    target[0] if target else None, _percent(target[0]) if target else "n/a (not calibrated)"),
        "</table></section>",
        '<section id="roc"><h2>ROC curve</h2>',
        f'<img alt="ROC curve" src="{_data_uri(plots.roc_png(fpr, tpr, summary["auroc"], operating, threshold))}">',
        f'<script type="application/json" id="roc-data">{roc_data}</script></section>',
        '<section id="histogram"><h2>Scores</h2>',
        f'<img alt="score histograms" src="{_data_uri(plots.histogram_png(good, defective, threshold, target))}">',
        "</section>",
        '<section id="confusion"><h2>Confusion at the threshold</h2><div class="row">',
        f'<img alt="confusion matrix" src="{_data_uri(plots.confusion_png(**c))}">',
        '<table class="confusion"><tr><th></th><th>passed</th><th>failed</th></tr>',
        (f'<tr><th>good</th><td data-cell="good_passed">{c["good_passed"]}</td>'
         f'<td data-cell="good_failed">{c["good_failed"]}</td></tr>'),
        (f'<tr><th>defective</th><td data-cell="defective_passed">{c["defective_passed"]}</td>'
         f'<td data-cell="defective_failed">{c["defective_failed"]}</td></tr></table></div></section>'),
        '<section id="kinds"><h2>Recall per defect kind</h2><div class="row">',
        f'<img alt="recall per defect kind" src="{_data_uri(plots.kinds_png(summary["kinds"]))}">',
        '<table class="kinds"><tr><th>defect kind</th><th>images</th><th>recall</th><th>AUROC</th></tr>',
        *(f'<tr data-kind="{html.escape(kind)}"><th>{html.escape(kind)}</th><td>{k["images"]}</td>'
          f'<td data-value="{k["recall"]}">{_percent(k["recall"])}</td><td>{_number(k["auroc"])}</td></tr>'
          for kind, k in summary["kinds"].items()),
        "</table></div></section>",
        f'<p class="note">{html.escape(maps_note)}</p>',
        f'<p class="note" id="regions-note">{html.escape(regions_note)}</p>' if regions_note else "",
    ]
    for gallery in galleries(images, threshold):
        parts.append(f'<section id="{gallery.key}" class="gallery"><h2>{html.escape(gallery.title)}</h2>'
                     f'<p class="note">{html.escape(gallery.note)}</p>')
        if not gallery.images:
            parts.append('<p class="none">none</p>')
        for image in gallery.images:
            thumbnail = thumbnails.get(id(image))
            caption = f"{image.relative} ({image.kind}): p = {image.probability:.3f}"
            picture = (f'<img alt="{html.escape(image.relative)}" src="{_data_uri(thumbnail.png)}">' if thumbnail
                       else '<div class="missing">not readable now</div>')
            boxes = ""
            if thumbnail is not None and thumbnail.regions is not None:
                count = len(thumbnail.regions)
                caption += f"; {count} region{'' if count == 1 else 's'}"
                boxes = f' data-regions="{html.escape(json.dumps([r.as_json() for r in thumbnail.regions]))}"'
            parts.append(f"<figure{boxes}>{picture}<figcaption>{html.escape(caption)}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def draw_thumbnails(served: ServedModel, images: list[ScoredImage], read: Callable[[Path], np.ndarray],
                    read_full: Callable[[Path], np.ndarray], batch_size: int, workers: int,
                    level: float | None = None) -> dict[int, Thumbnail]:
    """Each gallery image drawn as `inspector explain` draws it, small, keyed by id of its ScoredImage; with a
    region `level`, each image's map regions (at its own size, as explain finds them) outlined on it."""
    threshold = served.threshold
    shown = [image for gallery in galleries(images, threshold) for image in gallery.images]
    thumbnails: dict[int, Thumbnail] = {}
    with Progress(len(shown), "report") as progress:
        for answer in answers(served, [image.path for image in shown], read, batch_size, workers, progress):
            image = shown[answer.index]
            if answer.pixels is None:
                continue
            header = Header(verdict=answer.verdict(threshold), probability=answer.probability, threshold=threshold,
                            model=f"{served.name}@{served.version}", source=image.relative,
                            error=answer.error[0] if answer.error else None)
            found = None
            if level is not None and answer.map is not None and answer.size is not None:
                found = regions_of(answer.map, level, answer.size)
            picture = overlay(full_size(answer, read_full), answer.map, header, max_side=THUMBNAIL_SIDE,
                              regions=found or ())
            thumbnails[id(image)] = Thumbnail(_png_of(picture), found)
    return thumbnails


def write_report(path: Path, summary: dict, images: list[ScoredImage], served: ServedModel,
                 calibration: dict | None, read: Callable[[Path], np.ndarray],
                 read_full: Callable[[Path], np.ndarray], batch_size: int, workers: int) -> None:
    """Draw the gallery images and write the page to `path` (its folder created)."""
    if can_explain(served.plugin):
        note = (f"Images are drawn with their anomaly maps (colour where the map is over "
                f"{MAP_FLOOR:g}; 0 = normal), as `inspector explain` draws them.")
    else:
        note = (f"Model {served.name} (plugin {served.plugin_name}, version {served.version}) draws no anomaly maps: "
                "its plugin has no `explain` for this version, so the galleries show the images without maps.")
    level = region_level(served.plugin)
    thumbnails = draw_thumbnails(served, images, read, read_full, batch_size, workers, level)
    page = render(summary, images, calibration, thumbnails, note, regions_note(served, level))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(page, encoding="utf-8")
    partial.replace(path)


def regions_note(served: ServedModel, level: float | None) -> str:
    """The page's one line on region boxes: what they are, or why there are none."""
    if level is not None:
        return (f"Magenta boxes: the regions of each image's map at or over version {served.version}'s region "
                f"level {level:g} (where the worker with models.{served.name}.regions on says the defect is), drawn "
                "on every image shown, passing or failing; each caption counts them.")
    if not can_explain(served.plugin):
        return "No region boxes: this version draws no anomaly maps, and regions are found on a map."
    return (f"No region boxes: version {served.version} has no calibrated region level (a version refitted with "
            "localisation maps and enough good images to calibrate one has).")


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1200px;color:#222;
padding:0 16px}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
.meta,.note{color:#555}table{border-collapse:collapse;margin:8px 0}th,td{padding:4px 10px;text-align:left;
border-bottom:1px solid #eee}td{font-variant-numeric:tabular-nums}.row{display:flex;gap:24px;align-items:center;
flex-wrap:wrap}img{max-width:100%}.gallery{display:flex;flex-wrap:wrap;gap:12px}.gallery h2,.gallery>p{width:100%}
figure{margin:0;width:260px}figure img{display:block;border:1px solid #ccc}figcaption{font-size:.8em;
color:#444;word-break:break-all}.missing{width:256px;height:120px;background:#eee;display:flex;
align-items:center;justify-content:center;color:#777}
"""
