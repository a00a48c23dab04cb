"""A RabbitMQ node of the test's own with the MQTT plugin: the shared broker on 5672 may not have it,
and tests must not reconfigure that one."""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from pathlib import Path

from tests.portkit import free_ports
from tests.workerkit import SecondBroker


class MqttBroker(SecondBroker):
    """A RabbitMQ node on 127.0.0.1:`port` with rabbitmq_mqtt listening on 127.0.0.1:`mqtt_port`."""

    def __init__(self, folder: Path, port: int, mqtt_port: int) -> None:
        super().__init__(folder, port)
        self.mqtt_port = mqtt_port
        (folder / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{port}\n"
                                              f"mqtt.listeners.tcp.local = 127.0.0.1:{mqtt_port}\n")
        (folder / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        for path in (folder / "rabbitmq.conf", folder / "enabled_plugins"):
            shutil.chown(path, "rabbitmq", "rabbitmq")

    def start(self, timeout: float = 60.0) -> None:
        super().start(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.mqtt_port)) == 0:
                    return
            time.sleep(0.3)
        raise RuntimeError(f"the MQTT plugin did not listen on {self.mqtt_port} within {timeout:g} s")


def start_mqtt_broker() -> tuple[MqttBroker, Path]:
    """A started node and its folder (not under pytest's tmp_path: the node runs as the rabbitmq user).
    Raises with the reason when it cannot run here."""
    if shutil.which("rabbitmq-server") is None:
        raise RuntimeError("rabbitmq-server is not installed")
    folder = Path(tempfile.mkdtemp(prefix="inspector-mqtt-"))
    folder.chmod(0o755)
    port, mqtt_port = free_ports(2)
    broker = MqttBroker(folder, port, mqtt_port)
    try:
        broker.start()
    except Exception:
        broker.stop()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return broker, folder
