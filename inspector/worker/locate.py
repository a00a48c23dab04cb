"""A frame's regions for its result: its anomaly map, drawn now, thresholded at its model's level.

The verdict of a failing frame waits for this (one map at a small grid, inspector/regions.py); a passing
frame's only with `models.NAME.regions = "all"`. Boxes are in the image's own pixels: a JPEG decoded at
reduced scale (the plugin's decode_size) is measured from its header. A map that cannot be drawn costs the
result its regions, never the result.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from inspector.regions import find_regions

log = logging.getLogger(__name__)

JPEG_START = b"\xff\xd8"


def own_size(body: bytes, decoded: tuple[int, int]) -> tuple[int, int]:
    """The image's own (width, height): a JPEG's from its header (it may have been decoded at 1/2, 1/4 or 1/8
    scale), any other capture's as decoded."""
    if not body.startswith(JPEG_START):
        return decoded
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(body), formats=["JPEG"]) as image:
                width, height = image.size
    except Exception:  # noqa: BLE001 - it decoded once already; the decoded size is then the best known
        return decoded
    # draft() scales by 1/2, 1/4 or 1/8, rounding up: anything else is not this frame's header
    if any(-(-width // s) == decoded[0] and -(-height // s) == decoded[1] for s in (1, 2, 4, 8)):
        return width, height
    return decoded


def frame_regions(draw: Callable[[tuple[int, int]], np.ndarray], level: float, body: bytes,
                  decoded: tuple[int, int], frame_id: str) -> list[dict[str, Any]] | None:
    """The result's `regions` (largest first); None when the map could not be drawn (logged)."""
    try:
        return [region.as_json() for region in find_regions(draw, own_size(body, decoded), level)]
    except Exception as exc:  # noqa: BLE001 - a plugin's map failure must not cost the frame its result
        log.warning("frame %s: its regions could not be drawn (%r); published without them", frame_id, exc,
                    extra={"frame_id": frame_id})
        return None
