"""The reject archive: the frames the line rejected (and a sample of those it passed), kept as evidence.

Each kept frame is its capture's bytes as they came, the result JSON exactly as published and, when its
plugin draws maps, its anomaly map as a 16-bit grey PNG, under `<date>/<line>/<camera>/<frame_id>.*` in a
folder or on S3. Why it is built this way:

- A verdict never waits for evidence. The scoring thread (and an error answer) only asks for a `Ticket`:
  a look at a bounded queue, nothing else. When the queue is full the frame is not kept and counted; the
  result then carries no `evidence` field, so a result never points at evidence that was never queued.
- Writing and drawing maps happen on a writer thread of its own, which outlives its own bugs: a full disk or
  a failing S3 is a counted write failure. A writer that dies or hangs is another matter: it is watched like
  the core threads, and makes the worker unhealthy.
- Pruning (by age, then oldest first down to the size cap) runs on a timer on a thread of its own, so a long
  listing delays no write.
- Every path component comes from ids that messages.clean_id made safe (no `/`, no NUL, no leading `.`,
  bounded); `names_for` cleans them again, so nothing outside the archive's root can ever be named.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from inspector.config import EvidenceSettings
from inspector.imagefiles import map_png as encode_map_png
from inspector.messages import FRAME_ID_MAX_BYTES, SOURCE_ID_MAX_BYTES, Capture, clean_id
from inspector.s3store import is_s3_url, parse_s3_url
from inspector.s3store import make_client as make_s3_client
from inspector.worker.metrics import Metrics
from inspector.worker.watchdog import Watchdog

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 300.0  # the archive is pruned at start and then this often
LOG_EVERY_S = 60.0  # a failing disk at 100 frames/s logs once a minute, not 100 times a second
STALE_TEMP_S = 3600.0  # a half-written file (a crash mid-write) older than this is removed by the pruner
BACKGROUND_NICE = 10  # the writer and pruner yield the CPU to scoring when the cores are busy

# The capture's bytes are kept under the extension of its content type; anything else is `.bin`.
EXTENSIONS = {
    "image/jpeg": "jpg", "image/jpg": "jpg", "image/png": "png", "image/bmp": "bmp", "image/tiff": "tiff",
    "image/webp": "webp", "image/x-raw": "raw", "application/json": "capture.json",
}
OTHER_EXTENSION = "bin"
RESULT_SUFFIX = "json"
MAP_SUFFIX = "map.png"
# A frame id ending in one of these would let its files take another frame's `.map.png` or
# `.capture.json` name: such an id gets `~` and a hash appended in its file names.
_RESERVED_LAST_WORDS = frozenset({"map", "capture"})
_TWO_WORD_SUFFIXES = (f".{MAP_SUFFIX}", ".capture.json")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TEMP_PREFIX = ".tmp-"


# -- names -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Names:
    """Where one frame's files go, relative to the archive's root ('/'-separated)."""

    folder: str  # <date>/<line>/<camera>
    image: str  # <frame>.<ext>
    result: str  # <frame>.json
    map: str  # <frame>.map.png

    def key(self, name: str) -> str:
        return f"{self.folder}/{name}"


def extension(content_type: str | None) -> str:
    """The file extension of a capture's bytes, from its content type (parameters ignored)."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    return EXTENSIONS.get(kind, OTHER_EXTENSION)


def names_for(date: str, line_id: str, camera_id: str, frame_id: str, content_type: str | None) -> Names:
    """The names of a frame's files. The ids are cleaned again (a no-op for a parsed Capture's), so each
    component is one harmless, bounded name whatever is passed: never empty, `.`, `..`, never a `/` or
    NUL, at most 255 bytes; distinct frame ids never share a file."""
    day = date if _DATE.match(date) else "0000-00-00"
    line = clean_id(line_id, SOURCE_ID_MAX_BYTES) or "unknown"
    camera = clean_id(camera_id, SOURCE_ID_MAX_BYTES) or "unknown"
    frame = clean_id(frame_id, FRAME_ID_MAX_BYTES, distinct=True) or "unknown"
    if frame.rsplit(".", 1)[-1].lower() in _RESERVED_LAST_WORDS:
        frame += "~" + hashlib.blake2b(frame.encode(), digest_size=4).hexdigest()
    return Names(folder=f"{day}/{line}/{camera}", image=f"{frame}.{extension(content_type)}",
                 result=f"{frame}.{RESULT_SUFFIX}", map=f"{frame}.{MAP_SUFFIX}")


def frame_of(key: str) -> str:
    """The frame a stored file belongs to: its key without the suffix `names_for` gave it."""
    for suffix in _TWO_WORD_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    folder, _, name = key.rpartition("/")
    return f"{folder}/{name.rsplit('.', 1)[0]}" if folder else name.rsplit(".", 1)[0]


def sampled(frame_id: str, share: float) -> bool:
    """Whether a pass is in the sampled `share`: decided by a hash of its frame id, so a redelivered frame
    gets the same answer and any worker the same as another."""
    if share <= 0:
        return False
    digest = hashlib.blake2b(frame_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


# -- maps ----------------------------------------------------------------------------------------


def map_png(values: np.ndarray, size: tuple[int, int]) -> bytes:
    """The map a plugin drew for an image of `size` (width, height), as the archive's 16-bit PNG."""
    width, height = size
    values = np.asarray(values)
    if values.shape != (height, width):
        raise ValueError(f"the plugin drew a map of {values.shape[::-1]} for an image of {width}x{height}")
    return encode_map_png(values)


def image_size(body: bytes, content_type: str | None, fallback: tuple[int, int] | None) -> tuple[int, int] | None:
    """(width, height) of the capture as sent: an encoded image's header says it (a JPEG may have been
    decoded at reduced scale, and the map belongs on the original); otherwise the size it was decoded at."""
    if extension(content_type) in ("jpg", "png", "bmp", "tiff", "webp", OTHER_EXTENSION):
        try:
            with Image.open(io.BytesIO(body)) as image:
                return image.size
        except Exception:  # noqa: BLE001 - not an image after all: the decoded size serves
            pass
    return fallback


# -- storage ---------------------------------------------------------------------------------------


class FolderArchive:
    """The archive in a folder; each file is written under a temporary name and renamed into place."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(os.path.abspath(Path(root).expanduser()))
        self._prefix = f"{str(self.root).rstrip('/')}/"

    def location(self, key: str) -> str:
        return self._prefix + key  # on the scoring thread: plain text, not a Path

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{_TEMP_PREFIX}{secrets.token_hex(4)}")
        try:
            with open(temporary, "wb") as out:
                out.write(data)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def listing(self) -> Iterator[tuple[str, int, float]]:
        """(key, bytes, modification time) of every file; half-written ones from a crash are removed."""
        now = time.time()
        for folder, _dirs, files in os.walk(self.root):
            for name in files:
                path = os.path.join(folder, name)
                try:
                    stat = os.stat(path)
                except FileNotFoundError:
                    continue
                if name.startswith(_TEMP_PREFIX):
                    if now - stat.st_mtime > STALE_TEMP_S:
                        Path(path).unlink(missing_ok=True)
                    continue
                yield os.path.relpath(path, self.root).replace(os.sep, "/"), stat.st_size, stat.st_mtime

    def delete(self, keys: list[str]) -> None:
        folders = set()
        for key in keys:
            path = self.root / key
            path.unlink(missing_ok=True)
            folders.add(path.parent)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            while folder != self.root and self.root in folder.parents:
                try:
                    folder.rmdir()  # only when empty
                except OSError:
                    break
                folder = folder.parent


class S3Archive:
    """The archive under s3://bucket/prefix, on the endpoint and credentials of the model store's
    environment (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...)."""

    def __init__(self, url: str, client: Any = None) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_s3_client()
        return self._client

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def prepare(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data, ContentType=content_type)

    def listing(self) -> Iterator[tuple[str, int, float]]:
        token = None
        while True:
            page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix,
                                               **({"ContinuationToken": token} if token else {}))
            for item in page.get("Contents", []):
                yield item["Key"][len(self.prefix):], int(item["Size"]), item["LastModified"].timestamp()
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self.prefix + key} for key in keys[start:start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})


def open_archive(path: str) -> FolderArchive | S3Archive:
    return S3Archive(path) if is_s3_url(path) else FolderArchive(path)


# -- the archive's writer --------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    names: Names
    verdict: str
    original: bytes
    content_type: str | None
    draw: Callable[[tuple[int, int]], np.ndarray] | None
    size: tuple[int, int] | None
    result: bytes = b""


class Ticket:
    """A frame the archive will keep: `where` goes into its result as `evidence`, and `send(result)` hands
    over the encoded result (exactly what is published), queueing the frame for writing."""

    def __init__(self, evidence: "Evidence", job: _Job, where: dict[str, str | None]) -> None:
        self._evidence = evidence
        self._job = job
        self.where = where

    def send(self, result: bytes) -> None:
        self._job.result = result
        self._evidence._enqueue(self._job)


class _Throttle:
    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def warning(self, key: str, message: str, *args: Any, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._last[key] = now
            log.warning(message, *args, exc_info=exc_info)


class Evidence:
    """The worker's evidence archive; with `[evidence] enabled = false` every method is a cheap no-op."""

    def __init__(self, settings: EvidenceSettings, metrics: Metrics, *, archive: Any = None,
                 prune_every_s: float = PRUNE_EVERY_S) -> None:
        self.settings = settings
        self.enabled = settings.enabled
        self.metrics = metrics
        self.archive = archive if archive is not None or not self.enabled else open_archive(settings.path)
        self.prune_every_s = prune_every_s
        self._keep = frozenset(settings.keep)
        self._needs_maps = settings.maps and (bool(self._keep & {"fail", "pass"}) or settings.pass_share > 0)
        self._queue: deque[_Job] = deque()
        self._queued_bytes = 0
        self._changed = threading.Condition()
        self._writing = False
        self._pruning = False
        self._stopping = False
        self._stop_pruning = threading.Event()
        self._watchdog: Watchdog | None = None
        self._throttle = _Throttle()
        self._writer = threading.Thread(target=self._write_loop, name="inspector-evidence", daemon=True)
        self._pruner = threading.Thread(target=self._prune_loop, name="inspector-evidence-prune", daemon=True)

    # -- on the scoring thread (and the error path): quick, never blocks on I/O --------------------

    @property
    def wants_maps(self) -> bool:
        """Whether kept frames carry maps: scored frames may be kept and evidence.maps is on. The scoring
        thread then scores through the plugin's `explain` (the same scores; serving.explain_batch)."""
        return self.enabled and self._needs_maps

    def ticket(self, capture: Capture, verdict: str, inspected_at: str, original: bytes,
               draw: Callable[[tuple[int, int]], np.ndarray] | None = None,
               size: tuple[int, int] | None = None) -> Ticket | None:
        """A Ticket when this frame is to be kept and the queue has room; None otherwise (a frame chosen
        but refused for want of room is counted). `original`: the capture's bytes as they came."""
        if not self.enabled:
            return None
        if verdict not in self._keep and not (verdict == "pass" and sampled(capture.frame_id,
                                                                               self.settings.pass_share)):
            return None
        if (len(self._queue) >= self.settings.queue_size
                or self._queued_bytes + len(original) > self.settings.queue_bytes):
            self.metrics.evidence_not_kept("queue_full")
            self._throttle.warning("queue_full", "evidence: the writer's queue is full (%d frames); frames are "
                                   "answered but not kept until it drains (a slow %s?)", len(self._queue),
                                   self.settings.path)
            return None
        names = names_for(inspected_at[:10], capture.line_id, capture.camera_id, capture.frame_id,
                          capture.content_type)
        draw = draw if verdict != "error" else None
        where = {"image": self.archive.location(names.key(names.image)),
                 "result": self.archive.location(names.key(names.result)),
                 "map": self.archive.location(names.key(names.map)) if draw is not None else None}
        return Ticket(self, _Job(names, verdict, original, capture.content_type, draw, size), where)

    def _enqueue(self, job: _Job) -> None:
        with self._changed:
            self._queue.append(job)
            self._queued_bytes += len(job.original)
            self._changed.notify_all()
        self.metrics.set_evidence_queue(len(self._queue))

    # -- life cycle ---------------------------------------------------------------------------------

    def watch(self, watchdog: Watchdog, limit_s: float) -> None:
        """Register the writer and the pruner with the worker's watchdog: dead or stuck, they make it
        unhealthy. Nothing is watched while the archive is off."""
        if not self.enabled:
            return
        self._watchdog = watchdog
        watchdog.watch("evidence", self._writer.is_alive, lambda: self._writing or bool(self._queue), limit_s)
        watchdog.watch("evidence-prune", self._pruner.is_alive, lambda: self._pruning, limit_s)

    def start(self) -> None:
        if not self.enabled:
            return
        log.info("evidence: keeping %s%s in %s%s; retention %s, size cap %s", ", ".join(self.settings.keep) or
                 "nothing", f" and {self.settings.pass_share:.1%} of passes" if self.settings.pass_share else "",
                 self.settings.path, " with maps" if self.settings.maps else "",
                 f"{self.settings.retention_days} days" if self.settings.retention_days else "none",
                 f"{self.settings.max_bytes} bytes" if self.settings.max_bytes else "none")
        self._writer.start()
        self._pruner.start()

    def flush(self, timeout: float) -> bool:
        """Wait until every queued frame is written (or failed); False when `timeout` ran out first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._queue or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, within `timeout`, then stop both threads; what is left is logged."""
        if not self.enabled:
            return
        self._stop_pruning.set()
        if self._writer.is_alive():
            self.flush(timeout)
        with self._changed:
            self._stopping = True
            left = len(self._queue)
            self._changed.notify_all()
        if left:
            log.warning("evidence: %d frames were still waiting to be written at shutdown; not kept", left)
        for thread in (self._writer, self._pruner):
            if thread.ident is not None:  # started
                thread.join(timeout=5.0)

    # -- the writer thread ------------------------------------------------------------------------

    def _next(self) -> _Job | None:
        with self._changed:
            while not self._queue and not self._stopping:
                self._changed.wait(self.prune_every_s)
                self._beat("evidence")
            if self._stopping:
                return None
            self._writing = True
            job = self._queue.popleft()
            self._queued_bytes -= len(job.original)
        self.metrics.set_evidence_queue(len(self._queue))
        return job

    def _write_loop(self) -> None:
        _lower_priority()
        try:  # here, not in start(): an S3 endpoint that is away must not hold up the worker's start
            self.archive.prepare()
        except Exception as exc:  # noqa: BLE001 - the worker serves anyway; every write will say so
            log.warning("evidence: %s cannot be used now (%s); frames chosen for it are answered and counted as "
                        "write failures until it can", self.settings.path, exc)
        while True:
            try:
                job = self._next()
                if job is None:
                    return
                try:
                    self._write(job)
                except Exception as exc:  # noqa: BLE001 - a full disk, a failing S3, a bad map: counted
                    self.metrics.evidence_not_kept("write_failed")
                    self._throttle.warning("write_failed", "evidence: frame %s could not be kept in %s: %s",
                                           job.names.key(job.names.result), self.settings.path, exc)
            except Exception:  # noqa: BLE001 - the writer outlives its own bugs
                log.exception("evidence: the writer failed outside a write")
                time.sleep(0.1)
            finally:
                with self._changed:
                    self._writing = False
                    self._changed.notify_all()
                self._beat("evidence")

    def _write(self, job: _Job) -> None:
        names = job.names
        kind = (job.content_type or "").split(";", 1)[0].strip().lower()
        files = [(names.image, job.original, kind if kind in EXTENSIONS else "application/octet-stream")]
        if job.draw is not None:
            size = image_size(job.original, job.content_type, job.size)
            if size is None:
                raise ValueError("the image's size is unknown, so its map cannot be drawn")
            files.append((names.map, map_png(job.draw(size), size), "image/png"))
        files.append((names.result, job.result, "application/json"))  # last: a frame with its JSON is whole
        for name, data, content_type in files:
            self.archive.put(names.key(name), data, content_type)
            self._beat("evidence")
        self.metrics.evidence_written(job.verdict, sum(len(data) for _, data, _ in files))

    # -- the pruner ---------------------------------------------------------------------------------

    def _prune_loop(self) -> None:
        _lower_priority()
        while True:
            try:
                self.prune()
            except Exception as exc:  # noqa: BLE001 - an unreachable store: tried again at the next round
                self._throttle.warning("prune", "evidence: pruning %s failed: %s", self.settings.path, exc)
            if self._stop_pruning.wait(self.prune_every_s):
                return

    def prune(self, now: float | None = None) -> tuple[int, int]:
        """Remove the frames older than retention_days, then the oldest until the archive is within
        max_bytes; (frames removed for age, for size)."""
        now = time.time() if now is None else now
        self._pruning = True
        try:
            frames: dict[str, list] = {}  # frame -> [bytes, newest modification, keys]
            for count, (key, size, modified) in enumerate(self.archive.listing()):
                entry = frames.setdefault(frame_of(key), [0, 0.0, []])
                entry[0] += size
                entry[1] = max(entry[1], modified)
                entry[2].append(key)
                if count % 1000 == 0:
                    self._beat("evidence-prune")
            days = self.settings.retention_days
            old = [f for f, entry in frames.items() if days and entry[1] < now - days * 86400]
            self._remove(frames, old, "age")
            oversize = []
            cap = self.settings.max_bytes
            total = sum(entry[0] for entry in frames.values())
            if cap and total > cap:
                for frame, entry in sorted(frames.items(), key=lambda item: item[1][1]):
                    if total <= cap:
                        break
                    oversize.append(frame)
                    total -= entry[0]
            self._remove(frames, oversize, "size")
            return len(old), len(oversize)
        finally:
            self._pruning = False
            self._beat("evidence-prune")

    def _remove(self, frames: dict[str, list], doomed: list[str], reason: str) -> None:
        for start in range(0, len(doomed), 1000):
            chunk = doomed[start:start + 1000]
            self.archive.delete([key for frame in chunk for key in frames[frame][2]])
            for frame in chunk:
                del frames[frame]
            self.metrics.evidence_removed(reason, len(chunk))
            self._beat("evidence-prune")
        if doomed:
            log.info("evidence: pruned %d frames from %s (%s)", len(doomed), self.settings.path,
                     "older than evidence.retention_days" if reason == "age" else "over evidence.max_bytes")

    def _beat(self, name: str) -> None:
        if self._watchdog is not None:
            self._watchdog.beat(name)


def _lower_priority() -> None:
    """Run the calling thread at BACKGROUND_NICE more than the worker (Linux schedules each thread on its
    own), so that on busy cores the archive takes what scoring leaves rather than a share of it; when the
    writer then falls behind, its queue fills and frames are counted as not kept, verdicts untouched."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE))
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: the thread runs at the worker's priority
        log.debug("evidence: the background threads keep the worker's priority (%s)", exc)
