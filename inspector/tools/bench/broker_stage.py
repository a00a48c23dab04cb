"""Stage 3 of `inspector bench`: the whole path through the broker, a worker in this process.

On the run's own exchanges and queues (deleted at the end), a publisher and a collector with a
connection each: (a) saturation, a backlog queued before a fresh worker starts; (b) half load,
frames paced evenly at half the saturation rate, with latency from publication to result. The saturation
run measures the worker's CPU per frame and stage (cpu_stages); after it, the same frames go through
RabbitMQ alone, consumed and acked by a plain pika consumer, for what the broker and pika take by themselves.
"""

from __future__ import annotations

import json
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
        self.failed: set[str] = set()  # frames answered `fail`
        self.with_regions: set[str] = set()  # of those, the ones whose result carries `regions`
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
            elif method.routing_key.startswith("fail."):
                self.failed.add(frame_id)
                if _has_regions(_body):
                    self.with_regions.add(frame_id)
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


def _has_regions(body: bytes) -> bool:
    try:
        return "regions" in json.loads(body)
    except (ValueError, TypeError):
        return False


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
            # only on the encoding the throwaway model was fitted on: another decodes to other pixels (a JPEG at
            # reduced scale, with JPEG's losses), which the model was not calibrated on (docs/refit.md)
            if options.failing and f is frames[0]:
                out[f.encoding]["failing"] = _failing(settings, collector, f, count, expected, options)
    finally:
        if collector is not None:
            collector.stop()
        _delete_topology(settings)
    return out


def _failing(settings: Settings, collector: Collector, frames: Frames, count: int, expected_rate: float,
             options: BenchOptions) -> dict[str, dict[str, Any]]:
    """Per --failing share, saturation and half load with that share of defective frames, the model's regions
    off, then on. Both half loads run at half the regions-off saturation rate: the same load, so their latencies
    differ by what regions cost alone."""
    name = settings.default_model
    out: dict[str, dict[str, Any]] = {}
    for share in options.failing:
        runs: dict[str, Any] = {}
        half_rate = None
        for regions in (False, True):
            model = settings.models[name].model_copy(update={"regions": regions})
            served = settings.model_copy(update={"models": {**settings.models, name: model}})
            log.info("failing frames: %g of the %s frames defective, regions %s", share, frames.encoding,
                     "on" if regions else "off")
            saturation = _saturation(served, collector, frames, count, expected_rate, share)
            half_rate = half_rate or saturation["frames_per_second"]
            half = _half_load(served, collector, frames, half_rate, options.half_load_s, share)
            runs["regions_on" if regions else "regions_off"] = {"saturation": saturation, "half_load": half}
        out[f"{share:g}"] = runs
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
                expected_rate: float, share: float = 0.0) -> dict[str, Any]:
    """(3a): `count` frames queued before the worker starts; frames/s from its start to the last result.
    `share`: that share of the frames are defective parts, and the verdicts seen are counted (`verdicts`)."""
    phase = secrets.token_hex(3)
    ids = [f"{frames.encoding}-sat-{phase}-{i:06d}" for i in range(count)]
    collector.expect(set(ids))
    log.info("stage 3a: %d %s frames published as a backlog, then a worker drains it", count, frames.encoding)
    defective = set()
    with Publisher(settings) as publisher:
        for i, frame_id in enumerate(ids):
            body, bad = frames.mixed(i, share)
            if bad:
                defective.add(frame_id)
            publisher.publish(frame_id, body, frames.content_type, frames.headers)
    profile = CpuStages()

    def drain(worker: Worker) -> tuple[float, dict[str, Any], dict[str, Any]]:
        started = time.perf_counter()  # the worker consumes from here on
        collector.wait(RESULT_TIMEOUT_S + 3 * count / max(expected_rate, 0.1))
        return started, _batching(worker), profile.figures(count)  # while the worker's threads still run

    started, batching, cpu = _with_worker(settings, drain, hooks=profile)
    times, counts = collector.tally()
    seconds = max(times.values()) - started if times else None
    rate = len(times) / seconds if seconds else None
    out = {"frames": count, "seconds": round(seconds, 3) if seconds else None,
           "frames_per_second": round(rate, 3) if rate else None, **batching, **counts, "cpu": cpu}
    if share:
        out["verdicts"] = verdicts(collector, ids, defective)
    return out


def verdicts(collector: Collector, ids: list[str], defective: set[str]) -> dict[str, Any]:
    """What came back for a phase with defective frames: how many failed, of which kind, with regions or not."""
    failed = collector.failed.intersection(ids)
    return {"defective": len(defective), "fails": len(failed), "fail_share": round(len(failed) / len(ids), 4),
            "defective_failed": len(failed & defective), "good_failed": len(failed - defective),
            "fails_with_regions": len(failed & collector.with_regions)}


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
               duration_s: float, share: float = 0.0) -> dict[str, Any]:
    """(3b): frames evenly paced at half the saturation rate for `duration_s`; latency publish -> result.
    `share`: that share of the frames are defective parts; latency is then given apart for the frames answered
    `fail` and `pass` too (`latency_ms_fail`, `latency_ms_pass`), and the verdicts seen (`verdicts`)."""
    rate = (saturation_rate or 0.0) / 2
    count = max(1, int(rate * duration_s))
    phase = secrets.token_hex(3)
    ids = [f"{frames.encoding}-half-{phase}-{i:06d}" for i in range(count)]
    collector.expect(set(ids))
    log.info("stage 3b: %d %s frames at %.2f Hz for %g s (half the saturation rate)", count, frames.encoding,
             rate, duration_s)

    defective = {frame_id for i, frame_id in enumerate(ids) if share and frames.mixed(i, share)[1]}

    def paced(worker: Worker) -> tuple[Publisher, float, float, dict[str, Any]]:
        with Publisher(settings) as publisher:
            started = time.perf_counter()
            for i, frame_id in enumerate(ids):
                publisher.sleep(started + i / rate - time.perf_counter() if rate > 0 else 0.0)
                publisher.publish(frame_id, frames.mixed(i, share)[0], frames.content_type, frames.headers)
            published = time.perf_counter() - started
        collector.wait(RESULT_TIMEOUT_S + 4 * settings.worker.batch_size / max(rate, 0.1))
        return publisher, started, published, _batching(worker)

    publisher, started, published_s, batching = _with_worker(settings, paced)
    times, counts = collector.tally()
    latency = _percentiles([(times[i] - publisher.published[i]) * 1000 for i in ids if i in times])
    del latency["frames"]  # every frame's: `frames` says how many
    spread = round(latency["p99"] / latency["p50"], 3) if latency["p50"] else None
    seconds = (max(times.values()) - started) if times else None
    out = {"rate_hz": round(rate, 3), "seconds": round(published_s, 3), "frames": count,
           "published_hz": round((count - 1) / published_s, 3) if count > 1 and published_s > 0 else None,
           "frames_per_second": round(len(times) / seconds, 3) if seconds else None,
           "latency_ms": latency, "p99_over_p50": spread, **batching, **counts}
    if share:
        failed = collector.failed
        for verdict, chosen in (("fail", lambda i: i in failed), ("pass", lambda i: i not in failed)):
            out[f"latency_ms_{verdict}"] = _percentiles(
                [(times[i] - publisher.published[i]) * 1000 for i in ids if i in times and chosen(i)])
        out["verdicts"] = verdicts(collector, ids, defective)
    return out


def _percentiles(latencies_ms: list[float]) -> dict[str, Any]:
    """p50, p95, p99, max and mean of some latencies (None when there are none), and how many there were."""
    values = np.array(latencies_ms)
    if not values.size:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None, "frames": 0}
    p50, p95, p99 = (float(np.percentile(values, q)) for q in (50, 95, 99))
    return {"p50": round(p50, 2), "p95": round(p95, 2), "p99": round(p99, 2), "max": round(float(values.max()), 2),
            "mean": round(float(values.mean()), 2), "frames": int(values.size)}


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

