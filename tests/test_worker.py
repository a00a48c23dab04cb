"""The worker's promises against the real RabbitMQ: every capture answered, none lost, none
duplicated without saying so; bad input answered with a code and a dead letter; broker
restarts, SIGTERM, model swaps and long batches survived. What the worker decides by itself
(error codes, model choice, reloads, batching, its own bugs) is tested without a broker in
test_worker_stub.py; the content types here too, on a StubConsumer, as they need a fitted model."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inspector import config
from inspector.broker import announcement
from inspector.stores import ModelStore
from inspector.tools import samples
from inspector.worker.loop import Worker
from inspector_dfkde.conformal import ConformalScale
from inspector_dfkde.plugin import DfkdePlugin
from tests.workerkit import SIZE, Line, close_all_connections, encoded, http_status, scrape, worker_config

CAPTURED_AT = "2026-11-28T10:15:01.120Z"


def reference_probability(store: Path, images: list[np.ndarray]) -> np.ndarray:
    """The plugin called directly on the pixels, outside the worker: what each frame must be scored."""
    plugin = DfkdePlugin.load(ModelStore(store).load_path("default").path, torch.device("cpu"))
    return plugin.score(torch.stack([plugin.prepare(image) for image in images])).probability


def by_id(results: list[tuple]) -> dict[str, tuple]:
    return {body["frame_id"]: (key, props, body) for key, props, body in results}


# -- every content type ------------------------------------------------------------------------


def test_every_content_type_is_scored_like_the_plugin_scores_its_pixels(fitted, stub_start, tmp_path):
    good = samples.make_images(1, seed=7, size=SIZE)[0]
    defective = samples.make_images(1, defective=True, seed=7, size=SIZE)[0]
    allowed = tmp_path / "frames"
    allowed.mkdir()
    Image.fromarray(good).save(allowed / "frame.png")
    gray = good.mean(axis=2).astype(np.uint8)
    raw = lambda fmt, w=SIZE, h=SIZE: {"width": w, "height": h, "pixel_format": fmt}  # noqa: E731
    jpeg = encoded(good, "JPEG", quality=95)
    cases = {  # frame id: (body, content type, extra headers, the pixels the worker must see)
        "jpeg": (jpeg, "image/jpeg", {}, np.array(Image.open(__import__("io").BytesIO(jpeg)).convert("RGB"))),
        "png": (encoded(good, "PNG"), "image/png", {}, good),
        "bmp": (encoded(good, "BMP"), "image/bmp", {}, good),
        "tiff": (encoded(good, "TIFF"), "image/tiff", {}, good),
        "webp": (encoded(good, "WEBP", lossless=True), "image/webp", {}, good),
        "rgb8": (good.tobytes(), "image/x-raw", raw("rgb8"), good),
        "bgr8": (good[:, :, ::-1].tobytes(), "image/x-raw", raw("bgr8"), good),
        "mono8": (gray.tobytes(), "image/x-raw", raw("mono8"), np.repeat(gray[:, :, None], 3, axis=2)),
        "uri": (json.dumps({"image_uri": (allowed / "frame.png").as_uri()}).encode(), "application/json", {}, good),
        "b64": (json.dumps({"image_b64": base64.b64encode(encoded(good, "PNG")).decode()}).encode(),
                "application/json", {}, good),
        "defect": (encoded(defective, "PNG"), "image/png", {}, defective),
    }
    running = stub_start(fitted, allowed_roots=[str(allowed)])
    for frame_id, (body, ctype, headers, _) in cases.items():
        running.consumer.deliver(body, "line1.cam3", content_type=ctype, message_id=frame_id,
                                 headers={"captured_at": CAPTURED_AT, "lot": "A7", **headers})
    running.consumer.join(timeout=60)
    results = {p.body["frame_id"]: (p.routing_key, p.body) for p in running.consumer.results}
    assert sorted(results) == sorted(cases) and len(running.consumer.results) == len(cases)

    expected = reference_probability(fitted, [pixels for *_, pixels in cases.values()])
    version = ModelStore(fitted).current("default")
    for (frame_id, _), want in zip(cases.items(), expected):
        key, body = results[frame_id]
        assert body["anomaly_probability"] == pytest.approx(want, abs=1e-4), frame_id
        verdict = "fail" if body["anomaly_probability"] >= 0.5 else "pass"
        assert body["verdict"] == verdict and key == f"{verdict}.line1.cam3", frame_id
        # the result's AMQP properties (correlation id, content type, persistence) are test_contract.py's
        assert body["schema"] == "inspection.result/1"
        assert (body["line_id"], body["camera_id"]) == ("line1", "cam3")
        assert body["model"] == {"name": "default", "plugin": "dfkde", "version": version}
        assert body["threshold"] == 0.5 and body["error"] is None and body["redelivered"] is False
        assert body["captured_at"] == CAPTURED_AT
        assert datetime.fromisoformat(body["inspected_at"].replace("Z", "+00:00"))
        assert body["meta"] == {"lot": "A7"}
        assert isinstance(body["anomaly_score"], float)
    # a sensible verdict: the good part passes in every lossless form of the colour frames the model was
    # fitted on (PNG); the scratched one fails. (JPEG's artefacts and a mono camera are other pictures.)
    lossless = [f for f in cases if f not in ("defect", "mono8", "jpeg")]
    assert {f: results[f][1]["verdict"] for f in lossless} == {f: "pass" for f in lossless}
    assert results["defect"][1]["verdict"] == "fail"
    assert running.scored == len(cases)


# -- volume -------------------------------------------------------------------------------------


def test_a_thousand_frames_in_give_a_thousand_results_out(fitted, line, start):
    images = samples.make_images(10, seed=3, size=64)
    bodies = [encoded(image, "PNG") for image in images]
    start(fitted, prefetch=128, batch_size=16)
    line.publish([
        (f"line{i % 3}.cam{i % 5}", bodies[i % 10], {"content_type": "image/png", "message_id": f"f-{i:04d}"})
        for i in range(1000)
    ])
    results = line.collect(1000, timeout=240)
    counts = Counter(body["frame_id"] for _, _, body in results)
    assert len(counts) == 1000 and set(counts.values()) == {1}
    assert {body["verdict"] for _, _, body in results} <= {"pass", "fail"}
    for key, _, body in results:
        assert key == f"{body['verdict']}.{body['line_id']}.{body['camera_id']}"
    assert line.collect(1, timeout=1.0) == []  # nothing more trickles in
    assert line.queue_depth() == 0


# -- bad input ----------------------------------------------------------------------------------


def test_a_bad_frame_is_answered_and_dead_lettered_as_it_came_with_its_headers(fitted, line, start):
    """The dead letter itself, through the broker: the capture untouched, its properties and headers kept, the
    code added. (Every error code is tested on the stub, test_worker_stub.py.)"""
    good_png = encoded(samples.make_images(1, seed=1, size=SIZE)[0], "PNG")
    raw = {"content_type": "image/x-raw"}
    cases = {  # frame id: (expected code, body, properties)
        "empty": ("empty_body", b"", {"content_type": "image/png"}),
        "text": ("unsupported_content_type", b"hello", {"content_type": "text/plain"}),
        "no-height": ("raw_headers_missing", b"\0" * 100, {**raw, "headers": {"width": 10, "pixel_format": "mono8"}}),
        "ghost": ("model_unknown", good_png, {"content_type": "image/png", "headers": {"model": "ghost"}}),
    }
    start(fitted)
    frames = [("line2.cam9", body, {**props, "message_id": frame_id,
                                    "headers": {"shift": "night", **props.get("headers", {})}})
              for frame_id, (_, body, props) in cases.items()]
    line.publish(frames + [("line2.cam9", good_png, {"content_type": "image/png", "message_id": "after"})])

    results = by_id(line.collect(len(cases) + 1))
    assert sorted(results) == sorted(list(cases) + ["after"])
    assert results["after"][2]["verdict"] in ("pass", "fail")  # the worker kept going
    for frame_id, (code, _, _) in cases.items():
        key, _, body = results[frame_id]
        assert key == "error.line2.cam9" and body["error"]["code"] == code, (frame_id, body["error"])

    dead = {props.message_id: (key, props, body) for key, props, body in line.dead_letters(len(cases))}
    assert sorted(dead) == sorted(cases)
    for frame_id, (code, body, props) in cases.items():
        key, dead_props, dead_body = dead[frame_id]
        assert dead_body == body and key == "line2.cam9"  # the capture itself, untouched
        assert dead_props.content_type == props["content_type"]
        assert dead_props.headers["x-inspector-error-code"] == code
        assert dead_props.headers["shift"] == "night"
        for name, value in props.get("headers", {}).items():
            assert dead_props.headers[name] == value


def test_a_frame_without_a_message_id_gets_one_that_survives_redelivery():
    from types import SimpleNamespace

    from inspector.messages import parse_capture

    props = SimpleNamespace(headers={"captured_at": CAPTURED_AT}, message_id=None, timestamp=None, content_type=None)
    first = parse_capture("line1.cam1", props, b"pixels", redelivered=False)
    again = parse_capture("line1.cam1", props, b"pixels", redelivered=True)
    other = parse_capture("line1.cam1", props, b"other pixels", redelivered=False)
    assert first.frame_id == again.frame_id != other.frame_id


# -- faults -------------------------------------------------------------------------------------


def _frames(count: int, size: int = 64) -> list[tuple[str, bytes, dict]]:
    bodies = [encoded(image, "PNG") for image in samples.make_images(8, seed=5, size=size)]
    return [("line1.cam1", bodies[i % 8], {"content_type": "image/png", "message_id": f"f-{i:04d}"})
            for i in range(count)]


def _assert_every_frame_answered(results: list[tuple], count: int) -> None:
    """Every frame has a result; a frame answered twice says so on the repeat."""
    seen: Counter = Counter()
    for _, _, body in results:
        if seen[body["frame_id"]]:
            assert body["redelivered"] is True, body
        seen[body["frame_id"]] += 1
    assert set(seen) == {f"f-{i:04d}" for i in range(count)}
    assert all(body["verdict"] in ("pass", "fail") for _, _, body in results)


def test_connections_closed_by_the_broker_mid_stream_lose_nothing(fitted, line, start):
    running = start(fitted, prefetch=32)
    line.publish(_frames(300))
    first = line.collect(60)
    assert len(first) == 60
    close_all_connections()
    rest = line.collect(300 - 60, timeout=120)
    # repeats are allowed (at least once), and are marked; collect whatever repeats came too
    results = first + rest + line.collect(10_000, timeout=3.0)
    _assert_every_frame_answered(results, 300)
    assert running.consumer.generation >= 2  # it really reconnected
    assert line.queue_depth() == 0


def test_sigterm_mid_stream_exits_0_and_loses_nothing(fitted, line, prefix, tmp_path, start):
    path = worker_config(tmp_path, fitted, prefix, prefetch=32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
    process = subprocess.Popen([sys.executable, "-m", "inspector.cli", "run", "--config", str(path)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("ready: queue" in line_ for line_ in output) and time.monotonic() < deadline:
            assert process.poll() is None, "".join(output)
            time.sleep(0.2)
        line.publish(_frames(200))
        before = line.collect(30)
        assert len(before) == 30
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, "".join(output)
        assert time.monotonic() - stopped_at < 25
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(timeout=5)
    log = "".join(output)
    assert "SIGTERM received" in log and "stopped" in log and "Traceback" not in log
    settled = before + line.collect(10_000, timeout=2.0)
    remaining = line.queue_depth()
    assert len(settled) + remaining >= 200  # held frames were finished, the rest wait in the queue
    start(fitted)  # a fresh worker takes the rest
    results = settled + line.collect(200 - len(settled), timeout=120) + line.collect(10_000, timeout=2.0)
    _assert_every_frame_answered(results, 200)


# -- models -------------------------------------------------------------------------------------


def _new_version(store: Path, offset_shift: float, corrupt: bool = False, name: str = "default") -> str:
    """A new current version of `name`: the fitted `default` with its logistic moved, so its scores differ."""
    model_store = ModelStore(store)
    info = model_store.load_path("default")
    plugin = DfkdePlugin.load(info.path, torch.device("cpu"))
    plugin.model.threshold_offset += offset_shift
    scale = plugin.model.calibration  # a calibrated version's probability follows its calibration scores
    plugin.model.calibration = scale and ConformalScale(scale.scores + offset_shift, scale.k, scale.threshold)
    manifest = {k: v for k, v in info.manifest.items()
                if k not in ("schema", "name", "version", "created_at", "files", "sizes", "checksum")}
    time.sleep(1.1)  # version ids have one-second resolution
    new = model_store.write(name, plugin.save, manifest)
    if corrupt:
        state = next(p for p in new.path.iterdir() if p.suffix == ".safetensors")
        data = bytearray(state.read_bytes())
        data[-100] ^= 0xFF
        state.write_bytes(bytes(data))
    return new.version


class Stream:
    """Publishes frames at a steady rate from a thread until stopped; remembers what it sent."""

    def __init__(self, line: Line, hz: float = 20.0) -> None:
        self.line, self.period, self.sent = line, 1.0 / hz, 0
        self.frames = _frames(5000)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Stream":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set() and self.sent < len(self.frames):
            self.line.publish(self.frames[self.sent : self.sent + 4])
            self.sent += 4
            time.sleep(4 * self.period)


def test_a_version_announced_mid_stream_serves_within_seconds_and_nothing_is_lost(store, line, start):
    running = start(store, store_poll_s=0)
    old = ModelStore(store).current("default")
    with Stream(line) as stream:
        time.sleep(2)
        new = _new_version(store, offset_shift=5.0)
        announced = time.monotonic()
        line.announce(announcement("default", new, "dfkde", "refit"))
        served_at, results = None, []
        while time.monotonic() - announced < 30 and served_at is None:
            for result in line.collect(10, timeout=0.5):
                results.append(result)
                if result[2]["model"]["version"] == new:
                    served_at = time.monotonic()
        time.sleep(1)
    assert served_at is not None and served_at - announced < 15, "the new version did not come into service"
    results += line.collect(stream.sent - len(results), timeout=60)  # the rest; those seen above are not read twice
    _assert_every_frame_answered(results, stream.sent)
    versions = Counter(body["model"]["version"] for _, _, body in results)
    assert set(versions) <= {old, new}
    sent_ids = {f"f-{i:04d}" for i in range(stream.sent)}
    assert {body["frame_id"] for _, _, body in results} <= sent_ids
    assert running.models.get("default").version == new
    assert running.metrics.registry.get_sample_value(
        "inspector_model_reloads_total", {"model": "default", "outcome": "success"}) == 1


def test_heartbeats_flow_during_a_batch_longer_than_the_heartbeat(fitted, line, start, tmp_path, monkeypatch):
    monkeypatch.setenv("INSPECTOR_BROKER__HEARTBEAT_S", "1")
    running = start(fitted)
    served = running.models.get("default")
    score = served.plugin.score

    def slow_score(batch):
        time.sleep(4)  # four heartbeat intervals: RabbitMQ drops a silent connection after two
        return score(batch)

    monkeypatch.setattr(served.plugin, "score", slow_score)
    line.publish(_frames(3))
    results = line.collect(3, timeout=30)
    _assert_every_frame_answered(results, 3)
    assert running.consumer.generation == 1
    assert running.metrics.registry.get_sample_value("inspector_broker_reconnects_total") == 0


# -- operator mistakes ----------------------------------------------------------------------------


def _run(tmp_path, path, env=None, timeout=90):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
    return subprocess.run([sys.executable, "-m", "inspector.cli", "run", "--config", str(path)], cwd=tmp_path,
                          env={**environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def test_start_up_failures_exit_with_one_clear_line(fitted, prefix, tmp_path):
    path = worker_config(tmp_path, fitted, prefix, start_timeout_s=3.0)
    unreachable = _run(tmp_path, path, {"INSPECTOR_BROKER__URL": "amqp://guest@127.0.0.1:5999/%2F"})
    assert unreachable.returncode == 1, unreachable.stderr
    assert "cannot reach RabbitMQ at amqp://127.0.0.1:5999/%2F after 3 s" in unreachable.stderr

    refused = _run(tmp_path, path, {"INSPECTOR_BROKER__PASSWORD": "not-the-password"})
    assert refused.returncode == 2, refused.stderr
    assert "refused the login" in refused.stderr and "INSPECTOR_BROKER__PASSWORD" in refused.stderr

    for result in (unreachable, refused):
        assert "Traceback" not in result.stderr


def test_a_worker_with_no_model_to_serve_runs_not_ready_and_says_how_to_fit_one(prefix, tmp_path):
    """Exiting would only restart into the same empty store (a crash loop): it runs, says why, answers
    its frames model_unavailable, and takes up the first version a refit stores."""
    path = worker_config(tmp_path, tmp_path / "no-store", prefix)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
    process = subprocess.Popen([sys.executable, "-m", "inspector.cli", "run", "--config", str(path)], cwd=tmp_path,
                               env=environ, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while not any("ready: queue" in text for text in output) and time.monotonic() < deadline:
            assert process.poll() is None, "".join(output)
            time.sleep(0.2)
        text = "".join(output)
        assert "no model can serve" in text and "inspector refit" in text, text
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        reader.join(timeout=5)
    assert "Traceback" not in "".join(output)


def test_sigterm_while_waiting_for_the_broker_exits_0_promptly(fitted, prefix, tmp_path):
    path = worker_config(tmp_path, fitted, prefix, start_timeout_s=120.0)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "inspector.cli", "run", "--config", str(path)], cwd=tmp_path, text=True,
        env={**environ, "INSPECTOR_BROKER__URL": "amqp://guest@127.0.0.1:5999/%2F"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("; trying amqp" in text for text in output):  # models loaded, retrying the broker
            assert time.monotonic() < deadline and process.poll() is None, "".join(output)
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(timeout=5)
    out = "".join(output)
    assert process.returncode == 0, out
    assert "SIGTERM received" in out and "Traceback" not in out


@pytest.mark.slow
def test_a_broker_restart_mid_stream_loses_nothing(fitted, line, start):
    """RabbitMQ itself stops and starts again (the queue is durable): the worker waits, reconnects,
    re-declares, and every capture gets its result."""
    running = start(fitted, prefetch=32, reconnect_max_s=2.0)
    line.publish(_frames(300))
    first = line.collect(60)
    subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, capture_output=True, timeout=120)
    try:
        time.sleep(5)  # the worker retries against a broker that is down
    finally:
        subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, capture_output=True, timeout=120)
    results = first + line.collect(300 - len(first), timeout=180) + line.collect(10_000, timeout=3.0)
    _assert_every_frame_answered(results, 300)
    assert running.consumer.generation >= 2


# -- what Prometheus sees -------------------------------------------------------------------------


def _status(port: int, path: str) -> int:
    return http_status(port, path)[0]


def test_a_scrape_after_real_traffic_counts_what_was_sent(fitted, line, prefix, tmp_path):
    from inspector.worker.metrics import Metrics

    settings = config.load(worker_config(tmp_path, fitted, prefix))
    metrics = Metrics(settings.metrics)
    port = metrics.serve()
    running = Worker(settings, metrics)
    assert _status(port, "/healthz") == 200 and _status(port, "/readyz") == 503  # nothing loaded yet
    running.start()
    try:
        assert _status(port, "/readyz") == 200
        png = encoded(samples.make_images(1, seed=2, size=SIZE)[0], "PNG")
        frames = [(f"line1.cam{i % 2 + 1}", png, {"content_type": "image/png", "message_id": f"g{i}"})
                  for i in range(12)]
        frames += [("line2.cam7", b"", {"content_type": "image/png", "message_id": f"e{i}"}) for i in range(2)]
        frames += [("line2.cam7", b"x", {"content_type": "text/plain", "message_id": "t0"})]
        line.publish(frames)
        results = by_id(line.collect(len(frames)))
        assert len(results) == 15
        time.sleep(0.5)  # metrics are recorded as the confirms arrive
        m = scrape(port)
    finally:
        running.stop(grace_s=5)
        assert _status(port, "/readyz") == 503  # disconnected
        metrics.close()

    version = ModelStore(fitted).current("default")
    verdicts = Counter((f"line1.cam{int(k[1:]) % 2 + 1}", results[k][2]["verdict"]) for k in results if k[0] == "g")
    for (cam, verdict), count in verdicts.items():
        labels = (("camera", cam.split(".")[1]), ("line", "line1"), ("model", "default"), ("verdict", verdict))
        assert m[("inspector_frames_total", labels)] == count
    error_labels = (("camera", "cam7"), ("line", "line2"), ("model", "default"), ("verdict", "error"))
    assert m[("inspector_frames_total", error_labels)] == 3
    assert m[("inspector_errors_total", (("reason", "empty_body"),))] == 2
    assert m[("inspector_errors_total", (("reason", "unsupported_content_type"),))] == 1
    assert m[("inspector_errors_total", (("reason", "scoring_failed"),))] == 0
    assert m[("inspector_dead_letters_total", (("reason", "empty_body"),))] == 2
    assert m[("inspector_anomaly_probability_count", (("line", "line1"), ("model", "default")))] == 12
    probabilities = sum(results[k][2]["anomaly_probability"] for k in results if k[0] == "g")
    key = ("inspector_anomaly_probability_sum", (("line", "line1"), ("model", "default")))
    assert m[key] == pytest.approx(probabilities)
    assert m[("inspector_frame_latency_seconds_count", (("model", "default"),))] == 15
    assert m[("inspector_batch_size_sum", (("model", "default"),))] == 12
    assert m[("inspector_stage_seconds_count", (("stage", "infer"),))] >= 1
    assert m[("inspector_stage_seconds_count", (("stage", "publish"),))] == 15
    assert m[("inspector_model_info", (("model", "default"), ("plugin", "dfkde"), ("version", version)))] == 1
    assert m[("inspector_model_threshold", (("model", "default"),))] == 0.5
    assert m[("inspector_model_reloads_total", (("model", "default"), ("outcome", "failed")))] == 0
    assert m[("inspector_broker_connected", ())] == 1
    assert m[("inspector_inflight_frames", ())] == 0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_soak_a_steady_stream_with_bad_frames_answers_everything_and_memory_stays_flat(fitted, line, start):
    """Two minutes of a steady line (good frames, and one frame in ten bad or hostile) through one worker:
    every frame answered exactly once, and the process does not grow once warm."""
    running = start(fitted, prefetch=32)
    good = _frames(8)
    odd = [  # (routing key, body, properties, error code or None when it is still scored)
        ("line1.cam1", b"", {"content_type": "image/png"}, "empty_body"),
        ("line1.cam1", b"[" * 5000, {"content_type": "application/json"}, "json_malformed"),
        (good[0][0], good[0][1], {**good[0][2], "headers": {"captured_at": "0001-01-01T00:00:00+01:00"}}, None),
        ("L" * 250 + ".cam1", good[1][1], good[1][2], None),
    ]
    frames, sent, rss, expected_errors = [], 0, [], Counter()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        batch = []
        for _ in range(10):
            frame_id = f"s-{sent:06d}"
            if sent % 10 == 9:
                key, body, props, code = odd[(sent // 10) % len(odd)]
                batch.append((key, body, {**props, "message_id": frame_id}))
                expected_errors[code] += code is not None
            else:
                key, body, props = good[sent % 8]
                batch.append((key, body, {**props, "message_id": frame_id}))
            sent += 1
        line.publish(batch)
        frames += batch
        time.sleep(0.4)  # about 25 frames a second
        if sent % 500 == 0:
            rss.append(_rss_bytes())
    results = line.collect(sent, timeout=120)
    counts = Counter(body["frame_id"] for _, _, body in results)
    assert len(counts) == sent and set(counts.values()) == {1}
    errors = Counter(body["error"]["code"] for _, _, body in results if body["verdict"] == "error")
    assert errors == Counter({code: n for code, n in expected_errors.items() if code})
    assert len(line.dead_letters(sum(errors.values()), timeout=30)) == sum(errors.values())
    assert running.consumer.generation == 1 and running.consumer.faults == 0
    warm = rss[len(rss) // 3 :]  # after the first third: allocator pools and caches are filled
    assert max(warm) - min(warm) < 64 * 1024 * 1024, [r // (1 << 20) for r in rss]
