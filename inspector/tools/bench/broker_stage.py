"""Stage 3 of `inspector bench`: the whole path through the broker, a worker in this process.

On the run's own exchanges and queues (deleted at the end), a publisher and a collector with a
connection each: (a) saturation, a backlog queued before a fresh worker starts; (b) half load,
frames paced evenly at half the saturation rate, with latency from publication to result. The saturation
run measures the worker's CPU per frame and stage (cpu_stages); after it, the same frames go through
RabbitMQ alone, consumed and acked by a plain pika consumer, for what the broker and pika take by themselves.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Self

import numpy as np
import pika
import pika.exceptions
import torch

from inspector.broker import blocking_connection, connection_parameters
from inspector.config import Settings
from inspector.errors import BrokerError
from inspector.timestamps import rfc3339
from inspector.tools.bench.cpu_stages import CpuStages
from inspector.tools.bench.frames import Frames
from inspector.tools.bench.model_stages import RawMeter
from inspector.tools.bench.options import BenchOptions
from inspector.worker.hooks import StageHooks
from inspector.worker.loop import Worker

log = logging.getLogger(__name__)

SATURATION_S = 6.0  # the default backlog is about this much work at the rates stages 1 and 2 measured
MAX_FRAMES = 5000
BACKLOG_BYTES = 512 * 1024 * 1024  # the default backlog holds at most this much in the queue
RESULT_TIMEOUT_S = 30.0  # longest wait for the last results beyond what the measured rate predicts
ROUTING_KEY = "bench.cam1"



class Collector:
    """Its own connection and thread: an exclusive queue on the results exchange, the receipt time of
    every result by frame id (time.perf_counter(), the clock the publisher stamps with)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.received: dict[str, float] = {}
        self.duplicates = 0
        self.errors = 0
        self.unexpected = 0
        self._expected: set[str] = set()
        self._pending: set[str] = set()
        self._condition = threading.Condition()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bench-collector", daemon=True)

    def start(self) -> None:
        self._thread.start()
        while not self._ready.wait(0.1):
            if not self._thread.is_alive():
                raise BrokerError(f"the results collector could not start: {self._failure!r}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def expect(self, frame_ids: set[str]) -> None:
        with self._condition:
            self._expected = set(frame_ids)
            self._pending = set(frame_ids)

    def wait(self, timeout: float) -> bool:
        """True once every expected frame came back; False after `timeout` or when the collector failed."""
        with self._condition:
            return self._condition.wait_for(lambda: not self._pending or not self._thread.is_alive(), timeout) \
                and not self._pending

    def _run(self) -> None:
        connection = None
        try:
            connection = blocking_connection(self.settings.broker)
            channel = connection.channel()
            results = self.settings.broker.exchanges.results
            channel.exchange_declare(results, exchange_type="topic", durable=True)
            queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            channel.queue_bind(queue, results, routing_key="#")
            channel.basic_consume(queue, self._on_result, auto_ack=True)
            self._ready.set()
            while not self._stop.is_set():
                connection.process_data_events(time_limit=0.05)
        except Exception as exc:  # noqa: BLE001 - reported by start() or as missing frames
            self._failure = exc
            log.error("the results collector stopped: %r", exc)
        finally:
            with self._condition:
                self._condition.notify_all()
            if connection is not None and connection.is_open:
                try:
                    connection.close()
                except pika.exceptions.AMQPError:
                    pass

    def _on_result(self, _channel: Any, method: Any, properties: Any, _body: bytes) -> None:
        now = time.perf_counter()
        frame_id = properties.correlation_id or ""
        with self._condition:
            if frame_id not in self._expected:
                self.unexpected += 1
                return
            if frame_id in self.received:
                self.duplicates += 1
                return
            self.received[frame_id] = now
            if method.routing_key.startswith("error."):
                self.errors += 1
            self._pending.discard(frame_id)
            if not self._pending:
                self._condition.notify_all()

    def tally(self) -> tuple[dict[str, float], dict[str, int]]:
        """The receipt times of the expected frames, and the counts of this phase; then resets the counts."""
        with self._condition:
            times = {i: self.received[i] for i in self._expected if i in self.received}
            counts = {"missing": len(self._pending), "duplicates": self.duplicates, "errors": self.errors,
                      "unexpected": self.unexpected}
            self.duplicates = self.errors = self.unexpected = 0
            return times, counts


class Publisher:
    """A camera: its own connection (opened per phase, so heartbeats never lapse between phases), publisher
    confirms, mandatory routing; the perf_counter time of each frame's publication by id."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.published: dict[str, float] = {}

    def __enter__(self) -> Self:
        self.connection = blocking_connection(self.settings.broker)
        try:
            self.channel = self.connection.channel()
            self.channel.confirm_delivery()
        except pika.exceptions.AMQPError as exc:
            self.connection.close()
            raise BrokerError(f"the bench publisher could not open a channel: {exc!r}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.connection.close()
        except pika.exceptions.AMQPError:
            pass

    def publish(self, frame_id: str, body: bytes, content_type: str, headers: dict[str, Any] | None = None,
                queue: str | None = None) -> None:
        """One frame to the captures exchange, or straight into `queue` (the default exchange)."""
        now = datetime.now(timezone.utc)
        properties = pika.BasicProperties(
            content_type=content_type, message_id=frame_id, delivery_mode=2, timestamp=int(now.timestamp()),
            headers={"captured_at": rfc3339(now), **(headers or {})},
        )
        exchange, key = (self.settings.broker.exchanges.captures, ROUTING_KEY) if queue is None else ("", queue)
        self.published[frame_id] = time.perf_counter()
        try:
            self.channel.basic_publish(exchange, key, body, properties, mandatory=True)
        except pika.exceptions.UnroutableError:
            raise BrokerError(f"frame {frame_id} was unroutable: no queue is bound to "
                              f"{self.settings.broker.exchanges.captures}") from None
        except pika.exceptions.AMQPError as exc:
            raise BrokerError(f"publishing frame {frame_id} failed: {exc!r}") from None

    def sleep(self, seconds: float) -> None:
        """Wait, servicing the connection (heartbeats) meanwhile."""
        if seconds > 0:
            self.connection.sleep(seconds)


def broker_stage(settings: Settings, frames: list[Frames], options: BenchOptions, raw: RawMeter,
                  decode: dict[str, dict[str, Any]], device: torch.device) -> dict[str, dict[str, Any]]:
    """Stage 3 for every encoding, on the run's own exchanges and queues, deleted at the end.

    The raw plugin is measured again right before and right after each saturation run, and the ratio is taken
    to the mean of the two: on a machine whose load drifts, both figures then move alike."""
    out: dict[str, dict[str, Any]] = {}
    collector = None
    try:
        log.info("stage 3: the worker declares the run's exchanges and queues (%s.*)",
                 settings.worker.queue.rsplit(".", 1)[0])
        _with_worker(settings, lambda worker: None)
        collector = Collector(settings)
        collector.start()
        for index, f in enumerate(frames):
            expected = _expected(raw.measurements[0], decode[f.encoding]["frames_per_second"], device)
            count = options.frames or _backlog(expected, f.mean_bytes, settings.worker.batch_size)
            if index:
                log.info("stage 1 again, before stage 3a: the raw plugin")
            before = raw.measure() if index else raw.measurements[-1]
            saturation = _saturation(settings, collector, f, count, expected)
            log.info("stage 1 again, after stage 3a: the raw plugin")
            after = raw.measure()
            reference = (before + after) / 2
            rate = saturation["frames_per_second"]
            saturation["raw_images_per_second"] = round(reference, 3)
            saturation["ratio_to_raw"] = round(rate / reference, 4) if rate else None
            saturation["expected_frames_per_second"] = round(
                _expected(reference, decode[f.encoding]["frames_per_second"], device), 3)
            alone = _rabbitmq_alone(settings, f, count)
            half = _half_load(settings, collector, f, rate, options.half_load_s)
            out[f.encoding] = {"saturation": saturation, "rabbitmq_alone": alone, "half_load": half}
    finally:
        if collector is not None:
            collector.stop()
        _delete_topology(settings)
    return out


def _expected(model_rate: float, decode_rate: float, device: torch.device) -> float:
    """What the model and the decoding alone predict for the whole path: on the CPU they share the cores, so
    their times add up; on a GPU they overlap, so the slower one sets the pace."""
    if device.type == "cpu":
        return 1 / (1 / model_rate + 1 / decode_rate)
    return min(model_rate, decode_rate)


def _backlog(expected_rate: float, frame_bytes: int, batch_size: int) -> int:
    """About SATURATION_S of work at `expected_rate`, at least four batches, within MAX_FRAMES and BACKLOG_BYTES."""
    count = max(4 * batch_size, math.ceil(expected_rate * SATURATION_S))
    return max(min(4 * batch_size, MAX_FRAMES), min(count, MAX_FRAMES, BACKLOG_BYTES // max(1, frame_bytes)))


def _with_worker(settings: Settings, body: Callable[[Worker], Any], hooks: StageHooks | None = None) -> Any:
    """Start a worker in this process (it runs its own threads), run `body(worker)`, stop it. A worker that
    fails to start has stopped its threads itself and raises. `hooks`: the worker's stage hooks."""
    worker = Worker(settings, hooks=hooks)
    worker.start()
    try:
        return body(worker)
    finally:
        worker.stop(grace_s=10.0)


def _batching(worker: Worker) -> dict[str, Any]:
    """How the worker batched during a phase, from its own metrics: batches, mean size, ms per batch."""
    registry, model = worker.metrics.registry, worker.settings.default_model
    count = registry.get_sample_value("inspector_batch_size_count", {"model": model}) or 0
    frames = registry.get_sample_value("inspector_batch_size_sum", {"model": model}) or 0
    infer = registry.get_sample_value("inspector_stage_seconds_sum", {"stage": "infer"}) or 0
    return {"batches": int(count), "mean_batch": round(frames / count, 2) if count else None,
            "ms_per_batch": round(1000 * infer / count, 2) if count else None}


def _saturation(settings: Settings, collector: Collector, frames: Frames, count: int,
                expected_rate: float) -> dict[str, Any]:
    """(3a): `count` frames queued before the worker starts; frames/s from its start to the last result."""
    phase = secrets.token_hex(3)
    ids = [f"{frames.encoding}-sat-{phase}-{i:06d}" for i in range(count)]
    collector.expect(set(ids))
    log.info("stage 3a: %d %s frames published as a backlog, then a worker drains it", count, frames.encoding)
    with Publisher(settings) as publisher:
        for i, frame_id in enumerate(ids):
            publisher.publish(frame_id, frames.body(i), frames.content_type, frames.headers)
    profile = CpuStages()

    def drain(worker: Worker) -> tuple[float, dict[str, Any], dict[str, Any]]:
        started = time.perf_counter()  # the worker consumes from here on
        collector.wait(RESULT_TIMEOUT_S + 3 * count / max(expected_rate, 0.1))
        return started, _batching(worker), profile.figures(count)  # while the worker's threads still run

    started, batching, cpu = _with_worker(settings, drain, hooks=profile)
    times, counts = collector.tally()
    seconds = max(times.values()) - started if times else None
    rate = len(times) / seconds if seconds else None
    return {"frames": count, "seconds": round(seconds, 3) if seconds else None,
            "frames_per_second": round(rate, 3) if rate else None, **batching, **counts, "cpu": cpu}


class PlainConsumer:
    """RabbitMQ alone: a plain pika consumer (a SelectConnection, as the worker's, manual acks and the worker's
    prefetch) that acks every message as it arrives and does nothing else; its thread's CPU is pika's."""

    def __init__(self, settings: Settings, queue: str, count: int) -> None:
        self.settings = settings
        self.queue = queue
        self.count = count
        self.received = 0
        self.seconds: float | None = None
        self.cpu_seconds: float | None = None
        self.failure: str | None = None
        self._started = self._cpu_started = 0.0
        self._connection: pika.SelectConnection | None = None

    def run(self, timeout_s: float) -> None:
        """Consume `count` messages on this thread; returns when done, failed or after `timeout_s`."""
        self._connection = pika.SelectConnection(
            connection_parameters(self.settings.broker, self.settings.broker.urls[0]),
            on_open_callback=lambda c: c.channel(on_open_callback=self._on_channel),
            on_open_error_callback=lambda _c, error: self._stop(f"could not connect: {error!r}"),
            on_close_callback=lambda *_: self._connection.ioloop.stop(),
        )
        self._connection.ioloop.call_later(timeout_s, lambda: self._stop(f"timed out after {timeout_s:.0f} s"))
        self._connection.ioloop.start()

    def _on_channel(self, channel: Any) -> None:
        channel.basic_qos(prefetch_count=self.settings.worker.prefetch,
                          callback=lambda _frame: self._consume(channel))

    def _consume(self, channel: Any) -> None:
        self._started, self._cpu_started = time.perf_counter(), time.thread_time()
        channel.basic_consume(self.queue, self._on_message)

    def _on_message(self, channel: Any, method: Any, _properties: Any, _body: bytes) -> None:
        channel.basic_ack(method.delivery_tag)
        self.received += 1
        if self.received == self.count:
            self.seconds = time.perf_counter() - self._started
            self.cpu_seconds = time.thread_time() - self._cpu_started
            self._stop(None)

    def _stop(self, failure: str | None) -> None:
        if failure is not None and self.seconds is None:
            self.failure = failure
        if self._connection is not None and self._connection.is_open:
            self._connection.close()
        elif self._connection is not None:
            self._connection.ioloop.stop()


def _rabbitmq_alone(settings: Settings, frames: Frames, count: int) -> dict[str, Any]:
    """The same frames through RabbitMQ with no worker: `count` published into a quorum queue of their own
    (as the worker's), then consumed and acked by a PlainConsumer; frames/s and its CPU per frame."""
    queue = f"{settings.worker.queue}.alone"
    connection = blocking_connection(settings.broker)
    try:
        connection.channel().queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    finally:
        connection.close()
    log.info("RabbitMQ alone: %d %s frames into %s, then a plain pika consumer acks them", count, frames.encoding,
             queue)
    try:
        with Publisher(settings) as publisher:
            for i in range(count):
                publisher.publish(f"alone-{i:06d}", frames.body(i), frames.content_type, frames.headers, queue)
        consumer = PlainConsumer(settings, queue, count)
        consumer.run(RESULT_TIMEOUT_S + count / 100)
    finally:
        connection = blocking_connection(settings.broker)
        try:
            connection.channel().queue_delete(queue)
        finally:
            connection.close()
    seconds = consumer.seconds
    return {"frames": count, "received": consumer.received, "seconds": round(seconds, 3) if seconds else None,
            "frames_per_second": round(count / seconds, 3) if seconds else None,
            "cpu_us": round(1e6 * consumer.cpu_seconds / count, 1) if consumer.cpu_seconds is not None else None,
            "failure": consumer.failure}


def _half_load(settings: Settings, collector: Collector, frames: Frames, saturation_rate: float | None,
               duration_s: float) -> dict[str, Any]:
    """(3b): frames evenly paced at half the saturation rate for `duration_s`; latency publish -> result."""
    rate = (saturation_rate or 0.0) / 2
    count = max(1, int(rate * duration_s))
    phase = secrets.token_hex(3)
    ids = [f"{frames.encoding}-half-{phase}-{i:06d}" for i in range(count)]
    collector.expect(set(ids))
    log.info("stage 3b: %d %s frames at %.2f Hz for %g s (half the saturation rate)", count, frames.encoding,
             rate, duration_s)

    def paced(worker: Worker) -> tuple[Publisher, float, float, dict[str, Any]]:
        with Publisher(settings) as publisher:
            started = time.perf_counter()
            for i, frame_id in enumerate(ids):
                publisher.sleep(started + i / rate - time.perf_counter() if rate > 0 else 0.0)
                publisher.publish(frame_id, frames.body(i), frames.content_type, frames.headers)
            published = time.perf_counter() - started
        collector.wait(RESULT_TIMEOUT_S + 4 * settings.worker.batch_size / max(rate, 0.1))
        return publisher, started, published, _batching(worker)

    publisher, started, published_s, batching = _with_worker(settings, paced)
    times, counts = collector.tally()
    latencies = np.array([(times[i] - publisher.published[i]) * 1000 for i in ids if i in times])
    if latencies.size:
        p50, p95, p99 = (float(np.percentile(latencies, q)) for q in (50, 95, 99))
        latency = {"p50": round(p50, 2), "p95": round(p95, 2), "p99": round(p99, 2),
                   "max": round(float(latencies.max()), 2), "mean": round(float(latencies.mean()), 2)}
        spread = round(p99 / p50, 3) if p50 > 0 else None
    else:
        latency = {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
        spread = None
    seconds = (max(times.values()) - started) if times else None
    return {"rate_hz": round(rate, 3), "seconds": round(published_s, 3), "frames": count,
            "published_hz": round((count - 1) / published_s, 3) if count > 1 and published_s > 0 else None,
            "frames_per_second": round(len(times) / seconds, 3) if seconds else None,
            "latency_ms": latency, "p99_over_p50": spread, **batching, **counts}


def _delete_topology(settings: Settings) -> None:
    """The run's queues (quorum queues outlive every connection) and exchanges."""
    worker, exchanges = settings.worker, settings.broker.exchanges
    try:
        connection = blocking_connection(settings.broker)
    except BrokerError as exc:
        log.warning("could not delete the bench's queues and exchanges (%s, %s, %s.*): %s", worker.queue,
                    worker.dead_letter_queue, exchanges.captures.rsplit(".", 1)[0], exc)
        return
    try:
        channel = connection.channel()
        for queue in (worker.queue, worker.dead_letter_queue):
            channel.queue_delete(queue)
        for name in (exchanges.captures, exchanges.results, exchanges.control, exchanges.dead):
            channel.exchange_delete(name)
    except pika.exceptions.AMQPError as exc:
        log.warning("could not delete the bench's queues and exchanges (%s, %s, %s.*): %r", worker.queue,
                    worker.dead_letter_queue, exchanges.captures.rsplit(".", 1)[0], exc)
    finally:
        try:
            connection.close()
        except pika.exceptions.AMQPError:
            pass

