"""What one RabbitMQ node takes, and what a three-node cluster replicating the queue takes, for the capacity
plan: frames of a given size through a durable quorum queue the way cameras and workers use it (persistent
publishes with confirms; consumed with manual acks), with `--publishers` camera connections and
`--consumers` worker connections, no model in the way.

Each size runs for a fixed time with publishers and consumers together; prints messages/s and MB/s
published, consumed and the backlog left, per size, measured in one run on this machine. The queue is the
run's own (deleted at the end).

`--nodes 1` (the default) measures the broker on 127.0.0.1:5672. `--nodes 3` starts, on free ports of this
host, a single node of its own and a three-node cluster of its own (tests/clusterkit.py: the RabbitMQ
binaries, run as root, which hands the nodes to the rabbitmq user), and measures both side by side at each
size: the cluster's queue is a quorum queue on all three nodes, its clients spread over the nodes as a
load balancer would spread them, so the figure carries the cost of replication. Both are stopped at the
end; the broker on port 5672 is never touched.

    .venv/bin/python bench/broker_capacity.py [--sizes 20000 200000] [--seconds 15] [--publishers 2] [--consumers 2]
    .venv/bin/python bench/broker_capacity.py --nodes 3 --seconds 10 --publishers 4
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import threading
import time
from pathlib import Path

import pika

DEFAULT_PORT = 5672


def publisher(queue: str, body: bytes, stop: threading.Event, counts: list[int], index: int, port: int) -> None:
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
    channel = connection.channel()
    channel.confirm_delivery()
    properties = pika.BasicProperties(delivery_mode=2, content_type="image/jpeg")
    while not stop.is_set():
        channel.basic_publish("", queue, body, properties)  # confirmed: returns once the queue has it
        counts[index] += 1
    connection.close()


def consumer(queue: str, stop: threading.Event, counts: list[int], index: int, prefetch: int, port: int) -> None:
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
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


def run(size: int, seconds: float, publishers: int, consumers: int, prefetch: int,
        ports: tuple[int, ...] = (DEFAULT_PORT,)) -> dict:
    """One size on the broker at `ports` (one node, or the nodes of a cluster: clients go round-robin, the
    queue is declared on the first, replicated on every member of its cluster)."""
    queue = f"bench-capacity-{secrets.token_hex(4)}"
    setup = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", ports[0]))
    channel = setup.channel()
    channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    body = os.urandom(size)
    stop = threading.Event()
    published, consumed = [0] * publishers, [0] * consumers
    threads = [threading.Thread(target=publisher, args=(queue, body, stop, published, i, ports[i % len(ports)]))
               for i in range(publishers)]
    threads += [threading.Thread(target=consumer,
                                 args=(queue, stop, consumed, i, prefetch, ports[(i + 1) % len(ports)]))
                for i in range(consumers)]
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


def line(label: str, size: int, r: dict) -> str:
    pub, con = r["published"] / r["seconds"], r["consumed"] / r["seconds"]
    return (f"  {size / 1000:>6.0f} KB frames{label}: published {pub:8.0f} msg/s ({pub * size / 1e6:6.1f} MB/s), "
            f"consumed {con:8.0f} msg/s ({con * size / 1e6:6.1f} MB/s), backlog left {r['backlog']}")


def side_by_side(args: argparse.Namespace) -> None:
    """A single node and a three-node cluster, both of this run's own, each size on one then the other."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/clusterkit.py starts the nodes
    from tests.clusterkit import Cluster

    single, cluster = Cluster(size=1), Cluster(size=3)
    try:
        started = time.perf_counter()
        single.start()
        cluster.start()
        print(f"  (a node of its own and a cluster of three started in {time.perf_counter() - started:.0f} s; "
              f"cluster members {', '.join(sorted(cluster.running_members()))})")
        for size in args.sizes:
            alone = run(size, args.seconds, args.publishers, args.consumers, args.prefetch,
                        tuple(n.port for n in single.nodes))
            print(line(", 1 node  ", size, alone), flush=True)
            three = run(size, args.seconds, args.publishers, args.consumers, args.prefetch,
                        tuple(n.port for n in cluster.nodes))
            print(line(", 3 nodes ", size, three), flush=True)
            ratio = (three["published"] / three["seconds"]) / max(alone["published"] / alone["seconds"], 1e-9)
            print(f"  {size / 1000:>6.0f} KB frames: the cluster publishes {ratio:.2f} x what one node does")
    finally:
        cluster.stop()
        single.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--consumers", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=64)
    parser.add_argument("--nodes", type=int, choices=(1, 3), default=1,
                        help="1: the broker on 127.0.0.1:5672; 3: a node and a three-node cluster of this run's own")
    args = parser.parse_args()
    where = ("one RabbitMQ node on 127.0.0.1" if args.nodes == 1 else
             "one RabbitMQ node against a three-node cluster (a quorum queue on all three), all on this host")
    print(f"{where}, a durable quorum queue; {args.publishers} publishers (persistent, "
          f"confirmed), {args.consumers} consumers (prefetch {args.prefetch}, acks coalesced); "
          f"{args.seconds:g} s per size, {os.cpu_count()} cores shared by broker and clients")
    if args.nodes == 3:
        side_by_side(args)
        return
    for size in args.sizes:
        print(line("", size, run(size, args.seconds, args.publishers, args.consumers, args.prefetch)))


if __name__ == "__main__":
    main()
