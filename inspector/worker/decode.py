"""One capture (body, content type, AMQP headers) to an H x W x 3 uint8 RGB array.

Everything here comes from the network, so nothing is trusted: sizes are checked
before anything is allocated, PIL may only use the decoders of imageformats' encoded
formats, an image_uri must resolve inside worker.allowed_roots, and every failure
is a FrameError with a stable code, never another exception: a bad frame gets an
error result, it must not crash the worker.
"""

from __future__ import annotations

import base64
import errno
import io
import json
import os
import reprlib
import stat
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes, urlsplit

import numpy as np
from PIL import Image, UnidentifiedImageError

from inspector import imageformats
from inspector.errors import FrameError
from inspector.imagefiles import allow_pixels, reduce_while_decoding, reserve_pixels, to_rgb

if TYPE_CHECKING:
    from inspector.config import WorkerSettings

ENCODED_TYPES = imageformats.ENCODED_CONTENT_TYPES
SNIFFED_TYPES = frozenset({"", "application/octet-stream"})  # decoded by what the bytes are
SUPPORTED_TYPES = (
    f"{', '.join(f.content_type for f in imageformats.ENCODED)}, {imageformats.RAW_CONTENT_TYPE}, application/json "
    "(none or application/octet-stream: an encoded image, sniffed)"
)
PIL_FORMATS = imageformats.PIL_FORMATS  # no other PIL decoder is reachable
RAW_CHANNELS = imageformats.RAW_CHANNELS
RAW_HEADERS = ("width", "height", "pixel_format")
RAW_USAGE = (f"{imageformats.RAW_CONTENT_TYPE} needs integer headers width, height and pixel_format "
             f"({', '.join(RAW_CHANNELS)})")

# application/json is counted before it is parsed: parsed JSON can take many times its size (`[[],[],...]` is a
# list object for every 3 bytes), nesting exhausts the stack, and one wide character makes Python hold the whole
# text at 4 bytes a character.
JSON_MAX_STRUCTURE = 64  # bytes '{', '[' and ',' in the body, strings included: bounds values and nesting
JSON_TEXT_MAX_BYTES = 64 * 1024  # a longer body (only image_b64 is) must be ASCII without \u escapes
URI_PATH_MAX_BYTES = 4096  # Linux PATH_MAX: no longer path names a file, and resolving one is quadratic
TIFF_TILE_MAX_PIXELS = 1024 * 1024  # a tile larger than its image is refused past this size
_TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH = 322, 323

_shown = reprlib.Repr()  # values from the capture, quoted in messages at a bounded length
_shown.maxstring = _shown.maxother = 200


@dataclass(frozen=True)
class DecodeLimits:
    """What one capture may cost: bytes, pixels, and the folders an image_uri may point into."""

    max_image_bytes: int
    max_image_pixels: int
    allowed_roots: tuple[Path, ...] = ()  # resolved (realpath) once by from_settings
    max_jpeg_scans: int = 100
    pixels_setting: str = "worker.max_image_pixels"  # named in refusals: refit reads under refit.max_image_pixels

    @classmethod
    def from_settings(cls, worker: WorkerSettings) -> DecodeLimits:
        roots = tuple(Path(os.path.realpath(root)) for root in worker.allowed_roots)
        return cls(worker.max_image_bytes, worker.max_image_pixels, roots, worker.max_jpeg_scans)


# How a frame's pixels were decoded: a JPEG (at reduced scale where the model allows), or in full (every other
# format, raw pixels). The two give different pixels for the same scene (DCT scaling and JPEG's losses against
# a full decode and resize), so a model fitted on one kind scores the other differently (docs/refit.md).
JPEG_DECODE, FULL_DECODE = "jpeg", "full"
DECODE_KINDS = (JPEG_DECODE, FULL_DECODE)


def decode_capture(
    body: bytes,
    content_type: str | None,
    headers: Mapping[str, Any] | None,
    limits: DecodeLimits,
    min_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """The capture's pixels as a C-contiguous, writable H x W x 3 uint8 RGB copy, or a FrameError.

    `min_size` (width, height): what the model needs at least; a JPEG may then decode at reduced scale.
    """
    return decode_capture_kind(body, content_type, headers, limits, min_size)[0]


def decode_capture_kind(
    body: bytes,
    content_type: str | None,
    headers: Mapping[str, Any] | None,
    limits: DecodeLimits,
    min_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, str]:
    """decode_capture's pixels, and how they were decoded (one of DECODE_KINDS)."""
    if not body:
        raise FrameError("empty_body", "the capture's body is empty")
    if len(body) > limits.max_image_bytes:
        raise too_large("the body", len(body), limits)
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind in ENCODED_TYPES or kind in SNIFFED_TYPES:
        return _decode_image(body, "the body", limits, min_size)
    if kind == imageformats.RAW_CONTENT_TYPE:
        return _decode_raw(body, headers or {}, limits), FULL_DECODE
    if kind == "application/json":
        return _decode_json(body, limits, min_size)
    message = f"content type {content_type!r} is not decoded; send {SUPPORTED_TYPES}"
    raise FrameError("unsupported_content_type", message)


def too_large(what: str, size: int, limits: DecodeLimits) -> FrameError:
    """The refusal of `size` bytes over max_image_bytes (public, as the checks below: every decoder of
    untrusted bytes, the batched JPEG one included, refuses the same way)."""
    return FrameError(
        "image_too_large", f"{what} is {size} bytes, over worker.max_image_bytes ({limits.max_image_bytes})"
    )


def check_pixels(what: str, width: int, height: int, limits: DecodeLimits) -> None:
    """Refuse a size from a header over max_image_pixels, before anything is decoded."""
    if width * height > limits.max_image_pixels:
        raise FrameError(
            "image_too_many_pixels",
            f"{what} is {width}x{height} = {width * height} pixels, "
            f"over {limits.pixels_setting} ({limits.max_image_pixels}); refused unread",
        )


def check_jpeg_scans(data: bytes, what: str, limits: DecodeLimits) -> None:
    """libjpeg decodes every scan of a progressive JPEG over the whole coefficient array, however few bytes the
    scan holds: scans of end-of-band runs are about 45 bytes each, so a small body costs a large image seconds and
    a body of worker.max_image_bytes minutes (`bench/hostile_inputs.py --only decode` measures it, docs/running.md
    shows its table). Every scan starts with the marker FF DA and entropy-coded
    data cannot hold those two bytes (a coded FF is followed by 00), so their count in the body bounds the scans
    any decoder reads, counted at memchr speed. libjpeg writes about 10."""
    if not data.startswith(b"\xff\xd8"):
        return
    scans = data.count(b"\xff\xda")
    if scans > limits.max_jpeg_scans:
        raise FrameError(
            "image_too_complex",
            f"{what} is a JPEG of {scans} scans, each decoded over the whole image; over worker.max_jpeg_scans "
            f"({limits.max_jpeg_scans}), refused unread",
        )


# -- encoded images --------------------------------------------------------------------


def _decode_image(data: bytes, what: str, limits: DecodeLimits, min_size: tuple[int, int] | None = None
                  ) -> tuple[np.ndarray, str]:
    """Decode the bytes of any encoded format (whatever the content type said) fully, first frame only; with
    how (a JPEG or MPO decodes as JPEG: at reduced scale where min_size allows)."""
    allow_pixels(limits.max_image_pixels)  # PIL's own guard must not refuse what worker.max_image_pixels allows
    check_jpeg_scans(data, what, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's notes on corrupt metadata, its bomb warning: judged here
            with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as image:
                width, height = image.size
                check_pixels(what, width, height, limits)  # from the header, before anything is decoded
                if width < 1 or height < 1:
                    raise FrameError("image_undecodable", f"{what} is an image of {width}x{height}: no pixels")
                if image.format == "TIFF":
                    _check_tiff_tiles(image, what, width, height)
                reduce_while_decoding(image, min_size)
                reserve_pixels(image.size[0] * image.size[1])  # under a PixelBudget (refit, evaluate): waits
                image.load()  # truncated data raises here (ImageFile.LOAD_TRUNCATED_IMAGES is False)
                return _to_rgb(image, what), JPEG_DECODE if image.format in ("JPEG", "MPO") else FULL_DECODE
    except FrameError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise FrameError(
            "image_too_many_pixels",
            f"{what}: {exc} (PIL's Image.MAX_IMAGE_PIXELS; {limits.pixels_setting} is {limits.max_image_pixels})",
        ) from exc
    except UnidentifiedImageError as exc:
        raise FrameError("image_undecodable", f"{what} is not a {imageformats.titles()} image") from exc
    except Exception as exc:  # hostile bytes make PIL raise nearly anything: OSError, SyntaxError,
        # EOFError, struct.error, zlib.error, MemoryError, IndexError, ...; none may crash the worker.
        raise FrameError("image_undecodable", f"{what} does not decode: {type(exc).__name__}: {exc}") from exc


def read_file(path: Path, limits: DecodeLimits, min_size: tuple[int, int] | None = None) -> np.ndarray:
    """An archive file's pixels, decoded as the worker decodes a capture of the same bytes (formats, bytes,
    pixels, TIFF tiles, JPEG scans, JPEG scale): how refit, evaluate and explain read images, so a model is
    fitted and judged on what the worker would serve it. Opened without blocking (a FIFO named .png must not
    hang a decode thread), regular files only, at most max_image_bytes read. Every failure is a FrameError."""
    return read_file_kind(path, limits, min_size)[0]


def read_file_kind(path: Path, limits: DecodeLimits, min_size: tuple[int, int] | None = None
                   ) -> tuple[np.ndarray, str]:
    """read_file's pixels, and how they were decoded (one of DECODE_KINDS)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:  # ELOOP (x -> x), a dangling link, no permission
        raise FrameError("file_not_found", f"the file cannot be opened ({exc.strerror or exc})") from exc
    data = _read_open_file(fd, "the file", limits)
    if not data:
        raise FrameError("empty_body", "the file is empty")
    return _decode_image(data, "the file", limits, min_size)


def _read_open_file(fd: int, what: str, limits: DecodeLimits) -> bytes:
    """The bytes of an opened file, which must be a regular one of at most max_image_bytes (sized once
    open, and again after reading, in case it grew); closes `fd`. Every failure is a FrameError."""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FrameError("file_not_found", f"{what} is not a regular file (a FIFO, a device or a folder)")
        if info.st_size > limits.max_image_bytes:
            raise too_large(what, info.st_size, limits)
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(limits.max_image_bytes + 1)
    except OSError as exc:
        raise FrameError("file_not_found", f"{what} could not be read ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
    if len(data) > limits.max_image_bytes:  # it grew after fstat
        raise too_large(what, len(data), limits)
    return data


def _check_tiff_tiles(image: Image.Image, what: str, width: int, height: int) -> None:
    """libtiff allocates and fills a whole tile to read any part of it, however small the image: a 16x16
    TIFF may declare one 16384x16384 tile (256 MiB). A tile may cover the image's own area, or
    TIFF_TILE_MAX_PIXELS when the image is smaller (writers use fixed 256 or 512 tiles). Strips need no
    check: libtiff holds them to the image's height (RowsPerStrip 2**32-1, one strip, is the default).
    image_undecodable, not image_too_many_pixels: the file contradicts itself, no limit would let it through."""
    tags = getattr(image, "tag_v2", {})
    if _TIFF_TILE_WIDTH not in tags and _TIFF_TILE_LENGTH not in tags:
        return
    tile = tags.get(_TIFF_TILE_WIDTH), tags.get(_TIFF_TILE_LENGTH)
    if not all(isinstance(side, int) and side > 0 for side in tile):
        raise FrameError("image_undecodable", f"{what} is a TIFF with tile size {_shown.repr(tile)}")
    tile_width, tile_length = tile
    if tile_width * tile_length > max(width * height, TIFF_TILE_MAX_PIXELS):
        raise FrameError(
            "image_undecodable",
            f"{what} is a {width}x{height} TIFF in {tile_width}x{tile_length} tiles: a tile may cover at most "
            f"the image or {TIFF_TILE_MAX_PIXELS} pixels; refused unread",
        )


def _to_rgb(image: Image.Image, what: str) -> np.ndarray:
    try:
        return to_rgb(image)
    except ValueError as exc:
        raise FrameError("image_undecodable", f"{what} has {exc}") from exc


# -- raw pixels ------------------------------------------------------------------------


def _decode_raw(body: bytes, headers: Mapping[str, Any], limits: DecodeLimits) -> np.ndarray:
    missing = [name for name in RAW_HEADERS if headers.get(name) is None]
    if missing:
        raise FrameError("raw_headers_missing", f"{RAW_USAGE}; missing: {', '.join(missing)}")
    width, height = _positive_int(headers, "width"), _positive_int(headers, "height")
    pixel_format = (_text(headers["pixel_format"]) or "").strip().lower()  # also GenICam's Mono8, RGB8, BGR8
    if pixel_format not in RAW_CHANNELS:
        raise FrameError("raw_headers_invalid", f"{RAW_USAGE}; pixel_format is {_shown.repr(headers['pixel_format'])}")
    check_pixels("the image/x-raw frame", width, height, limits)  # before anything is allocated
    channels = RAW_CHANNELS[pixel_format]
    expected = width * height * channels
    if len(body) != expected:
        raise FrameError(
            "raw_size_mismatch",
            f"image/x-raw {width}x{height} {pixel_format} needs {expected} bytes, the body has {len(body)}",
        )
    pixels = np.frombuffer(body, dtype=np.uint8).reshape(height, width, channels)
    if pixel_format == "mono8":
        pixels = np.repeat(pixels, 3, axis=2)
    elif pixel_format == "bgr8":
        pixels = pixels[:, :, ::-1]
    return np.array(pixels, dtype=np.uint8, order="C")  # its own writable copy, not a view of the body


def _text(value: Any) -> str | None:
    """A header value as text: pika gives bytes for some AMQP strings."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None
    return None


def _positive_int(headers: Mapping[str, Any], name: str) -> int:
    value = headers[name]
    text = (_text(value) or "").strip()
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif text.isascii() and text.isdigit() and len(text) <= 18:
        number = int(text)
    else:
        number = 0
    if number <= 0:
        raise FrameError("raw_headers_invalid", f"{RAW_USAGE}; {name} is {_shown.repr(value)}, not a positive integer")
    return number


# -- application/json references -------------------------------------------------------


def _decode_json(body: bytes, limits: DecodeLimits, min_size: tuple[int, int] | None) -> tuple[np.ndarray, str]:
    usage = 'application/json needs an object with exactly one of "image_uri" or "image_b64", a string'
    if _count_up_to(body, b"{[,", JSON_MAX_STRUCTURE + 1) > JSON_MAX_STRUCTURE:
        raise FrameError("json_malformed", f"{usage}; the body has more than {JSON_MAX_STRUCTURE} of "
                                           "'{', '[', ',': refused unparsed")
    if len(body) > JSON_TEXT_MAX_BYTES and (not body.isascii() or (b"\\" in body and b"\\u" in body)):
        raise FrameError("json_malformed", f"{usage}; a body over {JSON_TEXT_MAX_BYTES} bytes (image_b64) must be "
                                           "ASCII without \\u escapes: refused unparsed")
    try:
        document = json.loads(str(body, "utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FrameError("json_malformed", f"{usage}; the body is not UTF-8 JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise FrameError("json_malformed", f"{usage}; the body is a JSON {type(document).__name__}")
    given = [key for key in ("image_uri", "image_b64") if key in document]
    if len(given) != 1:
        raise FrameError("json_malformed", f"{usage}; it has {' and '.join(given) or 'neither'}")
    key, value = given[0], document[given[0]]
    if not isinstance(value, str):
        raise FrameError("json_malformed", f"{usage}; {key} is a JSON {type(value).__name__}")
    if key == "image_b64":
        return _decode_image(_from_base64(value), "image_b64", limits, min_size)
    return _decode_image(_read_uri(value, limits), f"image_uri {_shown.repr(value)}", limits, min_size)


def _count_up_to(data: bytes, chars: bytes, limit: int) -> int:
    """How many of the bytes `chars` are in `data`, counting no further than `limit` (memchr: fast)."""
    count = 0
    for char in chars:
        at = data.find(char)
        while at >= 0 and count < limit:
            count += 1
            at = data.find(char, at + 1)
    return count


def _from_base64(text: str) -> bytes:
    # No size check of its own: the body is at most max_image_bytes, the image 3/4 of that.
    try:
        data = base64.b64decode(text.strip(), validate=True)
    except ValueError as exc:  # binascii.Error, or non-ASCII characters
        raise FrameError("base64_invalid", f"image_b64 is not valid padded standard base64 ({exc})") from exc
    if not data:
        raise FrameError("base64_invalid", "image_b64 is empty")
    return data


def _open_beneath(root: Path, resolved: Path) -> int:
    """Open `resolved` (a realpath inside `root`) one component at a time from `root`, each with O_NOFOLLOW:
    a folder or file swapped for a symlink after realpath fails to open (ELOOP) instead of being followed
    out of the allowed root."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    parts = resolved.relative_to(root).parts
    if not parts:
        raise IsADirectoryError(errno.EISDIR, "a folder, not a file")
    fd = os.open(root, flags | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            inner = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        return os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=fd)  # O_NONBLOCK: a FIFO must not block
    finally:
        os.close(fd)


def _read_uri(uri: str, limits: DecodeLimits) -> bytes:
    """The bytes of a file:// image_uri that resolves (symlinks and .. followed) inside an allowed root."""
    roots = ", ".join(str(root) for root in limits.allowed_roots)
    quoted = f"image_uri {_shown.repr(uri)}"
    if not roots:
        raise FrameError("uri_not_allowed", f"{quoted} refused: worker.allowed_roots lists no folders")
    try:
        parts = urlsplit(uri)
        raw_path = unquote_to_bytes(parts.path)
        path = os.fsdecode(raw_path)
    except ValueError:  # a bad IPv6 host, or a lone surrogate from a JSON "\udc80"
        parts = path = None
        raw_path = b""
    if (
        parts is None
        or parts.scheme.lower() != "file"
        or parts.netloc.lower() not in ("", "localhost")
        or parts.query
        or parts.fragment
        or not parts.path.startswith("/")
    ):
        message = f"{quoted} is not file:///absolute/path (file://localhost/ allowed, no other host)"
        raise FrameError("uri_not_allowed", message)
    if len(raw_path) > URI_PATH_MAX_BYTES:
        message = f"{quoted} is refused: its path is {len(raw_path)} bytes, over PATH_MAX ({URI_PATH_MAX_BYTES})"
        raise FrameError("uri_not_allowed", message)
    resolved = Path(os.path.realpath(path)) if "\0" not in path else None
    root = next((r for r in limits.allowed_roots if resolved is not None and resolved.is_relative_to(r)), None)
    if resolved is None or root is None:
        raise FrameError("uri_not_allowed", f"{quoted} is outside worker.allowed_roots ({roots})")
    # Open what was resolved, then size the open file, not the path.
    try:
        fd = _open_beneath(root, resolved)
    except OSError as exc:
        raise FrameError("file_not_found", f"{quoted} names no readable file ({exc.strerror})") from exc
    return _read_open_file(fd, quoted, limits)
