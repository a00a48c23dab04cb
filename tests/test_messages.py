"""Capture parsing and result bodies: the contract's Messages section, without a broker."""

import json
import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from types import SimpleNamespace

import pytest
from pika.spec import Basic, BasicProperties

from inspector.messages import (
    FRAME_ID_MAX_BYTES,
    META_KEY_MAX_BYTES,
    META_MAX_BYTES,
    META_MAX_DEPTH,
    META_MAX_ITEMS,
    META_VALUE_MAX_BYTES,
    SHORT_STRING_MAX_BYTES,
    SOURCE_ID_MAX_BYTES,
    TEXT_MAX_BYTES,
    clean_id,
    encode,
    frame_id_for,
    parse_capture,
    printable,
    result_body,
    result_routing_key,
)
from inspector.timestamps import rfc3339


def props(**kw):
    base = {"headers": None, "message_id": None, "timestamp": None, "content_type": None}
    return SimpleNamespace(**{**base, **kw})


def test_line_and_camera_come_from_headers_else_the_routing_key():
    assert (parse_capture("line1.cam3", props(), b"x", False).line_id,
            parse_capture("line1.cam3", props(), b"x", False).camera_id) == ("line1", "cam3")
    capture = parse_capture("line1.cam3", props(headers={"line_id": "L9", "camera_id": b"C2"}), b"x", False)
    assert (capture.line_id, capture.camera_id) == ("L9", "C2")
    assert parse_capture("lonely", props(), b"x", False).camera_id == "unknown"


def test_captured_at_header_wins_over_the_amqp_timestamp():
    moment = datetime(2026, 11, 28, 10, 15, 1, 120000, tzinfo=timezone.utc)
    header = {"captured_at": "2026-11-28T10:15:01.120Z"}
    with_header = parse_capture("a.b", props(timestamp=1_700_000_000, headers=header),
                                b"x", False)
    assert with_header.captured_at == moment
    only_amqp = parse_capture("a.b", props(timestamp=1_700_000_000), b"x", False)
    assert only_amqp.captured_at == datetime.fromtimestamp(1_700_000_000, timezone.utc)
    garbled = parse_capture("a.b", props(timestamp=1_700_000_000, headers={"captured_at": "yesterday"}), b"x", False)
    assert garbled.captured_at == only_amqp.captured_at
    assert parse_capture("a.b", props(), b"x", False).captured_at is None


def test_other_headers_travel_as_json_meta():
    headers = {"lot": b"A7", "count": 3, "ratio": Decimal("0.5"), "nested": {"k": [1, b"v"]}, "nan": float("nan"),
               "when": datetime(2026, 1, 2, 3, 4, 5), "width": 10, "model": "m", "x-delivery-count": 2}
    capture = parse_capture("a.b", props(headers=headers), b"x", False)
    assert capture.meta == {"lot": "A7", "count": 3, "ratio": 0.5, "nested": {"k": [1, "v"]}, "nan": "nan",
                            "when": "2026-01-02T03:04:05.000Z"}
    assert capture.model == "m"
    body = result_body(capture, verdict="error", error=("empty_body", "empty"), inspected_at="t")
    assert json.loads(encode(body))["meta"] == capture.meta


def test_result_body_follows_the_contract():
    capture = parse_capture("line1.cam3", props(message_id="f-1", headers={"captured_at": "2026-11-28T10:15:01.120Z"}),
                            b"x", True)
    body = result_body(capture, verdict="pass", probability=0.031, score=41.7, threshold=0.5,
                       model={"name": "default", "plugin": "dfkde", "version": "v"},
                       inspected_at="2026-11-28T10:15:01.162Z")
    assert body == {
        "schema": "inspection.result/1", "frame_id": "f-1", "line_id": "line1", "camera_id": "cam3",
        "verdict": "pass", "anomaly_probability": 0.031, "anomaly_score": 41.7, "threshold": 0.5,
        "model": {"name": "default", "plugin": "dfkde", "version": "v"},
        "captured_at": "2026-11-28T10:15:01.120Z", "inspected_at": "2026-11-28T10:15:01.162Z",
        "redelivered": True, "error": None, "meta": {},
    }
    with pytest.raises(ValueError):
        result_body(capture, verdict="error", inspected_at="t")
    with pytest.raises(ValueError):
        result_body(capture, verdict="maybe", inspected_at="t")


def test_routing_keys_keep_three_words():
    assert result_routing_key("fail", "line1", "cam3") == "fail.line1.cam3"
    assert result_routing_key("pass", "hall 2.line#1", "cam.*") == "pass.hall_2_line_1.cam__"


# -- hostile captures: everything the worker sends on is bounded and clean -------------------


def publishable(capture, verdict="error"):
    """Encode the result's publish frame and properties as pika does: ShortStringTooLong if an id is too long."""
    key = result_routing_key(verdict, capture.line_id, capture.camera_id)
    Basic.Publish(exchange="inspection.results", routing_key=key).encode()
    BasicProperties(correlation_id=capture.frame_id, message_id=capture.frame_id).encode()
    return key


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "1969-12-31T23:59:59Z",
                                  "9999-01-01T00:00:00Z", "1970-01-01T00:30:00+01:00", "x" * 10_000])
def test_captured_at_out_of_range_is_absent_and_the_result_still_builds(text):
    capture = parse_capture("a.b", props(headers={"captured_at": text}), b"x", False)
    assert capture.captured_at is None
    encode(result_body(capture, verdict="error", error=("empty_body", "empty"), inspected_at="t"))
    fallback = parse_capture("a.b", props(timestamp=1_700_000_000, headers={"captured_at": text}), b"x", False)
    assert fallback.captured_at == datetime.fromtimestamp(1_700_000_000, timezone.utc)


@pytest.mark.parametrize(("text", "expected"), [
    ("1970-01-01T00:00:00Z", datetime(1970, 1, 1, tzinfo=timezone.utc)),
    ("9998-12-31T23:59:59.999+00:00", datetime(9998, 12, 31, 23, 59, 59, 999000, tzinfo=timezone.utc)),
    ("2026-11-28T11:15:01.120+01:00", datetime(2026, 11, 28, 10, 15, 1, 120000, tzinfo=timezone.utc)),
    ("2026-11-28T10:15:01", datetime(2026, 11, 28, 10, 15, 1, tzinfo=timezone.utc)),
])
def test_captured_at_in_range_is_held_in_utc(text, expected):
    moment = parse_capture("a.b", props(headers={"captured_at": text}), b"x", False).captured_at
    assert moment == expected and moment.tzinfo is timezone.utc
    assert rfc3339(moment) == expected.strftime("%Y-%m-%dT%H:%M:%S.") + f"{expected.microsecond // 1000:03d}Z"


def test_captured_at_as_an_amqp_timestamp_header():
    when = datetime(2026, 11, 28, 10, 15, 1, tzinfo=timezone.utc)
    assert parse_capture("a.b", props(headers={"captured_at": when}), b"x", False).captured_at == when
    far = datetime(9999, 12, 31, 23, 0, tzinfo=timezone(timedelta(hours=-1)))
    assert parse_capture("a.b", props(headers={"captured_at": far}), b"x", False).captured_at is None


@pytest.mark.parametrize("stamp", [2**63, 2**63 - 1, 2**64 - 1, 253_370_764_800, -1, -2**63, 0, True])
def test_amqp_timestamp_out_of_range_is_absent(stamp):
    capture = parse_capture("a.b", props(timestamp=stamp), b"x", False)
    assert capture.captured_at is None
    encode(result_body(capture, verdict="pass", probability=0.1, score=1.0, inspected_at="t"))


def test_amqp_timestamp_bounds():
    assert parse_capture("a.b", props(timestamp=1), b"x", False).captured_at == datetime(1970, 1, 1, 0, 0, 1,
                                                                                         tzinfo=timezone.utc)
    latest = parse_capture("a.b", props(timestamp=253_370_764_799), b"x", False).captured_at
    assert latest == datetime(9998, 12, 31, 23, 59, 59, tzinfo=timezone.utc)


def test_a_long_line_id_still_fits_the_result_routing_key():
    capture = parse_capture("a.b", props(headers={"line_id": "L" * 250, "camera_id": "C" * 250}), b"x", False)
    key = publishable(capture)
    assert len(key.encode()) <= SHORT_STRING_MAX_BYTES
    assert capture.line_id.startswith("L" * 100) and len(capture.line_id.encode()) <= SOURCE_ID_MAX_BYTES
    again = parse_capture("a.b", props(headers={"line_id": "L" * 250, "camera_id": "C" * 250}), b"y", False)
    other = parse_capture("a.b", props(headers={"line_id": "L" * 251}), b"x", False)
    assert again.line_id == capture.line_id and other.line_id != capture.line_id


def test_wide_characters_are_budgeted_in_bytes():
    capture = parse_capture("a.b", props(headers={"line_id": "线" * 100, "camera_id": "𠀀" * 100}), b"x", False)
    assert len(publishable(capture, "error").encode()) <= SHORT_STRING_MAX_BYTES
    assert capture.line_id.startswith("线" * 30) and capture.camera_id.startswith("𠀀" * 20)


def test_an_invalid_utf8_message_id_fits_correlation_id():
    capture = parse_capture("a.b", props(message_id=b"\xff" * 255), b"x", False)
    publishable(capture)
    assert len(capture.frame_id.encode()) <= FRAME_ID_MAX_BYTES
    assert capture.frame_id == parse_capture("a.b", props(message_id=b"\xff" * 255), b"y", True).frame_id
    assert capture.frame_id != parse_capture("a.b", props(message_id=b"\xfe" * 255), b"x", False).frame_id


@pytest.mark.parametrize(("raw", "budget", "distinct", "expected"), [
    ("line1", 124, False, "line1"),
    ("f-000123", 200, True, "f-000123"),
    ("3f2a9c1e-7b4d-4f0a-9e8b-1c2d3e4f5a6b", 200, True, "3f2a9c1e-7b4d-4f0a-9e8b-1c2d3e4f5a6b"),
    ("Halle-Süd_2", 124, False, "Halle-Süd_2"),
    ("cam:3@hall+2=a~b.c", 124, False, "cam:3@hall+2=a~b.c"),
    ("hall 2", 124, False, "hall_2"),
    ("../../etc/passwd", 124, False, "_._.._etc_passwd"),
    ("..", 124, False, "_."),
    ("-rf", 124, False, "_rf"),
    ("a\nb\x1b[31mc\x7f\x85\u202e", 124, False, "a_b__31mc___"),
    ("  padded  ", 124, False, "padded"),
    ("", 124, False, ""),
    (None, 124, False, ""),
    (7, 124, False, ""),
])
def test_clean_id(raw, budget, distinct, expected):
    assert clean_id(raw, budget, distinct=distinct) == expected


def test_clean_id_over_budget_or_altered_when_distinct():
    cut = clean_id("x" * 300, 124)
    assert len(cut) == 124 and cut.startswith("x" * 100)
    assert re.fullmatch(r"x+~[0-9a-f]{8}", cut)
    assert clean_id("x" * 300, 124) == cut and clean_id("x" * 301, 124) != cut
    assert re.fullmatch(r"a_b~[0-9a-f]{8}", clean_id("a b", 200, distinct=True))
    assert clean_id("a b", 200, distinct=True) != clean_id("a\tb", 200, distinct=True)
    assert clean_id(cut, 124) == cut and clean_id(clean_id("a b", 200, distinct=True), 200, distinct=True) == \
        clean_id("a b", 200, distinct=True)


def test_frame_ids_are_clean_and_distinct():
    assert parse_capture("a.b", props(message_id="f-1"), b"x", False).frame_id == "f-1"
    newline = parse_capture("a.b", props(message_id="f-1\nINFO forged"), b"x", False).frame_id
    assert "\n" not in newline and " " not in newline and newline.startswith("f-1_INFO_forged~")
    assert parse_capture("a.b", props(message_id="f/1"), b"x", False).frame_id != \
        parse_capture("a.b", props(message_id="f_1"), b"x", False).frame_id


def test_routing_key_ids_are_cleaned_and_bytes_are_read():
    capture = parse_capture(b"line\xff\x1b.cam\n3", props(), b"x", False)
    assert (capture.line_id, capture.camera_id) == ("line__", "cam_3")
    assert capture.routing_key == "line\ufffd\x1b.cam\n3"
    assert result_routing_key("pass", "x" * 300, "y.z" * 100).count(".") == 2
    assert len(result_routing_key("error", "é" * 300, "😀" * 300).encode()) <= SHORT_STRING_MAX_BYTES


def test_model_header_is_bounded_and_never_cleaned_into_another_name():
    assert parse_capture("a.b", props(headers={"model": "default"}), b"x", False).model == "default"
    assert parse_capture("a.b", props(headers={"model": "my model"}), b"x", False).model != "my_model"
    assert len(parse_capture("a.b", props(headers={"model": "m" * 10_000}), b"x", False).model) <= 64


def test_meta_is_bounded():
    deep: object = "bottom"
    for _ in range(100):
        deep = {"d": deep}
    headers = {f"k{i}": i for i in range(500)}
    headers.update({"long": "v" * 100_000, "deep": deep, "list": list(range(100_000)),
                    b"\xff\xfekey": 1, "bad\nkey\x1b": 2, "x-death": [{"count": 1}], "x-delivery-count": 3})
    capture = parse_capture("a.b", props(headers=headers), b"x", False)
    meta = capture.meta
    assert len(json.dumps(meta, separators=(",", ":")).encode()) <= META_MAX_BYTES
    assert len(meta) <= META_MAX_ITEMS and "x-death" not in meta and "x-delivery-count" not in meta
    assert all(clean_id(key, META_KEY_MAX_BYTES) == key for key in meta)
    encode(result_body(capture, verdict="pass", probability=0.1, score=1.0, inspected_at="t"))


def test_meta_values_are_cut_and_nesting_stops():
    deep: object = "bottom"
    for _ in range(100):
        deep = [deep]
    headers = {"long": "v" * 100_000, "wide": "é" * 5_000, "deep": deep, "list": list(range(1000)),
               b"\xff\xfekey": 1, "bad\nkey\x1b": 2, "table": {f"k{i}": i for i in range(1000)}}
    meta = parse_capture("a.b", props(headers=headers), b"x", False).meta
    assert meta["long"] == "v" * (META_VALUE_MAX_BYTES - 3) + "…"
    assert len(meta["wide"].encode()) <= META_VALUE_MAX_BYTES and meta["wide"].endswith("…")
    level, depth = meta["deep"], 1
    while isinstance(level, list):
        level, depth = level[0], depth + 1
    assert level == "…" and depth == META_MAX_DEPTH + 1
    assert meta["list"] == list(range(META_MAX_ITEMS))
    assert list(meta["table"]) == [f"k{i}" for i in range(META_MAX_ITEMS)]
    assert meta["__key"] == 1 and meta["bad_key_"] == 2


@pytest.mark.parametrize(("value", "expected"), [
    (Decimal("NaN"), "NaN"), (Decimal("sNaN"), "sNaN"), (Decimal("-Infinity"), "-Infinity"),
    (Decimal("1E+400"), "1E+400"), (float("-inf"), "-inf"), (2**63, 2**63), (-2**63, -2**63),
    (datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))), "0001-01-01T00:00:00+01:00"),
    (datetime(9999, 12, 31, 23, 59, tzinfo=timezone(timedelta(hours=-1))), "9999-12-31T23:59:00-01:00"),
    (datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=1))), "2026-01-02T02:04:05.000Z"),
    (b"\xff", "\ufffd"),
])
def test_meta_values_are_json(value, expected):
    capture = parse_capture("a.b", props(headers={"v": value}), b"x", False)
    assert capture.meta == {"v": expected}
    encode(result_body(capture, verdict="fail", probability=0.9, score=1.0, inspected_at="t"))


@pytest.mark.parametrize(("raw", "expected"), [
    ("image/png", "image/png"),
    ("a\nINFO forged\x1b[2J", "a\\nINFO forged\\x1b[2J"),
    ("evil\u202etxt.exe\u2028", "evil\\u202etxt.exe\\u2028"),
    (b"line\xff.cam\r", "line\ufffd.cam\\r"),
    ("\udcff", "\\udcff"),
    ("Halle-Süd 线", "Halle-Süd 线"),
    (None, ""),
])
def test_printable_escapes_what_a_terminal_or_log_would_act_on(raw, expected):
    assert printable(raw) == expected


def test_printable_is_bounded():
    assert printable("x" * 10_000) == "x" * (TEXT_MAX_BYTES - 3) + "…"
    assert len(printable("\n" * 10_000).encode()) <= TEXT_MAX_BYTES
    assert len(printable("线" * 10_000, 100).encode()) <= 100


def test_content_type_is_printable_and_bounded():
    assert parse_capture("a.b", props(content_type=" image/png "), b"x", False).content_type == "image/png"
    odd = parse_capture("a.b", props(content_type="image/png\x1b" + "x" * 1000), b"x", False).content_type
    assert odd.startswith("image/png\\x1b") and len(odd.encode()) <= SHORT_STRING_MAX_BYTES


def test_frame_id_for_a_body_alone_is_stable():
    assert frame_id_for(b"pixels") == frame_id_for(b"pixels") != frame_id_for(b"other pixels")
    assert clean_id(frame_id_for(b"pixels"), FRAME_ID_MAX_BYTES, distinct=True) == frame_id_for(b"pixels")
    plain = props(headers={"captured_at": "2026-11-28T10:15:01.120Z"}, timestamp=1_700_000_000)
    assert parse_capture("line1.cam1", plain, b"pixels", False).frame_id == "gen-8acb45533e08598cef37"
