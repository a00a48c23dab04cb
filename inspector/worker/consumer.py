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

Nothing that arrives may take this thread down: a delivery whose properties pika cannot
decode arrives as UndecodableProperties (answered by the worker, not a reconnect loop),
every callback survives its own bugs (logged; the connection is recycled when its state
may be wrong), results that reach no queue are kept in the dead-letter exchange, a result
the broker refuses is requeued after a growing pause, and a dead letter is trimmed to fit
one AMQP frame. The IOLoop ticks every second, so a watchdog sees a stuck thread.
"""

from __future__ import annotations

import base64
import functools
import logging
import random
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop
from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport
from pika.spec import Basic

from inspector.broker import connection_parameters
from inspector.config import Settings, redact_url
from inspector.errors import BrokerError, ConfigError, InspectorError
from inspector.messages import RESULT_SCHEMA, printable

log = logging.getLogger(__name__)

CONTROL_BINDING = "model.#"  # model names may hold dots
_FIRST_BACKOFF_S = 0.5
TICK_S = 1.0  # the IOLoop's heartbeat for the watchdog
NACK_BACKOFF_MAX_S = 30.0  # longest pause before a capture whose result the broker refused is requeued
FRAME_OVERHEAD = 8 + 14 + 1024  # frame header and end, content-header fields, and a margin
KEPT_RAW_PROPERTIES = 32 * 1024  # undecodable properties up to this size travel with the dead letter (base64)
UNROUTABLE_PREFIX = "unroutable."
RECV_BYTES = 256 * 1024  # one socket read at most (pika's own is 4 KiB): two body frames at RabbitMQ's frame_max
CONSUME_BYTES = RECV_BYTES  # read per readable event before the IOLoop serves its timers and callbacks again
MERGED_WRITE_BYTES = 64 * 1024  # writes up to this size are merged into one send (results, acks; not dead letters)


class UndecodableProperties(pika.BasicProperties):
    """The properties of a delivery pika could not decode (a table nested too deep, a time out of
    range): empty, with the reason and the raw bytes, so the capture is still answered."""

    def __init__(self, reason: str, raw: bytes) -> None:
        super().__init__()
        self.decode_error = reason
        self.raw = raw


class _TolerantConnection(pika.SelectConnection):
    """A SelectConnection that survives a content header it cannot decode: pika would raise out of
    the IOLoop and drop the connection on every redelivery, so one hostile capture would stall the
    worker and drag innocent captures past their delivery limit.

    It also reads captures at a frame's cost, not the square of it: pika reads 4 KiB at a time and
    appends each read to one bytes buffer, copying the whole buffer every time, so a 128 KiB body frame
    cost 32 reads and about 2 MiB of copying. Here reads are RECV_BYTES and kept aside until the frame
    they belong to is complete, then joined once and parsed by pika as before. And it writes small
    messages whole: pika hands the socket each frame of a publish (method, header, body) and each ack
    as a write of its own, one send() apiece; here the frames of a message go as one write, and small
    writes waiting for the socket are merged, so a batch of results and their acks leave in one send().
    """

    def _init_connection_state(self) -> None:
        super()._init_connection_state()
        self._reads: list[bytes] = []  # reads not yet handed to pika's frame buffer
        self._read_bytes = 0
        self._awaited = 0  # bytes still missing from the frame at the buffer's start

    def _proto_connection_made(self, transport: Any) -> None:
        transport._MAX_RECV_BYTES = max(RECV_BYTES, getattr(transport, "_MAX_RECV_BYTES", 0))
        transport._MAX_CONSUME_BYTES = max(CONSUME_BYTES, getattr(transport, "_MAX_CONSUME_BYTES", 0))
        if isinstance(transport, _AsyncPlaintextTransport):  # TLS retries a send with the same buffer: left alone
            transport._buffer_tx_data = functools.partial(_merge_tx_data, transport, transport._buffer_tx_data)
        super()._proto_connection_made(transport)

    def _output_marshaled_frames(self, marshaled_frames: Any) -> None:
        if len(marshaled_frames) < 2 or sum(map(len, marshaled_frames)) > MERGED_WRITE_BYTES:
            super()._output_marshaled_frames(marshaled_frames)
            return
        data = b"".join(marshaled_frames)
        self.bytes_sent += len(data)
        self.frames_sent += len(marshaled_frames)
        self._adapter_emit_data(data)

    def _on_data_available(self, data_in: bytes) -> None:
        self._reads.append(data_in)
        self._read_bytes += len(data_in)
        if self._read_bytes < self._awaited:
            return
        data = self._reads[0] if len(self._reads) == 1 else b"".join(self._reads)
        self._reads, self._read_bytes = [], 0
        try:
            super()._on_data_available(data)
        finally:
            self._awaited = _missing_bytes(self._frame_buffer)

    def _read_frame(self) -> Any:
        try:
            return super()._read_frame()
        except pika.exceptions.InvalidFrameError:
            raise
        except Exception as exc:  # noqa: BLE001 - RecursionError, OverflowError, ValueError from the decoder
            salvaged = _salvage_header(self._frame_buffer, exc)
            if salvaged is None:
                raise
            return salvaged


def _merge_tx_data(transport: Any, buffer_tx_data: Callable[[bytes], None], data: bytes) -> None:
    """pika's plaintext transport buffering one write, merged into the last write still waiting while both
    are small: the socket then takes them in one send() (a partial send is requeued by pika as before)."""
    buffers = transport._tx_buffers
    if (data and buffers and transport._state == transport._STATE_ACTIVE and len(data) < MERGED_WRITE_BYTES
            and len(buffers[-1]) < MERGED_WRITE_BYTES):
        buffers[-1] += data
        transport._tx_buffered_byte_count += len(data)
    else:
        buffer_tx_data(data)


def _missing_bytes(buffer: bytes) -> int:
    """How many more bytes the frame at the start of `buffer` needs before pika can parse it; 0 when it
    may parse now (empty, complete, or a protocol header, which pika reads itself)."""
    if not buffer or buffer[:1] == b"A":  # b"AMQP...": a protocol header, 8 bytes
        return 0
    if len(buffer) < pika.spec.FRAME_HEADER_SIZE:
        return pika.spec.FRAME_HEADER_SIZE - len(buffer)
    _type, _channel, size = struct.unpack_from(">BHL", buffer, 0)
    return max(0, pika.spec.FRAME_HEADER_SIZE + size + pika.spec.FRAME_END_SIZE - len(buffer))


def _salvage_header(data: bytes, error: BaseException) -> tuple[int, pika.frame.Header] | None:
    """The content header frame at the start of `data` with its properties replaced, or None when the
    frame that failed is not a content header."""
    try:
        frame_type, channel, size = struct.unpack_from(">BHL", data, 0)
        if frame_type != pika.spec.FRAME_HEADER:
            return None
        frame_end = pika.spec.FRAME_HEADER_SIZE + size + pika.spec.FRAME_END_SIZE
        payload = data[pika.spec.FRAME_HEADER_SIZE:frame_end - 1]
        _class_id, _weight, body_size = struct.unpack_from(">HHQ", payload, 0)
    except struct.error:
        return None
    reason = f"{type(error).__name__}: {str(error)[:200]}"
    log.warning("a delivery's properties could not be decoded (%s); it is answered as headers_undecodable", reason)
    return frame_end, pika.frame.Header(channel, body_size, UndecodableProperties(reason, bytes(payload[12:])))


def _survive(method: Callable) -> Callable:
    """A broker-thread callback that logs its own bug instead of ending the IOLoop. The connection is
    then recycled: a fresh one re-declares everything and the broker redelivers what was held, so no
    capture is lost to state the bug may have left half-updated."""

    @functools.wraps(method)
    def guarded(self: "Consumer", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception:  # noqa: BLE001
            log.exception("bug in the broker thread (%s); recycling the connection", method.__name__)
            self.faults += 1
            connection = self._connection
            try:
                if connection is not None and connection.is_open:
                    connection.close()
            except Exception:  # noqa: BLE001 - already failing; the reconnect path takes over
                log.exception("closing the connection after a bug failed")
            return None

    return guarded


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
    result: bytes | None  # None: no result can be built; the broker dead-letters the capture (nack)
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
        self.faults = 0  # bugs survived on the broker thread
        self.unroutable = 0  # results kept in the dead-letter exchange because no queue took them
        self.last_tick = time.monotonic()  # the IOLoop's last heartbeat, for the watchdog
        self.on_unroutable: Callable[[], None] = lambda: None
        self.connected = threading.Event()
        self.stopped = threading.Event()
        self._nodes = [(redact_url(url), connection_parameters(settings.broker, url)) for url in settings.broker.urls]
        self._node = 0  # the node tried next; a lost or refused connection moves on to the next
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
        self._paused = False
        self._nack_streak = 0
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

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # -- called on the broker thread (from on_delivery / on_settled) ---------------------------

    def pause(self) -> None:
        """Take no new deliveries until `resume` (the in-flight byte budget is spent); kept across
        reconnects. Deliveries already on their way still arrive and are served."""
        if self._paused:
            return
        self._paused = True
        log.warning("captures held in memory are over worker.max_inflight_bytes: taking no more until some are "
                    "answered")
        if self._channel is not None and self._channel.is_open and self._consumer_tag:
            self._channel.basic_cancel(self._consumer_tag)
            self._consumer_tag = None

    def resume(self) -> None:
        if not self._paused:
            return
        self._paused = False
        log.info("captures held in memory are back under budget: consuming again")
        self._consume()

    # -- the broker thread ------------------------------------------------------------------

    def _run(self) -> None:
        self._ioloop.add_callback_threadsafe(self._connect)
        self._ioloop.add_callback_threadsafe(self._tick)
        try:
            self._ioloop.start()
        except Exception as exc:  # noqa: BLE001 - the thread must not end silently
            log.exception("the broker thread failed")
            self.failure = InspectorError(f"the broker thread failed: {exc!r}")
        finally:
            try:
                self._ioloop.close()
            finally:
                self.stopped.set()

    def _tick(self) -> None:
        self.last_tick = time.monotonic()
        self._ioloop.call_later(TICK_S, self._tick)

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
        self._connection = _TolerantConnection(
            self._nodes[self._node][1],
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
                f"RabbitMQ at {self._nodes[self._node][0]} refused the login ({self._last_error}); check the "
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
        channel.add_on_return_callback(self._on_return)
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
        self._consume()
        self.generation += 1
        self._ever_connected = True
        self._attempt = 0
        log.info("connected to %s; consuming %s (prefetch %d)", self._nodes[self._node][0],
                 self.settings.worker.queue, self.settings.worker.prefetch)
        self.connected.set()
        self.on_connection(True)

    def _consume(self) -> None:
        channel = self._channel
        if self._paused or self._stopping or self._consumer_tag or channel is None or not channel.is_open:
            return
        self._consumer_tag = channel.basic_consume(self.settings.worker.queue, self._on_message)

    def _on_message(self, channel: Any, method: Basic.Deliver, properties: pika.BasicProperties, body: bytes) -> None:
        self._unacked[method.delivery_tag] = None
        try:
            self.on_delivery(Delivery(
                generation=self.generation, tag=method.delivery_tag, exchange=method.exchange,
                routing_key=method.routing_key, properties=properties, body=body,
                redelivered=bool(method.redelivered), received_at=time.time(),
            ))
        except Exception:  # noqa: BLE001 - never hold a capture nobody will answer
            log.exception("handing a delivery to the worker failed; it is returned to the queue")
            self._unacked.pop(method.delivery_tag, None)
            if channel.is_open:
                channel.basic_nack(method.delivery_tag, requeue=True)

    def _on_control_message(self, _channel: Any, method: Basic.Deliver, _properties: Any, body: bytes) -> None:
        try:
            self.on_control(method.routing_key, body)
        except Exception:  # noqa: BLE001 - a control message is advice; the store poll catches up
            log.exception("a control message on %r could not be handled; ignored", method.routing_key[:100])

    # -- publishing and acking ---------------------------------------------------------------

    @_survive
    def _publish(self, outcomes: list[Outcome]) -> None:
        channel = self._channel
        for outcome in outcomes:
            delivery = outcome.delivery
            if (channel is None or not channel.is_open or delivery.generation != self.generation
                    or delivery.tag not in self._unacked):
                self.on_settled(outcome, False)  # from a lost connection: the broker redelivers it
                continue
            if outcome.result is None:
                self._reject(channel, outcome, "no result could be built")
                continue
            try:
                published = self._publish_one(channel, outcome)
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError, OSError) as exc:
                log.warning("publishing the result of frame %s failed (%s); the capture will be redelivered",
                            outcome.frame_id, _describe_error(exc))
                self.on_settled(outcome, False)
                continue
            except Exception as exc:  # noqa: BLE001 - the message, not the connection: answer it once
                self._reject(channel, outcome, _describe_error(exc))
                continue
            entry = self._waiting.setdefault(delivery.tag, [0, outcome, False])
            entry[0] += published
            entry[1] = outcome

    def _publish_one(self, channel: Any, outcome: Outcome) -> int:
        """The result (mandatory: a result no queue takes comes back, see _on_return) and any dead letter;
        how many publishes await a confirm. Both are marshalled before either is sent, so a message pika
        refuses (a field over an AMQP limit) sends nothing."""
        delivery = outcome.delivery
        result_properties = pika.BasicProperties(
            content_type="application/json", delivery_mode=2, correlation_id=outcome.frame_id,
            timestamp=int(time.time()), type=RESULT_SCHEMA,
        )
        dead_properties = None
        if outcome.dead_letter is not None:  # pika marshals one publish whole before sending it; two need this
            result_properties.encode()
            dead_properties = _dead_letter_properties(outcome, self._properties_budget())
            dead_properties.encode()
        channel.basic_publish(self.settings.broker.exchanges.results, outcome.routing_key, outcome.result,
                              result_properties, mandatory=True)
        self._track(delivery.tag)
        if dead_properties is None:
            return 1
        channel.basic_publish(self.settings.broker.exchanges.dead, delivery.routing_key, delivery.body,
                              dead_properties)
        self._track(delivery.tag)
        return 2

    def _reject(self, channel: Any, outcome: Outcome, why: str) -> None:
        """Nack the capture without requeue: its queue's dead-letter exchange keeps it, untouched, with the
        broker's x-death header. The last resort when no result can be published for it."""
        log.error("frame %s: no result can be published (%s); the capture goes to %s", outcome.frame_id, why,
                  self.settings.broker.exchanges.dead)
        tag = outcome.delivery.tag
        self._unacked.pop(tag, None)
        channel.basic_nack(tag, requeue=False)
        outcome.record = None  # no result went out: counted as an internal error, not as its verdict
        self.on_settled(outcome, True)
        self._maybe_finish_stop()

    def _properties_budget(self) -> int:
        connection = self._connection
        frame_max = connection.params.frame_max if connection is not None else pika.spec.FRAME_MAX_SIZE
        return max(4096, min(frame_max, pika.spec.FRAME_MAX_SIZE) - FRAME_OVERHEAD)

    @_survive
    def _on_return(self, channel: Any, method: Any, properties: pika.BasicProperties, body: bytes) -> None:
        """A result no queue took (nothing bound on the results exchange for its routing key): keep it on
        the dead-letter exchange, where `inspection.dead` holds it, before its capture is acked. The
        broker sends the return before the confirm of that publish, so the capture waits for this one."""
        tag = next((tag for tag, entry in self._waiting.items() if entry[1].frame_id == properties.correlation_id),
                   None)
        self.unroutable += 1
        self.on_unroutable()
        if self.unroutable == 1 or self.unroutable % 1000 == 0:
            log.warning("results exchange %s has no queue for %r (%d results so far): they are kept in %s; bind "
                        "a queue for the results", self.settings.broker.exchanges.results, method.routing_key[:100],
                        self.unroutable, self.settings.broker.exchanges.dead)
        if tag is None or channel is not self._channel or not channel.is_open:
            return
        key = UNROUTABLE_PREFIX + method.routing_key
        if len(key.encode()) > 255:
            key = UNROUTABLE_PREFIX.rstrip(".")
        headers = {"x-inspector-unroutable": True, "x-inspector-original-exchange": method.exchange,
                   "x-inspector-original-routing-key": method.routing_key}
        kept = pika.BasicProperties(content_type=properties.content_type, delivery_mode=2,
                                    correlation_id=properties.correlation_id, timestamp=properties.timestamp,
                                    type=properties.type, headers=headers)
        channel.basic_publish(self.settings.broker.exchanges.dead, key, body, kept)
        self._track(tag)
        self._waiting[tag][0] += 1

    def _track(self, delivery_tag: int) -> None:
        self._sequence += 1
        self._sequence_tags[self._sequence] = delivery_tag

    @_survive
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
        refused = [(tag, outcome) for tag, (_, outcome, nacked) in done.items() if nacked]
        if refused:
            self._requeue_later(refused)
        elif done:
            self._nack_streak = 0
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
            if not nacked:
                self.on_settled(outcome, True)
        self._maybe_finish_stop()

    def _requeue_later(self, refused: list[tuple[int, Outcome]]) -> None:
        """The broker could not take a result (nack): requeue its capture after a pause that grows while
        refusals go on, so a broker in trouble is not hammered with the same captures."""
        delay = min(NACK_BACKOFF_MAX_S, _FIRST_BACKOFF_S * 2 ** min(self._nack_streak, 16))
        self._nack_streak += 1
        generation = self.generation
        for _, outcome in refused:
            log.warning("RabbitMQ refused the result of frame %s; the capture is requeued in %.1f s",
                        outcome.frame_id, delay)
        self._ioloop.call_later(delay, functools.partial(self._requeue, generation, refused))

    @_survive
    def _requeue(self, generation: int, refused: list[tuple[int, Outcome]]) -> None:
        channel = self._channel
        for tag, outcome in refused:
            if generation == self.generation and channel is not None and channel.is_open and tag in self._unacked:
                channel.basic_nack(tag, requeue=True)
                self._unacked.pop(tag, None)
            self.on_settled(outcome, False)
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
            log.error("RabbitMQ refused the worker's topology: %s. %s", reason.reply_text,
                      _remedy_for_406(reason.reply_text, self.settings))
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
                f"cannot reach RabbitMQ at {self.settings.broker.shown} after {worker.start_timeout_s:g} s "
                f"({self._last_error}); check broker.url and that RabbitMQ runs"
            ))
            return
        if self._stopping:
            self._ioloop.stop()
            return
        failed = self._nodes[self._node][0]
        self._node = (self._node + 1) % len(self._nodes)  # fail over: the next node of the cluster first
        rounds = max(0, self._attempt - 1) // len(self._nodes)  # back off per round over every node
        delay = min(worker.reconnect_max_s, _FIRST_BACKOFF_S * 2 ** min(rounds, 16))
        delay *= random.uniform(0.5, 1.0)  # jitter: a fleet of workers does not reconnect in step
        log.warning("cannot reach RabbitMQ at %s (%s); trying %s in %.1f s", failed, self._last_error,
                    self._nodes[self._node][0], delay)
        self._ioloop.call_later(delay, self._connect)

    def _fail(self, error: InspectorError) -> None:
        self.failure = error
        self._stopping = True
        self._ioloop.stop()


def _exchange(name: str, channel: Any, done: Callable) -> None:
    channel.exchange_declare(name, exchange_type="topic", durable=True, callback=done)


def _bind(queue: str, exchange: str, key: str, channel: Any, done: Callable) -> None:
    channel.queue_bind(queue, exchange, routing_key=key, callback=done)


def _dead_letter_properties(outcome: Outcome, budget: int) -> pika.BasicProperties:
    """The capture's own properties and headers, plus why it could not be scored, within `budget` bytes
    encoded: a content header must fit one frame, or the broker closes the connection (FRAME_ERROR).
    Over budget, the largest original headers are dropped first and the count is said."""
    original = outcome.delivery.properties
    code, message = outcome.dead_letter or ("", "")
    added: dict[str, Any] = {
        "x-inspector-error-code": code,
        "x-inspector-error-message": printable(message, 1000),
        "x-inspector-frame-id": outcome.frame_id,
        "x-inspector-original-exchange": outcome.delivery.exchange,
        "x-inspector-original-routing-key": outcome.delivery.routing_key,
    }
    raw = getattr(original, "raw", None)
    if raw is not None and len(raw) <= KEPT_RAW_PROPERTIES:
        added["x-inspector-original-properties-b64"] = base64.b64encode(raw).decode("ascii")
    headers = dict(original.headers or {}) if isinstance(original.headers, dict) else {}

    def build(kept: dict[str, Any], dropped: int) -> pika.BasicProperties:
        extra = {"x-inspector-headers-dropped": dropped} if dropped else {}
        return pika.BasicProperties(
            content_type=original.content_type, content_encoding=original.content_encoding,
            headers={**kept, **added, **extra}, delivery_mode=2, priority=original.priority,
            correlation_id=original.correlation_id, message_id=original.message_id or outcome.frame_id,
            timestamp=original.timestamp, type=original.type, app_id=original.app_id,
        )

    properties = build(headers, 0)
    if _encoded_size(properties) <= budget:
        return properties
    by_size = sorted(headers, key=lambda key: _encoded_size(pika.BasicProperties(headers={key: headers[key]})),
                     reverse=True)
    for dropped, key in enumerate(by_size, start=1):
        del headers[key]
        properties = build(headers, dropped)
        if _encoded_size(properties) <= budget:
            return properties
    return build({}, len(by_size))


def _encoded_size(properties: pika.BasicProperties) -> int:
    try:
        return sum(len(piece) for piece in properties.encode())
    except Exception:  # noqa: BLE001 - a value pika cannot encode: never fits
        return 1 << 30


def _remedy_for_406(reply_text: str, settings: Settings) -> str:
    """What an operator does about a refused declaration. For the capture queue the exact choice, since
    deleting it with frames inside would lose them."""
    worker = settings.worker
    if worker.queue in reply_text or worker.dead_letter_queue in reply_text:
        name = worker.queue if worker.queue in reply_text else worker.dead_letter_queue
        return (f"RabbitMQ fixes a queue's arguments when it is first declared, and {name} was declared with "
                f"others (worker.delivery_limit changed?). Either set the configuration back to the queue's "
                f"value (the 'current is' figure above), or declare it anew without losing frames: let the "
                f"workers that still run drain it until `rabbitmqctl list_queues name messages` shows 0 for it, "
                f"then `rabbitmqctl delete_queue {name}` and start the workers, which declare it with the new "
                f"value.")
    return ("An existing exchange or queue was declared with other settings; match them "
            "(`rabbitmqctl list_exchanges name type durable`), or delete it if it holds nothing.")


def _describe_error(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else repr(error)

