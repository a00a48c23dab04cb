"""The image formats inspector knows, in one table: what a camera may send and the worker decodes, what the
tools read and write, and what the evidence archive names each capture. Every other list of formats (the
worker's content types and Pillow decoders, file suffixes, command-line choices, bench encodings) is derived
from FORMATS, so a format is added here once and cannot be offered in one place and refused in another.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

RAW_CONTENT_TYPE = "image/x-raw"


@dataclass(frozen=True)
class ImageFormat:
    """One way a frame's pixels travel. Encoded formats are files Pillow reads and writes; raw ones are bare
    pixels (image/x-raw) whose `pixel_format` header is the format's name."""

    name: str  # `inspector bench --encoding`; a raw format's pixel_format header
    title: str  # how messages name it
    content_type: str  # what `inspector publish` sends
    suffixes: tuple[str, ...]  # lower case, the one written first (samples, the evidence archive)
    pil_format: str | None = None  # Pillow's encoder and decoder; None: raw pixels
    channels: int = 0  # bytes a pixel of a raw format
    aliases: tuple[str, ...] = ()  # more content types the worker takes for it

    @property
    def raw(self) -> bool:
        return self.pil_format is None

    @property
    def suffix(self) -> str:
        """The suffix files of this format are written with."""
        return self.suffixes[0]


# Every format here is decoded by the worker. The encoded ones in this order are the order Pillow tries its
# decoders in, so a file that could be read as two formats is read the same way everywhere.
FORMATS: tuple[ImageFormat, ...] = (
    ImageFormat("jpeg", "JPEG", "image/jpeg", (".jpg", ".jpeg"), "JPEG", aliases=("image/jpg",)),
    ImageFormat("png", "PNG", "image/png", (".png",), "PNG"),
    ImageFormat("bmp", "BMP", "image/bmp", (".bmp",), "BMP"),
    ImageFormat("tiff", "TIFF", "image/tiff", (".tiff", ".tif"), "TIFF"),
    ImageFormat("webp", "WebP", "image/webp", (".webp",), "WEBP"),
    ImageFormat("mono8", "raw mono8", RAW_CONTENT_TYPE, (".raw",), channels=1),
    ImageFormat("rgb8", "raw rgb8", RAW_CONTENT_TYPE, (".raw",), channels=3),
    ImageFormat("bgr8", "raw bgr8", RAW_CONTENT_TYPE, (".raw",), channels=3),
)

BY_NAME = {f.name: f for f in FORMATS}
ENCODED = tuple(f for f in FORMATS if not f.raw)
RAW = tuple(f for f in FORMATS if f.raw)

PIL_FORMATS = tuple(f.pil_format for f in ENCODED if f.pil_format)  # no other Pillow decoder is reachable
ENCODED_CONTENT_TYPES = frozenset(t for f in ENCODED for t in (f.content_type, *f.aliases))
RAW_CHANNELS = {f.name: f.channels for f in RAW}  # pixel_format -> channels
FILE_SUFFIXES = frozenset(s for f in ENCODED for s in f.suffixes)  # image files found in an archive
CONTENT_TYPE_OF_SUFFIX = {s: f.content_type for f in ENCODED for s in f.suffixes}
# `inspector samples --format`: each encoded format by the suffix it is written with
SAMPLE_FORMATS = tuple(f.suffix.lstrip(".") for f in ENCODED)
# A capture's content type -> the suffix (no dot) the evidence archive keeps its bytes under
ARCHIVE_SUFFIXES = {t: f.suffix.lstrip(".") for f in FORMATS for t in (f.content_type, *f.aliases)}


def encoded_by_suffix(suffix: str) -> ImageFormat | None:
    """The encoded format of a file suffix (`.JPG`, `jpg`), or None."""
    wanted = "." + suffix.lower().lstrip(".")
    return next((f for f in ENCODED if wanted in f.suffixes), None)


def titles(formats: Iterable[ImageFormat] = ENCODED) -> str:
    """`JPEG, PNG, BMP, TIFF or WebP`: the formats as a message names them."""
    names = [f.title for f in formats]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def suffix_words(formats: Iterable[ImageFormat] = ENCODED) -> str:
    """`jpg, jpeg, png, ...`: every suffix of the formats, without dots, as messages list them."""
    return ", ".join(s.lstrip(".") for f in formats for s in f.suffixes)
