"""The broker thread under hostile captures: a dead letter whose capture carries a full frame of headers."""

from __future__ import annotations

import pika

from hostile import Case
from inspector.worker.envelopes import Delivery, Outcome, dead_letter_properties, encoded_size

HEADERS = 26_000  # void headers: about 200 KB of table, what one capture's content header can carry
BUDGET = 131_072 - 1046  # RabbitMQ's frame_max less the consumer's FRAME_OVERHEAD


def _outcome() -> Outcome:
    properties = pika.BasicProperties(headers={f"h{i:05d}": None for i in range(HEADERS)}, content_type="x" * 200)
    delivery = Delivery(generation=1, tag=1, exchange="inspection.captures", routing_key="l" * 250,
                        properties=properties, body=b"", redelivered=False, received_at=0.0)
    return Outcome(delivery=delivery, routing_key="error.l.c", result=b"{}", frame_id="f",
                   dead_letter=("unsupported_content_type", "x" * 1000))


def trim_now() -> str:
    properties = dead_letter_properties(_outcome(), BUDGET)
    return f"{properties.headers['x-inspector-headers-dropped']} headers dropped"


def trim_one_at_a_time() -> str:
    """The former algorithm: drop the largest remaining header, re-encode the whole table, repeat."""
    outcome = _outcome()
    headers = dict(outcome.delivery.properties.headers)
    added = {"x-inspector-error-code": outcome.dead_letter[0], "x-inspector-error-message": outcome.dead_letter[1]}

    def build(kept: dict, dropped: int) -> pika.BasicProperties:
        return pika.BasicProperties(content_type="x" * 200,
                                    headers={**kept, **added, "x-inspector-headers-dropped": dropped})

    by_size = sorted(headers, key=lambda key: encoded_size(pika.BasicProperties(headers={key: headers[key]})),
                     reverse=True)
    for dropped, key in enumerate(by_size, start=1):
        del headers[key]
        if encoded_size(build(headers, dropped)) <= BUDGET:
            return f"{dropped} headers dropped"
    return f"{len(by_size)} headers dropped"


CASES = [
    Case("dead letter of a capture with 26,000 headers (broker thread)", trim_now, trim_one_at_a_time,
         unbounded_limit_s=60.0),
]
