"""Image files scored the worker's way, each with its anomaly map when the model draws them: what
`inspector explain` writes and what the galleries of `inspector evaluate --report` show.

Files are read by the caller's `read` (the worker's capture decoding, in the tools), prepared on a
thread pool as evaluate does (tools/imagestream.py), and scored in batches by the plugin's `explain`,
which scores exactly as `score` does, through the worker's own `explain_batch`; a plugin without
`explain` gets no maps. Every file gets an answer: one that cannot be read or scored
comes back with an error code from inspector/errors.py, as the worker would answer it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from inspector import imageformats
from inspector.errors import FrameError
from inspector.plugin import can_explain
from inspector.tools.imagestream import ImageStream
from inspector.tools.overlay import checked_map
from inspector.tools.progress import Progress
from inspector.worker.serving import ServedModel, explain_batch

log = logging.getLogger(__name__)


@dataclass
class Answer:
    """One file's answer: its pixels (None when unreadable), its scores and map, or an error."""

    index: int
    path: Path
    pixels: np.ndarray | None = None  # as scored (a JPEG may be decoded at reduced scale)
    size: tuple[int, int] | None = None  # the file's own (width, height)
    probability: float | None = None
    score: float | None = None
    map: np.ndarray | None = None  # height x width of `size`, in [0, 1]
    error: tuple[str, str] | None = None  # (code, message)

    def verdict(self, threshold: float) -> str:
        if self.error is not None:
            return "error"
        return "fail" if self.probability >= threshold else "pass"


@dataclass(frozen=True)
class _Read:
    """What a decode thread hands over: the prepared tensor, or why there is none."""

    tensor: torch.Tensor | None
    pixels: np.ndarray | None
    size: tuple[int, int] | None
    error: tuple[str, str] | None = None


def answers(served: ServedModel, paths: list[Path], read: Callable[[Path], np.ndarray], batch_size: int,
            workers: int, progress: Progress, maps: bool = True) -> Iterator[Answer]:
    """An Answer for every path, in order. With `maps` and a plugin that draws them, each scored image
    has its map at the file's own size."""
    explain = maps and can_explain(served.plugin)

    def load(path: Path) -> _Read:
        try:
            pixels = read(path)  # the worker's decoding judges the file first, with its error codes
            size = _file_size(path)
            return _Read(served.plugin.prepare(pixels), pixels, size)
        except FrameError as exc:
            return _Read(None, None, None, (exc.code, str(exc)))
        except OSError as exc:
            return _Read(None, None, None, ("file_not_found", f"{path}: {exc.strerror or exc}"))
        except Exception as exc:  # noqa: BLE001 - the plugin's prepare failed on this image
            return _Read(None, None, None, ("scoring_failed", f"{served.plugin_name} could not prepare it: {exc!r}"))

    stream = ImageStream(lambda loaded: loaded, workers, 0, progress, read=load)
    pending: list[Answer] = []
    tensors: list[torch.Tensor] = []
    for index, loaded in stream.indexed(paths):
        answer = Answer(index=index, path=paths[index], pixels=loaded.pixels, size=loaded.size, error=loaded.error)
        if answer.error is not None:
            log.warning("%s: %s: %s", answer.path, *answer.error)
            pending.append(answer)
            continue
        pending.append(answer)
        tensors.append(loaded.tensor)
        if len(tensors) == batch_size:
            yield from _scored(served, pending, tensors, explain)
            pending, tensors = [], []
    yield from _scored(served, pending, tensors, explain)


def _file_size(path: Path) -> tuple[int, int]:
    """The (width, height) a file declares, from its header as the worker's decoder read it: with that
    decoder's formats only, in its order, so a file that is also another format's header (a TIFF that reads
    as a 13000 x 13000 IM image to Pillow's every plugin) gets the size of the image that was scored."""
    try:
        with Image.open(path, formats=imageformats.PIL_FORMATS) as image:
            return image.size
    except (UnidentifiedImageError, ValueError, SyntaxError) as exc:  # a header PIL cannot read
        raise FrameError("image_undecodable", f"{path}: {exc}") from exc


def _scored(served: ServedModel, pending: list[Answer], tensors: list[torch.Tensor],
            explain: bool) -> Iterator[Answer]:
    """Score the readable answers of `pending` (one tensor each, in order) as the worker does, each with its
    map at its file's own size when `explain`; yield all of them in order."""
    readable = [answer for answer in pending if answer.error is None]
    if readable:
        probability, raw, failures, maps = explain_batch(served, tensors, maps=explain)
        for answer, p, r, failure, draw in zip(readable, probability, raw, failures, maps):
            if failure is None and draw is not None:
                try:
                    answer.map = checked_map(draw(answer.size), answer.size)
                except Exception as exc:  # noqa: BLE001 - a bad map is the plugin's failure on this frame
                    failure = f"{served.plugin_name} drew no usable map: {exc}"
            _settle(answer, p, r, failure)
    yield from pending


def _settle(answer: Answer, probability: float, raw: float, failure: str | None) -> None:
    if failure is not None:
        log.warning("%s: scoring_failed: %s", answer.path, failure)
        answer.error, answer.map = ("scoring_failed", failure), None
    else:
        answer.probability, answer.score = float(probability), float(raw)


def full_size(answer: Answer, read_full: Callable[[Path], np.ndarray]) -> np.ndarray:
    """The answer's pixels at the file's own size: those scored when they are, else read again in full
    (a JPEG the worker decodes at reduced scale)."""
    pixels = answer.pixels
    if pixels is not None and answer.size == (pixels.shape[1], pixels.shape[0]):
        return pixels
    return read_full(answer.path)
