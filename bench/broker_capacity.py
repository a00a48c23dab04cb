"""What one RabbitMQ node takes, for the capacity plan: frames of a given size through a durable quorum
queue the way cameras and workers use it (persistent publishes with confirms; consumed with manual acks),
with `--publishers` camera connections and `--consumers` worker connections, no model in the way.

Each size runs for a fixed time with publishers and consumers together; prints messages/s and MB/s
published, consumed and the backlog left, per size, measured in one run on this machine. The queue is the
run's own (deleted at the end).

    .venv/bin/python bench/broker_capacity.py [--sizes 20000 200000] [--seconds 15] [--publishers 2] [--consumers 2]
"""

from __future__ import annotations

import argparse
import os
import secrets
import threading
import time

import pika


def publisher(queue: str, body: bytes, stop: threading.Event, counts: list[int], index: int) -> None:
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
    channel = connection.channel()
    channel.confirm_delivery()
    properties = pika.BasicProperties(delivery_mode=2, content_type="image/jpeg")
    while not stop.is_set():
        channel.basic_publish("", queue, body, properties)  # confirmed: returns once the queue has it
        counts[index] += 1
    connection.close()


def consumer(queue: str, stop: threading.Event, counts: list[int], index: int, prefetch: int) -> None:
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=prefetch)
    pending: list[int] = []

    def on_message(ch, method, _properties, _body) -> None:
        pending.append(method.delivery_tag)
        counts[index] += 1
        if len(pending) >= prefetch // 4:  # acks coalesced, as the worker does with multiple=True
            ch.basic_ack(pending[-1], multiple=True)
            pending.clear()

    channel.basic_consume(queue, on_message)
    while not stop.is_set():
        connection.process_data_events(time_limit=0.2)
    if pending:
        channel.basic_ack(pending[-1], multiple=True)
    connection.close()


def run(size: int, seconds: float, publishers: int, consumers: int, prefetch: int) -> dict:
    queue = f"bench-capacity-{secrets.token_hex(4)}"
    setup = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
    channel = setup.channel()
    channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    body = os.urandom(size)
    stop = threading.Event()
    published, consumed = [0] * publishers, [0] * consumers
    threads = [threading.Thread(target=publisher, args=(queue, body, stop, published, i)) for i in range(publishers)]
    threads += [threading.Thread(target=consumer, args=(queue, stop, consumed, i, prefetch)) for i in range(consumers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    backlog = channel.queue_declare(queue, passive=True).method.message_count
    channel.queue_delete(queue)
    setup.close()
    return {"size": size, "seconds": elapsed, "published": sum(published), "consumed": sum(consumed),
            "backlog": backlog}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--consumers", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=64)
    args = parser.parse_args()
    print(f"one RabbitMQ node on 127.0.0.1, a durable quorum queue; {args.publishers} publishers (persistent, "
          f"confirmed), {args.consumers} consumers (prefetch {args.prefetch}, acks coalesced); "
          f"{args.seconds:g} s per size, {os.cpu_count()} cores shared by broker and clients")
    for size in args.sizes:
        r = run(size, args.seconds, args.publishers, args.consumers, args.prefetch)
        pub, con = r["published"] / r["seconds"], r["consumed"] / r["seconds"]
        print(f"  {size / 1000:>6.0f} KB frames: published {pub:8.0f} msg/s ({pub * size / 1e6:6.1f} MB/s), "
              f"consumed {con:8.0f} msg/s ({con * size / 1e6:6.1f} MB/s), backlog left {r['backlog']}")


if __name__ == "__main__":
    main()
