"""The worker's own logic on a StubConsumer, no broker: scoring and answering, batching, error answers, model
reloads, reconnects, an ordered shutdown, bugs survived, and the stage hooks. Models are the null plugin
(no fit: every frame gets the stored figures), so each test runs in well under a second of its own.
What only RabbitMQ shows (confirms, redelivery by the broker, dead-letter properties, alarms, topology)
stays in test_worker.py, test_consumer.py, test_faults.py and test_contract.py."""

from __future__ import annotations

import inspect
import json
import logging
import os
import struct
import threading
import time
import zlib

import pytest

from inspector.broker import announcement
from inspector.stores import ModelStore
from inspector.tools import samples
from inspector.worker.consumer import Consumer
from inspector.worker.evidence import Evidence
from inspector.worker.hooks import STAGES, StageHooks
from inspector.worker.stubconsumer import StubConsumer
from tests.workerkit import encoded, write_null_version

NULL = '[models.default]\nplugin = "null"\n'
CAPTURED_AT = "2026-11-28T10:15:01.120Z"


@pytest.fixture(scope="module")
def null_store(tmp_path_factory):
    """A store whose `default` is a null version scoring every frame 0.25 (raw 1.5), under the threshold."""
    store = tmp_path_factory.mktemp("null") / "models"
    write_null_version(store, "default", probability=0.25, score=1.5)
    return store


@pytest.fixture
def store(null_store, tmp_path):
    """A copy of the null store this test may change."""
    import shutil

    return shutil.copytree(null_store, tmp_path / "models")


@pytest.fixture(scope="module")
def png():
    return encoded(samples.make_images(1, seed=4, size=64)[0], "PNG")


def metric(worker, name, **labels):
    return worker.metrics.registry.get_sample_value(name, labels) or 0


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class Gate(StageHooks):
    """Holds every `stage` until opened: a batch is held on the scoring thread while a test acts."""

    def __init__(self, stage: str = "score") -> None:
        self.stage, self.open, self.entered = stage, threading.Event(), threading.Event()

    def begin(self, stage: str) -> None:
        if stage == self.stage:
            self.entered.set()
            self.open.wait(timeout=30)


# -- scoring and answering ------------------------------------------------------------------------


def test_every_frame_is_scored_answered_and_acked(null_store, stub_start, png):
    worker = stub_start(null_store, NULL, batch_size=4)
    stub = worker.consumer
    for i in range(10):
        stub.deliver(png, f"line1.cam{i % 2}", content_type="image/png", message_id=f"f{i}",
                     headers={"captured_at": CAPTURED_AT, "lot": "A7"})
    stub.join()
    version = ModelStore(null_store).current("default")
    answers = stub.answers()
    assert sorted(answers) == [f"f{i}" for i in range(10)] and len(stub.results) == 10
    for published in stub.results:
        body = published.body
        assert (body["anomaly_probability"], body["anomaly_score"], body["verdict"]) == (0.25, 1.5, "pass")
        assert published.routing_key == f"pass.{body['line_id']}.{body['camera_id']}"
        assert body["model"] == {"name": "default", "plugin": "null", "version": version}
        assert body["meta"] == {"lot": "A7"} and body["captured_at"] == CAPTURED_AT and body["error"] is None
    assert [how for how, _ in stub.events].count("acked") == 10 and stub.acked
    assert stub.ledger.frames == 0 and stub.dead_letters == [] and stub.faults == 0
    assert worker.scored == 10
    assert metric(worker, "inspector_frames_total", line="line1", camera="cam0", model="default",
                  verdict="pass") == 5
    assert metric(worker, "inspector_stage_seconds_count", stage="publish") == 10


def test_frames_are_batched_per_model_up_to_the_batch_size(store, stub_start, png):
    write_null_version(store, "housing", probability=0.6)
    worker = stub_start(store, NULL + '[models.housing]\nplugin = "null"\n', batch_size=4, max_batch_wait_ms=1000,
                        routes=[{"match": "line2.*", "model": "housing"}])
    stub = worker.consumer
    for i in range(8):  # interleaved: a batch never mixes models
        stub.deliver(png, f"line{i % 2 + 1}.cam1", content_type="image/png", message_id=f"f{i}")
    stub.join()
    for model in ("default", "housing"):
        assert metric(worker, "inspector_batch_size_count", model=model) == 1
        assert metric(worker, "inspector_batch_size_sum", model=model) == 4
    started = time.monotonic()
    for i in range(3):  # never a full batch: it goes when its oldest frame has waited max_batch_wait_ms
        stub.deliver(png, "line1.cam1", content_type="image/png", message_id=f"g{i}")
    stub.join()
    assert time.monotonic() - started >= 0.9
    assert metric(worker, "inspector_batch_size_count", model="default") == 2
    assert metric(worker, "inspector_batch_size_sum", model="default") == 7
    assert {body["model"]["name"] for body in stub.answers().values()} == {"default", "housing"}


def test_each_capture_is_scored_by_the_model_its_header_or_route_names(store, stub_start, png):
    housing = write_null_version(store, "housing", probability=0.6)
    default = ModelStore(store).current("default")
    worker = stub_start(store, NULL + '[models.housing]\nplugin = "null"\nthreshold = 0.9\n'
                        '[models.spare]\nplugin = "null"\n', routes=[{"match": "line2.*", "model": "housing"}])
    frames = {  # frame id: (routing key, headers, model expected)
        "plain": ("line1.cam1", {}, ("default", default)),
        "routed": ("line2.cam1", {}, ("housing", housing)),
        "named": ("line1.cam1", {"model": "housing"}, ("housing", housing)),
        "named-over-route": ("line2.cam1", {"model": "default"}, ("default", default)),
    }
    for frame_id, (key, headers, _) in frames.items():
        worker.consumer.deliver(png, key, content_type="image/png", message_id=frame_id, headers=headers)
    worker.consumer.deliver(png, "line1.cam1", content_type="image/png", message_id="spare", headers={"model": "spare"})
    worker.consumer.join()
    results = worker.consumer.answers()
    for frame_id, (_, _, (name, version)) in frames.items():
        body = results[frame_id]
        assert (body["model"]["name"], body["model"]["version"]) == (name, version), frame_id
        assert body["threshold"] == (0.9 if name == "housing" else 0.5)
        assert body["anomaly_probability"] == (0.6 if name == "housing" else 0.25)
    assert results["spare"]["error"]["code"] == "model_unavailable"  # configured, never fitted


# -- bad input -------------------------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes whose PNG header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + data + chunk(b"IEND", b"")


def test_each_kind_of_bad_input_gets_its_error_code_and_a_dead_letter(null_store, stub_start, tmp_path, png):
    allowed = tmp_path / "frames"
    allowed.mkdir()
    (tmp_path / "secret.png").write_bytes(png)
    os.symlink(tmp_path / "secret.png", allowed / "link.png")
    uri = lambda path: json.dumps({"image_uri": f"file://{path}"}).encode()  # noqa: E731
    raw = {"content_type": "image/x-raw"}
    cases = {  # frame id: (expected code, body, properties)
        "empty": ("empty_body", b"", {"content_type": "image/png"}),
        "text": ("unsupported_content_type", b"hello", {"content_type": "text/plain"}),
        "garbage": ("image_undecodable", os.urandom(3000), {"content_type": "image/jpeg"}),
        "truncated": ("image_undecodable", png[: len(png) // 2], {"content_type": "image/png"}),
        "no-height": ("raw_headers_missing", b"\0" * 100, {**raw, "headers": {"width": 10, "pixel_format": "mono8"}}),
        "yuv": ("raw_headers_invalid", b"\0" * 100,
                {**raw, "headers": {"width": 10, "height": 10, "pixel_format": "yuv422"}}),
        "short": ("raw_size_mismatch", b"\0" * 99,
                  {**raw, "headers": {"width": 10, "height": 10, "pixel_format": "mono8"}}),
        "huge-raw": ("image_too_many_pixels", b"\0" * 100,
                     {**raw, "headers": {"width": 30000, "height": 30000, "pixel_format": "mono8"}}),
        "bomb": ("image_too_many_pixels", png_claiming(30000, 30000), {"content_type": "image/png"}),
        "big": ("image_too_large", b"\0" * 300_000, {**raw, "headers": {"width": 1000, "height": 300,
                                                                         "pixel_format": "mono8"}}),
        "json": ("json_malformed", b"{not json", {"content_type": "application/json"}),
        "outside": ("uri_not_allowed", uri("/etc/hostname"), {"content_type": "application/json"}),
        "dotdot": ("uri_not_allowed", uri(f"{allowed}/../secret.png"), {"content_type": "application/json"}),
        "symlink": ("uri_not_allowed", uri(f"{allowed}/link.png"), {"content_type": "application/json"}),
        "missing": ("file_not_found", uri(f"{allowed}/missing.png"), {"content_type": "application/json"}),
        "b64": ("base64_invalid", b'{"image_b64": "@@not base64@@"}', {"content_type": "application/json"}),
        "ghost": ("model_unknown", png, {"content_type": "image/png", "headers": {"model": "ghost"}}),
    }
    worker = stub_start(null_store, NULL, allowed_roots=[str(allowed)], max_image_bytes=200_000,
                        max_image_pixels=1_000_000)
    stub = worker.consumer
    for frame_id, (_, body, props) in cases.items():
        stub.deliver(body, "line2.cam9", content_type=props["content_type"], message_id=frame_id,
                     headers={"shift": "night", **props.get("headers", {})})
    stub.deliver(png, "line2.cam9", content_type="image/png", message_id="after")
    stub.join()

    results = {published.body["frame_id"]: published for published in stub.results}
    assert sorted(results) == sorted([*cases, "after"])
    assert results["after"].body["verdict"] == "pass"  # the worker kept going
    for frame_id, (code, _, _) in cases.items():
        published = results[frame_id]
        body = published.body
        assert published.routing_key == "error.line2.cam9"
        assert body["verdict"] == "error" and body["error"]["code"] == code, (frame_id, body["error"])
        assert body["error"]["message"], frame_id
        assert body["anomaly_probability"] is None and body["anomaly_score"] is None
        assert body["meta"] == {"shift": "night"}
    dead = {delivery.properties.message_id: (code, delivery) for code, _message, delivery in stub.dead_letters}
    assert sorted(dead) == sorted(cases)
    for frame_id, (code, body, _) in cases.items():
        assert dead[frame_id][0] == code and dead[frame_id][1].body == body  # the capture itself, untouched
    assert metric(worker, "inspector_dead_letters_total", reason="uri_not_allowed") == 3
    assert stub.faults == 0 and worker.watchdog.check() is None


class BrokenOnce(Evidence):
    """An evidence archive whose first ticket raises: a bug outside the plugin, inside the scoring path."""

    failed = False

    def ticket(self, *args, **kwargs):
        if not self.failed:
            self.failed = True
            raise RuntimeError("a bug outside the plugin")
        return super().ticket(*args, **kwargs)


def test_a_bug_in_scoring_answers_the_batch_with_errors_and_the_worker_goes_on(null_store, stub_start, png, tmp_path):
    from inspector import config
    from inspector.worker.metrics import Metrics
    from tests.workerkit import worker_config

    settings = config.load(worker_config(tmp_path, null_store, "unused", NULL))
    metrics = Metrics(settings.metrics)
    broken = BrokenOnce(settings.evidence, metrics)
    worker = stub_start(null_store, NULL, parts={"metrics": metrics, "evidence": broken})
    stub = worker.consumer
    stub.deliver(png, content_type="image/png", message_id="first")
    stub.join()
    body = stub.answers()["first"]
    assert body["error"]["code"] == "internal_error" and "a bug outside the plugin" in body["error"]["message"]
    assert [code for code, _, _ in stub.dead_letters] == ["internal_error"]
    for i in range(2):
        stub.deliver(png, content_type="image/png", message_id=f"later{i}")
    stub.join()
    assert {stub.answers()[f"later{i}"]["verdict"] for i in range(2)} == {"pass"}
    assert worker.watchdog.check() is None and stub.faults == 0


# -- models -----------------------------------------------------------------------------------------


def test_an_announced_version_serves_the_next_frames(store, stub_start, png):
    worker = stub_start(store, NULL, store_poll_s=0)
    stub = worker.consumer
    new = write_null_version(store, "default", probability=0.75)
    stub.control("model.default", announcement("default", new, "null", "refit"))
    wait_for(lambda: worker.models.get("default").version == new)
    stub.deliver(png, content_type="image/png", message_id="after")
    stub.join()
    body = stub.answers()["after"]
    assert (body["anomaly_probability"], body["verdict"], body["model"]["version"]) == (0.75, "fail", new)
    assert stub.results[0].routing_key == "fail.line1.cam1"
    assert metric(worker, "inspector_model_reloads_total", model="default", outcome="success") == 1


def test_a_corrupt_version_is_refused_and_the_old_one_keeps_scoring(store, stub_start, png):
    worker = stub_start(store, NULL, store_poll_s=0)
    stub = worker.consumer
    old = ModelStore(store).current("default")
    bad = ModelStore(store).write("default", lambda folder: write_null_state(folder, 0.75), {"plugin": "null"})
    (bad.path / "null.json").write_text('{"probability": 0.99, "score": 0.0}')  # not the bytes its checksum names
    stub.control("model.default", announcement("default", bad.version, "null", "refit"))
    failed = lambda: metric(worker, "inspector_model_reloads_total", model="default", outcome="failed")  # noqa: E731
    wait_for(lambda: failed() == 1)
    for i in range(5):
        stub.deliver(png, content_type="image/png", message_id=f"f{i}")
    stub.join()
    assert {body["model"]["version"] for body in stub.answers().values()} == {old}
    stub.control("model.default", announcement("default", bad.version, "null", "refit"))  # asked again: not retried
    time.sleep(0.5)
    assert failed() == 1 and worker.models.get("default").version == old


def write_null_state(folder, probability):
    (folder / "null.json").write_text(json.dumps({"probability": probability, "score": 0.0}))
    return ["null.json"]


def test_a_malformed_or_foreign_announcement_is_ignored(null_store, stub_start, png):
    worker = stub_start(null_store, NULL, store_poll_s=0)
    for body in (b"{not json", b'{"model": 7}', b"x" * 70_000, json.dumps({"model": "other"}).encode()):
        worker.consumer.control("model.x", body)
    worker.consumer.deliver(png, content_type="image/png", message_id="f")
    worker.consumer.join()
    assert worker.consumer.answers()["f"]["verdict"] == "pass" and worker.consumer.faults == 0
    assert metric(worker, "inspector_model_reloads_total", model="default", outcome="failed") == 0


# -- the connection and the end ------------------------------------------------------------------------


def test_after_a_reconnect_answers_of_the_old_connection_are_dropped_and_the_captures_scored_again(
        null_store, stub_start, png):
    gate = Gate("score")
    worker = stub_start(null_store, NULL, hooks=gate, batch_size=8, max_batch_wait_ms=20)
    stub = worker.consumer
    for i in range(3):
        stub.deliver(png, content_type="image/png", message_id=f"f{i}")
    assert gate.entered.wait(10)
    stub.reconnect()
    wait_for(lambda: stub.generation == 2)
    gate.open.set()
    stub.join()
    assert sorted(p.body["frame_id"] for p in stub.results) == ["f0", "f1", "f2"]  # once each, from the new one
    assert all(p.body["redelivered"] is True for p in stub.results)
    assert [how for how, _ in stub.events].count("stale") == 3
    assert metric(worker, "inspector_broker_reconnects_total") == 1


def test_stop_finishes_the_frames_held_then_closes(null_store, stub_start, png):
    gate = Gate("score")
    worker = stub_start(null_store, NULL, hooks=gate, batch_size=8, max_batch_wait_ms=20)
    stub = worker.consumer
    for i in range(5):
        stub.deliver(png, content_type="image/png", message_id=f"held{i}")
    assert gate.entered.wait(10)
    stopper = threading.Thread(target=worker.stop, kwargs={"grace_s": 10})
    stopper.start()
    wait_for(lambda: ("stop consuming", "") in stub.events)
    stub.deliver(png, content_type="image/png", message_id="late")  # after stop_consuming: left in the queue
    gate.open.set()
    stopper.join(timeout=15)
    assert not stopper.is_alive() and stub.stopped.is_set() and not stub.is_alive()
    events = [event for event in stub.events if event[0] != "delivered"]
    closed = events.index(("closed", ""))
    assert closed == len(events) - 1
    assert sorted(frame for how, frame in events[:closed] if how == "acked") == [f"held{i}" for i in range(5)]
    assert [pushed.properties.message_id for pushed in stub.waiting] == ["late"]
    assert "late" not in stub.answers()


def test_stop_closes_after_its_grace_period_with_frames_still_held(null_store, stub_start, png):
    gate = Gate("score")
    worker = stub_start(null_store, NULL, hooks=gate)
    try:
        worker.consumer.deliver(png, content_type="image/png", message_id="stuck")
        assert gate.entered.wait(10)
        started = time.monotonic()
        worker.stop(grace_s=0.5)
        assert time.monotonic() - started < 3
        assert worker.consumer.stopped.is_set() and worker.consumer.events[-1] == ("closed", "")
        assert worker.consumer.results == [] and worker.consumer.acked == []  # the broker redelivers it
    finally:
        gate.open.set()


# -- the stage hooks -----------------------------------------------------------------------------------


class Recorder(StageHooks):
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self._lock = threading.Lock()

    def begin(self, stage: str) -> None:
        with self._lock:
            self.calls.append(("begin", stage, threading.current_thread().name))

    def end(self, stage: str) -> None:
        with self._lock:
            self.calls.append(("end", stage, threading.current_thread().name))

    def connection(self, up: bool, generation: int) -> None:
        with self._lock:
            self.calls.append(("connection", up, generation))


def test_hooks_see_every_stage_of_every_frame_on_its_own_thread(null_store, stub_start, png):
    hooks = Recorder()
    worker = stub_start(null_store, NULL, hooks=hooks, batch_size=4)
    assert worker.consumer.hooks is hooks
    for i in range(4):
        worker.consumer.deliver(png, content_type="image/png", message_id=f"f{i}")
    worker.consumer.deliver(b"", content_type="image/png", message_id="empty")
    worker.consumer.join()
    calls = list(hooks.calls)
    assert calls[0] == ("connection", True, 1)
    begun = [(stage, thread) for kind, stage, thread in calls if kind == "begin"]
    count = lambda name: sum(stage == name for stage, _ in begun)  # noqa: E731
    for stage in ("consume", "hand-off", "parse", "result encode", "settled"):
        assert count(stage) == 5, stage
    assert count("prepare") == 4 and count("score") >= 1
    assert all(count(stage) >= 1 for stage in STAGES), {stage: count(stage) for stage in STAGES}
    threads = {stage: {thread.split("_")[0] for s, thread in begun if s == stage} for stage in STAGES}
    for stage in ("consume", "hand-off", "publish", "confirm", "ack", "settled"):
        assert threads[stage] == {"inspector-broker"}, (stage, threads[stage])
    assert threads["parse"] == threads["prepare"] == {"inspector-decode"} and threads["score"] == {"inspector-score"}
    stacks: dict[str, list[str]] = {}  # per thread, begin and end pair up and nest
    inside: dict[str, set] = {}
    for kind, stage, thread in (call for call in calls if call[0] != "connection"):
        stack = stacks.setdefault(thread, [])
        if kind == "begin":
            inside.setdefault(stage, set()).add(stack[-1] if stack else None)
            stack.append(stage)
        else:
            assert stack.pop() == stage
    assert all(stack == [] for stack in stacks.values())
    assert inside["hand-off"] == {"consume"} and inside["settled"] == {"ack"} and inside["consume"] == {None}


class Broken(StageHooks):
    def begin(self, stage: str) -> None:
        raise RuntimeError(f"hook bug at {stage}")


def test_a_failing_hook_is_logged_once_per_stage_and_every_frame_is_still_answered(null_store, stub_start, png,
                                                                                     caplog):
    caplog.set_level(logging.ERROR, logger="inspector.worker.hooks")
    worker = stub_start(null_store, NULL, hooks=Broken())
    for i in range(6):
        worker.consumer.deliver(png, content_type="image/png", message_id=f"f{i}")
    worker.consumer.join()
    assert {body["verdict"] for body in worker.consumer.answers().values()} == {"pass"}
    assert len(worker.consumer.answers()) == 6 and worker.consumer.faults == 0
    consume = [r for r in caplog.records if "Broken.begin('consume',)" in r.getMessage()]
    assert len(consume) == 1 and consume[0].exc_info is not None


def test_without_hooks_the_worker_runs_the_plain_code(null_store, stub_start):
    """No hooks, no cost: nothing is wrapped, so each stage is the very function it would be without them."""
    from inspector.messages import parse_capture
    from inspector.worker.decode import decode_capture_kind
    from inspector.worker.loop import Worker

    worker = stub_start(null_store, NULL)
    assert worker.hooks is None and worker.consumer.hooks is None
    for owner in (worker, worker.consumer):
        shadowed = [name for name in vars(owner) if hasattr(getattr(type(owner), name, None), "__stage__")]
        assert shadowed == [], shadowed
    assert worker.consumer.on_delivery.__func__ is Worker._on_delivery
    assert worker._parse_capture is parse_capture and worker._decode_capture is decode_capture_kind
    watched = stub_start(null_store, NULL, hooks=StageHooks())
    assert getattr(watched.consumer.on_delivery, "__func__", None) is not Worker._on_delivery  # it can fail


# -- the stub itself ------------------------------------------------------------------------------------


def test_the_stub_is_built_and_used_as_the_consumer_is(null_store, tmp_path):
    from inspector import config
    from tests.workerkit import worker_config

    def parameters(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls.__init__).parameters.values()]

    assert parameters(StubConsumer) == parameters(Consumer)
    assert "__init__" not in vars(StubConsumer) and "__init__" not in vars(Consumer)  # one constructor, shared
    public = {name for name in vars(Consumer) if not name.startswith("_")}
    assert public <= {name for name in vars(StubConsumer) if not name.startswith("_")}, public
    settings = config.load(worker_config(tmp_path, null_store, "unused", NULL))
    callbacks = (lambda d: None, lambda o, a: None, lambda k, b: None, lambda up: None)
    real, stub = Consumer(settings, *callbacks), StubConsumer(settings, *callbacks)
    attributes = {name for name in vars(real) if not name.startswith("_")}
    assert attributes <= set(vars(stub)), attributes - set(vars(stub))


def test_frames_decoded_unlike_every_image_of_the_fit_are_counted_and_said_once(tmp_path, stub_start, png, caplog):
    """A version fitted on PNG files: JPEG frames decode another way (reduced scale, JPEG's losses), so their
    scores are not what it was calibrated on. They are still scored, counted per kind, and logged once."""
    from inspector import config
    from inspector.tools.refit import RefitOptions, run_refit
    from tests.workerkit import worker_config

    samples.write_folder(tmp_path / "archive", 4, size=32)
    store = tmp_path / "models"
    settings = config.load(worker_config(tmp_path, store, "unused", NULL))
    fitted = run_refit(settings, RefitOptions(data=tmp_path / "archive" / "good", model="default", calibrate=False,
                                              held_out_share=0.0, announce=False))
    assert ModelStore(store).info("default", fitted.version).manifest["images"]["decoded"] == {"jpeg": 0, "full": 4}
    jpeg = encoded(samples.make_images(1, seed=4, size=64)[0], "JPEG", quality=90)
    worker = stub_start(store, NULL)
    with caplog.at_level(logging.WARNING, logger="inspector.worker.loop"):
        for i in range(3):
            worker.consumer.deliver(png, "line1.cam1", content_type="image/png", message_id=f"png{i}")
            worker.consumer.deliver(jpeg, "line1.cam1", content_type="image/jpeg", message_id=f"jpeg{i}")
        worker.consumer.join()
    assert sorted(worker.consumer.answers()) == sorted([f"png{i}" for i in range(3)] + [f"jpeg{i}" for i in range(3)])
    assert all(p.body["verdict"] == "pass" for p in worker.consumer.results)  # scored: the line keeps moving
    assert metric(worker, "inspector_frames_unlike_fit_total", model="default", decode="jpeg") == 3
    assert metric(worker, "inspector_frames_unlike_fit_total", model="default", decode="full") == 0
    said = [r.getMessage() for r in caplog.records if "fitted on full-decoded images only" in r.getMessage()]
    assert len(said) == 1 and fitted.version in said[0] and "refit from frames as the cameras send them" in said[0]


def test_a_version_without_a_record_of_its_decoding_is_not_judged(null_store, stub_start, png):
    worker = stub_start(null_store, NULL)
    jpeg = encoded(samples.make_images(1, seed=4, size=64)[0], "JPEG")
    worker.consumer.deliver(jpeg, "line1.cam1", content_type="image/jpeg", message_id="old")
    worker.consumer.join()
    assert list(worker.consumer.answers()) == ["old"]
    assert worker.consumer.results[0].body["verdict"] == "pass"  # scored as ever, not an error
    assert metric(worker, "inspector_frames_unlike_fit_total", model="default", decode="jpeg") == 0
