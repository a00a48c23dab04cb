"""A real three-node RabbitMQ cluster on this host (tests/clusterkit.py), the capture queue a quorum queue
replicated on all three, a worker on it and two cameras streaming at a steady rate, while a node is lost:

- the node that leads the capture queue, stopped and later restarted;
- the node the worker is connected to, stopped.

Every frame is answered, none twice unless the repeat says it was redelivered; the leader moves, the queue
stays available to the cameras, and a worker that lost its node serves from another within seconds.
Slow (a cluster forms in about a minute on two cores); skipped, saying why, without the RabbitMQ binaries."""

from __future__ import annotations

import shutil
import threading
import time
from collections import defaultdict

import pika
import pytest

from inspector import config
from inspector.config import WorkerSettings
from inspector.tools import samples
from inspector.worker.loop import Worker
from tests.workerkit import SIZE, Line, encoded, names, worker_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("rabbitmq-server") is None or shutil.which("rabbitmqctl") is None,
                       reason="the RabbitMQ binaries (rabbitmq-server, rabbitmqctl) are not installed here"),
]

GOOD = encoded(samples.make_images(1, seed=13, size=SIZE)[0], "PNG")
RATE = 8.0  # frames a second, the two cameras together


@pytest.fixture(scope="module")
def cluster():
    from tests.clusterkit import Cluster

    made = Cluster()
    try:
        made.start()
    except Exception as exc:  # noqa: BLE001 - the reason it cannot run here is the skip's reason
        made.stop()
        pytest.skip(f"a three-node RabbitMQ cluster could not form here: {exc}")
    yield made
    made.stop()


@pytest.fixture
def every_node_up(cluster):
    for index, up in enumerate(cluster.running):
        if not up:
            cluster.restart_node(index)
    yield cluster


class Stream:
    """Two cameras publishing at RATE through one node, with confirms, retrying a publish the broker did
    not confirm (a repeat of a frame is then a capture sent twice, which the worker answers each time)."""

    def __init__(self, line: Line) -> None:
        self.line, self.sent, self.failures = line, [], 0
        self.longest_wait_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        index = 0
        while not self._stop.is_set():
            frame_id = f"f-{index:05d}"
            message = (f"line1.cam{index % 2 + 1}", GOOD, {"content_type": "image/png", "message_id": frame_id})
            began = time.monotonic()
            while True:
                try:
                    self.line.publish([message])
                    break
                except pika.exceptions.AMQPError:
                    self.failures += 1
                    time.sleep(0.2)
            self.longest_wait_s = max(self.longest_wait_s, time.monotonic() - began)
            self.sent.append(frame_id)
            index += 1
            time.sleep(max(0.0, 1 / RATE - (time.monotonic() - began)))

    def start(self) -> "Stream":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


def declare_capture_queue(cluster, port: int, prefix: str) -> None:
    """The capture queue declared as the worker declares it, before the worker: so the test knows which
    node leads it before choosing the node the worker connects to."""
    tables = names(prefix)
    with pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port)) as connection:
        channel = connection.channel()
        channel.queue_declare(tables["worker"]["queue"], durable=True, arguments={
            "x-queue-type": "quorum", "x-dead-letter-exchange": tables["broker.exchanges"]["dead"],
            "x-delivery-limit": WorkerSettings().delivery_limit})


def roles(cluster, queue: str) -> tuple[int, int, int]:
    """(leader, worker's node, the third): indexes into cluster.nodes."""
    leader = cluster.wait_for_leader(queue)
    lead = next(i for i, n in enumerate(cluster.nodes) if n.node == leader)
    others = [i for i in range(len(cluster.nodes)) if i != lead]
    return lead, others[0], others[1]


def answered_once_each(line: Line, sent: list[str]) -> dict[str, list[bool]]:
    results = line.collect(len(sent), timeout=300)
    answers: dict[str, list[bool]] = defaultdict(list)
    for _, _, body in results:
        answers[body["frame_id"]].append(body["redelivered"])
    missing = sorted(set(sent) - set(answers))
    assert not missing, f"{len(missing)} frames never answered: {missing[:10]}"
    for frame_id, redelivered in answers.items():  # a repeat answers a redelivery, and says so
        assert sum(redelivered) >= len(redelivered) - 1, (frame_id, redelivered)
    return answers


def start_worker(tmp_path, fitted, prefix, cluster, order: list[int]) -> Worker:
    urls = ", ".join(f'"{cluster.nodes[i].url}"' for i in order)
    path = worker_config(tmp_path, fitted, prefix, f"[broker]\nurl = [{urls}]\n", reconnect_max_s=1.0)
    worker = Worker(config.load(path))
    worker.start()
    return worker


def test_the_leader_of_the_capture_queue_is_stopped_and_restarted_mid_stream(fitted, prefix, tmp_path,
                                                                             every_node_up):
    cluster = every_node_up
    queue = names(prefix)["worker"]["queue"]
    declare_capture_queue(cluster, cluster.nodes[0].port, prefix)
    assert set(cluster.queue(queue)["members"]) == {n.node for n in cluster.nodes}, "replicated on all three"
    lead, on, third = roles(cluster, queue)
    line = Line(prefix, port=cluster.nodes[on].port)  # the cameras and the results reader on a node that stays
    worker = start_worker(tmp_path, fitted, prefix, cluster, [on, third, lead])
    stream = Stream(line).start()
    try:
        time.sleep(8)
        stopped_at = time.monotonic()
        cluster.stop_node(lead)
        new_leader = cluster.wait_for_leader(queue, not_on=cluster.nodes[lead].node, timeout=60)
        moved_s = time.monotonic() - stopped_at
        time.sleep(8)
        cluster.restart_node(lead)
        time.sleep(8)
        stream.stop()
        answers = answered_once_each(line, stream.sent)
        state = cluster.queue(queue)
        print(f"\nleader stopped: {len(stream.sent)} frames, {sum(map(len, answers.values()))} answers, "
              f"leader moved to {new_leader} within {moved_s:.1f} s, longest publish {stream.longest_wait_s:.2f} s, "
              f"{stream.failures} publishes retried, worker generation {worker.consumer.generation}")
        assert new_leader != cluster.nodes[lead].node
        assert stream.longest_wait_s < 30, "the queue stayed available to the cameras"
        assert set(state["online"]) == {n.node for n in cluster.nodes}, "the restarted node is back as a member"
    finally:
        stream.stop()
        worker.stop(grace_s=5)


def test_the_node_the_worker_is_connected_to_is_stopped_mid_stream(fitted, prefix, tmp_path, every_node_up):
    cluster = every_node_up
    queue = names(prefix)["worker"]["queue"]
    declare_capture_queue(cluster, cluster.nodes[0].port, prefix)
    lead, on, third = roles(cluster, queue)
    line = Line(prefix, port=cluster.nodes[third].port)
    worker = start_worker(tmp_path, fitted, prefix, cluster, [on, third, lead])
    stream = Stream(line).start()
    try:
        deadline = time.monotonic() + 60
        while worker.consumer.generation < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(8)
        stopped_at = time.monotonic()
        cluster.stop_node(on)
        while worker.consumer.generation < 2 and time.monotonic() - stopped_at < 60:
            time.sleep(0.1)
        moved_s = time.monotonic() - stopped_at
        assert worker.consumer.generation >= 2, "the worker did not reconnect to a surviving node"
        time.sleep(10)
        stream.stop()
        answers = answered_once_each(line, stream.sent)
        redelivered = sum(any(flags) for flags in answers.values())
        leader = cluster.wait_for_leader(queue, not_on=cluster.nodes[on].node)
        print(f"\nworker's node stopped: {len(stream.sent)} frames, {redelivered} answered as redelivered, "
              f"worker on a surviving node {moved_s:.1f} s after (stop included), leader {leader}, "
              f"longest publish {stream.longest_wait_s:.2f} s")
        assert moved_s < 30, f"the worker took {moved_s:.1f} s to serve from another node"
        assert stream.longest_wait_s < 30
    finally:
        stream.stop()
        worker.stop(grace_s=5)
