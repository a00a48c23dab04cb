"""The worker's Prometheus metrics and its /metrics, /healthz, /readyz endpoints.

Every metric of the worker lives here, on a registry of its own per `Metrics` (so
tests can make several), and the worker records through a few methods called at
clear points. A metrics call must never cost the worker a frame: each public
method is cheap, thread safe, and logs a failure instead of raising it.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import platform
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from typing import Any, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

import inspector
from inspector.config import MetricsSettings, Settings
from inspector.errors import FRAME_ERROR_CODES, ConfigError
from inspector.logs import Throttle
from inspector.messages import SOURCE_ID_MAX_BYTES, VERDICTS, clean_id
from inspector.worker.decode import DECODE_KINDS
from inspector.worker.memlimit import memory_limit_bytes

log = logging.getLogger(__name__)

STAGES = ("decode", "infer", "publish")
RELOAD_OUTCOMES = ("success", "failed")
EVIDENCE_DROPPED = ("queue_full", "write_failed", "archive_full", "writer_stuck")  # why a chosen frame was not kept
EVIDENCE_PRUNED = ("age", "size")  # evidence.retention_days, evidence.max_bytes
RESULTS_REFUSED = ("requeued", "given_up")  # a result the broker nacked: its capture tried again, or not
OTHER = "other"

PROBABILITY_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

HTTP_REQUEST_DEADLINE_S = 5.0  # the request line and headers must all arrive within this, however they trickle
HTTP_ANSWER_TIMEOUT_S = 10.0  # writing the answer to a client that does not read it
HTTP_MAX_REQUEST_BYTES = 64 * 1024  # a request head past this is not read further (a scraper's is ~300 bytes)
HTTP_MAX_CONNECTIONS = 16  # connections served at once; a new one closes the one open longest
# A frame age (capture time to now) outside these is a wrong clock, not a latency: counted, not observed.
# A day is far past any latency the histograms resolve (their top bucket is 60 s), and a capture that truly
# waited longer is still counted, in the implausible counter, never hidden; 5 minutes is more skew than
# NTP-synchronised cameras show. One 56-year age would otherwise own the histogram's sum for good.
FRAME_AGE_MAX_S = 86_400.0
CLOCK_SKEW_S = 300.0
_T = TypeVar("_T")


class LabelCap:
    """At most `limit` distinct values per label name; later new ones become "other".

    Line, camera and model names come from messages: a misconfigured camera must
    not be able to create series without bound. Values admitted once keep working.
    Reserved values (those the configuration names) always get their own series and
    do not count toward `limit`, so junk ids arriving first cannot push them into "other".
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._admitted: dict[str, set[str]] = {}
        self._reserved: dict[str, frozenset[str]] = {}
        self._lock = threading.Lock()
        self._throttle = Throttle(log, exc_info=True)

    def reserve(self, label: str, values: Iterable[str]) -> None:
        with self._lock:
            self._reserved[label] = self._reserved.get(label, frozenset()) | {v for v in values if v}

    def __call__(self, label: str, value: str) -> str:
        value = value or "unknown"
        if value in self._reserved.get(label, ()):
            return value
        with self._lock:
            admitted = self._admitted.setdefault(label, set())
            if value in admitted:
                return value
            if len(admitted) < self._limit:
                admitted.add(value)
                return value
        if value != OTHER:
            self._throttle.warning(
                label, "label %r has reached metrics.max_label_values (%d): %r and further new values count as %r",
                label, self._limit, value, OTHER, exc_info=False,
            )  # fmt: skip
        return OTHER


def _guarded(default: Any = None) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """Log an exception of a metrics method (rate limited) and return `default` instead of raising it."""

    def decorate(method: Callable[..., _T]) -> Callable[..., _T]:
        @functools.wraps(method)
        def wrapper(self: Metrics, *args: Any, **kwargs: Any) -> _T:
            try:
                return method(self, *args, **kwargs)
            except Exception:
                self.throttle.warning(f"call:{method.__name__}", "metrics: %s failed", method.__name__)
                return default

        return wrapper

    return decorate


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _plausible_age(seconds: float) -> bool:
    return -CLOCK_SKEW_S <= seconds <= FRAME_AGE_MAX_S


def configured_label_values(settings: Settings) -> dict[str, set[str]]:
    """The label values the configuration names, to reserve at start: every model (and "none", for an
    error frame answered before a model was chosen), and the lines and cameras that binding keys and
    routes spell out (`line2.*` names line2, `*.cam3` names cam3), cleaned as a capture's ids are."""
    lines: set[str] = set()
    cameras: set[str] = set()
    for pattern in [*settings.worker.binding_keys, *(route.match for route in settings.worker.routes)]:
        words = pattern.split(".")
        if words[0] == "#":  # the words after it could stand anywhere
            continue
        if words[0] != "*":
            lines.add(clean_id(words[0], SOURCE_ID_MAX_BYTES))
        if len(words) > 1 and words[1] not in ("*", "#"):
            cameras.add(clean_id(words[1], SOURCE_ID_MAX_BYTES))
    return {"model": {*settings.models, "none"}, "line": lines - {""}, "camera": cameras - {""}}


class GpuMemoryCollector:
    """inspector_gpu_memory_bytes per visible CUDA device, read at scrape time.

    torch is imported here, not at module import: a CPU machine exports the family
    with no series, and scraping never initialises CUDA (memory_allocated on a
    device torch has not touched is 0 without creating a context).
    """

    NAME = "inspector_gpu_memory_bytes"
    HELP = "Bytes of GPU memory held by tensors (torch.cuda.memory_allocated), per CUDA device."

    def __init__(self, throttle: Throttle) -> None:
        self._throttle = throttle

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self.NAME, self.HELP, labels=["device"])]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["device"])
        try:
            import torch

            if torch.cuda.is_available():
                for index in range(torch.cuda.device_count()):
                    family.add_metric([f"cuda:{index}"], float(torch.cuda.memory_allocated(index)))
        except Exception:
            self._throttle.warning("gpu", "metrics: reading GPU memory failed")
        return [family]


class MemoryLimitCollector:
    """`inspector_memory_limit_bytes`: the memory the kernel lets the worker hold (cgroup v2 `memory.max`),
    read at scrape time; no series where nothing limits it, so an alert on a share of it cannot misfire."""

    NAME = "inspector_memory_limit_bytes"
    HELP = "The worker's memory limit in bytes (cgroup v2 memory.max along its cgroup); absent when unlimited."

    def __init__(self, throttle: Throttle, read: Callable[[], int | None] = memory_limit_bytes) -> None:
        self._throttle, self._read = throttle, read

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self.NAME, self.HELP)]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP)
        try:
            limit = self._read()
            if limit is not None:
                family.add_metric([], float(limit))
        except Exception:  # noqa: BLE001 - a scrape must still answer
            self._throttle.warning("memory-limit", "metrics: reading the cgroup memory limit failed")
        return [family]


def register_runtime_collectors(registry: CollectorRegistry) -> None:
    """prometheus_client's default collectors, which a registry of our own lacks: resident memory, CPU
    and file descriptors (process_*, read from /proc, so Linux only), the garbage collector
    (python_gc_*) and python_info. They read at scrape time and cost nothing per frame."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


def default_build() -> dict[str, str]:
    """Build labels without importing torch (its version comes from the installed distribution)."""
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "none"
    return {"version": inspector.__version__, "python": platform.python_version(), "torch": torch_version}


class ThreadStallCollector:
    """`inspector_thread_stall_seconds{thread}`: seconds each core thread has been busy without progress
    (0 while idle or progressing), read from the worker's watchdog at scrape time."""

    def __init__(self, metrics: "Metrics") -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily("inspector_thread_stall_seconds", _STALL_HELP, labels=["thread"])]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily("inspector_thread_stall_seconds", _STALL_HELP, labels=["thread"])
        try:
            for thread, seconds in self.metrics.thread_stalls().items():
                family.add_metric([thread], seconds)
        except Exception:  # noqa: BLE001 - a scrape must still answer
            self.metrics.throttle.warning("stalls", "metrics: reading the watchdog failed")
        yield family


_STALL_HELP = "Seconds a core thread of the worker has been busy without progress (0 when idle or progressing)."


class Metrics:
    """All metrics of one worker, and the HTTP server that exposes them."""

    def __init__(self, settings: MetricsSettings, *, build: Mapping[str, str] | None = None) -> None:
        # The *_created series double the series count and nothing here reads them. This is
        # prometheus_client's process-wide switch: the worker owns its process.
        disable_created_metrics()
        self.settings = settings
        self.throttle = Throttle(log, exc_info=True)
        self.registry = CollectorRegistry()
        self._cap = LabelCap(settings.max_label_values)
        self._lock = threading.Lock()
        self._broker_connected = False
        self._paused: str | None = None  # why the consumer takes no captures, while it does not
        self._models: dict[str, tuple[str, str]] = {}  # model -> (plugin, version) in service
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # Set by the worker: its watchdog's verdict (None while healthy) and its threads' stalls.
        self.health: Callable[[], str | None] = lambda: None
        self.thread_stalls: Callable[[], Mapping[str, float]] = dict
        # Set by the worker: why no model serves (a refused or failing version), for /readyz.
        self.models_problem: Callable[[], str | None] = lambda: None
        r = self.registry

        self.frames = Counter(
            "inspector_frames_total", "Frames answered, by verdict.", ["line", "camera", "model", "verdict"], registry=r
        )
        self.probability = Histogram(
            "inspector_anomaly_probability", "Anomaly probability of scored frames.", ["line", "model"],
            buckets=PROBABILITY_BUCKETS, registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "inspector_frame_latency_seconds", "Capture time to result confirmed by the broker.", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "inspector_queue_wait_seconds", "Capture time to the start of scoring (queue plus batching).", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.stages = Histogram(
            "inspector_stage_seconds", "Time spent per stage of a frame or batch.", ["stage"],
            buckets=STAGE_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "inspector_batch_size", "Frames scored together in one batch.", ["model"],
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "inspector_errors_total", "Frames that could not be scored, by reason.", ["reason"], registry=r
        )
        self.dead_letters = Counter(
            "inspector_dead_letters_total", "Captures sent to the dead-letter exchange, by reason.", ["reason"],
            registry=r,
        )  # fmt: skip
        self.redelivered = Counter(
            "inspector_redelivered_frames_total", "Frames answered that the broker had delivered before.", ["model"],
            registry=r,
        )  # fmt: skip
        self.model_info = Gauge(
            "inspector_model_info", "The model version in service (always 1).", ["model", "plugin", "version"],
            registry=r,
        )  # fmt: skip
        self.model_threshold = Gauge(
            "inspector_model_threshold", "Probability at or over which a frame fails.", ["model"], registry=r
        )
        self.model_reloads = Counter(
            "inspector_model_reloads_total", "Model reloads, by outcome (success, failed).", ["model", "outcome"],
            registry=r,
        )  # fmt: skip
        self.broker_connected = Gauge("inspector_broker_connected", "1 while connected to RabbitMQ.", registry=r)
        self.broker_reconnects = Counter(
            "inspector_broker_reconnects_total", "Connections to RabbitMQ re-established after a loss.", registry=r
        )
        self.inflight = Gauge("inspector_inflight_frames", "Captures received and not yet acknowledged.", registry=r)
        self.inflight_bytes = Gauge(
            "inspector_inflight_bytes", "Bytes of capture bodies received and not yet acknowledged.", registry=r
        )
        self.unroutable = Counter(
            "inspector_results_unroutable_total",
            "Results no queue took on the results exchange, kept on the dead-letter exchange instead.", registry=r,
        )  # fmt: skip
        self.results_refused = Counter(
            "inspector_results_refused_total",
            "Results the broker refused (publish nack), by outcome: capture requeued, or given up on.", ["outcome"],
            registry=r,
        )  # fmt: skip
        self.consumer_paused = Gauge(
            "inspector_consumer_paused", "1 while the worker takes no captures: its in-flight budget is spent.",
            registry=r,
        )  # fmt: skip
        self.frames_unlike_fit = Counter(
            "inspector_frames_unlike_fit_total",
            "Frames decoded as the model's version never read an image in its fit (decode: jpeg, or full for every "
            "other format): its scores for them are not the ones it was calibrated on.", ["model", "decode"],
            registry=r,
        )  # fmt: skip
        self.frame_age_implausible = Counter(
            "inspector_frame_age_implausible_total",
            "Frames whose capture time is over a day old or minutes ahead: left out of the latency histograms.",
            registry=r,
        )  # fmt: skip
        self.build_info = Gauge(
            "inspector_build_info", "Versions of this worker (always 1).", ["version", "python", "torch"], registry=r
        )
        self.evidence_kept = Counter(
            "inspector_evidence_kept_total", "Frames written to the evidence archive, by verdict.", ["verdict"],
            registry=r,
        )  # fmt: skip
        self.evidence_dropped = Counter(
            "inspector_evidence_dropped_total", "Frames chosen for the evidence archive and not kept, by reason.",
            ["reason"], registry=r,
        )  # fmt: skip
        self.evidence_bytes = Counter(
            "inspector_evidence_bytes_total", "Bytes written to the evidence archive.", registry=r
        )
        self.evidence_pruned = Counter(
            "inspector_evidence_pruned_total", "Frames removed from the evidence archive, by reason (age, size).",
            ["reason"], registry=r,
        )  # fmt: skip
        self.evidence_queue = Gauge(
            "inspector_evidence_queue_depth", "Frames waiting to be written to the evidence archive.", registry=r
        )
        r.register(GpuMemoryCollector(self.throttle))
        self.memory_limit = MemoryLimitCollector(self.throttle)
        r.register(self.memory_limit)
        r.register(ThreadStallCollector(self))
        register_runtime_collectors(r)

        labels = default_build() | dict(build or {})
        self.build_info.labels(version=labels["version"], python=labels["python"], torch=labels["torch"]).set(1)
        # Series alerts and dashboards rely on exist from the start at 0: a counter born at 1
        # shows no increase() in Prometheus, so the first error would go unseen.
        for code in FRAME_ERROR_CODES:
            self.errors.labels(reason=code)
            self.dead_letters.labels(reason=code)
        for stage in STAGES:
            self.stages.labels(stage=stage)
        for verdict in VERDICTS:
            self.evidence_kept.labels(verdict=verdict)
        for reason in EVIDENCE_DROPPED:
            self.evidence_dropped.labels(reason=reason)
        for reason in EVIDENCE_PRUNED:
            self.evidence_pruned.labels(reason=reason)
        for outcome in RESULTS_REFUSED:
            self.results_refused.labels(outcome=outcome)

    # -- HTTP ---------------------------------------------------------------------------------

    def serve(self) -> int:
        """Start /metrics, /healthz, /readyz in a daemon thread; the bound port (settings.port 0: any free one).

        With metrics.enabled false nothing is served and the answer is 0; the metrics are still kept.
        """
        if not self.settings.enabled:
            log.info("metrics.enabled is false: no /metrics, /healthz or /readyz")
            return 0
        if self._server is not None:
            return self._server.server_address[1]
        host, port = self.settings.host, self.settings.port
        try:
            server = _Server((host, port), _Handler, self)
        except OSError as exc:
            raise ConfigError(
                f"metrics.port: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                "another process holds it, or the address is not on this machine: choose another metrics.port "
                "(or metrics.host)"
            ) from None
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="inspector-metrics-http", daemon=True)
        self._thread.start()
        bound = server.server_address[1]
        log.info("metrics on http://%s:%d/metrics (/healthz, /readyz)", host, bound)
        return bound

    @_guarded()
    def close(self) -> None:
        """Stop the HTTP server; the metrics themselves stay usable."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    # -- health -------------------------------------------------------------------------------

    @_guarded()
    def set_broker_connected(self, connected: bool) -> None:
        self._broker_connected = bool(connected)
        self.broker_connected.set(1 if connected else 0)

    @_guarded()
    def broker_reconnected(self) -> None:
        self.broker_reconnects.inc()

    @_guarded()
    def reserve(self, label: str, values: Iterable[str]) -> None:
        """Values of `label` (line, camera, model) that always get their own series, however many others
        came first: the worker reserves those its configuration names (`configured_label_values`)."""
        self._cap.reserve(label, values)

    @_guarded()
    def expect_model(self, model: str) -> None:
        """A configured model, loaded or not: its reload counters exist at 0 from the start, so even a
        first load that fails shows as an increase."""
        model = self._cap("model", model)
        for outcome in RELOAD_OUTCOMES:
            self.model_reloads.labels(model=model, outcome=outcome)
        for kind in DECODE_KINDS:
            self.frames_unlike_fit.labels(model=model, decode=kind)

    @_guarded()
    def set_model(self, model: str, plugin: str, version: str, threshold: float) -> None:
        """`version` of `model` is now in service: it replaces the previous version's info series."""
        model = self._cap("model", model)
        with self._lock:
            previous = self._models.get(model)
            if previous != (plugin, version):
                if previous is not None:
                    self.model_info.remove(model, *previous)
                self.model_info.labels(model=model, plugin=plugin, version=version).set(1)
                self._models[model] = (plugin, version)
        self.model_threshold.labels(model=model).set(threshold)
        for outcome in RELOAD_OUTCOMES:  # at 0 from now on, so the first failed reload shows in increase()
            self.model_reloads.labels(model=model, outcome=outcome)

    @_guarded()
    def frame_unlike_fit(self, model: str, decode: str) -> None:
        if decode not in DECODE_KINDS:
            raise ValueError(f"decode kind {decode!r} is not one of {DECODE_KINDS}")
        self.frames_unlike_fit.labels(model=self._cap("model", model), decode=decode).inc()

    @_guarded()
    def model_reload(self, model: str, outcome: str) -> None:
        if outcome not in RELOAD_OUTCOMES:
            raise ValueError(f"reload outcome {outcome!r} is not one of {RELOAD_OUTCOMES}")
        self.model_reloads.labels(model=self._cap("model", model), outcome=outcome).inc()

    @_guarded()
    def set_inflight(self, frames: int) -> None:
        self.inflight.set(frames)

    @_guarded()
    def set_inflight_bytes(self, held: int) -> None:
        self.inflight_bytes.set(held)

    @_guarded()
    def result_unroutable(self) -> None:
        self.unroutable.inc()

    @_guarded()
    def result_refused(self, outcome: str) -> None:
        """A result the broker nacked: its capture `requeued` to try again, or `given_up` on after the retries."""
        if outcome not in RESULTS_REFUSED:
            raise ValueError(f"refused-result outcome {outcome!r} is not one of {RESULTS_REFUSED}")
        self.results_refused.labels(outcome=outcome).inc()

    @_guarded()
    def set_consumer_paused(self, reason: str | None) -> None:
        """The consumer stopped taking captures, and why (None: it takes them again). /readyz then answers
        503 with the reason; /healthz is not affected (a pause is the budget working, not a fault)."""
        self._paused = None if reason is None else (str(reason) or "no reason given")
        self.consumer_paused.set(0 if reason is None else 1)

    @_guarded(default=False)
    def ready(self) -> bool:
        """Connected to the broker and at least one model in service."""
        return self._broker_connected and bool(self._models)

    def unhealthy_reason(self) -> str | None:
        """Why /healthz answers 503 (a core thread dead or stuck), or None while healthy."""
        try:
            return self.health()
        except Exception:  # noqa: BLE001 - a broken probe is itself a reason
            self.throttle.warning("health", "metrics: the health probe failed")
            return "the health probe failed"

    def not_ready_reason(self) -> str | None:
        """Why /readyz answers 503, or None when ready."""
        unhealthy = self.unhealthy_reason()
        if unhealthy is not None:
            return unhealthy
        paused = self._paused
        if paused is not None:
            return f"consuming paused: {paused}"
        if not self._broker_connected:
            return "broker disconnected"
        if not self._models:
            problem = self.models_problem()
            return f"no model loaded: {problem}" if problem else "no model loaded"
        return None

    # -- per frame / batch --------------------------------------------------------------------

    @_guarded()
    def frame_done(
        self,
        *,
        line: str,
        camera: str,
        model: str,
        verdict: str,
        probability: float | None,
        latency_s: float | None,
        queue_wait_s: float | None,
        redelivered: bool,
    ) -> None:
        """One frame answered (its result confirmed). Negative times within CLOCK_SKEW_S (camera clock ahead)
        count as 0; a frame whose times are outside [-CLOCK_SKEW_S, FRAME_AGE_MAX_S] (a camera sending 1970)
        is counted in inspector_frame_age_implausible_total and left out of both histograms."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict {verdict!r} is not one of {VERDICTS}")
        line, camera, model = self._cap("line", line), self._cap("camera", camera), self._cap("model", model)
        self.frames.labels(line=line, camera=camera, model=model, verdict=verdict).inc()
        if _finite(probability):
            self.probability.labels(line=line, model=model).observe(probability)
        ages = [age for age in (latency_s, queue_wait_s) if _finite(age)]
        if not all(_plausible_age(age) for age in ages):
            self.frame_age_implausible.inc()
        else:
            if _finite(latency_s):
                self.latency.labels(model=model).observe(max(latency_s, 0.0))
            if _finite(queue_wait_s):
                self.queue_wait.labels(model=model).observe(max(queue_wait_s, 0.0))
        if redelivered:
            self.redelivered.labels(model=model).inc()

    @_guarded()
    def frame_error(self, reason: str) -> None:
        """A frame that could not be scored; `reason` is its error code (FRAME_ERROR_CODES)."""
        self.errors.labels(reason=reason).inc()

    @_guarded()
    def dead_lettered(self, reason: str) -> None:
        self.dead_letters.labels(reason=reason).inc()

    @_guarded()
    def stage(self, stage: str, seconds: float) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} is not one of {STAGES}")
        if _finite(seconds):
            self.stages.labels(stage=stage).observe(max(seconds, 0.0))

    @_guarded()
    def batch(self, model: str, size: int) -> None:
        self.batch_size.labels(model=self._cap("model", model)).observe(size)

    # -- the evidence archive -----------------------------------------------------------------

    @_guarded()
    def evidence_written(self, verdict: str, size: int) -> None:
        """A frame's files are all in the archive: `size` bytes of them."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict {verdict!r} is not one of {VERDICTS}")
        self.evidence_kept.labels(verdict=verdict).inc()
        self.evidence_bytes.inc(size)

    @_guarded()
    def evidence_not_kept(self, reason: str) -> None:
        if reason not in EVIDENCE_DROPPED:
            raise ValueError(f"reason {reason!r} is not one of {EVIDENCE_DROPPED}")
        self.evidence_dropped.labels(reason=reason).inc()

    @_guarded()
    def evidence_removed(self, reason: str, frames: int) -> None:
        if reason not in EVIDENCE_PRUNED:
            raise ValueError(f"reason {reason!r} is not one of {EVIDENCE_PRUNED}")
        self.evidence_pruned.labels(reason=reason).inc(frames)

    @_guarded()
    def set_evidence_queue(self, frames: int) -> None:
        self.evidence_queue.set(frames)


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most HTTP_MAX_CONNECTIONS of them, none held for long.

    Each request must arrive whole within HTTP_REQUEST_DEADLINE_S (a deadline, not a timeout per read, so
    trickling a byte at a time does not extend it), and a new connection when all are taken closes the
    one open longest: clients that are slow, idle or many cannot keep a probe from /healthz unanswered.
    A thread per connection rather than a selector: the endpoints serve a few probes and a scrape every
    15 s, and what made slow clients dangerous was never the threads but slots held without bound.
    """

    daemon_threads = True
    request_queue_size = 128  # listen backlog: a burst of connections is accepted (and sorted out), not dropped

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], metrics: Metrics) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.metrics = metrics
        self._open: dict[Any, None] = {}  # connections being served, oldest first
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            if len(self._open) >= HTTP_MAX_CONNECTIONS:
                oldest = next(iter(self._open))
                del self._open[oldest]
                # Under the lock: its thread closes the socket only after taking the lock (shutdown_request),
                # so this never touches a closed (and perhaps reused) descriptor. Its blocked read ends now.
                _hang_up(oldest)
                self.metrics.throttle.warning(
                    "http-cap", "metrics: %d connections open; closing the one open longest", HTTP_MAX_CONNECTIONS,
                    exc_info=False,
                )  # fmt: skip
            self._open[request] = None
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the address, which can hang start-up."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A scraper that hangs up mid-answer is not worth a traceback on stderr."""
        log.debug("metrics: request from %s failed", client_address, exc_info=True)


def _hang_up(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone


class _HeadReader(io.RawIOBase):
    """The socket as the request parser reads it: each read waits only for what is left of the request's
    deadline, and reading stops with an error after HTTP_MAX_REQUEST_BYTES."""

    def __init__(self, connection: socket.socket, deadline: float) -> None:
        super().__init__()
        self._connection = connection
        self._deadline = deadline
        self._left = HTTP_MAX_REQUEST_BYTES

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"the request did not arrive within {HTTP_REQUEST_DEADLINE_S} s")
        if self._left <= 0:
            raise ConnectionAbortedError(f"the request head is over {HTTP_MAX_REQUEST_BYTES} bytes")
        self._connection.settimeout(remaining)
        with memoryview(buffer) as view:
            read = self._connection.recv_into(view[: self._left])
        self._left -= read
        return read


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = HTTP_ANSWER_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the plain file over the socket: replaced by one that keeps the deadline
        self.rfile = io.BufferedReader(_HeadReader(self.connection, time.monotonic() + HTTP_REQUEST_DEADLINE_S))

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        metrics = self.server.metrics
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                # As prometheus_client's own handler: the format the scraper's Accept asks for
                # (plain text 0.0.4 by default, OpenMetrics or text 1.0.0 when negotiated).
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                status, body = 200, encoder(metrics.registry)
            elif path == "/healthz":
                reason = metrics.unhealthy_reason()
                status = 200 if reason is None else 503
                content_type, body = "text/plain; charset=utf-8", f"{reason or 'ok'}\n".encode()
            elif path == "/readyz":
                reason = metrics.not_ready_reason()
                status = 200 if reason is None else 503
                content_type, body = "text/plain; charset=utf-8", f"{reason or 'ready'}\n".encode()
            else:
                status, content_type, body = 404, "text/plain; charset=utf-8", b"not found; try /metrics\n"
        except Exception:
            metrics.throttle.warning("http", "metrics: answering %s failed", path)
            status, content_type, body = 500, "text/plain; charset=utf-8", b"internal error\n"
        self.connection.settimeout(HTTP_ANSWER_TIMEOUT_S)  # all of the answer, not each write (sendall)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: a scrape every 15 s would otherwise fill stderr."""
