"""The run's frames: generated good parts at one resolution, encoded once per encoding and cycled through."""

from __future__ import annotations

import functools
import io
import logging
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from inspector.errors import ConfigError
from inspector.imagefiles import raw_pixels
from inspector.tools import samples
from inspector.tools.bench.options import ENCODER_OPTIONS, ENCODINGS, BenchOptions, split_kind

log = logging.getLogger(__name__)

DISTINCT_FRAMES = 8  # generated frames per run, cycled through


@dataclass
class Frames:
    """The run's frames of one kind (an encoding, at a resolution): bodies (cycled through), their content
    type and the headers a camera sends with them (a raw frame's width, height and pixel format)."""

    encoding: str  # the --encoding entry, e.g. `jpeg` or `jpeg:256`
    content_type: str
    bodies: list[bytes]
    headers: dict[str, Any] = field(default_factory=dict)
    resolution: int = 0

    @property
    def mean_bytes(self) -> int:
        return int(statistics.fmean(len(b) for b in self.bodies))

    def body(self, i: int) -> bytes:
        return self.bodies[i % len(self.bodies)]


def make_frames(options: BenchOptions, max_bytes: int) -> list[Frames]:
    """DISTINCT_FRAMES generated good frames per resolution, encoded once in every encoding asked for."""
    log.info("generating %d frames of %dx%d, encoded as %s", DISTINCT_FRAMES, options.resolution,
             options.resolution, ", ".join(options.encodings))
    images: dict[int, list[np.ndarray]] = {}
    out = []
    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        for kind in options.encodings:
            encoding, size = split_kind(kind, options.resolution)
            if size not in images:
                images[size] = samples.make_images(DISTINCT_FRAMES, seed=7, size=size)
            fmt = ENCODINGS[encoding]
            headers: dict[str, Any] = {}
            if fmt.raw:
                bodies = [raw_pixels(image, fmt.name) for image in images[size]]
                headers = {"width": size, "height": size, "pixel_format": fmt.name}
            else:
                params = ENCODER_OPTIONS.get(fmt.name, {})
                bodies = list(pool.map(functools.partial(_encode, fmt=fmt.pil_format, params=params), images[size]))
            largest = max(len(b) for b in bodies)
            if largest > max_bytes:
                raise ConfigError(f"--resolution {size}: a {encoding} frame is {largest} bytes, over "
                                  f"worker.max_image_bytes ({max_bytes}); the worker would refuse it")
            out.append(Frames(kind, fmt.content_type, bodies, headers, size))
    return out


def _encode(image: np.ndarray, fmt: str, params: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **params)
    return buffer.getvalue()
