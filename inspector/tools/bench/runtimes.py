"""`inspector bench --runtime a,b,c [--rounds N]`: the same bench per backbone runtime, in one run, side by side.

Each runtime gets a whole bench of its own (its throwaway model fitted with that runtime, as refit would, then
stages 1 to 3 served with it, as the worker would), one after the other on the same generated frames, and the
runtimes take turns for N rounds, so that a shared machine's drift hits them alike. The summary puts the median
over the rounds of the raw plugin's images/s and the whole path's frames/s of each encoding next to the first
runtime's, with every round's figure.
"""

from __future__ import annotations

import statistics
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
    table = {**settings.plugins.get(plugin, {}), "runtime": runtime}
    changed = settings.model_copy(update={"plugins": {**settings.plugins, plugin: table}})
    changed.plugin_settings(plugin)  # ConfigError naming plugins.<plugin>.runtime when it is unknown or absent
    return changed


MAX_ROUNDS = 20


def run_runtimes(settings: Settings, options: BenchOptions, runtimes: Sequence[str],
                 rounds: int = 1) -> list[list[BenchReport]]:
    """`rounds` rounds of one bench per runtime, in the order given; every runtime is checked before the first
    runs. Returns each round's reports."""
    if len(set(runtimes)) != len(runtimes) or not runtimes:
        raise ConfigError("--runtime: name each runtime once, e.g. --runtime torch,onnxruntime,openvino")
    if not 1 <= rounds <= MAX_ROUNDS:
        raise ConfigError(f"--rounds {rounds}: must be between 1 and {MAX_ROUNDS}")
    options.check()
    configured = [with_runtime(settings, runtime) for runtime in runtimes]
    return [[run_bench(one, options) for one in configured] for _ in range(rounds)]


def summary(rounds: Sequence[Sequence[BenchReport]]) -> dict[str, Any]:
    """Per runtime: the median over the rounds of raw images/s and whole-path frames/s per encoding (3a), each
    as a multiple of the first runtime's, and every round's figures."""
    rows = []
    for reports in zip(*rounds):  # one runtime's reports, a round each
        raw = [r.raw["images_per_second"] for r in reports]
        whole = {e: [r.broker[e]["saturation"]["frames_per_second"] for r in reports]
                 for e in (reports[0].broker or {})}
        rows.append({"runtime": reports[0].settings.get("runtime"), "precision": reports[0].settings.get("precision"),
                     "raw_images_per_second": round(statistics.median(raw), 3), "raw_rounds": raw,
                     "whole_path_frames_per_second": {e: round(statistics.median(v), 3) if all(v) else None
                                                      for e, v in whole.items()},
                     "whole_path_rounds": whole})
    base = rows[0]
    for row in rows:
        row["raw_vs_first"] = round(row["raw_images_per_second"] / base["raw_images_per_second"], 2)
        row["whole_path_vs_first"] = {e: round(rate / base["whole_path_frames_per_second"][e], 2)
                                      for e, rate in row["whole_path_frames_per_second"].items()
                                      if rate and base["whole_path_frames_per_second"].get(e)}
    return {"schema": "inspector.bench.runtimes/1", "rounds": len(rounds), "runtimes": rows,
            "reports": [[r.as_dict() for r in reports] for reports in rounds]}


def table(rounds: Sequence[Sequence[BenchReport]]) -> str:
    """Each bench's own table, then the side-by-side summary."""
    data = summary(rounds)
    encodings = list(data["runtimes"][0]["whole_path_frames_per_second"])
    head = f"  {'runtime':<12} {'precision':<9} {'raw images/s':>13} {'x':>6}" + "".join(
        f" {e + ' frames/s':>16} {'x':>6}" for e in encodings)
    lines = [report.table() for reports in rounds for report in reports]
    lines += ["", f"runtimes side by side, the median of {len(rounds)} alternating round(s) "
              "(whole path: 3a, saturation; x: against the first runtime)", head]
    for row in data["runtimes"]:
        line = (f"  {row['runtime']:<12} {row['precision']:<9} {row['raw_images_per_second']:>13.2f} "
                f"{row['raw_vs_first']:>6.2f}")
        for e in encodings:
            rate = row["whole_path_frames_per_second"].get(e)
            line += f" {rate or 0:>16.2f} {row['whole_path_vs_first'].get(e, 0):>6.2f}"
        lines.append(line)
    for row in data["runtimes"]:
        whole = "; ".join(f"{e} {', '.join(f'{v:.1f}' for v in values)}"
                          for e, values in row["whole_path_rounds"].items())
        lines.append(f"  {row['runtime']:<12} rounds: raw {', '.join(f'{v:.1f}' for v in row['raw_rounds'])}"
                     f"{'; whole path ' + whole if whole else ''}")
    return "\n".join(lines)
