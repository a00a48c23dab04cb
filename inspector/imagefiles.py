"""Reading image files from an archive into H x W x 3 uint8 RGB arrays, with PIL."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


class UnreadableImage(Exception):
    """A file that cannot be opened or decoded; the message says why."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def read_image(path: Path, max_pixels: int) -> np.ndarray:
    """Decode `path` fully (a truncated file is an error, not a grey half image) to RGB uint8."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise UnreadableImage(f"{width}x{height} pixels is over the limit of {max_pixels}")
                image.load()
                rgb = image.convert("RGB")
    except UnreadableImage:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImage(str(exc) or type(exc).__name__) from exc
    return np.array(rgb, dtype=np.uint8)  # a writable copy: torch refuses read-only buffers
