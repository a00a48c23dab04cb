"""Hostile images and archives against the readers: the worker's decoder, and refit's walk and decode pool.

- a progressive JPEG of 1,000 (and of 20,000) scans of end-of-band runs at 7000 x 7000: refused as
  image_too_complex from a count of its markers; plain Pillow decodes every scan over the whole image;
- an archive whose symlinks loop (`self -> .`, `up -> ..`): the walk skips symlinked folders; the old walk
  followed them, 2**40 paths deep before the kernel's ELOOP;
- eight threads decoding 25 Mpx images: under the pixel budget two at a time; the old pool all eight.
"""

from __future__ import annotations

import functools
import os
import tempfile
import threading
import time
from pathlib import Path

from hostile import Case
from PIL import Image

from inspector.config import WorkerSettings
from inspector.errors import FrameError
from inspector.imagefiles import is_image_file, scan_images
from inspector.tools.imagestream import ImageStream
from inspector.tools.progress import Progress
from inspector.worker.decode import DecodeLimits, decode_capture
from tests.jpegkit import many_scan_jpeg

SIDE = 7000
POOL_THREADS = 8
POOL_PIXELS = 5000 * 5000


@functools.cache
def _work() -> Path:
    """Kept between runs: each case runs in a fresh process, and making the large images costs more than reading
    them."""
    folder = Path(tempfile.gettempdir()) / f"inspector-hostile-decode-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    return folder


@functools.cache
def _jpeg(scans: int) -> bytes:
    return many_scan_jpeg(SIDE, SIDE, scans)


def _worker_decode(scans: int) -> str:
    try:
        decode_capture(_jpeg(scans), "image/jpeg", None, DecodeLimits.from_settings(WorkerSettings()))
    except FrameError as exc:
        return exc.code
    return "decoded"


def _pillow_decode(scans: int) -> str:
    import io

    with Image.open(io.BytesIO(_jpeg(scans))) as image:
        image.load()
    return f"decoded, {len(_jpeg(scans)) // 1024} KiB"


@functools.cache
def _looping_archive() -> Path:
    root = _work() / "loops"
    if not root.exists():
        (root / "good").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "good" / "one.png")
        (root / "self").symlink_to(".")
        (root / "good" / "up").symlink_to("..")
    return root


def _walk() -> str:
    scan = scan_images(_looping_archive())
    return f"{len(scan.paths)} found, {len(scan.skipped)} skipped"


def _old_walk() -> str:
    """find_images before symlinked folders were skipped: it followed every one."""
    found, stack = 0, [_looping_archive()]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=True):
                    stack.append(Path(entry.path))
                elif is_image_file(Path(entry.name)):
                    found += 1
            except OSError:
                continue
    return f"{found} found"


@functools.cache
def _large_images() -> list[Path]:
    folder = _work() / "large"
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(POOL_THREADS):
        paths.append(folder / f"large{i}.png")
        if not paths[-1].exists():
            Image.new("RGB", (5000, 5000), (i, i, i)).save(paths[-1], compress_level=1)
    return paths


def _pool(read) -> str:
    paths = _large_images()
    inside, most = 0, 0
    lock = threading.Lock()

    def prepare(pixels):
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.05)
        with lock:
            inside -= 1
        return pixels[:1, :1].copy()  # not a view, which would keep the whole image

    with Progress(len(paths), "bench") as progress:
        stream = ImageStream(prepare, POOL_THREADS, POOL_PIXELS if read is None else 0, progress, read=read)
        list(stream.images(paths))
    return f"{len(paths)} decoded, at most {most} held at once"


def _old_pool() -> str:
    from inspector.imagefiles import read_image

    return _pool(lambda path: read_image(path, POOL_PIXELS))


CASES = [
    Case("jpeg: 1,000 scans, 7000x7000 (170 KB)", lambda: _worker_decode(1000), lambda: _pillow_decode(1000),
         unbounded_limit_s=60.0),
    Case("jpeg: 20,000 scans, 7000x7000 (1 MB)", lambda: _worker_decode(20_000), lambda: _pillow_decode(20_000),
         unbounded_limit_s=60.0),
    Case("jpeg: libjpeg's own 10 scans, 7000x7000", lambda: _worker_decode(10), lambda: _pillow_decode(10)),
    Case("refit archive: self -> ., up -> ..", _walk, _old_walk, unbounded_limit_s=20.0),
    Case(f"refit pool: {POOL_THREADS} threads, 25 Mpx images", lambda: _pool(None), _old_pool),
]
