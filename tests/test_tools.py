"""`inspector publish` and `inspector watch` as an operator runs them: real subprocesses against the real
RabbitMQ and an in-process worker, on exchanges and queues of each test's own."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pika
import pytest
import scipy.stats

from inspector import config
from inspector.tools import samples
from inspector.worker.loop import Worker
from tests.workerkit import SIZE, fit_store, names, worker_config

ROOT = Path(__file__).resolve().parents[1]
RANDOM_BACKBONE = {"backbone": "resnet18", "weights": "none", "layers": ["layer3"], "precision": "fp32"}
SUMMARY = re.compile(r"sent (\d+) frames, (\d+) bytes in ([\d.]+) s")
ANSI = re.compile(r"\x1b\[")


def environment(**extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_") and k != "NO_COLOR"}
    return environ | extra


def cli(config_path: Path, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inspector.cli", *args, "--config", str(config_path)], cwd=ROOT,
                          env=environment(**(env or {})), capture_output=True, text=True, timeout=timeout,
                          check=False)


def publisher(config_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "inspector.cli", "publish", *args, "--config", str(config_path)],
                            cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def sent(result: subprocess.CompletedProcess) -> tuple[int, int, float]:
    """(frames, bytes, seconds) from publish's summary."""
    match = SUMMARY.search(result.stdout)
    assert match, (result.stdout, result.stderr)
    return int(match[1]), int(match[2]), float(match[3])


class Watch:
    """`inspector watch` running as a subprocess; started() returns once its queue is bound."""

    def __init__(self, config_path: Path, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "inspector.cli", "watch", *args, "--config", str(config_path)], cwd=ROOT,
            env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.bound = threading.Event()
        self._readers = [threading.Thread(target=self._read, args=(self.process.stdout, self.stdout), daemon=True),
                         threading.Thread(target=self._read, args=(self.process.stderr, self.stderr), daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))
            if line.startswith("watching "):
                self.bound.set()

    def started(self, timeout: float = 60) -> Watch:
        deadline = time.monotonic() + timeout
        while not self.bound.wait(0.1):
            assert self.process.poll() is None, "\n".join(self.stderr)
            assert time.monotonic() < deadline, "watch did not bind its queue in time"
        return self

    def finish(self, timeout: float = 90) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        for reader in self._readers:
            reader.join(5)
        return code

    def results(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout]


@pytest.fixture(scope="module")
def random_fitted(tmp_path_factory) -> Path:
    """A store on a random-weight ResNet-18's layer3: what ranks the synthetic defects first at 128 px. Without
    localisation maps, their own pass the larger part of the fit: publish and watch carry scores, not maps."""
    return fit_store(tmp_path_factory.mktemp("random"), plugin={**RANDOM_BACKBONE, "localisation_maps": False})


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def _channel():
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
    return connection, connection.channel()


def _delete(prefix: str) -> None:
    connection, channel = _channel()
    try:
        for queue in (f"{prefix}.q", f"{prefix}.dead", f"{prefix}.tap"):
            channel.queue_delete(queue)
        for exchange in names(prefix)["broker.exchanges"].values():
            channel.exchange_delete(exchange)
    finally:
        connection.close()


class Running:
    """A worker in this process and the config file that publish and watch are given."""

    def __init__(self, root: Path, store: Path, prefix: str, **worker: object) -> None:
        self.config = worker_config(root, store, prefix, **worker)
        self.worker = Worker(config.load(self.config))
        self.worker.start()


@pytest.fixture
def worker(tmp_path, prefix):
    """worker(store, **worker settings) -> Running; stopped and its exchanges deleted at teardown."""
    started: list[Running] = []

    def _start(store: Path, **settings: object) -> Running:
        started.append(Running(tmp_path, store, prefix, **settings))
        return started[-1]

    yield _start
    for running in started:
        running.worker.stop(grace_s=5)
    _delete(prefix)


@pytest.fixture
def sample_line(tmp_path) -> Path:
    """The sample line's test set: 8 good frames and 2 of each of the 5 defect kinds."""
    samples.write_line(tmp_path / "line", train=0, test=8, defective_per_kind=2, size=SIZE)
    return tmp_path / "line" / "test"


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


# -- round trips: every way of sending comes back, once per file ------------------------------------


def test_encoded_raw_and_by_reference_frames_each_come_back_once(fitted, worker, sample_line):
    files = _files(sample_line)
    assert len(files) == 18
    running = worker(fitted, allowed_roots=[str(sample_line.parent)])
    watch = Watch(running.config, "--json", "--count", str(3 * len(files))).started()
    ways = {"enc": [], "raw": ["--raw"], "ref": ["--by-reference"]}
    publishers = [publisher(running.config, "--images", str(sample_line), "--line", "L7", "--camera", camera, *flags)
                  for camera, flags in ways.items()]  # side by side: each start costs seconds of imports
    for process in publishers:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        assert int(SUMMARY.search(stdout)[1]) == len(files)
    assert watch.finish() == 0, watch.stderr
    results = watch.results()
    assert len({r["frame_id"] for r in results}) == len(results) == 3 * len(files)

    probability: dict[tuple[str, str], float] = {}
    for camera in ways:
        mine = [r for r in results if r["camera_id"] == camera]
        assert sorted(r["meta"]["source"] for r in mine) == files, camera  # each file exactly once
        for r in mine:
            assert r["line_id"] == "L7" and r["verdict"] in ("pass", "fail"), r
            assert r["frame_id"].startswith(f"{camera}-") and r["captured_at"].endswith("Z")
            probability[camera, r["meta"]["source"]] = r["anomaly_probability"]
    for name in files:  # PNG is lossless: the same pixels however they were sent
        assert probability["raw", name] == pytest.approx(probability["enc", name], abs=1e-4), name
        assert probability["ref", name] == pytest.approx(probability["enc", name], abs=1e-4), name
    assert watch.stderr[-1] == f"watched {len(results)} results: " + ", ".join(
        f"{v} {sum(r['verdict'] == v for r in results)}" for v in ("pass", "fail", "error"))


# -- defects rank first; the filter and the text format --------------------------------------------


@pytest.fixture(scope="module")
def scored_line(random_fitted, tmp_path_factory):
    """20 good and 4 of each defect kind published through a worker on the random-backbone store,
    watched twice: every result as JSON, and `--filter fail.#` as text."""
    root = tmp_path_factory.mktemp("scored")
    prefix = f"t{uuid.uuid4().hex[:10]}"
    samples.write_line(root / "line", train=0, test=20, defective_per_kind=4, size=SIZE)
    running = Running(root, random_fitted, prefix)
    try:
        everything = Watch(running.config, "--json", "--count", "40")
        fails = Watch(running.config, "--filter", "fail.#")
        everything.started(), fails.started()
        published = cli(running.config, "publish", "--images", str(root / "line" / "test"))
        assert published.returncode == 0, published.stderr
        assert everything.finish() == 0, everything.stderr
        failed = sum(r["verdict"] == "fail" for r in everything.results())
        deadline = time.monotonic() + 10
        while len(fails.stdout) < failed and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # room for a line too many to show up
        fails.process.send_signal(signal.SIGINT)
        assert fails.finish() == 130, fails.stderr
    finally:
        running.worker.stop(grace_s=5)
        _delete(prefix)
    return everything, fails


def test_defective_frames_rank_above_good_ones(scored_line):
    results = scored_line[0].results()
    assert len(results) == 40
    good = [r["anomaly_probability"] for r in results if r["meta"]["source"].startswith("good/")]
    defective = [r["anomaly_probability"] for r in results if not r["meta"]["source"].startswith("good/")]
    assert (len(good), len(defective)) == (20, 20)
    u = scipy.stats.mannwhitneyu(defective, good, alternative="greater").statistic
    assert u / (len(good) * len(defective)) >= 0.9


def test_fail_filter_sees_exactly_the_fails_as_plain_text_lines(scored_line):
    everything, fails = scored_line
    failed = {r["frame_id"]: r for r in everything.results() if r["verdict"] == "fail"}
    assert failed, "no frame failed: nothing to filter"
    assert len(fails.stdout) == len(failed)
    for text in fails.stdout:
        assert not ANSI.search(text)  # piped: no colour
        fields = text.split()
        assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}", fields[0])
        r = failed[fields[6]]
        assert fields[1:7] == [r["line_id"], r["camera_id"], "fail", f"{r['anomaly_probability']:.3f}",
                               r["model"]["version"], r["frame_id"]]
        assert fields[7] == r["meta"]["source"]
    assert fails.stderr[-1] == f"watched {len(failed)} results: pass 0, fail {len(failed)}, error 0"


@pytest.fixture
def cleanup(prefix):
    yield
    _delete(prefix)


def test_watch_warns_of_a_malformed_body_and_stops_after_the_timeout(tmp_path, prefix, cleanup):
    config_path = worker_config(tmp_path, tmp_path / "models", prefix)
    results = names(prefix)["broker.exchanges"]["results"]
    watch = Watch(config_path, "--timeout", "1.5").started()
    connection, channel = _channel()
    try:
        body = {"schema": "inspection.result/1", "frame_id": "f-1", "line_id": "line1", "camera_id": "cam3",
                "verdict": "error", "anomaly_probability": None, "model": None,
                "inspected_at": "2026-11-28T10:15:01.162Z", "error": {"code": "image_undecodable", "message": "x"},
                "meta": {}}
        channel.basic_publish(results, "error.line1.cam3", b"not json at all")
        channel.basic_publish(results, "error.line1.cam3", json.dumps(body).encode())
    finally:
        connection.close()
        started = time.monotonic()
    assert watch.finish() == 0
    assert time.monotonic() - started < 10
    assert any("warning: malformed result on error.line1.cam3: not JSON" in line for line in watch.stderr)
    assert len(watch.stdout) == 1 and watch.stdout[0].split()[1:5] == ["line1", "cam3", "error", "image_undecodable"]
    assert watch.stderr[-1] == "watched 1 results: pass 0, fail 0, error 1, malformed 1"


# -- pacing, counting, the capture's properties, Ctrl-C -------------------------------------------


@pytest.fixture
def tap(tmp_path, prefix):
    """(config, queue) with the test's captures exchange bound to a queue of its own, and no worker."""
    config_path = worker_config(tmp_path, tmp_path / "models", prefix)
    queue = f"{prefix}.tap"
    connection, channel = _channel()
    channel.exchange_declare(names(prefix)["broker.exchanges"]["captures"], exchange_type="topic", durable=True)
    channel.queue_declare(queue)
    channel.queue_bind(queue, names(prefix)["broker.exchanges"]["captures"], routing_key="#")
    connection.close()
    yield config_path, queue
    _delete(prefix)


def _drain(queue: str) -> list[tuple]:
    connection, channel = _channel()
    got = []
    try:
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return got
            got.append((method.routing_key, properties, body))
    finally:
        connection.close()


def test_rate_loop_and_count_and_what_a_capture_carries(tap, sample_line, run_cli, caplog):
    config_path, queue = tap
    good = sample_line / "good"
    paced = cli(config_path, "publish", "--images", str(good), "--loop", "--rate", "20", "--count", "30",
                "--camera", "cam3", "--model", "housing")
    assert paced.returncode == 0, paced.stderr
    frames, size, seconds = sent(paced)
    assert frames == 30 and 1.2 <= seconds <= 3.0  # 29 intervals of 50 ms
    captures = _drain(queue)
    assert len(captures) == 30 and size == sum(len(body) for *_, body in captures)
    key, props, body = captures[9]
    assert key == "line1.cam3" and props.content_type == "image/png" and props.delivery_mode == 2
    assert re.fullmatch(r"cam3-[0-9a-f]{8}-000009", props.message_id)
    assert len({p.message_id for _, p, _ in captures}) == 30
    headers = props.headers
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", headers["captured_at"])
    assert abs(props.timestamp - time.time()) < 60
    assert (headers["camera_id"], headers["line_id"], headers["model"]) == ("cam3", "line1", "housing")
    assert headers["source"] == "001.png" and body == (good / "001.png").read_bytes()  # 8 files: the 10th is 001

    (sample_line.parent / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code, out, _ = run_cli(config_path, "publish", "--images", str(sample_line / "*" / "00[01].png"),
                           str(sample_line.parent / "broken.png"), "--loop", "--count", "25", "--raw",
                           "--pixel-format", "mono8")
    assert code == 0 and "sent 25 frames" in out and "unreadable files skipped: 1" in out
    warned = [r.message for r in caplog.records if r.levelname == "WARNING" and "broken.png" in r.message]
    assert len(warned) == 1 and warned[0].startswith(f"skipping {sample_line.parent / 'broken.png'}: ")  # not per pass
    captures = _drain(queue)
    assert len(captures) == 25
    _, props, body = captures[0]
    assert props.content_type == "image/x-raw" and props.headers["source"] == "crack/000.png"  # relative to the glob
    assert (props.headers["width"], props.headers["height"], props.headers["pixel_format"]) == (SIZE, SIZE, "mono8")
    assert len(body) == SIZE * SIZE


def test_ctrl_c_stops_with_the_summary(tap, sample_line):
    config_path, queue = tap
    process = subprocess.Popen(
        [sys.executable, "-m", "inspector.cli", "publish", "--images", str(sample_line), "--loop", "--rate", "50",
         "--config", str(config_path)], cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    connection, channel = _channel()
    try:
        deadline = time.monotonic() + 60
        while channel.queue_declare(queue, passive=True).method.message_count < 10:
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.1)
    finally:
        connection.close()
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "(interrupted)" in stdout
    frames = int(SUMMARY.search(stdout)[1])
    assert frames >= 10 and len(_drain(queue)) in (frames, frames + 1)  # + the one in flight, unconfirmed


# -- operator mistakes: a message and an exit status, never a traceback ----------------------------


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """run_cli(config, *args, **env) -> (exit status, stdout, stderr) of the CLI run in this process:
    what an operator gets, without seconds of imports per run."""
    from inspector import cli

    def _run(config_path: Path, *args: str, **env: str) -> tuple[int, str, str]:
        for name in [k for k in os.environ if k.startswith("INSPECTOR_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        code = cli.main([*args, "--config", str(config_path)])
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def test_sources_are_named_relative_to_the_argument_they_came_from(tmp_path, sample_line):
    from inspector.errors import ConfigError
    from inspector.tools.publish import find_sources

    (sample_line / "good" / ".hidden.png").write_bytes(b"")
    (sample_line / "good" / "notes.txt").write_text("")
    found = find_sources([str(sample_line / "good" / "003.png"), str(sample_line / "hole"),
                          str(sample_line / "**" / "001.png")])
    assert [s.name for s in found] == ["003.png", "000.png", "001.png", "crack/001.png", "good/001.png",
                                       "hole/001.png", "missing_corner/001.png", "scratch/001.png", "stain/001.png"]
    assert found[1].path == sample_line / "hole" / "000.png"
    with pytest.raises(ConfigError, match="no such file or folder"):
        find_sources([str(sample_line), str(tmp_path / "absent")])
    with pytest.raises(ConfigError, match="not an image file"):
        find_sources([str(sample_line / "good" / "notes.txt")])


def test_no_images_found_exits_2_naming_the_paths(tmp_path, run_cli):
    config_path = worker_config(tmp_path, tmp_path / "models", "unused")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    code, _, err = run_cli(config_path, "publish", "--images", str(tmp_path / "empty"), str(tmp_path / "none-*.png"))
    assert code == 2
    assert f"no image files (.bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp) in {tmp_path / 'empty'}, " in err
    assert str(tmp_path / "none-*.png") in err
    code, _, err = run_cli(config_path, "publish", "--images", str(tmp_path / "absent"))
    assert code == 2 and f"--images {tmp_path / 'absent'}: no such file or folder" in err


UNREACHABLE = {"INSPECTOR_BROKER__URL": "amqp://guest@127.0.0.1:5999/%2F", "INSPECTOR_BROKER__PASSWORD": "s3cret"}
REFUSED = "cannot connect to RabbitMQ at amqp://127.0.0.1:5999/%2F: Connection refused"


def test_unreachable_broker_exits_1_with_the_url_without_password(tmp_path, sample_line, run_cli):
    config_path = worker_config(tmp_path, tmp_path / "models", "unused")
    result = cli(config_path, "publish", "--images", str(sample_line), env=UNREACHABLE)  # pika's own logging too
    assert result.returncode == 1 and REFUSED in result.stderr
    assert "Traceback" not in result.stderr and "s3cret" not in result.stderr
    code, _, err = run_cli(config_path, "watch", "--count", "1", **UNREACHABLE)
    assert code == 1 and REFUSED in err and "s3cret" not in err


@pytest.mark.parametrize("exchange_exists", [False, True])
def test_publishing_before_any_worker_ran_says_to_start_one(tmp_path, sample_line, prefix, exchange_exists, run_cli):
    config_path = worker_config(tmp_path, tmp_path / "models", prefix)
    captures = names(prefix)["broker.exchanges"]["captures"]
    if exchange_exists:
        connection, channel = _channel()
        channel.exchange_declare(captures, exchange_type="topic", durable=True)
        connection.close()
    try:
        code, out, err = run_cli(config_path, "publish", "--images", str(sample_line))
    finally:
        _delete(prefix)
    assert code == 1 and out == ""
    if exchange_exists:
        assert (f"no queue is bound to {captures} for routing key line1.cam1: start `inspector run` once so it "
                "declares its queue") in err
    else:
        assert f"the exchange {captures} does not exist: start `inspector run` once" in err


def test_watch_prints_no_escape_sequence_or_forged_line_from_a_hostile_result():
    from inspector.tools.watch import format_line, parse_result

    hostile = {"verdict": "fail", "anomaly_probability": 0.9, "line_id": "l1\x1b[2J", "camera_id": "c\nFAKE pass",
               "frame_id": "f\r\u202e1" + "x" * 5000, "model": {"version": "v\x07"},
               "meta": {"source": "a\x1b]0;t\x07"},
               "inspected_at": "0001-01-01T00:00:00+01:00"}
    text = format_line(hostile, colour=False)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text and "\x07" not in text
    assert "\u202e" not in text and len(text.encode()) < 2000
    with pytest.raises(ValueError, match="not JSON"):
        parse_result(b"[" * 100_000)
