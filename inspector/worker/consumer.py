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

This module is the thread, pika's callbacks and the state machine; what they decide with lives apart:
the connection that reads and writes frames (pikaconnection, the one place pika's internals are used),
the declarations (topology), the messages and their properties (envelopes), the books of held captures
(ledger) and the prefetch and backoff rules (pacing).
"""

from __future__ import annotations

import abc
import functools
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop
from pika.spec import Basic

from inspector.broker import connection_parameters
from inspector.config import Settings, redact_url
from inspector.errors import BrokerError, ConfigError, InspectorError
from inspector.worker.hooks import StageHooks, staged, watch
from inspector.worker import topology
from inspector.worker.envelopes import (
    Delivery,
    Outcome,
    dead_letter_properties,
    properties_budget,
    publish_message_id,
    publish_sequence,
    result_properties,
    unroutable_copy,
)
from inspector.worker.ledger import ENDED, HELD, Entry, Ledger
from inspector.worker.pacing import MAX_RESULT_REFUSALS, RecentSizes, Refusals, prefetch_for, reconnect_delay
from inspector.worker.pikaconnection import TolerantConnection, UndecodableProperties
from inspector.worker.topology import CONTROL_BINDING

__all__ = ["CONTROL_BINDING", "MAX_RESULT_REFUSALS", "Consumer", "Delivery", "Outcome", "UndecodableProperties",
           "prefetch_for"]

log = logging.getLogger(__name__)

TICK_S = 1.0  # the IOLoop's heartbeat for the watchdog
RESUME_SHARE = 0.75  # paused over worker.max_inflight_bytes, consuming resumes below this share of it


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


class ConsumerCallbacks(abc.ABC):
    """The consumer's constructor and the state the worker reads, shared by Consumer and StubConsumer: one
    interface, so a worker built on the stub is built exactly as on the real broker. A subclass sets up the
    rest of its state in `_init_state`, called last."""

    def __init__(
        self,
        settings: Settings,
        on_delivery: Callable[[Delivery], None],
        on_settled: Callable[[Outcome, bool], None],
        on_control: Callable[[str, bytes], None],
        on_connection: Callable[[bool], None],
        *,
        on_unroutable: Callable[[], None] | None = None,
        on_budget: Callable[[Ledger], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
        hooks: StageHooks | None = None,
    ) -> None:
        self.settings = settings
        self.on_delivery = on_delivery
        self.on_settled = on_settled  # (outcome, acked): acked False when dropped as stale or nacked
        self.on_control = on_control
        self.on_connection = on_connection  # True on every (re)connect, False on every loss
        self.hooks = hooks  # told around each stage of a frame on this thread (hooks.py); None: nobody watches
        watch(self, hooks)  # the methods marked @staged, wrapped on this consumer when there are hooks
        self.generation = 0
        self.failure: InspectorError | None = None  # set when the worker must exit
        self.faults = 0  # bugs survived on the broker thread
        self.unroutable = 0  # results kept in the dead-letter exchange because no queue took them
        self.last_tick = time.monotonic()  # the IOLoop's last heartbeat, for the watchdog
        self.on_unroutable: Callable[[], None] = on_unroutable or (lambda: None)
        self.on_budget: Callable[[Ledger], None] = on_budget or (lambda ledger: None)  # after every change of the books
        self.on_refused: Callable[[str], None] = on_refused or (lambda outcome: None)  # "requeued" or "given_up"
        self._init_state(settings)

    @abc.abstractmethod
    def _init_state(self, settings: Settings) -> None:
        """The subclass's own state (its books, thread, connection), set up last by the shared constructor."""


class Consumer(ConsumerCallbacks):
    """Owns the connection; see the module docstring. Callbacks run on the broker thread and must be quick."""

    def _init_state(self, settings: Settings) -> None:
        self.ledger = Ledger(settings.worker.max_inflight_bytes, RESUME_SHARE)
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
        self._refusals = Refusals()  # results the broker refused: per frame, and the pause before a requeue
        self._sizes = RecentSizes()  # the latest capture bodies' sizes, which the prefetch follows
        self._prefetch = 0  # the prefetch of the consumer now registered (0: none)
        self._not_consuming_since: float | None = None  # connected, not paused, not stopping, yet no consumer
        self._publish_id = f"{random.getrandbits(48):012x}"  # this process's results' message_id prefix

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

    def pause_reason(self) -> str | None:
        """Why no captures are taken now, or None while consuming (read from any thread)."""
        ledger = self.ledger
        if not ledger.paused:
            return None
        return (f"{ledger.bytes} bytes of {ledger.frames} captures held, over worker.max_inflight_bytes "
                f"({ledger.max_bytes}); consuming again at {int(ledger.max_bytes * RESUME_SHARE)}")

    def stuck_for(self) -> float:
        """Seconds the worker has taken no captures without a reason (connected, not paused, not stopping,
        no consumer registered): 0 while all is well. Over a limit, a bug: the watchdog makes it loud."""
        since = self._not_consuming_since
        if since is None:
            return 0.0
        return max(0.0, time.monotonic() - since)

    def _pause(self) -> None:
        """Take no new deliveries: the in-flight byte budget is spent. Kept across reconnects. Deliveries
        already on their way still arrive (at most one prefetch window, which follows the frames' size)."""
        log.warning("captures held in memory are over worker.max_inflight_bytes (%s): taking no more until some "
                    "are answered", self.pause_reason())
        self._cancel_consumer()

    def _cancel_consumer(self) -> None:
        if self._channel is not None and self._channel.is_open and self._consumer_tag:
            self._channel.basic_cancel(self._consumer_tag)
        self._consumer_tag, self._prefetch = None, 0

    def _budget_changed(self) -> None:
        """After any change of the books: resume when the budget allows, and tell the worker (metrics)."""
        if self.ledger.should_resume():
            log.info("captures held in memory are back under budget: consuming again")
            self._consume()
        self._note_consuming()
        try:
            self.on_budget(self.ledger)
        except Exception:  # noqa: BLE001 - metrics must not break the books
            log.exception("reporting the in-flight budget failed")

    def _note_consuming(self) -> None:
        ledger = self.ledger
        without_cause = not ledger.paused or ledger.bytes <= ledger.max_bytes * RESUME_SHARE
        idle = (self._channel is not None and not self._stopping and without_cause
                and self._consumer_tag is None and self.connected.is_set())
        if not idle:
            self._not_consuming_since = None
        elif self._not_consuming_since is None:
            self._not_consuming_since = time.monotonic()

    def _end(self, entry: Entry, how: str, outcome: Outcome | None, acked: bool) -> None:
        """End a delivery's life on the books (once: a second end releases nothing and tells no one)."""
        if not self.ledger.end(entry, how):
            return
        if outcome is not None:
            self.on_settled(outcome, acked)

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
        self._note_consuming()
        self._ioloop.call_later(TICK_S, self._tick)

    def _connect(self) -> None:
        if self._stopping:
            self._ioloop.stop()
            return
        self._attempt += 1
        self._connection = TolerantConnection(
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
        self.ledger.connected()
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_cancel_callback(self._on_cancelled)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(self._on_confirm, callback=lambda _frame: topology.declare(
            channel, self.settings, self._is_current, lambda queue: self._start_consuming(channel, queue)))

    def _is_current(self, channel: Any) -> bool:
        """`channel` is this connection's open channel (not one closed or replaced meanwhile)."""
        return channel is self._channel and channel.is_open

    def _start_consuming(self, channel: Any, control_queue: str) -> None:
        channel.basic_consume(control_queue, self._on_control_message, auto_ack=True)
        if self._stopping:
            return
        self.generation = self.ledger.generation
        self._consume()
        self._ever_connected = True
        self._attempt = 0
        log.info("connected to %s; consuming %s (prefetch %d)", self._nodes[self._node][0],
                 self.settings.worker.queue, self.settings.worker.prefetch)
        self.connected.set()
        self.on_connection(True)

    def _consume(self) -> None:
        """Register the capture consumer, its prefetch sized so that one window of deliveries fits the
        byte budget (see `prefetch_for`). basic.qos applies to consumers registered after it."""
        channel = self._channel
        if self.ledger.paused or self._stopping or self._consumer_tag or channel is None or not channel.is_open:
            return
        worker = self.settings.worker
        self._prefetch = self._sizes.prefetch(worker.prefetch, worker.max_inflight_bytes)
        channel.basic_qos(prefetch_count=self._prefetch)
        self._consumer_tag = channel.basic_consume(worker.queue, self._on_message)

    def _grow_prefetch(self) -> None:
        """Frames shrank since the prefetch was cut to fit large ones: register the consumer anew with a
        prefetch twice or more the current one. (It shrinks by itself: large frames spend the budget, the
        pause cancels the consumer, and it comes back with a prefetch sized to them.) Deliveries already
        made stay with the channel; any the broker sends before the cancel is done are requeued by pika."""
        worker = self.settings.worker
        wanted = self._sizes.prefetch(worker.prefetch, worker.max_inflight_bytes)
        if self._consumer_tag and wanted >= self._prefetch * 2:
            log.info("captures of up to %d bytes: prefetch %d -> %d", self._sizes.largest(), self._prefetch, wanted)
            self._cancel_consumer()
            self._consume()

    @staged("consume")
    def _on_message(self, channel: Any, method: Basic.Deliver, properties: pika.BasicProperties, body: bytes) -> None:
        if not self.ledger.live:  # pika delivers nothing after a close; if it did, the broker redelivers it
            return
        entry, crossed = self.ledger.take(method.delivery_tag, len(body))
        self._sizes.add(len(body))
        if crossed:
            self._pause()
        else:
            self._grow_prefetch()
        try:
            self.on_delivery(Delivery(
                generation=entry.generation, tag=method.delivery_tag, exchange=method.exchange,
                routing_key=method.routing_key, properties=properties, body=body,
                redelivered=bool(method.redelivered), received_at=time.time(),
            ))
        except Exception:  # noqa: BLE001 - never hold a capture nobody will answer
            log.exception("handing a delivery to the worker failed; it is returned to the queue")
            self.ledger.end(entry, "returned")
            if channel.is_open:
                channel.basic_nack(method.delivery_tag, requeue=True)
        self._budget_changed()

    def _on_control_message(self, _channel: Any, method: Basic.Deliver, _properties: Any, body: bytes) -> None:
        try:
            self.on_control(method.routing_key, body)
        except Exception:  # noqa: BLE001 - a control message is advice; the store poll catches up
            log.exception("a control message on %r could not be handled; ignored", method.routing_key[:100])

    # -- publishing and acking ---------------------------------------------------------------

    @staged("publish")
    @_survive
    def _publish(self, outcomes: list[Outcome]) -> None:
        try:
            for outcome in outcomes:
                self._publish_outcome(outcome)
        finally:
            self._budget_changed()

    def _publish_outcome(self, outcome: Outcome) -> None:
        channel = self._channel
        delivery = outcome.delivery
        entry = self.ledger.find(delivery.generation, delivery.tag)
        if entry is None or channel is None or not channel.is_open:
            stale = self.ledger.held(delivery.generation, delivery.tag)
            if stale is not None and stale.state == HELD:  # from a lost connection: the broker redelivers it
                self._end(stale, "stale", outcome, False)
            elif stale is None:
                log.debug("frame %s: an answer for a delivery already settled; ignored", outcome.frame_id)
            return
        entry.outcome = outcome
        if outcome.result is None:
            self._reject(channel, entry, "no result could be built")
            return
        try:
            self._publish_one(channel, entry)
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError, OSError) as exc:
            log.warning("publishing the result of frame %s failed (%s); the capture will be redelivered",
                        outcome.frame_id, _describe_error(exc))
            if entry.state == HELD:  # nothing went out: no confirm will end it
                self._end(entry, "stale", outcome, False)
        except Exception as exc:  # noqa: BLE001 - the message, not the connection: answer it once
            self._reject(channel, entry, _describe_error(exc))

    def _publish_one(self, channel: Any, entry: Entry) -> None:
        """The result (mandatory: a result no queue takes comes back, see _on_return) and any dead letter,
        each on the books as a publish awaiting its confirm. Both are marshalled before either is sent, so a
        message pika refuses (a field over an AMQP limit) sends nothing. The result's message_id names this
        publish, so a return finds its own capture even when two captures share a frame id."""
        outcome: Outcome = entry.outcome
        delivery = outcome.delivery
        message_id = publish_message_id(self._publish_id, entry.generation, self.ledger.next_sequence())
        properties = result_properties(outcome, message_id)
        dead_properties = None
        if outcome.dead_letter is not None:  # pika marshals one publish whole before sending it; two need this
            properties.encode()
            dead_properties = dead_letter_properties(outcome, self._properties_budget())
            dead_properties.encode()
        channel.basic_publish(self.settings.broker.exchanges.results, outcome.routing_key, outcome.result,
                              properties, mandatory=True)
        self.ledger.publish(entry)
        if dead_properties is None:
            return
        channel.basic_publish(self.settings.broker.exchanges.dead, delivery.routing_key, delivery.body,
                              dead_properties)
        self.ledger.publish(entry)

    def _reject(self, channel: Any, entry: Entry, why: str) -> None:
        """Nack the capture without requeue: its queue's dead-letter exchange keeps it, untouched, with the
        broker's x-death header. The last resort when no result can be published for it."""
        outcome: Outcome = entry.outcome
        log.error("frame %s: no result can be published (%s); the capture goes to %s", outcome.frame_id, why,
                  self.settings.broker.exchanges.dead)
        channel.basic_nack(entry.tag, requeue=False)
        outcome.record = None  # no result went out: counted as an internal error, not as its verdict
        self._end(entry, "dead-lettered", outcome, True)
        self._maybe_finish_stop()

    def _properties_budget(self) -> int:
        connection = self._connection
        return properties_budget(connection.params.frame_max) if connection is not None else properties_budget()

    @_survive
    def _on_return(self, channel: Any, method: Any, properties: pika.BasicProperties, body: bytes) -> None:
        """A result no queue took (nothing bound on the results exchange for its routing key): keep it on
        the dead-letter exchange, where `inspection.dead` holds it, before its capture is acked. The
        broker sends the return before the confirm of that publish, so the capture waits for this one."""
        entry = self.ledger.by_sequence(publish_sequence(properties.message_id, self._publish_id,
                                                          self.ledger.generation))
        self.unroutable += 1
        self.on_unroutable()
        if self.unroutable == 1 or self.unroutable % 1000 == 0:
            log.warning("results exchange %s has no queue for %r (%d results so far): they are kept in %s; bind "
                        "a queue for the results", self.settings.broker.exchanges.results, method.routing_key[:100],
                        self.unroutable, self.settings.broker.exchanges.dead)
        if entry is None or entry.state == ENDED or channel is not self._channel or not channel.is_open:
            return
        key, kept = unroutable_copy(method, properties)
        channel.basic_publish(self.settings.broker.exchanges.dead, key, body, kept)
        self.ledger.publish(entry)

    @staged("confirm")
    @_survive
    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        done = self.ledger.confirm(method.delivery_tag, bool(method.multiple), isinstance(method, Basic.Ack))
        if done:
            try:
                self._settle(done)
            finally:
                self._budget_changed()

    @staged("ack")
    def _settle(self, entries: list[Entry]) -> None:
        channel = self._channel
        refused = [entry for entry in entries if entry.nacked]
        confirmed = [entry for entry in entries if not entry.nacked]
        if refused:
            self._refused(channel, refused)
        elif confirmed:
            self._refusals.confirmed()
        last, multiple, alone = self.ledger.ack_plan(confirmed)
        if last is not None:
            channel.basic_ack(last, multiple=multiple)
        for tag in alone:
            channel.basic_ack(tag)
        for entry in confirmed:
            self._end(entry, "acked", entry.outcome, True)
        self._maybe_finish_stop()

    def _refused(self, channel: Any, entries: list[Entry]) -> None:
        """The broker refused a result (a nack: a queue at its length limit with reject-publish, a broker in
        trouble). The result may have reached every other queue, so each retry repeats it there: a capture
        is requeued after a growing pause at most MAX_RESULT_REFUSALS - 1 times, then dead-lettered."""
        again: list[Entry] = []
        for entry in entries:
            refusals, requeue = self._refusals.refused(entry.outcome.frame_id)
            if requeue:
                self.ledger.refuse(entry)
                again.append(entry)
                continue
            log.error("RabbitMQ refused the result of frame %s %d times (is a results queue full with "
                      "x-overflow reject-publish?); the capture goes to %s instead of being scored again",
                      entry.outcome.frame_id, refusals, self.settings.broker.exchanges.dead)
            channel.basic_nack(entry.tag, requeue=False)
            self._notify_refused("given_up")
            self._end(entry, "given-up", entry.outcome, False)
        if again:
            self._requeue_later(again)

    def _notify_refused(self, outcome: str) -> None:
        try:
            self.on_refused(outcome)
        except Exception:  # noqa: BLE001 - metrics must not break the books
            log.exception("counting a refused result failed")

    def _requeue_later(self, refused: list[Entry]) -> None:
        """Requeue after a pause that grows while refusals go on, so a broker in trouble is not hammered
        with the same captures."""
        delay = self._refusals.next_pause()
        for entry in refused:
            log.warning("RabbitMQ refused the result of frame %s; the capture is requeued in %.1f s",
                        entry.outcome.frame_id, delay)
        self._ioloop.call_later(delay, functools.partial(self._requeue, refused))

    @_survive
    def _requeue(self, refused: list[Entry]) -> None:
        channel = self._channel
        try:
            for entry in refused:
                if entry.state == ENDED:  # its connection was lost meanwhile: already redelivered
                    continue
                if channel is not None and channel.is_open and entry.generation == self.ledger.generation:
                    channel.basic_nack(entry.tag, requeue=True)
                self._notify_refused("requeued")
                self._end(entry, "requeued", entry.outcome, False)
            self._maybe_finish_stop()
        finally:
            self._budget_changed()

    # -- stopping and losing the connection ---------------------------------------------------

    def _begin_stop(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        if self._stopping and self._stop_deadline is not None and deadline >= self._stop_deadline:
            return
        self._stopping, self._stop_deadline = True, deadline
        self._cancel_consumer()
        self._ioloop.call_later(max(0.0, grace_s), self._grace_over)
        self._maybe_finish_stop()

    def _grace_over(self) -> None:
        if self.ledger.unacked():
            log.warning("shutdown grace period over with %d captures unsettled; the broker will redeliver them",
                        self.ledger.unacked())
        self._close()

    def _maybe_finish_stop(self) -> None:
        if self._stopping and not self.ledger.unacked():
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
                      topology.remedy_for_406(reason.reply_text, self.settings))
        if connection is not None and connection.is_open:
            connection.close()  # one path to recovery: a fresh connection

    def _on_cancelled(self, _frame: Any) -> None:
        """The broker cancelled the consumer (its queue was deleted): reconnect, which re-declares it."""
        log.error("RabbitMQ cancelled consuming from %s (was the queue deleted?); reconnecting to re-declare it",
                  self.settings.worker.queue)
        if self._connection is not None and self._connection.is_open:
            self._connection.close()

    def _on_connection_closed(self, _connection: Any, reason: BaseException) -> None:
        self._connection, self._channel, self._consumer_tag, self._prefetch = None, None, None, 0
        self._last_error = _describe_error(reason)
        held = self.ledger.unacked()
        for entry in self.ledger.lose_connection():  # answered, not yet confirmed: the broker redelivers them
            if entry.outcome is not None:
                self.on_settled(entry.outcome, False)
        self.connected.clear()
        self._budget_changed()
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
        delay = reconnect_delay(self._attempt, len(self._nodes), worker.reconnect_max_s)
        log.warning("cannot reach RabbitMQ at %s (%s); trying %s in %.1f s", failed, self._last_error,
                    self._nodes[self._node][0], delay)
        self._ioloop.call_later(delay, self._connect)

    def _fail(self, error: InspectorError) -> None:
        self.failure = error
        self._stopping = True
        self._ioloop.stop()


def _describe_error(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else repr(error)
