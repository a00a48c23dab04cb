"""log_format = "json": every line a real `inspector run` or `inspector config` writes to stderr is one
JSON object a log pipeline reads, with the frame and model a line is about as fields of their own."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from inspector import logs

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("time", "level", "logger", "message")


def inspector(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("INSPECTOR_")}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "inspector.cli", *args], cwd=cwd or ROOT, env=environ,
                          capture_output=True, text=True, timeout=300)


def json_lines(text: str) -> list[dict]:
    """Every line of `text` parsed as one JSON object; fails naming the first line that is not one."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"stderr line {number} is not JSON: {line!r}\n--- all of stderr ---\n{text}")
        assert isinstance(entry, dict), line
        assert all(isinstance(entry.get(key), str) for key in FIELDS), line
        entries.append(entry)
    return entries


class WorkerProcess:
    """A real `inspector run` in a subprocess, with its stderr read line by line as it comes."""

    def __init__(self, config: Path, env: dict[str, str]) -> None:
        environ = {k: v for k, v in os.environ.items()
                   if not k.upper().startswith("INSPECTOR_") and k != "NOTIFY_SOCKET"}
        environ.update(env)
        self.process = subprocess.Popen([sys.executable, "-m", "inspector.cli", "run", "--config", str(config)],
                                        cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, found: Callable[[str], bool], timeout: float = 120.0) -> str:
        """The first stderr line `found` accepts; fails with all of stderr when none comes in time."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                match = next((line for line in self.lines if found(line)), None)
                if match is not None:
                    return match
                if self.process.poll() is not None and not self._reader.is_alive():
                    pytest.fail(f"the worker exited {self.process.returncode}:\n" + "\n".join(self.lines))
                if time.monotonic() > deadline:
                    pytest.fail("the line waited for never came:\n" + "\n".join(self.lines))
                self._changed.wait(0.5)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit status (killed, and failed, past `timeout`)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"the worker did not exit within {timeout} s of SIGTERM:\n" + "\n".join(self.lines))
        self._reader.join(10)
        return status

    @property
    def stderr(self) -> str:
        with self._changed:
            return "\n".join(self.lines)


# -- the formatter ------------------------------------------------------------------------------


def _record(message: str, *args: object, exc_info=None, **extra: object) -> logging.LogRecord:
    record = logging.getLogger("inspector.worker.loop").makeRecord(
        "inspector.worker.loop", logging.WARNING, "loop.py", 1, message, args, exc_info, extra=extra or None)
    record.created = 1795860901.5  # 2026-11-28T10:15:01.500Z
    return record


def test_a_record_is_one_json_line_with_the_contract_fields_and_its_context():
    line = logs.JsonFormatter().format(_record("frame %s from %s.%s:\n%s", "f-1", "line1", "cam1", "two\nlines",
                                               frame_id="f-1", line="line1", camera="cam1", model="default",
                                               version="20261128T101500Z-3f9c2a"))
    assert "\n" not in line
    assert json.loads(line) == {
        "time": "2026-11-28T10:15:01.500Z", "level": "WARNING", "logger": "inspector.worker.loop",
        "message": "frame f-1 from line1.cam1:\ntwo\nlines", "frame_id": "f-1", "line": "line1", "camera": "cam1",
        "model": "default", "version": "20261128T101500Z-3f9c2a",
    }


def test_an_exception_is_a_field_with_its_traceback_and_odd_values_are_text():
    try:
        raise RuntimeError("the plugin broke")
    except RuntimeError:
        record = _record("scoring failed", exc_info=sys.exc_info(), model=Path("/srv/m"), version=b"\xff")
    entry = json.loads(logs.JsonFormatter().format(record))
    assert entry["exception"].startswith("Traceback (most recent call last):")
    assert entry["exception"].rstrip().endswith("RuntimeError: the plugin broke")
    assert entry["model"] == "/srv/m" and entry["version"] == str(b"\xff")


def test_any_text_and_any_number_make_valid_json():
    line = logs.JsonFormatter().format(_record("bad bytes %s", b"\xff".decode("utf-8", "surrogateescape"),
                                               score=float("nan"), camera="kamera-Ä"))
    entry = json.loads(line)
    assert line.isascii() and entry["score"] == "nan" and entry["camera"] == "kamera-Ä"


def test_a_field_passed_with_extra_cannot_hide_a_contract_field():
    record = _record("hello")
    record.__dict__["level"] = "not a level"  # as `extra={"level": ...}` would set it
    entry = json.loads(logs.JsonFormatter().format(record))
    assert entry["level"] == "WARNING"


def test_configure_switches_the_format_and_routes_warnings_and_uncaught_exceptions(monkeypatch, capsys):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as in a real process: nobody else has installed a handler
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    level = root.level
    hooks = (sys.excepthook, threading.excepthook)
    try:
        logs.configure("text")
        logging.getLogger("inspector.test").warning("plain %s", "words")
        assert capsys.readouterr().err.rstrip().endswith("WARNING inspector.test: plain words")

        logs.configure("json", "INFO")
        assert len(root.handlers) == 1
        logging.getLogger("inspector.test").info("structured", extra={"frame_id": "f-9"})
        warnings.warn("a library complains", UserWarning, stacklevel=1)
        thread = threading.Thread(target=lambda: 1 / 0, name="inspector-score")
        thread.start()
        thread.join()
        entries = json_lines(capsys.readouterr().err)
        assert entries[0]["message"] == "structured" and entries[0]["frame_id"] == "f-9"
        assert entries[1]["logger"] == "py.warnings" and "a library complains" in entries[1]["message"]
        assert entries[2]["level"] == "CRITICAL" and "inspector-score" in entries[2]["message"]
        assert "ZeroDivisionError" in entries[2]["exception"]
        logs.configure("text")
        assert (sys.excepthook, threading.excepthook) == hooks, "back to text: the earlier hooks are back"
    finally:
        logs.configure("text", level)
        logging.captureWarnings(False)
        for handler in [h for h in root.handlers if isinstance(h, logs._Handler)]:
            root.removeHandler(handler)


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="log format 'xml'"):
        logs.configure("xml")


# -- real commands ---------------------------------------------------------------------------------


def test_inspector_config_reports_errors_as_json_when_asked_from_the_environment_or_the_file(tmp_path):
    result = inspector("config", env={"INSPECTOR_LOG_FORMAT": "json", "INSPECTOR_DEVICE": "tpu"})
    assert result.returncode == 2
    (entry,) = json_lines(result.stderr)
    assert entry["level"] == "ERROR" and "device" in entry["message"] and "INSPECTOR_DEVICE" in entry["message"]

    bad = tmp_path / "bad.toml"
    bad.write_text('log_format = "json"\ndevise = "cpu"\n')
    result = inspector("config", "--config", str(bad))
    assert result.returncode == 2
    (entry,) = json_lines(result.stderr)
    assert "devise: unknown key" in entry["message"]

    result = inspector("config", "--config", str(tmp_path / "absent.toml"), env={"INSPECTOR_LOG_FORMAT": "JSON"})
    assert result.returncode == 2 and "does not exist" in json_lines(result.stderr)[0]["message"]


def test_inspector_config_in_json_mode_keeps_stdout_for_the_settings(tmp_path):
    result = inspector("config", env={"INSPECTOR_LOG_FORMAT": "json"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    json_lines(result.stderr)
    assert json.loads(result.stdout)["log_format"] == "json"


def test_a_real_worker_writes_only_json_lines_with_frame_and_model_fields(fitted, tmp_path, prefix, line):
    from tests.workerkit import SIZE, encoded, worker_config

    config = worker_config(tmp_path, fitted, prefix)
    config.write_text('log_format = "json"\n' + config.read_text())  # a top-level key: before any table
    worker = WorkerProcess(config, {})
    try:
        worker.wait_for(lambda text: "ready: queue" in text)
        rng = np.random.default_rng(0)
        good = encoded(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8), "PNG")
        line.publish([
            ("line1.cam1", good, {"message_id": "good-1", "content_type": "image/png"}),
            ("line2.cam7", b"", {"message_id": "empty-1", "content_type": "image/png"}),
        ])
        results = line.collect(2, timeout=60)
        assert len(results) == 2, worker.stderr
        worker.wait_for(lambda text: "empty-1" in text)
    finally:
        status = worker.stop()
    assert status == 0, worker.stderr
    entries = json_lines(worker.stderr)

    loaded = [e for e in entries if e.get("model") == "default" and "version" in e]
    assert loaded, "no line about the model in service carries model and version"
    (frame,) = [e for e in entries if e.get("frame_id") == "empty-1"]
    assert frame["level"] == "WARNING" and frame["line"] == "line2" and frame["camera"] == "cam7"
    assert frame["error_code"] == "empty_body" and frame["model"] == "default"
    messages = [e["message"] for e in entries]
    assert any("ready: queue" in m for m in messages) and any(m == "stopped" for m in messages)
