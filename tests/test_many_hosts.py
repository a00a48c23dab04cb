"""Beyond one box, against real servers: the worker and the tools fail over between the nodes of
`broker.url`, and workers on an s3:// store take up a version refitted elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pytest

from inspector import config
from inspector.tools import samples
from inspector.tools.publish import PublishOptions, publish
from inspector.worker.loop import Worker
from tests.portkit import free_ports
from tests.workerkit import SIZE, Line, SecondBroker, encoded, worker_config

GOOD = encoded(samples.make_images(1, seed=13, size=SIZE)[0], "PNG")



@pytest.fixture
def second_broker():
    # Not under pytest's tmp_path: that is private to root, and the node runs as the rabbitmq user.
    folder = Path(tempfile.mkdtemp(prefix="inspector-rabbit-"))
    folder.chmod(0o755)
    broker = SecondBroker(folder, free_ports(1)[0])
    try:
        broker.start()
    except Exception as exc:  # noqa: BLE001 - the reason it cannot run here is the skip's reason
        broker.stop()
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"a second RabbitMQ node could not start: {exc}")
    yield broker
    broker.stop()
    shutil.rmtree(folder, ignore_errors=True)


def frames(tag: str, count: int) -> list[tuple[str, bytes, dict]]:
    return [("line1.cam1", GOOD, {"content_type": "image/png", "message_id": f"{tag}-{i}"}) for i in range(count)]


def test_the_worker_fails_over_to_the_next_node_and_serves_there(fitted, prefix, tmp_path, second_broker):
    text = f'[broker]\nurl = ["{second_broker.url}", "amqp://guest@127.0.0.1:5672/%2F"]\n'
    path = worker_config(tmp_path, fitted, prefix, text, reconnect_max_s=2.0)
    first, main = Line(prefix, port=second_broker.port), Line(prefix)
    running = Worker(config.load(path))
    running.start()
    try:
        first.publish(frames("before", 5))
        assert sorted(b["frame_id"] for _, _, b in first.collect(5)) == sorted(f"before-{i}" for i in range(5))
        second_broker.stop()  # the node the worker is on goes away
        deadline = time.monotonic() + 60
        while running.consumer.generation < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert running.consumer.generation == 2, "the worker did not reconnect to the other node"
        main.publish(frames("after", 5))
        assert sorted(b["frame_id"] for _, _, b in main.collect(5)) == sorted(f"after-{i}" for i in range(5))
    finally:
        running.stop(grace_s=5)
        main.delete()


def test_the_tools_take_the_first_node_that_answers(fitted, prefix, tmp_path):
    dead = f"amqp://guest@127.0.0.1:{free_ports(1)[0]}/%2F"
    path = worker_config(tmp_path, fitted, prefix, f'[broker]\nurl = ["{dead}", "amqp://guest@127.0.0.1:5672/%2F"]\n')
    settings = config.load(path)
    assert settings.broker.shown == f"amqp://127.0.0.1:{dead.split(':')[2]}, amqp://127.0.0.1:5672/%2F"
    line = Line(prefix)
    try:
        with line._channel() as channel:  # a queue on the captures exchange, as a worker would bind
            channel.queue_declare(f"{prefix}.q", durable=True, arguments={"x-queue-type": "quorum"})
            channel.queue_bind(f"{prefix}.q", line.exchanges["captures"], routing_key="#")
        image = tmp_path / "part.png"
        image.write_bytes(GOOD)
        summary = publish(settings, PublishOptions(images=[str(image)], camera="cam1", line="line1"))
        assert summary.sent == 1 and line.queue_depth() == 1
    finally:
        line.delete()


@pytest.mark.slow
def test_three_workers_on_an_s3_store_share_the_line_take_up_a_refit_and_survive_a_kill(
        fitted, prefix, tmp_path, s3_server, s3_bucket, s3_prefix):
    """The plant's picture on one machine: three worker processes on one queue and one S3 store; two
    cameras stream; a refit on another process mid-stream reaches all three within the poll interval;
    one worker is SIGKILLed mid-stream. Every frame is answered, none twice unless marked redelivered."""
    from inspector.stores import open_store
    from inspector.tools.bench.fleet import WorkerProcess
    from tests.workerkit import scrape

    environment = s3_server.environment()
    url = f"s3://{s3_bucket}/{s3_prefix}"
    refit_config = worker_config(tmp_path, url, prefix)
    archive = tmp_path / "archive"
    samples.write_folder(archive, 60, size=SIZE)
    refit = [sys.executable, "-m", "inspector.cli", "refit", "--data", str(archive / "good"), "--config",
             str(refit_config), "--no-calibrate"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
    host = {**clean, **environment, "INSPECTOR_STORE__CACHE_DIR": str(tmp_path / "refit-cache")}
    first = subprocess.run(refit + ["--no-announce"], env=host, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    store = open_store(config.load(refit_config).store)
    version_1 = store.current("default")

    fleet = []  # three hosts: each worker has a cache of its own
    path = worker_config(tmp_path, url, prefix, store_poll_s=3.0)
    for index in range(3):
        own = {**environment, "INSPECTOR_STORE__CACHE_DIR": str(tmp_path / f"cache{index}")}
        fleet.append(WorkerProcess(path, own, cwd=tmp_path))
    line = Line(prefix)
    try:
        for worker in fleet:
            worker.wait_ready()
        sent = []

        def stream(count: int, start: int) -> None:
            batch = [(f"line1.cam{i % 2 + 1}", GOOD, {"content_type": "image/png", "message_id": f"f-{i:05d}"})
                     for i in range(start, start + count)]
            for offset in range(0, len(batch), 10):
                line.publish(batch[offset:offset + 10])
                time.sleep(0.2)
            sent.extend(b[2]["message_id"] for b in batch)

        stream(60, 0)
        second = subprocess.run(refit, env=host, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stdout + second.stderr
        version_2 = store.current("default")
        assert version_2 != version_1
        stream(30, 60)
        fleet[2].kill()  # mid-stream: what it held goes back to the queue
        stream(60, 90)
        results = line.collect(len(sent), timeout=300)
        answers = defaultdict(list)
        for _, _, body in results:
            answers[body["frame_id"]].append(body["redelivered"])
        assert set(answers) == set(sent), sorted(set(sent) - set(answers))[:10]
        for frame_id, redelivered in answers.items():  # a repeat answers a redelivery, and says so
            assert sum(redelivered) >= len(redelivered) - 1, (frame_id, redelivered)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            served = [scrape(w.metrics_port) for w in fleet[:2]]
            if all(s.get(("inspector_model_info", (("model", "default"), ("plugin", "dfkde"),
                                                   ("version", version_2)))) == 1 for s in served):
                break
            time.sleep(0.5)
        else:
            pytest.fail("a surviving worker did not take up the refitted version")
        late = [body for _, _, body in results if body["frame_id"] >= "f-00120"]
        assert late and all(body["model"]["version"] == version_2 for body in late)
        answered = [sum(v for (name, _), v in scrape(w.metrics_port).items() if name == "inspector_frames_total")
                    for w in fleet[:2]]
        assert all(count > 0 for count in answered), answered
    finally:
        for worker in fleet:
            worker.stop()
        line.delete()


def copy_version_to(s3, local_store_path: Path, name: str = "default") -> str:
    """The local store's current version of `name`, written to `s3` as a new version (new id, same state)."""
    from inspector.stores import ModelStore

    local = ModelStore(local_store_path).load_path(name)
    reserved = {"schema", "name", "version", "created_at", "files", "sizes", "checksum"}
    manifest = {k: v for k, v in local.manifest.items() if k not in reserved}

    def save(folder: Path) -> list[str]:
        for file in local.manifest["files"]:
            shutil.copyfile(local.path / file, folder / file)
        return list(local.manifest["files"])

    return s3.write(name, save, manifest).version


def test_a_worker_on_an_s3_store_takes_up_an_announced_version(fitted, prefix, tmp_path, s3_bucket, s3_prefix):
    from inspector.broker import announcement
    from inspector.stores import S3ModelStore

    url = f"s3://{s3_bucket}/{s3_prefix}"
    writer = S3ModelStore(url, tmp_path / "writer-cache")
    first = copy_version_to(writer, fitted)
    path = worker_config(tmp_path, url, prefix, store_poll_s=0.0)  # announcements only: no poll to hide behind
    line = Line(prefix)
    running = Worker(config.load(path))
    running.start()
    try:
        line.publish(frames("one", 1))
        assert [b["model"]["version"] for _, _, b in line.collect(1)] == [first]
        time.sleep(1.1)  # the same state again: its id differs only by the second it was written in
        second = copy_version_to(writer, fitted)
        line.announce(announcement("default", second, "dfkde", "refit"))
        deadline = time.monotonic() + 30
        while running.models.get("default").version != second and time.monotonic() < deadline:
            time.sleep(0.2)
        line.publish(frames("two", 1))
        assert [b["model"]["version"] for _, _, b in line.collect(1)] == [second]
        assert (Path(running.store.cache.root) / "default" / "versions" / second).is_dir()
    finally:
        running.stop(grace_s=5)
        line.delete()
