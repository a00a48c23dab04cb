"""The evidence archive under hostile input: a polyglot body whose other header claims a huge image, a
legitimate 50 Mpx failing frame, and a burst of error captures against the byte budget.

The maps are drawn as DFKDE draws them (a small grid, bilinear to the size asked) and encoded as the archive
encodes them, so the cost is the map's: the size it is drawn at. The unbounded path is the archive as it was:
the size read again from the body with every Pillow plugin, the map at the frame's full size, and the byte
cap enforced only by the pruner, oldest first whatever the verdict.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
import time
from pathlib import Path

import numpy as np

from hostile import Case

REJECTS = 50
ERRORS = 500
CAPTURE_BYTES = 64 * 1024
CAP_BYTES = 8 * 1024 * 1024


def polyglot_tiff(side: int = 64, claimed: int = 13000) -> bytes:
    """A side x side grey TIFF (12 KB and less) that Pillow's IM plugin reads as claimed x claimed."""
    ifd_offset = 0x200
    text = b": x\r\nImage type: L image\r\nImage size (x*y): %d*%d\r\n\x1a" % (claimed, claimed)
    head = (b"II*\x00" + struct.pack("<I", ifd_offset) + text).ljust(ifd_offset, b"\x00")
    entries = [(256, 3, side), (257, 3, side), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0), (277, 3, 1),
               (278, 3, side), (279, 4, side * side)]
    data_offset = ifd_offset + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_offset if tag == 273 else value
        ifd += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3
                                                     else struct.pack("<I", value))
    return head + ifd + struct.pack("<I", 0) + bytes(range(256)) * (side * side // 256)


def _draw(size: tuple[int, int]) -> np.ndarray:
    """A map as DFKDE draws one: its feature grid, bilinear to (width, height)."""
    import torch
    import torch.nn.functional as F

    width, height = size
    grid = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()


def _bounded_map(body: bytes, content_type: str) -> str:
    from inspector.worker.decode import DecodeLimits, decode_capture
    from inspector.worker.evidence import map_png, map_size

    decoded = decode_capture(body, content_type, {}, DecodeLimits(64 * 1024 * 1024, 100_000_000))
    size = (decoded.shape[1], decoded.shape[0])
    drawn = map_size(size)
    png = map_png(_draw(drawn), drawn, size)
    return f"map {drawn[0]}x{drawn[1]}, {len(png)} B"


def _unbounded_map(body: bytes, size: tuple[int, int] | None = None) -> str:
    """The archive as it was: the size from the body with every Pillow plugin, the map at that size."""
    from PIL import Image

    from inspector.imagefiles import map_png

    if size is None:
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(io.BytesIO(body)) as image:
            size = image.size
    png = map_png(_draw(size))
    return f"map {size[0]}x{size[1]}, {len(png)} B"


def _large_jpeg() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (10000, 5000), (90, 90, 90)).save(out, format="JPEG", quality=80)
    return out.getvalue()


def _burst(enforce_at_write: bool) -> str:
    """REJECTS failing frames, then a burst of ERRORS error captures, every one CAPTURE_BYTES, into an
    archive capped at CAP_BYTES; how many rejects are left after the pruner's next round."""
    from inspector.config import EvidenceSettings, MetricsSettings
    from inspector.messages import parse_capture
    from inspector.worker.evidence import Evidence
    from inspector.worker.metrics import Metrics

    from types import SimpleNamespace

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "evidence"
        settings = EvidenceSettings(enabled=True, path=str(root), maps=False, retention_days=0,
                                    max_bytes=CAP_BYTES if enforce_at_write else 0, max_files=0)
        evidence = Evidence(settings, Metrics(MetricsSettings(port=0)), prune_every_s=3600)
        evidence.start()
        try:
            body = b"x" * CAPTURE_BYTES
            peak = 0
            for verdict, count in (("fail", REJECTS), ("error", ERRORS)):
                for i in range(count):
                    properties = SimpleNamespace(message_id=f"{verdict}-{i}", content_type="image/jpeg", headers={},
                                                 timestamp=None)
                    capture = parse_capture("line1.cam1", properties, body, False)
                    ticket = evidence.ticket(capture, verdict, "2026-12-01T00:00:00.000Z", body)
                    if ticket is not None:
                        ticket.send(b'{"verdict": "%s"}' % verdict.encode())
                    evidence.flush(30)
                    if i % 50 == 0:
                        peak = max(peak, _bytes(root))
            if not enforce_at_write:  # the old pruner: oldest first, whatever the verdict, every 5 minutes
                _old_prune(root, CAP_BYTES)
            peak = max(peak, _bytes(root))
        finally:
            evidence.stop(10)
        rejects = len(list(root.rglob("fail-*.json")))
        errors = len(list(root.rglob("error-*.json")))
        return f"rejects left {rejects}/{REJECTS}, errors {errors}, peak {peak / 2**20:.1f} MiB"


def _bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _old_prune(root: Path, cap: int) -> None:
    """The pruner as it was: every file held in memory, then the oldest frames removed down to the cap."""
    frames: dict[str, list] = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            stat = os.stat(path)
            entry = frames.setdefault(path.rsplit(".", 1)[0], [0, 0.0, []])
            entry[0] += stat.st_size
            entry[1] = max(entry[1], stat.st_mtime)
            entry[2].append(path)
    total = sum(entry[0] for entry in frames.values())
    for _, entry in sorted(frames.items(), key=lambda item: item[1][1]):
        if total <= cap:
            break
        for path in entry[2]:
            os.unlink(path)
        total -= entry[0]


_POLYGLOT = polyglot_tiff()

CASES: list[Case] = [
    Case("evidence map: 4.7 KB polyglot TIFF (IM header 13000x13000, decodes 64x64)",
         bounded=lambda: _bounded_map(_POLYGLOT, "image/tiff"),
         unbounded=lambda: _unbounded_map(_POLYGLOT), unbounded_limit_s=120.0),
    Case("evidence map: a 50 Mpx (10000x5000) failing JPEG",
         bounded=lambda: _bounded_map(_large_jpeg(), "image/jpeg"),
         unbounded=lambda: _unbounded_map(b"", (10000, 5000)), unbounded_limit_s=120.0),
    Case(f"evidence: {REJECTS} rejects, then {ERRORS} error captures of 64 KB, cap 8 MiB",
         bounded=lambda: _burst(enforce_at_write=True),
         unbounded=lambda: _burst(enforce_at_write=False)),
]

if __name__ == "__main__":
    for case in CASES:
        started = time.perf_counter()
        print(case.name, case.bounded(), f"{time.perf_counter() - started:.2f} s")
