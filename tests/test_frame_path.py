"""The broker thread's reading and writing, made cheaper per frame (worker/pikaconnection.py), against pika's own
frame codec as the reference; and large captures through a real worker and RabbitMQ, byte for byte."""

from __future__ import annotations

import random
from datetime import datetime, timezone

import pika
import pytest
from pika import frame, spec
from pika.adapters.select_connection import IOLoop

from inspector import config
from inspector.messages import frame_id_for
from inspector.stores import ModelStore
from inspector.tools import samples
from inspector.tools.refit import RefitOptions, run_refit
from inspector.worker.pikaconnection import TolerantConnection
from tests.workerkit import worker_config

BODY_MAX = 131072 - 8  # pika's body frame payload at RabbitMQ's default frame_max


def _stream(seed: int) -> tuple[bytes, list[bytes]]:
    """Deliveries as RabbitMQ sends them (method, content header, body frames; heartbeats between), and each
    frame marshalled on its own: the reference."""
    rng = random.Random(seed)
    frames: list[bytes] = []
    for tag in range(1, 9):
        size = rng.choice([0, 17, 4096, 70_000, BODY_MAX, BODY_MAX + 1, 600_000])
        body = rng.randbytes(size)
        properties = spec.BasicProperties(content_type="image/x-raw", message_id=f"m{tag}",
                                          headers={"width": 1, "captured_at": "2026-12-01T10:00:00Z"})
        frames.append(frame.Method(1, spec.Basic.Deliver("ctag", tag, False, "ex", "line1.cam1")).marshal())
        frames.append(frame.Header(1, size, properties).marshal())
        for start in range(0, size, BODY_MAX):
            frames.append(frame.Body(1, body[start:start + BODY_MAX]).marshal())
        if rng.random() < 0.5:
            frames.append(frame.Heartbeat().marshal())
    return b"".join(frames), frames


@pytest.fixture
def reader():
    """A TolerantConnection never connected (its IOLoop never runs), and the frames it hands to pika's frame
    processing, each marshalled again for comparison."""
    loop = IOLoop()
    connection = TolerantConnection(pika.ConnectionParameters("127.0.0.1", 1), custom_ioloop=loop)
    seen: list[bytes] = []
    connection._process_frame = lambda value: seen.append(value.marshal())
    yield connection, seen
    loop.close()


def _parsed_in_reads(reader, data: bytes, reads: list[int]) -> list[bytes]:
    """The frames parsed when `data` arrives in reads of these sizes."""
    connection, seen = reader
    at = 0
    for size in reads:
        connection._on_data_available(data[at:at + size])
        at += size
    assert at >= len(data)
    assert connection._frame_buffer == b"" and connection._reads == []
    return seen


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("read", ["tiny", "pika", "large", "random"])
def test_frames_read_in_any_pieces_are_the_frames_pika_would_parse(reader, seed, read):
    data, reference = _stream(seed)
    rng = random.Random(seed * 7 + 1)
    chooser = {"tiny": lambda: rng.randint(1, 9), "pika": lambda: 4096, "large": lambda: 256 * 1024,
               "random": lambda: rng.randint(1, 300_000)}[read]
    reads: list[int] = []
    total = 0
    while total < len(data):
        reads.append(chooser())
        total += reads[-1]
    assert _parsed_in_reads(reader, data, reads) == reference


def test_a_partial_frame_is_kept_aside_until_the_bytes_it_lacks_arrive(reader):
    connection, seen = reader
    body = bytes(range(256)) * 1000  # two body frames
    frames = [frame.Method(1, spec.Basic.Deliver("ctag", 1, False, "ex", "a.b")).marshal(),
              frame.Header(1, len(body), spec.BasicProperties()).marshal(),
              frame.Body(1, body[:BODY_MAX]).marshal(), frame.Body(1, body[BODY_MAX:]).marshal()]
    data = b"".join(frames)
    head = len(frames[0]) + len(frames[1]) + 100  # the method, the header and 100 bytes of the first body frame
    connection._on_data_available(data[:head])
    assert seen == frames[:2] and connection._awaited == len(frames[2]) - 100
    connection._on_data_available(data[head:head + len(frames[2]) - 101])  # one byte short
    assert seen == frames[:2] and len(connection._frame_buffer) == 100  # not yet handed to pika
    connection._on_data_available(data[head + len(frames[2]) - 101:])
    assert seen == frames and connection._frame_buffer == b""


def test_large_captures_reach_the_worker_byte_for_byte(tmp_path, line, start, prefix):
    """Raw frames of 1 MiB (nine body frames each) among small ones, no message ids: the worker derives each
    frame id from a hash of the body it received, so an id equal to the one computed here from the body sent
    proves every byte arrived."""
    samples.write_folder(tmp_path / "archive", 2, size=64)
    models = tmp_path / "models"
    text = '[models.default]\nplugin = "null"\n'
    settings = config.load(worker_config(tmp_path, models, prefix, text))
    run_refit(settings, RefitOptions(data=tmp_path / "archive" / "good", model="default", calibrate=False,
                                     held_out_share=0.0, announce=False))
    assert ModelStore(models).current("default") is not None
    start(models, text)

    rng = random.Random(5)
    frames, expected = [], set()
    for i in range(12):
        side = 1024 if i % 3 else 16
        body = rng.randbytes(side * side)
        stamp = datetime(2026, 12, 1, 10, 0, i, tzinfo=timezone.utc).isoformat().replace("+00:00", "Z")
        headers = {"width": side, "height": side, "pixel_format": "mono8", "captured_at": stamp}
        properties = pika.BasicProperties(content_type="image/x-raw", headers=headers)
        frames.append((f"line1.cam{i}", body, {"content_type": "image/x-raw", "headers": headers}))
        expected.add(frame_id_for(body, f"line1.cam{i}", properties))
    line.publish(frames)
    results = line.collect(len(frames))
    assert {body["frame_id"] for _key, _props, body in results} == expected
    assert all(body["verdict"] == "pass" for _key, _props, body in results)
