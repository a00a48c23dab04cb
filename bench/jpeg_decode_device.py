"""JPEG decoding of camera frames, on the CPU and on a GPU, to the model's input: images per second.

The worker decodes each JPEG on a decode thread with Pillow, at reduced scale (libjpeg scales in the
DCT: a 1024 frame for a 128 px model decodes at 1/4 size) and then resizes with antialiasing to the
model's input. GPU decoding (torchvision's decode_jpeg on nvJPEG, batched) can only decode at full size
and resize on the device. This measures, on generated 1024 x 1024 frames at JPEG quality 90 (the frames
`inspector bench` uses), each way alone and then with the resize to the model's input:

  pillow reduced      decode_capture at reduced scale (the worker's path today), on 1 and on N threads
  pillow full         decode_capture at full size, on 1 and on N threads
  torchvision cpu     jpeg_batch.decode_jpegs on the CPU (libjpeg-turbo, full size), 1 and N threads
  torchvision cuda    decode_jpegs on the GPU, one batched call per batch, at each --batch-sizes (--device cuda)

and how far each way's pixels at the model's input are from the worker's (max |difference| in 8-bit levels).

    .venv/bin/python bench/jpeg_decode_device.py [--device cpu|cuda] [--batch-sizes 16,32,64,128]
                                                 [--resolution 1024] [--input-size 128] [--seconds 2] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from inspector.tools import samples
from inspector.worker.decode import DecodeLimits, decode_capture
from jpeg_batch import decode_jpegs  # bench/jpeg_batch.py, beside this file

DISTINCT_FRAMES = 8
QUALITY = 90  # as inspector bench's jpeg frames


def _resize(chw: torch.Tensor, size: int) -> torch.Tensor:
    """As the DFKDE plugin's prepare: antialiased resize of uint8 C x H x W (or a batch) to size x size."""
    return TF.resize(chw, [size, size], antialias=True)


def _rate(work: Callable[[int], int], threads: int, seconds: float) -> float:
    """Images per second of `work(i)` (returns images done) kept busy on `threads` threads for `seconds`."""
    work(0)  # warm-up
    done, submitted, pending = 0, 0, []
    with ThreadPoolExecutor(threads) as pool:
        started = time.perf_counter()
        while True:
            while len(pending) < threads * 2:
                pending.append(pool.submit(work, submitted))
                submitted += 1
            done += pending.pop(0).result()
            elapsed = time.perf_counter() - started
            if elapsed >= seconds and done >= threads:
                for future in pending:
                    done += future.result()
                return done / (time.perf_counter() - started)


def measure(device: str, batch_sizes: list[int], resolution: int, input_size: int, seconds: float,
            threads: int) -> dict[str, Any]:
    limits = DecodeLimits(max_image_bytes=64 * 2**20, max_image_pixels=resolution * resolution)
    bodies = []
    for image in samples.make_images(DISTINCT_FRAMES, seed=7, size=resolution):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=QUALITY)
        bodies.append(buffer.getvalue())
    reduced_size = (input_size, input_size)

    def body(i: int) -> bytes:
        return bodies[i % len(bodies)]

    def pillow(reduced: bool, resize: bool) -> Callable[[int], int]:
        def work(i: int) -> int:
            pixels = decode_capture(body(i), "image/jpeg", {}, limits, reduced_size if reduced else None)
            if resize:
                _resize(torch.from_numpy(pixels).permute(2, 0, 1), input_size)
            return 1
        return work

    def tv_cpu(resize: bool) -> Callable[[int], int]:
        def work(i: int) -> int:
            (image,) = decode_jpegs([body(i)], limits, "cpu")
            if resize:
                _resize(image, input_size)
            return 1
        return work

    def tv_batch(batch: int, resize: bool) -> Callable[[int], int]:
        def work(i: int) -> int:
            images = decode_jpegs([body(i * batch + k) for k in range(batch)], limits, device)
            out = _resize(torch.stack(images), input_size) if resize else images[-1]
            if out.is_cuda:
                torch.cuda.synchronize(out.device)
            return batch
        return work

    rows: list[dict[str, Any]] = []

    def row(way: str, where: str, count: int, batch: int | None, work: Callable[[bool], Callable[[int], int]]):
        rows.append({"way": way, "device": where, "threads": count, "batch": batch,
                     "decode_images_per_second": round(_rate(work(False), count, seconds), 1),
                     "to_input_images_per_second": round(_rate(work(True), count, seconds), 1)})

    counts = sorted({1, threads})
    for count in counts:
        row("pillow reduced", "cpu", count, None, lambda resize: pillow(True, resize))
    for count in counts:
        row("pillow full", "cpu", count, None, lambda resize: pillow(False, resize))
    for count in counts:
        row("torchvision", "cpu", count, None, tv_cpu)
    if device != "cpu":
        for batch in batch_sizes:
            row("torchvision batched", device, 1, batch, lambda resize, b=batch: tv_batch(b, resize))

    # pixels at the model's input, against the worker's (reduced decode + resize), and against a full decode
    worker = [_resize(torch.from_numpy(decode_capture(b, "image/jpeg", {}, limits, reduced_size)).permute(2, 0, 1),
                      input_size) for b in bodies]
    full = [_resize(torch.from_numpy(decode_capture(b, "image/jpeg", {}, limits)).permute(2, 0, 1), input_size)
            for b in bodies]
    on_device = decode_jpegs(bodies, limits, device)
    raw_full = [torch.from_numpy(decode_capture(b, "image/jpeg", {}, limits)).permute(2, 0, 1) for b in bodies]
    device_input = [_resize(image, input_size).cpu() for image in on_device]

    def largest(a: list[torch.Tensor], b: list[torch.Tensor]) -> int:
        return max(int((x.int() - y.int()).abs().max()) for x, y in zip(a, b))

    return {
        "schema": "inspector.bench.jpeg-decode/1",
        "device": device, "device_name": torch.cuda.get_device_name(device) if device != "cpu" else None,
        "cores": os.cpu_count(), "torch": torch.__version__, "resolution": resolution, "quality": QUALITY,
        "input_size": input_size, "frame_bytes": int(statistics.fmean(len(b) for b in bodies)),
        "seconds_per_measurement": seconds, "rows": rows,
        "max_level_difference": {
            "decode_on_device_vs_pillow_full": largest([x.cpu() for x in on_device], raw_full),
            "device_to_input_vs_pillow_full_to_input": largest(device_input, full),
            "pillow_full_to_input_vs_worker_reduced": largest(full, worker),
        },
    }


def table(result: dict[str, Any]) -> str:
    name = f" ({result['device_name']})" if result.get("device_name") else ""
    lines = [f"JPEG decode of {result['resolution']}x{result['resolution']} frames (quality {result['quality']}, "
             f"{result['frame_bytes'] / 1024:.0f} KiB), to a {result['input_size']} px model input; device "
             f"{result['device']}{name}; {result['cores']} cores; {result['seconds_per_measurement']:g} s each",
             f"  {'way':<22}{'device':<9}{'threads':>8}{'batch':>7}{'decode/s':>11}{'to input/s':>12}"]
    for r in result["rows"]:
        lines.append(f"  {r['way']:<22}{r['device']:<9}{r['threads']:>8}{r['batch'] or '-':>7}"
                     f"{r['decode_images_per_second']:>11.1f}{r['to_input_images_per_second']:>12.1f}")
    d = result["max_level_difference"]
    lines += ["  max |difference| in 8-bit levels:",
              f"    decoded on {result['device']} vs Pillow full decode: {d['decode_on_device_vs_pillow_full']}",
              f"    at the model input, {result['device']} decode + resize vs Pillow full + resize: "
              f"{d['device_to_input_vs_pillow_full_to_input']}",
              f"    at the model input, full decode + resize vs the worker's reduced decode: "
              f"{d['pillow_full_to_input_vs_worker_reduced']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu: the CPU ways only)")
    parser.add_argument("--batch-sizes", default="16,32,64,128", help="GPU batch sizes, comma-separated")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--input-size", type=int, default=128, help="the model's input (plugins.dfkde.input_size)")
    parser.add_argument("--seconds", type=float, default=2.0, help="each measurement's window")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the N of the thread pools")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batch-sizes {args.batch_sizes!r}: give whole numbers separated by commas")
    if not batch_sizes or min(batch_sizes) < 1 or not 32 <= args.resolution <= 8192 or args.input_size < 8:
        parser.error("--batch-sizes must be positive, --resolution 32..8192, --input-size at least 8")
    if args.device != "cpu" and not torch.cuda.is_available():
        print(f"jpeg_decode_device: error: --device {args.device} asked for, but torch {torch.__version__} sees no "
              "CUDA device here; run it on a GPU machine, or with --device cpu for the CPU ways", file=sys.stderr)
        return 2
    result = measure(args.device, batch_sizes, args.resolution, args.input_size, args.seconds, max(1, args.threads))
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
