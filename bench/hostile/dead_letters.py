"""Dead letters piling up in `inspection.dead`, the queue the worker declares without a bound, under the
shipped policy (deploy/rabbitmq/set-policy.sh) and without it, on a virtual host of the bench's own:

- 12,000 small dead letters (a flood of junk captures): the policy keeps the newest 10,000; without it
  the queue keeps every one;
- 20 dead letters of 64 MiB (`worker.max_image_bytes`): the policy keeps the newest 16 (1 GiB of
  bodies); without it the queue keeps all 1.25 GiB, on the disk of every replica.

Needs a RabbitMQ node that rabbitmqctl reaches (as the tests do); each case says so where there is none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pika
from hostile import Case

from inspector.config import ExchangeSettings, WorkerSettings

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq" / "set-policy.sh"
RABBITMQCTL = shutil.which("rabbitmqctl")


def _ctl(*args: str) -> None:
    subprocess.run([RABBITMQCTL, "-q", *args], check=True, capture_output=True, timeout=120)


def _pile_up(count: int, size: int, policy: bool) -> str:
    """Publish `count` dead letters of `size` bytes as the worker does, then read back what the queue kept."""
    if RABBITMQCTL is None:
        return "no rabbitmqctl here"
    worker, exchanges = WorkerSettings(), ExchangeSettings()
    vhost = f"inspector-hostile-{uuid.uuid4().hex[:8]}"
    _ctl("add_vhost", vhost)
    try:
        _ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        if policy:
            subprocess.run(["sh", str(SCRIPT), "-q"], check=True, capture_output=True, timeout=120,
                           env={**os.environ, "RABBITMQ_VHOST": vhost})
        connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", virtual_host=vhost))
        try:
            channel = connection.channel()
            channel.exchange_declare(exchanges.dead, exchange_type="topic", durable=True)
            channel.queue_declare(worker.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"})
            channel.queue_bind(worker.dead_letter_queue, exchanges.dead, routing_key="#")
            padding = b"x" * (size - 8)
            for number in range(count):
                if number == count - 1:  # the last one confirmed: those before it are in the queue's log
                    channel.confirm_delivery()
                channel.basic_publish(exchanges.dead, "line-1.camera-1", b"%08d" % number + padding,
                                      pika.BasicProperties(delivery_mode=2))
            kept = channel.queue_declare(worker.dead_letter_queue, passive=True).method.message_count
            oldest = int(channel.basic_get(worker.dead_letter_queue, auto_ack=True)[2][:8])
        finally:
            connection.close()
    finally:
        _ctl("delete_vhost", vhost)
    return f"kept {kept} of {count} ({kept * size / 2**20:.0f} MiB), the oldest kept #{oldest}"


def _case(name: str, count: int, size: int) -> Case:
    return Case(name, bounded=lambda: _pile_up(count, size, policy=True),
                unbounded=lambda: _pile_up(count, size, policy=False), unbounded_limit_s=120.0)


CASES: list[Case] = [
    _case("12,000 small dead letters", 12_000, 200),
    _case("20 dead letters of 64 MiB", 20, WorkerSettings().max_image_bytes),
]
