"""What arrives (a Capture, parsed from an AMQP delivery) and what leaves (a result body).

Pure functions of the message: no pika objects beyond reading a BasicProperties,
no I/O, so every rule of the contract's Capture and Result sections is testable
without a broker.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from inspector.timestamps import rfc3339

RESULT_SCHEMA = "inspection.result/1"
VERDICTS = ("pass", "fail", "error")

# Headers the worker reads; every other header travels to the result as `meta`.
_READ_HEADERS = frozenset({"camera_id", "line_id", "model", "captured_at", "width", "height", "pixel_format"})
# Headers RabbitMQ itself adds (quorum queues count deliveries, dead-lettering records deaths).
_BROKER_HEADERS = frozenset({"x-delivery-count", "x-death", "x-first-death-exchange", "x-first-death-queue",
                             "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue",
                             "x-last-death-reason"})
_ROUTING_UNSAFE = re.compile(r"[.*#\s]")


@dataclass(frozen=True)
class Capture:
    """One frame as it arrived: who sent it, when, which model it asks for, and its bytes."""

    frame_id: str
    line_id: str
    camera_id: str
    model: str | None
    routing_key: str
    content_type: str | None
    headers: dict[str, Any]
    body: bytes
    captured_at: datetime | None
    redelivered: bool
    meta: dict[str, Any] = field(default_factory=dict)


def parse_capture(routing_key: str, properties: Any, body: bytes, redelivered: bool) -> Capture:
    """A Capture from a delivery's routing key, properties and body. Never raises: a camera's odd
    header is read as well as it can be, and the decoding step judges the body."""
    headers = dict(getattr(properties, "headers", None) or {})
    parts = routing_key.split(".")
    line = _text(headers.get("line_id")) or parts[0] or "unknown"
    camera = _text(headers.get("camera_id")) or (parts[1] if len(parts) > 1 and parts[1] else "unknown")
    captured_at = _parse_time(headers.get("captured_at")) or _amqp_time(getattr(properties, "timestamp", None))
    frame_id = _text(getattr(properties, "message_id", None)) or _generated_id(routing_key, properties, body)
    return Capture(
        frame_id=frame_id,
        line_id=line,
        camera_id=camera,
        model=_text(headers.get("model")) or None,
        routing_key=routing_key,
        content_type=_text(getattr(properties, "content_type", None)) or None,
        headers=headers,
        body=body,
        captured_at=captured_at,
        redelivered=bool(redelivered),
        meta={str(k): _json_value(v) for k, v in headers.items() if k not in _READ_HEADERS and k not in _BROKER_HEADERS},
    )


def result_body(
    capture: Capture,
    *,
    verdict: str,
    probability: float | None = None,
    score: float | None = None,
    threshold: float | None = None,
    model: dict[str, str] | None = None,
    error: tuple[str, str] | None = None,
    inspected_at: str,
) -> dict[str, Any]:
    """The contract's Result body. `error` is (code, message) and only goes with verdict 'error'."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    if (verdict == "error") != (error is not None):
        raise ValueError("an error result needs an error, and only an error result has one")
    return {
        "schema": RESULT_SCHEMA,
        "frame_id": capture.frame_id,
        "line_id": capture.line_id,
        "camera_id": capture.camera_id,
        "verdict": verdict,
        "anomaly_probability": None if error else probability,
        "anomaly_score": None if error else score,
        "threshold": threshold,
        "model": model,
        "captured_at": rfc3339(capture.captured_at) if capture.captured_at else None,
        "inspected_at": inspected_at,
        "redelivered": capture.redelivered,
        "error": {"code": error[0], "message": error[1]} if error else None,
        "meta": capture.meta,
    }


def result_routing_key(verdict: str, line_id: str, camera_id: str) -> str:
    """`<verdict>.<line>.<camera>`; dots and wildcards inside an id would split it, so they become '_'."""
    return f"{verdict}.{_ROUTING_UNSAFE.sub('_', line_id)}.{_ROUTING_UNSAFE.sub('_', camera_id)}"


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return value.strip() if isinstance(value, str) else ""


def _parse_time(value: Any) -> datetime | None:
    """An RFC 3339 `captured_at` header; None when absent or unreadable (the AMQP timestamp then serves)."""
    text = _text(value)
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _amqp_time(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    try:
        return datetime.fromtimestamp(value, timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None


def _generated_id(routing_key: str, properties: Any, body: bytes) -> str:
    """A frame id for a camera that sends none, derived from the message itself, so that a redelivery
    of the same capture carries the same id."""
    digest = hashlib.blake2b(digest_size=10)
    headers = getattr(properties, "headers", None) or {}
    for part in (routing_key, getattr(properties, "timestamp", None), headers.get("captured_at"), len(body)):
        digest.update(repr(part).encode())
    digest.update(body)
    return "gen-" + digest.hexdigest()


def _json_value(value: Any) -> Any:
    """An AMQP header value as JSON data (pika gives bytes, Decimal, datetime and nested tables)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or infinity
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime):
        return rfc3339(value)
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return str(value)
