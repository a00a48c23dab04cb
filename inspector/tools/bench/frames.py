"""The run's frames: generated good parts at one resolution, encoded once per encoding and cycled through;
with --failing, defective parts too, mixed in at each share asked for."""

from __future__ import annotations

import functools
import io
import logging
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from inspector import imageformats
from inspector.errors import ConfigError
from inspector.imagefiles import raw_pixels
from inspector.tools import samples
from inspector.tools.bench.options import ENCODER_OPTIONS, ENCODINGS, BenchOptions, failing_frame, split_kind

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
    defective: list[bytes] = field(default_factory=list)  # defective parts, encoded alike (with --failing)

    @property
    def mean_bytes(self) -> int:
        return int(statistics.fmean(len(b) for b in self.bodies))

    def body(self, i: int) -> bytes:
        return self.bodies[i % len(self.bodies)]

    def mixed(self, i: int, share: float) -> tuple[bytes, bool]:
        """Frame `i` of a run where `share` of the frames are defective parts: (body, whether defective)."""
        if share and failing_frame(i, share):
            return self.defective[i % len(self.defective)], True
        return self.body(i), False


def make_frames(options: BenchOptions, max_bytes: int) -> list[Frames]:
    """DISTINCT_FRAMES generated good frames per resolution, encoded once in every encoding asked for."""
    log.info("generating %d frames of %dx%d, encoded as %s", DISTINCT_FRAMES, options.resolution,
             options.resolution, ", ".join(options.encodings))
    images: dict[int, list[np.ndarray]] = {}
    defective: dict[int, list[np.ndarray]] = {}
    out = []
    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        for kind in options.encodings:
            encoding, size = split_kind(kind, options.resolution)
            if size not in images:
                images[size] = samples.make_images(DISTINCT_FRAMES, seed=7, size=size)
                if options.failing:  # every defect kind in turn
                    defective[size] = samples.make_images(DISTINCT_FRAMES, defective=True, seed=7, size=size)
            fmt = ENCODINGS[encoding]
            headers: dict[str, Any] = {}
            if fmt.raw:
                bodies = [raw_pixels(image, fmt.name) for image in images[size]]
                bad = [raw_pixels(image, fmt.name) for image in defective.get(size, [])]
                headers = {"width": size, "height": size, "pixel_format": fmt.name}
            else:
                encode = functools.partial(_encode, fmt=fmt.pil_format, params=ENCODER_OPTIONS.get(fmt.name, {}))
                bodies = list(pool.map(encode, images[size]))
                bad = list(pool.map(encode, defective.get(size, [])))
            largest = max(len(b) for b in bodies + bad)
            if largest > max_bytes:
                raise ConfigError(f"--resolution {size}: a {encoding} frame is {largest} bytes, over "
                                  f"worker.max_image_bytes ({max_bytes}); the worker would refuse it")
            out.append(Frames(kind, fmt.content_type, bodies, headers, size, bad))
    return out


def write_encoded(folder: Path, images: list[np.ndarray], fmt: imageformats.ImageFormat) -> None:
    """`images` as files in `folder`, encoded as the run encodes its frames (ENCODER_OPTIONS)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        (folder / f"{i:04d}.{fmt.suffixes[0]}").write_bytes(_encode(image, fmt.pil_format,
                                                                    ENCODER_OPTIONS.get(fmt.name, {})))


def _encode(image: np.ndarray, fmt: str, params: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **params)
    return buffer.getvalue()
