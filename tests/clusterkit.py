"""A RabbitMQ cluster of three nodes on this host for the node-loss tests and the capacity bench: each node
its own name, ports and data folder (tests.workerkit.SecondBroker), one Erlang cookie (the rabbitmq user's,
as every node started with HOME=/var/lib/rabbitmq reads it), clustered with `join_cluster`, started and
stopped by its owner. The shared broker on port 5672 is never touched."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from tests.portkit import free_ports
from tests.workerkit import SecondBroker


class Cluster:
    """Three clustered nodes; `nodes[i].url` is each one's AMQP URL. Not under pytest's tmp_path: that is
    private to root, and the nodes run as the rabbitmq user."""

    def __init__(self, size: int = 3) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="inspector-cluster-"))
        self.folder.chmod(0o755)
        ports: set[int] = set()
        self.nodes: list[SecondBroker] = []
        for index in range(size):
            (port,) = free_ports(1, taken=ports)
            ports.add(port)
            folder = self.folder / f"node{index}"
            folder.mkdir()
            folder.chmod(0o755)
            self.nodes.append(SecondBroker(folder, port))
        self.running = [False] * size

    def start(self) -> None:
        for index, node in enumerate(self.nodes):
            node.start(timeout=120)
            self.running[index] = True
        first = self.nodes[0]
        for node in self.nodes[1:]:
            for args in (("stop_app",), ("join_cluster", first.node), ("start_app",)):
                result = node.ctl(*args)
                if result.returncode != 0:
                    raise RuntimeError(f"{node.node} {' '.join(args)}: {result.stderr.strip() or result.stdout}")
        members = self.running_members()
        if sorted(members) != sorted(n.node for n in self.nodes):
            raise RuntimeError(f"the cluster did not form: running nodes {members}")

    def running_members(self, via: int | None = None) -> list[str]:
        node = self.nodes[via if via is not None else self.running.index(True)]
        result = node.ctl("cluster_status", "--formatter", "json")
        if result.returncode != 0:
            raise RuntimeError(f"cluster_status: {result.stderr.strip()}")
        return json.loads(result.stdout)["running_nodes"]

    def stop_node(self, index: int) -> None:
        self.nodes[index].stop()
        self.running[index] = False

    def restart_node(self, index: int) -> None:
        self.nodes[index].start(timeout=120)
        self.running[index] = True

    def queue(self, name: str, via: int | None = None) -> dict:
        """The queue's type, leader and members as a running node reports them."""
        node = self.nodes[via if via is not None else self.running.index(True)]
        result = node.ctl("list_queues", "-q", "name", "type", "leader", "members", "online", "messages",
                          "--formatter", "json")
        if result.returncode != 0:
            raise RuntimeError(f"list_queues: {result.stderr.strip()}")
        for row in json.loads(result.stdout):
            if row["name"] == name:
                return row
        raise KeyError(name)

    def wait_for_leader(self, name: str, not_on: str | None = None, timeout: float = 60.0) -> str:
        """The queue's leader once it is a running node other than `not_on`; fails after `timeout`."""
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                last = self.queue(name)
                leader = last.get("leader")
                running = [n.node for n, up in zip(self.nodes, self.running) if up]
                if leader and leader != not_on and leader in running:
                    return leader
            except (RuntimeError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"queue {name}: no leader other than {not_on} within {timeout:g} s ({last})")

    def stop(self) -> None:
        for index, node in reversed(list(enumerate(self.nodes))):
            node.stop()
            self.running[index] = False
        shutil.rmtree(self.folder, ignore_errors=True)
