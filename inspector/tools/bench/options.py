"""What an `inspector bench` run measures, as the command line asked for it, checked before anything runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from inspector import imageformats
from inspector.errors import ConfigError
from inspector.tools import samples

# Every format of the table is an encoding (the raw ones sent as image/x-raw, no encoding at all).
ENCODINGS: dict[str, imageformats.ImageFormat] = dict(imageformats.BY_NAME)
# JPEG and WebP at quality 90; PNG at zlib level 1, the default of OpenCV's imwrite (PIL's own level 6 is slower
# to write: bench/explain_drawing.py measures both, docs/tools.md). The other encodings: PIL's defaults.
ENCODER_OPTIONS: dict[str, dict[str, Any]] = {"jpeg": {"quality": 90}, "png": {"compress_level": 1},
                                              "webp": {"quality": 90}}
KIND_SEPARATOR = ":"  # `jpeg:256`: that encoding at its own resolution (a small frame beside the large ones)


def split_kind(kind: str, resolution: int) -> tuple[str, int]:
    """(encoding, resolution) of an --encoding entry such as `jpeg` or `jpeg:256`; ValueError when malformed."""
    name, _, size = kind.partition(KIND_SEPARATOR)
    if not size:
        return name, resolution
    if not (size.isascii() and size.isdigit()) or len(size) > 6:
        raise ValueError(f"--encoding {kind!r}: the resolution after {KIND_SEPARATOR!r} must be a number of pixels")
    return name, int(size)


@dataclass
class BenchOptions:
    resolution: int = 1024
    encodings: Sequence[str] = ("jpeg", "png")
    frames: int | None = None  # saturation backlog; None: sized from the rates of stages 1 and 2
    half_load_s: float = 15.0
    batch_size: int | None = None  # None: worker.batch_size
    device: str | None = None  # None: the configured device
    skip_broker: bool = False
    plugin: str | None = None  # None: the default model's plugin; `null` measures the frame path alone
    # shares of defective frames (e.g. 0.01, 0.1): each measured with the model's regions off, then on
    failing: Sequence[float] = ()

    def check(self) -> None:
        if self.resolution < samples._MIN_SIZE:
            raise ConfigError(f"--resolution {self.resolution}: must be at least {samples._MIN_SIZE}")
        if not self.encodings:
            raise ConfigError(f"--encoding: name at least one of {', '.join(ENCODINGS)}")
        for kind in self.encodings:
            try:
                name, size = split_kind(kind, self.resolution)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if name not in ENCODINGS:
                raise ConfigError(f"--encoding {name!r}: not one of {', '.join(ENCODINGS)} (each may end in "
                                  f"{KIND_SEPARATOR}PX for its own resolution, e.g. jpeg{KIND_SEPARATOR}256)")
            if size < samples._MIN_SIZE:
                raise ConfigError(f"--encoding {kind!r}: the resolution must be at least {samples._MIN_SIZE}")
        if len(set(self.encodings)) != len(self.encodings):
            raise ConfigError("--encoding: an encoding is named twice")
        if self.frames is not None and not 1 <= self.frames <= 100_000:
            raise ConfigError(f"--frames {self.frames}: must be between 1 and 100000")
        if not 0 < self.half_load_s <= 3600:
            raise ConfigError(f"--half-load-s {self.half_load_s}: must be more than 0 and at most 3600")
        if self.batch_size is not None and not 1 <= self.batch_size <= 4096:
            raise ConfigError(f"--batch-size {self.batch_size}: must be between 1 and 4096")
        for share in self.failing:
            if not 0 < share <= 1:
                raise ConfigError(f"--failing {share:g}: each share must be more than 0 and at most 1")
        if len(set(self.failing)) != len(self.failing):
            raise ConfigError("--failing: a share is named twice")
        if self.failing and self.skip_broker:
            raise ConfigError("--failing measures the whole path through the broker; it cannot go with --skip-broker")
        if self.failing and self.plugin == "null":
            raise ConfigError("--failing needs a model that fails defective frames; the null plugin fails none")


def failing_frame(index: int, share: float) -> bool:
    """Whether frame `index` of a run is a defective part: spread evenly, `share` of every run's frames
    (frame i is one when floor((i + 1) x share) steps up), so a short run holds its share too."""
    return int((index + 1) * share + 1e-9) > int(index * share + 1e-9)
