"""The broker thread's pure pieces: dead letters that fit one frame, and content headers pika cannot
decode turned into a delivery the worker can still answer. No broker."""

import struct
import time

import pika
import pika.frame
import pytest

from inspector.worker.envelopes import Delivery, Outcome, dead_letter_properties, encoded_size
from inspector.worker.pikaconnection import UndecodableProperties, _salvage_header


def outcome(properties: pika.BasicProperties) -> Outcome:
    delivery = Delivery(generation=1, tag=1, exchange="inspection.captures", routing_key="line1.cam1",
                        properties=properties, body=b"", redelivered=False, received_at=0.0)
    return Outcome(delivery=delivery, routing_key="error.line1.cam1", result=b"{}", frame_id="f1",
                   dead_letter=("empty_body", "the capture's body is empty"))


def test_a_dead_letter_keeps_every_header_that_fits():
    properties = dead_letter_properties(outcome(pika.BasicProperties(headers={"lot": "A7"})), budget=4096)
    assert properties.headers["lot"] == "A7" and properties.headers["x-inspector-error-code"] == "empty_body"
    assert "x-inspector-headers-dropped" not in properties.headers


@pytest.mark.parametrize("budget", [4096, 20_000, 100_000])
def test_a_dead_letter_over_its_budget_drops_the_largest_headers_first(budget):
    headers = {"small": "s", "medium": "m" * 3000, "large": "l" * 120_000, "lot": "A7"}
    properties = dead_letter_properties(outcome(pika.BasicProperties(headers=headers)), budget=budget)
    assert encoded_size(properties) <= budget
    kept = {k for k in headers if k in properties.headers}
    dropped = properties.headers.get("x-inspector-headers-dropped", 0)
    assert dropped == len(headers) - len(kept)
    assert "large" not in kept and {"small", "lot"} <= kept  # the largest go first
    assert properties.headers["x-inspector-frame-id"] == "f1"


def header_frame(channel: int, body_size: int, properties: bytes) -> bytes:
    payload = struct.pack(">HHQ", 60, 0, body_size) + properties
    return struct.pack(">BHL", pika.spec.FRAME_HEADER, channel, len(payload)) + payload + bytes([pika.spec.FRAME_END])


def test_a_content_header_pika_cannot_decode_is_salvaged_with_its_body_size():
    table = b"\x01n" + b"T" + struct.pack(">Q", 2**63 - 1)
    properties = struct.pack(">H", pika.BasicProperties.FLAG_HEADERS) + struct.pack(">I", len(table)) + table
    frame = header_frame(3, 1234, properties)
    with pytest.raises(Exception):  # what pika itself makes of it
        pika.frame.decode_frame(frame + b"more")
    consumed, header = _salvage_header(frame + b"more", OverflowError("year out of range"))
    assert consumed == len(frame)
    assert header.channel_number == 3 and header.body_size == 1234
    assert isinstance(header.properties, UndecodableProperties)
    assert header.properties.headers is None and header.properties.raw == properties
    assert "OverflowError" in header.properties.decode_error


def test_a_frame_that_is_not_a_content_header_is_not_salvaged():
    method = struct.pack(">BHL", pika.spec.FRAME_METHOD, 1, 4) + b"\0\0\0\0" + bytes([pika.spec.FRAME_END])
    assert _salvage_header(method, ValueError("x")) is None
    assert _salvage_header(b"\x02\x00", ValueError("x")) is None  # too short to read


def test_trimming_a_dead_letter_with_a_full_frame_of_headers_is_one_pass():
    """26,000 void headers (a capture that fills a frame with them) were dropped one at a time, the whole
    table re-encoded after each: ~10 s of broker-thread time per capture, enough for a burst to starve
    heartbeats. Now each header is measured once."""
    headers = {f"h{i:05d}": None for i in range(26_000)}
    properties = pika.BasicProperties(headers=headers, content_type="x" * 200)
    started = time.perf_counter()
    trimmed = dead_letter_properties(outcome(properties), budget=4096)
    elapsed = time.perf_counter() - started
    assert encoded_size(trimmed) <= 4096
    kept = [key for key in trimmed.headers if key.startswith("h")]
    assert trimmed.headers["x-inspector-headers-dropped"] == len(headers) - len(kept)
    assert len(kept) > 100  # what fits is kept, not everything dropped
    assert elapsed < 1.0, f"trimming took {elapsed:.2f} s"
