"""`inspector bench`: measured throughput and latency, the raw model and the whole path through the broker.

One run, on generated frames of one resolution in one or more encodings:

1. raw: the plugin's `score` on prepared tensors, in batches of worker.batch_size on the worker's device,
   from a thread of its own as the worker's scoring thread (the ceiling: nothing but the model); measured
   again right before and right after every saturation run, whose ratio is taken to the mean of those two;
2. decode: `decode_capture` + `plugin.prepare` on a pool of worker.decode_threads threads, per encoding;
3. the whole path, per encoding: the real `Worker` in this process, on exchanges and queues of the run's own
   (`bench-<random>.*`, deleted at the end), a publisher and a collector with a connection each:
   (a) saturation: N frames published before the worker starts; frames/s from the moment it starts
       consuming the backlog to the last result, and its ratio to (1);
   (b) half load: frames published at half the saturation rate for a fixed time, evenly paced; latency
       from publication (the frame's capture time) to the result reaching the collector: p50, p95, p99.
   A fresh worker serves each run; one more, first, declares the run's exchanges and queues.

The model is a throwaway: the configured default model's plugin fitted on generated good frames into a
temporary store. The user's store is never read or written. Every frame must come back exactly once;
missing, duplicated and error results are counted and reported.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import platform
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from inspector import __version__, samples
from inspector.bench_broker import broker_stage
from inspector.broker import blocking_connection
from inspector.config import ExchangeSettings, Settings, StoreSettings
from inspector.decode import DecodeLimits, decode_capture
from inspector.devices import resolve_device
from inspector.errors import BrokerError, ConfigError
from inspector.plugin import Plugin, decode_size, get_plugin
from inspector.refit import RefitOptions, run_refit
from inspector.serving import load_version
from inspector.store import ModelStore

log = logging.getLogger(__name__)

SCHEMA = "inspector.bench/1"
# name -> (PIL format, content type, encoder options). JPEG at quality 90; PNG at zlib level 1, the default
# of OpenCV's imwrite (PIL's own level 6 takes six times as long to write; it decodes about 10% faster).
ENCODINGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "jpeg": ("JPEG", "image/jpeg", {"quality": 90}),
    "png": ("PNG", "image/png", {"compress_level": 1}),
    "bmp": ("BMP", "image/bmp", {}),
    "tiff": ("TIFF", "image/tiff", {}),
    "webp": ("WEBP", "image/webp", {"quality": 90}),
}
FIT_IMAGES = 40  # generated good frames the throwaway model is fitted on (at least the plugin's minimum)
DISTINCT_FRAMES = 8  # generated frames per run, cycled through
RAW_WINDOW_S = 3.0  # stage 1 is timed for this long after a warm-up, each time
DECODE_WINDOW_S = 2.0  # stage 2, per encoding
THROUGHPUT_TARGET = 0.85  # whole path at saturation / raw plugin
LATENCY_TARGET = 3.0  # p99 / p50 at half load


@dataclass
class BenchOptions:
    resolution: int = 1024
    encodings: Sequence[str] = ("jpeg", "png")
    frames: int | None = None  # saturation backlog; None: sized from the rates of stages 1 and 2
    half_load_s: float = 15.0
    batch_size: int | None = None  # None: worker.batch_size
    device: str | None = None  # None: the configured device
    skip_broker: bool = False

    def check(self) -> None:
        if self.resolution < samples._MIN_SIZE:
            raise ConfigError(f"--resolution {self.resolution}: must be at least {samples._MIN_SIZE}")
        if not self.encodings:
            raise ConfigError(f"--encoding: name at least one of {', '.join(ENCODINGS)}")
        for name in self.encodings:
            if name not in ENCODINGS:
                raise ConfigError(f"--encoding {name!r}: not one of {', '.join(ENCODINGS)}")
        if len(set(self.encodings)) != len(self.encodings):
            raise ConfigError("--encoding: an encoding is named twice")
        if self.frames is not None and not 1 <= self.frames <= 100_000:
            raise ConfigError(f"--frames {self.frames}: must be between 1 and 100000")
        if not 0 < self.half_load_s <= 3600:
            raise ConfigError(f"--half-load-s {self.half_load_s}: must be more than 0 and at most 3600")
        if self.batch_size is not None and not 1 <= self.batch_size <= 4096:
            raise ConfigError(f"--batch-size {self.batch_size}: must be between 1 and 4096")


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


@dataclass
class BenchReport:
    machine: dict[str, Any]
    settings: dict[str, Any]
    frames: dict[str, Any]
    raw: dict[str, Any]
    decode: dict[str, dict[str, Any]] = field(default_factory=dict)
    broker: dict[str, dict[str, Any]] | None = None
    seconds: float = 0.0

    @property
    def targets(self) -> list[dict[str, Any]]:
        """The two targets per encoding, with pass/fail; empty when the broker stage was skipped."""
        out: list[dict[str, Any]] = []
        for encoding, run in (self.broker or {}).items():
            ratio = run["saturation"]["ratio_to_raw"]
            out.append({"target": "throughput", "encoding": encoding, "value": ratio, "limit": THROUGHPUT_TARGET,
                        "pass": ratio is not None and ratio >= THROUGHPUT_TARGET,
                        "rule": f"whole path at saturation >= {THROUGHPUT_TARGET:.0%} of the raw plugin"})
            spread = run["half_load"]["p99_over_p50"]
            out.append({"target": "latency", "encoding": encoding, "value": spread, "limit": LATENCY_TARGET,
                        "pass": spread is not None and spread <= LATENCY_TARGET,
                        "rule": f"p99 latency at half load <= {LATENCY_TARGET:g}x p50"})
        return out

    @property
    def frames_lost(self) -> int:
        """Frames missing, duplicated or answered with an error, over every broker run."""
        total = 0
        for run in (self.broker or {}).values():
            for phase in (run["saturation"], run["half_load"]):
                total += phase["missing"] + phase["duplicates"] + phase["errors"] + phase["unexpected"]
        return total

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "machine": self.machine,
            "settings": self.settings,
            "frames": self.frames,
            "raw": self.raw,
            "decode": self.decode,
            "broker": self.broker,
            "targets": self.targets,
            "seconds": round(self.seconds, 1),
        }

    def table(self) -> str:
        m, s, f, raw = self.machine, self.settings, self.frames, self.raw
        device = m["device"] + (f" ({m['device_name']})" if m.get("device_name") else "")
        lines = [
            (f"inspector bench: {f['resolution']}x{f['resolution']} frames, {', '.join(f['encodings'])}; "
             f"{self.seconds:.0f} s"),
            (f"machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']} ({m['torch_threads']} threads); "
             f"device {device}"),
            (f"model: {s['plugin']} {s['backbone']} at {s['input_size']} px, {s['precision']}; a throwaway fitted "
             f"on {s['fit_images']} generated frames"),
            (f"worker policy: batches of up to {s['batch_size']}, waiting {s['max_batch_wait_ms']:g} ms at most; "
             f"{s['decode_threads']} decode threads; prefetch {s['prefetch']}"),
            "",
            (f"  {'stage':<28}{'encoding':<10}{'rate':>9}  {'unit':<9}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}"
             f"{'lost':>6}"),
            _row("1  raw plugin", "-", raw["images_per_second"], "images/s"),
        ]
        notes = [(f"  1  batches of {raw['batch_size']}; the median of {len(raw['measurements'])} measurements "
                  f"of {raw['window_s']:g} s: {', '.join(f'{r:.2f}' for r in raw['measurements'])} images/s")]
        for encoding, d in self.decode.items():
            lines.append(_row("2  decode + prepare", encoding, d["frames_per_second"], "frames/s"))
            notes.append(f"  2  {encoding}: {d['threads']} threads; on one thread {d['decode_ms']:.1f} ms decode + "
                         f"{d['prepare_ms']:.1f} ms prepare (decoding in full: "
                         f"{d['full_size_decode_and_prepare_ms']:.1f} ms); {f['bytes'][encoding] / 1024:.0f} KiB a frame")
        for encoding, run in (self.broker or {}).items():
            sat, half = run["saturation"], run["half_load"]
            lines.append(_row("3a whole path, saturation", encoding, sat["frames_per_second"], "frames/s",
                              lost=_lost(sat)))
            ratio = ("" if sat["ratio_to_raw"] is None else
                     f"; {sat['ratio_to_raw']:.1%} of the raw plugin's {sat['raw_images_per_second']:.2f} "
                     f"measured just before and after; model and decoding alone predict "
                     f"{sat['expected_frames_per_second']:.2f}")
            notes.append(f"  3a {encoding}: {sat['frames']} frames queued, drained in {_seconds(sat['seconds'])}"
                         f"{ratio}; {_batches(sat)}{_losses(sat)}")
            lat = half["latency_ms"]
            lines.append(_row("3b whole path, half load", encoding, half["frames_per_second"], "frames/s",
                              latency=(lat["p50"], lat["p95"], lat["p99"]), lost=_lost(half)))
            spread = "" if half["p99_over_p50"] is None else f"; p99 {half['p99_over_p50']:.2f}x p50"
            if half["published_hz"] and half["published_hz"] < 0.95 * half["rate_hz"]:
                spread += f" (the publisher kept only {half['published_hz']:.2f} Hz)"
            notes.append(f"  3b {encoding}: {half['frames']} frames at {half['rate_hz']:.2f} Hz for "
                         f"{half['seconds']:.1f} s{spread}; {_batches(half)}{_losses(half)}")
        if self.broker is None:
            lines.append("  3  whole path through the broker: skipped (--skip-broker)")
        lines += ["", *notes]
        if self.broker is not None:
            lines += ["", "targets"]
            for t in self.targets:
                value = ("n/a" if t["value"] is None else
                         f"{t['value']:.1%}" if t["target"] == "throughput" else f"{t['value']:.2f}x")
                lines.append(f"  {t['encoding']:<6}{t['rule']:<56}{value:>8}  {'pass' if t['pass'] else 'FAIL'}")
        return "\n".join(lines)


def _row(stage: str, encoding: str, rate: float | None, unit: str,
         latency: tuple[float | None, ...] = (), lost: int | None = None) -> str:
    cells = "".join("     n/a" if v is None else f"{v:>8.0f}" for v in latency) if latency else " " * 24
    return (f"  {stage:<28}{encoding:<10}{'n/a' if rate is None else f'{rate:.2f}':>9}  {unit:<9}{cells}"
            f"{'' if lost is None else f'{lost:>6}'}").rstrip()


def _lost(phase: dict[str, Any]) -> int:
    return phase["missing"] + phase["duplicates"] + phase["errors"] + phase["unexpected"]


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


def _batches(phase: dict[str, Any]) -> str:
    if not phase["batches"]:
        return "no batches"
    return (f"{phase['batches']} batches of {phase['mean_batch']:.1f} frames on average, "
            f"{phase['ms_per_batch']:.0f} ms each")


def _losses(phase: dict[str, Any]) -> str:
    if not _lost(phase):
        return ""
    return (f"; LOST: missing {phase['missing']}, duplicates {phase['duplicates']}, errors {phase['errors']}, "
            f"unexpected {phase['unexpected']}")


# -- the run ---------------------------------------------------------------------------------------


def run_bench(settings: Settings, options: BenchOptions) -> BenchReport:
    """Fit a throwaway model, then measure stages 1, 2 and (unless skipped) 3; see the module docstring."""
    options.check()
    started = time.perf_counter()
    device = resolve_device(options.device or settings.device)
    name = settings.default_model
    model_settings = settings.models[name]
    prefix = f"bench-{secrets.token_hex(4)}"
    worker = settings.worker.model_copy(update={
        "batch_size": options.batch_size or settings.worker.batch_size,
        "queue": f"{prefix}.captures", "dead_letter_queue": f"{prefix}.dead", "binding_keys": ["#"], "routes": [],
        "start_timeout_s": min(settings.worker.start_timeout_s, 30.0),
    })
    pixels = options.resolution * options.resolution
    if pixels > worker.max_image_pixels:
        raise ConfigError(f"--resolution {options.resolution}: {pixels} pixels, over worker.max_image_pixels "
                          f"({worker.max_image_pixels}); the worker would refuse every frame")
    if not options.skip_broker:
        _check_broker(settings)

    with tempfile.TemporaryDirectory(prefix="inspector-bench-") as folder:
        root = Path(folder)
        bench_settings = settings.model_copy(update={
            "device": options.device or settings.device,
            "store": StoreSettings(path=root / "models"),
            "worker": worker,
            "metrics": settings.metrics.model_copy(update={"enabled": False}),
            "models": {name: model_settings},
            "broker": settings.broker.model_copy(update={"exchanges": ExchangeSettings(
                **{e: f"{prefix}.{e}" for e in ("captures", "results", "control", "dead")})}),
        })
        fit_images = _fit(bench_settings, root)
        frames = _frames(options, worker.max_image_bytes)
        served = load_version(ModelStore(root / "models"), name, model_settings, device)
        limits = DecodeLimits.from_settings(worker)
        threads = worker.decode_threads or max(1, os.cpu_count() or 1)
        decode: dict[str, dict[str, Any]] = {}
        for f in frames:
            log.info("stage 2: decode + prepare of %s frames on %d threads, %g s", f.encoding, threads,
                     DECODE_WINDOW_S)
            decode[f.encoding] = _decode(served.plugin, f, limits, threads)
        decoded = [decode_capture(b, frames[0].content_type, {}, limits, decode_size(served.plugin))
                   for b in frames[0].bodies]
        raw = RawMeter(served.plugin, decoded, worker.batch_size, device)
        log.info("stage 1: the raw plugin on prepared tensors, batches of %d on %s, %g s",
                 worker.batch_size, device, RAW_WINDOW_S)
        raw.measure()
        broker = None
        if not options.skip_broker:
            broker = broker_stage(bench_settings, frames, options, raw, decode, device)
        described = served.plugin.describe()

        report = BenchReport(
            machine=machine(device),
            settings={
                "model": name, "plugin": model_settings.plugin, "backbone": described.get("backbone"),
                "input_size": described.get("input_size"), "precision": described.get("precision"),
                "fit_images": fit_images, "batch_size": worker.batch_size,
                "max_batch_wait_ms": worker.max_batch_wait_ms, "decode_threads": threads,
                "prefetch": worker.prefetch,
            },
            frames={"resolution": options.resolution, "encodings": list(options.encodings),
                    "distinct": DISTINCT_FRAMES, "bytes": {f.encoding: f.mean_bytes for f in frames}},
            raw=raw.summary(), decode=decode, broker=broker,
        )
    report.seconds = time.perf_counter() - started
    return report


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    cuda = device.type == "cuda"
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "inspector": __version__,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _check_broker(settings: Settings) -> None:
    """Fail in a second, not after the model is fitted, when stage 3 cannot run."""
    try:
        blocking_connection(settings.broker).close()
    except BrokerError as exc:
        raise BrokerError(f"{exc}; stage 3 needs it: start it, or pass --skip-broker to measure stages 1 and 2 "
                          "only") from None


def _fit(settings: Settings, root: Path) -> int:
    """Fit the default model's plugin on generated good frames into the temporary store; images used."""
    model = settings.models[settings.default_model]
    plugin_settings = settings.plugin_settings(model.plugin)
    minimum = get_plugin(model.plugin).create(plugin_settings, torch.device("cpu")).min_images
    count = max(FIT_IMAGES, minimum + 2)
    size = max(samples._MIN_SIZE, int(getattr(plugin_settings, "input_size", 256)))
    log.info("fitting a throwaway %s model on %d generated %dx%d frames into a temporary store (the configured "
             "store is not touched)", model.plugin, count, size, size)
    samples.write_folder(root / "fit", count, size=size)
    result = run_refit(settings, RefitOptions(data=root / "fit" / "good", model=settings.default_model,
                                              calibrate=False, held_out_share=0.0, announce=False))
    return result.used


def _frames(options: BenchOptions, max_bytes: int) -> list[Frames]:
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


def _decode(plugin: Plugin, frames: Frames, limits: DecodeLimits, threads: int) -> dict[str, Any]:
    """Decode + prepare on `threads` threads for DECODE_WINDOW_S; and each step alone on one thread."""
    decode_s, prepare_s, full_s = [], [], []
    for body in frames.bodies:
        t0 = time.perf_counter()
        image = decode_capture(body, frames.content_type, {}, limits, decode_size(plugin))
        t1 = time.perf_counter()
        plugin.prepare(image)
        decode_s.append(t1 - t0)
        prepare_s.append(time.perf_counter() - t1)
        t2 = time.perf_counter()  # the baseline: decoding in full, then the resize in prepare
        plugin.prepare(decode_capture(body, frames.content_type, {}, limits))
        full_s.append(time.perf_counter() - t2)

    def work(i: int) -> None:
        plugin.prepare(decode_capture(frames.body(i), frames.content_type, {}, limits, decode_size(plugin)))

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
