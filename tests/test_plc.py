"""Verdicts to a line's controllers, end to end: a real worker publishes results, a real MQTT client
(paho) takes them through RabbitMQ's MQTT plugin, and a real OPC UA client (asyncua) reads and subscribes
to `inspector opcua`. The reference is what RabbitMQ delivered to a plain AMQP queue on the results
exchange, never the bridge's own view."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pika
import pytest

from inspector import config
from inspector.messages import encode
from inspector.tools import samples
from inspector.worker.loop import Worker
from tests.plckit import free_ports, start_mqtt_broker
from tests.workerkit import SIZE, Line, encoded, worker_config

ROOT = Path(__file__).resolve().parents[1]
DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"
GOOD = [encoded(image, "PNG") for image in samples.make_images(3, seed=11, size=SIZE)]
# a crack, far below every good part's log-density (as in tests/test_contract.py): a certain fail
CRACK = encoded(samples.make_images(4, defective=True, seed=11, size=SIZE)[3], "PNG")


def _frames(plan: list[tuple[str, bytes]]) -> list[tuple[str, bytes, dict]]:
    return [(key, body, {"content_type": "image/png", "message_id": f"{key}-{i}"})
            for i, (key, body) in enumerate(plan)]


# -- MQTT, through RabbitMQ's plugin -----------------------------------------------------------
# These start a RabbitMQ node of their own (the shared broker may lack the plugin and is not ours to
# reconfigure): 20 to 50 s on two busy cores before the first test, so they run in `make test-slow`.


@pytest.fixture(scope="module")
def mqtt_node():
    """A RabbitMQ node of the test's own with rabbitmq_mqtt, and the shipped definitions imported into it."""
    pytest.importorskip("paho.mqtt.client")
    try:
        node, folder = start_mqtt_broker()
    except Exception as exc:  # noqa: BLE001 - the reason it cannot run here is the skip's reason
        pytest.skip(f"a RabbitMQ node with the MQTT plugin could not start: {exc}")
    try:
        copy = folder / "definitions.json"
        shutil.copy(DEFINITIONS, copy)
        shutil.chown(copy, "rabbitmq", "rabbitmq")
        subprocess.run(["rabbitmqctl", "-n", node.node, "-q", "import_definitions", str(copy)], env=node._environment(),
                       check=True, capture_output=True, timeout=60)
        yield node
    finally:
        node.stop()
        shutil.rmtree(folder, ignore_errors=True)


class Subscriber:
    """A paho MQTT 3.1.1 client subscribed to `topic` at QoS 1, keeping (topic, payload) of every message."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self.received: list[tuple[str, bytes]] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"plc-{os.getpid()}",
                                  protocol=mqtt.MQTTv311)
        self.client.username_pw_set("guest", "guest")
        self.client.on_connect = lambda client, *_: client.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = lambda _c, _u, message: self.received.append((message.topic, message.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(20), f"no SUBACK for {topic}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.slow
def test_an_mqtt_subscriber_to_one_lines_failures_gets_exactly_those_verdicts_as_published(fitted, tmp_path,
                                                                                          mqtt_node):
    line = Line("inspection", port=mqtt_node.port)  # the shipped names: definitions.json binds them for MQTT
    subscriber = Subscriber(mqtt_node.mqtt_port, "fail/line1/+")
    text = f'[broker]\nurl = "{mqtt_node.url}"\n'
    worker = Worker(config.load(worker_config(tmp_path, fitted, "inspection", text)))
    worker.start()
    try:
        plan = [("line1.cam1", GOOD[0]), ("line1.cam1", CRACK), ("line1.cam2", CRACK), ("line2.cam1", CRACK),
                ("line1.cam1", GOOD[1]), ("line2.cam1", GOOD[2]), ("line1.cam2", CRACK), ("line10.cam1", CRACK)]
        line.publish(_frames(plan))
        results = line.collect(len(plan))
        assert len(results) == len(plan)
        wanted = {body["frame_id"]: (key, body) for key, _, body in results
                  if body["verdict"] == "fail" and body["line_id"] == "line1"}
        assert len(wanted) >= 3 and any(b["verdict"] == "pass" for _, _, b in results)  # not vacuous
        assert any(b["verdict"] == "fail" and b["line_id"] != "line1" for _, _, b in results)
        deadline = time.monotonic() + 15
        while len(subscriber.received) < len(wanted) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # room for anything that should not come
    finally:
        worker.stop(grace_s=5)
        subscriber.close()
    got = {json.loads(payload)["frame_id"]: (topic, payload) for topic, payload in subscriber.received}
    assert len(got) == len(subscriber.received) == len(wanted)
    assert set(got) == set(wanted)
    for frame_id, (topic, payload) in got.items():
        key, body = wanted[frame_id]
        assert topic == key.replace(".", "/") == f"fail/line1/{body['camera_id']}"
        assert payload == encode(body)  # byte for byte the result the worker published


@pytest.mark.slow
def test_mqtt_5_needs_a_newer_broker_than_this_one_and_3_1_1_is_served(mqtt_node):
    """RabbitMQ serves MQTT 5 from 3.13; on an older node a v5 CONNECT is refused, and the docs say so."""
    import paho.mqtt.client as mqtt

    version = subprocess.run(["rabbitmqctl", "-n", mqtt_node.node, "-q", "version"], env=mqtt_node._environment(),
                             capture_output=True, text=True, timeout=60).stdout.strip()
    major_minor = tuple(int(part) for part in version.split(".")[:2])
    outcome: list[object] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="v5-probe", protocol=mqtt.MQTTv5)
    client.username_pw_set("guest", "guest")
    client.on_connect = lambda _c, _u, _f, reason, _p: outcome.append(reason)
    client.on_disconnect = lambda *_: outcome.append("disconnected")
    client.connect("127.0.0.1", mqtt_node.mqtt_port)
    client.loop_start()
    deadline = time.monotonic() + 10
    while not outcome and time.monotonic() < deadline:
        time.sleep(0.05)
    client.loop_stop()
    accepted = bool(outcome) and not isinstance(outcome[0], str) and not outcome[0].is_failure
    assert accepted == (major_minor >= (3, 13)), (version, outcome)


# -- OPC UA, through `inspector opcua` --------------------------------------------------------


class Bridge:
    """`inspector opcua` as a process of its own, as a plant runs it."""

    def __init__(self, config_path: Path, environment: dict[str, str]) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("INSPECTOR_")}
        self.process = subprocess.Popen([sys.executable, "-m", "inspector.cli", "opcua", "--config", str(config_path)],
                                        env={**clean, **environment, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._serving = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for text in self.process.stdout:
            self.lines.append(text)
            if "serving OPC UA" in text:
                self._serving.set()

    def wait_serving(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not self._serving.wait(0.2):
            assert self.process.poll() is None and time.monotonic() < deadline, "".join(self.lines)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


class Changes:
    """asyncua's subscription handler: (node id, value, time.monotonic()) of every data change."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, object, float]] = []

    def datachange_notification(self, node, value, data) -> None:
        self.seen.append((node.nodeid.Identifier, value, time.monotonic()))

    def of(self, identifier: str) -> list[tuple[object, float]]:
        return [(value, at) for node, value, at in self.seen if node == identifier]


PULSE_S = 0.6


def test_an_opcua_client_reads_and_subscribes_to_what_a_real_worker_published(fitted, prefix, tmp_path, line, start):
    pytest.importorskip("asyncua")
    from asyncua import Client, ua

    from inspector.tools.opcua.namespace import SOURCE_VARIABLES

    endpoint = f"opc.tcp://127.0.0.1:{free_ports(1)[0]}/inspector"
    opcua = (f'[opcua]\nendpoint = "{endpoint}"\nreject_pulse_s = {PULSE_S}\nmax_sources = 1\nusername = "plc"\n'
             'sources = [{line = "line1", camera = "cam1"}, {line = "line9", camera = "cam9"}]\n')
    start(fitted)
    bridge = Bridge(worker_config(tmp_path, fitted, prefix, opcua), {"INSPECTOR_OPCUA__PASSWORD": "s3cret"})
    plan = [("line1.cam1", GOOD[0]), ("line2.cam1", GOOD[1]), ("line1.cam1", CRACK), ("line2.cam1", CRACK),
            ("line3.cam1", GOOD[2]), ("line1.cam1", GOOD[1])]

    async def refused(user: str | None, password: str | None) -> bool:
        client = Client(endpoint, timeout=10)
        if user:
            client.set_user(user)
            client.set_password(password)
        try:
            await client.connect()
        except Exception:  # noqa: BLE001 - any refusal will do; an accepted session is the failure
            return True
        await client.disconnect()
        return False

    async def scenario() -> dict:
        assert await refused(None, None) and await refused("plc", "wrong")
        client = Client(endpoint, timeout=10)
        client.set_user("plc")
        client.set_password("s3cret")
        async with client:
            ns = await client.get_namespace_index("urn:inspector:results")

            def node(*path: str):
                return client.get_node(ua.NodeId("/".join(path), ns))

            waiting = {name: await node("Lines", "line9", "cam9", name).read_value() for name in SOURCE_VARIABLES}
            changes = Changes()
            subscription = await client.create_subscription(20, changes)
            await subscription.subscribe_data_change(
                [node("Lines", "line1", "cam1", "Reject"), node("Lines", "line1", "cam1", "FrameId")], queuesize=100)
            with pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1")) as connection:
                channel = connection.channel()
                channel.basic_publish(line.exchanges["results"], "fail.line1.cam1", b"{not a result")
                for _ in range(100):  # taken off the reference queue again, which wants results only
                    method, _, body = channel.basic_get(line.results_queue, auto_ack=True)
                    if method is not None:
                        assert body == b"{not a result"
                        break
                    time.sleep(0.05)
            line.publish(_frames(plan))
            deadline = time.monotonic() + 60
            while await node("Bridge", "ResultsReceived").read_value() < len(plan) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await asyncio.sleep(PULSE_S + 0.5)  # every pulse over
            values = {}
            lines = await node("Lines").get_children()
            for line_node in lines:
                line_name = (await line_node.read_browse_name()).Name
                for camera_node in await line_node.get_children():
                    camera_name = (await camera_node.read_browse_name()).Name
                    values[(line_name, camera_name)] = {
                        (await variable.read_browse_name()).Name: await variable.read_value()
                        for variable in await camera_node.get_children()}
            bridge_values = {name: await node("Bridge", name).read_value()
                             for name in ("BrokerConnected", "ResultsReceived", "ResultsMalformed", "ResultsOverCap")}
            try:
                await node("Lines", "line1", "cam1", "Reject").write_value(True)
                written = True
            except ua.UaStatusCodeError:
                written = False
        return {"waiting": waiting, "values": values, "bridge": bridge_values, "changes": changes, "written": written}

    try:
        bridge.wait_serving()
        seen = asyncio.run(scenario())
        results = line.collect(len(plan))
    finally:
        code = bridge.stop()
    assert code == 0, "".join(bridge.lines)
    assert len(results) == len(plan)
    bodies = [body for _, _, body in results]  # the order RabbitMQ routed them in, the bridge's order too
    assert [b["verdict"] for b in bodies if b["frame_id"] == "line1.cam1-2"] == ["fail"]  # the crack: not vacuous

    assert seen["waiting"]["Verdict"] == "" and seen["waiting"]["PassCount"] == 0  # served before any verdict
    assert seen["bridge"] == {"BrokerConnected": True, "ResultsReceived": len(plan), "ResultsMalformed": 1,
                              "ResultsOverCap": 1}
    assert not seen["written"]  # clients read and subscribe; nothing is writable
    # line1/cam1 and line9/cam9 are configured, line2/cam1 takes the one free place, line3/cam1 is `other`
    assert set(seen["values"]) == {("line1", "cam1"), ("line9", "cam9"), ("line2", "cam1"), ("other", "other")}
    for (line_id, camera), values in seen["values"].items():
        assert set(values) == set(SOURCE_VARIABLES)
        mine = [b for b in bodies if (b["line_id"], b["camera_id"]) == (line_id, camera)
                or ((line_id, camera) == ("other", "other") and b["line_id"] == "line3")]
        assert [values[f"{v.title()}Count"] for v in ("pass", "fail", "error")] == [
            sum(b["verdict"] == v for b in mine) for v in ("pass", "fail", "error")], line_id
        if not mine:
            continue
        last = mine[-1]
        assert values["Verdict"] == last["verdict"] and values["FrameId"] == last["frame_id"]
        assert values["AnomalyProbability"] == pytest.approx(last["anomaly_probability"])
        assert (values["Model"], values["ModelVersion"]) == (last["model"]["name"], last["model"]["version"])
        assert values["InspectedAt"].strftime("%Y-%m-%dT%H:%M:%S.%f")[:23] + "Z" == last["inspected_at"]
        assert values["ErrorCode"] == "" and values["Reject"] is False

    changes: Changes = seen["changes"]
    line1 = [b for b in bodies if (b["line_id"], b["camera_id"]) == ("line1", "cam1")]
    frame_ids = [value for value, _ in changes.of("Lines/line1/cam1/FrameId")]
    assert frame_ids[-len(line1):] == [b["frame_id"] for b in line1]  # every one, in order
    rejects = [(value, at) for value, at in changes.of("Lines/line1/cam1/Reject")]
    assert [value for value, _ in rejects] == [False, True, False]  # the initial value, then one pulse
    held = rejects[2][1] - rejects[1][1]
    assert PULSE_S - 0.05 <= held <= PULSE_S + 1.0, held



@pytest.mark.slow
def test_an_mqtt_user_without_write_on_amq_topic_subscribes_but_cannot_publish_a_verdict(mqtt_node):
    """The permissions deploy/README.md gives MQTT clients: they read results, and a forged verdict they
    publish reaches no subscriber."""
    import paho.mqtt.client as mqtt

    def ctl(*words: str) -> None:
        subprocess.run(["rabbitmqctl", "-n", mqtt_node.node, "-q", *words], env=mqtt_node._environment(), check=True,
                       capture_output=True, timeout=60)

    ctl("add_user", "plc", "plc-password")
    ctl("set_permissions", "-p", "/", "plc", "^mqtt-subscription-.*", "^mqtt-subscription-.*",
        r"^(amq\.topic|mqtt-subscription-.*)$")
    watcher = Subscriber(mqtt_node.mqtt_port, "fail/line7/+")  # guest, who may do anything
    reader = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="plc-reader", protocol=mqtt.MQTTv311)
    reader.username_pw_set("plc", "plc-password")
    granted: list[object] = []
    reader.on_connect = lambda client, *_: client.subscribe("fail/line7/+", qos=1)
    reader.on_subscribe = lambda _c, _u, _m, codes, _p: granted.extend(codes)
    reader.connect("127.0.0.1", mqtt_node.mqtt_port)
    reader.loop_start()
    try:
        deadline = time.monotonic() + 20
        while not granted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert granted and not granted[0].is_failure, granted  # it may subscribe
        # QoS 0: the broker refuses it (and closes the connection), and paho holds no unacknowledged message
        reader.publish("fail/line7/cam1", b'{"forged": true}', qos=0)
        time.sleep(1.5)
        assert watcher.received == []  # and its publish reaches nobody
        with pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", mqtt_node.port)) as connection:
            connection.channel().basic_publish("amq.topic", "fail.line7.cam1", b"{}")  # the path itself works
        deadline = time.monotonic() + 10
        while not watcher.received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watcher.received == [("fail/line7/cam1", b"{}")]
    finally:
        reader.disconnect()
        reader.loop_stop()
        watcher.close()
