"""Free TCP ports on 127.0.0.1 for the servers the tests start (RabbitMQ nodes, SeaweedFS, OPC UA, metrics)."""

from __future__ import annotations

import random
import socket
from collections.abc import Collection


def free_port() -> int:
    """A port free now, chosen by the kernel."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_ports(count: int, offset: int = 20000, taken: Collection[int] = ()) -> list[int]:
    """`count` distinct ports p, not in `taken`, each with p + `offset` free too: a RabbitMQ node's Erlang
    distribution port is its AMQP port + 20000, SeaweedFS serves gRPC at its port + 10000."""
    found: list[int] = []
    for port in random.sample(range(20000, 65535 - offset), 400):
        if port in taken or port in found or port + offset in found:
            continue
        try:
            for candidate in (port, port + offset):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        found.append(port)
        if len(found) == count:
            return found
    raise RuntimeError(f"no {count} free port pairs {offset} apart")
