"""What every RabbitMQ client of the project shares: connection parameters built from the settings, the
URL as it may be printed, the command-line tools' blocking connection, and model announcements.

The worker's own long-lived connection is `inspector.worker.consumer` (a SelectConnection on one
thread); `publish`, `watch` and `bench` drive the blocking connection made here. Connecting turns
pika's exceptions into ConfigError (a refused login) or BrokerError (no broker), so a command says
one clear sentence instead of a pika traceback.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pika
import pika.exceptions

from inspector.config import BrokerSettings
from inspector.errors import BrokerError, ConfigError
from inspector.timestamps import utc_now

log = logging.getLogger(__name__)

ANNOUNCEMENT_SCHEMA = "inspection.model/1"


def connection_parameters(broker: BrokerSettings, url: str | None = None) -> pika.URLParameters:
    """pika parameters for `url` (default: the first node), with the password from the settings (the
    environment)."""
    parts = urlsplit(url or broker.urls[0])
    username = unquote(parts.username or "guest")
    host = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"{quote(username, safe='')}:{quote(broker.password.get_secret_value(), safe='')}@{host}"
    params = pika.URLParameters(urlunsplit(parts._replace(netloc=netloc)))
    params.socket_timeout = broker.connect_timeout_s
    params.blocked_connection_timeout = broker.connect_timeout_s * 6
    params.connection_attempts = 1
    params.heartbeat = broker.heartbeat_s
    params.client_properties = {"connection_name": "inspector"}
    return params


def declare_control(channel: Any, broker: BrokerSettings) -> None:
    channel.exchange_declare(broker.exchanges.control, exchange_type="topic", durable=True)


def announcement(model: str, version: str, plugin: str, reason: str) -> dict[str, Any]:
    """The body of `model.<name>` on the control exchange."""
    return {
        "schema": ANNOUNCEMENT_SCHEMA,
        "model": model,
        "version": version,
        "plugin": plugin,
        "reason": reason,
        "announced_at": utc_now(),
    }


def announce(broker: BrokerSettings, body: dict[str, Any]) -> None:
    """Publish a model announcement, persistent and confirmed; BrokerError if it cannot be."""
    routing_key = f"model.{body['model']}"
    connection = blocking_connection(broker)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        declare_control(channel, broker)
        channel.basic_publish(
            exchange=broker.exchanges.control,
            routing_key=routing_key,
            body=json.dumps(body).encode(),
            properties=pika.BasicProperties(content_type="application/json", delivery_mode=2),
        )
    except pika.exceptions.AMQPError as exc:
        raise BrokerError(f"announcing {routing_key} failed: {exc!r}") from exc
    finally:
        close_quietly(connection)
    log.info("announced %s version %s on %s", routing_key, body["version"], broker.exchanges.control)


def blocking_connection(broker: BrokerSettings) -> pika.BlockingConnection:
    """A BlockingConnection for a command-line tool; one clear InspectorError when there is none.

    pika logs a failed attempt at ERROR with a traceback; the error raised here says it all, so
    pika is kept quiet meanwhile.
    """
    url = broker.shown
    pika_log = logging.getLogger("pika")
    level = pika_log.level
    pika_log.setLevel(logging.CRITICAL)
    try:  # pika tries the nodes in turn and takes the first that answers
        return pika.BlockingConnection([connection_parameters(broker, node) for node in broker.urls])
    except (pika.exceptions.ProbableAuthenticationError, pika.exceptions.ProbableAccessDeniedError) as exc:
        raise ConfigError(f"RabbitMQ at {url} refused the login ({_reason(exc)}); check the user in broker.url, "
                          "the vhost, and INSPECTOR_BROKER__PASSWORD") from None
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise BrokerError(f"cannot connect to RabbitMQ at {url}: {_reason(exc)}; check broker.url and that "
                          "RabbitMQ runs") from None
    finally:
        pika_log.setLevel(level)


def _reason(exc: BaseException) -> str:
    """The innermost cause of a pika connection error ("Connection refused", "timed out", ...)."""
    while True:
        inner = getattr(exc, "exception", None)
        if inner is None and exc.args and isinstance(exc.args[0], BaseException):
            inner = exc.args[0]
        if not isinstance(inner, BaseException):
            break
        exc = inner
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def close_quietly(connection: pika.BlockingConnection) -> None:
    """Close a connection that may already be gone; there is nothing to tell anyone if it was."""
    try:
        if connection.is_open:
            connection.close()
    except (pika.exceptions.AMQPError, OSError):
        pass
