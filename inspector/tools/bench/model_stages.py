"""Stages 1 and 2 of `inspector bench`: the raw plugin on prepared tensors (the ceiling) and
decode + prepare on the worker's thread pool, each timed over a fixed window."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from inspector.plugin import Plugin, decode_size
from inspector.tools.bench.frames import Frames
from inspector.worker.decode import DecodeLimits, decode_capture

RAW_WINDOW_S = 3.0  # stage 1 is timed for this long after a warm-up, each time
DECODE_WINDOW_S = 2.0  # stage 2, per encoding


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RawMeter:
    """Stage 1, repeatable: plugin.score on batches of prepared tensors (on the CPU, as the scoring thread hands
    them over), from a thread of its own as the worker's scoring thread; every measurement is kept."""

    def __init__(self, plugin: Plugin, decoded: list[np.ndarray], batch_size: int, device: torch.device) -> None:
        self.plugin = plugin
        self.device = device
        self.batch_size = batch_size
        prepared = [plugin.prepare(image) for image in decoded]
        self.batches = [torch.stack([prepared[(b * batch_size + i) % len(prepared)] for i in range(batch_size)])
                        for b in range(2)]  # two distinct batches, alternating
        self.measurements: list[float] = []

    def measure(self) -> float:
        """Images per second over RAW_WINDOW_S, after a warm-up batch."""
        rate = _in_thread(self._measure)
        self.measurements.append(round(rate, 3))
        return rate

    def _measure(self) -> float:
        self.plugin.score(self.batches[0])  # warm-up: allocations, kernel selection, autotuning
        _synchronise(self.device)
        count, started = 0, time.perf_counter()
        while True:
            self.plugin.score(self.batches[count % len(self.batches)])
            count += 1
            _synchronise(self.device)
            seconds = time.perf_counter() - started
            if seconds >= RAW_WINDOW_S and count >= 3:
                return count * self.batch_size / seconds

    def summary(self) -> dict[str, Any]:
        median = statistics.median(self.measurements)
        return {"images_per_second": round(median, 3), "batch_size": self.batch_size,
                "ms_per_batch": round(1000 * self.batch_size / median, 3), "window_s": RAW_WINDOW_S,
                "measurements": self.measurements}


def _in_thread(work: Callable[[], Any]) -> Any:
    """`work()` on a thread of its own, as the worker's scoring thread runs the plugin."""
    with ThreadPoolExecutor(1, thread_name_prefix="bench-score") as pool:
        return pool.submit(work).result()


def measure_decode(plugin: Plugin, frames: Frames, limits: DecodeLimits, threads: int) -> dict[str, Any]:
    """Decode + prepare on `threads` threads for DECODE_WINDOW_S; and each step alone on one thread."""
    decode_s, prepare_s, full_s = [], [], []
    for body in frames.bodies:
        t0 = time.perf_counter()
        image = decode_capture(body, frames.content_type, frames.headers, limits, decode_size(plugin))
        t1 = time.perf_counter()
        plugin.prepare(image)
        decode_s.append(t1 - t0)
        prepare_s.append(time.perf_counter() - t1)
        t2 = time.perf_counter()  # the baseline: decoding in full, then the resize in prepare
        plugin.prepare(decode_capture(body, frames.content_type, frames.headers, limits))
        full_s.append(time.perf_counter() - t2)

    def work(i: int) -> None:
        plugin.prepare(decode_capture(frames.body(i), frames.content_type, frames.headers, limits,
                                      decode_size(plugin)))

    done, submitted = 0, 0
    pending: list[Future] = []
    with ThreadPoolExecutor(threads, thread_name_prefix="bench-decode") as pool:
        started = time.perf_counter()
        while True:
            while len(pending) < threads * 4:
                pending.append(pool.submit(work, submitted))
                submitted += 1
            pending.pop(0).result()
            done += 1
            seconds = time.perf_counter() - started
            if seconds >= DECODE_WINDOW_S and done >= threads * 2:
                break
        for future in pending:
            future.cancel()
    return {"frames_per_second": round(done / seconds, 3), "threads": threads, "frames": done,
            "seconds": round(seconds, 3), "decode_ms": round(1000 * statistics.median(decode_s), 3),
            "prepare_ms": round(1000 * statistics.median(prepare_s), 3),
            "full_size_decode_and_prepare_ms": round(1000 * statistics.median(full_s), 3)}
