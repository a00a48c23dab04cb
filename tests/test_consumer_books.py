"""The broker thread's books, driven through its own callbacks on a stub channel: what a connection loss,
a refused result and a returned result do to the captures held. Milliseconds, no broker; the real-broker
version of the first is tests/test_broker_alarm.py."""

from __future__ import annotations

from types import SimpleNamespace

import pika
import pytest
from pika.spec import Basic

from inspector.config import Settings
from inspector.worker.consumer import MAX_RESULT_REFUSALS, Consumer, Outcome, prefetch_for


class StubChannel:
    """Records what the consumer asks of a channel."""

    def __init__(self) -> None:
        self.is_open = True
        self.calls: list[tuple] = []
        self.published: list[tuple[str, str, pika.BasicProperties]] = []

    def __getattr__(self, name):  # callbacks and declarations: recorded, never answered
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))

    def basic_consume(self, queue, callback, auto_ack=False):
        self.calls.append(("basic_consume", (queue,), {}))
        return f"ctag-{len(self.calls)}"

    def basic_publish(self, exchange, routing_key, body, properties=None, mandatory=False):
        self.published.append((exchange, routing_key, properties))

    def acked(self) -> list[tuple]:
        return [(c[1][0], c[2].get("multiple", False)) for c in self.calls if c[0] == "basic_ack"]

    def nacked(self) -> list[tuple]:
        return [(c[1][0], c[2].get("requeue")) for c in self.calls if c[0] == "basic_nack"]


@pytest.fixture
def books():
    """A consumer on a stub channel, as if just connected, with what it told the worker."""
    base = Settings()
    settings = base.model_copy(update={"worker": base.worker.model_copy(update={"max_inflight_bytes": 1000})})
    settled: list[tuple[str, bool]] = []
    refused: list[str] = []
    consumer = Consumer(settings, on_delivery=lambda delivery: None,
                        on_settled=lambda outcome, acked: settled.append((outcome.frame_id, acked)),
                        on_control=lambda key, body: None, on_connection=lambda up: None)
    consumer.on_refused = refused.append
    channel = StubChannel()

    def connect() -> StubChannel:
        nonlocal channel
        channel = StubChannel()
        consumer._on_channel_open(channel)
        consumer._start_consuming(channel, "control")
        consumer.connected.set()
        return channel

    connect()
    deliveries = []

    def deliver(tag: int, size: int = 300, frame_id: str | None = None) -> Outcome:
        consumer._on_message(channel, Basic.Deliver(delivery_tag=tag, exchange="captures", routing_key="l.c"),
                             pika.BasicProperties(), b"x" * size)
        delivery = SimpleNamespace(generation=consumer.ledger.generation, tag=tag, body=b"x" * size,
                                   routing_key="l.c", exchange="captures", properties=pika.BasicProperties())
        deliveries.append(delivery)
        return Outcome(delivery=delivery, routing_key="pass.l.c", result=b"{}", frame_id=frame_id or f"f{tag}")

    return SimpleNamespace(consumer=consumer, channel=lambda: channel, connect=connect, deliver=deliver,
                           settled=settled, refused=refused)


def confirm(consumer, sequence, acked=True, multiple=False):
    method = Basic.Ack(delivery_tag=sequence, multiple=multiple) if acked else Basic.Nack(delivery_tag=sequence,
                                                                                        multiple=multiple)
    consumer._on_confirm(SimpleNamespace(method=method))


def test_results_waiting_for_confirms_when_the_connection_drops_give_their_budget_back(books):
    """A disk alarm outlasting blocked_connection_timeout: the connection closes with every result
    published and unconfirmed. Before, their bytes stayed on the budget for good and the worker, paused,
    never consumed again while its health stayed green."""
    consumer = books.consumer
    outcomes = [books.deliver(tag) for tag in range(1, 5)]  # 1,200 bytes: over the 1,000 budget
    assert consumer.ledger.paused and consumer.pause_reason()
    consumer._publish(outcomes)
    assert len(books.channel().published) == 4 and books.settled == []
    consumer._on_connection_closed(None, pika.exceptions.ConnectionClosedByClient(320, "blocked too long"))
    assert sorted(books.settled) == [(f"f{tag}", False) for tag in range(1, 5)]
    assert consumer.ledger.bytes == 0 and consumer.ledger.frames == 0 and not consumer.ledger.paused
    channel = books.connect()
    assert any(call[0] == "basic_consume" for call in channel.calls), "it did not consume again"
    books.deliver(1)  # the redelivery, under the new connection's tag
    assert consumer.ledger.frames == 1 and consumer.ledger.bytes == 300


def test_an_answer_from_before_a_reconnect_is_dropped_once(books):
    consumer = books.consumer
    old = books.deliver(1)
    consumer._on_connection_closed(None, pika.exceptions.ConnectionClosedByBroker(320, "forced"))
    assert consumer.ledger.frames == 1  # still with the worker
    books.connect()
    consumer._publish([old])
    consumer._publish([old])
    assert books.settled == [("f1", False)] and consumer.ledger.frames == 0
    assert books.channel().published == []


def test_a_result_refused_again_and_again_is_dead_lettered_not_scored_for_ever(books):
    """A results queue full with reject-publish nacks the result that every other queue took: each
    requeue repeats it downstream. Bounded: after MAX_RESULT_REFUSALS the capture is dead-lettered."""
    consumer = books.consumer
    for attempt in range(1, MAX_RESULT_REFUSALS + 1):
        consumer._publish([books.deliver(attempt, frame_id="same-frame")])
        confirm(consumer, books.consumer.ledger.next_sequence() - 1, acked=False)
        pending = [e for e in consumer.ledger.entries() if e.state == "refused"]
        if attempt < MAX_RESULT_REFUSALS:
            assert len(pending) == 1
            consumer._requeue(pending)
            assert books.channel().nacked()[-1] == (attempt, True)
    assert books.channel().nacked()[-1] == (MAX_RESULT_REFUSALS, False)
    assert books.refused == ["requeued"] * (MAX_RESULT_REFUSALS - 1) + ["given_up"]
    assert consumer.ledger.frames == 0 and consumer.ledger.bytes == 0


def test_a_returned_result_is_kept_for_its_own_capture_when_two_share_a_frame_id(books):
    consumer = books.consumer
    first, second = books.deliver(1, 10, "twin"), books.deliver(2, 10, "twin")
    consumer._publish([first, second])
    channel = books.channel()
    _, key, properties = channel.published[1]  # the second capture's result comes back
    consumer._on_return(channel, SimpleNamespace(routing_key=key, exchange="results"), properties, b"{}")
    assert channel.published[2][1] == "unroutable.pass.l.c"
    confirm(consumer, 1)  # the first capture's only publish
    assert books.settled == [("twin", True)] and channel.acked() == [(1, False)]
    confirm(consumer, 2)
    assert len(books.settled) == 1  # the second waits for its kept copy
    confirm(consumer, 3)
    assert channel.acked() == [(1, False), (2, False)] and consumer.ledger.frames == 0


def test_a_lost_connection_during_a_refusal_pause_ends_the_capture_once(books):
    consumer = books.consumer
    consumer._publish([books.deliver(1)])
    confirm(consumer, 1, acked=False)
    refused = [e for e in consumer.ledger.entries() if e.state == "refused"]
    consumer._on_connection_closed(None, pika.exceptions.ConnectionClosedByBroker(320, "forced"))
    consumer._requeue(refused)
    assert books.settled == [("f1", False)] and books.refused == []
    assert consumer.ledger.frames == 0


@pytest.mark.parametrize("configured, budget, largest, expected", [
    (64, 256 << 20, 3 << 20, 64), (64, 256 << 20, 16 << 20, 16), (64, 256 << 20, 1 << 30, 1), (4, 100, 1, 4),
])
def test_one_prefetch_window_fits_the_budget(configured, budget, largest, expected):
    assert prefetch_for(configured, budget, largest) == expected


def test_after_a_pause_the_consumer_comes_back_with_a_prefetch_sized_to_the_frames(books):
    consumer = books.consumer
    outcomes = [books.deliver(tag, 400) for tag in range(1, 4)]  # 1,200 of 1,000: paused
    channel = books.channel()
    assert any(call[0] == "basic_cancel" for call in channel.calls)
    consumer._publish(outcomes)
    for sequence in range(1, 4):
        confirm(consumer, sequence)
    qos = [call for call in channel.calls if call[0] == "basic_qos"]
    assert qos[-1][2]["prefetch_count"] == 2  # 1,000 // 400
    assert not consumer.ledger.paused and consumer.stuck_for() == 0
