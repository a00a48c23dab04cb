"""Finding image files in an archive and reading them into H x W x 3 uint8 RGB arrays, with PIL."""

from __future__ import annotations

import io
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from inspector import imageformats
from inspector.errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = imageformats.FILE_SUFFIXES
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})  # scaled by >> 8, not clipped


class UnreadableImage(Exception):
    """A file that cannot be opened or decoded; the message says why."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


@dataclass
class ImageScan:
    """What a walk of an archive found: image files to read, and what it passed over, each with why."""

    paths: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


SYMLINKED_FOLDER = "symlinked_folder: a symlink to a folder, not followed"


def scan_images(root: Path, argument: str = "--data") -> ImageScan:
    """Every image file under `root`, recursively, any case of suffix, sorted; hidden entries skipped.

    Symlinked folders are not followed (counted in `skipped`): one can pull any folder of the machine into
    the archive, and `x -> .` makes the walk endless. Symlinked files are kept (dataset splits are often
    built of them) and judged when read: a loop, a dangling link or a FIFO is skipped then. `root` itself
    may be a symlink: the operator named it. An entry that cannot be examined is skipped, never fatal."""
    if not root.exists():
        raise ConfigError(f"{argument} {root}: no such folder")
    if not root.is_dir():
        raise ConfigError(f"{argument} {root}: not a folder")
    scan = ImageScan()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as exc:
            scan.skipped.append((folder, f"folder_unreadable: cannot be listed ({exc.strerror or exc})"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(path)
                    continue
                if entry.is_symlink() and _is_folder(path):
                    scan.skipped.append((path, SYMLINKED_FOLDER))
                    continue
            except OSError as exc:
                scan.skipped.append((path, f"file_not_found: cannot be examined ({exc.strerror or exc})"))
                continue
            if is_image_file(path):
                scan.paths.append(path)
    scan.paths.sort()
    for path, reason in scan.skipped:
        log.warning("skipping %s: %s", path, reason)
    return scan


def _is_folder(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a symlink loop: not a folder; its reading fails and is counted
        return False


def find_images(root: Path, argument: str = "--data") -> list[Path]:
    """The image files of `scan_images(root)`; what it passed over is logged. Refit, evaluate and publish all
    find images this way; `argument` names the option in the error."""
    return scan_images(root, argument).paths


def read_image(path: Path, max_pixels: int, min_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode `path` fully (a truncated file is an error, not a grey half image) to RGB uint8;
    a JPEG at reduced scale when `min_size` allows (see reduce_while_decoding)."""
    allow_pixels(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # judged here, against max_pixels
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise UnreadableImage(f"{width}x{height} pixels is over the limit of {max_pixels}")
                reduce_while_decoding(image, min_size)
                image.load()
                return to_rgb(image)
    except UnreadableImage:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImage(str(exc) or type(exc).__name__) from exc


def allow_pixels(limit: int) -> None:
    """Let PIL open images up to `limit` pixels: its own guard (a warning over Image.MAX_IMAGE_PIXELS, an
    error over twice that, 89.5 MP by default) would otherwise override a configured limit above it. The
    configured limit is checked from the header before any pixel is decoded; PIL's guard stays, at twice
    the largest configured limit. Only ever raised, under a lock, so concurrent decoders agree."""
    with _PIXELS_LOCK:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and current < limit:
            Image.MAX_IMAGE_PIXELS = limit


_PIXELS_LOCK = threading.Lock()


class PixelBudget:
    """Pixels decoded at once across a pool's threads. A decoded image costs about 7 bytes a pixel at its peak
    (Pillow's image and its RGB copy), so a pool of one thread a core at 100 Mpx each could ask for tens of
    GiB; under a budget, each image holds its pixels (from its header, once known) until it has been
    prepared, and waits while the others hold the rest. An image over the whole budget waits for all of it."""

    def __init__(self, pixels: int) -> None:
        if pixels < 1:
            raise ValueError(f"a pixel budget must be positive, got {pixels}")
        self.capacity = pixels
        self._free = pixels
        self._changed = threading.Condition()

    @property
    def free(self) -> int:
        with self._changed:
            return self._free

    @contextmanager
    def image(self) -> Iterator[None]:
        """One image's decoding and preparation on this thread: what `reserve_pixels` takes in it is given back
        at the end."""
        hold = _Hold(self)
        outer = getattr(_held, "hold", None)
        _held.hold = hold
        try:
            yield
        finally:
            _held.hold = outer
            self._give(hold.pixels)

    def _take(self, pixels: int, wait: bool) -> int:
        pixels = min(pixels, self.capacity)
        with self._changed:
            if wait:
                self._changed.wait_for(lambda: self._free >= pixels)
            self._free -= pixels  # without waiting: below zero, bounded by one image a thread
        return pixels

    def _give(self, pixels: int) -> None:
        if pixels:
            with self._changed:
                self._free += pixels
                self._changed.notify_all()


@dataclass
class _Hold:
    budget: PixelBudget
    pixels: int = 0


_held = threading.local()


def reserve_pixels(pixels: int) -> None:
    """Called by a decoder once it knows an image's size, before decoding it: inside `PixelBudget.image()` on
    this thread, waits until the budget has that many pixels free and holds them; elsewhere (the worker's
    frames) does nothing. A second image in the same hold does not wait (no thread waits holding pixels, so
    no two threads wait on each other)."""
    hold = getattr(_held, "hold", None)
    if hold is not None and pixels > 0:
        hold.pixels += hold.budget._take(pixels, wait=hold.pixels == 0)


def reduce_while_decoding(image: Image.Image, min_size: tuple[int, int] | None) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg scales in the DCT, for a fraction of the
    cost), the smallest that still gives at least `min_size` (width, height): a 1024 x 1024 frame for a
    256-pixel model decodes at 1/4 scale, for less (docs/performance.md, `bench/jpeg_decode_device.py`), and
    needs no further resize. Refit and the worker both decode this way, so a model is served the pixels it was
    fitted on. Other formats: no change."""
    if min_size is not None and image.format == "JPEG":
        image.draft(image.mode, min_size)


def raw_pixels(rgb: np.ndarray, pixel_format: str) -> bytes:
    """H x W x 3 uint8 RGB as the body of an image/x-raw frame in `pixel_format` (a raw format of
    imageformats), as a camera sends it: mono8 is ITU-R 601 luma (PIL's convert("L")). ValueError for others."""
    if imageformats.RAW_CHANNELS.get(pixel_format) is None:
        raise ValueError(f"pixel format {pixel_format!r}: not one of {', '.join(imageformats.RAW_CHANNELS)}")
    if pixel_format == "mono8":
        return Image.fromarray(rgb).convert("L").tobytes()
    if pixel_format == "bgr8":
        return np.ascontiguousarray(rgb[:, :, ::-1]).tobytes()
    return np.ascontiguousarray(rgb).tobytes()


def to_rgb(image: Image.Image) -> np.ndarray:
    """A loaded PIL image as H x W x 3 uint8 RGB, the same way for refit's archive and the worker's frames
    (a model must see served pixels as it saw its training pixels). ValueError for float pixels."""
    if image.mode in SIXTEEN_BIT_MODES:  # 16-bit grey (industrial cameras): PIL's convert would clip at 255
        grey = (np.clip(np.asarray(image), 0, 0xFFFF).astype(np.uint16) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, np.newaxis], 3, axis=2)
    if image.mode == "F":
        raise ValueError("floating-point pixels (mode F); use 8- or 16-bit images")
    return np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy: torch refuses read-only buffers


MAP_LEVELS = 65535  # an anomaly map's 16-bit PNG: round(map x MAP_LEVELS), 0 = normal
# zlib level: less CPU than the default 6 for a few more bytes (smooth maps pack well); `bench/explain_drawing.py`
# measures maps at both levels
MAP_PNG_LEVEL = 1


def map_image(values: np.ndarray) -> Image.Image:
    """An anomaly map (float, height x width, 0 = normal .. 1) as a 16-bit greyscale image (mode I;16):
    round(map x 65535), NaN as 0. The one encoding of a map that the worker's archive and the tools write,
    so other tools read both alike."""
    array = np.asarray(values, dtype=np.float64)  # rounded from the exact value, not a float32 product
    if array.ndim != 2:
        raise ValueError(f"an anomaly map must be 2-d, got shape {array.shape}")
    levels = np.rint(np.clip(np.nan_to_num(array, nan=0.0), 0.0, 1.0) * MAP_LEVELS).astype(np.uint16)
    image = Image.fromarray(levels)
    return image if image.mode == "I;16" else image.convert("I;16")


def map_png(values: np.ndarray) -> bytes:
    """`map_image` encoded as PNG bytes."""
    out = io.BytesIO()
    map_image(values).save(out, format="PNG", compress_level=MAP_PNG_LEVEL)
    return out.getvalue()
