"""Nothing stops inspection silently, against the real RabbitMQ: hostile headers and bodies are each
answered while good frames keep scoring on the same connection; a result no queue takes is kept; the
in-flight byte budget holds; stale captures are answered unscored; and a scoring thread that dies or
hangs makes /healthz fail and the process exit non-zero."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import pika
import pytest

from inspector import config
from inspector.tools import samples
from inspector.worker.hooks import StageHooks
from inspector.worker.loop import Worker, WorkerUnhealthy
from inspector.worker.metrics import Metrics
from tests.portkit import free_port
from tests.workerkit import SIZE, encoded, http_status, scrape, worker_config

GOOD = encoded(samples.make_images(1, seed=11, size=SIZE)[0], "PNG")


class RawProperties(pika.BasicProperties):
    """Properties sent exactly as the given bytes: what another AMQP client may put on the wire."""

    def __init__(self, encoded_properties: bytes) -> None:
        super().__init__()
        self._encoded = encoded_properties

    def encode(self) -> list[bytes]:
        return [self._encoded]


def _short(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">B", len(data)) + data


def properties_with_table(table: bytes) -> RawProperties:
    """content_type image/png and the given encoded header table (its field-value pairs)."""
    flags = pika.BasicProperties.FLAG_CONTENT_TYPE | pika.BasicProperties.FLAG_HEADERS
    return RawProperties(struct.pack(">H", flags) + _short("image/png") + struct.pack(">I", len(table)) + table)


def nested_table(depth: int) -> bytes:
    """A header table nested `depth` deep, built without recursion."""
    inner = b""
    for _ in range(depth):
        inner = _short("n") + b"F" + struct.pack(">I", len(inner)) + inner
    return inner


def time_out_of_range() -> bytes:
    """A timestamp header ('T') of 2**63 - 1 seconds: no datetime holds it."""
    return _short("captured") + b"T" + struct.pack(">Q", 2**63 - 1)


def good(frame_id: str) -> tuple[str, bytes, dict]:
    return ("line1.cam1", GOOD, {"content_type": "image/png", "message_id": frame_id})


def publish_raw(line, frames: list[tuple[str, bytes, pika.BasicProperties]]) -> None:
    with line._channel() as channel:
        for key, body, properties in frames:
            channel.basic_publish(line.exchanges["captures"], key, body, properties)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_hostile_captures_are_each_answered_and_good_frames_keep_scoring(fitted, line, start):
    running = start(fitted)
    line.publish([good("warm-up")])
    assert len(line.collect(1)) == 1
    rss_before = _rss_bytes()

    hostile: list[tuple[str, bytes, dict]] = [  # (routing key, body, properties) of plain pika publishes
        ("line1.cam1", GOOD, {"content_type": "image/png", "message_id": "h-early",
                              "headers": {"captured_at": "0001-01-01T00:00:00+01:00"}}),
        ("line1.cam1", GOOD, {"content_type": "image/png", "message_id": "h-late",
                              "headers": {"captured_at": "9999-12-31T23:59:59-01:00"}}),
        ("line1.cam1", GOOD, {"content_type": "image/png", "message_id": "h-stamp", "timestamp": 2**63 - 1}),
        ("L" * 250 + ".cam1", GOOD, {"content_type": "image/png", "message_id": "h-long-line"}),
        ("line1.cam1", GOOD, {"content_type": "image/png", "message_id": b"\xff" * 255}),
        ("line1.cam1\n\x1b[31m", GOOD, {"content_type": "image/png", "message_id": "h-\n-forged log line\x1b[2J"}),
        ("line1.cam1", b"", {"content_type": "image/png", "message_id": "h-big-header",
                             "headers": {"padding": "x" * 130_900}}),  # the dead letter must trim it
        ("line1.cam1", b"[" + b"[]," * 300_000 + b"[]]", {"content_type": "application/json", "message_id": "h-json"}),
        ("line1.cam1", b'{"a":' * 50_000, {"content_type": "application/json", "message_id": "h-deep-json"}),
    ]
    raw = [
        ("line1.cam1", GOOD, properties_with_table(nested_table(600))),
        ("line1.cam1", GOOD, properties_with_table(time_out_of_range())),
    ]
    for index, frame in enumerate(hostile):
        line.publish([frame, good(f"g-{index}")])
    for index, (key, body, properties) in enumerate(raw):
        publish_raw(line, [(key, body, properties)])
        line.publish([good(f"g-raw-{index}")])
    with line._channel() as channel:  # hostile control messages: garbage and a body far too large
        # under the size cap: parsed, and too deep
        channel.basic_publish(line.exchanges["control"], "model.default", b"[" * 60_000)
        channel.basic_publish(line.exchanges["control"], "model.default", b" " * 2_000_000)
    line.publish([good("g-after-control")])

    expected = len(hostile) + len(raw) + len(hostile) + len(raw) + 1
    results = line.collect(expected, timeout=120)
    assert len(results) == expected
    by_id = {body["frame_id"]: body for _, _, body in results}
    goods = [f"g-{i}" for i in range(len(hostile))] + [f"g-raw-{i}" for i in range(len(raw))] + ["g-after-control"]
    for frame_id in goods:
        assert by_id[frame_id]["verdict"] in ("pass", "fail"), by_id[frame_id]
    codes = Counter(body["error"]["code"] for _, _, body in results if body["error"])
    assert codes["headers_undecodable"] == 2, codes
    assert codes["empty_body"] == 1 and codes["json_malformed"] + codes["image_too_large"] == 2, codes
    # out-of-range times are treated as absent; the frames are still scored
    assert by_id["h-early"]["captured_at"] is None and by_id["h-late"]["captured_at"] is None
    assert by_id["h-stamp"]["verdict"] in ("pass", "fail")
    for key, properties, body in results:
        assert len(key.encode()) <= 255 and len(properties.correlation_id.encode()) <= 255
        assert not any(ord(c) < 32 or ord(c) == 127 for c in body["frame_id"] + body["line_id"] + body["camera_id"])
    dead = line.dead_letters(sum(codes.values()), timeout=30)
    assert len(dead) == sum(codes.values())
    big = [props for _, props, _ in dead if props.headers.get("x-inspector-frame-id") == "h-big-header"]
    assert big and big[0].headers["x-inspector-headers-dropped"] == 1 and "padding" not in big[0].headers
    undecodable = [props for _, props, _ in dead if props.headers["x-inspector-error-code"] == "headers_undecodable"]
    assert len(undecodable) == 2 and all("x-inspector-original-properties-b64" in p.headers for p in undecodable)
    assert running.consumer.generation == 1, "the worker reconnected"
    assert running.consumer.faults == 0
    assert _rss_bytes() - rss_before < 400 * 1024 * 1024


def test_a_result_no_queue_takes_is_kept_on_the_dead_letter_exchange(fitted, line, start):
    running = start(fitted)
    with line._channel() as channel:
        channel.queue_unbind(line.results_queue, line.exchanges["results"], routing_key="#")
    line.publish([good("lonely")])
    kept = line.dead_letters(1, timeout=30)
    assert len(kept) == 1
    key, properties, body = kept[0]
    result = json.loads(body)
    assert result["frame_id"] == "lonely" and key == f"unroutable.{result['verdict']}.line1.cam1"
    assert properties.headers["x-inspector-unroutable"] is True
    assert properties.correlation_id == "lonely" and properties.type == "inspection.result/1"
    assert running.consumer.unroutable == 1
    deadline = time.monotonic() + 10
    while line.queue_depth() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert line.queue_depth() == 0  # the capture was acknowledged once its result was kept
    with line._channel() as channel:
        channel.queue_bind(line.results_queue, line.exchanges["results"], routing_key="#")
    line.publish([good("heard")])
    assert [body["frame_id"] for _, _, body in line.collect(1)] == ["heard"]


class SlowScoring(StageHooks):
    """Every batch's scoring takes `seconds` longer: answers come slower than captures."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def begin(self, stage: str) -> None:
        if stage == "score":
            time.sleep(self.seconds)


class HeldScoring(StageHooks):
    """Scoring waits for `release` once `hold` is set: a scoring thread stuck in the plugin."""

    def __init__(self) -> None:
        self.hold, self.release = threading.Event(), threading.Event()

    def begin(self, stage: str) -> None:
        if stage == "score" and self.hold.is_set():
            self.release.wait(60)


def test_over_the_byte_budget_no_more_captures_are_taken_until_answers_come(fitted, line, start):
    body = encoded(samples.make_images(1, seed=4, size=SIZE)[0], "BMP")  # 48 KiB, uncompressed
    budget = 2 * len(body)
    running = start(fitted, hooks=SlowScoring(0.15), prefetch=4, batch_size=1, max_inflight_bytes=budget)
    ledger = running.consumer.ledger
    peak, pauses = [0], []
    real_take, real_pause = ledger.take, running.consumer._pause

    def take(tag, size):
        taken = real_take(tag, size)
        peak[0] = max(peak[0], ledger.bytes)
        return taken

    def pause():
        pauses.append(ledger.bytes)
        real_pause()

    ledger.take, running.consumer._pause = take, pause
    line.publish([("line1.cam1", body, {"content_type": "image/bmp", "message_id": f"b-{i}"}) for i in range(30)])
    results = line.collect(30, timeout=120)
    assert sorted(b["frame_id"] for _, _, b in results) == sorted(f"b-{i}" for i in range(30))
    assert pauses, "the budget was never reached"
    # The prefetch follows the frames' size: one window (budget // frame = 2) beyond the budget at most.
    assert peak[0] <= budget + 2 * len(body)
    assert ledger.bytes == 0 and ledger.frames == 0 and not ledger.paused


def test_stale_captures_are_answered_without_scoring(fitted, line, start):
    running = start(fitted, max_frame_age_s=60.0)
    old = (datetime.now(timezone.utc) - timedelta(hours=2)).isoformat()
    line.publish([
        ("line1.cam1", GOOD, {"content_type": "image/png", "message_id": "old", "headers": {"captured_at": old}}),
        ("line1.cam1", GOOD, {"content_type": "image/png", "message_id": "fresh", "timestamp": int(time.time())}),
    ])
    results = {body["frame_id"]: body for _, _, body in line.collect(2)}
    assert results["old"]["verdict"] == "error" and results["old"]["error"]["code"] == "stale"
    assert results["old"]["anomaly_probability"] is None
    assert results["fresh"]["verdict"] in ("pass", "fail")
    assert running.scored == 1



@pytest.fixture
def watched(fitted, prefix, tmp_path):
    """A running Worker with a 5 s watchdog, its HTTP endpoints served and HeldScoring hooks: (worker, port)."""
    settings = config.load(worker_config(tmp_path, fitted, prefix, watchdog_s=5.0))
    metrics = Metrics(settings.metrics)
    port = metrics.serve()
    running = Worker(settings, metrics, hooks=HeldScoring())
    running.start()
    yield running, port
    running.stop(grace_s=3)
    metrics.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_scoring_thread_fails_healthz_and_readyz(watched, line):
    running, port = watched
    assert http_status(port, "/healthz") == (200, "ok\n")

    def dies(batcher):
        raise SystemExit("injected: the scoring loop ends")  # not an Exception: escapes every guard

    running._score_step = dies
    line.publish([good("wakes-it")])
    deadline = time.monotonic() + 15
    while running.watchdog.problem is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running.watchdog.problem == "the scoring thread has stopped"
    assert http_status(port, "/healthz") == (503, "the scoring thread has stopped\n")
    assert http_status(port, "/readyz")[0] == 503
    with pytest.raises(WorkerUnhealthy, match="scoring thread has stopped"):
        running.wait(threading.Event())


def test_a_stuck_scoring_thread_is_found_within_the_watchdog_limit(watched, line):
    running, port = watched
    held = running.hooks
    held.hold.set()
    try:
        line.publish([good("stuck")])
        started = time.monotonic()
        while running.watchdog.problem is None and time.monotonic() - started < 20:
            time.sleep(0.2)
        found_after = time.monotonic() - started
        problem = running.watchdog.problem
        assert problem is not None and "scoring thread has made no progress" in problem
        assert 5.0 <= found_after < 12.0
        assert http_status(port, "/healthz")[0] == 503
        stalls = scrape(port)
        assert stalls[("inspector_thread_stall_seconds", (("thread", "scoring"),))] >= 5.0
        assert stalls[("inspector_thread_stall_seconds", (("thread", "broker"),))] < 5.0
    finally:
        held.release.set()


def test_an_unhealthy_worker_process_exits_1_and_says_why(fitted, line, prefix, tmp_path):
    """The real `inspector run` with its scoring loop broken by an injected bug: it must not live on."""
    path = worker_config(tmp_path, fitted, prefix, watchdog_s=5.0, shutdown_grace_s=5.0)
    script = (
        "import sys\n"
        "from inspector.worker import loop\n"
        "def dies(self, batcher):\n"
        "    raise SystemExit('injected: the scoring loop ends')\n"
        "loop.Worker._score_step = dies\n"
        "from inspector.cli import main\n"
        f"sys.exit(main(['run', '--config', {str(path)!r}]))\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, text=True, capture_output=True, timeout=120,
                         env={**environ, "INSPECTOR_METRICS__PORT": str(free_port())})
    output = run.stdout + run.stderr
    assert run.returncode == 1, output
    assert "unhealthy: the scoring thread has stopped" in output
    assert "Traceback" not in output
    assert time.monotonic() - started < 90


def test_when_even_an_error_result_cannot_be_built_the_broker_dead_letters_the_capture(fitted, line, start):
    running = start(fitted)

    def broken(*args, **kwargs):
        raise RuntimeError("injected: the error result cannot be built")

    running._error_outcome = broken
    line.publish([("line1.cam1", b"", {"content_type": "image/png", "message_id": "empty"})])
    dead = line.dead_letters(1, timeout=30)
    assert len(dead) == 1
    _, properties, body = dead[0]
    assert body == b"" and properties.message_id == "empty"
    assert properties.headers["x-death"][0]["reason"] == "rejected"  # dead-lettered by the broker itself
    line.publish([good("after")])
    assert [b["frame_id"] for _, _, b in line.collect(1)] == ["after"]
    assert running.consumer.generation == 1


def test_one_decode_thread_hung_on_a_read_is_seen_while_the_others_keep_decoding(watched, line):
    """An `image_uri` on a dead network mount hangs one decode thread in open(); the others go on
    decoding other cameras' frames. Each decode is on its own clock, so the hung one is still seen."""
    running, port = watched
    release = threading.Event()
    real = running._decode_one

    def hangs_on_one(delivery):
        if delivery.properties.message_id == "on-a-dead-mount":
            release.wait(60)
        return real(delivery)

    running._decode_one = hangs_on_one
    try:
        line.publish([good("on-a-dead-mount")])
        started = time.monotonic()
        sent = 0
        while running.watchdog.problem is None and time.monotonic() - started < 20:
            line.publish([good(f"flowing-{sent}")])  # other frames keep the other decode threads busy
            sent += 1
            time.sleep(0.3)
        found_after = time.monotonic() - started
        assert running.watchdog.problem is not None and "decode thread" in running.watchdog.problem
        assert 5.0 <= found_after < 12.0
        assert http_status(port, "/healthz")[0] == 503
        answered = {body["frame_id"] for _, _, body in line.collect(sent, timeout=30)}
        assert answered == {f"flowing-{i}" for i in range(sent)}  # the others were decoded all along
    finally:
        release.set()


def test_a_worker_connected_and_under_budget_that_takes_no_captures_is_unhealthy(fitted, prefix, tmp_path,
                                                                                  monkeypatch):
    """A pause is never silent: consuming stopped without a cause (here: the consumer cancelled behind the
    books' back, as a bug would) fails /healthz within the limit, so the supervisor restarts the worker."""
    from inspector.worker import loop

    monkeypatch.setattr(loop, "CONSUMING_LIMIT_S", 3.0)
    settings = config.load(worker_config(tmp_path, fitted, prefix, watchdog_s=5.0))
    running = Worker(settings, Metrics(settings.metrics))
    running.start()
    try:
        assert running.consumer.stuck_for() == 0
        running.consumer._ioloop.add_callback_threadsafe(running.consumer._cancel_consumer)
        deadline = time.monotonic() + 15
        while running.watchdog.problem is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert running.watchdog.problem is not None and "consuming" in running.watchdog.problem
    finally:
        running.stop(grace_s=3)
