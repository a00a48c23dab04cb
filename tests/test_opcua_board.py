"""The OPC UA bridge's state without a broker or a server: what a result may carry, the cap on sources
and the reject pulse."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone

import pytest

from inspector import config
from inspector.errors import ConfigError
from inspector.messages import SOURCE_ID_MAX_BYTES, Capture, encode, result_body
from inspector.tools.opcua.board import OTHER, RESULT_MAX_BYTES, Board, parse_result


def _result(kind: str = "pass", line: str = "line1", camera: str = "cam1", frame: str = "f1", **extra) -> bytes:
    """A result body as the worker encodes it, with `extra` fields put over it."""
    capture = Capture(frame_id=frame, line_id=line, camera_id=camera, model="default", routing_key=f"{line}.{camera}",
                      content_type="image/png", headers={}, body=b"", redelivered=False,
                      captured_at=datetime(2026, 11, 28, 10, 15, 1, 120000, tzinfo=timezone.utc))
    if kind == "error":
        body = result_body(capture, verdict="error", error=("empty_body", "empty"),
                           inspected_at="2026-11-28T10:15:02.000Z")
    else:
        body = result_body(capture, verdict=kind, probability=0.9 if kind == "fail" else 0.1, score=1.0,
                           threshold=0.5, model={"name": "default", "version": "20261128T101500Z-3f9c2a"},
                           inspected_at="2026-11-28T10:15:02.000Z")
    return encode(body | extra)


def test_a_result_as_the_worker_writes_it_is_read_field_by_field():
    result = parse_result(_result("fail"))
    assert (result.line, result.camera, result.verdict, result.frame_id) == ("line1", "cam1", "fail", "f1")
    assert result.probability == 0.9 and (result.model, result.version) == ("default", "20261128T101500Z-3f9c2a")
    assert result.inspected_at == datetime(2026, 11, 28, 10, 15, 2, tzinfo=timezone.utc)
    assert result.captured_at == datetime(2026, 11, 28, 10, 15, 1, 120000, tzinfo=timezone.utc)
    assert result.error_code == ""
    error = parse_result(_result("error"))
    assert error.error_code == "empty_body" and error.probability is None and error.model == ""


@pytest.mark.parametrize("body, why", [
    (b"not json", "not JSON"), (b"[1]", "not a JSON object"), (b"\xff\xfe", "not JSON"),
    (json.dumps({"schema": "inspection.result/2", "verdict": "pass"}).encode(), "schema"),
    (_result("pass", verdict="maybe"), "verdict"), (_result("pass", line_id=""), "line_id"),
    (b" " * (RESULT_MAX_BYTES + 1), "bytes"), (b"[" * 60000, "not JSON"),
])
def test_what_is_not_a_result_is_refused_with_the_reason(body, why):
    with pytest.raises(ValueError, match=why):
        parse_result(body)


def test_every_field_is_bounded_and_cleaned():
    hostile = parse_result(_result("fail", line_id="hall 2/line#1\x1b[31m", camera_id="c" * 1000,
                                   frame_id="../../etc", anomaly_probability=7.5,
                                   inspected_at="9999-12-31T23:59:59+00:00", captured_at="yesterday",
                                   model={"name": "m/../x", "version": ["not", "text"]}))
    assert "/" not in hostile.line and "\x1b" not in hostile.line and " " not in hostile.line
    assert len(hostile.camera.encode()) <= SOURCE_ID_MAX_BYTES
    assert not hostile.frame_id.startswith(".")
    assert hostile.probability is None  # out of [0, 1]
    assert hostile.inspected_at is None and hostile.captured_at is None
    assert "/" not in hostile.model and hostile.version == ""
    assert parse_result(_result("pass", anomaly_probability=True)).probability is None
    assert parse_result(_result("pass", inspected_at="2026-11-28T10:15:02")).inspected_at is None  # no offset


def test_sources_past_the_cap_are_counted_as_other_and_reserved_ones_never_count():
    board = Board(max_sources=2, reserved=[("line9", "cam9")], pulse_s=0.5)
    keys = [board.apply(parse_result(_result("pass", line=f"line{i}")), now=0.0)[0] for i in range(4)]
    assert keys == [("line0", "cam1"), ("line1", "cam1"), (OTHER, OTHER), (OTHER, OTHER)]
    assert board.apply(parse_result(_result("pass", line="line9", camera="cam9")), 0.0)[0] == ("line9", "cam9")
    assert board.apply(parse_result(_result("fail", line="line1")), 0.0)[0] == ("line1", "cam1")
    assert set(board.sources) == {("line0", "cam1"), ("line1", "cam1"), (OTHER, OTHER), ("line9", "cam9")}
    assert board.over_cap == 2 and board.sources[(OTHER, OTHER)].counts == {"pass": 2, "fail": 0, "error": 0}
    assert board.sources[("line1", "cam1")].counts == {"pass": 1, "fail": 1, "error": 0}
    many = Board(max_sources=3, reserved=[], pulse_s=0.5)
    for i in range(5000):
        many.apply(parse_result(_result("pass", line=f"l{i}", camera=f"c{i}")), 0.0)
    assert len(many.sources) == 4  # memory does not grow with what the results name


def test_a_fail_holds_reject_for_the_pulse_and_a_later_fail_extends_it():
    board = Board(max_sources=10, reserved=[], pulse_s=0.5)
    source, state, new = board.apply(parse_result(_result("fail")), now=10.0)
    assert new and state.rejecting and board.next_expiry() == 10.5
    assert board.expire(10.49) == []
    board.apply(parse_result(_result("pass")), now=10.2)  # a pass does not end the pulse
    board.apply(parse_result(_result("fail")), now=10.3)
    assert board.expire(10.7) == [] and board.next_expiry() == pytest.approx(10.8)
    assert board.expire(10.8) == [source] and not state.rejecting
    assert board.expire(11.0) == [] and board.next_expiry() is None
    board.apply(parse_result(_result("error")), now=12.0)
    assert not state.rejecting  # an error is no reject: the line decides what an unjudged part does


def test_the_configured_sources_take_the_ids_a_result_can_carry(tmp_path):
    field = config.OpcuaSourceSettings.model_fields["line"]
    assert any(getattr(m, "max_length", None) == SOURCE_ID_MAX_BYTES for m in field.metadata)
    path = tmp_path / "c.toml"
    path.write_text('[opcua]\nsources = [{line = "hall_2.line_1", camera = "cam:3"}]\n')
    assert config.load(path, check_plugins=False).opcua.sources[0].line == "hall_2.line_1"
    for bad in ('{line = "a/b", camera = "c"}', '{line = ".x", camera = "c"}', '{line = "a", camera = "c*"}'):
        path.write_text(f"[opcua]\nsources = [{bad}]\n")
        with pytest.raises(ConfigError, match="opcua.sources"):
            config.load(path, check_plugins=False)


def test_security_settings_that_cannot_work_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    for text, why in (('security = ["sign_and_encrypt"]', "certificate"), ('certificate = "/c.der"', "together"),
                      ('username = "plc"', "INSPECTOR_OPCUA__PASSWORD"), ('password = "x"', "environment"),
                      ('binding_keys = ["fail.*.#x"]', "binding_keys")):
        path.write_text(f"[opcua]\n{text}\n")
        with pytest.raises(ConfigError, match=why):
            config.load(path, check_plugins=False)
    monkeypatch.setenv("INSPECTOR_OPCUA__PASSWORD", "s3cret")
    path.write_text('[opcua]\nusername = "plc"\n')
    assert config.load(path, check_plugins=False).opcua.password.get_secret_value() == "s3cret"


def test_without_asyncua_the_command_says_which_extra_to_install(monkeypatch):
    from inspector.tools.opcua.bridge import run_bridge

    monkeypatch.setitem(sys.modules, "asyncua", None)
    with pytest.raises(ConfigError, match=r"inspector\[opcua\]"):
        run_bridge(config.Settings())
