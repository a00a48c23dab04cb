"""`inspector explain`: where the current version of a model sees the anomaly in each image.

For every image under `--data`: OUT/NAME.png, the image with its anomaly map laid over it and the
verdict, probability and model version written above it (for people), and OUT/NAME.map.png, the map
alone as a 16-bit greyscale PNG at the image's own size, 0 = normal (for other tools); and one
OUT/results.jsonl with each image's result in the worker's result shape (inspector/messages.py).

Images are read and scored the worker's way (tools/maps.py); a file that cannot be read or scored gets
an `error` result with the worker's error code, and the run goes on. NAME comes from the file's path
relative to the `--data` argument it was found under, folders joined by `__`, cleaned as an id
(messages.clean_id) and made unique, so no name escapes OUT and two files never share one.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from inspector import imageformats, messages
from inspector.config import Settings
from inspector.devices import describe_device, resolve_device
from inspector.errors import ConfigError, InspectorError, PluginError
from inspector.imagefiles import find_images, is_image_file, map_image
from inspector.plugin import can_explain, decode_size, region_level
from inspector.regions import Region, regions_of
from inspector.timestamps import utc_now
from inspector.tools.evaluate import check_model_and_batch, load_current, read_like_a_capture
from inspector.tools.maps import Answer, answers, full_size
from inspector.tools.overlay import Header, overlay
from inspector.tools.progress import Progress
from inspector.worker.decode import DecodeLimits
from inspector.worker.serving import ServedModel

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
MAP_SUFFIX = ".map.png"
NAME_MAX_BYTES = messages.FRAME_ID_MAX_BYTES  # NAME.map.png stays within a file name's 255 bytes
FILES_LISTED = 3  # a summary names each file written for up to this many images
LINE_ID, CAMERA_ID = "files", "explain"  # the result's source: files on disk, not a camera
# zlib level of the overlays: a photograph encodes several times faster at 1 than at Pillow's default 6, for a
# few more bytes (see docs/tools.md, `bench/explain_drawing.py`); maps are smooth and cheap at the default
OVERLAY_COMPRESSION = 1


@dataclass
class ExplainOptions:
    data: list[Path]
    out: Path
    model: str
    batch_size: int


@dataclass
class ExplainSummary:
    out: Path
    model: dict[str, str]
    device: str
    seconds: float
    verdicts: dict[str, int] = field(default_factory=lambda: {"pass": 0, "fail": 0, "error": 0})
    names: list[str] = field(default_factory=list)  # each image's NAME, in the order scored

    @property
    def images(self) -> int:
        return sum(self.verdicts.values())

    def line(self) -> str:
        m, v = self.model, self.verdicts
        rate = f", {self.images / self.seconds:.1f} images/s" if self.seconds > 0 else ""
        return (f"model {m['name']!r}: {m['plugin']} version {m['version']} on {self.device}\n"
                f"explained {self.images} images into {self.out}: pass {v['pass']}, fail {v['fail']}, "
                f"error {v['error']}; {self.seconds:.1f} s{rate}\n"
                + self._files())

    def _files(self) -> str:
        """What was written: each file by its full path for a few images, else the pattern of their names."""
        if 0 < len(self.names) <= FILES_LISTED:
            return "\n".join(f"  {self.out / name}.png: the image with its map and verdict; "
                             f"{self.out / name}{MAP_SUFFIX}: the map, 16-bit grey" for name in self.names
                             ) + f"\n  {self.out / RESULTS}: the result of each image"
        return (f"  NAME.png: the image with its map and verdict; NAME{MAP_SUFFIX}: the map, 16-bit grey; "
                f"{RESULTS}: one result per image (NAME: the file's path under its --data argument, "
                "folders joined by '__')")


def collect(data: list[Path]) -> list[tuple[Path, str]]:
    """(file, its path relative to the --data argument it came from) for every image, in argument order;
    ConfigError naming an argument that is no image file or folder, or that holds no image."""
    found: list[tuple[Path, str]] = []
    for argument in data:
        if argument.is_file():
            if not is_image_file(argument):
                raise ConfigError(f"--data {argument}: not an image file ({imageformats.suffix_words()})")
            found.append((argument, argument.name))
            continue
        images = find_images(argument)  # ConfigError for no such folder
        if not images:
            raise ConfigError(f"--data {argument}: no image files in it ({imageformats.suffix_words()}, "
                              "found recursively)")
        found += [(path, path.relative_to(argument).as_posix()) for path in images]
    return found


def output_names(relative: list[str]) -> list[str]:
    """One safe, distinct file name stem per relative path: `good/001.png` -> `good__001`. Cleaned as an
    id (no `/`, no leading `.` or `-`, so nothing escapes the output folder), cut to NAME_MAX_BYTES with
    a hash, and `~2`, `~3`... added where two stems would otherwise meet (compared without case, for file
    systems that ignore it)."""
    names: list[str] = []
    taken: set[str] = set()
    for path in relative:
        parts = path.split("/")
        stem = "__".join(parts[:-1] + [os.path.splitext(parts[-1])[0] or parts[-1]])
        name = messages.clean_id(stem, NAME_MAX_BYTES - 4) or "image"
        unique, n = name, 1
        while unique.lower() in taken:
            n += 1
            unique = f"{name}~{n}"
        taken.add(unique.lower())
        names.append(unique)
    return names


def result(answer: Answer, name: str, source: str, served: ServedModel, wrote_map: bool,
           regions: list[Region] | None = None) -> dict:
    """The worker's result body for one file; meta carries its source and the files written for it, and a
    failing file's regions are the worker's `regions` (when its version has a region level)."""
    headers = {"source": source, "overlay": f"{name}.png"}
    if wrote_map:
        headers["map"] = f"{name}{MAP_SUFFIX}"
    capture = messages.parse_capture(f"{LINE_ID}.{CAMERA_ID}", SimpleNamespace(headers=headers, message_id=name),
                                     b"", redelivered=False)
    verdict = answer.verdict(served.threshold)
    return messages.result_body(capture, verdict=verdict, probability=answer.probability, score=answer.score,
                                threshold=served.threshold, model=served.identity(), error=answer.error,
                                inspected_at=utc_now(),
                                regions=None if regions is None else [r.as_json() for r in regions])


def regions(answer: Answer, served: ServedModel, level: float | None) -> list[Region] | None:
    """A failing file's regions, from its map at its own size, as the worker publishes them; None where the
    worker would publish none (a pass, no map, no level)."""
    if level is None or answer.map is None or answer.size is None or answer.verdict(served.threshold) != "fail":
        return None
    return regions_of(answer.map, level, answer.size)


def header(answer: Answer, served: ServedModel, source: str) -> Header:
    return Header(verdict=answer.verdict(served.threshold), probability=answer.probability,
                  threshold=served.threshold, model=f"{served.name}@{served.version}", source=source,
                  error=answer.error[0] if answer.error else None)


def _write(out: Path, name: str, answer: Answer, served: ServedModel, source: str, read_full,
           boxes: list[Region] | None = None) -> None:
    """NAME.map.png and NAME.png; a file that cannot be read again in full (changed since it was scored)
    is named in a warning and gets no pictures, its result stands."""
    if answer.map is not None:
        map_image(answer.map).save(out / f"{name}{MAP_SUFFIX}")
    try:
        pixels = full_size(answer, read_full)
    except (InspectorError, OSError) as exc:
        log.warning("%s: no overlay drawn: the file cannot be read again in full: %s", answer.path, exc)
        return
    overlay(pixels, answer.map, header(answer, served, source), regions=boxes or ()).save(
        out / f"{name}.png", compress_level=OVERLAY_COMPRESSION)


def run_explain(settings: Settings, options: ExplainOptions) -> ExplainSummary:
    """Score and explain every image under the --data paths with the model's current version into --out."""
    check_model_and_batch(settings, options.model, options.batch_size)
    files = collect(options.data)
    device = resolve_device(settings.device)
    served = load_current(settings, options.model, device)
    if not can_explain(served.plugin):
        raise PluginError(f"model {served.name!r} (plugin {served.plugin_name!r}, version {served.version}) draws no "
                          "anomaly maps: its plugin has no `explain` for this version (a plugin without maps, or a "
                          "version fitted before its plugin drew them: refit it); `inspector evaluate` scores "
                          "images without maps")
    if options.out.exists() and not options.out.is_dir():
        raise ConfigError(f"--out {options.out}: not a folder")
    options.out.mkdir(parents=True, exist_ok=True)
    log.info("explain with model %s version %s on %s: %d images into %s", served.name, served.version,
             describe_device(device), len(files), options.out)

    names = output_names([relative for _, relative in files])
    limits = DecodeLimits.from_settings(settings.worker)
    read = functools.partial(read_like_a_capture, limits=limits, min_size=decode_size(served.plugin))
    read_full = functools.partial(read_like_a_capture, limits=limits, min_size=None)
    workers = settings.worker.decode_threads or max(1, os.cpu_count() or 1)
    summary = ExplainSummary(out=options.out, model=served.identity(), device=str(device), seconds=0.0)
    level = region_level(served.plugin)
    started = time.perf_counter()
    with (Progress(len(files), "explain") as progress, ThreadPoolExecutor(workers, thread_name_prefix="draw") as pool,
          open(options.out / RESULTS, "wb") as results):
        drawing: list[Future] = []
        for answer in answers(served, [path for path, _ in files], read, options.batch_size, workers, progress):
            name, source = names[answer.index], files[answer.index][1]
            summary.verdicts[answer.verdict(served.threshold)] += 1
            summary.names.append(name)
            boxes = regions(answer, served, level)
            results.write(messages.encode(result(answer, name, source, served, answer.map is not None, boxes))
                          + b"\n")
            if answer.pixels is not None:
                drawing.append(pool.submit(_write, options.out, name, answer, served, source, read_full, boxes))
            while len(drawing) > 2 * workers:
                drawing.pop(0).result()
        for future in drawing:
            future.result()
    summary.seconds = time.perf_counter() - started
    return summary
