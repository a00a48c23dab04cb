"""Results from RabbitMQ for the OPC UA bridge, on a thread that owns its connection.

The bridge's own queue: server-named, exclusive and auto-delete, bound to the results exchange with
`opcua.binding_keys`. It takes copies and nothing from any other consumer, and holds nothing while the
bridge is down: a verdict that arrives after its part has passed the gate opens no gate. It is bounded
(`opcua.queue_max_length`, oldest dropped), and at most PREFETCH results are in the bridge's memory,
each acknowledged on this thread once the server has taken it. A lost connection is retried for ever,
with a backoff of up to RECONNECT_MAX_S.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions

from inspector.broker import blocking_connection, close_quietly
from inspector.config import Settings
from inspector.errors import InspectorError

log = logging.getLogger(__name__)

PREFETCH = 64
RECONNECT_MAX_S = 10.0

Deliver = Callable[[bytes, Callable[[], None]], None]  # (body, ack): ack may be called from any thread


class ResultFeed:
    """Calls `deliver(body, ack)` for every result, and `connected(bool)` as the connection comes and goes."""

    def __init__(self, settings: Settings, deliver: Deliver, connected: Callable[[bool], None]) -> None:
        self.settings = settings
        self.deliver, self.connected = deliver, connected
        self._stop = threading.Event()
        self._connection: pika.BlockingConnection | None = None
        self._thread = threading.Thread(target=self._run, name="opcua-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        connection = self._connection
        if connection is not None:
            try:
                connection.add_callback_threadsafe(lambda: None)  # wakes the consuming loop to see the flag
            except (pika.exceptions.AMQPError, RuntimeError):
                pass
        self._thread.join(timeout=10)

    def _run(self) -> None:
        wait = 0.5
        while not self._stop.is_set():
            try:
                self._consume()
                wait = 0.5
            except (InspectorError, pika.exceptions.AMQPError, OSError) as exc:
                log.warning("results feed: %s; connecting again in %.1f s", exc, wait)
            except Exception:  # noqa: BLE001 - the feed survives its own bugs: said, then a new connection
                log.exception("results feed: unexpected error; connecting again in %.1f s", wait)
            finally:
                self.connected(False)
            self._stop.wait(wait)
            wait = min(wait * 2, RECONNECT_MAX_S)

    def _consume(self) -> None:
        broker = self.settings.broker
        connection = blocking_connection(broker)
        self._connection = connection
        try:
            channel = connection.channel()
            channel.exchange_declare(broker.exchanges.results, exchange_type="topic", durable=True)
            queue = channel.queue_declare("", exclusive=True, auto_delete=True, arguments={
                "x-max-length": self.settings.opcua.queue_max_length, "x-overflow": "drop-head"}).method.queue
            for key in self.settings.opcua.binding_keys:
                channel.queue_bind(queue, broker.exchanges.results, routing_key=key)
            channel.basic_qos(prefetch_count=PREFETCH)
            channel.basic_consume(queue, self._on_message(connection, channel))
            self.connected(True)
            log.info("taking results from %s (%s) into %s", broker.exchanges.results,
                     ", ".join(self.settings.opcua.binding_keys), queue)
            while not self._stop.is_set():
                connection.process_data_events(time_limit=0.5)
        finally:
            self._connection = None
            close_quietly(connection)

    def _on_message(self, connection: pika.BlockingConnection, channel: Any) -> Callable:
        def on_message(_channel: Any, method: Any, _properties: Any, body: bytes) -> None:
            tag = method.delivery_tag

            def ack() -> None:  # on this thread, and only on the channel that delivered it
                def do() -> None:
                    if channel.is_open:
                        channel.basic_ack(tag)
                try:
                    connection.add_callback_threadsafe(do)
                except (pika.exceptions.AMQPError, RuntimeError):
                    pass  # the connection is gone; the queue went with it

            self.deliver(body, ack)

        return on_message
