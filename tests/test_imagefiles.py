"""Walking an archive and reading its files as refit, evaluate and explain do: real folders, real symlinks,
real files decoded by Pillow through the worker's decoder."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inspector.errors import FrameError
from inspector.imagefiles import PixelBudget, scan_images
from inspector.tools.imagestream import ImageStream
from inspector.tools.progress import Progress
from inspector.worker.decode import DecodeLimits, read_file

LIMITS = DecodeLimits(max_image_bytes=1 << 20, max_image_pixels=1 << 20)


def _png(path: Path, side: int = 8) -> Path:
    Image.new("RGB", (side, side), (10, 20, 30)).save(path)
    return path


def test_the_walk_never_loops_and_never_follows_a_folder_out(tmp_path):
    archive, outside = tmp_path / "archive", tmp_path / "outside"
    (archive / "a").mkdir(parents=True)
    outside.mkdir()
    _png(archive / "a" / "one.png")
    _png(outside / "secret.png")
    (archive / "loop.png").symlink_to("loop.png")
    (archive / "x").symlink_to("x")
    (archive / "self").symlink_to(".")
    (archive / "a" / "up").symlink_to("..")
    (archive / "pulled").symlink_to(outside)
    (archive / "a" / "two.png").symlink_to(archive / "a" / "one.png")
    started = time.perf_counter()
    scan = scan_images(archive)
    assert time.perf_counter() - started < 1.0
    assert [p.relative_to(archive).as_posix() for p in scan.paths] == ["a/one.png", "a/two.png", "loop.png"]
    assert sorted(p.name for p, reason in scan.skipped if reason.startswith("symlinked_folder")) == [
        "pulled", "self", "up"]
    with pytest.raises(FrameError) as loop:  # judged when read, like any file
        read_file(archive / "loop.png", LIMITS)
    assert loop.value.code == "file_not_found" and "symbolic links" in str(loop.value)
    assert read_file(archive / "a" / "two.png", LIMITS).shape == (8, 8, 3)


def test_a_symlinked_root_is_followed(tmp_path):
    (tmp_path / "real").mkdir()
    _png(tmp_path / "real" / "one.png")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert [p.name for p in scan_images(tmp_path / "link").paths] == ["one.png"]


def test_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo.png")
    started = time.perf_counter()
    with pytest.raises(FrameError) as caught:
        read_file(tmp_path / "fifo.png", LIMITS)
    assert caught.value.code == "file_not_found" and time.perf_counter() - started < 1.0


def test_refit_s_reader_uses_only_the_worker_s_formats(tmp_path):
    """Pillow would read a GIF named .png (and any of its 40 formats); the worker refuses it, so refit does."""
    path = tmp_path / "part.png"
    Image.new("RGB", (8, 8)).save(path, format="GIF")
    with pytest.raises(FrameError) as caught:
        read_file(path, LIMITS)
    assert caught.value.code == "image_undecodable"


def test_decode_threads_hold_at_most_the_pixel_budget(tmp_path):
    """Eight threads, images of the whole limit each, a budget of two: never more than two decoded at once."""
    side = 64
    paths = [_png(tmp_path / f"p{i}.png", side) for i in range(12)]
    inside, most = 0, 0
    lock = threading.Lock()

    def prepare(pixels: np.ndarray) -> torch.Tensor:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.05)
        with lock:
            inside -= 1
        return torch.from_numpy(pixels)

    with Progress(len(paths), "test") as progress:
        stream = ImageStream(prepare, 8, side * side, progress)
        assert stream.budget is not None and stream.budget.capacity == 2 * side * side
        assert len(list(stream.images(paths))) == 12
    assert most == 2
    assert stream.budget.free == stream.budget.capacity  # every hold given back


def test_an_image_over_the_whole_budget_waits_for_all_of_it():
    budget = PixelBudget(100)
    order: list[str] = []
    first_holds = threading.Event()

    def big():
        from inspector.imagefiles import reserve_pixels

        with budget.image():
            reserve_pixels(1_000)  # more than the budget: takes all of it
            order.append("big")

    with budget.image():
        from inspector.imagefiles import reserve_pixels

        reserve_pixels(10)
        thread = threading.Thread(target=big)
        thread.start()
        first_holds.wait(0.2)
        assert order == []  # waits while 10 are held
        order.append("small done")
    thread.join(5)
    assert order == ["small done", "big"] and budget.free == 100
