"""What the OPC UA bridge knows: a result read from the wire, and the latest state of each line and camera.

Pure and synchronous, so every rule (what a result may carry, the cap on sources, the reject pulse) is
tested without a broker or a server. A result is bounded and cleaned once, here, where it is parsed:
ids as the worker cleans them, numbers finite and in range, times within the years a result can name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from inspector.messages import (
    FRAME_ID_MAX_BYTES,
    MODEL_NAME_MAX_BYTES,
    RESULT_SCHEMA,
    SOURCE_ID_MAX_BYTES,
    VERDICTS,
    clean_id,
    printable,
)

RESULT_MAX_BYTES = 64 * 1024  # a result is a few KiB at most (meta is held to 8 KiB); more is not one
TIME_MAX_CHARS = 64
VERSION_MAX_BYTES = 64
ERROR_CODE_MAX_BYTES = 64
OTHER = "other"  # the line and camera of every source past the cap
EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)
LATEST = datetime(9999, 1, 1, tzinfo=timezone.utc)

Source = tuple[str, str]  # (line, camera)


@dataclass(frozen=True)
class Result:
    """The fields of a result that a line's controller acts on, each bounded and clean."""

    line: str
    camera: str
    verdict: str
    probability: float | None
    frame_id: str
    model: str
    version: str
    inspected_at: datetime | None
    captured_at: datetime | None
    error_code: str


def parse_result(body: bytes) -> Result:
    """A Result from a message body; ValueError saying why when the body is not a result."""
    if len(body) > RESULT_MAX_BYTES:
        raise ValueError(f"{len(body)} bytes, over the {RESULT_MAX_BYTES} a result can take")
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON ({printable(str(exc), 200)})") from None
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")  # noqa: TRY004 - bad data from the wire
    if document.get("schema") != RESULT_SCHEMA:
        raise ValueError(f"schema {printable(repr(document.get('schema')), 100)} is not {RESULT_SCHEMA}")
    verdict = document.get("verdict")
    if verdict not in VERDICTS:
        raise ValueError(f"verdict {printable(repr(verdict), 100)} is none of {', '.join(VERDICTS)}")
    line = clean_id(document.get("line_id"), SOURCE_ID_MAX_BYTES)
    camera = clean_id(document.get("camera_id"), SOURCE_ID_MAX_BYTES)
    if not line or not camera:
        raise ValueError("no line_id or camera_id")
    model = document.get("model") if isinstance(document.get("model"), dict) else {}
    error = document.get("error") if isinstance(document.get("error"), dict) else {}
    return Result(
        line=line,
        camera=camera,
        verdict=verdict,
        probability=_probability(document.get("anomaly_probability")),
        frame_id=clean_id(document.get("frame_id"), FRAME_ID_MAX_BYTES),
        model=clean_id(model.get("name"), MODEL_NAME_MAX_BYTES),
        version=clean_id(model.get("version"), VERSION_MAX_BYTES),
        inspected_at=_time(document.get("inspected_at")),
        captured_at=_time(document.get("captured_at")),
        error_code=clean_id(error.get("code"), ERROR_CODE_MAX_BYTES) if verdict == "error" else "",
    )


def _probability(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and 0.0 <= number <= 1.0 else None


def _time(value: object) -> datetime | None:
    """An RFC 3339 time with its offset, in UTC; None when absent, unreadable or out of range."""
    if not isinstance(value, str) or len(value) > TIME_MAX_CHARS:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    try:
        moment = moment.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        return None
    return moment if EARLIEST <= moment < LATEST else None


@dataclass
class SourceState:
    """The latest result of one line and camera, its counters by verdict, and its reject pulse."""

    result: Result | None = None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))
    reject_until: float = 0.0  # monotonic seconds; Reject is true before it
    rejecting: bool = False


class Board:
    """Every source's state, at most `max_sources` of them besides the `reserved` ones (those named in the
    configuration) and `other`, where every later source is counted: memory does not grow with what
    the results name."""

    def __init__(self, max_sources: int, reserved: Iterable[Source], pulse_s: float) -> None:
        self.max_sources = max_sources
        self.reserved = frozenset(reserved)
        self.pulse_s = pulse_s
        self.sources: dict[Source, SourceState] = {key: SourceState() for key in self.reserved}
        self.over_cap = 0  # results counted under `other` because the cap was reached
        self._taken = 0  # sources not reserved, `other` left out

    def apply(self, result: Result, now: float) -> tuple[Source, SourceState, bool]:
        """Record `result` at monotonic time `now`: (its source, the source's state, whether the source is new).

        A fail starts (or extends) the reject pulse: Reject is true until `now + pulse_s`."""
        key = (result.line, result.camera)
        new = key not in self.sources
        if new and key not in self.reserved and self._taken >= self.max_sources:
            key = (OTHER, OTHER)
            new = key not in self.sources
            self.over_cap += 1
        elif new:
            self._taken += 1
        state = self.sources.setdefault(key, SourceState())
        state.result = result
        state.counts[result.verdict] += 1
        if result.verdict == "fail":
            state.reject_until = now + self.pulse_s
            state.rejecting = True
        return key, state, new

    def expire(self, now: float) -> list[Source]:
        """The sources whose reject pulse has ended by `now`, each reported once."""
        ended = [key for key, state in self.sources.items() if state.rejecting and now >= state.reject_until]
        for key in ended:
            self.sources[key].rejecting = False
        return ended

    def next_expiry(self) -> float | None:
        """The earliest time a running pulse ends, or None when none runs."""
        return min((s.reject_until for s in self.sources.values() if s.rejecting), default=None)
