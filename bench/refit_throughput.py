"""Refit throughput next to the raw backbone forward rate, in one run on the same machine.

Raw: prepared tensors already in memory, batches through the backbone only (the
ceiling). Refit: the real path from files on disk: the thread-pool decode,
prepare, and plugin.fit (backbone + reservoir + PCA/KDE). The ratio says how well
decoding hides behind the model; the two are measured alternately, twice each.

    .venv/bin/python bench/refit_throughput.py [--images 384] [--size 640x480] [--device cpu]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from inspector.imagefiles import find_images
from inspector.tools import samples
from inspector.tools.imagestream import ImageStream
from inspector.tools.progress import Progress
from inspector_dfkde.plugin import DfkdePlugin, DfkdeSettings


def _write_archive(root: Path, n: int, width: int, height: int) -> None:
    """Camera-sized JPEGs of the synthetic part (the part is rendered square and padded to the frame)."""
    side = min(width, height)
    for i, image in enumerate(samples.make_images(n, seed=1, size=side)):
        frame = np.zeros((height, width, 3), dtype=np.uint8)
        top, left = (height - side) // 2, (width - side) // 2
        frame[top : top + side, left : left + side] = image
        Image.fromarray(frame).save(root / f"part{i:05d}.jpg", quality=92)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--size", default="640x480", help="archive image size, WIDTHxHEIGHT")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0, help="decode threads; 0 = one per core")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    width, height = (int(v) for v in args.size.split("x"))
    device = torch.device(args.device)
    workers = args.workers or os.cpu_count() or 1

    plugin = DfkdePlugin.create(DfkdeSettings(), device)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        _write_archive(root, args.images, width, height)
        paths = find_images(root)
        prepared = torch.stack([plugin.prepare(np.asarray(Image.open(p).convert("RGB"))) for p in paths])

        def raw() -> float:
            started = time.perf_counter()
            for i in range(0, len(prepared), args.batch):
                plugin.model.get_features(prepared[i : i + args.batch].to(device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return len(prepared) / (time.perf_counter() - started)

        def refit() -> float:
            started = time.perf_counter()
            with Progress(len(paths), "bench", interval_s=1e9) as progress:
                stream = ImageStream(plugin.prepare, workers, 10**9, progress)
                plugin.fit(stream.batches(paths, args.batch))
            return len(paths) / (time.perf_counter() - started)

        raw()  # warm-up: first-call allocations and kernel selection
        raw_rates, refit_rates = [], []
        for _ in range(2):
            raw_rates.append(raw())
            refit_rates.append(refit())

    r, f = statistics.median(raw_rates), statistics.median(refit_rates)
    print(f"{args.images} JPEG images of {width}x{height}, backbone {plugin.describe()['backbone']} at "
          f"{plugin.model.input_size}px, batch {args.batch}, device {device}, {workers} decode threads, "
          f"torch threads {torch.get_num_threads()}")
    print(f"  raw backbone forward (tensors in memory): {r:8.1f} images/s")
    print(f"  refit from files (decode + fit)         : {f:8.1f} images/s")
    print(f"  refit / raw                             : {f / r:8.1%}")


if __name__ == "__main__":
    main()
