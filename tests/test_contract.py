"""docs/contract.md and docs/schemas/ held to what is built, so the contract cannot drift.

The references are independent of the document: the real argparse parser, the settings model,
the error-code table, a real scrape of the metrics server, the real RabbitMQ's view of the
topology, and real messages from a real worker, a real rollback and a real refit.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import re
import shutil
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pika
import pytest
from jsonschema import Draft202012Validator
from prometheus_client.parser import text_string_to_metric_families

from inspector import cli, config
from inspector.broker import announcement
from inspector.config import MetricsSettings
from inspector.errors import FRAME_ERROR_CODES, FrameError
from inspector.messages import (
    FRAME_ID_MAX_BYTES,
    META_KEY_MAX_BYTES,
    META_MAX_BYTES,
    META_MAX_DEPTH,
    META_MAX_ITEMS,
    META_VALUE_MAX_BYTES,
    MODEL_NAME_MAX_BYTES,
    SOURCE_ID_MAX_BYTES,
    TEXT_MAX_BYTES,
)
from inspector.tools import samples
from inspector.worker.topology import CONTROL_BINDING
from inspector.worker.decode import (
    JSON_MAX_STRUCTURE,
    JSON_TEXT_MAX_BYTES,
    URI_PATH_MAX_BYTES,
    DecodeLimits,
    decode_capture,
)
from inspector.worker.loop import Worker
from inspector.worker.metrics import Metrics
from tests.jpegkit import many_scan_jpeg
from tests.workerkit import SIZE, Line, encoded, worker_config

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "contract.md"
SCHEMAS = ROOT / "docs" / "schemas"
CAPTURED_AT = "2026-11-28T10:15:01.120Z"
STALE_AFTER_S = 300e6  # about ten years: the frame captured in 2000 is stale, CAPTURED_AT is not
DEAD_LETTER_HEADER = re.compile(r"^x-inspector-")


# -- reading the document ----------------------------------------------------------------------


def section(title: str) -> str:
    """The text under the `## title` heading of docs/contract.md, up to the next `## ` heading."""
    text = DOC.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"docs/contract.md has no section {title!r}"
    return match.group(1)


def rows(text: str) -> list[list[str]]:
    """The cells of every table row in `text`, separator rows left out."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|") or re.fullmatch(r"\|[\s|:-]+\|", line):
            continue
        cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        found.append(cells)
    return found


def ticked(cell: str) -> list[str]:
    """The contents of the `code spans` of a table cell."""
    return re.findall(r"`([^`]*)`", cell)


def keyed(text: str) -> dict[str, list[str]]:
    """Table rows whose first cell is one code span, by that span."""
    return {ticked(cells[0])[0]: cells for cells in rows(text) if re.fullmatch(r"`[^`]+`", cells[0])}


def json_examples(text: str) -> list[dict]:
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", text, re.DOTALL)]


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / name).read_text())


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(schema(name), format_checker=Draft202012Validator.FORMAT_CHECKER)


def errors(name: str, instance: object) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(name).iter_errors(instance)]


# -- the schemas themselves --------------------------------------------------------------------


def test_every_schema_is_draft_2020_12_and_linked_from_the_document():
    files = sorted(path.name for path in SCHEMAS.glob("*.json"))
    for name in files:
        assert schema(name)["$schema"] == "https://json-schema.org/draft/2020-12/schema", name
        Draft202012Validator.check_schema(schema(name))
    linked = sorted(set(re.findall(r"\(schemas/([\w.-]+\.json)\)", DOC.read_text())))
    assert linked == files


def test_error_codes_in_the_document_and_the_schemas_are_the_codes_of_the_code():
    codes = list(FRAME_ERROR_CODES)
    assert list(keyed(section("Error codes"))) == codes
    assert schema("result.schema.json")["$defs"]["error_code"]["enum"] == codes
    assert schema("dead-letter-headers.schema.json")["properties"]["x-inspector-error-code"]["enum"] == codes


def test_the_documented_examples_follow_their_schemas():
    (result,) = json_examples(section("Results"))
    assert errors("result.schema.json", result) == []
    (announced,) = json_examples(section("Model announcements"))
    assert errors("announcement.schema.json", announced) == []


def test_the_documented_fields_are_the_schemas_fields():
    result = schema("result.schema.json")
    rows = {name: cells for name, cells in keyed(section("Results")).items() if len(cells) == 3}
    optional = {name for name, cells in rows.items() if "or absent" in cells[1]}
    assert optional == {"evidence", "regions"}  # kept frames' results; fail results of models with regions
    assert set(rows) == set(result["properties"]) and set(result["required"]) == set(rows) - optional
    manifest = schema("manifest.schema.json")
    assert set(keyed(section("Model store"))) == set(manifest["properties"]) == set(manifest["required"])
    documented = {name for name in keyed(section("Dead letters")) if DEAD_LETTER_HEADER.match(name)}
    headers = schema("dead-letter-headers.schema.json")
    assert documented == set(headers["properties"]) == set(headers["propertyNames"]["anyOf"][1]["enum"])


def test_the_bounds_in_the_document_and_the_schema_are_the_codes():
    """The limits stated in prose and in the schema are the code's constants, not copies that can age."""
    result = schema("result.schema.json")["properties"]
    assert result["frame_id"]["allOf"][1]["maxLength"] == FRAME_ID_MAX_BYTES
    assert result["line_id"]["allOf"][1]["maxLength"] == result["camera_id"]["allOf"][1]["maxLength"] \
        == SOURCE_ID_MAX_BYTES
    assert result["meta"]["maxProperties"] == META_MAX_ITEMS
    assert result["meta"]["propertyNames"]["allOf"][1]["maxLength"] == META_KEY_MAX_BYTES
    assert result["error"]["oneOf"][1]["properties"]["message"]["maxLength"] == TEXT_MAX_BYTES
    text = " ".join(section("Captures").split())
    for phrase in (f"line and camera {SOURCE_ID_MAX_BYTES} bytes each",
                   f"frame {FRAME_ID_MAX_BYTES}, model {MODEL_NAME_MAX_BYTES}, `meta` key {META_KEY_MAX_BYTES}",
                   f"over {META_VALUE_MAX_BYTES} UTF-8 bytes", f"more than {META_MAX_DEPTH} levels deep",
                   f"first {META_MAX_ITEMS} entries", f"at most {META_MAX_BYTES} bytes of compact JSON",
                   f"at most {JSON_MAX_STRUCTURE} of the bytes", f"over {JSON_TEXT_MAX_BYTES // 1024} KiB",
                   f"at most {URI_PATH_MAX_BYTES} bytes decoded"):
        assert phrase in text


def test_the_result_schema_is_not_vacuous(real_traffic):
    scored = next(body for _, _, body in real_traffic.results.values() if body["verdict"] != "error")
    failed = next(body for _, _, body in real_traffic.results.values() if body["verdict"] == "error")
    assert errors("result.schema.json", scored) == [] and errors("result.schema.json", failed) == []
    refused = {
        "an unknown field": scored | {"station": "s1"},
        "a probability over 1": scored | {"anomaly_probability": 1.5},
        "a missing field": {k: v for k, v in scored.items() if k != "meta"},
        "an unknown verdict": scored | {"verdict": "maybe"},
        "an offset instead of Z": scored | {"inspected_at": "2026-11-28T10:15:01.162+00:00"},
        "seconds without milliseconds": scored | {"captured_at": "2026-11-28T10:15:01Z"},
        "a scored frame with an error": scored | {"error": {"code": "empty_body", "message": "empty"}},
        "an error with a probability": failed | {"anomaly_probability": 0.2},
        "an error without its error": failed | {"error": None},
        "an unknown error code": failed | {"error": {"code": "cosmic_ray", "message": "?"}},
        "another schema version": scored | {"schema": "inspection.result/2"},
        "an id with a space": scored | {"camera_id": "cam 3"},
        "an id with a wildcard": scored | {"frame_id": "f#1"},
        "a meta key with a slash": scored | {"meta": {"a/b": 1}},
    }
    for why, body in refused.items():
        assert errors("result.schema.json", body), why


def test_the_other_schemas_are_not_vacuous(real_traffic):
    _, props, _ = real_traffic.dead[0]
    assert errors("dead-letter-headers.schema.json", props.headers) == []
    assert errors("dead-letter-headers.schema.json", props.headers | {"x-inspector-retry": 1})
    assert errors("dead-letter-headers.schema.json", props.headers | {"x-inspector-error-code": "nope"})
    assert errors("dead-letter-headers.schema.json", props.headers | {"x-inspector-unroutable": True})
    assert errors("dead-letter-headers.schema.json", {"x-inspector-error-code": "empty_body"})
    body = announcement("default", "20261128T101500Z-3f9c2a", "dfkde", "refit")
    assert errors("announcement.schema.json", body) == []
    assert errors("announcement.schema.json", body | {"reason": "whim"})
    assert errors("announcement.schema.json", body | {"extra": 1})


def test_the_capture_json_schema_accepts_what_the_worker_decodes(tmp_path):
    """Schema and decoder agree on the form of a body: within the size and structure limits the schema
    cannot state, it refuses exactly what the worker answers json_malformed, base64_invalid or (every
    root allowed) uri_not_allowed."""
    png = encoded(samples.make_images(1, size=32)[0], "PNG")
    path = tmp_path / "frame.png"
    path.write_bytes(png)
    b64 = base64.b64encode(png).decode()
    bodies = [
        {"image_b64": b64}, {"image_b64": b64, "note": "ignored"}, {"image_b64": f" {b64}\n"},
        {"image_uri": path.as_uri()}, {"image_uri": f"file://localhost{path}"}, {"image_uri": f"FILE://{path}"},
        {"image_uri": path.as_uri(), "image_b64": b64}, {}, {"image_uri": 5}, {"image_b64": None},
        {"image_b64": ""}, {"image_b64": "@@@@"}, {"image_b64": "abc"}, {"image_b64": b64[:-1]},
        {"image_uri": "http://example.com/frame.png"}, {"image_uri": f"file://camhost{path}"},
        {"image_uri": str(path)}, {"image_uri": f"{path.as_uri()}?v=1"}, {"image_uri": f"{path.as_uri()}#top"},
        [b64], "frame.png",
    ]
    limits = DecodeLimits(max_image_bytes=1 << 20, max_image_pixels=1 << 20, allowed_roots=(Path("/"),))
    for body in bodies:
        try:
            decode_capture(json.dumps(body).encode(), "application/json", {}, limits)
            accepted = True
        except FrameError as exc:
            accepted = exc.code not in ("json_malformed", "base64_invalid", "uri_not_allowed")
        assert (errors("capture-json.schema.json", body) == []) == accepted, body


# -- commands and configuration ----------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "inspector") -> dict[str, argparse.ArgumentParser]:
    """Every leaf command of the parser ('inspector models list', ...), by its full name."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not actions:
        return {prefix: parser}
    leaves = {}
    for name, sub in actions[0].choices.items():
        leaves |= _subcommands(sub, f"{prefix} {name}")
    return leaves


def test_the_documented_commands_and_options_are_the_parsers():
    parser = cli.build_parser()
    built = _subcommands(parser)
    documented = {ticked(cells[0])[0]: cells[1] for cells in rows(section("Commands and exit codes"))
                  if ticked(cells[0]) and ticked(cells[0])[0].startswith("inspector ")}
    assert set(documented) == set(built)
    for command, sub in built.items():
        options = {o for a in sub._actions for o in a.option_strings if o.startswith("--")}
        assert "--config" in options, command  # "every command takes --config FILE after its name"
        assert set(re.findall(r"--[a-z][a-z0-9-]*", documented[command])) == options - {"--help", "--config"}, command
    top = {o for a in parser._actions for o in a.option_strings}
    assert "--config" not in top and "--version" in top


def _leaves(data: dict, prefix: tuple[str, ...] = ()) -> dict[str, object]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out |= _leaves(value, (*prefix, key))
        else:
            out[".".join((*prefix, key))] = value
    return out


def test_the_documented_configuration_is_every_key_with_its_default(monkeypatch):
    """The table in the document against the settings model (config.example.toml against the model is
    tests/test_config.py's)."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("INSPECTOR_"):
            monkeypatch.delenv(name)
    settings = config.Settings()
    assert set(settings.models) == {"default"} and settings.plugins == {}
    expected = _leaves({k: v for k, v in settings.model_dump(mode="json").items() if k not in ("models", "plugins")})
    expected["broker.password"] = settings.broker.password.get_secret_value()
    expected |= {f"models.NAME.{k}": v for k, v in config.ModelSettings().model_dump(mode="json").items()}
    plugin = settings.plugin_settings("dfkde").model_dump(mode="json")
    expected |= {f"plugins.dfkde.{k}": v for k, v in plugin.items()}

    table = keyed(section("Configuration"))
    assert set(table) == set(expected)
    for key, cells in table.items():
        (default,) = ticked(cells[1])
        assert tomllib.loads(f"value = {default}")["value"] == expected[key], key


# -- metrics ---------------------------------------------------------------------------------


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_the_documented_metrics_are_the_families_a_real_scrape_shows():
    """Every recording method is called once so that every labelled family has a series to show its labels;
    only inspector_* families are the contract's."""
    metrics = Metrics(MetricsSettings(host="127.0.0.1", port=0))
    port = metrics.serve()
    try:
        metrics.expect_model("default")
        metrics.set_model("default", "dfkde", "20261128T101500Z-3f9c2a", 0.5)
        metrics.model_reload("default", "success")
        metrics.set_broker_connected(True)
        metrics.broker_reconnected()
        metrics.set_inflight(3)
        metrics.frame_done(line="line1", camera="cam1", model="default", verdict="fail", probability=0.9,
                           latency_s=0.05, queue_wait_s=0.01, redelivered=True)
        metrics.frame_error("empty_body")
        metrics.dead_lettered("empty_body")
        metrics.stage("infer", 0.02)
        metrics.batch("default", 4)
        metrics.set_inflight_bytes(1 << 20)
        metrics.result_unroutable()
        metrics.thread_stalls = lambda: {"scoring": 0.0}  # as the worker's watchdog reports
        base = f"http://127.0.0.1:{port}"
        status, text = _get(f"{base}/metrics")
        endpoints = {path: _get(f"{base}{path}")[0] for path in ("/metrics", "/healthz", "/readyz", "/nope")}
    finally:
        metrics.close()
    assert status == 200

    scraped = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        if not name.startswith("inspector_"):
            continue
        labels = {label for sample in family.samples for label in sample.labels} - {"le"}
        scraped[name] = (family.type, labels if family.samples else None)
    table = keyed(section("Metrics and health"))
    documented = {name: (cells[1], set(ticked(cells[2])))
                  for name, cells in table.items() if name.startswith("inspector_")}
    assert set(documented) == set(scraped)
    for name, (kind, labels) in scraped.items():
        assert documented[name][0] == kind, name
        if labels is not None:  # a family without series (GPU memory on a CPU machine) shows no labels
            assert documented[name][1] == labels, name

    paths = {name for name in table if name.startswith("/")}
    assert paths == {"/metrics", "/healthz", "/readyz"}
    assert endpoints == {"/metrics": 200, "/healthz": 200, "/readyz": 200, "/nope": 404}


# -- a real worker ---------------------------------------------------------------------------


def _frames(allowed: Path) -> dict[str, tuple[str | None, str, bytes, dict]]:
    """frame id: (expected error code or None, routing key, body, properties)."""
    good, other = samples.make_images(2, seed=11, size=SIZE)
    # a crack, far below every good part's log-density; the first, a faint scratch, sits among the lowest of
    # them, where a threshold promising at most 5% false rejects from 24 held-out parts lets it pass
    defective = samples.make_images(4, defective=True, seed=11, size=SIZE)[3]
    png = encoded(good, "PNG")
    (allowed / "frame.png").write_bytes(png)

    def uri(path: object) -> bytes:
        return json.dumps({"image_uri": f"file://{path}"}).encode()

    def raw(width: int, height: int, pixel_format: str) -> dict:
        return {"content_type": "image/x-raw", "headers": {"width": width, "height": height,
                                                           "pixel_format": pixel_format}}

    key = "line1.cam1"
    return {
        "png-meta": (None, key, png, {"content_type": "image/png", "headers": {
            "captured_at": CAPTURED_AT, "line_id": "line1", "lot": "A7", "count": 3, "ok": True,
            "nested": {"k": [1, "v"]}}}),
        "jpeg-amqp-time": (None, key, encoded(other, "JPEG", quality=95),
                           {"content_type": "image/jpeg", "timestamp": 1_795_000_000}),
        "raw": (None, key, good.tobytes(), raw(SIZE, SIZE, "rgb8")),
        "b64": (None, key, json.dumps({"image_b64": base64.b64encode(png).decode()}).encode(),
                {"content_type": "application/json"}),
        "uri": (None, key, uri(allowed / "frame.png"), {"content_type": "application/json"}),
        "defect": (None, key, encoded(defective, "PNG"), {"content_type": "image/png"}),
        "odd-ids": (None, key, png, {"content_type": "image/png",
                                     "headers": {"line_id": "hall 2.line#1", "camera_id": "cam.*"}}),
        "frame 7/x": (None, key, png, {"content_type": "image/png"}),
        "empty": ("empty_body", key, b"", {"content_type": "image/png"}),
        "text": ("unsupported_content_type", key, b"hello", {"content_type": "text/plain"}),
        "garbage": ("image_undecodable", key, bytes(range(256)) * 8, {"content_type": "image/jpeg"}),
        "big": ("image_too_large", key, b"\0" * 300_000, raw(1000, 300, "mono8")),
        "huge": ("image_too_many_pixels", key, b"\0" * 100, raw(30000, 30000, "mono8")),
        "scans": ("image_too_complex", key, many_scan_jpeg(64, 64, 200), {"content_type": "image/jpeg"}),
        "no-height": ("raw_headers_missing", key, b"\0" * 100,
                      {"content_type": "image/x-raw", "headers": {"width": 10, "pixel_format": "mono8"}}),
        "yuv": ("raw_headers_invalid", key, b"\0" * 100, raw(10, 10, "yuv422")),
        "short": ("raw_size_mismatch", key, b"\0" * 99, raw(10, 10, "mono8")),
        "both": ("json_malformed", key, json.dumps({"image_uri": "file:///x", "image_b64": "AAAA"}).encode(),
                 {"content_type": "application/json"}),
        "outside": ("uri_not_allowed", key, uri("/etc/hostname"), {"content_type": "application/json"}),
        "missing": ("file_not_found", key, uri(allowed / "missing.png"), {"content_type": "application/json"}),
        "b64-bad": ("base64_invalid", key, b'{"image_b64": "@@not base64@@"}', {"content_type": "application/json"}),
        "ghost": ("model_unknown", key, png, {"content_type": "image/png", "headers": {"model": "ghost"}}),
        "spare": ("model_unavailable", key, png, {"content_type": "image/png", "headers": {"model": "spare"}}),
        "old": ("stale", key, png, {"content_type": "image/png", "headers": {"captured_at": "2000-01-01T00:00:00Z"}}),
    }


def _topology(prefix: str) -> SimpleNamespace:
    """What RabbitMQ itself says of the test's exchanges, queues and bindings."""

    def listing(*args: str) -> list[dict]:
        run = subprocess.run(["rabbitmqctl", "-q", *args, "--formatter", "json"], capture_output=True, text=True,
                             timeout=60, check=True)
        return json.loads(run.stdout or "[]")

    queues = listing("list_queues", "name", "type", "durable", "auto_delete", "exclusive", "arguments")
    exchanges = listing("list_exchanges", "name", "type", "durable", "auto_delete")
    bindings = listing("list_bindings", "source_name", "destination_name", "routing_key")
    return SimpleNamespace(
        queues={q["name"]: q for q in queues},
        exchanges={e["name"]: e for e in exchanges if e["name"].startswith(prefix)},
        bindings={(b["source_name"], b["destination_name"], b["routing_key"]) for b in bindings
                  if b["source_name"].startswith(prefix)},
    )


@pytest.fixture(scope="module")
def real_traffic(fitted, tmp_path_factory) -> SimpleNamespace:
    """One real worker on exchanges and queues of its own: good frames of every form, bad frames of
    15 error codes, the results and dead letters it published, and the topology it declared."""
    root = tmp_path_factory.mktemp("traffic")
    allowed = root / "frames"
    allowed.mkdir()
    prefix = f"c{uuid.uuid4().hex[:10]}"
    frames = _frames(allowed)
    settings = config.load(worker_config(root, fitted, prefix, '[models.default]\n[models.spare]',
                                         allowed_roots=[str(allowed)], max_image_bytes=200_000,
                                         max_image_pixels=1_000_000, max_frame_age_s=STALE_AFTER_S))
    line = Line(prefix)
    worker = Worker(settings)
    try:
        worker.start()
        topology = _topology(prefix)
        line.publish([(key, body, {**props, "message_id": frame_id})
                      for frame_id, (_, key, body, props) in frames.items()]
                     + [("line1.cam1", frames["png-meta"][2], {"content_type": "image/png"})])  # no id, no time
        results = line.collect(len(frames) + 1)
        bad = sum(code is not None for code, *_ in frames.values())
        dead = line.dead_letters(bad)
        connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
        connection.channel().queue_unbind(line.results_queue, line.exchanges["results"], routing_key="#")
        connection.close()  # now no queue takes a result
        line.publish([("line1.cam1", frames["png-meta"][2], {"content_type": "image/png", "message_id": "lost"})])
        kept = line.dead_letters(1)
    finally:
        worker.stop(grace_s=5)
        line.delete()
    return SimpleNamespace(frames=frames, prefix=prefix, settings=settings, topology=topology,
                           results={body["frame_id"]: (key, props, body) for key, props, body in results}, dead=dead,
                           kept=kept)


def test_every_result_of_a_real_worker_follows_the_schema_and_the_document(real_traffic):
    frames = real_traffic.frames
    results = {}  # by the message id sent; None for the frame sent without one
    for frame_id, result in real_traffic.results.items():
        if frame_id in frames:
            sent = frame_id
        elif re.fullmatch(r"frame_7_x~[0-9a-f]{8}", frame_id):
            sent = "frame 7/x"  # cleaned, and kept distinct by the hash
        else:
            assert re.fullmatch(r"gen-[0-9a-f]{20}", frame_id)
            sent = None
        assert sent not in results
        results[sent] = result
    assert set(results) == set(frames) | {None}

    for sent, (key, props, body) in results.items():
        assert errors("result.schema.json", body) == [], sent
        assert (props.content_type, props.delivery_mode, props.correlation_id, props.type) == (
            "application/json", 2, body["frame_id"], "inspection.result/1"), sent
        code = frames[sent][0] if sent is not None else None
        if code is None:
            assert body["verdict"] == ("fail" if body["anomaly_probability"] >= body["threshold"] else "pass"), sent
        else:
            assert body["verdict"] == "error" and body["error"]["code"] == code, sent
        if sent != "odd-ids":
            assert key == f"{body['verdict']}.line1.cam1", sent

    key, _, body = results["odd-ids"]
    assert key == f"{body['verdict']}.hall_2_line_1.cam__"
    assert (body["line_id"], body["camera_id"]) == ("hall_2.line_1", "cam._")
    body = results["png-meta"][2]
    assert body["meta"] == {"lot": "A7", "count": 3, "ok": True, "nested": {"k": [1, "v"]}}
    assert body["captured_at"] == CAPTURED_AT
    assert results["jpeg-amqp-time"][2]["captured_at"] == "2026-11-18T11:06:40.000Z"
    assert results[None][2]["captured_at"] is None and results[None][2]["meta"] == {}
    for sent in ("ghost", "spare"):
        assert results[sent][2]["model"] is None and results[sent][2]["threshold"] is None
    assert {body["verdict"] for _, _, body in results.values()} == {"pass", "fail", "error"}


def test_every_dead_letter_of_a_real_worker_carries_the_documented_headers(real_traffic):
    frames, prefix = real_traffic.frames, real_traffic.prefix
    always = set(schema("dead-letter-headers.schema.json")["oneOf"][0]["required"])
    on_every = {name for name, cells in keyed(section("Dead letters")).items() if cells[1].startswith("every dead")}
    assert on_every == always
    dead = {props.headers["x-inspector-frame-id"]: (key, props, body) for key, props, body in real_traffic.dead}
    assert sorted(dead) == sorted(frame_id for frame_id, (code, *_) in frames.items() if code is not None)
    for frame_id, (key, props, body) in dead.items():
        code, sent_key, sent_body, sent = frames[frame_id]
        assert errors("dead-letter-headers.schema.json", props.headers) == [], frame_id
        assert {name for name in props.headers if DEAD_LETTER_HEADER.match(name)} == always
        assert props.headers["x-inspector-error-code"] == code
        assert props.headers["x-inspector-original-exchange"] == f"{prefix}.captures"
        assert props.headers["x-inspector-original-routing-key"] == sent_key == key
        assert body == sent_body and props.content_type == sent["content_type"], frame_id
        kept = {k: v for k, v in props.headers.items() if not DEAD_LETTER_HEADER.match(k) and k != "x-delivery-count"}
        assert kept == sent.get("headers", {}), frame_id  # x-delivery-count: added by RabbitMQ's quorum queues
        assert props.message_id == frame_id and props.delivery_mode == 2


def test_a_result_no_queue_takes_is_kept_as_documented(real_traffic):
    ((key, props, body),) = real_traffic.kept
    result = json.loads(body)
    assert errors("result.schema.json", result) == [] and result["frame_id"] == "lost"
    assert errors("dead-letter-headers.schema.json", props.headers) == []
    original = f"{result['verdict']}.line1.cam1"
    assert key == f"unroutable.{original}"
    assert props.headers["x-inspector-unroutable"] is True
    assert props.headers["x-inspector-original-routing-key"] == original
    assert props.headers["x-inspector-original-exchange"] == f"{real_traffic.prefix}.results"
    assert (props.content_type, props.correlation_id, props.type, props.delivery_mode) == (
        "application/json", "lost", "inspection.result/1", 2)


def test_the_worker_declares_the_documented_topology(real_traffic):
    """RabbitMQ's own listing of what the worker declared, against the document's table."""
    settings, topology = real_traffic.settings, real_traffic.topology
    exchanges, worker = settings.broker.exchanges, settings.worker
    text = section("Exchanges and queues")
    for argument in ("x-queue-type: quorum", "x-dead-letter-exchange:", "x-delivery-limit:", f"`{CONTROL_BINDING}`"):
        assert argument in text
    for name in (exchanges.captures, exchanges.results, exchanges.control, exchanges.dead):
        e = topology.exchanges[name]
        assert (e["type"], e["durable"], e["auto_delete"]) == ("topic", True, False), name

    def arguments(queue: str) -> dict:
        q = topology.queues[queue]
        assert q["durable"] is True and q["auto_delete"] is False and q["type"] == "quorum", queue
        return {key: value for key, _, value in q["arguments"]}

    assert arguments(worker.dead_letter_queue) == {"x-queue-type": "quorum"}
    assert arguments(worker.queue) == {"x-queue-type": "quorum", "x-dead-letter-exchange": exchanges.dead,
                                       "x-delivery-limit": worker.delivery_limit}
    assert (exchanges.dead, worker.dead_letter_queue, "#") in topology.bindings
    assert {(exchanges.captures, worker.queue, key) for key in worker.binding_keys} <= topology.bindings
    control = [queue for source, queue, key in topology.bindings
               if source == exchanges.control and key == CONTROL_BINDING]
    assert len(control) == 1
    assert topology.queues[control[0]]["auto_delete"] is True and topology.queues[control[0]]["exclusive"]


def test_a_real_rollback_announces_what_the_schema_describes(fitted, tmp_path, capsys):
    store = Path(shutil.copytree(fitted, tmp_path / "models"))
    version = (store / "default" / "current").read_text().strip()
    prefix = f"c{uuid.uuid4().hex[:10]}"
    path = worker_config(tmp_path, store, prefix)
    line = Line(prefix)
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
    root, pika_log = logging.getLogger(), logging.getLogger("pika")
    levels = root.level, pika_log.level
    try:
        channel = connection.channel()
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(queue, f"{prefix}.control", routing_key="model.#")
        assert cli.main(["models", "rollback", "default", version, "--announce", "--config", str(path)]) == 0
        deadline = time.monotonic() + 10
        method = None
        while method is None and time.monotonic() < deadline:
            method, props, body = channel.basic_get(queue, auto_ack=True)
            time.sleep(0 if method else 0.05)
    finally:
        root.setLevel(levels[0])
        pika_log.setLevel(levels[1])
        connection.close()
        line.delete()
    assert method is not None, capsys.readouterr()
    assert method.routing_key == "model.default"
    assert (props.content_type, props.delivery_mode) == ("application/json", 2)
    message = json.loads(body)
    assert errors("announcement.schema.json", message) == []
    assert (message["model"], message["version"], message["reason"]) == ("default", version, "rollback")


def test_a_real_manifest_follows_the_schema_and_the_documented_layout(fitted):
    model = fitted / "default"
    current = (model / "current").read_text()
    assert current.endswith("\n")
    version = current.strip()
    folder = model / "versions" / version
    manifest = json.loads((folder / "manifest.json").read_text())
    assert errors("manifest.schema.json", manifest) == []
    assert manifest["version"] == version and manifest["name"] == "default"
    assert sorted(manifest["files"]) == sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    lines = "".join(f"{name}:{manifest['files'][name]}\n" for name in sorted(manifest["files"]))
    assert manifest["checksum"] == hashlib.sha256(lines.encode()).hexdigest()
    created = manifest["created_at"]
    assert version == f"{created[:4]}{created[5:7]}{created[8:10]}T{created[11:13]}{created[14:16]}{created[17:19]}Z-" \
                      f"{manifest['checksum'][:6]}"
    assert errors("manifest.schema.json", manifest | {"station": "s1"})
