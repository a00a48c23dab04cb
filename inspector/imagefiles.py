"""Finding image files in an archive and reading them into H x W x 3 uint8 RGB arrays, with PIL."""

from __future__ import annotations

import io
import logging
import os
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from inspector.errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})  # scaled by >> 8, not clipped


class UnreadableImage(Exception):
    """A file that cannot be opened or decoded; the message says why."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def find_images(root: Path, argument: str = "--data") -> list[Path]:
    """Every image file under `root`, recursively, any case of suffix, sorted; hidden entries skipped. Refit,
    evaluate and publish all find images this way; `argument` names the option in the error."""
    if not root.exists():
        raise ConfigError(f"{argument} {root}: no such folder")
    if not root.is_dir():
        raise ConfigError(f"{argument} {root}: not a folder")
    found: list[Path] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            log.warning("skipping folder %s: %s", folder, exc.strerror or exc)
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=True):
                stack.append(Path(entry.path))
            elif is_image_file(Path(entry.name)):
                found.append(Path(entry.path))
    return sorted(found)


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


def reduce_while_decoding(image: Image.Image, min_size: tuple[int, int] | None) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg scales in the DCT, for a fraction of the
    cost), the smallest that still gives at least `min_size` (width, height): a 1024 x 1024 frame for a
    256-pixel model decodes in a quarter of the time and needs no further resize. Refit and the worker
    both decode this way, so a model is served the pixels it was fitted on. Other formats: no change."""
    if min_size is not None and image.format == "JPEG":
        image.draft(image.mode, min_size)


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
MAP_PNG_LEVEL = 1  # zlib level: half the CPU of the default 6 for a quarter more bytes (smooth maps pack well)


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
