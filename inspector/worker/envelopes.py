"""What the broker thread carries: a Delivery as the broker handed it over, the Outcome the worker answers
it with, and the AMQP properties of everything published for it.

Kept apart from the connection and its callbacks because the properties are where the broker's limits
bite: a content header must fit one frame or the broker closes the connection (FRAME_ERROR), so a dead
letter carrying a hostile capture's headers is trimmed here to a budget, and a result's message_id names
its publish so a returned result finds its own capture. Pure apart from pika's encoder: no I/O.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.data
import pika.spec

from inspector.messages import RESULT_SCHEMA, printable

FRAME_OVERHEAD = 8 + 14 + 1024  # frame header and end, content-header fields, and a margin
KEPT_RAW_PROPERTIES = 32 * 1024  # undecodable properties up to this size travel with the dead letter (base64)
UNROUTABLE_PREFIX = "unroutable."


@dataclass(frozen=True, eq=False)
class Delivery:
    """A capture as the broker handed it over, tagged with the connection it came on."""

    generation: int
    tag: int
    exchange: str
    routing_key: str
    properties: pika.BasicProperties
    body: bytes
    redelivered: bool
    received_at: float  # time.time()


@dataclass(eq=False)
class Outcome:
    """What the worker answers a delivery with: one result, and a dead letter when it failed."""

    delivery: Delivery
    routing_key: str
    result: bytes | None  # None: no result can be built; the broker dead-letters the capture (nack)
    frame_id: str
    dead_letter: tuple[str, str] | None = None  # (code, message)
    record: Any = None  # what the worker wants back in on_settled (for its metrics)
    submitted_at: float = field(default_factory=time.perf_counter)


# -- results --------------------------------------------------------------------------------------

def result_properties(outcome: Outcome, message_id: str) -> pika.BasicProperties:
    """A result's properties; `message_id` from `publish_message_id`."""
    return pika.BasicProperties(
        content_type="application/json", delivery_mode=2, correlation_id=outcome.frame_id,
        message_id=message_id, timestamp=int(time.time()), type=RESULT_SCHEMA,
    )


def publish_message_id(prefix: str, generation: int, sequence: int) -> str:
    """The message_id of a result: this process's prefix, the connection and the publish sequence number."""
    return f"{prefix}.{generation}.{sequence}"


def publish_sequence(message_id: str | None, prefix: str, generation: int) -> int:
    """The publish sequence number a returned result's message_id names, or 0 (no publish has 0)."""
    head = f"{prefix}.{generation}."
    if not message_id or not message_id.startswith(head):
        return 0
    try:
        return int(message_id[len(head):])
    except ValueError:
        return 0


def unroutable_copy(method: Any, properties: pika.BasicProperties) -> tuple[str, pika.BasicProperties]:
    """The routing key and properties under which a result no queue took is kept on the dead-letter exchange."""
    key = UNROUTABLE_PREFIX + method.routing_key
    if len(key.encode()) > 255:
        key = UNROUTABLE_PREFIX.rstrip(".")
    headers = {"x-inspector-unroutable": True, "x-inspector-original-exchange": method.exchange,
               "x-inspector-original-routing-key": method.routing_key}
    kept = pika.BasicProperties(content_type=properties.content_type, delivery_mode=2,
                                correlation_id=properties.correlation_id, timestamp=properties.timestamp,
                                type=properties.type, headers=headers)
    return key, kept


# -- dead letters ---------------------------------------------------------------------------------

def properties_budget(frame_max: int = pika.spec.FRAME_MAX_SIZE) -> int:
    """The bytes a dead letter's encoded properties may take on a connection with this frame_max."""
    return max(4096, min(frame_max, pika.spec.FRAME_MAX_SIZE) - FRAME_OVERHEAD)


def dead_letter_properties(outcome: Outcome, budget: int) -> pika.BasicProperties:
    """The capture's own properties and headers, plus why it could not be scored, within `budget` bytes
    encoded: a content header must fit one frame, or the broker closes the connection (FRAME_ERROR).
    Over budget, the largest original headers are dropped first and the count is said."""
    original = outcome.delivery.properties
    code, message = outcome.dead_letter or ("", "")
    added: dict[str, Any] = {
        "x-inspector-error-code": code,
        "x-inspector-error-message": printable(message, 1000),
        "x-inspector-frame-id": outcome.frame_id,
        "x-inspector-original-exchange": outcome.delivery.exchange,
        "x-inspector-original-routing-key": outcome.delivery.routing_key,
    }
    raw = getattr(original, "raw", None)
    if raw is not None and len(raw) <= KEPT_RAW_PROPERTIES:
        added["x-inspector-original-properties-b64"] = base64.b64encode(raw).decode("ascii")
    headers = dict(original.headers or {}) if isinstance(original.headers, dict) else {}

    def build(kept: dict[str, Any], dropped: int) -> pika.BasicProperties:
        extra = {"x-inspector-headers-dropped": dropped} if dropped else {}
        return pika.BasicProperties(
            content_type=original.content_type, content_encoding=original.content_encoding,
            headers={**kept, **added, **extra}, delivery_mode=2, priority=original.priority,
            correlation_id=original.correlation_id, message_id=original.message_id or outcome.frame_id,
            timestamp=original.timestamp, type=original.type, app_id=original.app_id,
        )

    properties = build(headers, 0)
    full = encoded_size(properties)
    if full <= budget:
        return properties
    # One pass: an AMQP table's size is the sum of its items' sizes, so each header is measured once
    # and the largest are dropped until the rest fit (re-encoding the table per drop was quadratic).
    sizes = {key: _item_size(key, value) for key, value in headers.items()}
    excess = full - budget + 64  # room for the dropped count's own header (under 40 bytes)
    dropped = 0
    for key in sorted(sizes, key=sizes.__getitem__, reverse=True):
        if excess <= 0:
            break
        excess -= sizes.pop(key)
        dropped += 1
    properties = build({key: headers[key] for key in sizes}, dropped)
    if encoded_size(properties) <= budget:
        return properties
    return build({}, len(headers))


def _item_size(key: str, value: Any) -> int:
    """What one header adds to an encoded table; a header pika cannot encode counts as too large to keep."""
    try:
        pieces: list[bytes] = []
        return pika.data.encode_short_string(pieces, key) + pika.data.encode_value(pieces, value)
    except Exception:  # noqa: BLE001 - dropped first
        return 1 << 30


def encoded_size(properties: pika.BasicProperties) -> int:
    try:
        return sum(len(piece) for piece in properties.encode())
    except Exception:  # noqa: BLE001 - a value pika cannot encode: never fits
        return 1 << 30
