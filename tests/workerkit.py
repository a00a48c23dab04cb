"""Shared pieces of the worker tests: a fitted store, per-test broker names, and a camera/collector
that talk to the real RabbitMQ."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pika
from PIL import Image

from inspector import config
from inspector.tools import samples
from inspector.tools.refit import RefitOptions, run_refit

SIZE = 128  # frames and model input: small, so the tests stay quick on two cores


def fit_store(root: Path, plugin: dict | None = None) -> Path:
    """A store with one calibrated version of `default`, fitted on the synthetic line; `plugin`: more
    [plugins.dfkde] settings (e.g. a random-weight backbone)."""
    samples.write_folder(root / "archive", 80, size=SIZE)
    text = "\n".join(f"{key} = {_toml_value(value)}" for key, value in (plugin or {}).items())
    settings = config.load(_toml(root, {"store": {"path": str(root / "models")}}, text))
    run_refit(settings, RefitOptions(data=root / "archive" / "good", model="default", held_out_share=0.3,
                                     target_false_reject=0.05, announce=False))
    return root / "models"


def write_null_version(store: Path, name: str = "default", probability: float = 0.25, score: float = 1.5) -> str:
    """A stored version of `name` for the null plugin, with no fit: every frame gets these figures; its id."""
    from inspector.stores import ModelStore
    from inspector_null.plugin import NullPlugin, NullSettings

    plugin = NullPlugin(NullSettings(probability=probability, score=score))
    return ModelStore(store).write(name, plugin.save, {"plugin": "null"}).version


def tool_config(root: Path, store: Path) -> Path:
    """An inspector.toml for the admin tools: the CPU, a store, the tests' model input size."""
    path = root / "inspector.toml"
    path.write_text(f'device = "cpu"\n[store]\npath = "{store}"\n[plugins.dfkde]\ninput_size = {SIZE}\n')
    return path


def _toml(root: Path, extra: dict, text: str = "") -> Path:
    """A config file: the DFKDE defaults at a small input size on the CPU, plus `extra` tables and `text`."""
    lines = ['device = "cpu"', "[plugins.dfkde]", f"input_size = {SIZE}", text]
    for table, values in extra.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path = root / f"inspector-{uuid.uuid4().hex[:6]}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml_value(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings, numbers and booleans are written alike


def names(prefix: str) -> dict[str, dict]:
    """Exchange and queue names private to one test, so tests never see each other's messages."""
    return {
        "broker.exchanges": {e: f"{prefix}.{e}" for e in ("captures", "results", "control", "dead")},
        "worker": {"queue": f"{prefix}.q", "dead_letter_queue": f"{prefix}.dead"},
    }


def worker_config(root: Path, store: Path | str, prefix: str, text: str = "", **worker: object) -> Path:
    """A worker's config on the test's own exchanges and queues; `text`: more TOML (e.g. [models.*])."""
    tables = names(prefix)
    tables["worker"] = {**tables["worker"], "start_timeout_s": 20.0, **worker}
    tables["store"] = {"path": str(store)}
    tables["metrics"] = {"port": 0}
    return _toml(root, tables, text)


def encoded(image: np.ndarray, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **save)
    return buffer.getvalue()


class Line:
    """A camera and a results reader on the test's exchanges, each with its own connection.

    Results go to a durable queue of the test's own, so none are missed while connections
    (this one's included) are closed from the broker side.
    """

    def __init__(self, prefix: str, port: int = 5672) -> None:
        self.prefix = prefix
        self.port = port
        self.exchanges = names(prefix)["broker.exchanges"]
        self.results_queue = f"{prefix}.collected"
        with self._channel() as channel:
            for name in self.exchanges.values():
                channel.exchange_declare(name, exchange_type="topic", durable=True)
            channel.queue_declare(self.results_queue, durable=True)
            channel.queue_bind(self.results_queue, self.exchanges["results"], routing_key="#")

    def _channel(self) -> "_Channel":
        return _Channel(self.port)

    def publish(self, frames: list[tuple[str, bytes, dict]]) -> None:
        """frames: (routing key, body, BasicProperties keyword arguments), published with confirms."""
        with self._channel() as channel:
            for key, body, props in frames:
                channel.basic_publish(self.exchanges["captures"], key, body, pika.BasicProperties(**props))

    def announce(self, body: dict) -> None:
        with self._channel() as channel:
            channel.basic_publish(self.exchanges["control"], f"model.{body['model']}", json.dumps(body).encode(),
                                  pika.BasicProperties(content_type="application/json"))

    def collect(self, count: int, timeout: float = 60.0, queue: str | None = None) -> list[tuple]:
        """(routing key, properties, body) of `count` messages, or all that came by `timeout`; a result's
        body parsed from JSON, a dead letter's (queue given) as the bytes it holds."""
        got: list[tuple] = []
        deadline = time.monotonic() + timeout
        queue = queue or self.results_queue
        while len(got) < count and time.monotonic() < deadline:
            try:
                with self._channel() as channel:
                    while len(got) < count and time.monotonic() < deadline:
                        method, properties, body = channel.basic_get(queue, auto_ack=True)
                        if method is None:
                            time.sleep(0.05)
                            continue
                        parsed = body if queue != self.results_queue else json.loads(body)
                        got.append((method.routing_key, properties, parsed))
            except pika.exceptions.AMQPError:
                time.sleep(0.2)  # a connection closed from the broker side: open another
        return got

    def dead_letters(self, count: int, timeout: float = 20.0) -> list[tuple]:
        return self.collect(count, timeout, queue=f"{self.prefix}.dead")

    def queue_depth(self) -> int:
        with self._channel() as channel:
            return channel.queue_declare(f"{self.prefix}.q", passive=True).method.message_count

    def delete(self) -> None:
        with self._channel() as channel:
            for queue in (self.results_queue, f"{self.prefix}.q", f"{self.prefix}.dead"):
                channel.queue_delete(queue)
            for name in self.exchanges.values():
                channel.exchange_delete(name)


class _Channel:
    """A confirming channel on its own connection to the broker on 127.0.0.1:`port`, closed on exit."""

    def __init__(self, port: int) -> None:
        self.port = port

    def __enter__(self):
        self.connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", self.port))
        channel = self.connection.channel()
        channel.confirm_delivery()
        return channel

    def __exit__(self, *exc):
        try:
            self.connection.close()
        except pika.exceptions.AMQPError:
            pass


def close_all_connections() -> None:
    subprocess.run(["rabbitmqctl", "-q", "close_all_connections", "closed by the worker tests"], check=True,
                   capture_output=True, timeout=60, env={**os.environ})


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of a real scrape of /metrics, keyed by (name, sorted labels)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def http_status(port: int, path: str) -> tuple[int, str]:
    """(status, body) of a GET on the worker's HTTP endpoint."""
    from urllib.error import HTTPError
    from urllib.request import urlopen

    try:
        with urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except HTTPError as exc:
        return exc.code, exc.read().decode()


class SecondBroker:
    """A second RabbitMQ node of our own on 127.0.0.1:`port` (its own name, data and log folders, no
    plugins), for failover tests; `rabbitmq-server` runs it as the rabbitmq user."""

    def __init__(self, folder: Path, port: int) -> None:
        import shutil

        self.folder, self.port = folder, port
        self.node = f"inspector-test-{port}@localhost"
        self.url = f"amqp://guest@127.0.0.1:{port}/%2F"
        for sub in ("mnesia", "log"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{port}\n")
        (folder / "enabled_plugins").write_text("[].\n")
        shutil.chown(folder, "rabbitmq", "rabbitmq")
        for path in folder.rglob("*"):
            shutil.chown(path, "rabbitmq", "rabbitmq")

    def _environment(self) -> dict[str, str]:
        return {**os.environ, "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_DIST_PORT": str(self.port + 20000),
                "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"), "RABBITMQ_LOG_BASE": str(self.folder / "log"),
                "RABBITMQ_CONFIG_FILE": str(self.folder / "rabbitmq.conf"),
                "RABBITMQ_PID_FILE": str(self.folder / "pid"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"), "HOME": "/var/lib/rabbitmq"}

    def start(self, timeout: float = 60.0) -> None:
        import socket

        subprocess.run(["rabbitmq-server", "-detached"], env=self._environment(), check=True, capture_output=True,
                       timeout=60)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.3)
        raise RuntimeError(f"the second RabbitMQ node did not listen on {self.port} within {timeout:g} s")

    def stop(self) -> None:
        subprocess.run(["rabbitmqctl", "-n", self.node, "stop"], env=self._environment(), capture_output=True,
                       timeout=60)

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`rabbitmqctl -n <this node> args...`, with this node's environment (and so its Erlang cookie)."""
        return subprocess.run(["rabbitmqctl", "-n", self.node, *args], env=self._environment(), capture_output=True,
                              text=True, timeout=timeout)
