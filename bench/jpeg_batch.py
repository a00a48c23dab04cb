"""JPEG bodies decoded in one batched call on a device (torchvision's decode_jpeg: nvJPEG on CUDA), with the
worker's limits. Measured by bench/jpeg_decode_device.py and scripts/gpu-check; not on the worker's path yet
(docs/design.md, "GPU JPEG decode": where it would go, and why a model fitted with reduced-scale decoding cannot
use it), so it lives beside the bench that measures it, not in the worker's decoder. Imported as
`bench.jpeg_batch` from the repository's root (the tests) or as `jpeg_batch` beside it (the bench).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from PIL import Image

from inspector.errors import FrameError
from inspector.imagefiles import allow_pixels
from inspector.worker.decode import DecodeLimits, check_jpeg_scans, check_pixels, decode_capture, too_large

if TYPE_CHECKING:
    import torch

JPEG_BATCH_MODES = frozenset({"RGB", "L"})  # YCbCr and grey JPEGs; CMYK and the rest go to Pillow


def decode_jpegs(bodies: Sequence[bytes], limits: DecodeLimits, device: str | torch.device = "cpu",
                 ) -> list[torch.Tensor | FrameError]:
    """JPEG bodies -> one 3 x H x W uint8 RGB tensor each on `device`, full size, in one batched call of
    torchvision's decode_jpeg: nvJPEG on CUDA; libjpeg-turbo on the CPU, pixel for pixel Pillow's full-size
    decode. The limits hold as in decode_capture: bytes, then the header's size against max_image_pixels
    before any pixel is decoded. A body that is not a plain RGB or grey JPEG, or that the batched decoder
    refuses, is decoded by Pillow on the CPU instead, so a bad frame fails alone, with decode_capture's
    FrameError, in its place in the list."""
    import torch

    out: list[torch.Tensor | FrameError | None] = [None] * len(bodies)
    batched: list[int] = []
    for i, body in enumerate(bodies):
        try:
            if _plain_jpeg(body, limits):
                batched.append(i)
            else:
                out[i] = _pillow_tensor(body, limits, device)
        except FrameError as exc:
            out[i] = exc
    if batched:
        data = [torch.frombuffer(bytearray(bodies[i]), dtype=torch.uint8) for i in batched]
        try:
            decoded = _decode_jpeg(data, device)
        except RuntimeError:  # the whole batch fails with one bad frame: find it one by one
            decoded = [None] * len(batched)
            for k, one in enumerate(data):
                try:
                    decoded[k] = _decode_jpeg([one], device)[0]
                except RuntimeError:
                    pass
        for i, image in zip(batched, decoded):
            try:
                out[i] = image if image is not None else _pillow_tensor(bodies[i], limits, device)
            except FrameError as exc:
                out[i] = exc
    return out  # type: ignore[return-value]  # every place is filled


def _plain_jpeg(body: bytes, limits: DecodeLimits) -> bool:
    """Whether the batched decoder may take `body` (a YCbCr or grey JPEG); FrameError when no decoder may."""
    if not body:
        raise FrameError("empty_body", "the capture's body is empty")
    if len(body) > limits.max_image_bytes:
        raise too_large("the body", len(body), limits)
    check_jpeg_scans(body, "the body", limits)
    allow_pixels(limits.max_image_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(body), formats=("JPEG",)) as image:  # the header only
                width, height = image.size
                plain = image.mode in JPEG_BATCH_MODES
    except Exception:  # noqa: BLE001 - not a JPEG PIL can read the header of: Pillow's own path judges it
        return False
    check_pixels("the body", width, height, limits)
    return plain and width > 0 and height > 0


def _decode_jpeg(data: list[torch.Tensor], device: str | torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points at TorchCodec
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _pillow_tensor(body: bytes, limits: DecodeLimits, device: str | torch.device) -> torch.Tensor:
    import torch

    pixels = decode_capture(body, "image/jpeg", None, limits)  # its bytes decide the decoder
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous().to(device)


