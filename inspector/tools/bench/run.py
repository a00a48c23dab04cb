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

import logging
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from inspector.broker import blocking_connection
from inspector.config import ExchangeSettings, Settings, StoreSettings
from inspector.devices import resolve_device
from inspector.errors import BrokerError, ConfigError, PluginError
from inspector.plugin import decode_size, get_plugin, region_level
from inspector.stores import ModelStore
from inspector.tools import samples
from inspector.tools.bench.broker_stage import broker_stage
from inspector.tools.bench.frames import DISTINCT_FRAMES, make_frames, write_encoded
from inspector.tools.bench.model_stages import DECODE_WINDOW_S, RAW_WINDOW_S, RawMeter, measure_decode
from inspector.tools.bench.options import ENCODINGS, BenchOptions, split_kind
from inspector.tools.bench.report import BenchReport, machine
from inspector.tools.refit import RefitOptions, run_refit
from inspector.worker.decode import DecodeLimits, decode_capture
from inspector.worker.serving import load_version

__all__ = ["BenchOptions", "BenchReport", "run_bench"]

log = logging.getLogger(__name__)

FIT_IMAGES = 40  # generated good frames the throwaway model is fitted on (at least the plugin's minimum)
# With --failing the model must fail defective frames as a line's would, and draw regions: it is calibrated
# (a boundary at FAILING_FALSE_REJECT of good parts, cross-fitted) on enough frames for its maps' region level
# (every 5th frame held out of the map's fit, 19 of them needed for a level at a 5% rate).
FAILING_FIT_IMAGES = 100
FAILING_FALSE_REJECT = 0.01


def run_bench(settings: Settings, options: BenchOptions) -> BenchReport:
    """Fit a throwaway model, then measure stages 1, 2 and (unless skipped) 3; see the module docstring."""
    options.check()
    started = time.perf_counter()
    device = resolve_device(options.device or settings.device)
    name = settings.default_model
    model_settings = settings.models[name]
    if options.plugin is not None:
        try:
            get_plugin(options.plugin)
        except PluginError as exc:
            raise ConfigError(f"--plugin {options.plugin!r}: {exc}") from None
        model_settings = model_settings.model_copy(update={"plugin": options.plugin})
    prefix = f"bench-{secrets.token_hex(4)}"
    worker = settings.worker.model_copy(update={
        "batch_size": options.batch_size or settings.worker.batch_size,
        "queue": f"{prefix}.captures", "dead_letter_queue": f"{prefix}.dead", "binding_keys": ["#"], "routes": [],
        "start_timeout_s": min(settings.worker.start_timeout_s, 30.0),
    })
    for kind in options.encodings:
        size = split_kind(kind, options.resolution)[1]
        if size * size > worker.max_image_pixels:
            raise ConfigError(f"--resolution {size}: {size * size} pixels, over worker.max_image_pixels "
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
        # with --failing, good frames must pass: the model is fitted on good parts as the run's first kind of frame
        # sends them, at its size and in its encoding (a line's model is fitted on its own camera's frames)
        fit_kind = split_kind(options.encodings[0], options.resolution) if options.failing else None
        fit_images = _fit(bench_settings, root, calibrated=bool(options.failing), kind=fit_kind)
        frames = make_frames(options, worker.max_image_bytes)
        plugin_table = bench_settings.plugin_settings(model_settings.plugin)
        served = load_version(ModelStore(root / "models"), name, model_settings, device,
                              plugin_settings=plugin_table)
        limits = DecodeLimits.from_settings(worker)
        threads = worker.decode_threads or max(1, os.cpu_count() or 1)
        decode: dict[str, dict[str, Any]] = {}
        for f in frames:
            log.info("stage 2: decode + prepare of %s frames on %d threads, %g s", f.encoding, threads,
                     DECODE_WINDOW_S)
            decode[f.encoding] = measure_decode(served.plugin, f, limits, threads)
        first = frames[0]
        decoded = [decode_capture(b, first.content_type, first.headers, limits, decode_size(served.plugin))
                   for b in first.bodies]
        level = region_level(served.plugin)
        if options.failing and level is None:
            raise ConfigError(f"--failing: the throwaway {model_settings.plugin} model has no region level, so no "
                              "result could carry regions (it needs the plugin's localisation maps on)")
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
                "runtime": described.get("runtime"),
                "fit_images": fit_images, "batch_size": worker.batch_size,
                "max_batch_wait_ms": worker.max_batch_wait_ms, "decode_threads": threads,
                "prefetch": worker.prefetch, "queue_prefix": prefix,
                **({"failing": list(options.failing), "target_false_reject": FAILING_FALSE_REJECT,
                    "region_level": level} if options.failing else {}),
            },
            frames={"resolution": options.resolution, "encodings": list(options.encodings),
                    "distinct": DISTINCT_FRAMES, "bytes": {f.encoding: f.mean_bytes for f in frames},
                    "resolutions": {f.encoding: f.resolution for f in frames}},
            raw=raw.summary(), decode=decode, broker=broker,
        )
    report.seconds = time.perf_counter() - started
    return report


def _check_broker(settings: Settings) -> None:
    """Fail in a second, not after the model is fitted, when stage 3 cannot run."""
    try:
        blocking_connection(settings.broker).close()
    except BrokerError as exc:
        raise BrokerError(f"{exc}; stage 3 needs it: start it, or pass --skip-broker to measure stages 1 and 2 "
                          "only") from None


def _fit(settings: Settings, root: Path, calibrated: bool = False, kind: tuple[str, int] | None = None) -> int:
    """Fit the default model's plugin on generated good frames into the temporary store; images used.
    `calibrated`: more frames, and a calibrated boundary (FAILING_FIT_IMAGES, FAILING_FALSE_REJECT); `kind`:
    the frames' (encoding, side), encoded as the run's (default: PNG at the plugin's input size)."""
    model = settings.models[settings.default_model]
    plugin_settings = settings.plugin_settings(model.plugin)
    minimum = get_plugin(model.plugin).create(plugin_settings, torch.device("cpu")).min_images
    count = max(FAILING_FIT_IMAGES if calibrated else FIT_IMAGES, minimum + 2)
    size = kind[1] if kind else max(samples._MIN_SIZE, int(getattr(plugin_settings, "input_size", 256)))
    log.info("fitting a throwaway %s model on %d generated %dx%d frames into a temporary store (the configured "
             "store is not touched)", model.plugin, count, size, size)
    fmt = ENCODINGS[kind[0]] if kind else None
    if fmt is not None and not fmt.raw:
        write_encoded(root / "fit" / "good", samples.make_images(count, size=size), fmt)
    else:
        samples.write_folder(root / "fit", count, size=size)
    if calibrated:
        options = RefitOptions(data=root / "fit" / "good", model=settings.default_model, calibrate=True,
                               target_false_reject=FAILING_FALSE_REJECT, announce=False)
    else:
        options = RefitOptions(data=root / "fit" / "good", model=settings.default_model, calibrate=False,
                               held_out_share=0.0, announce=False)
    result = run_refit(settings, options)
    return result.used


