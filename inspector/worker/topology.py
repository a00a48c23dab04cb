"""The worker's exchanges, queues and bindings: what it declares after every (re)connect, in order.

Declarations are idempotent on an existing topology, so a worker declares everything it needs each time
it connects and a fresh broker, or a queue someone deleted, is set up again without an operator. A
declaration the broker refuses (406: it exists with other arguments) closes the channel; `remedy_for_406`
says what the operator does about it. The settings decide the names and the capture queue's arguments;
docs/contract.md describes the result.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from inspector.config import Settings

CONTROL_BINDING = "model.#"  # model names may hold dots

# One declaration: (channel, done) -> None, calling done(frame) when the broker has answered.
Step = Callable[[Any, Callable], None]


def declarations(settings: Settings) -> list[Step]:
    """The declarations, in order; the last declares this worker's own control queue (exclusive, named by
    the broker), whose name comes back in its frame."""
    broker, worker = settings.broker, settings.worker
    ex = broker.exchanges
    steps: list[Step] = [
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
        lambda ch, done: ch.queue_declare("", exclusive=True, auto_delete=True, callback=done),
    ]
    return steps


def declare(channel: Any, settings: Settings, current: Callable[[Any], bool],
            declared: Callable[[str], None]) -> None:
    """Declare the topology on `channel`, each step when the broker has answered the one before, while
    `current(channel)` holds (a channel closed or replaced meanwhile is left alone); then bind the control
    queue and call `declared(name)` with its name."""
    control = settings.broker.exchanges.control

    def bind_control(frame: Any) -> None:  # the last step declares the control queue; its name is in the frame
        queue = frame.method.queue
        channel.queue_bind(queue, control, routing_key=CONTROL_BINDING, callback=lambda _frame: declared(queue))

    _run(channel, declarations(settings), current, bind_control)


def _run(channel: Any, steps: list[Step], current: Callable[[Any], bool], last: Callable) -> None:
    if not current(channel) or not steps:
        return
    step, rest = steps[0], steps[1:]
    step(channel, (lambda _frame: _run(channel, rest, current, last)) if rest else last)


def _exchange(name: str, channel: Any, done: Callable) -> None:
    channel.exchange_declare(name, exchange_type="topic", durable=True, callback=done)


def _bind(queue: str, exchange: str, key: str, channel: Any, done: Callable) -> None:
    channel.queue_bind(queue, exchange, routing_key=key, callback=done)


def remedy_for_406(reply_text: str, settings: Settings) -> str:
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
