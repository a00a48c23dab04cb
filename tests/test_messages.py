"""Capture parsing and result bodies: the contract's Messages section, without a broker."""

import json
from datetime import datetime, timezone
from decimal import Decimal
from types import SimpleNamespace

import pytest

from inspector.messages import encode, parse_capture, result_body, result_routing_key


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
    with_header = parse_capture("a.b", props(timestamp=1_700_000_000, headers={"captured_at": "2026-11-28T10:15:01.120Z"}),
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
                       model={"name": "default", "plugin": "dfkde", "version": "v"}, inspected_at="2026-11-28T10:15:01.162Z")
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
