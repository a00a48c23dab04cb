"""An in-memory consumer with the Consumer's interface: the worker run without RabbitMQ.

dramatiq tests its worker against `StubBroker`; this is the same seam. `Worker(settings,
consumer_factory=StubConsumer)` builds a worker whose captures come from `deliver` (and announcements
from `control`) instead of a queue. Its answers come back through `submit` as they would to the real
consumer and are published, confirmed and acked at once, all on the stub's own broker thread, so the
worker's callbacks run where they run in production: on one thread, one at a time. The books are the
real Ledger, so the byte budget pauses and resumes deliveries, and after `reconnect` answers of the old
connection are dropped as stale while their captures come again, marked redelivered.

`join` waits until every capture delivered is settled; what happened is in `results`, `dead_letters`,
`rejected` (nacked, for the queue to dead-letter untouched) and `events`, in order.

It lives in the package rather than in tests/ because it is a tool as much as a test aid: a plugin's own
tests, or a profile of the worker's CPU without a broker, run a worker with it the same way.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pika

from inspector.config import Settings
from inspector.worker.consumer import RESUME_SHARE, TICK_S, ConsumerCallbacks, Delivery, Outcome
from inspector.worker.hooks import staged
from inspector.worker.ledger import HELD, Entry, Ledger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Published:
    """A result as it went to the results exchange."""

    routing_key: str
    body: dict  # the result, parsed
    outcome: Outcome


@dataclass(frozen=True)
class _Pushed:
    routing_key: str
    properties: pika.BasicProperties
    body: bytes
    redelivered: bool


class StubConsumer(ConsumerCallbacks):
    """Called as Consumer is; see the module docstring. Thread safe where Consumer is: `deliver`, `control`,
    `reconnect`, `submit`, `stop_consuming` and `close_now` may be called from any thread."""

    def _init_state(self, settings: Settings) -> None:
        # on_unroutable and on_refused are never called here: no results exchange refuses or drops a result
        self.ledger = Ledger(settings.worker.max_inflight_bytes, RESUME_SHARE)
        self.connected = threading.Event()
        self.stopped = threading.Event()
        self.results: list[Published] = []
        self.dead_letters: list[tuple[str, str, Delivery]] = []  # (code, message, the capture as it came)
        self.rejected: list[Outcome] = []  # no result could be built: nacked for the queue's dead-lettering
        self.acked: list[int] = []  # delivery tags, as acked
        self.events: list[tuple[str, str]] = []  # ("delivered" | "answered" | "acked" | "stale" | ..., frame)
        self.waiting: list[_Pushed] = []  # delivered while paused or stopping: still "in the queue"
        self._calls: queue.Queue[Callable[[], None]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="inspector-broker", daemon=True)
        self._pushed = 0
        self._ended = 0
        self._changed = threading.Condition()
        self._held: dict[tuple[int, int], _Pushed] = {}  # what each delivery on the books came as
        self._tag = 0
        self._stopping = False
        self._stop_deadline: float | None = None
        self._closed = False

    # -- what a test does --------------------------------------------------------------------

    def deliver(self, body: bytes, routing_key: str = "line1.cam1", *, content_type: str | None = None,
                headers: dict | None = None, message_id: str | None = None, redelivered: bool = False,
                properties: pika.BasicProperties | None = None) -> None:
        """A capture arrives on the capture queue (`properties`, when given, instead of the others)."""
        if properties is None:
            properties = pika.BasicProperties(content_type=content_type, headers=headers, message_id=message_id)
        with self._changed:
            self._pushed += 1
        self._call(lambda: self._on_message(_Pushed(routing_key, properties, body, redelivered)))

    def control(self, routing_key: str, body: bytes | dict) -> None:
        """An announcement arrives on the control exchange (a dict is sent as JSON)."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        self._call(lambda: self.on_control(routing_key, data))

    def reconnect(self) -> None:
        """The connection is lost and opened again: held captures come again, marked redelivered."""
        self._call(self._reconnect)

    def join(self, timeout: float = 10.0) -> None:
        """Wait until every capture delivered so far is settled; AssertionError after `timeout` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._ended >= self._pushed, timeout):
                raise AssertionError(f"{self._pushed - self._ended} of {self._pushed} captures not settled within "
                                     f"{timeout:g} s (held: {self.ledger.frames}, waiting: {len(self.waiting)})")

    def answers(self) -> dict[str, dict]:
        """Each frame's last result, by frame id."""
        return {published.body["frame_id"]: published.body for published in self.results}

    # -- the Consumer's interface --------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, outcomes: list[Outcome]) -> None:
        self._call(lambda: self._publish(outcomes))

    def stop_consuming(self, grace_s: float) -> None:
        self._call(lambda: self._begin_stop(grace_s))

    def close_now(self) -> None:
        self._call(lambda: self._begin_stop(0.0))

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def pause_reason(self) -> str | None:
        ledger = self.ledger
        if not ledger.paused:
            return None
        return f"{ledger.bytes} bytes of {ledger.frames} captures held, over worker.max_inflight_bytes"

    def stuck_for(self) -> float:
        return 0.0

    # -- the stub's broker thread --------------------------------------------------------------

    def _call(self, call: Callable[[], None]) -> None:
        self._calls.put(call)

    def _run(self) -> None:
        try:
            self._connect()
            while not self._closed:
                self.last_tick = time.monotonic()
                wait = TICK_S if self._stop_deadline is None else max(0.0, self._stop_deadline - time.monotonic())
                try:
                    call = self._calls.get(timeout=min(TICK_S, wait))
                except queue.Empty:
                    call = None
                if call is not None:
                    self._survive(call)
                if self._stopping and not self._closed and time.monotonic() >= (self._stop_deadline or 0.0):
                    log.warning("stub: grace period over with %d captures unsettled", self.ledger.unacked())
                    self._close()
        finally:
            self.stopped.set()
            with self._changed:
                self._changed.notify_all()

    def _survive(self, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception:  # noqa: BLE001 - as the real broker thread: logged, counted, the thread goes on
            log.exception("bug on the stub's broker thread")
            self.faults += 1

    def _connect(self) -> None:
        self.ledger.connected()
        self.generation = self.ledger.generation
        self.connected.set()
        self.on_connection(True)

    def _reconnect(self) -> None:
        if self._closed:
            return
        held = [self._held[key] for key, entry in self._entries() if entry.generation == self.generation]
        for entry in self.ledger.lose_connection():
            self._ended_one(entry, "lost", entry.outcome, False)
        self.connected.clear()
        self._budget_changed()
        self.on_connection(False)
        self._connect()
        for pushed in held:  # the broker requeued them: they come again, first in line
            with self._changed:
                self._pushed += 1
            self._on_message(_Pushed(pushed.routing_key, pushed.properties, pushed.body, True))

    def _entries(self) -> list[tuple[tuple[int, int], Entry]]:
        return [((entry.generation, entry.tag), entry) for entry in self.ledger.entries()]

    @staged("consume")
    def _on_message(self, pushed: _Pushed) -> None:
        if self._stopping or self.ledger.paused:
            self.waiting.append(pushed)
            return
        self._tag += 1
        entry, _crossed = self.ledger.take(self._tag, len(pushed.body))
        self._held[(entry.generation, entry.tag)] = pushed
        delivery = Delivery(generation=entry.generation, tag=entry.tag,
                            exchange=self.settings.broker.exchanges.captures, routing_key=pushed.routing_key,
                            properties=pushed.properties, body=pushed.body,
                            redelivered=pushed.redelivered, received_at=time.time())
        self.events.append(("delivered", str(pushed.properties.message_id)))
        try:
            self.on_delivery(delivery)
        except Exception:  # noqa: BLE001 - as Consumer: never hold a capture nobody will answer
            log.exception("stub: handing a delivery to the worker failed; it is returned to the queue")
            self.ledger.end(entry, "returned")  # not settled: it waits in the queue for the next resume
            self._held.pop((entry.generation, entry.tag), None)
            self.waiting.append(pushed)
        self._budget_changed()

    @staged("publish")
    def _publish(self, outcomes: list[Outcome]) -> None:
        try:
            for outcome in outcomes:
                self._publish_one(outcome)
            self._on_confirm()
        finally:
            self._budget_changed()

    def _publish_one(self, outcome: Outcome) -> None:
        delivery = outcome.delivery
        entry = self.ledger.find(delivery.generation, delivery.tag)
        if entry is None:
            stale = self.ledger.held(delivery.generation, delivery.tag)
            if stale is not None and stale.state == HELD:  # from a lost connection: it came again meanwhile
                self._ended_one(stale, "stale", outcome, False)
            return
        entry.outcome = outcome
        if outcome.result is None:
            self.rejected.append(outcome)
            outcome.record = None  # as Consumer._reject: counted as an internal error
            self._ended_one(entry, "dead-lettered", outcome, True)
            self._maybe_finish_stop()
            return
        self.results.append(Published(outcome.routing_key, json.loads(outcome.result), outcome))
        self.events.append(("answered", outcome.frame_id))
        self.ledger.publish(entry)
        if outcome.dead_letter is not None:
            self.dead_letters.append((*outcome.dead_letter, delivery))
            self.ledger.publish(entry)

    @staged("confirm")
    def _on_confirm(self) -> None:
        """The broker confirms every publish so far at once."""
        done = self.ledger.confirm(self.ledger.next_sequence() - 1, multiple=True, acked=True)
        if done:
            self._settle(done)

    @staged("ack")
    def _settle(self, entries: list[Entry]) -> None:
        last, multiple, alone = self.ledger.ack_plan(entries)
        if last is not None:
            self.acked.append(last)
        self.acked.extend(alone)
        for entry in entries:
            self._ended_one(entry, "acked", entry.outcome, True)
        self._maybe_finish_stop()

    def _ended_one(self, entry: Entry, how: str, outcome: Outcome | None, acked: bool) -> None:
        if not self.ledger.end(entry, how):
            return
        self._held.pop((entry.generation, entry.tag), None)
        self.events.append((how, outcome.frame_id if outcome is not None else ""))
        try:
            if outcome is not None:
                self.on_settled(outcome, acked)
        finally:
            with self._changed:
                self._ended += 1
                self._changed.notify_all()

    def _budget_changed(self) -> None:
        if self.ledger.should_resume() and not self._stopping:
            waiting, self.waiting = self.waiting, []
            for pushed in waiting:
                self._on_message(pushed)
        try:
            self.on_budget(self.ledger)
        except Exception:  # noqa: BLE001 - as Consumer: metrics must not break the books
            log.exception("stub: reporting the in-flight budget failed")

    def _begin_stop(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        if self._stopping and self._stop_deadline is not None and deadline >= self._stop_deadline:
            return
        self._stopping, self._stop_deadline = True, deadline
        self.events.append(("stop consuming", ""))
        self._maybe_finish_stop()

    def _maybe_finish_stop(self) -> None:
        if self._stopping and not self.ledger.unacked():
            self._close()

    def _close(self) -> None:
        if self._closed:
            return
        for entry in self.ledger.lose_connection():
            self._ended_one(entry, "lost", entry.outcome, False)
        self.connected.clear()
        self._budget_changed()
        self.on_connection(False)
        self.events.append(("closed", ""))
        self._closed = True
