"""`inspector bench --runtime a,b,c`: the same bench once per backbone runtime, in one run, side by side.

Each runtime gets a whole bench of its own (its throwaway model fitted with that runtime, as refit would, then
stages 1 to 3 served with it, as the worker would), one after the other on the same generated frames; the
summary puts the raw plugin's images/s and the whole path's frames/s of each encoding next to the first
runtime's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from inspector.config import Settings
from inspector.errors import ConfigError
from inspector.tools.bench.options import BenchOptions
from inspector.tools.bench.report import BenchReport
from inspector.tools.bench.run import run_bench


def with_runtime(settings: Settings, runtime: str) -> Settings:
    """`settings` with the default model's plugin table set to `runtime`, checked by the plugin's own settings."""
    plugin = settings.models[settings.default_model].plugin
    if "runtime" not in settings.plugin_settings(plugin).model_fields:
        raise ConfigError(f"--runtime: the default model's plugin {plugin!r} has no runtime to choose")
    changed = settings.model_copy(update={"plugins": {**settings.plugins,
                                                      plugin: {**settings.plugins.get(plugin, {}), "runtime": runtime}}})
    changed.plugin_settings(plugin)  # ConfigError naming plugins.<plugin>.runtime when it is unknown or absent
    return changed


def run_runtimes(settings: Settings, options: BenchOptions, runtimes: Sequence[str]) -> list[BenchReport]:
    """One bench per runtime, in the order given; every runtime is checked before the first runs."""
    if len(set(runtimes)) != len(runtimes) or not runtimes:
        raise ConfigError("--runtime: name each runtime once, e.g. --runtime torch,onnxruntime,openvino")
    configured = [with_runtime(settings, runtime) for runtime in runtimes]
    return [run_bench(one, options) for one in configured]


def summary(reports: Sequence[BenchReport]) -> dict[str, Any]:
    """Per runtime: raw images/s, whole-path frames/s per encoding, and each as a multiple of the first's."""
    rows = []
    for report in reports:
        whole = {e: run["saturation"]["frames_per_second"] for e, run in (report.broker or {}).items()}
        rows.append({"runtime": report.settings.get("runtime"), "precision": report.settings.get("precision"),
                     "raw_images_per_second": report.raw["images_per_second"], "whole_path_frames_per_second": whole})
    base = rows[0]
    for row in rows:
        row["raw_vs_first"] = round(row["raw_images_per_second"] / base["raw_images_per_second"], 2)
        row["whole_path_vs_first"] = {e: round(rate / base["whole_path_frames_per_second"][e], 2)
                                      for e, rate in row["whole_path_frames_per_second"].items()
                                      if rate and base["whole_path_frames_per_second"].get(e)}
    return {"schema": "inspector.bench.runtimes/1", "runtimes": rows, "reports": [r.as_dict() for r in reports]}


def table(reports: Sequence[BenchReport]) -> str:
    """Each runtime's own table, then the side-by-side summary."""
    data = summary(reports)
    encodings = list(data["runtimes"][0]["whole_path_frames_per_second"])
    head = f"  {'runtime':<12} {'precision':<9} {'raw images/s':>13} {'x':>6}" + "".join(
        f" {e + ' frames/s':>16} {'x':>6}" for e in encodings)
    lines = [report.table() for report in reports]
    lines += ["", "runtimes side by side (whole path: 3a, saturation; x: against the first runtime)", head]
    for row in data["runtimes"]:
        line = (f"  {row['runtime']:<12} {row['precision']:<9} {row['raw_images_per_second']:>13.2f} "
                f"{row['raw_vs_first']:>6.2f}")
        for e in encodings:
            rate = row["whole_path_frames_per_second"].get(e)
            line += f" {rate or 0:>16.2f} {row['whole_path_vs_first'].get(e, 0):>6.2f}"
        lines.append(line)
    return "\n".join(lines)
