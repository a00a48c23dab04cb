"""Anomaly maps drawn for people and written for other tools: the image with its map laid over it in
colour and the verdict written above it, and the map alone as a 16-bit greyscale PNG.

Pure functions of arrays. Pillow draws; matplotlib lends a colour map and its DejaVu font (no figure
is made, so no backend is involved). A map is on one scale for every image a model scores (0 =
normal, 1 = as anomalous as the plugin's scale goes), so the colour means the same on every overlay;
values at or under MAP_FLOOR (what good parts' maps reach) are left uncoloured, so a good part looks
clean. The colour's opacity ramps up past the floor, so a weak but real finding still shows; its hue
says how strong it is.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from inspector.regions import Region

# Map values at or under MAP_FLOOR are not drawn. Good parts' maps are not 0: on magnetic-tile (DFKDE, the
# shipped settings) their median pixel is 0.013, their 99th percentile 0.078 and their maximum 0.097 at the
# median tile; a floor of 0.01 coloured most of every good tile. At 0.1 the median good tile stays clean and
# only what stands out from good texture is coloured.
MAP_FLOOR = 0.1
MAP_ALPHA = 0.55  # opacity of the colour; it ramps from 0 at MAP_FLOOR to this at ALPHA_FULL
ALPHA_FULL = 0.25
COLOUR_FULL = 0.5  # the colour runs from blue (0) to dark red (COLOUR_FULL and over), on every overlay alike
COLOURMAP = "turbo"
REGION_COLOUR = (255, 0, 255)  # magenta: in no part of the turbo map, so a box stands out wherever it lies
MIN_WIDTH = 384  # narrower images are enlarged for the overlay, so the header stays readable
VERDICT_COLOURS = {"pass": (46, 125, 50), "fail": (198, 40, 40), "error": (97, 97, 97)}


@dataclass(frozen=True)
class Header:
    """What the band above an overlay says: the verdict, why, and which model said it."""

    verdict: str  # pass, fail or error
    probability: float | None
    threshold: float | None
    model: str  # name@version
    source: str = ""  # the image, as the operator knows it
    error: str | None = None  # the error code, for verdict error


def checked_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A plugin's map as float32 height x width in [0, 1]; ValueError naming what is wrong otherwise."""
    array = np.asarray(anomaly_map, dtype=np.float32)
    width, height = size
    if array.shape != (height, width):
        raise ValueError(f"an anomaly map of shape {array.shape} for an image of {width}x{height} "
                         f"(expected {(height, width)})")
    if not np.isfinite(array).all():
        raise ValueError("an anomaly map with values that are not finite numbers")
    if array.size and (array.min() < 0 or array.max() > 1):
        raise ValueError(f"an anomaly map outside [0, 1] ({array.min():g} to {array.max():g})")
    return array


def overlay(image: np.ndarray, anomaly_map: np.ndarray | None, header: Header,
            max_side: int | None = None, regions: Sequence[Region] = ()) -> Image.Image:
    """The image (H x W x 3 uint8) with the map's colour where it is over MAP_FLOOR, under a header band;
    each of `regions` (in the image's pixels) outlined in REGION_COLOUR.

    Images narrower than MIN_WIDTH are enlarged; with `max_side`, every image is scaled so that its longer
    side is that (the report's thumbnails). `anomaly_map`, when given, is H x W in [0, 1]."""
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"an image must be H x W x 3, got shape {pixels.shape}")
    picture = pixels.astype(np.float32)
    if anomaly_map is not None:
        values = checked_map(anomaly_map, (pixels.shape[1], pixels.shape[0]))
        colour = _colours()(np.minimum(values / COLOUR_FULL, 1.0))[..., :3].astype(np.float32) * 255.0
        alpha = MAP_ALPHA * np.clip((values - MAP_FLOOR) / (ALPHA_FULL - MAP_FLOOR), 0.0, 1.0)[..., np.newaxis]
        picture = picture * (1.0 - alpha) + colour * alpha
    composed = Image.fromarray(np.round(picture).astype(np.uint8), "RGB")
    if regions:
        pen = ImageDraw.Draw(composed)
        line = max(1, round(max(composed.size) / 200))
        for region in regions:
            pen.rectangle([region.x, region.y, region.x + region.width - 1, region.y + region.height - 1],
                          outline=REGION_COLOUR, width=line)
    composed = _fitted(composed, max_side)
    return _with_header(composed, header)


def _fitted(image: Image.Image, max_side: int | None) -> Image.Image:
    width, height = image.size
    scale = 1.0
    if max_side is not None:
        scale = max_side / max(width, height)
    elif width < MIN_WIDTH:
        scale = MIN_WIDTH / width
    if scale == 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)


def _with_header(image: Image.Image, header: Header) -> Image.Image:
    width = image.width
    big = _font(max(12, min(28, round(width / 22))), bold=True)
    small = _font(max(10, min(18, round(width / 34))), bold=False)
    pad = max(4, round(big.size / 3))
    band = pad * 3 + big.size + small.size
    canvas = Image.new("RGB", (width, image.height + band), VERDICT_COLOURS.get(header.verdict, (0, 0, 0)))
    canvas.paste(image, (0, band))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), _fit(draw, _headline(header), big, width - 2 * pad), font=big, fill="white")
    second = f"{header.model}  {header.source}".strip()
    draw.text((pad, 2 * pad + big.size), _fit(draw, second, small, width - 2 * pad), font=small, fill="white")
    return canvas


def _headline(header: Header) -> str:
    if header.verdict == "error":
        return f"ERROR {header.error or ''}".strip()
    text = header.verdict.upper()
    if header.probability is not None and math.isfinite(header.probability):
        text += f"  p = {header.probability:.3f}"
    if header.threshold is not None:
        text += f"  (fails at {header.threshold:g})"
    return text


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, room: float) -> str:
    """`text`, cut at the end with an ellipsis until it fits `room` pixels."""
    if draw.textlength(text, font=font) <= room:
        return text
    while text and draw.textlength(text + "…", font=font) > room:
        text = text[:-1]
    return text + "…"


@functools.cache
def _font(size: int, bold: bool) -> ImageFont.FreeTypeFont:
    import matplotlib

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


@functools.cache
def _colours():
    from matplotlib import colormaps

    return colormaps[COLOURMAP]
