"""The broker thread: the only code that touches the worker's pika connection.

It runs pika's SelectConnection on one IOLoop for the life of the worker. It declares
the topology after every (re)connect, consumes captures with manual acks and a bounded
prefetch, publishes results (and dead letters) with publisher confirms, and acks a
capture only once everything published for it is confirmed, coalescing acks with
`multiple=True` where the tags allow. Other threads hand it work with `submit`, which
goes through `add_callback_threadsafe`; nothing here waits on a model, so heartbeats
keep flowing during a long batch.

A reconnect starts a new generation: outcomes of deliveries from an older connection
are dropped, never acked with a stale tag; the broker redelivers those captures and
they are scored again (`redelivered: true`).
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop
from pika.spec import Basic

from inspector.broker import connection_parameters, redact_url
from inspector.config import Settings
from inspector.errors import BrokerError, ConfigError, InspectorError

log = logging.getLogger(__name__)

CONTROL_BINDING = "model.*"
_FIRST_BACKOFF_S = 0.5


@dataclass(frozen=True, eq=False)
class Delivery:
    """A capture as the broker handed it over, tagged with the connection it came on."""

    generation: int
    tag: int
    exchange: str
    routing_key: str
    properties: pika.BasicProperties
    body: bytes
    redelivered: bool
    received_at: float  # time.time()


@dataclass(eq=False)
class Outcome:
    """What the worker answers a delivery with: one result, and a dead letter when it failed."""

    delivery: Delivery
    routing_key: str
    result: bytes
    frame_id: str
    dead_letter: tuple[str, str] | None = None  # (code, message)
    record: Any = None  # what the worker wants back in on_settled (for its metrics)
    submitted_at: float = field(default_factory=time.perf_counter)


class Consumer:
    """Owns the connection; see the module docstring. Callbacks run on the broker thread and must be quick."""

    def __init__(
        self,
        settings: Settings,
        on_delivery: Callable[[Delivery], None],
        on_settled: Callable[[Outcome, bool], None],
        on_control: Callable[[str, bytes], None],
        on_connection: Callable[[bool], None],
    ) -> None:
        self.settings = settings
        self.on_delivery = on_delivery
        self.on_settled = on_settled  # (outcome, acked): acked False when dropped as stale or nacked
        self.on_control = on_control
        self.on_connection = on_connection  # True on every (re)connect, False on every loss
        self.generation = 0
        self.failure: InspectorError | None = None  # set when the worker must exit
        self.connected = threading.Event()
        self.stopped = threading.Event()
        self._params = connection_parameters(settings.broker)
        self._ioloop = IOLoop()
        self._thread = threading.Thread(target=self._run, name="inspector-broker", daemon=True)
        self._connection: pika.SelectConnection | None = None
        self._channel: Any = None
        self._consumer_tag: str | None = None
        self._ever_connected = False
        self._attempt = 0
        self._started_at = 0.0
        self._stopping = False
        self._stop_deadline: float | None = None
        self._last_error = "no attempt yet"
        self._reset_generation_state()

    # -- called from other threads ---------------------------------------------------------

    def start(self) -> None:
        self._started_at = time.monotonic()
        self._thread.start()

    def submit(self, outcomes: list[Outcome]) -> None:
        """Publish these outcomes and ack their captures once confirmed (thread safe)."""
        self._ioloop.add_callback_threadsafe(functools.partial(self._publish, outcomes))

    def stop_consuming(self, grace_s: float) -> None:
        """Take no new captures; close once every held capture is settled or after `grace_s`."""
        self._ioloop.add_callback_threadsafe(functools.partial(self._begin_stop, grace_s))

    def close_now(self) -> None:
        self._ioloop.add_callback_threadsafe(functools.partial(self._begin_stop, 0.0))

    # -- the broker thread ------------------------------------------------------------------

    def _run(self) -> None:
        self._ioloop.add_callback_threadsafe(self._connect)
        try:
            self._ioloop.start()
        finally:
            self._ioloop.close()
            self.stopped.set()

    def _reset_generation_state(self) -> None:
        self._unacked: OrderedDict[int, None] = OrderedDict()  # delivery tags in delivery order
        self._waiting: dict[int, list[Any]] = {}  # delivery tag -> [publishes unconfirmed, outcome, nacked]
        self._sequence = 0
        self._sequence_tags: OrderedDict[int, int] = OrderedDict()  # publish sequence -> delivery tag

    def _connect(self) -> None:
        if self._stopping:
            self._ioloop.stop()
            return
        self._attempt += 1
        self._connection = pika.SelectConnection(
            self._params,
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_open_error,
            on_close_callback=self._on_connection_closed,
            custom_ioloop=self._ioloop,
        )

    def _on_connection_open_error(self, _connection: Any, error: BaseException) -> None:
        self._connection = None
        self._last_error = _describe_error(error)
        if not self._ever_connected and isinstance(
            error, (pika.exceptions.ProbableAuthenticationError, pika.exceptions.ProbableAccessDeniedError)
        ):
            self._fail(ConfigError(
                f"RabbitMQ at {redact_url(self.settings.broker.url)} refused the login ({self._last_error}); check the "
                "user in broker.url, the vhost, and INSPECTOR_BROKER__PASSWORD"
            ))
            return
        self._schedule_reconnect()

    def _on_connection_open(self, connection: Any) -> None:
        connection.add_on_connection_blocked_callback(
            lambda *_: log.warning("RabbitMQ blocks publishing (a resource alarm): results wait until it clears"))
        connection.add_on_connection_unblocked_callback(lambda *_: log.info("RabbitMQ unblocked publishing"))
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_cancel_callback(self._on_cancelled)
        channel.confirm_delivery(self._on_confirm, callback=lambda _frame: self._declare(channel, self._topology()))

    def _topology(self) -> list[Callable[[Any, Callable], None]]:
        """The declarations, in order; each step takes (channel, next). Idempotent on an existing topology."""
        broker, worker = self.settings.broker, self.settings.worker
        ex = broker.exchanges
        steps: list[Callable[[Any, Callable], None]] = [
            *(functools.partial(_exchange, name) for name in (ex.captures, ex.results, ex.control, ex.dead)),
            lambda ch, done: ch.queue_declare(
                worker.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}, callback=done),
            lambda ch, done: ch.queue_bind(worker.dead_letter_queue, ex.dead, routing_key="#", callback=done),
            lambda ch, done: ch.queue_declare(worker.queue, durable=True, arguments={
                "x-queue-type": "quorum",
                "x-dead-letter-exchange": ex.dead,
                "x-delivery-limit": worker.delivery_limit,
            }, callback=done),
            *(functools.partial(_bind, worker.queue, ex.captures, key) for key in worker.binding_keys),
            lambda ch, done: ch.basic_qos(prefetch_count=worker.prefetch, callback=done),
            lambda ch, done: ch.queue_declare("", exclusive=True, auto_delete=True, callback=done),
        ]
        return steps

    def _declare(self, channel: Any, steps: list) -> None:
        if channel is not self._channel or not channel.is_open:
            return
        if not steps:
            return
        step, rest = steps[0], steps[1:]
        if rest:
            step(channel, lambda _frame: self._declare(channel, rest))
        else:  # the last step declares the control queue; its name comes back in the frame
            step(channel, lambda frame: self._on_control_queue(channel, frame.method.queue))

    def _on_control_queue(self, channel: Any, queue: str) -> None:
        channel.queue_bind(queue, self.settings.broker.exchanges.control, routing_key=CONTROL_BINDING,
                           callback=lambda _frame: self._start_consuming(channel, queue))

    def _start_consuming(self, channel: Any, control_queue: str) -> None:
        channel.basic_consume(control_queue, self._on_control_message, auto_ack=True)
        if self._stopping:
            return
        self._consumer_tag = channel.basic_consume(self.settings.worker.queue, self._on_message)
        self.generation += 1
        self._ever_connected = True
        self._attempt = 0
        log.info("connected to %s; consuming %s (prefetch %d)", redact_url(self.settings.broker.url),
                 self.settings.worker.queue, self.settings.worker.prefetch)
        self.connected.set()
        self.on_connection(True)

    def _on_message(self, _channel: Any, method: Basic.Deliver, properties: pika.BasicProperties, body: bytes) -> None:
        self._unacked[method.delivery_tag] = None
        self.on_delivery(Delivery(
            generation=self.generation, tag=method.delivery_tag, exchange=method.exchange,
            routing_key=method.routing_key, properties=properties, body=body,
            redelivered=bool(method.redelivered), received_at=time.time(),
        ))

    def _on_control_message(self, _channel: Any, method: Basic.Deliver, _properties: Any, body: bytes) -> None:
        self.on_control(method.routing_key, body)

    # -- publishing and acking ---------------------------------------------------------------

    def _publish(self, outcomes: list[Outcome]) -> None:
        channel = self._channel
        results = self.settings.broker.exchanges.results
        for outcome in outcomes:
            delivery = outcome.delivery
            if (channel is None or not channel.is_open or delivery.generation != self.generation
                    or delivery.tag not in self._unacked):
                self.on_settled(outcome, False)  # from a lost connection: the broker redelivers it
                continue
            try:
                channel.basic_publish(results, outcome.routing_key, outcome.result, pika.BasicProperties(
                    content_type="application/json", delivery_mode=2, correlation_id=outcome.frame_id,
                    timestamp=int(time.time()), type="inspection.result/1",
                ))
                self._track(delivery.tag)
                if outcome.dead_letter is not None:
                    channel.basic_publish(self.settings.broker.exchanges.dead, delivery.routing_key,
                                          delivery.body, _dead_letter_properties(outcome))
                    self._track(delivery.tag)
            except (pika.exceptions.AMQPError, OSError) as exc:
                log.warning("publishing the result of frame %s failed (%s); the capture will be redelivered",
                            outcome.frame_id, _describe_error(exc))
                self.on_settled(outcome, False)
                continue
            entry = self._waiting.setdefault(delivery.tag, [0, outcome, False])
            entry[0] += 1 + (outcome.dead_letter is not None)
            entry[1] = outcome

    def _track(self, delivery_tag: int) -> None:
        self._sequence += 1
        self._sequence_tags[self._sequence] = delivery_tag

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, Basic.Ack)
        tags: list[int] = []
        if method.multiple:
            while self._sequence_tags and next(iter(self._sequence_tags)) <= method.delivery_tag:
                tags.append(self._sequence_tags.popitem(last=False)[1])
        elif method.delivery_tag in self._sequence_tags:
            tags.append(self._sequence_tags.pop(method.delivery_tag))
        ready: list[int] = []
        for tag in tags:
            entry = self._waiting.get(tag)
            if entry is None:
                continue
            entry[0] -= 1
            entry[2] = entry[2] or not acked
            if entry[0] == 0:
                ready.append(tag)
        if ready:
            self._settle(ready)

    def _settle(self, tags: list[int]) -> None:
        channel = self._channel
        done = {tag: self._waiting.pop(tag) for tag in tags}
        for tag, (_, outcome, nacked) in done.items():
            if nacked:  # the broker could not take the result: let it redeliver the capture
                log.warning("RabbitMQ refused the result of frame %s; the capture is requeued", outcome.frame_id)
                channel.basic_nack(tag, requeue=True)
                self._unacked.pop(tag, None)
        ackable = {tag for tag, (_, _, nacked) in done.items() if not nacked}
        last, count = None, 0
        while self._unacked and next(iter(self._unacked)) in ackable:
            last = self._unacked.popitem(last=False)[0]
            ackable.discard(last)
            count += 1
        if last is not None:
            channel.basic_ack(last, multiple=count > 1)
        for tag in ackable:
            channel.basic_ack(tag)
            self._unacked.pop(tag, None)
        for _, outcome, nacked in done.values():
            self.on_settled(outcome, not nacked)
        self._maybe_finish_stop()

    # -- stopping and losing the connection ---------------------------------------------------

    def _begin_stop(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        if self._stopping and self._stop_deadline is not None and deadline >= self._stop_deadline:
            return
        self._stopping, self._stop_deadline = True, deadline
        if self._channel is not None and self._channel.is_open and self._consumer_tag:
            self._channel.basic_cancel(self._consumer_tag)
            self._consumer_tag = None
        self._ioloop.call_later(max(0.0, grace_s), self._grace_over)
        self._maybe_finish_stop()

    def _grace_over(self) -> None:
        if self._unacked:
            log.warning("shutdown grace period over with %d captures unsettled; the broker will redeliver them",
                        len(self._unacked))
        self._close()

    def _maybe_finish_stop(self) -> None:
        if self._stopping and not self._unacked:
            self._close()

    def _close(self) -> None:
        connection = self._connection
        if connection is not None and connection.is_open:
            connection.close()  # _on_connection_closed stops the loop
        else:  # not connected, or still opening: nothing to say goodbye to
            self._ioloop.stop()

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        if channel is not self._channel:
            return
        self._channel = None
        connection = self._connection
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker) and reason.reply_code == 406:
            log.error("RabbitMQ refused the worker's topology: %s. An existing queue or exchange was declared "
                      "with other settings; delete it (rabbitmqctl delete_queue NAME) or match its settings",
                      reason.reply_text)
        if connection is not None and connection.is_open:
            connection.close()  # one path to recovery: a fresh connection

    def _on_cancelled(self, _frame: Any) -> None:
        """The broker cancelled the consumer (its queue was deleted): reconnect, which re-declares it."""
        log.error("RabbitMQ cancelled consuming from %s (was the queue deleted?); reconnecting to re-declare it",
                  self.settings.worker.queue)
        if self._connection is not None and self._connection.is_open:
            self._connection.close()

    def _on_connection_closed(self, _connection: Any, reason: BaseException) -> None:
        self._connection, self._channel, self._consumer_tag = None, None, None
        self._last_error = _describe_error(reason)
        held = len(self._unacked)
        self._reset_generation_state()
        self.connected.clear()
        self.on_connection(False)
        if self._stopping:
            log.info("connection closed")
            self._ioloop.stop()
            return
        log.warning("lost the connection to RabbitMQ (%s); %d held captures will be redelivered",
                    self._last_error, held)
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        worker = self.settings.worker
        if not self._ever_connected and time.monotonic() - self._started_at > worker.start_timeout_s:
            self._fail(BrokerError(
                f"cannot reach RabbitMQ at {redact_url(self.settings.broker.url)} after {worker.start_timeout_s:g} s "
                f"({self._last_error}); check broker.url and that RabbitMQ runs"
            ))
            return
        if self._stopping:
            self._ioloop.stop()
            return
        delay = min(worker.reconnect_max_s, _FIRST_BACKOFF_S * 2 ** min(self._attempt, 16))
        delay *= random.uniform(0.5, 1.0)  # jitter: a fleet of workers does not reconnect in step
        log.warning("cannot reach RabbitMQ (%s); retrying in %.1f s", self._last_error, delay)
        self._ioloop.call_later(delay, self._connect)

    def _fail(self, error: InspectorError) -> None:
        self.failure = error
        self._stopping = True
        self._ioloop.stop()


def _exchange(name: str, channel: Any, done: Callable) -> None:
    channel.exchange_declare(name, exchange_type="topic", durable=True, callback=done)


def _bind(queue: str, exchange: str, key: str, channel: Any, done: Callable) -> None:
    channel.queue_bind(queue, exchange, routing_key=key, callback=done)


def _dead_letter_properties(outcome: Outcome) -> pika.BasicProperties:
    """The capture's own properties and headers, plus why it could not be scored."""
    original = outcome.delivery.properties
    code, message = outcome.dead_letter or ("", "")
    headers = dict(original.headers or {})
    headers.update({
        "x-inspector-error-code": code,
        "x-inspector-error-message": message[:1000],
        "x-inspector-frame-id": outcome.frame_id,
        "x-inspector-original-exchange": outcome.delivery.exchange,
        "x-inspector-original-routing-key": outcome.delivery.routing_key,
    })
    return pika.BasicProperties(
        content_type=original.content_type, content_encoding=original.content_encoding, headers=headers,
        delivery_mode=2, priority=original.priority, correlation_id=original.correlation_id,
        message_id=original.message_id or outcome.frame_id, timestamp=original.timestamp, type=original.type,
        app_id=original.app_id,
    )


def _describe_error(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else repr(error)

