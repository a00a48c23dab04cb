"""The reject archive: what a real worker keeps (bytes as sent, the result as published, the map), what it
does not, and that nothing about it delays or fails a verdict; the path builder against hostile ids;
pruning by age and size, in a folder and on a real S3 server."""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from inspector import config
from inspector.config import EvidenceSettings, MetricsSettings
from inspector.errors import ConfigError, StoreUnavailable
from inspector.messages import FRAME_ID_MAX_BYTES, SOURCE_ID_MAX_BYTES, clean_id
from inspector.plugin import Explained, can_explain
from inspector.tools import samples
from inspector.worker.evidence import (
    Evidence,
    FolderArchive,
    S3Archive,
    frame_of,
    map_png,
    names_for,
    sampled,
)
from inspector.worker.loop import Worker
from inspector.worker.metrics import Metrics
from inspector.worker.watchdog import Watchdog
from tests.workerkit import SIZE, encoded, http_status, scrape, worker_config

UNDECODABLE = bytes(range(256)) * 8
RESULT_SCHEMA = Path(__file__).resolve().parents[1] / "docs" / "schemas" / "result.schema.json"


# -- the path builder ----------------------------------------------------------------------------

hostile = st.one_of(
    st.text(max_size=400),
    st.sampled_from(["..", ".", "/", "../../etc/passwd", "a/../../b", "\0", "a\0b", "-rf", ".hidden", "x.map",
                     "x.capture", "X.MAP", "x.map~1", "~", "é" * 300, "a" * 1000]),
    st.binary(max_size=300),
)


def frame_id_of(name: str) -> str:
    """The frame id a kept file's name was made from: its name without suffix and mark."""
    return re.sub(r"~[pef][0-9a-f]{8}$", "", frame_of(name))


def _components(names) -> list[str]:
    return [*names.folder.split("/"), names.image, names.result, names.map]


@settings(max_examples=300, deadline=None)
@given(line=hostile, camera=hostile, frame=hostile, date=st.text(max_size=20),
       content_type=st.one_of(st.none(), st.text(max_size=40), st.sampled_from(["image/png", "application/json"])))
def test_every_name_stays_one_harmless_component_inside_the_archive(line, camera, frame, date, content_type):
    root = Path("/archive/root")
    names = names_for(date, line, camera, frame, content_type)
    parts = _components(names)
    assert len(names.folder.split("/")) == 3
    for part in parts:
        assert part not in ("", ".", "..") and "/" not in part and "\0" not in part and "\\" not in part
        assert not part.startswith((".", "-")), part
        assert len(part.encode("utf-8", "surrogatepass")) <= 255, part
        part.encode("utf-8")  # no lone surrogate: a legal name on every file system and S3
    for name in (names.image, names.result, names.map):
        path = os.path.normpath(root / names.key(name))
        assert path.startswith(f"{root}/") and Path(path).parent.parent.parent.parent == root
    # the frame's files are recognised as one frame again (the pruner removes frames whole)
    assert len({frame_of(names.key(n)) for n in (names.image, names.result, names.map)}) == 1


@settings(max_examples=300, deadline=None)
@given(a=hostile, b=hostile, types=st.tuples(*[st.sampled_from(["image/png", "application/json", "image/x-raw",
                                                                 None, "image/jpeg"])] * 2))
def test_two_frames_never_share_a_file(a, b, types):
    first, second = (clean_id(f, FRAME_ID_MAX_BYTES, distinct=True) for f in (a, b))
    if first == second:
        return
    one = names_for("2026-12-01", "l", "c", first, types[0])
    two = names_for("2026-12-01", "l", "c", second, types[1])
    assert not {one.image, one.result, one.map} & {two.image, two.result, two.map}
    assert frame_of(one.key(one.image)) != frame_of(two.key(two.image))


def test_clean_ids_keep_their_names_and_the_content_type_chooses_the_extension():
    names = names_for("2026-12-01", "line1", "cam3", "f-000123", "image/jpeg; q=1")
    assert (names.folder, names.image, names.result, names.map) == (
        "2026-12-01/line1/cam3", "f-000123.jpg", "f-000123.json", "f-000123.map.png")
    assert names_for("2026-12-01", "l", "c", "f", "application/json").image == "f.capture.json"
    assert names_for("2026-12-01", "l", "c", "f", "text/plain").image == "f.bin"
    assert names_for("2026-12-01", "l", "c", "f", None).image == "f.bin"
    assert names_for("not a date", "l", "c", "f", None).folder == "0000-00-00/l/c"
    assert names_for("2026-12-01", "a" * 300, "c", "f", None).folder.split("/")[1] == clean_id("a" * 300,
                                                                                               SOURCE_ID_MAX_BYTES)


# -- pieces --------------------------------------------------------------------------------------


def test_a_map_is_a_16_bit_grey_png_at_the_images_size():
    rng = np.random.default_rng(0)
    values = rng.uniform(-0.2, 1.2, (37, 53)).astype(np.float32)
    values[0, 0] = np.nan
    with Image.open(io.BytesIO(map_png(values, (53, 37)))) as image:
        assert image.format == "PNG" and image.size == (53, 37) and image.mode.startswith("I;16")
        read = np.asarray(image).astype(np.int64)
    reference = np.rint(np.clip(np.nan_to_num(values.astype(np.float64)), 0, 1) * 65535)
    np.testing.assert_array_equal(read, reference)
    with pytest.raises(ValueError, match="37"):
        map_png(values, (37, 53))


def test_passes_are_sampled_by_frame_id_at_the_share_asked_for():
    ids = [f"frame-{i}" for i in range(20000)]
    for share in (0.0, 0.05, 0.5, 1.0):
        kept = sum(sampled(i, share) for i in ids)
        sigma = (len(ids) * share * (1 - share)) ** 0.5
        assert abs(kept - share * len(ids)) <= 5 * sigma + (0 if 0 < share < 1 else 0), share
    assert [sampled(i, 0.3) for i in ids[:100]] == [sampled(i, 0.3) for i in ids[:100]]


@pytest.mark.parametrize("table, key", [
    ('keep = ["fail", "fail"]', "evidence.keep"),
    ('keep = ["maybe"]', "evidence.keep"),
    ('keep = ["pass"]\npass_share = 0.2', "evidence.pass_share"),
    ('pass_share = 1.5', "evidence.pass_share"),
    ('path = "s3://No_Bucket/x"', "evidence.path"),
    ('path = ""', "evidence.path"),
    ('queue_size = 0', "evidence.queue_size"),
    ('retention_days = -1', "evidence.retention_days"),
    ('max_bytes = -5', "evidence.max_bytes"),
    ('colour = "red"', "evidence.colour"),
])
def test_a_bad_evidence_setting_names_its_key(tmp_path, table, key):
    path = tmp_path / "inspector.toml"
    path.write_text(f"[evidence]\n{table}\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert key in str(caught.value)


# -- the writer, the queue and the pruner without a broker ---------------------------------------


def _evidence(tmp_path: Path, archive=None, **values) -> tuple[Evidence, Metrics]:
    metrics = Metrics(MetricsSettings(port=0))
    settings = EvidenceSettings(enabled=True, path=str(tmp_path / "evidence"), **values)
    return Evidence(settings, metrics, archive=archive, prune_every_s=3600), metrics


def _capture(frame_id: str, content_type: str = "image/png"):
    from types import SimpleNamespace

    from inspector.messages import parse_capture

    return parse_capture("line1.cam1", SimpleNamespace(message_id=frame_id, content_type=content_type,
                                                       headers={}, timestamp=None), b"x", False)


def _value(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


class _Blocking:
    """An archive whose writes wait for `release`: a disk that has stopped answering."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.release = threading.Event()
        self.started = threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put(self, key, data, content_type):
        self.started.set()
        self.release.wait(60)
        self.inner.put(key, data, content_type)


class _Failing:
    def __init__(self, inner, error: Exception) -> None:
        self.inner, self.error = inner, error

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put(self, key, data, content_type):
        raise self.error


def test_a_full_queue_refuses_and_counts(tmp_path):
    archive = _Blocking(FolderArchive(tmp_path / "evidence"))
    evidence, metrics = _evidence(tmp_path, archive, queue_size=2)
    watchdog = Watchdog()
    evidence.watch(watchdog, limit_s=30)
    evidence.start()
    try:
        tickets = []
        for i in range(5):
            ticket = evidence.ticket(_capture(f"f{i}"), "fail", "2026-12-01T00:00:00.000Z", b"png")
            if ticket is not None:
                ticket.send(b"{}")
                tickets.append(ticket)
            if i == 0:
                assert archive.started.wait(5)  # the writer holds f0; the queue has room for two more
        assert len(tickets) == 3
        assert _value(metrics, "inspector_evidence_dropped_total", reason="queue_full") == 2
        assert _value(metrics, "inspector_evidence_queue_depth") == 2
        assert evidence.ticket(_capture("p"), "pass", "2026-12-01T00:00:00.000Z", b"png") is None  # not chosen
        assert watchdog.check() is None
        archive.release.set()
        assert evidence.flush(10)
        assert watchdog.check() is None
        assert _value(metrics, "inspector_evidence_kept_total", verdict="fail") == 3
    finally:
        archive.release.set()
        evidence.stop(5)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), RuntimeError("a bug in the archive")])
def test_a_failing_write_is_counted_and_the_writer_lives_on(tmp_path, error):
    archive = _Failing(FolderArchive(tmp_path / "evidence"), error)
    evidence, metrics = _evidence(tmp_path, archive)
    watchdog = Watchdog()
    evidence.watch(watchdog, limit_s=5)
    evidence.start()
    try:
        for i in range(3):
            evidence.ticket(_capture(f"f{i}"), "error", "2026-12-01T00:00:00.000Z", b"x").send(b"{}")
        assert evidence.flush(10)
        assert _value(metrics, "inspector_evidence_dropped_total", reason="write_failed") == 3
        assert watchdog.check() is None  # alive, not stuck
        archive.put = archive.inner.put  # the disk is back
        evidence.ticket(_capture("after"), "error", "2026-12-01T00:00:00.000Z", b"x").send(b"{}")
        assert evidence.flush(10)
        (after,) = (tmp_path / "evidence" / "2026-12-01" / "line1" / "cam1").glob("after~e*.json")
        assert after.read_bytes() == b"{}"
    finally:
        evidence.stop(5)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # its death is the point
def test_a_writer_that_dies_makes_the_worker_unhealthy(tmp_path):
    evidence, _ = _evidence(tmp_path)
    watchdog = Watchdog()
    evidence.watch(watchdog, limit_s=60)

    def fatal(job):
        raise SystemExit("beyond what the writer survives")

    evidence._write = fatal
    evidence.start()
    try:
        assert watchdog.check() is None
        evidence.ticket(_capture("f"), "fail", "2026-12-01T00:00:00.000Z", b"x").send(b"{}")
        deadline = time.monotonic() + 10
        while watchdog.check() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watchdog.check() == "the evidence thread has stopped"
    finally:
        evidence.stop(1)


def test_a_map_that_cannot_be_drawn_is_a_counted_write_failure(tmp_path):
    evidence, metrics = _evidence(tmp_path)
    evidence.start()
    try:
        def broken(size):
            raise RuntimeError("the plugin's map failed")

        evidence.ticket(_capture("f"), "fail", "2026-12-01T00:00:00.000Z", b"x", broken, (8, 8)).send(b"{}")
        assert evidence.flush(10)
        assert _value(metrics, "inspector_evidence_dropped_total", reason="write_failed") == 1
    finally:
        evidence.stop(5)


def _frame_files(archive, day: str, frame: str, age_s: float, size: int, now: float) -> None:
    names = names_for(day, "line1", "cam1", frame, "image/png")
    for name, data in ((names.image, b"i" * size), (names.result, b"{}"), (names.map, b"m")):
        archive.put(names.key(name), data, "application/octet-stream")
        if isinstance(archive, FolderArchive):
            os.utime(archive.root / names.key(name), (now - age_s, now - age_s))


def test_pruning_in_a_folder_removes_old_frames_then_the_oldest_down_to_the_cap(tmp_path):
    archive = FolderArchive(tmp_path / "evidence")
    evidence, metrics = _evidence(tmp_path, archive, retention_days=7, max_bytes=3500)
    now = time.time()
    ages_days = {"f-old1": 30, "f-old2": 8, "f-a": 6, "f-b": 5, "f-c": 4, "f-d": 1, "f-e": 0}
    for frame, days in ages_days.items():
        _frame_files(archive, "2026-12-01", frame, days * 86400, 1000, now)
    (archive.root / "2026-12-01" / "line1" / "cam1" / ".tmp-deadbeef").write_bytes(b"half")
    os.utime(archive.root / "2026-12-01" / "line1" / "cam1" / ".tmp-deadbeef", (now - 7200, now - 7200))
    assert evidence.prune(now) == (2, 2)  # f-old1, f-old2 by age; then f-a, f-b until 3 x 1003 bytes <= 3500
    left = sorted(p.name for p in (archive.root / "2026-12-01" / "line1" / "cam1").iterdir())
    assert left == sorted(f"{f}.{s}" for f in ("f-c", "f-d", "f-e") for s in ("png", "json", "map.png"))
    assert _value(metrics, "inspector_evidence_pruned_total", reason="age") == 2
    assert _value(metrics, "inspector_evidence_pruned_total", reason="size") == 2
    assert evidence.prune(now) == (0, 0)
    evidence.settings.retention_days = 0
    evidence.settings.max_bytes = 0
    assert evidence.prune(now + 1000 * 86400) == (0, 0)  # 0: kept for ever, no cap
    for frame in ("f-c", "f-d", "f-e"):  # empty folders go with their last frame
        for suffix in ("png", "json", "map.png"):
            (archive.root / "2026-12-01" / "line1" / "cam1" / f"{frame}.{suffix}").unlink()
    _frame_files(archive, "2026-12-02", "g", 40 * 86400, 10, now)
    evidence.settings.retention_days = 7
    assert evidence.prune(now) == (1, 0)
    assert not (archive.root / "2026-12-02").exists()


def test_pruning_runs_in_the_background(tmp_path):
    archive = FolderArchive(tmp_path / "evidence")
    metrics = Metrics(MetricsSettings(port=0))
    settings = EvidenceSettings(enabled=True, path=str(archive.root), retention_days=1)
    evidence = Evidence(settings, metrics, archive=archive, prune_every_s=0.2)
    _frame_files(archive, "2026-11-01", "f-old", 3 * 86400, 10, time.time())
    evidence.start()
    try:
        deadline = time.monotonic() + 10
        while archive.root.joinpath("2026-11-01").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not archive.root.joinpath("2026-11-01").exists()
        _frame_files(archive, "2026-11-02", "f-old2", 3 * 86400, 10, time.time())
        while archive.root.joinpath("2026-11-02").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not archive.root.joinpath("2026-11-02").exists()  # and again, on the timer
    finally:
        evidence.stop(5)


def test_an_archive_that_is_off_costs_nothing_and_keeps_nothing(tmp_path):
    metrics = Metrics(MetricsSettings(port=0))
    evidence = Evidence(EvidenceSettings(path=str(tmp_path / "evidence")), metrics)
    assert evidence.archive is None
    evidence.start()
    assert evidence.ticket(_capture("f"), "fail", "2026-12-01T00:00:00.000Z", b"x") is None
    evidence.stop()
    assert not (tmp_path / "evidence").exists()


# -- a real worker on the real broker --------------------------------------------------------------


class _ExplainingStandIn:
    """The served DFKDE with an `explain` of known maps, for while the real one draws none: frame i's map
    is a vertical ramp times its probability, so the test can compute every pixel of it."""

    def __init__(self, plugin) -> None:
        self.plugin = plugin
        self.explained = 0

    def __getattr__(self, name):
        return getattr(self.plugin, name)

    def explain(self, batch):
        scores = self.plugin.score(batch)
        self.explained += 1
        return Explained(scores=scores, map_of=lambda i, size: stand_in_map(float(scores.probability[i]), size))


def stand_in_map(probability: float, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    return (np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None] * np.ones(width, np.float32)) * probability


class _Running:
    def __init__(self, worker: Worker, metrics: Metrics, port: int) -> None:
        self.worker, self.metrics, self.port = worker, metrics, port


@pytest.fixture
def running_with(tmp_path, prefix):
    """running_with(store, text="", **worker) -> a real Worker with its /metrics served; stopped after."""
    started = []

    def _run(store, text="", **worker) -> _Running:
        settings = config.load(worker_config(tmp_path, store, prefix, text, **worker))
        metrics = Metrics(settings.metrics)
        port = metrics.serve()
        running = Worker(settings, metrics)
        started.append((running, metrics))
        running.start()
        return _Running(running, metrics, port)

    yield _run
    for running, metrics in started:
        running.stop(grace_s=5)
        metrics.close()


def _frames(good: int, defective: int, seed: int = 5) -> dict[str, tuple[bytes, str]]:
    frames = {f"good-{i}": (encoded(image, "PNG"), "image/png")
              for i, image in enumerate(samples.make_images(good, seed=seed, size=SIZE))}
    frames |= {f"bad-{i}": (encoded(image, "PNG"), "image/png")
               for i, image in enumerate(samples.make_images(defective, defective=True, seed=seed, size=SIZE))}
    return frames


def _publish(line, frames: dict[str, tuple[bytes, str]]) -> dict[str, dict]:
    line.publish([("line1.cam1", body, {"content_type": ctype, "message_id": frame_id})
                  for frame_id, (body, ctype) in frames.items()])
    results = {body["frame_id"]: body for _, _, body in line.collect(len(frames))}
    assert sorted(results) == sorted(frames)
    return results


def _explaining(running: Worker) -> _ExplainingStandIn | None:
    """Serve the model through an explaining stand-in unless the real plugin draws maps itself."""
    served = running.models.in_service()[0]
    if can_explain(served.plugin):
        return None
    stand_in = _ExplainingStandIn(served.plugin)
    running.models.put(replace(served, plugin=stand_in))
    return stand_in


def test_a_worker_keeps_every_failing_frame_with_its_result_and_map_and_nothing_else(fitted, line, running_with,
                                                                                      tmp_path):
    folder = tmp_path / "evidence"
    run = running_with(fitted, f'[evidence]\nenabled = true\npath = "{folder}"\n')
    stand_in = _explaining(run.worker)
    frames = _frames(good=4, defective=4)
    frames["garbage"] = (UNDECODABLE, "image/jpeg")
    frames["empty"] = (b"", "image/png")
    results = _publish(line, frames)
    assert run.worker.evidence.flush(30)

    verdicts = {frame_id: body["verdict"] for frame_id, body in results.items()}
    assert set(verdicts.values()) == {"pass", "fail", "error"}, verdicts  # the line gives all three
    day = next(iter(results.values()))["inspected_at"][:10]
    camera = folder / day / "line1" / "cam1"
    kept = {frame_id_of(p.name) for p in camera.iterdir()}
    assert kept == {f for f, v in verdicts.items() if v in ("fail", "error")}
    for frame_id, body in results.items():
        if verdicts[frame_id] == "pass":
            assert "evidence" not in body, frame_id
            continue
        sent, ctype = frames[frame_id]
        ext = "png" if ctype == "image/png" else "jpg"
        where = body["evidence"]
        stem = f"{frame_id}~{verdicts[frame_id][0]}"  # the verdict's letter, then 8 hex digits of its own
        assert re.fullmatch(re.escape(f"{camera}/{stem}") + rf"[0-9a-f]{{8}}\.{ext}", where["image"]), where
        assert where["result"] == where["image"][: -len(ext)] + "json"
        assert Path(where["image"]).read_bytes() == sent, frame_id  # byte for byte as the camera sent it
        assert json.loads(Path(where["result"]).read_bytes()) == body, frame_id  # the result as published
        if verdicts[frame_id] == "error":
            assert where["map"] is None and not list(camera.glob(f"{frame_id}~*.map.png"))
            continue
        assert where["map"] == where["image"][: -len(ext)] + "map.png"
        with Image.open(where["map"]) as image:
            assert image.size == (SIZE, SIZE) and image.mode.startswith("I;16")
            drawn = np.asarray(image).astype(np.int64)
        if stand_in is not None:  # its maps are known: every pixel must be the ramp times the probability
            expected = stand_in_map(body["anomaly_probability"], (SIZE, SIZE)).astype(np.float64)
            np.testing.assert_allclose(drawn, np.rint(np.clip(expected, 0, 1) * 65535), atol=1)
        else:
            assert drawn.min() >= 0 and drawn.max() <= 65535
    if stand_in is not None:
        assert stand_in.explained >= 1
    # the documented schema takes every result, with and without `evidence`, and refuses a malformed one
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(json.loads(RESULT_SCHEMA.read_text()),
                                     format_checker=Draft202012Validator.FORMAT_CHECKER)
    for frame_id, body in results.items():
        assert list(validator.iter_errors(body)) == [], frame_id
    kept_body = next(body for body in results.values() if body["verdict"] == "fail")
    for bad in (None, {"image": "x"}, kept_body["evidence"] | {"thumbnail": "y"}, kept_body["evidence"] | {"map": ""}):
        assert list(validator.iter_errors(kept_body | {"evidence": bad})), bad
    m = scrape(run.port)
    counted = {v: m[("inspector_evidence_kept_total", (("verdict", v),))] for v in ("pass", "fail", "error")}
    assert counted == {"pass": 0, "fail": list(verdicts.values()).count("fail"),
                       "error": list(verdicts.values()).count("error")}
    assert m[("inspector_evidence_bytes_total", ())] == sum(p.stat().st_size for p in camera.iterdir())
    assert http_status(run.port, "/healthz")[0] == 200


def test_a_sampled_share_of_passes_is_kept_too(fitted, line, running_with, tmp_path):
    folder = tmp_path / "evidence"
    run = running_with(fitted, f'[evidence]\nenabled = true\npath = "{folder}"\nkeep = []\npass_share = 0.5\n'
                               "maps = false\n")
    frames = _frames(good=8, defective=0, seed=9)
    results = _publish(line, frames)
    assert run.worker.evidence.flush(30)
    passes = {f for f, body in results.items() if body["verdict"] == "pass"}
    chosen = {f for f in passes if sampled(f, 0.5)}
    with_field = {f for f, body in results.items() if "evidence" in body}
    assert with_field == chosen
    files = {frame_id_of(p.name) for p in folder.rglob("*") if p.is_file()}
    assert files == chosen
    for f in chosen:
        assert results[f]["evidence"]["map"] is None


def test_a_full_queue_and_a_stuck_disk_never_hold_a_verdict(fitted, line, running_with, tmp_path):
    folder = tmp_path / "evidence"
    run = running_with(fitted, f'[evidence]\nenabled = true\npath = "{folder}"\nqueue_size = 2\nmaps = false\n'
                               '[models.default]\nthreshold = 0.0\n')  # every frame fails: every one is chosen
    stuck = _Blocking(run.worker.evidence.archive)
    run.worker.evidence.archive = stuck
    frames = _frames(good=10, defective=0, seed=3)
    started = time.monotonic()
    results = _publish(line, frames)  # every frame answered while the writer is stuck on the first
    answered_s = time.monotonic() - started
    assert stuck.started.is_set() and not stuck.release.is_set()
    kept = {f for f, body in results.items() if "evidence" in body}
    assert all(body["verdict"] == "fail" for body in results.values())
    assert 2 <= len(kept) <= 3  # the one the writer holds, and the queue's two
    time.sleep(0.5)
    m = scrape(run.port)
    assert m[("inspector_evidence_dropped_total", (("reason", "queue_full"),))] == len(frames) - len(kept)
    stuck.release.set()
    assert run.worker.evidence.flush(30)
    written = {frame_id_of(p.name) for p in folder.rglob("*.json")}
    assert written == kept
    m = scrape(run.port)
    assert m[("inspector_evidence_kept_total", (("verdict", "fail"),))] == len(kept)
    assert answered_s < 60


def test_an_unwritable_path_is_counted_and_the_worker_stays_healthy(fitted, line, running_with, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"a file where the archive should be")
    run = running_with(fitted, f'[evidence]\nenabled = true\npath = "{blocker / "evidence"}"\nmaps = false\n'
                               '[models.default]\nthreshold = 0.0\n')
    frames = _frames(good=3, defective=0, seed=4)
    results = _publish(line, frames)
    assert all(body["verdict"] == "fail" and "evidence" in body for body in results.values())
    assert run.worker.evidence.flush(30)
    m = scrape(run.port)
    assert m[("inspector_evidence_dropped_total", (("reason", "write_failed"),))] == 3
    assert m[("inspector_evidence_kept_total", (("verdict", "fail"),))] == 0
    assert http_status(run.port, "/healthz") == (200, "ok\n")


def test_the_s3_archive_keeps_frames_and_prunes_them(fitted, line, running_with, s3_server, s3_bucket, s3_prefix):
    location = f"s3://{s3_bucket}/{s3_prefix}/evidence"
    run = running_with(fitted, f'[evidence]\nenabled = true\npath = "{location}"\nmaps = false\n'
                               '[models.default]\nthreshold = 0.0\n')
    frames = _frames(good=2, defective=1, seed=6)
    results = _publish(line, frames)
    assert run.worker.evidence.flush(30)
    client = s3_server.client()
    prefix = f"{s3_prefix}/evidence/"
    for frame_id, body in results.items():
        where = body["evidence"]
        assert where["image"].startswith(f"{location}/") and where["map"] is None
        for field, expected in (("image", frames[frame_id][0]), ("result", None)):
            key = where[field][len(f"s3://{s3_bucket}/"):]
            data = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
            if expected is not None:
                assert data == expected, frame_id
            else:
                assert json.loads(data) == body, frame_id
    # pruning on S3: list and delete, the oldest first down to the cap
    archive = S3Archive(location, client=client)
    listed = list(archive.listing())
    assert len(listed) == 2 * len(frames) and all(key.count("/") == 3 for key, _, _ in listed)
    sizes = {}
    for key, size, _ in listed:
        sizes[frame_of(key)] = sizes.get(frame_of(key), 0) + size
    metrics = Metrics(MetricsSettings(port=0))
    evidence = Evidence(EvidenceSettings(enabled=True, path=location, max_bytes=max(sizes.values())), metrics,
                        archive=archive)
    assert evidence.prune() == (0, len(frames) - 1)
    assert len({frame_of(key) for key, _, _ in archive.listing()}) == 1
    evidence.settings.retention_days = 1
    assert evidence.prune(time.time() + 2 * 86400) == (1, 0)
    assert client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix).get("KeyCount", 0) == 0


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 200_000), height=st.integers(1, 200_000))
def test_a_map_is_drawn_at_most_at_its_bound_with_the_frames_aspect(width, height):
    from inspector.worker.evidence import MAP_MAX_PIXELS, map_size

    drawn_width, drawn_height = map_size((width, height))
    assert 1 <= drawn_width <= width and 1 <= drawn_height <= height
    assert drawn_width * drawn_height <= MAP_MAX_PIXELS
    if width * height <= MAP_MAX_PIXELS:
        assert (drawn_width, drawn_height) == (width, height)
    elif width * MAP_MAX_PIXELS >= height and height * MAP_MAX_PIXELS >= width:  # not a sliver: aspect kept
        assert abs(drawn_width * height - drawn_height * width) <= max(width, height)  # to a map pixel


# -- hostile bodies and large frames: the map's size ----------------------------------------------


def polyglot_tiff(side: int = 64, claimed: int = 13000) -> bytes:
    """A side x side grey TIFF whose first bytes are also an IM header claiming claimed x claimed: the
    worker's decoder (JPEG, PNG, BMP, TIFF, WebP only) reads the TIFF, Pillow with every plugin the IM."""
    import struct

    ifd_offset = 0x200
    text = b": x\r\nImage type: L image\r\nImage size (x*y): %d*%d\r\n\x1a" % (claimed, claimed)
    head = (b"II*\x00" + struct.pack("<I", ifd_offset) + text).ljust(ifd_offset, b"\x00")
    entries = [(256, 3, side), (257, 3, side), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0), (277, 3, 1),
               (278, 3, side), (279, 4, side * side)]
    data_offset = ifd_offset + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_offset if tag == 273 else value
        ifd += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3
                                                     else struct.pack("<I", value))
    return head + ifd + struct.pack("<I", 0) + bytes(range(256)) * (side * side // 256)


class _Drawing:
    """A plugin's map function that records the sizes asked of it and refuses to allocate a huge one."""

    def __init__(self, limit: int = 8 * 1024 * 1024) -> None:
        self.asked: list[tuple[int, int]] = []
        self.limit = limit

    def __call__(self, size: tuple[int, int]) -> np.ndarray:
        self.asked.append(size)
        width, height = size
        if width * height > self.limit:
            raise MemoryError(f"asked for a map of {width}x{height}")
        return stand_in_map(0.9, size)


def _map_of(tmp_path: Path, frame_id: str) -> Path:
    (found,) = (tmp_path / "evidence").rglob(f"{frame_id}~*.map.png")
    return found


def test_a_polyglot_body_gets_its_map_at_the_size_it_was_decoded_at(tmp_path):
    from inspector.worker.decode import DecodeLimits, decode_capture

    body = polyglot_tiff()
    with Image.open(io.BytesIO(body)) as every_plugin:
        assert every_plugin.size == (13000, 13000)  # what re-opening with every Pillow plugin says
    decoded = decode_capture(body, "image/tiff", {}, DecodeLimits(1 << 24, 1 << 27))
    assert decoded.shape[:2] == (64, 64)
    evidence, metrics = _evidence(tmp_path)
    evidence.start()
    try:
        draw = _Drawing()
        evidence.ticket(_capture("poly", "image/tiff"), "fail", "2026-12-01T00:00:00.000Z", body, draw,
                        (64, 64)).send(b"{}")
        assert evidence.flush(10)
        assert draw.asked == [(64, 64)]
        with Image.open(_map_of(tmp_path, "poly")) as drawn:
            assert drawn.size == (64, 64)
        assert _value(metrics, "inspector_evidence_dropped_total", reason="write_failed") == 0
    finally:
        evidence.stop(5)


@pytest.mark.parametrize("size", [(10000, 5000), (7000, 7000), (60000, 3), (3, 60000)])
def test_a_large_frames_map_is_drawn_at_a_bounded_size_with_its_aspect(tmp_path, size):
    from inspector.worker.evidence import MAP_MAX_PIXELS

    evidence, _ = _evidence(tmp_path)
    evidence.start()
    try:
        draw = _Drawing(limit=MAP_MAX_PIXELS)
        evidence.ticket(_capture("big", "image/jpeg"), "fail", "2026-12-01T00:00:00.000Z", b"jpeg", draw,
                        size).send(b"{}")
        assert evidence.flush(10)
        ((width, height),) = draw.asked
        assert width * height <= MAP_MAX_PIXELS and width >= 1 and height >= 1
        assert abs(width / size[0] - height / size[1]) * max(size) <= 1.0 + 1e-9  # the aspect, to a pixel
        with Image.open(_map_of(tmp_path, "big")) as drawn:
            assert drawn.size == (width, height)
            assert drawn.text["frame-size"] == f"{size[0]}x{size[1]}"  # what a viewer scales it onto
    finally:
        evidence.stop(5)


def test_the_tools_take_a_files_size_from_the_decoders_own_formats(tmp_path):
    from inspector.tools.maps import _file_size

    path = tmp_path / "poly.tiff"
    path.write_bytes(polyglot_tiff())
    assert _file_size(path) == (64, 64)


# -- never overwritten, bounded at write time, never outside its own files ------------------------


def test_a_reused_frame_id_never_overwrites_an_earlier_frame(tmp_path):
    evidence, metrics = _evidence(tmp_path, maps=False)
    evidence.start()
    try:
        first = evidence.ticket(_capture("f-1"), "fail", "2026-12-01T00:00:00.000Z", b"first")
        second = evidence.ticket(_capture("f-1"), "fail", "2026-12-01T00:00:01.000Z", b"second")
        assert first.where["image"] != second.where["image"] and first.where["result"] != second.where["result"]
        first.send(b'{"n": 1}')
        second.send(b'{"n": 2}')
        assert evidence.flush(10)
        assert Path(first.where["image"]).read_bytes() == b"first"
        assert Path(second.where["image"]).read_bytes() == b"second"
        assert Path(first.where["result"]).read_bytes() == b'{"n": 1}'
        assert _value(metrics, "inspector_evidence_kept_total", verdict="fail") == 2
    finally:
        evidence.stop(5)
    archive = FolderArchive(tmp_path / "evidence")
    key = os.path.relpath(first.where["image"], archive.root)
    with pytest.raises(FileExistsError):
        archive.put(key, b"again", "image/png")  # exclusive: a name taken is never written over
    assert Path(first.where["image"]).read_bytes() == b"first"


def test_the_s3_archive_never_overwrites_a_key(s3_server, s3_bucket, s3_prefix):
    client = s3_server.client()
    archive = S3Archive(f"s3://{s3_bucket}/{s3_prefix}/evidence", client=client)
    archive.put("2026-12-01/l/c/f~fdeadbeef.json", b"first", "application/json")
    with pytest.raises(FileExistsError, match="PreconditionFailed|412|ConditionalRequestConflict"):
        archive.put("2026-12-01/l/c/f~fdeadbeef.json", b"second", "application/json")  # as in a folder
    body = client.get_object(Bucket=s3_bucket, Key=f"{s3_prefix}/evidence/2026-12-01/l/c/f~fdeadbeef.json")["Body"]
    assert body.read() == b"first"


def test_an_s3_archive_failure_names_evidence_path_and_the_fix(s3_server, s3_bucket, s3_prefix, monkeypatch):
    """The archive's S3 requests go through the model store's S3 helper, so they fail with its clear
    messages, naming evidence.path rather than a bare botocore error."""
    missing = S3Archive("s3://no-such-bucket/evidence")
    no_bucket = r"evidence.path s3://no-such-bucket/evidence/: the bucket 'no-such-bucket' does not exist; " \
                r"create it .* or correct evidence.path"
    for ask in (missing.prepare, lambda: list(missing.listing()),
                lambda: missing.delete(["2026-12-01/l/c/f~fdeadbeef.json"])):
        with pytest.raises(ConfigError, match=no_bucket):
            ask()
    with pytest.raises(ConfigError, match=r"^evidence.path s3://no-such-bucket/evidence/: "):  # SeaweedFS: denied
        missing.put("2026-12-01/l/c/f~fdeadbeef.json", b"{}", "application/json")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(StoreUnavailable, match=r"cannot reach the evidence archive s3://.*AWS_ENDPOINT_URL_S3"):
        S3Archive(f"s3://{s3_bucket}/{s3_prefix}/evidence").prepare()


def _kept(tmp_path: Path) -> dict[str, set[str]]:
    frames: dict[str, set[str]] = {}
    for path in (tmp_path / "evidence").rglob("*.json"):
        frames.setdefault(json.loads(path.read_bytes())["verdict"], set()).add(json.loads(path.read_bytes())["n"])
    return frames


def _keep_all(evidence: Evidence, verdict: str, names, size: int, day: str = "2026-12-01") -> None:
    for n in names:
        ticket = evidence.ticket(_capture(f"{verdict}-{n}"), verdict, f"{day}T00:00:00.000Z", b"x" * size)
        assert ticket is not None
        ticket.send(json.dumps({"verdict": verdict, "n": n}).encode())
        assert evidence.flush(10)


def test_a_burst_of_errors_never_evicts_a_reject_and_the_cap_holds_at_every_write(tmp_path):
    frame_bytes = 1000 + len(json.dumps({"verdict": "error", "n": 10}))
    evidence, metrics = _evidence(tmp_path, maps=False, max_bytes=10 * frame_bytes, max_files=1000,
                                  retention_days=0)
    evidence.start()
    try:
        _keep_all(evidence, "fail", range(6), 1000)
        _keep_all(evidence, "error", range(10, 60), 1000)  # a burst: fills what the rejects leave, then refused
        on_disk = sum(p.stat().st_size for p in (tmp_path / "evidence").rglob("*") if p.is_file())
        assert on_disk <= 10 * frame_bytes  # at every write, not at the next prune
        assert evidence.prune() == (0, 0)  # nothing over the caps for the pruner to find
        kept = _kept(tmp_path)
        assert kept["fail"] == set(range(6))  # every reject is still there
        assert 1 <= len(kept["error"]) <= 4  # an error takes an older error's room, or is not kept
        replaced = _value(metrics, "inspector_evidence_pruned_total", reason="size")
        refused = _value(metrics, "inspector_evidence_dropped_total", reason="archive_full")
        assert replaced + refused == 50 - len(kept["error"])
        kept_before = kept
        _keep_all(evidence, "fail", range(6, 12), 1000)  # a reject takes the errors' room, then the oldest reject's
        kept = _kept(tmp_path)
        assert "error" not in kept and kept["fail"] == set(range(2, 12))
        errors_before = len(kept_before["error"])  # every error that was kept, then rejects 0 and 1
        assert _value(metrics, "inspector_evidence_pruned_total", reason="size") == replaced + errors_before + 2
    finally:
        evidence.stop(5)


def test_the_file_cap_holds_at_every_write(tmp_path):
    evidence, metrics = _evidence(tmp_path, maps=False, max_bytes=0, max_files=6, retention_days=0)
    evidence.start()
    try:
        _keep_all(evidence, "fail", range(10), 1)  # two files a frame: three frames at most
        assert len([p for p in (tmp_path / "evidence").rglob("*") if p.is_file()]) == 6
        assert _kept(tmp_path)["fail"] == {7, 8, 9}
    finally:
        evidence.stop(5)


class _Listed:
    """An archive of `count` frames that exist only as a listing: the pruner's memory is its own."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.deleted: list[str] = []

    def listing(self):
        for i in range(self.count):
            folder = f"2026-12-01/line1/cam-{i}"  # a camera id of its own for each: a folder each
            yield f"{folder}/f~e{i:08x}.bin", 1, 1_000_000.0 + i
            yield f"{folder}/f~e{i:08x}.json", 1, 1_000_000.0 + i

    def delete(self, keys: list[str]) -> None:
        self.deleted.extend(keys)


def test_the_pruners_memory_does_not_grow_with_the_archive(tmp_path):
    import tracemalloc

    from inspector.worker.evidence import OLDEST_KEPT

    peaks = {}
    for count in (2 * OLDEST_KEPT, 60_000):
        archive = _Listed(count)
        evidence, _ = _evidence(tmp_path, archive, max_bytes=0, max_files=2_000, retention_days=0)
        tracemalloc.start()
        try:
            evidence.prune(2_000_000.0)
            peaks[count] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        removed = {frame_of(key) for key in archive.deleted}
        oldest = {f"2026-12-01/line1/cam-{i}/f~e{i:08x}" for i in range(OLDEST_KEPT)}
        assert removed == oldest  # the oldest it can know of in one walk; the next round comes at once
    assert peaks[60_000] < 1.5 * peaks[2 * OLDEST_KEPT], peaks  # 7 x the archive, not 7 x the memory


def test_prune_removes_only_what_the_archive_wrote(tmp_path):
    archive = FolderArchive(tmp_path / "evidence")
    evidence, _ = _evidence(tmp_path, archive, retention_days=1)
    now = time.time()
    strangers = [archive.root / "models" / "m" / "versions" / "v1" / "manifest.json",
                 archive.root / "2026-12-01" / "line1" / "cam1" / "notes.txt",
                 archive.root / "2026-12-01" / "line1" / "notes.json",
                 archive.root / "README.json"]
    for path in strangers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not the archive's")
        os.utime(path, (now - 90 * 86400, now - 90 * 86400))
    _frame_files(archive, "2026-12-01", "f-old", 90 * 86400, 10, now)
    evidence.prune(now)
    assert all(path.exists() for path in strangers)
    assert not list((archive.root / "2026-12-01" / "line1" / "cam1").glob("f-old*"))


@pytest.mark.parametrize("store, evidence_path", [
    ("{tmp}/data/models", "{tmp}/data"),
    ("{tmp}/data", "{tmp}/data/evidence"),
    ("{tmp}/same", "{tmp}/same/"),
    ("s3://bucket-one/plant/models", "s3://bucket-one/plant"),
    ("s3://bucket-one/plant", "s3://bucket-one/plant/models/evidence"),
    ("s3://bucket-one", "s3://bucket-one/evidence"),
])
def test_an_evidence_path_that_overlaps_the_model_store_is_refused_at_start(tmp_path, store, evidence_path):
    path = tmp_path / "inspector.toml"
    path.write_text(f'[store]\npath = "{store.format(tmp=tmp_path)}"\n'
                    f'[evidence]\nenabled = true\npath = "{evidence_path.format(tmp=tmp_path)}"\n')
    with pytest.raises(ConfigError, match="evidence.path") as caught:
        config.load(path, check_plugins=False)
    assert "store.path" in str(caught.value)


@pytest.mark.parametrize("store, evidence_path", [
    ("{tmp}/models", "{tmp}/evidence"),
    ("{tmp}/models", "{tmp}/models-evidence"),
    ("s3://bucket-one/plant/models", "s3://bucket-one/plant/evidence"),
    ("s3://bucket-one/models", "s3://bucket-two/models"),
    ("{tmp}/models", "s3://bucket-one/evidence"),
])
def test_separate_archive_and_store_are_accepted(tmp_path, store, evidence_path):
    path = tmp_path / "inspector.toml"
    path.write_text(f'[store]\npath = "{store.format(tmp=tmp_path)}"\n'
                    f'[evidence]\nenabled = true\npath = "{evidence_path.format(tmp=tmp_path)}"\n')
    assert config.load(path, check_plugins=False).evidence.enabled


def test_a_stuck_writer_stops_keeping_and_never_makes_the_worker_unhealthy(tmp_path):
    archive = _Blocking(FolderArchive(tmp_path / "evidence"))
    evidence, metrics = _evidence(tmp_path, archive, maps=False)
    watchdog = Watchdog()
    evidence.watch(watchdog, limit_s=0.3)
    evidence.start()
    try:
        evidence.ticket(_capture("f0"), "fail", "2026-12-01T00:00:00.000Z", b"png").send(b"{}")
        assert archive.started.wait(5)
        time.sleep(0.6)  # a hung mount: the write has made no progress past the limit
        assert watchdog.check() is None  # evidence never holds a verdict: the worker stays healthy
        assert evidence.ticket(_capture("f1"), "fail", "2026-12-01T00:00:00.000Z", b"png") is None
        assert evidence.ticket(_capture("f2"), "error", "2026-12-01T00:00:00.000Z", b"png") is None
        assert _value(metrics, "inspector_evidence_dropped_total", reason="writer_stuck") == 2
        assert _value(metrics, "inspector_evidence_dropped_total", reason="queue_full") == 0
        archive.release.set()  # the mount answers again: frames are kept again
        assert evidence.flush(10)
        ticket = evidence.ticket(_capture("f3"), "fail", "2026-12-01T00:00:00.000Z", b"png")
        assert ticket is not None
        ticket.send(b"{}")
        assert evidence.flush(10)
        assert _value(metrics, "inspector_evidence_kept_total", verdict="fail") == 2
    finally:
        archive.release.set()
        evidence.stop(5)
