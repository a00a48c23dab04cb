"""`inspector publish`: send image files to the captures exchange as a line camera does.

For demos, replaying an archive and load tests, so the loop stays lean: files are
read as they are sent (a --loop over a large archive holds one frame at a time),
each publish is confirmed by the broker before the next (a frame nobody consumes
is an error, not a silent drop), nothing is logged per frame, and --rate paces
against a monotonic schedule so the rate does not drift with the time a publish
takes.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pika
import pika.exceptions

from inspector import imageformats
from inspector.broker import blocking_connection, close_quietly
from inspector.config import Settings
from inspector.errors import BrokerError, ConfigError, InspectorError
from inspector.imagefiles import (
    IMAGE_SUFFIXES,
    UnreadableImage,
    find_images,
    is_image_file,
    raw_pixels,
    read_image,
)
from inspector.timestamps import rfc3339

log = logging.getLogger(__name__)

CONTENT_TYPES = imageformats.CONTENT_TYPE_OF_SUFFIX
MODES = ("encoded", "raw", "reference")
PIXEL_FORMATS = tuple(f.name for f in imageformats.RAW)
_GLOB_CHARS = frozenset("*?[")
_ID_UNSAFE = frozenset(".*# \t\r\n")


@dataclass(frozen=True)
class Source:
    """One file to send, and its name relative to the --images argument it came from (the `source`
    header, which the result carries back in `meta`)."""

    path: Path
    name: str


@dataclass(frozen=True)
class PublishOptions:
    images: Sequence[str]
    camera: str = "cam1"
    line: str = "line1"
    model: str | None = None
    mode: str = "encoded"  # one of MODES
    pixel_format: str = "rgb8"
    rate: float = 0.0  # frames per second; 0: as fast as confirms allow
    loop: bool = False
    count: int | None = None


@dataclass
class Summary:
    sent: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: int = 0
    interrupted: bool = False

    def line(self) -> str:
        rate = self.sent / self.seconds if self.seconds > 0 else 0.0
        megabytes = self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0
        text = (f"sent {self.sent} frames, {self.bytes} bytes in {self.seconds:.2f} s: {rate:.1f} frames/s, "
                f"{megabytes:.1f} MB/s; unreadable files skipped: {self.skipped}")
        return text + (" (interrupted)" if self.interrupted else "")


def find_sources(arguments: Sequence[str]) -> list[Source]:
    """Files, folders (recursive, images by suffix, sorted) and glob patterns, in the order given.

    A path that does not exist is an operator mistake (ConfigError); so is finding nothing at all.
    """
    found: list[Source] = []
    for argument in arguments:
        path = Path(argument).expanduser()
        if path.is_dir():
            found += [Source(p, p.relative_to(path).as_posix()) for p in find_images(path)]
        elif path.exists():
            if not is_image_file(path):
                raise ConfigError(f"--images {argument}: not an image file (suffixes: {_suffixes()})")
            found.append(Source(path, path.name))
        elif _GLOB_CHARS & set(argument):
            matched = _expand(argument)
            if not matched:
                log.warning("--images %s: the pattern matches no image file", argument)
            found += matched
        else:
            raise ConfigError(f"--images {argument}: no such file or folder")
    if not found:
        raise ConfigError(f"no image files ({_suffixes()}) in {', '.join(arguments)}")
    return found


def _expand(pattern: str) -> list[Source]:
    """A glob pattern's images (folders it matches: every image under them), named relative to the
    pattern's fixed leading folders, so `archive/*/*.png` names `good/000.png`."""
    parts = Path(pattern).expanduser().parts
    fixed = next((i for i, part in enumerate(parts) if _GLOB_CHARS & set(part)), len(parts))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    found: list[Source] = []
    for match in sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True)):
        path = Path(match)
        if path.is_dir():
            found += [Source(p, p.relative_to(base).as_posix()) for p in find_images(path)]
        elif path.is_file() and is_image_file(path):
            found.append(Source(path, path.relative_to(base).as_posix()))
    return found


def _suffixes() -> str:
    return ", ".join(sorted(IMAGE_SUFFIXES))


def frame_body(source: Source, mode: str, pixel_format: str, max_pixels: int) -> tuple[bytes, str, dict]:
    """(body, content type, extra headers) of one file; UnreadableImage or OSError when it cannot be read."""
    if mode == "reference":
        uri = source.path.resolve().as_uri()
        return json.dumps({"image_uri": uri}).encode(), "application/json", {}
    if mode == "encoded":
        return source.path.read_bytes(), CONTENT_TYPES[source.path.suffix.lower()], {}
    rgb = read_image(source.path, max_pixels)
    height, width = rgb.shape[:2]
    headers = {"width": width, "height": height, "pixel_format": pixel_format}
    return raw_pixels(rgb, pixel_format), imageformats.RAW_CONTENT_TYPE, headers


class Pacer:
    """Frame n is due at start + n / rate on the monotonic clock: time spent publishing is not added
    to the interval, so the rate does not drift."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.start: float | None = None

    def wait(self, n: int) -> None:
        now = time.monotonic()
        if self.start is None:
            self.start = now
        if self.interval:
            delay = self.start + n * self.interval - now
            if delay > 0:
                time.sleep(delay)


def check_options(options: PublishOptions) -> None:
    for flag, value in (("--camera", options.camera), ("--line", options.line)):
        if not value or _ID_UNSAFE & set(value):
            raise ConfigError(f"{flag} {value!r}: must be a non-empty id without '.', '*', '#' or spaces "
                              "(it is a word of the routing key <line>.<camera>)")
    if options.rate < 0:
        raise ConfigError(f"--rate {options.rate:g}: must be 0 (as fast as possible) or more")
    if options.count is not None and options.count < 1:
        raise ConfigError(f"--count {options.count}: must be 1 or more")
    if options.mode not in MODES or options.pixel_format not in PIXEL_FORMATS:
        raise ConfigError(f"mode {options.mode!r} / pixel format {options.pixel_format!r} unknown")


def publish(settings: Settings, options: PublishOptions, summary: Summary | None = None) -> Summary:
    """Send the frames; returns (and fills in, so that a Ctrl-C caller still has it) the summary."""
    check_options(options)
    sources = find_sources(options.images)
    summary = summary if summary is not None else Summary()
    exchange = settings.broker.exchanges.captures
    routing_key = f"{options.line}.{options.camera}"
    connection = blocking_connection(settings.broker)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        _check_exchange(channel, exchange)
        log.info("publishing %d files%s to %s as %s (%s)", len(sources), " in a loop" if options.loop else "",
                 exchange, routing_key, options.mode)
        if options.mode == "reference":
            _warn_outside_roots(sources, settings.worker.allowed_roots)
        _send(channel, exchange, routing_key, sources, options, settings.worker.max_image_pixels, summary)
    except pika.exceptions.UnroutableError:
        raise BrokerError(f"no queue is bound to {exchange} for routing key {routing_key}: start `inspector run` "
                          "once so it declares its queue") from None
    except pika.exceptions.NackError:
        raise BrokerError(f"RabbitMQ refused a frame on {exchange} (nack) after {summary.sent} frames; "
                          "see its log (a full queue with overflow reject-publish?)") from None
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise BrokerError(f"publishing to RabbitMQ at {settings.broker.shown} failed after "
                          f"{summary.sent} frames: {exc!r}") from exc
    finally:
        close_quietly(connection)
    return summary


def _send(channel, exchange: str, routing_key: str, sources: list[Source], options: PublishOptions,
          max_pixels: int, summary: Summary) -> None:
    run_id = uuid.uuid4().hex[:8]
    pacer = Pacer(options.rate)
    skipped: set[Path] = set()
    fixed = {"camera_id": options.camera, "line_id": options.line}
    if options.model:
        fixed["model"] = options.model
    try:
        while True:
            sent_before = summary.sent
            for source in _frames(sources, skipped):
                if options.count is not None and summary.sent >= options.count:
                    return
                try:
                    body, content_type, headers = frame_body(source, options.mode, options.pixel_format, max_pixels)
                except (UnreadableImage, OSError) as exc:
                    skipped.add(source.path)
                    summary.skipped = len(skipped)
                    log.warning("skipping %s: %s", source.path, getattr(exc, "strerror", None) or exc)
                    continue
                pacer.wait(summary.sent)
                now = datetime.now(UTC)
                properties = pika.BasicProperties(
                    content_type=content_type,
                    delivery_mode=2,
                    message_id=f"{options.camera}-{run_id}-{summary.sent:06d}",
                    timestamp=int(now.timestamp()),
                    headers={**fixed, "captured_at": rfc3339(now), "source": source.name, **headers},
                )
                channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)
                summary.sent += 1
                summary.bytes += len(body)
                summary.seconds = time.monotonic() - pacer.start
            if summary.sent == sent_before:
                raise InspectorError(f"no usable images: all {len(sources)} files were skipped as unreadable")
            if not options.loop:
                return
    except KeyboardInterrupt:
        summary.interrupted = True
        raise
    finally:
        if pacer.start is not None:
            summary.seconds = time.monotonic() - pacer.start


def _warn_outside_roots(sources: list[Source], roots: Sequence[Path]) -> None:
    """A worker refuses an image_uri outside worker.allowed_roots; say so before sending them all."""
    resolved = [Path(os.path.realpath(root)) for root in roots]
    outside = [s.path for s in sources if not any(Path(os.path.realpath(s.path)).is_relative_to(r) for r in resolved)]
    if outside:
        log.warning("%d of %d files (e.g. %s) are outside worker.allowed_roots of this configuration (%s): a worker "
                    "configured so answers them uri_not_allowed", len(outside), len(sources), outside[0],
                    ", ".join(map(str, resolved)) or "none")


def _frames(sources: list[Source], skipped: set[Path]) -> Iterator[Source]:
    return (source for source in sources if source.path not in skipped)


def _check_exchange(channel, exchange: str) -> None:
    """The captures exchange must exist already: publish creates no topology, the worker does."""
    try:
        channel.exchange_declare(exchange, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            raise BrokerError(f"the exchange {exchange} does not exist: start `inspector run` once so it declares "
                              "its exchanges and queue") from None
        raise
