"""The worker's metrics as Prometheus sees them: a real server, real HTTP requests, the text format parsed."""

import gc
import logging
import os
import platform
import resource
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inspector.config import MetricsSettings
from inspector.errors import FRAME_ERROR_CODES, ConfigError
from inspector.worker.metrics import Metrics

IMPORTED_AT = time.time()  # this process started before


@pytest.fixture
def served():
    """A Metrics with its server on a free port of 127.0.0.1, and a scrape function for it."""
    metrics = Metrics(MetricsSettings(host="127.0.0.1", port=0, max_label_values=3))
    port = metrics.serve()
    yield metrics, f"http://127.0.0.1:{port}"
    metrics.close()


def request(url, method="GET"):
    """(status, body, content type) of one request; HTTP errors are answers too."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5) as response:
            return response.status, response.read().decode(), response.headers["Content-Type"]
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), error.headers["Content-Type"]


def scrape(base):
    """{(sample name, frozenset of labels): value} from /metrics."""
    status, text, content_type = request(f"{base}/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def series(samples, name):
    """Label dicts of every sample called `name`."""
    return [dict(labels) for sample_name, labels in samples if sample_name == name]


def frame(metrics, verdict, probability, latency, wait, *, line="line1", camera="cam1", model="default", again=False):
    metrics.frame_done(
        line=line, camera=camera, model=model, verdict=verdict, probability=probability,
        latency_s=latency, queue_wait_s=wait, redelivered=again,
    )  # fmt: skip


def test_frame_counts_and_histograms_match_what_was_recorded(served):
    metrics, base = served
    passes, fails = [0.031, 0.12, 0.4], [0.73, 0.97]
    latencies = np.array([0.012, 0.03, 0.2, 0.8, 1.7, 0.05])
    waits = latencies / 2
    for p, lat, wait in zip(passes + fails, latencies, waits):
        frame(metrics, "pass" if p < 0.5 else "fail", p, lat, wait, again=p == 0.12)
    frame(metrics, "error", None, latencies[5], waits[5])  # the worker calls both for an error frame
    metrics.frame_error("image_undecodable")
    metrics.dead_lettered("image_undecodable")
    for size in (8, 8, 3):
        metrics.batch("default", size)
    metrics.stage("infer", 0.004)

    s = scrape(base)
    frames = {"line": "line1", "camera": "cam1", "model": "default"}
    assert value(s, "inspector_frames_total", **frames, verdict="pass") == 3
    assert value(s, "inspector_frames_total", **frames, verdict="fail") == 2
    assert value(s, "inspector_frames_total", **frames, verdict="error") == 1
    probability = {"line": "line1", "model": "default"}
    assert value(s, "inspector_anomaly_probability_count", **probability) == 5  # the error frame has none
    assert value(s, "inspector_anomaly_probability_sum", **probability) == pytest.approx(sum(passes + fails))
    assert value(s, "inspector_anomaly_probability_bucket", **probability, le="0.5") == 3
    assert value(s, "inspector_frame_latency_seconds_count", model="default") == 6
    assert value(s, "inspector_frame_latency_seconds_sum", model="default") == pytest.approx(latencies.sum())
    assert value(s, "inspector_frame_latency_seconds_bucket", model="default", le="1.0") == 5
    assert value(s, "inspector_queue_wait_seconds_sum", model="default") == pytest.approx(waits.sum())
    assert value(s, "inspector_redelivered_frames_total", model="default") == 1
    assert value(s, "inspector_errors_total", reason="image_undecodable") == 1
    assert value(s, "inspector_dead_letters_total", reason="image_undecodable") == 1
    assert value(s, "inspector_batch_size_count", model="default") == 3
    assert value(s, "inspector_batch_size_sum", model="default") == 19
    assert value(s, "inspector_stage_seconds_count", stage="infer") == 1
    assert value(s, "inspector_stage_seconds_count", stage="decode") == 0


def test_error_reasons_and_dead_letters_exist_at_zero_from_the_start(served):
    _, base = served
    s = scrape(base)
    for code in FRAME_ERROR_CODES:
        assert value(s, "inspector_errors_total", reason=code) == 0
        assert value(s, "inspector_dead_letters_total", reason=code) == 0
    assert value(s, "inspector_broker_connected") == 0
    assert value(s, "inspector_broker_reconnects_total") == 0
    assert value(s, "inspector_inflight_frames") == 0
    assert len(series(s, "inspector_build_info")) == 1


def test_message_labels_are_capped_and_the_rest_is_other(served):
    metrics, base = served  # max_label_values=3
    for index in range(5):
        for _ in range(index + 1):
            frame(metrics, "pass", 0.1, 0.01, 0.005, camera=f"cam{index}")
    frame(metrics, "pass", 0.1, 0.01, 0.005, camera="cam0")  # admitted before the cap: still itself

    s = scrape(base)
    counts = {labels["camera"]: s[("inspector_frames_total", frozenset(labels.items()))]
              for labels in series(s, "inspector_frames_total")}  # fmt: skip
    assert counts == {"cam0": 2, "cam1": 2, "cam2": 3, "other": 4 + 5}


def test_readyz_follows_broker_and_model(served):
    metrics, base = served
    assert request(f"{base}/healthz")[:2] == (200, "ok\n")
    assert request(f"{base}/readyz")[:2] == (503, "broker disconnected\n")
    metrics.set_broker_connected(True)
    assert request(f"{base}/readyz")[:2] == (503, "no model loaded\n")
    metrics.set_model("default", "dfkde", "v1", 0.5)
    assert metrics.ready()
    assert request(f"{base}/readyz")[:2] == (200, "ready\n")
    metrics.set_broker_connected(False)
    metrics.broker_reconnected()
    assert request(f"{base}/readyz")[:2] == (503, "broker disconnected\n")
    s = scrape(base)
    assert value(s, "inspector_broker_connected") == 0
    assert value(s, "inspector_broker_reconnects_total") == 1


def test_model_info_shows_only_the_version_in_service(served):
    metrics, base = served
    metrics.set_model("default", "dfkde", "v1", 0.5)
    metrics.set_model("second", "dfkde", "s1", 0.7)
    metrics.model_reload("default", "failed")
    metrics.set_model("default", "dfkde", "v2", 0.6)
    metrics.model_reload("default", "success")

    s = scrape(base)
    info = sorted(series(s, "inspector_model_info"), key=lambda labels: labels["model"])
    assert info == [
        {"model": "default", "plugin": "dfkde", "version": "v2"},
        {"model": "second", "plugin": "dfkde", "version": "s1"},
    ]
    assert value(s, "inspector_model_threshold", model="default") == 0.6
    assert value(s, "inspector_model_reloads_total", model="default", outcome="success") == 1
    assert value(s, "inspector_model_reloads_total", model="default", outcome="failed") == 1
    assert value(s, "inspector_model_reloads_total", model="second", outcome="failed") == 0  # there before a failure


def test_head_and_unknown_paths(served):
    _, base = served
    assert request(f"{base}/metrics", method="HEAD")[:2] == (200, "")
    assert request(f"{base}/readyz", method="HEAD")[:2] == (503, "")
    assert request(f"{base}/nope")[0] == 404


def test_a_port_in_use_is_a_config_error_naming_the_key():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        metrics = Metrics(MetricsSettings(host="127.0.0.1", port=port))
        with pytest.raises(ConfigError, match=rf"metrics\.port.*127\.0\.0\.1:{port}"):
            metrics.serve()


def test_a_failing_metrics_call_is_logged_not_raised(caplog):
    metrics = Metrics(MetricsSettings(port=0))
    with caplog.at_level(logging.WARNING, logger="inspector.worker.metrics"):
        metrics.frame_done(line="l", camera="c", model="m", verdict="maybe", probability=None, latency_s=None,
                           queue_wait_s=None, redelivered=False)  # fmt: skip
        metrics.stage("resize", 0.1)
    assert "frame_done failed" in caplog.text and "stage failed" in caplog.text


def vm_rss_bytes():
    """Resident memory as the kernel reports it in /proc/self/status (VmRSS, in kB)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def cpu_seconds():
    times = os.times()
    return times.user + times.system


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process_* metrics need Linux /proc")


@needs_proc
def test_process_memory_cpu_and_file_descriptors_match_the_kernel(served):
    _, base = served
    rss, cpu_before, fds = vm_rss_bytes(), cpu_seconds(), len(os.listdir("/proc/self/fd"))
    s = scrape(base)
    cpu_after = cpu_seconds()
    assert rss / 2 < value(s, "process_resident_memory_bytes") < rss * 2
    assert value(s, "process_virtual_memory_bytes") >= value(s, "process_resident_memory_bytes")
    assert cpu_before - 0.05 <= value(s, "process_cpu_seconds_total") <= cpu_after + 0.05
    # the scrape's own sockets (server and client side) come and go around the listing
    assert abs(value(s, "process_open_fds") - fds) <= 4
    assert value(s, "process_max_fds") == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    started = value(s, "process_start_time_seconds")
    with open("/proc/uptime") as uptime:
        booted = time.time() - float(uptime.read().split()[0])
    assert booted - 1 <= started <= IMPORTED_AT + 1  # whole seconds: the kernel's boot time is one


def test_python_gc_and_platform_are_exported(served):
    _, base = served
    before = gc.get_stats()
    s = scrape(base)
    after = gc.get_stats()
    assert len(before) == 3
    for generation, (low, high) in enumerate(zip(before, after)):
        collections = value(s, "python_gc_collections_total", generation=str(generation))
        assert low["collections"] <= collections <= high["collections"], generation
        assert value(s, "python_gc_objects_collected_total", generation=str(generation)) is not None
        assert value(s, "python_gc_objects_uncollectable_total", generation=str(generation)) is not None
    (info,) = series(s, "python_info")
    assert info["version"] == platform.python_version()
    assert info["implementation"] == platform.python_implementation()


def test_each_metrics_has_its_own_runtime_collectors():
    """Several Metrics in one process (as in tests) do not clash over the process_* names."""
    first, second = Metrics(MetricsSettings(port=0)), Metrics(MetricsSettings(port=0))
    names = [{family.name for family in m.registry.collect()} for m in (first, second)]
    assert names[0] == names[1] and "python_info" in names[0]


def test_gpu_memory_has_a_series_per_cuda_device_and_none_without():
    import torch

    metrics = Metrics(MetricsSettings(port=0))
    (family,) = [f for f in metrics.registry.collect() if f.name == "inspector_gpu_memory_bytes"]
    expected = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    assert [sample.labels["device"] for sample in family.samples] == expected


CONTRACT = {  # the original external contract's "Metrics and health": family name, type, labels
    "inspector_frames": ("counter", {"line", "camera", "model", "verdict"}),
    "inspector_anomaly_probability": ("histogram", {"line", "model"}),
    "inspector_frame_latency_seconds": ("histogram", {"model"}),
    "inspector_stage_seconds": ("histogram", {"stage"}),
    "inspector_batch_size": ("histogram", {"model"}),
    "inspector_errors": ("counter", {"reason"}),
    "inspector_model_info": ("gauge", {"model", "plugin", "version"}),
    "inspector_model_reloads": ("counter", {"model", "outcome"}),
    "inspector_broker_connected": ("gauge", set()),
    "inspector_inflight_frames": ("gauge", set()),
}


def test_the_contract_metrics_exist_with_their_types_and_labels():
    metrics = Metrics(MetricsSettings(port=0))
    frame(metrics, "pass", 0.1, 0.01, 0.005)
    metrics.batch("default", 2)
    metrics.set_model("default", "dfkde", "v1", 0.5)
    families = {f.name: f for f in metrics.registry.collect()}
    for name, (kind, labels) in CONTRACT.items():
        family = families[name]
        assert family.type == kind, name
        sample_labels = {key for sample in family.samples for key in sample.labels} - {"le"}
        assert sample_labels == labels, name


def test_disabled_metrics_serve_nothing_but_still_count():
    metrics = Metrics(MetricsSettings(enabled=False, port=0))
    assert metrics.serve() == 0
    frame(metrics, "pass", 0.1, 0.01, 0.005)
    metrics.close()
    assert metrics.frames.labels(line="line1", camera="cam1", model="default", verdict="pass")._value.get() == 1


def test_concurrent_calls_lose_no_count():
    import threading

    metrics = Metrics(MetricsSettings(port=0, max_label_values=4))
    cameras = [f"cam{i}" for i in range(8)]

    def work(camera):
        for _ in range(500):
            frame(metrics, "pass", 0.2, 0.05, 0.01, camera=camera)

    threads = [threading.Thread(target=work, args=(camera,)) for camera in cameras]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    family = next(f for f in metrics.registry.collect() if f.name == "inspector_frames")
    counts = {s.labels["camera"]: s.value for s in family.samples if s.name == "inspector_frames_total"}
    assert sum(counts.values()) == 8 * 500 and len(counts) == 5 and counts["other"] == 4 * 500


def test_idle_connections_cannot_pin_threads_and_are_hung_up_on(served, monkeypatch):
    from inspector.worker import metrics as metrics_module

    monkeypatch.setattr(metrics_module, "HTTP_REQUEST_DEADLINE_S", 1.0)
    metrics, base = served
    host, port = base.removeprefix("http://").split(":")
    threads_before = threading.active_count()
    idle = [socket.create_connection((host, int(port))) for _ in range(200)]
    try:
        time.sleep(0.5)
        threads_during = threading.active_count()
        assert threads_during <= threads_before + metrics_module.HTTP_MAX_CONNECTIONS + 1
        time.sleep(1.5)  # past the handler timeout: the held slots are free again
        assert request(f"{base}/healthz")[0] == 200
    finally:
        for connection in idle:
            connection.close()


def test_healthz_and_readyz_say_why_the_worker_is_unhealthy(served):
    metrics, base = served
    metrics.set_broker_connected(True)
    metrics.set_model("default", "dfkde", "v1", 0.5)
    assert request(f"{base}/healthz")[:2] == (200, "ok\n") and request(f"{base}/readyz")[0] == 200
    metrics.health = lambda: "the scoring thread has stopped"
    assert request(f"{base}/healthz")[:2] == (503, "the scoring thread has stopped\n")
    assert request(f"{base}/readyz")[:2] == (503, "the scoring thread has stopped\n")
    metrics.thread_stalls = lambda: {"scoring": 42.0, "broker": 0.0}
    assert value(scrape(base), "inspector_thread_stall_seconds", thread="scoring") == 42.0


# -- slow clients ------------------------------------------------------------------------------


def _trickle(sockets, stop, every_s):
    """Send one byte of a request line to each socket every `every_s`, until `stop` (as a slow client does)."""
    line = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
    position = 0
    while not stop.wait(every_s):
        for connection in sockets:
            try:
                connection.sendall(line[position : position + 1])
            except OSError:
                pass  # hung up on: what the server should do
        position = (position + 1) % len(line)


def _open(base, count):
    host, port = base.removeprefix("http://").split(":")
    return [socket.create_connection((host, int(port))) for _ in range(count)]


def test_trickling_clients_cannot_keep_the_health_endpoints_unanswered(served):
    """More slow clients than connection slots, each sending a byte well within any per-recv timeout:
    /healthz, /readyz and /metrics still answer at once."""
    from inspector.worker import metrics as metrics_module

    metrics, base = served
    metrics.set_broker_connected(True)
    metrics.set_model("default", "dfkde", "v1", 0.5)
    slow = _open(base, metrics_module.HTTP_MAX_CONNECTIONS + 4)
    stop = threading.Event()
    trickler = threading.Thread(target=_trickle, args=(slow, stop, 0.2), daemon=True)
    trickler.start()
    try:
        time.sleep(0.5)  # every slot taken by a client that is still sending its request
        for path, expected in (("/healthz", (200, "ok\n")), ("/readyz", (200, "ready\n"))):
            started = time.monotonic()
            assert request(f"{base}{path}")[:2] == expected
            assert time.monotonic() - started < 2.0, path
        started = time.monotonic()
        assert value(scrape(base), "inspector_broker_connected") == 1
        assert time.monotonic() - started < 2.0
    finally:
        stop.set()
        trickler.join()
        for connection in slow:
            connection.close()


def test_a_request_that_trickles_is_hung_up_on_at_its_deadline(served, monkeypatch):
    """The deadline is for the whole request head, not for each read: a byte every 0.2 s does not extend it."""
    from inspector.worker import metrics as metrics_module

    monkeypatch.setattr(metrics_module, "HTTP_REQUEST_DEADLINE_S", 1.0, raising=False)
    _, base = served
    (connection,) = _open(base, 1)
    connection.settimeout(0.2)
    started, closed_after = time.monotonic(), None
    line = b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 1000
    try:
        for byte in line:
            try:
                connection.sendall(bytes([byte]))
                if connection.recv(1024) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                pass  # still open, nothing said: keep trickling
            except OSError:
                closed_after = time.monotonic() - started
                break
            if time.monotonic() - started > 4.0:
                break
    finally:
        connection.close()
    assert closed_after is not None and closed_after < 1.0 + 1.0


def test_a_huge_request_head_is_refused_without_being_kept(served):
    """A request head over HTTP_MAX_REQUEST_BYTES (here 60 headers of 4 KiB, each line and the count within
    the HTTP parser's own limits) is not read to its end nor answered: 16 of them cannot hold 100 MB."""
    _, base = served
    (connection,) = _open(base, 1)
    connection.settimeout(5)
    answer = b""
    try:
        connection.sendall(b"GET /healthz HTTP/1.1\r\n")
        for _ in range(60):
            connection.sendall(b"X-Pad: " + b"a" * 4089 + b"\r\n")
        connection.sendall(b"\r\n")
        while chunk := connection.recv(65536):
            answer += chunk
    except OSError:
        pass  # hung up on while sending: a reset or a broken pipe
    finally:
        connection.close()
    assert not answer.startswith(b"HTTP/1.0 200"), answer[:100]
    assert request(f"{base}/healthz")[:2] == (200, "ok\n")


# -- labels the configuration names ------------------------------------------------------------


def test_reserved_label_values_keep_their_own_series_whatever_came_first(served):
    metrics, base = served  # max_label_values=3
    metrics.reserve("camera", ["cam-real-1", "cam-real-2"])
    for index in range(10):  # junk camera ids right after a start
        frame(metrics, "pass", 0.1, 0.01, 0.005, camera=f"junk{index}")
    frame(metrics, "fail", 0.9, 0.01, 0.005, camera="cam-real-1")
    frame(metrics, "fail", 0.9, 0.01, 0.005, camera="cam-real-2")

    s = scrape(base)
    cameras = {labels["camera"] for labels in series(s, "inspector_frames_total")}
    assert {"cam-real-1", "cam-real-2", "other"} <= cameras
    assert len(cameras - {"cam-real-1", "cam-real-2", "other"}) == 3  # the cap still holds for the rest
    assert value(s, "inspector_frames_total", line="line1", camera="cam-real-1", model="default", verdict="fail") == 1


def test_the_configured_models_lines_and_cameras_are_the_reserved_values():
    from inspector.config import Settings
    from inspector.worker.metrics import configured_label_values

    settings = Settings.model_validate({
        "models": {"default": {}, "bottles": {}},
        "worker": {"binding_keys": ["line1.#", "line4.cam9"],
                   "routes": [{"match": "line2.*", "model": "bottles"}, {"match": "*.cam3", "model": "bottles"},
                              {"match": "#", "model": "default"}]},
    })  # fmt: skip
    assert configured_label_values(settings) == {
        "model": {"default", "bottles", "none"}, "line": {"line1", "line2", "line4"}, "camera": {"cam3", "cam9"},
    }  # fmt: skip


# -- implausible capture times -----------------------------------------------------------------


def test_implausible_frame_ages_are_counted_not_observed(served):
    metrics, base = served
    assert value(scrape(base), "inspector_frame_age_implausible_total") == 0
    epoch_age = time.time()  # captured_at of 1970
    frame(metrics, "pass", 0.1, epoch_age, epoch_age - 1)
    frame(metrics, "pass", 0.1, -400 * 86400.0, -400 * 86400.0)  # a camera clock a year ahead
    frame(metrics, "pass", 0.1, -2.0, -2.5)  # ordinary clock skew: counts as 0
    frame(metrics, "pass", 0.1, 0.25, 0.1)

    s = scrape(base)
    assert value(s, "inspector_frames_total", line="line1", camera="cam1", model="default", verdict="pass") == 4
    assert value(s, "inspector_frame_latency_seconds_count", model="default") == 2
    assert value(s, "inspector_frame_latency_seconds_sum", model="default") == pytest.approx(0.25)
    assert value(s, "inspector_queue_wait_seconds_count", model="default") == 2
    assert value(s, "inspector_queue_wait_seconds_sum", model="default") == pytest.approx(0.1)
    assert value(s, "inspector_frame_age_implausible_total") == 2  # per frame, not per histogram


# -- what the consumer reports -----------------------------------------------------------------


def test_a_paused_consumer_is_shown_and_makes_the_worker_not_ready_but_not_unhealthy(served):
    metrics, base = served
    metrics.set_broker_connected(True)
    metrics.set_model("default", "dfkde", "v1", 0.5)
    assert value(scrape(base), "inspector_consumer_paused") == 0
    metrics.set_consumer_paused("captures held in memory are over worker.max_inflight_bytes")
    assert value(scrape(base), "inspector_consumer_paused") == 1
    assert request(f"{base}/readyz")[:2] == (
        503, "consuming paused: captures held in memory are over worker.max_inflight_bytes\n")
    assert metrics.not_ready_reason() == "consuming paused: captures held in memory are over worker.max_inflight_bytes"
    assert request(f"{base}/healthz")[:2] == (200, "ok\n")
    metrics.set_consumer_paused(None)
    assert value(scrape(base), "inspector_consumer_paused") == 0
    assert request(f"{base}/readyz")[:2] == (200, "ready\n")


def test_refused_results_are_counted_by_outcome_from_zero(served, caplog):
    metrics, base = served
    s = scrape(base)
    assert value(s, "inspector_results_refused_total", outcome="requeued") == 0
    assert value(s, "inspector_results_refused_total", outcome="given_up") == 0
    metrics.result_refused("requeued")
    metrics.result_refused("requeued")
    metrics.result_refused("given_up")
    with caplog.at_level(logging.WARNING, logger="inspector.worker.metrics"):
        metrics.result_refused("shrugged")
    assert "result_refused failed" in caplog.text
    s = scrape(base)
    assert value(s, "inspector_results_refused_total", outcome="requeued") == 2
    assert value(s, "inspector_results_refused_total", outcome="given_up") == 1
