"""Images read and prepared on a thread pool, in order, with a bounded window in flight: how refit and
evaluate feed a plugin from a folder without holding the folder in memory."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from inspector.config import WorkerSettings
from inspector.errors import FrameError
from inspector.imagefiles import PixelBudget, UnreadableImage
from inspector.tools.progress import Progress
from inspector.worker.decode import DecodeLimits, read_file

log = logging.getLogger(__name__)

# Images of max_pixels each decoding at once, at most, whatever the number of threads: about 7 bytes a pixel at
# the peak, so 1.4 GB for refit's 100 Mpx.
BUDGET_IMAGES = 2
DEFAULT_MAX_BYTES = WorkerSettings.model_fields["max_image_bytes"].default


class ImageStream:
    """Read and prepare images on a thread pool, in order, with at most `workers * 4` in flight; a file
    that fails (unreadable, truncated, refused by a limit, or by the plugin's prepare) is skipped with a
    warning that names it. `read` turns a path into pixels: by default the worker's decoding of the file
    (decode.read_file) under `max_pixels`; refit, evaluate and explain pass it with their own limits.
    A reader that decodes with the worker's decoder holds its image's pixels of a budget of
    BUDGET_IMAGES x `max_pixels` until the image is prepared (no budget when `max_pixels` is 0)."""

    def __init__(self, prepare: Callable[[np.ndarray], torch.Tensor], workers: int, max_pixels: int,
                 progress: Progress, min_size: tuple[int, int] | None = None,
                 read: Callable[[Path], np.ndarray] | None = None) -> None:
        self.prepare = prepare
        limits = DecodeLimits(DEFAULT_MAX_BYTES, max_pixels)
        self.read = read or (lambda path: read_file(path, limits, min_size))
        self.budget = PixelBudget(BUDGET_IMAGES * max_pixels) if max_pixels > 0 else None
        self.workers = workers
        self.progress = progress
        self.skipped: list[tuple[Path, str]] = []
        self.used = 0

    def _load(self, path: Path) -> torch.Tensor:
        if self.budget is None:
            return self.prepare(self.read(path))
        with self.budget.image():
            return self.prepare(self.read(path))

    def images(self, paths: Iterable[Path]) -> Iterator[torch.Tensor]:
        for _, tensor in self.indexed(paths):
            yield tensor

    def indexed(self, paths: Iterable[Path]) -> Iterator[tuple[int, torch.Tensor]]:
        """(position in `paths`, prepared tensor) for every file that could be used, in order."""
        window = self.workers * 4
        with ThreadPoolExecutor(self.workers, thread_name_prefix="decode") as pool:
            pending: deque[tuple[int, Path, Future]] = deque()
            try:
                for index, path in enumerate(paths):
                    pending.append((index, path, pool.submit(self._load, path)))
                    if len(pending) >= window:
                        yield from self._take(*pending.popleft())
                while pending:
                    yield from self._take(*pending.popleft())
            finally:
                for _, _, future in pending:
                    future.cancel()

    def _take(self, index: int, path: Path, future: Future) -> Iterator[tuple[int, torch.Tensor]]:
        try:
            tensor = future.result()
        except Exception as exc:  # noqa: BLE001 - one odd file (mode, size, decoder bug) must not end the run
            self._skip(path, _reason(exc))
        else:
            self.used += 1
            yield index, tensor
        self.progress.advance()

    def _skip(self, path: Path, reason: str) -> None:
        log.warning("skipping %s: %s", path, reason)
        self.skipped.append((path, reason))

    def batches(self, paths: Iterable[Path], size: int) -> Iterator[torch.Tensor]:
        for _, batch in self.indexed_batches(paths, size):
            yield batch

    def indexed_batches(self, paths: Iterable[Path], size: int) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Stacked batches of up to `size` usable images, each with the positions in `paths` of its images."""
        indices: list[int] = []
        batch: list[torch.Tensor] = []
        for index, tensor in self.indexed(paths):
            indices.append(index)
            batch.append(tensor)
            if len(batch) == size:
                yield indices, torch.stack(batch)
                indices, batch = [], []
        if batch:
            yield indices, torch.stack(batch)


def _reason(exc: Exception) -> str:
    """Why a file was skipped, in one line: the frame error's code, the OS's words, or the exception."""
    if isinstance(exc, FrameError):
        return f"{exc.code}: {exc}"
    if isinstance(exc, UnreadableImage):
        return str(exc)
    if isinstance(exc, OSError):
        return f"cannot be read: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"
