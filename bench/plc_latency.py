"""Camera to controller: how long after a camera publishes a frame its verdict reaches an MQTT subscriber
(RabbitMQ's MQTT plugin) and an OPC UA client's subscription (`inspector opcua`), at half load.

One run, on this machine: a throwaway model fitted on generated parts, a real worker in this process, the
bridge as its own process, a paho MQTT subscriber, an asyncua client subscribed to the line's FrameId node,
and a plain AMQP consumer of the results exchange as the baseline. First a backlog measures the worker's
saturation rate; then frames are paced at half that rate, each stamped at publish, and every receiver
notes when its frame arrives (one clock, time.monotonic, one process). Prints p50 / p99 / max per path.

The broker needs rabbitmq_mqtt: give one (--amqp-url, --mqtt-port; the run binds its own results exchange
to amq.topic and removes the binding after), or --own-node starts a throwaway node as the tests do.

    .venv/bin/python bench/plc_latency.py --own-node [--frames 200] [--size 256] [--opcua-interval-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pika
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inspector import config  # noqa: E402
from inspector.tools import samples  # noqa: E402
from inspector.tools.refit import RefitOptions, run_refit  # noqa: E402
from inspector.worker.loop import Worker  # noqa: E402

EXCHANGES = ("captures", "results", "control", "dead")
LINE, CAMERA = "bench", "cam1"


def png(image) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def quantiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731 - nearest rank
    return {"n": len(ordered), "p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * at(0.99),
            "max_ms": 1000 * ordered[-1]}


class Receipts:
    """When each frame id arrived, per path."""

    def __init__(self) -> None:
        self.at: dict[str, dict[str, float]] = {"amqp": {}, "mqtt": {}, "opcua": {}}
        self.lock = threading.Lock()

    def note(self, path: str, frame_id: str) -> None:
        now = time.monotonic()
        with self.lock:
            self.at[path].setdefault(frame_id, now)


def amqp_collector(url: str, exchange: str, receipts: Receipts, ready: threading.Event, stop: threading.Event) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, exchange, routing_key="#")
    channel.basic_consume(queue, lambda _c, _m, _p, body: receipts.note("amqp", json.loads(body)["frame_id"]),
                          auto_ack=True)
    ready.set()
    while not stop.is_set():
        connection.process_data_events(time_limit=0.1)
    connection.close()


def mqtt_subscriber(port: int, receipts: Receipts):
    import paho.mqtt.client as mqtt

    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{secrets.token_hex(3)}",
                         protocol=mqtt.MQTTv311)
    client.username_pw_set("guest", "guest")
    client.on_connect = lambda c, *_: c.subscribe(f"+/{LINE}/{CAMERA}", qos=1)
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = lambda _c, _u, m: receipts.note("mqtt", json.loads(m.payload)["frame_id"])
    client.connect("127.0.0.1", port)
    client.loop_start()
    if not subscribed.wait(20):
        raise RuntimeError("the MQTT subscription was not acknowledged")
    return client


class OpcuaSubscriber(threading.Thread):
    """An asyncua client on its own event loop, subscribed to Lines/<line>/<camera>/FrameId."""

    def __init__(self, endpoint: str, interval_ms: float, receipts: Receipts) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.interval_ms, self.receipts = endpoint, interval_ms, receipts
        self.ready, self.stop_flag = threading.Event(), threading.Event()
        self.failure: BaseException | None = None

    def datachange_notification(self, node, value, data) -> None:
        if value:
            self.receipts.note("opcua", value)

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.failure = exc
            self.ready.set()

    async def _run(self) -> None:
        from asyncua import Client, ua

        async with Client(self.endpoint, timeout=10) as client:
            ns = await client.get_namespace_index("urn:inspector:results")
            subscription = await client.create_subscription(self.interval_ms, self)
            await subscription.subscribe_data_change(client.get_node(ua.NodeId(f"Lines/{LINE}/{CAMERA}/FrameId", ns)),
                                                     queuesize=1000)
            self.ready.set()
            while not self.stop_flag.is_set():
                await asyncio.sleep(0.1)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--own-node", action="store_true", help="start a throwaway RabbitMQ node with rabbitmq_mqtt")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--mqtt-port", type=int, default=1883)
    parser.add_argument("--frames", type=int, default=200, help="frames paced at half load (default 200)")
    parser.add_argument("--backlog", type=int, default=120, help="frames of the saturation run (default 120)")
    parser.add_argument("--size", type=int, default=256, help="frame side in pixels, PNG (default 256)")
    parser.add_argument("--opcua-interval-ms", type=float, default=20.0,
                        help="the OPC UA client's publishing interval (default 20 ms)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    node = folder = None
    amqp_url, mqtt_port = args.amqp_url, args.mqtt_port
    if args.own_node:
        from tests.plckit import start_mqtt_broker

        node, folder = start_mqtt_broker()
        amqp_url, mqtt_port = f"amqp://guest:guest@127.0.0.1:{node.port}/%2F", node.mqtt_port
    work = Path(tempfile.mkdtemp(prefix="plc-latency-"))
    prefix = f"plc-{secrets.token_hex(4)}"
    bridge = None
    try:
        samples.write_folder(work / "archive", 60, size=args.size)
        store = work / "models"
        exchanges = "\n".join(f'{e} = "{prefix}.{e}"' for e in EXCHANGES)
        endpoint = f"opc.tcp://127.0.0.1:{free_port()}/inspector"
        path = work / "inspector.toml"
        broker_url = amqp_url.replace("guest:guest@", "guest@")  # the password is never in the file
        path.write_text(f'device = "cpu"\n[store]\npath = "{store}"\n[broker]\nurl = "{broker_url}"\n'
                        f'[broker.exchanges]\n{exchanges}\n[worker]\nqueue = "{prefix}.q"\n'
                        f'dead_letter_queue = "{prefix}.dead"\n[metrics]\nenabled = false\n'
                        f'[opcua]\nendpoint = "{endpoint}"\nsources = [{{line = "{LINE}", camera = "{CAMERA}"}}]\n')
        settings = config.load(path)
        run_refit(settings, RefitOptions(data=work / "archive" / "good", model="default", calibrate=False,
                                         announce=False))
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        channel = connection.channel()
        for exchange in EXCHANGES:
            channel.exchange_declare(f"{prefix}.{exchange}", exchange_type="topic", durable=True)
        channel.exchange_bind(destination="amq.topic", source=f"{prefix}.results", routing_key="#")

        receipts = Receipts()
        stop = threading.Event()
        collected = threading.Event()
        threading.Thread(target=amqp_collector, args=(amqp_url, f"{prefix}.results", receipts, collected, stop),
                         daemon=True).start()
        collected.wait(20)
        mqtt = mqtt_subscriber(mqtt_port, receipts)
        environment = {k: v for k, v in os.environ.items() if not k.upper().startswith("INSPECTOR_")}
        environment["PYTHONPATH"] = str(ROOT)
        bridge = subprocess.Popen([sys.executable, "-m", "inspector.cli", "opcua", "--config", str(path)],
                                  env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for text in bridge.stdout:
            if "serving OPC UA" in text:
                break
        threading.Thread(target=lambda: [None for _ in bridge.stdout], daemon=True).start()  # keep draining
        opcua = OpcuaSubscriber(endpoint, args.opcua_interval_ms, receipts)
        opcua.start()
        opcua.ready.wait(60)
        if opcua.failure:
            raise opcua.failure
        worker = Worker(settings)
        worker.start()
        bodies = [png(image) for image in samples.make_images(16, seed=5, size=args.size)]
        sent: dict[str, float] = {}

        def publish(frame_id: str, i: int) -> None:
            sent[frame_id] = time.monotonic()
            channel.basic_publish(f"{prefix}.captures", f"{LINE}.{CAMERA}", bodies[i % len(bodies)],
                                  pika.BasicProperties(content_type="image/png", message_id=frame_id))

        def wait_for(ids: list[str], timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not all(
                    i in receipts.at[p] for p in ("amqp", "mqtt", "opcua") for i in ids):
                time.sleep(0.05)

        try:
            for i in range(8):  # warm-up
                publish(f"warm-{i}", i)
            wait_for([f"warm-{i}" for i in range(8)], 60)
            start = time.monotonic()
            for i in range(args.backlog):
                publish(f"sat-{i}", i)
            wait_for([f"sat-{i}" for i in range(args.backlog)], 300)
            saturation = args.backlog / (max(receipts.at["amqp"].get(f"sat-{i}", start)
                                             for i in range(args.backlog)) - start)
            rate = saturation / 2
            start = time.monotonic()
            for i in range(args.frames):
                target = start + i / rate
                time.sleep(max(0.0, target - time.monotonic()))
                publish(f"half-{i}", i)
            ids = [f"half-{i}" for i in range(args.frames)]
            wait_for(ids, 120)
        finally:
            worker.stop(grace_s=5)
            stop.set()
            opcua.stop_flag.set()
            mqtt.loop_stop()
            with contextlib.suppress(Exception):
                channel.exchange_unbind(destination="amq.topic", source=f"{prefix}.results", routing_key="#")
                for exchange in EXCHANGES:
                    channel.exchange_delete(f"{prefix}.{exchange}")
                for queue in (f"{prefix}.q", f"{prefix}.dead"):
                    channel.queue_delete(queue)
                connection.close()
        report = {"frame": f"{args.size}x{args.size} PNG", "saturation_fps": round(saturation, 1),
                  "half_load_fps": round(rate, 1), "opcua_publishing_interval_ms": args.opcua_interval_ms,
                  "paths": {path_name: quantiles([receipts.at[path_name][i] - sent[i] for i in ids
                                                  if i in receipts.at[path_name]])
                            for path_name in ("amqp", "mqtt", "opcua")},
                  # what each path adds to the baseline, frame by frame: the part the load on the machine
                  # (the worker's queueing and scoring) does not hide
                  "over_amqp": {path_name: quantiles([receipts.at[path_name][i] - receipts.at["amqp"][i] for i in ids
                                                      if i in receipts.at[path_name] and i in receipts.at["amqp"]])
                                for path_name in ("mqtt", "opcua")}}
    finally:
        if bridge is not None and bridge.poll() is None:
            bridge.send_signal(signal.SIGTERM)
            bridge.wait(20)
        if node is not None:
            node.stop()
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['frame']}: saturation {report['saturation_fps']} frames/s, half load {report['half_load_fps']} "
          f"frames/s, OPC UA publishing interval {args.opcua_interval_ms:g} ms")
    names = {"amqp": "results queue (AMQP, baseline)", "mqtt": "MQTT subscriber (QoS 1)",
             "opcua": "OPC UA subscription (FrameId)"}
    print(f"{'camera publish to':<34}{'frames':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for key, figures in report["paths"].items():
        if figures["n"]:
            print(f"{names[key]:<34}{figures['n']:>7}{figures['p50_ms']:>9.1f}{figures['p99_ms']:>9.1f}"
                  f"{figures['max_ms']:>9.1f}")
        else:
            print(f"{names[key]:<34}{0:>7}  (none arrived)")
    for key, figures in report["over_amqp"].items():
        if figures["n"]:
            print(f"{'  ' + key + ' after the AMQP baseline':<34}{figures['n']:>7}{figures['p50_ms']:>9.1f}"
                  f"{figures['p99_ms']:>9.1f}{figures['max_ms']:>9.1f}")
    missing = {k: args.frames - v["n"] for k, v in report["paths"].items() if v["n"] < args.frames}
    if missing:
        print(f"missing: {missing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
