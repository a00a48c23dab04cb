"""What `inspector explain` spends drawing one image, and the PNG compression levels it writes with.

For each image: the overlay composed (inspector.tools.overlay.overlay), then the overlay and the 16-bit
map encoded as PNG at zlib levels 1, 3 and 6 (Pillow's default), in rounds that alternate the levels.
The maps are smooth random fields at the image's size, standing in for a plugin's (only their encoding
is timed). Prints the median milliseconds per image and the mean size of each.

    .venv/bin/python bench/explain_drawing.py [--images DIR] [--count 16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

import datasets
from inspector.imagefiles import find_images, map_image, read_image
from inspector.tools.overlay import Header, overlay

LEVELS = (1, 3, 6)


def smooth_map(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    noise = Image.fromarray((rng.random((height, width)) * 255).astype(np.uint8))
    blurred = np.asarray(noise.filter(ImageFilter.GaussianBlur(max(width, height) / 12)), np.float32) / 255
    spread = blurred.max() - blurred.min() or 1.0
    return (blurred - blurred.min()) / spread * 0.6  # smooth, everywhere over 0, like a defect's map


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=datasets.magnetic_tile() / "test", help=datasets.HELP)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    if args.images.is_dir():
        paths = find_images(args.images)[:: max(1, len(find_images(args.images)) // args.count)][: args.count]
        images = [read_image(p, 100_000_000) for p in paths]
        source = f"{len(images)} images under {args.images}"
    else:
        images = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(args.count)]
        source = f"{len(images)} generated 640x480 images (no folder {args.images})"
    maps = [smooth_map(im.shape[1], im.shape[0], rng) for im in images]
    header = Header("fail", 0.8, 0.5, "default@20261201T000000Z-000000", "kind/image.jpg")
    compose, encoded = [], {(what, level): ([], []) for what in ("overlay", "map") for level in LEVELS}
    for _ in range(args.rounds):
        started = time.perf_counter()
        drawn = [overlay(im, m, header) for im, m in zip(images, maps)]
        compose.append((time.perf_counter() - started) / len(images))
        for level in LEVELS:
            for what, pictures in (("overlay", drawn), ("map", [map_image(m) for m in maps])):
                started, sizes = time.perf_counter(), []
                for picture in pictures:
                    buffer = io.BytesIO()
                    picture.save(buffer, format="PNG", compress_level=level)
                    sizes.append(len(buffer.getvalue()))
                encoded[what, level][0].append((time.perf_counter() - started) / len(pictures))
                encoded[what, level][1].append(statistics.mean(sizes))
    print(f"{source}; median of {args.rounds} rounds alternating the levels")
    print(f"  compose the overlay        {statistics.median(compose) * 1000:7.1f} ms/image")
    for (what, level), (seconds, sizes) in encoded.items():
        default = " (Pillow's default)" if level == 6 else ""
        print(f"  encode {what:<8} level {level}  {statistics.median(seconds) * 1000:7.1f} ms/image  "
              f"{statistics.mean(sizes) / 1024:7.1f} KiB{default}")


if __name__ == "__main__":
    main()
