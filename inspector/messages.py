"""What arrives (a Capture, parsed from an AMQP delivery) and what leaves (a result body).

Pure functions of the message: no pika objects beyond reading a BasicProperties,
no I/O, so every rule of the contract's Capture and Result sections is testable
without a broker.

Everything a capture carries is bounded and cleaned here, once, so that nothing downstream (routing
keys, correlation ids, log lines, metric labels, file names, the result's JSON) can be broken by a
hostile or broken camera:

- ids (line, camera, frame, model, meta keys): `clean_id`; every character outside letters, digits
  and `- _ . : @ + = ~` becomes `_` (so no control character, space, `/`, `*` or `#`), a leading `.`
  or `-` too (no `.`/`..` path component, no option-like name); an id over its byte budget keeps a
  readable prefix plus `~` and 8 hex digits of a hash of the whole value (the same value always
  gives the same id). Budgets: line and camera SOURCE_ID_MAX_BYTES each, so `<verdict>.<line>.<camera>`
  always fits an AMQP short string; frame FRAME_ID_MAX_BYTES; model MODEL_NAME_MAX_BYTES.
- times: held in UTC, and only from EARLIEST_TIME up to (not including) LATEST_TIME; any other
  time is absent, so formatting or comparing it can never overflow.
- meta: at most META_MAX_ITEMS entries per table or list, META_MAX_DEPTH levels of nesting,
  values cut to META_VALUE_MAX_BYTES and META_MAX_BYTES of JSON in all.
- free text (the content type; routing keys and messages in log lines): `printable`, control and
  bidirectional characters escaped, at most TEXT_MAX_BYTES.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from itertools import islice
from typing import Any, Literal, get_args

from inspector.timestamps import rfc3339

RESULT_SCHEMA = "inspection.result/1"
Verdict = Literal["pass", "fail", "error"]
VERDICTS: tuple[str, ...] = get_args(Verdict)  # the one list of verdicts; settings and metrics use it

SHORT_STRING_MAX_BYTES = 255  # AMQP short string: routing key, correlation_id, message_id
# `<verdict>.<line>.<camera>` with the longest verdict and both dots fits a short string.
SOURCE_ID_MAX_BYTES = (SHORT_STRING_MAX_BYTES - max(map(len, VERDICTS)) - 2) // 2
FRAME_ID_MAX_BYTES = 200  # a short string, and `<frame id>.<ext>` stays a legal file name (NAME_MAX 255)
MODEL_NAME_MAX_BYTES = 64  # the longest model name the configuration accepts
ID_HASH_SEPARATOR = "~"
ID_HASH_HEX_DIGITS = 8
ID_REPLACEMENT = "_"
_ID_UNSAFE = re.compile(r"[^\w.:@+=~-]")  # \w: letters and digits (str.isalnum) and "_"
_ID_UNSAFE_FIRST = (".", "-")

EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=timezone.utc)  # AMQP timestamps start here
LATEST_TIME = datetime(9999, 1, 1, tzinfo=timezone.utc)  # exclusive: a year of room before datetime.max
CAPTURED_AT_MAX_CHARS = 64  # far longer than any RFC 3339 time

TEXT_MAX_BYTES = 1000  # free text from a capture in a log line or an error message

META_MAX_ITEMS = 64  # entries per table or list, meta's own included
META_MAX_DEPTH = 4  # tables or lists nested inside meta; deeper ones become TRUNCATED
META_KEY_MAX_BYTES = 64
META_VALUE_MAX_BYTES = 1024  # UTF-8 bytes of one string, TRUNCATED included
META_MAX_BYTES = 8192  # meta as the result's JSON (compact, ASCII)
TRUNCATED = "…"

# Headers the worker reads; every other header travels to the result as `meta`.
_READ_HEADERS = frozenset({"camera_id", "line_id", "model", "captured_at", "width", "height", "pixel_format"})
# Headers RabbitMQ itself adds (quorum queues count deliveries, dead-lettering records deaths).
_BROKER_HEADERS = frozenset({"x-delivery-count", "x-death", "x-first-death-exchange", "x-first-death-queue",
                             "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue",
                             "x-last-death-reason", "x-received-from", "x-shovelled",
                             "x-shovelled-timestamp"})
_ROUTING_UNSAFE = re.compile(r"[.*#\s]")
# C0, DEL, C1, line and paragraph separators, bidirectional controls, lone surrogates.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # the result's encoding: compact, ASCII


@dataclass(frozen=True)
class Capture:
    """One frame as it arrived: who sent it, when, which model it asks for, and its bytes.

    Built by `parse_capture`, every field but `headers` and `body` (the decoder's input) is bounded
    and clean: see the module's docstring.
    """

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


def parse_capture(routing_key: str | bytes, properties: Any, body: bytes, redelivered: bool) -> Capture:
    """A Capture from a delivery's routing key, properties and body. Never raises: a camera's odd
    header is read as well as it can be, and the decoding step judges the body.

    pika gives bytes for a routing key or string that is not UTF-8; both are read."""
    raw_headers = getattr(properties, "headers", None)
    headers = dict(raw_headers) if isinstance(raw_headers, Mapping) else {}
    key = _raw_text(routing_key)
    parts = key.split(".")
    line = clean_id(headers.get("line_id"), SOURCE_ID_MAX_BYTES) or clean_id(parts[0], SOURCE_ID_MAX_BYTES)
    camera = clean_id(headers.get("camera_id"), SOURCE_ID_MAX_BYTES) or (
        clean_id(parts[1], SOURCE_ID_MAX_BYTES) if len(parts) > 1 else "")
    captured_at = _parse_time(headers.get("captured_at")) or _amqp_time(getattr(properties, "timestamp", None))
    frame_id = (clean_id(getattr(properties, "message_id", None), FRAME_ID_MAX_BYTES, distinct=True)
                or frame_id_for(body, routing_key, properties))
    return Capture(
        frame_id=frame_id,
        line_id=line or "unknown",
        camera_id=camera or "unknown",
        model=clean_id(headers.get("model"), MODEL_NAME_MAX_BYTES, distinct=True) or None,
        routing_key=_cut_utf8(_readable(routing_key), SHORT_STRING_MAX_BYTES),
        content_type=printable(_readable(getattr(properties, "content_type", None)).strip(),
                               SHORT_STRING_MAX_BYTES) or None,
        headers=headers,
        body=body,
        captured_at=captured_at,
        redelivered=bool(redelivered),
        meta=_meta(headers),
    )


def clean_id(value: Any, max_bytes: int, *, distinct: bool = False) -> str:
    """`value` (text, or bytes as pika gives them) as an id that is safe in routing keys, log lines,
    terminals, metric labels and file names, at most `max_bytes` of UTF-8; "" for no text.

    Characters outside letters, digits and `- _ . : @ + = ~` become `_`, and so does a leading `.` or
    `-`. An id over `max_bytes`, or with `distinct` one that cleaning changed (two frames must not
    share an id), keeps a prefix and ends with `~` plus a hash of the whole value: stable, so a
    redelivery carries the same id. A clean id within budget comes back unchanged."""
    text = _raw_text(value).strip()
    if not text:
        return ""
    cleaned = _ID_UNSAFE.sub(ID_REPLACEMENT, text[: max_bytes + 1])  # past max_bytes only the prefix is kept
    if cleaned.startswith(_ID_UNSAFE_FIRST):
        cleaned = ID_REPLACEMENT + cleaned[1:]
    fits = len(text) <= max_bytes and len(cleaned.encode()) <= max_bytes
    if fits and (cleaned == text or not distinct):
        return cleaned
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=ID_HASH_HEX_DIGITS // 2)
    suffix = ID_HASH_SEPARATOR + digest.hexdigest()
    return _cut_utf8(cleaned, max_bytes - len(suffix)) + suffix


def printable(value: Any, max_bytes: int = TEXT_MAX_BYTES) -> str:
    """Free text from a capture (a routing key, a content type, a message quoting either) safe in a log
    line or a terminal: control, line-separator and bidirectional characters and lone surrogates
    become escapes such as `\\n` or `\\x1b`; cut to `max_bytes` of UTF-8, ending with TRUNCATED when cut."""
    text = _readable(value)
    head = _UNPRINTABLE.sub(_escape, text[:max_bytes])  # escapes only lengthen: past max_bytes nothing shows
    data = head.encode()
    if len(text) <= max_bytes and len(data) <= max_bytes:
        return head
    return data[: max_bytes - len(TRUNCATED.encode())].decode("utf-8", "ignore") + TRUNCATED


def frame_id_for(body: bytes, routing_key: Any = None, properties: Any = None) -> str:
    """A frame id for a capture that carries none, a hash of the message itself, so that a redelivery
    of the same capture carries the same id. `parse_capture` passes all three; a delivery whose
    properties could not be read has its body."""
    digest = hashlib.blake2b(digest_size=10)
    headers = getattr(properties, "headers", None)
    captured_at = headers.get("captured_at") if isinstance(headers, Mapping) else None
    for part in (routing_key, getattr(properties, "timestamp", None), captured_at, len(body)):
        digest.update(repr(_flat(part)).encode("utf-8", "surrogatepass"))
    digest.update(body)
    return "gen-" + digest.hexdigest()


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
    evidence: dict[str, Any] | None = None,
    regions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The contract's Result body. `error` is (code, message) and only goes with verdict 'error'.
    `evidence` (where the frame is kept) appears only when given: a worker that keeps nothing sends
    the same fields as ever; so does `regions` (where the defect is: a failing frame's, when its model
    publishes them)."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    if (verdict == "error") != (error is not None):
        raise ValueError("an error result needs an error, and only an error result has one")
    body = {
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
    if evidence is not None:
        body["evidence"] = evidence
    if regions is not None:
        body["regions"] = regions
    return body


def result_routing_key(verdict: str, line_id: str, camera_id: str) -> str:
    """`<verdict>.<line>.<camera>`; dots and wildcards inside an id would split it, so they become '_'.
    The ids are held to SOURCE_ID_MAX_BYTES again (a no-op for a parsed Capture's), so the key always
    fits an AMQP short string."""
    line, camera = (_ROUTING_UNSAFE.sub("_", clean_id(i, SOURCE_ID_MAX_BYTES)) for i in (line_id, camera_id))
    return f"{verdict}.{line}.{camera}"


def encode(body: dict[str, Any]) -> bytes:
    return _JSON.encode(body).encode()


def _raw_text(value: Any) -> str:
    """Text, with bytes that are not UTF-8 kept apart (surrogate escapes) so that ids hashed from
    them stay distinct; cleaning replaces those escapes."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "surrogateescape")
    return value if isinstance(value, str) else ""


def _readable(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return value if isinstance(value, str) else ""


def _escape(match: re.Match[str]) -> str:
    return repr(match.group())[1:-1]


def _cut_utf8(text: str, max_bytes: int) -> str:
    """At most `max_bytes` of UTF-8, cut on a character boundary (a lone surrogate becomes '?')."""
    return text.encode("utf-8", "replace")[:max_bytes].decode("utf-8", "ignore")


def _utc(moment: datetime) -> datetime | None:
    """`moment` in UTC (a naive one is UTC already) when it lies in [EARLIEST_TIME, LATEST_TIME)."""
    try:
        utc = (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
    except (OverflowError, ValueError):
        return None
    return utc if EARLIEST_TIME <= utc < LATEST_TIME else None


def _parse_time(value: Any) -> datetime | None:
    """A `captured_at` header, RFC 3339 (or an AMQP timestamp); None when absent, unreadable or out of
    range (the AMQP timestamp then serves)."""
    if isinstance(value, datetime):
        return _utc(value)
    text = _readable(value).strip()
    if not text or len(text) > CAPTURED_AT_MAX_CHARS:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        return None
    return _utc(moment)


_LATEST_SECOND = int(LATEST_TIME.timestamp())


def _amqp_time(value: Any) -> datetime | None:
    """The AMQP `timestamp` property (whole seconds); 0, as many clients send for none, is absent."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < _LATEST_SECOND:
        return None
    return datetime.fromtimestamp(value, timezone.utc)


def _flat(value: Any) -> Any:
    """A value whose repr is cheap and cannot fail: a nested table or a huge int stands as its type."""
    if value is None or isinstance(value, str | bytes | float | datetime | Decimal):
        return value
    if isinstance(value, int) and value.bit_length() <= 64:
        return value
    return type(value).__name__


# -- meta ------------------------------------------------------------------------------------


def _meta(headers: Mapping[Any, Any]) -> dict[str, Any]:
    """The headers the worker does not read, nor RabbitMQ added, as bounded JSON data. Entries are
    taken in order while they fit; the first that does not fit ends the table."""
    meta: dict[str, Any] = {}
    used = 2  # the braces
    for raw_key, raw_value in islice(headers.items(), META_MAX_ITEMS + len(_READ_HEADERS) + len(_BROKER_HEADERS)):
        name = _raw_text(raw_key)
        if name in _READ_HEADERS or name in _BROKER_HEADERS:
            continue
        cost = _add(meta, clean_id(name, META_KEY_MAX_BYTES), raw_value, 1, META_MAX_BYTES - used)
        if cost is None:
            break
        used += cost
        if len(meta) >= META_MAX_ITEMS:
            break
    return meta


def _add(table: dict[str, Any], key: str, raw: Any, depth: int, room: int) -> int | None:
    """Put `raw` under `key` if it fits in `room` bytes: the bytes it added to the table's JSON, or None.
    An empty or repeated key adds nothing."""
    if not key or key in table:
        return 0
    overhead = _size(key) + 1 + (1 if table else 0)  # "key": and the comma before it
    value = _meta_value(raw, depth, room - overhead)
    if value is None:
        return None
    table[key] = value[0]
    return overhead + value[1]


def _meta_value(raw: Any, depth: int, room: int) -> tuple[Any, int] | None:
    """(JSON data, its encoded size) for a header value, within `room` bytes; None when it cannot fit."""
    if not isinstance(raw, Mapping | list | tuple):
        return _fitting(_scalar(raw), room)
    if depth > META_MAX_DEPTH:
        return _fitting(TRUNCATED, room)
    if room < 2:
        return None
    used = 2  # the brackets
    if isinstance(raw, Mapping):
        table: dict[str, Any] = {}
        for key, item in islice(raw.items(), META_MAX_ITEMS):
            cost = _add(table, clean_id(key, META_KEY_MAX_BYTES), item, depth + 1, room - used)
            if cost is None:
                break
            used += cost
        return table, used
    items: list[Any] = []
    for item in islice(raw, META_MAX_ITEMS):
        comma = 1 if items else 0
        value = _meta_value(item, depth + 1, room - used - comma)
        if value is None:
            break
        items.append(value[0])
        used += comma + value[1]
    return items, used


def _size(value: Any) -> int:
    """Bytes of `value` in the result's JSON (`encode`: compact, ASCII)."""
    return len(_JSON.encode(value))


def _fitting(value: Any, room: int) -> tuple[Any, int] | None:
    size = _size(value)
    return (value, size) if size <= room else None


def _scalar(value: Any) -> Any:
    """An AMQP field value (pika gives bytes, Decimal and datetime too) as a JSON scalar."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= 64 else TRUNCATED  # AMQP integers have at most 64 bits
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no NaN or infinity
    if isinstance(value, Decimal):
        number = float(value) if value.is_finite() else math.nan
        return number if math.isfinite(number) else _cut_value(str(value))
    if isinstance(value, datetime):
        moment = _utc(value)
        return rfc3339(moment) if moment else value.isoformat()
    if isinstance(value, bytes | bytearray):
        return _cut_value(bytes(value[: META_VALUE_MAX_BYTES + 4]).decode("utf-8", "replace"))
    return _cut_value(value if isinstance(value, str) else str(value))


def _cut_value(text: str) -> str:
    """At most META_VALUE_MAX_BYTES of UTF-8; a longer text ends with TRUNCATED."""
    data = text[: META_VALUE_MAX_BYTES + 1].encode("utf-8", "replace")
    if len(data) <= META_VALUE_MAX_BYTES and len(text) <= META_VALUE_MAX_BYTES:
        return data.decode()
    return data[: META_VALUE_MAX_BYTES - len(TRUNCATED.encode())].decode("utf-8", "ignore") + TRUNCATED
