"""The figures of an `inspector bench` run: the JSON document, the table an engineer reads, the targets."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from typing import Any

import torch

from inspector import __version__

SCHEMA = "inspector.bench/1"
THROUGHPUT_TARGET = 0.85  # whole path at saturation / raw plugin
LATENCY_TARGET = 3.0  # p99 / p50 at half load
NULL_PLUGIN = "null"  # no model: the run measures the frame path's own ceiling


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
        """The two targets per encoding, with pass/fail; empty when the broker stage was skipped or the plugin is
        `null` (no model to hold the path to)."""
        out: list[dict[str, Any]] = []
        if self.settings.get("plugin") == NULL_PLUGIN:
            return out
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
            phases = [run["saturation"], run["half_load"]]
            for runs in run.get("failing", {}).values():
                phases += [side[phase] for side in runs.values() for phase in ("saturation", "half_load")]
            for phase in phases:
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
            (f"model: {s['plugin']} {s['backbone']} at {s['input_size']} px, {s['precision']}"
             f"{', on ' + s['runtime'] if s.get('runtime') else ''}; a throwaway fitted "
             f"on {s['fit_images']} generated frames" if s["plugin"] != NULL_PLUGIN else
             "model: the null plugin (a fixed score, no work): the frame path's own ceiling"),
            (f"worker policy: batches of up to {s['batch_size']}, waiting {s['max_batch_wait_ms']:g} ms at most; "
             f"{s['decode_threads']} decode threads; prefetch {s['prefetch']}"
             + (f"; broker names {s['queue_prefix']}.*, deleted at the end" if s.get("queue_prefix") else "")),
            "",
            (f"  {'stage':<28}{'encoding':<10}{'rate':>9}  {'unit':<9}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}"
             f"{'lost':>6}"),
            _row("1  raw plugin", "-", raw["images_per_second"], "images/s"),
        ]
        cpu_lines: list[str] = []
        notes = [(f"  1  batches of {raw['batch_size']}; the median of {len(raw['measurements'])} measurements "
                  f"of {raw['window_s']:g} s: {', '.join(f'{r:.2f}' for r in raw['measurements'])} images/s")]
        for encoding, d in self.decode.items():
            lines.append(_row("2  decode + prepare", encoding, d["frames_per_second"], "frames/s"))
            notes.append(f"  2  {encoding}: {d['threads']} threads; on one thread {d['decode_ms']:.1f} ms decode + "
                         f"{d['prepare_ms']:.1f} ms prepare (decoding in full: "
                         f"{d['full_size_decode_and_prepare_ms']:.1f} ms); "
                         f"{f['bytes'][encoding] / 1024:.0f} KiB a frame")
        for encoding, run in (self.broker or {}).items():
            sat, half = run["saturation"], run["half_load"]
            lines.append(_row("3a whole path, saturation", encoding, sat["frames_per_second"], "frames/s",
                              lost=_lost(sat)))
            ratio = ("" if sat["ratio_to_raw"] is None else
                     f"; {sat['ratio_to_raw']:.1%} of the raw plugin's {sat['raw_images_per_second']:.2f} "
                     f"measured just before and after; model and decoding alone predict "
                     f"{sat['expected_frames_per_second']:.2f}")
            if s["plugin"] == NULL_PLUGIN:
                ratio = ""
            notes.append(f"  3a {encoding}: {sat['frames']} frames queued, drained in {_seconds(sat['seconds'])}"
                         f"{ratio}; {_batches(sat)}{_losses(sat)}")
            if sat.get("cpu"):
                cpu_lines.append(_cpu_row(encoding, f["bytes"][encoding], sat, run.get("rabbitmq_alone")))
            alone = run.get("rabbitmq_alone")
            if alone:
                lines.append(_row("3r RabbitMQ alone", encoding, alone["frames_per_second"], "frames/s"))
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
        if cpu_lines:
            lines += ["", "CPU per frame in 3a, microseconds (thread CPU time: the worker's threads; 3r: the plain "
                      "consumer's)", "  " + "  ".join(f"{h:>{w}}" for h, w in _CPU_COLUMNS), *cpu_lines,
                      *_cpu_legend(self.broker)]
        for encoding, run in (self.broker or {}).items():
            if run.get("failing"):
                lines += ["", *_failing_table(encoding, run["failing"])]
        if self.targets:
            lines += ["", "targets"]
            for t in self.targets:
                value = ("n/a" if t["value"] is None else
                         f"{t['value']:.1%}" if t["target"] == "throughput" else f"{t['value']:.2f}x")
                lines.append(f"  {t['encoding']:<6}{t['rule']:<56}{value:>8}  {'pass' if t['pass'] else 'FAIL'}")
        return "\n".join(lines)


def _failing_table(encoding: str, failing: dict[str, dict[str, Any]]) -> list[str]:
    """Regions off and on side by side, per share of defective frames: what regions cost a line."""
    heading = (f"  {'share':<7}{'regions':<9}{'3a frames/s':>12}{'fails seen':>12}{'w/ regions':>11}"
               f"{'fail p50':>10}{'fail p95':>10}{'pass p50':>10}{'pass p95':>10}{'lost':>6}")
    lines = [f"failing frames, {encoding}: a share of the frames are defective parts; the model's regions off, then on",
             heading]
    for share, runs in failing.items():
        for side, label in (("regions_off", "off"), ("regions_on", "on")):
            sat, half = runs[side]["saturation"], runs[side]["half_load"]
            seen = {k: sat["verdicts"][k] + half["verdicts"][k] for k in ("fails", "fails_with_regions")}
            frames = sat["frames"] + half["frames"]
            fail, good = half["latency_ms_fail"], half["latency_ms_pass"]
            cells = "".join("       n/a" if v is None else f"{v:>10.0f}"
                            for v in (fail["p50"], fail["p95"], good["p50"], good["p95"]))
            rate = "n/a" if sat["frames_per_second"] is None else f"{sat['frames_per_second']:.2f}"
            lines.append(f"  {share:<7}{label:<9}{rate:>12}{seen['fails'] / frames:>12.1%}"
                         f"{seen['fails_with_regions']:>11}{cells}{_lost(sat) + _lost(half):>6}")
    lines.append("  3a: a backlog drained; latency in ms at half load, of the frames answered fail and pass, both "
                 "sides at half the regions-off 3a rate; fails seen: of every frame of both phases; w/ regions: "
                 "fail results carrying `regions`")
    for share, runs in failing.items():
        half = runs["regions_on"]["half_load"]
        lines.append(f"  {share}: half load at {half['rate_hz']:.2f} Hz, {half['latency_ms_fail']['frames']} fails "
                     f"timed (of {half['frames']} frames); defective frames failed "
                     + ", ".join(f"{s.split('_')[1]} {_fails(runs[s])}" for s in ("regions_off", "regions_on")))
    return lines


def _fails(side: dict[str, Any]) -> str:
    v = [side[phase]["verdicts"] for phase in ("saturation", "half_load")]
    return (f"{sum(x['defective_failed'] for x in v)}/{sum(x['defective'] for x in v)}, good frames failed "
            f"{sum(x['good_failed'] for x in v)}")


def _row(stage: str, encoding: str, rate: float | None, unit: str,
         latency: tuple[float | None, ...] = (), lost: int | None = None) -> str:
    cells = "".join("     n/a" if v is None else f"{v:>8.0f}" for v in latency) if latency else " " * 24
    return (f"  {stage:<28}{encoding:<10}{'n/a' if rate is None else f'{rate:.2f}':>9}  {unit:<9}{cells}"
            f"{'' if lost is None else f'{lost:>6}'}").rstrip()


_CPU_HEADINGS = ("kind", "KiB", "consume", "hand-off", "parse", "decode", "prepare", "dec.other", "batch", "score",
                 "result", "publish", "confirm", "ack", "settled", "pika I/O", "total", "no-decode", "3r")
_CPU_COLUMNS = tuple((h, 9 if i else 10) for i, h in enumerate(_CPU_HEADINGS))
_CPU_STAGES = ("consume", "hand-off", "parse", "decode", "prepare", "decode other", "batch", "score", "result encode",
               "publish", "confirm", "ack", "settled", "pika I/O")


def _cpu_row(encoding: str, frame_bytes: int, sat: dict[str, Any], alone: dict[str, Any] | None) -> str:
    cpu = sat["cpu"]
    cells = [f"{encoding:>10}", f"{frame_bytes / 1024:>9.0f}"]
    cells += [f"{cpu['stages_us'][stage]:>9.1f}" for stage in _CPU_STAGES]
    cells += [f"{cpu['total_us']:>9.1f}", f"{cpu['without_image_decode_us']:>9.1f}"]
    cells.append(f"{alone['cpu_us']:>9.1f}" if alone and alone.get("cpu_us") is not None else f"{'n/a':>9}")
    return "  " + "  ".join(cells)


def _cpu_legend(broker: dict[str, dict[str, Any]] | None) -> list[str]:
    first = next(iter((broker or {}).values()))["saturation"]["cpu"]
    return [
        "  no-decode: the path's own cost, every worker thread's CPU less the decode of the image itself; "
        "3r: RabbitMQ alone, a plain pika consumer's CPU to take and ack one frame",
        f"  stages are timed with a thread-CPU clock through the worker's stage hooks for the run: "
        f"{first['wrapped_calls_per_frame']:.1f} timed calls a frame at about {first['wrapper_us_per_call']:.1f} us "
        "each are included",
    ]


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
