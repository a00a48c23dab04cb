"""`inspector watch`: print verdicts from the results exchange as they come.

A temporary tap: its own server-named queue (exclusive, auto-delete) bound with
the --filter keys and consumed with auto-ack, so it takes nothing from the
downstream consumers' queues and leaves nothing behind. One line per result for a
person, or each body as it came (--json) for jq and scripts. A body that is not a
result is a warning, never a crash: a tap must keep tapping.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

import pika
import pika.exceptions

from inspector.broker import blocking_connection, close_quietly
from inspector.config import Settings
from inspector.errors import BrokerError, ConfigError
from inspector.messages import VERDICTS, printable
from inspector.topics import check_pattern

COLOURS = {"pass": "\033[32m", "fail": "\033[31m", "error": "\033[33m"}
RESET = "\033[0m"


@dataclass(frozen=True)
class WatchOptions:
    filters: Sequence[str] = ("#",)
    json: bool = False
    count: int | None = None  # stop after this many results
    timeout: float | None = None  # stop after this many seconds without a message


@dataclass
class Tally:
    """Results seen, by verdict, and bodies that were not results."""

    verdicts: Counter = field(default_factory=Counter)
    malformed: int = 0

    @property
    def results(self) -> int:
        return sum(self.verdicts.values())

    def line(self) -> str:
        counts = ", ".join(f"{verdict} {self.verdicts[verdict]}" for verdict in VERDICTS)
        extra = f", malformed {self.malformed}" if self.malformed else ""
        return f"watched {self.results} results: {counts}{extra}"


SHOWN_MAX_BYTES = 256  # a field of a watched result, as printed


def check_filter(pattern: str) -> str:
    """A topic binding key on `<verdict>.<line>.<camera>`."""
    try:
        return check_pattern(pattern)
    except ValueError as exc:
        raise ConfigError(f"--filter {pattern!r}: {exc}, on <verdict>.<line>.<camera> "
                          "(e.g. 'fail.#' or '*.line1.*')") from None


def parse_result(body: bytes) -> dict[str, Any]:
    """The result body as a dict; ValueError saying why when it is not one."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON ({printable(str(exc), 200)})") from None
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")  # noqa: TRY004 - bad data from the wire, as for bad JSON
    if document.get("verdict") not in VERDICTS:
        raise ValueError(f"verdict {printable(repr(document.get('verdict')), 100)} is none of {', '.join(VERDICTS)}")
    return document


def format_line(result: dict[str, Any], colour: bool = False) -> str:
    """time, line, camera, verdict, probability (or error code), model version, frame id [, source]
    [, the regions' count and the largest box].

    Anyone may publish to the results exchange, so every field printed is made printable first: no
    escape sequence reaches the terminal and no newline forges a line."""
    verdict = result["verdict"]
    if verdict == "error":
        error = result.get("error")
        figure = _shown(error.get("code", "error")) if isinstance(error, dict) else "error"
    else:
        probability = result.get("anomaly_probability")
        figure = f"{probability:.3f}" if isinstance(probability, (int, float)) else "-"
    model = result.get("model")
    version = model.get("version") if isinstance(model, dict) else None
    word = f"{COLOURS[verdict]}{verdict}{RESET}{' ' * (5 - len(verdict))}" if colour else f"{verdict:<5}"
    fields = [
        _local_time(result.get("inspected_at")),
        f"{_shown(result.get('line_id', '-')):<8}",
        f"{_shown(result.get('camera_id', '-')):<8}",
        word,
        f"{figure:>5}",
        f"{_shown(version or '-'):<22}",
        _shown(result.get("frame_id", "-")),
    ]
    meta = result.get("meta")
    if isinstance(meta, dict) and meta.get("source") is not None:
        fields.append(_shown(meta["source"]))
    located = regions_field(result.get("regions"))
    if located:
        fields.append(located)
    return " ".join(fields)


def regions_field(regions: Any) -> str | None:
    """`2 regions, largest 60x30 at 100,50`: the count and the first (largest) box of a result's regions;
    None when there are none to show. Only whole numbers are printed, whatever the message holds."""
    if not isinstance(regions, list):
        return None
    if not regions:
        return "0 regions"
    first = regions[0] if isinstance(regions[0], dict) else {}
    box = first.get("box")
    count = f"{len(regions)} region{'s' if len(regions) != 1 else ''}"
    if not (isinstance(box, list) and len(box) == 4 and all(type(v) is int for v in box)):
        return count
    x, y, width, height = box
    return f"{count}, largest {width}x{height} at {x},{y}"


def _shown(value: Any) -> str:
    return printable(value if isinstance(value, str) else str(value), SHOWN_MAX_BYTES)


def _local_time(stamp: Any) -> str:
    """HH:MM:SS.mmm in local time of the result's inspected_at (the time it arrives when it has none)."""
    try:
        moment = datetime.fromisoformat(str(stamp)).astimezone()
    except (ValueError, OverflowError, OSError):
        moment = datetime.now()
    return f"{moment:%H:%M:%S}.{moment.microsecond // 1000:03d}"


def use_colour(stream: TextIO) -> bool:
    """Colour only for a person at a terminal who has not asked for none (https://no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def watch(settings: Settings, options: WatchOptions, tally: Tally | None = None, out: TextIO | None = None,
          err: TextIO | None = None) -> Tally:
    """Print results until --count, --timeout, a closed pipe, or KeyboardInterrupt (which propagates,
    with `tally` filled in so far)."""
    out, err = out or sys.stdout, err or sys.stderr
    tally = tally if tally is not None else Tally()
    filters = [check_filter(pattern) for pattern in options.filters or ("#",)]
    if options.count is not None and options.count < 1:
        raise ConfigError(f"--count {options.count}: must be 1 or more")
    if options.timeout is not None and options.timeout <= 0:
        raise ConfigError(f"--timeout {options.timeout:g}: must be more than 0 seconds")
    exchange = settings.broker.exchanges.results
    colour = not options.json and use_colour(out)
    connection = blocking_connection(settings.broker)
    try:
        channel = connection.channel()
        channel.exchange_declare(exchange, exchange_type="topic", durable=True)  # as the worker declares it
        queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        for pattern in filters:
            channel.queue_bind(queue, exchange, routing_key=pattern)
        print(f"watching {exchange} {' '.join(filters)}", file=err, flush=True)
        for method, _properties, body in channel.consume(queue, auto_ack=True, inactivity_timeout=options.timeout):
            if method is None:  # --timeout seconds without a message
                break
            try:
                result = parse_result(body)
            except ValueError as exc:
                tally.malformed += 1
                print(f"inspector watch: warning: malformed result on {method.routing_key}: {exc}: {body[:120]!r}",
                      file=err, flush=True)
                continue
            tally.verdicts[result["verdict"]] += 1
            line = _json_line(body, result) if options.json else format_line(result, colour)
            print(line, file=out, flush=True)
            if options.count is not None and tally.results >= options.count:
                break
    except BrokenPipeError:  # `inspector watch | head`: the reader has gone, so has the point of watching
        _silence(out)
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise BrokerError(f"watching {exchange} at {settings.broker.shown} failed ({tally.line()}): "
                          f"{exc!r}") from exc
    finally:
        close_quietly(connection)
    return tally


def _json_line(body: bytes, result: dict[str, Any]) -> str:
    """The body exactly as published; re-encoded only when it spans lines (one result, one line)."""
    text = body.decode("utf-8")
    if "\n" in text or "\r" in text:
        return json.dumps(result, separators=(",", ":"))
    return text


def _silence(out: TextIO) -> None:
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    except (OSError, ValueError, AttributeError):
        pass
