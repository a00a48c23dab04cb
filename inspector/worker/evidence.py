"""The reject archive: the frames the line rejected (and a sample of those it passed), kept as evidence.

Each kept frame is its capture's bytes as they came, the result JSON exactly as published and, when its
plugin draws maps, its anomaly map as a 16-bit grey PNG, under `<date>/<line>/<camera>/<frame_id>~<mark>.*`
in a folder or on S3. Why it is built this way:

- A verdict never waits for evidence. The scoring thread (and an error answer) only asks for a `Ticket`:
  a look at a bounded queue, nothing else. When the queue is full the frame is not kept and counted; the
  result then carries no `evidence` field, so a result never points at evidence that was never queued.
- Writing and drawing maps happen on a writer thread of its own, which outlives its own bugs: a full disk or
  a failing S3 is a counted write failure. A writer stuck on a hung mount holds no verdict either: while it
  is stuck, frames are not kept (counted, `writer_stuck`) and the worker stays healthy. Only a writer that
  dies, a bug, makes the worker unhealthy.
- Nothing is ever written over: each frame's names end in `~<mark>`, a verdict letter and 8 random hex
  digits, and a file is created exclusively (a hard link from its temporary name; `If-None-Match: *` on S3),
  so a camera that reuses a frame id never replaces an earlier frame.
- The budgets (evidence.max_bytes, evidence.max_files) hold at every write: a frame that does not fit takes
  the room of the oldest frames of its own verdict or a lower one (passes, then errors, then fails), or is
  not kept (`archive_full`). A burst of errors can never remove a reject.
- Pruning (by age, and the cap) runs on a timer on a thread of its own, so a long listing delays no write.
  It walks the archive one folder level at a time and remembers only the OLDEST_KEPT oldest frames of each
  verdict, so its memory does not grow with the archive; it counts and removes only names this archive
  writes (`<date>/<line>/<camera>/<frame>.<suffix>`), never anything else under its root.
- Every path component comes from ids that messages.clean_id made safe (no `/`, no NUL, no leading `.`,
  bounded); `names_for` cleans them again, so nothing outside the archive's root can ever be named.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import math
import os
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL.PngImagePlugin import PngInfo

from inspector import imageformats
from inspector.config import EvidenceSettings
from inspector.imagefiles import MAP_PNG_LEVEL, map_image
from inspector.logs import Throttle
from inspector.messages import FRAME_ID_MAX_BYTES, SOURCE_ID_MAX_BYTES, Capture, clean_id
from inspector.stores.s3client import Conflict, S3Bucket, is_s3_url
from inspector.worker.metrics import Metrics
from inspector.worker.watchdog import Watchdog

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 300.0  # the archive is pruned at start and then this often
STALE_TEMP_S = 3600.0  # a half-written file (a crash mid-write) older than this is removed by the pruner
BACKGROUND_NICE = 10  # the writer and pruner yield the CPU to scoring when the cores are busy
STUCK_AFTER_S = 60.0  # a write without progress this long: frames are not kept until it moves (watch sets it)
# A map is drawn at most this many pixels (2048 x 2048), the frame's aspect kept: a 50 Mpx frame's map at its
# own size costs GiBs to draw and encode (`bench/hostile_inputs.py --only evidence`, docs/running.md). The PNG's
# text `frame-size` says what it covers (WxH).
MAP_MAX_PIXELS = 4 * 1024 * 1024
# The oldest frames of each verdict a scan remembers: what the writer may remove to make room until the next.
OLDEST_KEPT = 4096
PRIORITY = ("pass", "error", "fail")  # when the archive is full, room is taken from the lowest first
MARKS = {"pass": "p", "error": "e", "fail": "f"}  # the verdict's letter in each kept frame's names
LEGACY = "fail"  # files named before marks existed: pruned by age and the cap, never for an error's room

# The capture's bytes are kept under the extension of its content type (imageformats'); anything else is `.bin`.
EXTENSIONS = {**imageformats.ARCHIVE_SUFFIXES, "application/json": "capture.json"}
OTHER_EXTENSION = "bin"
RESULT_SUFFIX = "json"
MAP_SUFFIX = "map.png"
# A frame id ending in one of these would let its files take another frame's `.map.png` or
# `.capture.json` name: such an id gets `~` and a hash appended in its file names.
_RESERVED_LAST_WORDS = frozenset({"map", "capture"})
_TWO_WORD_SUFFIXES = (f".{MAP_SUFFIX}", ".capture.json")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TEMP_PREFIX = ".tmp-"
_MARK = re.compile(r"~([pef])[0-9a-f]{8}$")
_VERDICT_OF_MARK = {mark: verdict for verdict, mark in MARKS.items()}
# Every suffix the archive writes, the longest first (`.map.png` before `.png`).
_SUFFIXES = tuple(sorted({f".{e}" for e in [*EXTENSIONS.values(), OTHER_EXTENSION, RESULT_SUFFIX, MAP_SUFFIX]},
                         key=len, reverse=True))


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


def names_for(date: str, line_id: str, camera_id: str, frame_id: str, content_type: str | None,
              mark: str = "") -> Names:
    """The names of a frame's files. The ids are cleaned again (a no-op for a parsed Capture's), so each
    component is one harmless, bounded name whatever is passed: never empty, `.`, `..`, never a `/` or
    NUL, at most 255 bytes; distinct frame ids never share a file. `mark` (new_mark) makes them unique."""
    day = date if _DATE.match(date) else "0000-00-00"
    line = clean_id(line_id, SOURCE_ID_MAX_BYTES) or "unknown"
    camera = clean_id(camera_id, SOURCE_ID_MAX_BYTES) or "unknown"
    frame = clean_id(frame_id, FRAME_ID_MAX_BYTES, distinct=True) or "unknown"
    if frame.rsplit(".", 1)[-1].lower() in _RESERVED_LAST_WORDS:
        frame += "~" + hashlib.blake2b(frame.encode(), digest_size=4).hexdigest()
    if mark:
        frame += f"~{mark}"
    return Names(folder=f"{day}/{line}/{camera}", image=f"{frame}.{extension(content_type)}",
                 result=f"{frame}.{RESULT_SUFFIX}", map=f"{frame}.{MAP_SUFFIX}")


def new_mark(verdict: str) -> str:
    """A kept frame's mark: its verdict's letter (what the cap weighs) and 8 random hex digits (its names
    are its own, whatever frame id a camera reuses)."""
    return MARKS.get(verdict, MARKS["fail"]) + secrets.token_hex(4)


def parse_key(key: str) -> tuple[str, str] | None:
    """(frame, verdict) of a file this archive writes, from its key alone; None for any other name, which
    the archive never counts and never removes."""
    parts = key.split("/")
    if len(parts) != 4 or not _DATE.match(parts[0]) or not all(parts) or parts[3].startswith("."):
        return None
    name = parts[3]
    suffix = next((s for s in _SUFFIXES if name.endswith(s) and len(name) > len(s)), None)
    if suffix is None:
        return None
    frame = key[: -len(suffix)]
    marked = _MARK.search(frame)
    return frame, _VERDICT_OF_MARK[marked.group(1)] if marked else LEGACY


def frame_of(key: str) -> str:
    """The frame a stored file belongs to: its key without the suffix `names_for` gave it."""
    parsed = parse_key(key)
    if parsed is not None:
        return parsed[0]
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


def map_size(size: tuple[int, int]) -> tuple[int, int]:
    """The (width, height) a frame of `size` has its map drawn at: its own up to MAP_MAX_PIXELS, else scaled
    down to that with its aspect (to a pixel)."""
    width, height = size
    if width * height <= MAP_MAX_PIXELS:
        return width, height
    scale = math.sqrt(MAP_MAX_PIXELS / (width * height))
    drawn_height = min(height, max(1, math.floor(height * scale)))
    drawn_width = min(width, max(1, math.floor(width * scale)), MAP_MAX_PIXELS // drawn_height)
    return drawn_width, drawn_height


def map_png(values: np.ndarray, size: tuple[int, int], frame_size: tuple[int, int] | None = None) -> bytes:
    """The map a plugin drew at `size` (width, height), as the archive's 16-bit PNG; its text `frame-size`
    names the frame it covers (the size the frame was decoded at), for a viewer to scale it onto."""
    width, height = size
    values = np.asarray(values)
    if values.shape != (height, width):
        raise ValueError(f"the plugin drew a map of {values.shape[::-1]} for an image of {width}x{height}")
    info = PngInfo()
    info.add_text("frame-size", "{}x{}".format(*(frame_size or size)))
    out = io.BytesIO()
    map_image(values).save(out, format="PNG", compress_level=MAP_PNG_LEVEL, pnginfo=info)
    return out.getvalue()


# -- storage ---------------------------------------------------------------------------------------


class FolderArchive:
    """The archive in a folder; each file is written under a temporary name, then linked into place: a name
    that is taken is never written over (FileExistsError), and no reader ever sees half a file."""

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
            try:
                os.link(temporary, path)  # fails with EEXIST, never replaces
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                    raise
                with open(path, "xb") as out:  # a file system without hard links: exclusive, not atomic
                    out.write(data)
        finally:
            temporary.unlink(missing_ok=True)

    def listing(self) -> Iterator[tuple[str, int, float]]:
        """(key, bytes, modification time) of every file at the archive's depth (<date>/<line>/<camera>/),
        folder by folder as the file system gives them (memory: one entry per level, whatever the archive
        holds); symbolic links are not followed; half-written files from a crash are removed."""
        now = time.time()
        for day in _folders(str(self.root)):
            if not _DATE.match(day.name):
                continue
            for line in _folders(day.path):
                for camera in _folders(line.path):
                    for entry in _scan(camera.path):
                        try:
                            if not entry.is_file(follow_symlinks=False):
                                continue
                            stat = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if entry.name.startswith(_TEMP_PREFIX):
                            if now - stat.st_mtime > STALE_TEMP_S:
                                Path(entry.path).unlink(missing_ok=True)
                            continue
                        yield f"{day.name}/{line.name}/{camera.name}/{entry.name}", stat.st_size, stat.st_mtime

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


def _scan(folder: str) -> Iterator[os.DirEntry]:
    """A folder's entries, read as they are asked for; none when the folder has gone."""
    try:
        with os.scandir(folder) as entries:
            yield from entries
    except (FileNotFoundError, NotADirectoryError):
        return


def _folders(folder: str) -> Iterator[os.DirEntry]:
    for entry in _scan(folder):
        try:
            if entry.is_dir(follow_symlinks=False):
                yield entry
        except OSError:
            continue


class S3Archive:
    """The archive under s3://bucket/prefix, on the endpoint and credentials of the model store's
    environment (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...), through the store's S3 helper: its failures
    name evidence.path and the fix, as the model store's name store.path."""

    def __init__(self, url: str, client: Any = None) -> None:
        self.s3 = S3Bucket(url, client, setting="evidence.path", what="the evidence archive")
        self.bucket, self.prefix = self.s3.name, self.s3.prefix

    @property
    def client(self) -> Any:
        return self.s3.client

    def location(self, key: str) -> str:
        return f"{self.s3.root}{key}"

    def prepare(self) -> None:
        self.s3.check()

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Only when the key is free (`If-None-Match: *`): a key that is taken is never written over
        (FileExistsError, as in a folder)."""
        try:
            self.s3.call("put_object", Bucket=self.bucket, Key=self.prefix + key, Body=data,
                         ContentType=content_type, IfNoneMatch="*")
        except Conflict as exc:
            raise FileExistsError(f"{self.location(key)}: taken ({exc}); never written over") from None

    def listing(self) -> Iterator[tuple[str, int, float]]:
        for item in self.s3.objects(self.prefix):
            yield item["Key"][len(self.prefix):], int(item["Size"]), item["LastModified"].timestamp()

    def delete(self, keys: list[str]) -> None:
        self.s3.delete([self.prefix + key for key in keys])


class Archive(Protocol):
    """Where kept frames go: FolderArchive or S3Archive. Keys are '/'-separated, relative to the root."""

    def location(self, key: str) -> str: ...

    def prepare(self) -> None: ...

    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def listing(self) -> Iterator[tuple[str, int, float]]: ...

    def delete(self, keys: list[str]) -> None: ...


def open_archive(path: str) -> Archive:
    return S3Archive(path) if is_s3_url(path) else FolderArchive(path)


# -- the budget ------------------------------------------------------------------------------------


@dataclass(eq=False)
class Stored:
    """One frame in the archive, as a scan found it."""

    frame: str
    verdict: str
    modified: float
    keys: list[str]
    bytes: int = 0

    @property
    def files(self) -> int:
        return len(self.keys)


class Oldest:
    """The `limit` oldest frames of one verdict in a listing of any length, in memory for 2 x `limit`."""

    def __init__(self, limit: int = OLDEST_KEPT) -> None:
        self.limit = limit
        self._frames: dict[str, Stored] = {}
        self._newest = math.inf  # once trimmed: a new frame this recent or more cannot be among the oldest

    def add(self, frame: str, verdict: str, key: str, size: int, modified: float) -> None:
        stored = self._frames.get(frame)
        if stored is None:
            if modified >= self._newest:
                return
            stored = self._frames[frame] = Stored(frame, verdict, modified, [])
        stored.keys.append(key)
        stored.bytes += size
        stored.modified = max(stored.modified, modified)
        if len(self._frames) > 2 * self.limit:
            kept = self.oldest_first()
            self._frames = {s.frame: s for s in kept}
            self._newest = kept[-1].modified

    def oldest_first(self) -> list[Stored]:
        return sorted(self._frames.values(), key=lambda s: s.modified)[: self.limit]


class Budget:
    """The archive's bytes and files per verdict as the writer keeps them, and the oldest frames of each
    verdict that the last scan found: what may be removed to make room. Exact between scans (every write and
    removal is counted); a scan replaces the tallies with what it found plus what changed while it ran. Pure
    bookkeeping behind one lock; the archive's I/O happens outside it."""

    def __init__(self, max_bytes: int, max_files: int) -> None:
        self.max_bytes, self.max_files = max_bytes, max_files
        self.bytes = dict.fromkeys(PRIORITY, 0)
        self.files = dict.fromkeys(PRIORITY, 0)
        self.rescan_wanted = False  # room was refused while the archive holds frames no scan has listed
        self._candidates: dict[str, deque[Stored]] = {verdict: deque() for verdict in PRIORITY}
        self._during_scan: tuple[dict, dict, set] | None = None  # bytes, files changed; frames removed
        self._lock = threading.Lock()

    def make_room(self, verdict: str, size: int, files: int, partial: bool = False) -> list[Stored] | None:
        """The frames to remove (oldest first, of the lowest verdicts up to `verdict`) so that a frame of
        `size` bytes in `files` files fits; [] when it fits now; None when it cannot (then nothing is taken),
        or with `partial` the known frames that bring it closer."""
        rank = PRIORITY.index(verdict) if verdict in PRIORITY else len(PRIORITY) - 1
        with self._lock:
            if (self.max_bytes and size > self.max_bytes) or (self.max_files and files > self.max_files):
                return None
            over_bytes = sum(self.bytes.values()) + size - self.max_bytes if self.max_bytes else 0
            over_files = sum(self.files.values()) + files - self.max_files if self.max_files else 0
            taken: list[Stored] = []
            for lower in PRIORITY[: rank + 1]:
                candidates = self._candidates[lower]
                while (over_bytes > 0 or over_files > 0) and candidates:
                    stored = candidates.popleft()
                    taken.append(stored)
                    over_bytes -= stored.bytes
                    over_files -= stored.files
            if over_bytes > 0 or over_files > 0:
                if partial:
                    self.rescan_wanted = True
                    return taken
                for stored in reversed(taken):
                    self._candidates[stored.verdict].appendleft(stored)
                if any(self.files[lower] > len(self._candidates[lower]) for lower in PRIORITY[: rank + 1]):
                    self.rescan_wanted = True  # frames of these verdicts are there, but not among the oldest known
                return None
            return taken

    def removed(self, frames: list[Stored]) -> None:
        with self._lock:
            for stored in frames:
                self._change(stored.verdict, -stored.bytes, -stored.files)
                if self._during_scan is not None:
                    self._during_scan[2].add(stored.frame)

    def added(self, verdict: str, size: int, files: int) -> None:
        with self._lock:
            self._change(verdict, size, files)

    def written(self, stored: Stored) -> None:
        """A frame the writer has just kept: the newest of its verdict, so it may join the known frames'
        tail (up to 2 x OLDEST_KEPT of them; past that the next scan finds it)."""
        with self._lock:
            candidates = self._candidates.get(stored.verdict)
            if candidates is not None and len(candidates) < 2 * OLDEST_KEPT:
                candidates.append(stored)

    def _change(self, verdict: str, size: int, files: int) -> None:
        self.bytes[verdict] = max(0, self.bytes[verdict] + size)
        self.files[verdict] = max(0, self.files[verdict] + files)
        if self._during_scan is not None:
            self._during_scan[0][verdict] += size
            self._during_scan[1][verdict] += files

    def scan_started(self) -> None:
        with self._lock:
            self._during_scan = (dict.fromkeys(PRIORITY, 0), dict.fromkeys(PRIORITY, 0), set())

    def scanned(self, sizes: dict[str, int], files: dict[str, int], oldest: dict[str, list[Stored]]) -> None:
        """A scan's findings: the tallies become them plus what changed while it ran (a frame written during
        the scan may be counted twice, too much by what was written meanwhile; the next scan corrects it)."""
        with self._lock:
            changed_bytes, changed_files, gone = self._during_scan or ({}, {}, set())
            for verdict in PRIORITY:
                self.bytes[verdict] = max(0, sizes[verdict] + changed_bytes.get(verdict, 0))
                self.files[verdict] = max(0, files[verdict] + changed_files.get(verdict, 0))
                self._candidates[verdict] = deque(s for s in oldest[verdict] if s.frame not in gone)
            self._during_scan = None
            self.rescan_wanted = False


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


class Evidence:
    """The worker's evidence archive; with `[evidence] enabled = false` every method is a cheap no-op."""

    def __init__(self, settings: EvidenceSettings, metrics: Metrics, *, archive: Archive | None = None,
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
        self._wake_pruner = threading.Event()  # the writer found no known frame to make room with: scan now
        self._budget = Budget(settings.max_bytes, settings.max_files)
        self._stuck_after_s = STUCK_AFTER_S
        self._writer_progress = time.monotonic()
        self._watchdog: Watchdog | None = None
        self._throttle = Throttle(log)
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
        if self.stuck:
            self.metrics.evidence_not_kept("writer_stuck")
            self._throttle.warning("writer_stuck", "evidence: the writer has made no progress for over %g s (a hung "
                                   "%s?); frames are answered but not kept until it moves", self._stuck_after_s,
                                   self.settings.path)
            return None
        if (len(self._queue) >= self.settings.queue_size
                or self._queued_bytes + len(original) > self.settings.queue_bytes):
            self.metrics.evidence_not_kept("queue_full")
            self._throttle.warning("queue_full", "evidence: the writer's queue is full (%d frames); frames are "
                                   "answered but not kept until it drains (a slow %s?)", len(self._queue),
                                   self.settings.path)
            return None
        names = names_for(inspected_at[:10], capture.line_id, capture.camera_id, capture.frame_id,
                          capture.content_type, new_mark(verdict))
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

    @property
    def stuck(self) -> bool:
        """Whether the writer has been on one frame without progress for longer than its limit (a hung mount)."""
        return self._writing and time.monotonic() - self._writer_progress > self._stuck_after_s

    def watch(self, watchdog: Watchdog, limit_s: float) -> None:
        """Register the writer and the pruner with the worker's watchdog: a dead one (a bug) makes the worker
        unhealthy. A stuck one does not, since evidence never holds a verdict: past `limit_s` without progress
        the writer is `stuck` and frames are not kept (counted) until it moves; its stall shows in
        inspector_thread_stall_seconds. Nothing is watched while the archive is off."""
        if not self.enabled:
            return
        self._watchdog = watchdog
        self._stuck_after_s = limit_s
        watchdog.watch("evidence", self._writer.is_alive, lambda: self._writing or bool(self._queue), math.inf,
                       lambda: self._writer_progress)
        watchdog.watch("evidence-prune", self._pruner.is_alive, lambda: self._pruning, math.inf)

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
        self._wake_pruner.set()
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
            self._writer_progress = time.monotonic()
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
        if job.draw is not None:  # at the size the frame was decoded at, never from its bytes again
            if job.size is None:
                raise ValueError("the image's size is unknown, so its map cannot be drawn")
            drawn = map_size(job.size)
            files.append((names.map, map_png(job.draw(drawn), drawn, job.size), "image/png"))
        files.append((names.result, job.result, "application/json"))  # last: a frame with its JSON is whole
        size = sum(len(data) for _, data, _ in files)
        room = self._budget.make_room(job.verdict, size, len(files))
        if room is None:
            self.metrics.evidence_not_kept("archive_full")
            self._throttle.warning("archive_full", "evidence: %s is full (evidence.max_bytes %d, evidence.max_files "
                                   "%d) of frames that a %s frame may not replace; frames are answered but not kept",
                                   self.settings.path, self.settings.max_bytes, self.settings.max_files, job.verdict)
            if self._budget.rescan_wanted:
                self._wake_pruner.set()
            return
        self._remove(room, "size", "evidence")
        written = Stored(names.key(names.result)[: -len(RESULT_SUFFIX) - 1], job.verdict, time.time(), [])
        for name, data, content_type in files:
            self.archive.put(names.key(name), data, content_type)
            self._budget.added(job.verdict, len(data), 1)
            written.keys.append(names.key(name))
            written.bytes += len(data)
            self._beat("evidence")
        self._budget.written(written)
        self.metrics.evidence_written(job.verdict, size)

    # -- the pruner ---------------------------------------------------------------------------------

    def _prune_loop(self) -> None:
        _lower_priority()
        while not self._stop_pruning.is_set():
            try:
                self.prune()
            except Exception as exc:  # noqa: BLE001 - an unreachable store: tried again at the next round
                self._throttle.warning("prune", "evidence: pruning %s failed: %s", self.settings.path, exc)
            self._wake_pruner.wait(self.prune_every_s)
            self._wake_pruner.clear()

    def prune(self, now: float | None = None) -> tuple[int, int]:
        """One walk of the archive: remove the frames older than retention_days as they are found, count the
        rest and remember the oldest of each verdict, then remove the oldest (lowest verdicts first) until the
        archive is within its caps; (frames removed for age, for the caps). Files whose names the archive
        does not write are neither counted nor removed."""
        now = time.time() if now is None else now
        days = self.settings.retention_days
        cutoff = now - days * 86400 if days else -math.inf
        self._pruning = True
        self._budget.scan_started()
        try:
            sizes, files = dict.fromkeys(PRIORITY, 0), dict.fromkeys(PRIORITY, 0)
            oldest = {verdict: Oldest() for verdict in PRIORITY}
            expired: list[str] = []
            expired_frames: deque[str] = deque(maxlen=64)  # a frame's files come together: counted once
            aged = 0
            for count, (key, size, modified) in enumerate(self.archive.listing()):
                if count % 1000 == 0:
                    self._beat("evidence-prune")
                parsed = parse_key(key)
                if parsed is None:
                    continue
                frame, verdict = parsed
                if modified < cutoff:
                    expired.append(key)
                    if frame not in expired_frames:
                        expired_frames.append(frame)
                        aged += 1
                    if len(expired) >= 1000:
                        self.archive.delete(expired)
                        expired = []
                    continue
                sizes[verdict] += size
                files[verdict] += 1
                oldest[verdict].add(frame, verdict, key, size, modified)
            if expired:
                self.archive.delete(expired)
            if aged:
                self.metrics.evidence_removed("age", aged)
                log.info("evidence: pruned %d frames from %s (older than evidence.retention_days)", aged,
                         self.settings.path)
            self._budget.scanned(sizes, files, {verdict: found.oldest_first() for verdict, found in oldest.items()})
            over = self._budget.make_room(PRIORITY[-1], 0, 0, partial=True) or []
            self._remove(over, "size", "evidence-prune")
            if self._budget.rescan_wanted:  # still over the caps: the next round comes at once
                self._wake_pruner.set()
            return aged, len(over)
        finally:
            self._pruning = False
            self._beat("evidence-prune")

    def _remove(self, frames: list[Stored], reason: str, thread: str) -> None:
        """Remove whole frames: every name the archive could have given each (a scan that ran while a frame
        was being written saw only part of it)."""
        for start in range(0, len(frames), 80):
            chunk = frames[start:start + 80]
            self.archive.delete(sorted({key for stored in chunk
                                        for key in [*stored.keys, *(stored.frame + s for s in _SUFFIXES)]}))
            self._budget.removed(chunk)
            self.metrics.evidence_removed(reason, len(chunk))
            self._beat(thread)
        if frames and thread == "evidence-prune":
            log.info("evidence: pruned %d frames from %s (over evidence.max_bytes or evidence.max_files)",
                     len(frames), self.settings.path)

    def _beat(self, name: str) -> None:
        if name == "evidence":
            self._writer_progress = time.monotonic()
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
