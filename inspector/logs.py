"""Log lines for people (`text`) or for a log pipeline (`json`: one JSON object per line).

In `json` every line a command writes to stderr is an object a pipeline (Loki, Elasticsearch,
CloudWatch, journald's JSON export) reads without a parsing rule: `time`, `level`, `logger`,
`message`, the context a call passes with `extra=` (`frame_id`, `line`, `camera`, `model`,
`version`) as fields of their own, and a traceback as the `exception` field, never as loose lines.
Python warnings and uncaught exceptions, in any thread, are routed through the same formatter.

A formatter of our own rather than python-json-logger: the fields are a fixed contract a pipeline
is written against, the time is the project's one timestamp format (`timestamps.rfc3339`, as in
every message), and it is some thirty lines.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any

from inspector.timestamps import rfc3339

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")
THROTTLE_EVERY_S = 60.0  # a failure repeated at 100 frames/s is logged once a minute, not 100 times a second

# What every LogRecord carries; anything else on a record came with `extra=` and becomes a field.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time, level, logger, message, the `extra=` fields, and the
    exception (with its traceback) as text."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": rfc3339(datetime.fromtimestamp(record.created, timezone.utc)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        try:  # ASCII only, so that no character (a lone surrogate from bad bytes) can fail on the stream
            return json.dumps(entry, default=str, allow_nan=False)
        except ValueError:  # a NaN or an infinity among the fields, which JSON has no word for
            return json.dumps({k: str(v) if isinstance(v, float) else v for k, v in entry.items()}, default=str)


class Throttle:
    """A warning at most once per `every_s` for each key, on `logger`: a failing disk or a broken metric at
    100 frames/s must not flood the log, yet say it is still failing. `exc_info`: whether warnings carry the
    traceback unless a call says otherwise. Safe from any thread."""

    def __init__(self, logger: logging.Logger, *, exc_info: bool = False, every_s: float = THROTTLE_EVERY_S) -> None:
        self.logger, self.exc_info, self.every_s = logger, exc_info, every_s
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, message: str, *args: Any, exc_info: bool | None = None) -> None:
        now = time.monotonic()
        with self._lock:
            if key in self._last and now - self._last[key] < self.every_s:
                return
            self._last[key] = now
        self.logger.warning(message, *args, exc_info=self.exc_info if exc_info is None else exc_info)


class _Handler(logging.StreamHandler):
    """The handler `configure` installs, told apart from handlers someone else installed."""


def configure(log_format: str, level: str | int = logging.INFO) -> None:
    """Write every log record to stderr in `log_format` ("text" or "json") from `level` up.

    Called once before the configuration is read (so that an error in it is reported in the format
    asked for) and again after; the second call replaces the first's handler. Like `basicConfig`, it
    adds no handler when the host application (a test runner) has installed its own.
    """
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r}: must be one of {', '.join(FORMATS)}")
    root = logging.getLogger()
    ours = [handler for handler in root.handlers if isinstance(handler, _Handler)]
    for handler in ours:
        root.removeHandler(handler)
    if not root.handlers:
        handler = _Handler(sys.stderr)
        handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
        root.addHandler(handler)
    root.setLevel(level)
    structured = log_format == "json"
    logging.captureWarnings(structured)
    _route_uncaught(structured)


_previous_hooks: tuple | None = None  # the exception hooks in place before JSON logging replaced them


def _route_uncaught(structured: bool) -> None:
    """Uncaught exceptions (main thread and others) through logging while the logs are JSON; the hooks in
    place before (Python's, or a test runner's) are put back when they are not."""
    global _previous_hooks
    if structured and _previous_hooks is None:
        _previous_hooks = (sys.excepthook, threading.excepthook)
        sys.excepthook, threading.excepthook = _log_uncaught, _log_uncaught_in_thread
    elif not structured and _previous_hooks is not None:
        sys.excepthook, threading.excepthook = _previous_hooks
        _previous_hooks = None


def _log_uncaught(kind, value, traceback) -> None:
    logging.getLogger("inspector").critical("uncaught exception", exc_info=(kind, value, traceback))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "unknown"
    logging.getLogger("inspector").critical("uncaught exception in thread %s", name,
                                            exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
