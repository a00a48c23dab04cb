"""The run's frames: generated good parts at one resolution, encoded once per encoding and cycled through."""

from __future__ import annotations

import functools
import io
import logging
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from inspector.errors import ConfigError
from inspector.tools import samples
from inspector.tools.bench.options import ENCODINGS, BenchOptions

log = logging.getLogger(__name__)

DISTINCT_FRAMES = 8  # generated frames per run, cycled through


@dataclass
class Frames:
    """The run's frames of one encoding: encoded bodies (cycled through) and their content type."""

    encoding: str
    content_type: str
    bodies: list[bytes]

    @property
    def mean_bytes(self) -> int:
        return int(statistics.fmean(len(b) for b in self.bodies))

    def body(self, i: int) -> bytes:
        return self.bodies[i % len(self.bodies)]


def make_frames(options: BenchOptions, max_bytes: int) -> list[Frames]:
    """DISTINCT_FRAMES generated good frames, encoded once in every encoding asked for."""
    log.info("generating %d frames of %dx%d, encoded as %s", DISTINCT_FRAMES, options.resolution,
             options.resolution, ", ".join(options.encodings))
    images = samples.make_images(DISTINCT_FRAMES, seed=7, size=options.resolution)
    out = []
    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        for encoding in options.encodings:
            fmt, content_type, params = ENCODINGS[encoding]
            bodies = list(pool.map(functools.partial(_encode, fmt=fmt, params=params), images))
            largest = max(len(b) for b in bodies)
            if largest > max_bytes:
                raise ConfigError(f"--resolution {options.resolution}: a {encoding} frame is {largest} bytes, over "
                                  f"worker.max_image_bytes ({max_bytes}); the worker would refuse it")
            out.append(Frames(encoding, content_type, bodies))
    return out


def _encode(image: np.ndarray, fmt: str, params: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **params)
    return buffer.getvalue()
