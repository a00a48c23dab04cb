"""Generated hostile captures: whatever a camera or a broken client sends, parsing gives a Capture
whose every result publishes, and decoding gives pixels or a FrameError, never anything else."""

from __future__ import annotations

import base64
import io
import json
import operator
import re
import unicodedata
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pika.spec import Basic, BasicProperties
from PIL import Image

from inspector.errors import FrameError, InspectorError
from inspector.messages import (
    EARLIEST_TIME,
    FRAME_ID_MAX_BYTES,
    LATEST_TIME,
    META_KEY_MAX_BYTES,
    META_MAX_BYTES,
    META_MAX_DEPTH,
    META_MAX_ITEMS,
    META_VALUE_MAX_BYTES,
    MODEL_NAME_MAX_BYTES,
    SHORT_STRING_MAX_BYTES,
    SOURCE_ID_MAX_BYTES,
    VERDICTS,
    Capture,
    clean_id,
    encode,
    parse_capture,
    printable,
    result_body,
    result_routing_key,
)
from inspector.timestamps import rfc3339
from inspector.worker.decode import DecodeLimits, decode_capture

HOSTILE = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLEAN_ID = re.compile(r"[\w.:@+=~-]+")
UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})
TESTS = Path(__file__).resolve().parent
LIMITS = DecodeLimits(max_image_bytes=1 << 20, max_image_pixels=1 << 20, allowed_roots=(TESTS,))

# -- AMQP values as pika gives them, and worse ----------------------------------------------------

offsets = st.builds(timezone, st.timedeltas(min_value=-timedelta(hours=23, minutes=59),
                                            max_value=timedelta(hours=23, minutes=59)))
edges = st.sampled_from([datetime.min, datetime.max, datetime(1970, 1, 1), datetime(9998, 12, 31, 23, 59, 59),
                         datetime(9999, 1, 1)])
datetimes = st.datetimes(timezones=st.none() | offsets) | st.builds(  # years 1 to 9999, any offset
    lambda moment, zone: moment.replace(tzinfo=zone), edges, st.none() | offsets)
any_char = st.characters(exclude_categories=())  # lone surrogates too: a str need not be valid UTF-8
long_text = st.builds(operator.mul, st.text(any_char, min_size=1, max_size=4), st.integers(1, 3000))
texts = (st.text(any_char, max_size=40) | long_text
         | st.sampled_from(["..", "../etc/passwd", "a\nb", "\x1b[31m", "a/b", "-x"]))
integers = st.integers(-2**63, 2**64 - 1) | st.integers()
scalars = st.one_of(texts, st.binary(max_size=300), integers, st.floats(), st.decimals(), datetimes,
                    st.booleans(), st.none())
HEADER_NAMES = ["line_id", "camera_id", "model", "captured_at", "width", "height", "pixel_format",
                "x-delivery-count", "x-death", "x-first-death-queue"]
keys = st.sampled_from(HEADER_NAMES) | st.text(any_char, max_size=30) | st.binary(max_size=30) | long_text


def nest(depth: int, leaf: Any, as_table: bool) -> Any:
    for _ in range(depth):
        leaf = {"k": leaf} if as_table else [leaf]
    return leaf


deep = st.builds(nest, st.integers(1, 40), scalars, st.booleans())
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(keys, inner, max_size=6),
                      max_leaves=40) | deep
times = st.one_of(datetimes.map(datetime.isoformat), datetimes, texts, st.binary(max_size=40), values)
headers = st.none() | st.dictionaries(keys, values, max_size=12) | st.fixed_dictionaries(
    {}, optional={"line_id": texts | st.binary(max_size=300), "camera_id": texts | st.binary(max_size=300),
                  "model": texts | st.binary(max_size=100), "captured_at": times})
properties = st.builds(
    BasicProperties,
    content_type=st.none() | st.sampled_from(["image/png", "application/json", "image/x-raw"]) | texts,
    headers=headers,
    message_id=st.none() | texts | st.binary(max_size=300),
    correlation_id=st.none() | texts | st.binary(max_size=300),
    timestamp=st.none() | integers,
)
routing_keys = texts | st.binary(max_size=300) | st.lists(texts, max_size=4).map(".".join)


def assert_clean_id(value: str, max_bytes: int) -> None:
    assert CLEAN_ID.fullmatch(value) and not value.startswith((".", "-")), value
    assert not any(unicodedata.category(char) in UNSAFE_CATEGORIES for char in value), value
    assert len(value.encode()) <= max_bytes


def depth_of(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    return 0


def assert_publishable(capture: Capture) -> None:
    assert_clean_id(capture.frame_id, FRAME_ID_MAX_BYTES)
    assert_clean_id(capture.line_id, SOURCE_ID_MAX_BYTES)
    assert_clean_id(capture.camera_id, SOURCE_ID_MAX_BYTES)
    if capture.model is not None:
        assert_clean_id(capture.model, MODEL_NAME_MAX_BYTES)
    if capture.captured_at is not None:
        assert capture.captured_at.tzinfo is timezone.utc and EARLIEST_TIME <= capture.captured_at < LATEST_TIME
        rfc3339(capture.captured_at)
    if capture.content_type is not None:
        assert len(capture.content_type.encode()) <= SHORT_STRING_MAX_BYTES
        assert not any(unicodedata.category(char) in ("Cc", "Cs") for char in capture.content_type)
    assert len(encode(capture.meta)) <= META_MAX_BYTES
    assert len(capture.meta) <= META_MAX_ITEMS and depth_of(capture.meta) <= META_MAX_DEPTH + 1
    for key in capture.meta:
        assert_clean_id(key, META_KEY_MAX_BYTES)
    BasicProperties(correlation_id=capture.frame_id, message_id=capture.frame_id).encode()  # ShortStringTooLong?
    for verdict in VERDICTS:
        body = result_body(
            capture, verdict=verdict, probability=None if verdict == "error" else 0.5, score=1.0, threshold=0.5,
            model={"name": "default", "plugin": "dfkde", "version": "v"},
            error=("image_undecodable", "\udcff bad \x00 frame") if verdict == "error" else None,
            inspected_at="2026-11-28T10:15:01.162Z",
        )
        assert json.loads(encode(body))["frame_id"] == capture.frame_id
        key = result_routing_key(verdict, capture.line_id, capture.camera_id)
        assert len(key.encode()) <= SHORT_STRING_MAX_BYTES and key.count(".") == 2
        Basic.Publish(exchange="inspection.results", routing_key=key).encode()


@HOSTILE
@given(routing_key=routing_keys, props=properties, body=st.binary(max_size=64), redelivered=st.booleans())
def test_any_delivery_parses_to_a_publishable_capture(routing_key, props, body, redelivered):
    try:
        capture = parse_capture(routing_key, props, body, redelivered)
    except InspectorError:
        return
    assert_publishable(capture)
    again = parse_capture(routing_key, props, body, not redelivered)
    assert (again.frame_id, again.line_id, again.camera_id, again.meta) == \
        (capture.frame_id, capture.line_id, capture.camera_id, capture.meta)


@HOSTILE
@given(value=texts | st.binary(max_size=600), max_bytes=st.integers(16, 300), distinct=st.booleans())
def test_clean_id_is_bounded_stable_and_idempotent(value, max_bytes, distinct):
    cleaned = clean_id(value, max_bytes, distinct=distinct)
    if not cleaned:
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        assert not text.strip()
        return
    assert_clean_id(cleaned, max_bytes)
    assert clean_id(value, max_bytes, distinct=distinct) == cleaned
    assert clean_id(cleaned, max_bytes, distinct=distinct) == cleaned
    if isinstance(value, str) and value == cleaned:
        assert CLEAN_ID.fullmatch(value)


BIDI = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


@HOSTILE
@given(value=texts | st.binary(max_size=600), max_bytes=st.integers(8, 2000))
def test_printable_is_safe_for_a_log_line(value, max_bytes):
    text = printable(value, max_bytes)
    assert len(text.encode()) <= max_bytes
    assert not any(unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") or char in BIDI for char in text)


@HOSTILE
@given(value=values)
def test_any_header_value_becomes_bounded_meta(value):
    meta = parse_capture("a.b", BasicProperties(headers={"v": value, "w": value}), b"x", False).meta
    assert len(encode(meta)) <= META_MAX_BYTES and depth_of(meta) <= META_MAX_DEPTH + 1

    def strings(item: Any):
        if isinstance(item, dict):
            for inner in item.values():
                yield from strings(inner)
        elif isinstance(item, list):
            for inner in item:
                yield from strings(inner)
        elif isinstance(item, str):
            yield item

    assert all(len(text.encode()) <= META_VALUE_MAX_BYTES for text in strings(meta))


# -- bodies of every content type --------------------------------------------------------------


def image_bytes(fmt: str, mode: str) -> bytes:
    pixels = np.random.default_rng(2).integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, fmt)
    return buffer.getvalue()


SEEDS = [image_bytes(fmt, mode) for fmt, mode in [("PNG", "RGB"), ("PNG", "L"), ("JPEG", "RGB"), ("BMP", "RGB"),
                                                  ("TIFF", "RGB"), ("WEBP", "RGB"), ("PNG", "RGBA")]]


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    edited = bytearray(data)
    for at, value in edits:
        edited[at % len(edited)] = value
    return bytes(edited[: max(1, len(edited) - cut)])


images = st.sampled_from(SEEDS) | st.builds(mutate, st.sampled_from(SEEDS),
                                            st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                     max_size=8),
                                            st.integers(0, 200))
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                       max_size=4), max_leaves=20)
uris = st.sampled_from([p.as_uri() for p in sorted(TESTS.iterdir())[:5]] + ["file:///etc/passwd", "http://x/a.png",
                                                                          "file://host/a", "file:///" + "a/" * 3000])
json_bodies = st.one_of(
    st.builds(lambda v: json.dumps({"image_b64": v}).encode(), images.map(lambda b: base64.b64encode(b).decode())),
    st.builds(lambda v: json.dumps({"image_uri": v}).encode(), uris | st.text(max_size=50)),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda n, opener: opener * n, st.integers(1, 5000), st.sampled_from([b"[", b'{"a":', b"[[],"])),
)
raw_values = st.none() | integers | st.text(max_size=20) | st.binary(max_size=20) | st.floats() | st.sampled_from(
    ["mono8", "rgb8", "bgr8", "Mono8", "3", "0", "-1"])
raw_headers = st.fixed_dictionaries({}, optional={"width": raw_values, "height": raw_values,
                                                  "pixel_format": raw_values})
content_types = st.none() | st.sampled_from(["image/jpeg", "image/png", "image/bmp", "image/tiff", "image/webp",
                                             "application/octet-stream", "image/x-raw", "application/json",
                                             "application/json; charset=utf-8", "text/plain", ""]) | texts


@HOSTILE
@given(body=images | json_bodies | st.binary(max_size=2048), content_type=content_types,
       headers=st.none() | raw_headers, min_size=st.none() | st.tuples(st.integers(1, 64), st.integers(1, 64)))
def test_any_body_decodes_to_pixels_or_a_frame_error(body, content_type, headers, min_size):
    try:
        pixels = decode_capture(body, content_type, headers, LIMITS, min_size)
    except FrameError:
        return
    assert isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3



@settings(max_examples=60, deadline=None)
@given(scans=st.integers(1, 400), width=st.integers(1, 3000), height=st.integers(1, 3000),
       extra=st.lists(st.sampled_from([b"\xff\xda", b"\xff\xff\xda", b"\xff\x00", b"\xda\xff"]), max_size=4),
       limit=st.integers(1, 200))
def test_the_scans_of_a_jpeg_are_bounded_before_decoding(scans, width, height, extra, limit):
    """However a progressive JPEG is cut, a body of more FF DA markers than worker.max_jpeg_scans is refused
    unread, in milliseconds; one of no more decodes (or fails as any other JPEG)."""
    import time

    from tests.jpegkit import many_scan_jpeg

    body = many_scan_jpeg(width, height, scans) + b"".join(extra)  # whatever follows the end of the image
    limits = DecodeLimits(max_image_bytes=1 << 22, max_image_pixels=1 << 24, max_jpeg_scans=limit)
    markers = body.count(b"\xff\xda")
    started = time.perf_counter()
    try:
        pixels = decode_capture(body, "image/jpeg", None, limits)
    except FrameError as exc:
        assert exc.code == ("image_too_complex" if markers > limit else "image_undecodable"), str(exc)
        if markers > limit:
            assert time.perf_counter() - started < 0.05
        return
    assert markers <= limit and pixels.shape == (height, width, 3)
