"""A routine broker alarm never stops inspection, against the real RabbitMQ.

A disk alarm blocks every publishing connection; the worker's results then wait for confirms that
cannot come, and pika closes its connection after `blocked_connection_timeout` (broker.connect_timeout_s
x 6). The captures it held are redelivered; the budget they held must be released with the connection,
or the worker stays paused over worker.max_inflight_bytes for good while /readyz says ready. Frames sent
before the alarm, during it (a camera blocked until it clears) and after are each answered, and the
in-flight frames and bytes come back to zero.

The alarm is raised with `rabbitmqctl set_disk_free_limit` above the free disk and always put back
(in a finally, and again when the module ends): other tests share this broker.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import defaultdict

import numpy as np
import pytest

from inspector import config
from inspector.tools import samples
from inspector.tools.refit import RefitOptions, run_refit
from inspector.worker.hooks import StageHooks
from tests.workerkit import scrape, worker_config

SIDE = 1024  # raw mono8 frames of 1 MiB
FRAME_BYTES = SIDE * SIDE
PREFETCH = 8
BUDGET = 6 * FRAME_BYTES  # what one connection's held results (PREFETCH frames) leak is over 3/4 of it
CONNECT_TIMEOUT_S = 1.0
BLOCKED_S = CONNECT_TIMEOUT_S * 6  # blocked_connection_timeout (inspector.broker): the alarm outlasts it
NULL_MODEL = '[models.default]\nplugin = "null"\n[plugins.null]\nprobability = 0.25\n'
FALLBACK_LIMIT = "50MB"


def _rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True,
                          timeout=60).stdout


def _disk() -> dict:
    status = json.loads(_rabbitmqctl("status", "--formatter", "json"))
    return {"free": int(status["disk_free"]), "limit": int(status["disk_free_limit"]),
            "alarms": status.get("alarms") or []}


@pytest.fixture(scope="module")
def disk_limit():
    """The broker's own disk limit, put back when the module ends whatever happened (a limit above the
    free disk, left by a run that was killed, becomes 50 MB)."""
    disk = _disk()
    normal = str(disk["limit"]) if disk["limit"] < disk["free"] else FALLBACK_LIMIT
    yield normal
    _rabbitmqctl("set_disk_free_limit", normal)


@pytest.fixture(scope="module")
def null_store(tmp_path_factory):
    """A store with a null-plugin version of `default`: scoring costs nothing, so the test is the broker's."""
    root = tmp_path_factory.mktemp("null-store")
    samples.write_folder(root / "archive", 4, size=32)
    settings = config.load(worker_config(root, root / "models", "unused", NULL_MODEL))
    run_refit(settings, RefitOptions(data=root / "archive" / "good", model="default", calibrate=False,
                                     held_out_share=0.0, announce=False))
    return root / "models"


def raw_frame(frame_id: str) -> tuple[str, bytes, dict]:
    body = np.full(FRAME_BYTES, len(frame_id) % 256, np.uint8).tobytes()
    return ("line1.cam1", body, {"content_type": "image/x-raw", "message_id": frame_id,
                                 "headers": {"width": SIDE, "height": SIDE, "pixel_format": "mono8"}})


def answers(line, ids: set[str], timeout: float) -> dict[str, list[dict]]:
    """Every result that comes for `ids` by `timeout`, by frame id."""
    got: dict[str, list[dict]] = defaultdict(list)
    deadline = time.monotonic() + timeout
    while not ids <= set(got) and time.monotonic() < deadline:
        for _key, _props, body in line.collect(len(ids - set(got)), timeout=deadline - time.monotonic()):
            got[body["frame_id"]].append(body)
    return got


def reconnects(port: int) -> float:
    return scrape(port)[("inspector_broker_reconnects_total", ())]


def held(port: int) -> tuple[float, float]:
    m = scrape(port)
    return m[("inspector_inflight_frames", ())], m[("inspector_inflight_bytes", ())]


def test_a_disk_alarm_longer_than_the_blocked_timeout_loses_no_frame_and_no_budget(
        null_store, disk_limit, line, start):
    text = NULL_MODEL + f"[broker]\nconnect_timeout_s = {CONNECT_TIMEOUT_S}\n"
    alarm_on = threading.Event()

    class ScoreOnceAlarmed(StageHooks):  # the first captures are held until the alarm is on, so their results meet it
        def begin(self, stage: str) -> None:
            if stage == "score":
                alarm_on.wait(timeout=60)

    running = start(null_store, text, hooks=ScoreOnceAlarmed(), prefetch=PREFETCH, batch_size=1,
                    max_inflight_bytes=BUDGET, decode_threads=2)
    port = running.metrics.serve()
    before = [raw_frame(f"before-{i}") for i in range(24)]
    during = [raw_frame(f"during-{i}") for i in range(4)]
    after = [raw_frame(f"after-{i}") for i in range(8)]
    line.publish(before)

    def publish_during() -> None:  # a camera meeting the alarm: blocked until it is over, then taken
        line.publish(during)

    camera = threading.Thread(target=publish_during, daemon=True)
    try:
        _rabbitmqctl("set_disk_free_limit", str(_disk()["free"] + 10 * 1024**3))
        assert _disk()["alarms"], "raising the disk limit above the free disk raised no alarm"
        alarm_on.set()
        camera.start()
        deadline = time.monotonic() + BLOCKED_S + 15
        while reconnects(port) < 1 and time.monotonic() < deadline:  # closed by pika, and opened again under
            time.sleep(0.1)                                            # the alarm: its captures redelivered
        assert reconnects(port) >= 1, \
            f"the worker's connection was not closed within {BLOCKED_S + 15:g} s of the alarm (blocked timeout)"
    finally:
        alarm_on.set()
        _rabbitmqctl("set_disk_free_limit", disk_limit)
    camera.join(timeout=30)
    assert not camera.is_alive(), "the camera's publishes were not taken after the alarm"
    line.publish(after)

    ids = {props["message_id"] for _, _, props in before + during + after}
    got = answers(line, ids, timeout=30)
    missing = sorted(ids - set(got))
    assert not missing, (f"{len(missing)} of {len(ids)} frames unanswered ({missing[:5]}...); held now: "
                         f"{held(port)} (frames, bytes)")
    for frame_id, bodies in got.items():
        assert [b["verdict"] for b in bodies] == ["pass"] * len(bodies), frame_id
        assert all(b["redelivered"] for b in bodies[1:]), f"{frame_id} answered twice, the second not redelivered"
    deadline = time.monotonic() + 10
    while held(port) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert held(port) == (0, 0)
