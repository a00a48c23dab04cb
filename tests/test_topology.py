"""The worker's declarations on a channel that answers each at once: the order, the arguments docs/contract.md
names, and a channel closed or replaced meanwhile left alone. No broker (tests/test_contract.py checks the
topology a real worker leaves on RabbitMQ)."""

from __future__ import annotations

from types import SimpleNamespace

from inspector.config import Settings
from inspector.worker import topology


class AnsweringChannel:
    """Records each declaration and answers it at once, as the broker would; the control queue gets a name."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def _answer(self, name, args, kwargs):
        self.calls.append((name, args, {k: v for k, v in kwargs.items() if k != "callback"}))
        kwargs["callback"](SimpleNamespace(method=SimpleNamespace(queue="amq.gen-control")))

    def exchange_declare(self, *args, **kwargs):
        self._answer("exchange_declare", args, kwargs)

    def queue_declare(self, *args, **kwargs):
        self._answer("queue_declare", args, kwargs)

    def queue_bind(self, *args, **kwargs):
        self._answer("queue_bind", args, kwargs)


def test_the_worker_declares_its_topology_in_order_then_binds_its_control_queue():
    settings = Settings()
    ex, worker = settings.broker.exchanges, settings.worker
    channel, declared = AnsweringChannel(), []
    topology.declare(channel, settings, lambda _channel: True, declared.append)
    expected = [
        *(("exchange_declare", (name,), {"exchange_type": "topic", "durable": True})
          for name in (ex.captures, ex.results, ex.control, ex.dead)),
        ("queue_declare", (worker.dead_letter_queue,), {"durable": True, "arguments": {"x-queue-type": "quorum"}}),
        ("queue_bind", (worker.dead_letter_queue, ex.dead), {"routing_key": "#"}),
        ("queue_declare", (worker.queue,), {"durable": True, "arguments": {
            "x-queue-type": "quorum", "x-dead-letter-exchange": ex.dead, "x-delivery-limit": worker.delivery_limit}}),
        *(("queue_bind", (worker.queue, ex.captures), {"routing_key": key}) for key in worker.binding_keys),
        ("queue_declare", ("",), {"exclusive": True, "auto_delete": True}),
        ("queue_bind", ("amq.gen-control", ex.control), {"routing_key": "model.#"}),
    ]
    assert channel.calls == expected
    assert declared == ["amq.gen-control"]


def test_a_channel_no_longer_current_is_left_alone():
    settings = Settings()
    channel, declared, current = AnsweringChannel(), [], [True]

    def still_current(_channel) -> bool:
        if len(channel.calls) == 3:  # closed while its third declaration was on its way
            current[0] = False
        return current[0]

    topology.declare(channel, settings, still_current, declared.append)
    assert len(channel.calls) == 3 and declared == []


def test_a_refused_capture_queue_is_answered_with_the_choice_that_loses_no_frames():
    settings = Settings()
    queue = settings.worker.queue
    remedy = topology.remedy_for_406(f"PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue "
                                     f"'{queue}': received 5 but current is 20", settings)
    assert f"rabbitmqctl delete_queue {queue}" in remedy and "drain" in remedy
    assert "rabbitmqctl list_exchanges" in topology.remedy_for_406("inequivalent arg 'type' for exchange", settings)
