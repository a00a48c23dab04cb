"""Detection quality of DFKDE settings, measured through `inspector refit` and `inspector evaluate` themselves.

For every setting of a grid and every data set: `run_refit` from the training images into a temporary
store (calibrated as the shipped refit does it: automatically, which cross-fits for archives of these
sizes, at `refit.target_false_reject`), then `run_evaluate` on the test set: image AUROC, average
precision, recall and false-reject rate at the calibrated threshold, the refit's time and evaluate's
images/s. Then the scoring cost of each fitted model on prepared frames (batches of 4, the worker's),
measured in rounds that alternate every setting, so the machine's drift falls on all of them alike.
Last, for one setting, the calibration: the false-reject rate on the good test images at the threshold
calibrated for each target, cross-fitted and held out from the whole training archive and cross-fitted
from a small one (40 of its images), with a 95% Clopper-Pearson interval.

Data: the magnetic-tile photographs (the public Magnetic Tile Defect set, `--magnetic-tile PATH` or $MAGNETIC_TILE;
bench/datasets.py) and the
synthetic sample line (written to a temporary folder, as `inspector samples --out DIR` writes it).

    .venv/bin/python bench/quality.py --save quality.json  # the default grid, both data sets: ~13 min on 2 cores
    .venv/bin/python bench/quality.py --list             # the settings of the grid
    .venv/bin/python bench/quality.py --rows before,shipped --datasets magnetic-tile --json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch

import datasets as public_data
from inspector import config
from inspector.errors import FitError
from inspector.imagefiles import find_images, read_image
from inspector.stores import ModelStore
from inspector.tools import samples
from inspector.tools.evaluate import EvaluateOptions, Evaluation, run_evaluate
from inspector.tools.refit import RefitOptions, RefitResult, run_refit
from inspector_dfkde.plugin import DfkdePlugin, DfkdeSettings

ROOT = Path(__file__).resolve().parents[1]
MAGNETIC_TILE = public_data.magnetic_tile()
DATASETS = ("magnetic-tile", "sample-line")
GRID_KEYS = ("layers", "input_size", "n_comps", "pre_processing", "filter_count", "runtime", "precision")

# The [plugins.dfkde] defaults before this benchmark chose new ones: the row every other is compared with.
BEFORE = {"layers": ["blocks.6"], "input_size": 256, "n_comps": 16, "pre_processing": "scale", "filter_count": 40000,
          "runtime": "auto", "precision": "auto"}
# One factor at a time around BEFORE, then the combinations those point to. "shipped" is whatever
# DfkdeSettings holds now; the rows in ON_SHIPPED change only where the shipped settings' backbone runs.
GRID: dict[str, dict[str, Any]] = {
    "before": {},
    "n_comps 8": {"n_comps": 8},
    "n_comps 24": {"n_comps": 24},
    "n_comps 32": {"n_comps": 32},
    "n_comps 48": {"n_comps": 48},
    "blocks.4": {"layers": ["blocks.4"]},
    "blocks.2": {"layers": ["blocks.2"]},
    "blocks.2+4": {"layers": ["blocks.2", "blocks.4"]},
    "blocks.4+6": {"layers": ["blocks.4", "blocks.6"]},
    "size 128": {"input_size": 128},
    "size 192": {"input_size": 192},
    "size 320": {"input_size": 320},
    "norm": {"pre_processing": "norm"},
    "filter 200": {"filter_count": 200},
    "6 @128 n24": {"input_size": 128, "n_comps": 24},
    "4 @128 n24": {"layers": ["blocks.4"], "input_size": 128, "n_comps": 24},
    "4 @192 n24": {"layers": ["blocks.4"], "input_size": 192, "n_comps": 24},
    "4+6 @128 n24": {"layers": ["blocks.4", "blocks.6"], "input_size": 128, "n_comps": 24},
    "4+6 @192 n24": {"layers": ["blocks.4", "blocks.6"], "input_size": 192, "n_comps": 24},
    "2+4 @128 n24": {"layers": ["blocks.2", "blocks.4"], "input_size": 128, "n_comps": 24},
    "4 @128 n30": {"layers": ["blocks.4"], "input_size": 128, "n_comps": 30},
    "4+6 @128 n30": {"layers": ["blocks.4", "blocks.6"], "input_size": 128, "n_comps": 30},
    "shipped": None,
    "shipped torch": {"runtime": "torch", "precision": "fp32"},
    "shipped ov bf16": {"runtime": "openvino", "precision": "bf16"},
}
ON_SHIPPED = ("shipped torch", "shipped ov bf16")
COST_FRAMES = 32
COST_BATCH = 4  # worker.batch_size
CONFIDENCE = 0.95
TARGETS = (0.005, 0.01, 0.02)


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Path  # good images to fit from
    test: Path  # MVTec AD's test/ layout


def row_settings(name: str) -> dict[str, Any]:
    if GRID[name] is None or name in ON_SHIPPED:
        shipped = DfkdeSettings().model_dump()
        return {key: shipped[key] for key in GRID_KEYS} | (GRID[name] or {})
    return BEFORE | GRID[name]


def _settings(root: Path, dfkde: dict[str, Any], device: str) -> config.Settings:
    """A configuration as an operator would write it: the store in `root`, these [plugins.dfkde] keys."""
    lines = [f'device = "{device}"', "[store]", f"path = {json.dumps(str(root / 'models'))}", "[plugins.dfkde]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in dfkde.items()]
    path = root / "inspector.toml"
    path.write_text("\n".join(lines) + "\n")
    return config.load(path)


def fit_and_evaluate(dataset: Dataset, dfkde: dict[str, Any], device: str, **refit: Any
                     ) -> tuple[RefitResult, Evaluation, DfkdePlugin]:
    """`inspector refit --data TRAIN` then `inspector evaluate --data TEST`, into a throwaway store."""
    with tempfile.TemporaryDirectory(prefix="quality-") as folder:
        settings = _settings(Path(folder), dfkde, device)
        fitted = run_refit(settings, RefitOptions(data=dataset.train, model="default", announce=False, **refit))
        evaluation = run_evaluate(settings, EvaluateOptions(data=dataset.test, model="default",
                                                            batch_size=settings.worker.batch_size))
        plugin = DfkdePlugin.load(ModelStore(settings.store.path).load_path("default").path, torch.device(device),
                                  DfkdeSettings.model_validate(dfkde))
    return fitted, evaluation, plugin


def _subset(dataset: Dataset, n: int, folder: Path) -> Dataset:
    """A seeded n of the training images, linked (not copied) into `folder`: a small archive of the same line."""
    paths = find_images(dataset.train)
    folder.mkdir(parents=True, exist_ok=True)
    for i in sorted(np.random.default_rng(0).choice(len(paths), size=min(n, len(paths)), replace=False)):
        (folder / paths[i].name).symlink_to(paths[i])
    return Dataset(f"{dataset.name} ({n} training images)", folder, dataset.test)


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact binomial interval for k events in n trials."""
    alpha = 1 - confidence
    low = 0.0 if k == 0 else float(scipy.stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(scipy.stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def calibration_verdict(target: float, k: int, n: int) -> str:
    """Whether the false-reject rate k / n is within a factor of two of `target`, where n images can say so,
    and whether the interval holds the target."""
    if n * target < 1:
        return f"not resolvable: {n} good images tell rates apart in steps of {1 / n:.2%}"
    rate = k / n
    low, high = clopper_pearson(k, n)
    where = ("within 2x" if target / 2 <= rate <= 2 * target
             else "under half the target" if rate < target / 2 else "over twice the target")
    return f"{where}; the interval {'holds' if low <= target <= high else 'excludes'} the target"


def _quality(evaluation: Evaluation, fitted: RefitResult) -> dict[str, Any]:
    f = evaluation.figures
    c = f.confusion
    return {"auroc": f.auroc, "average_precision": f.average_precision, "recall": c.recall,
            "false_reject_rate": c.false_reject_rate, "good_failed": c.good_failed, "good": f.good,
            "defective": f.defective, "fit_seconds": fitted.seconds,
            "eval_images_per_second": evaluation.found / evaluation.seconds,
            "calibration": (fitted.calibration or {}).get("method")}


def scoring_cost(plugins: dict[str, DfkdePlugin], frames: list[np.ndarray], rounds: int) -> dict[str, list[float]]:
    """ms per frame of each plugin scoring the same frames in batches of COST_BATCH, in `rounds` that each
    time every plugin once, in an order rotated by one per round."""
    prepared = {name: torch.stack([p.prepare(frame) for frame in frames]) for name, p in plugins.items()}
    names = list(plugins)
    for name in names:  # warm-up: first-call allocations and kernel choice
        plugins[name].score(prepared[name][:COST_BATCH])
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            batch = prepared[name]
            started = time.perf_counter()
            for i in range(0, len(batch), COST_BATCH):
                plugins[name].score(batch[i : i + COST_BATCH])
            times[name].append(1000 * (time.perf_counter() - started) / len(batch))
    return times


def _percent(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.1%}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", help="comma-separated settings of the grid (default: all; see --list)")
    parser.add_argument("--list", action="store_true", help="print the grid's settings and exit")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, of {', '.join(DATASETS)}")
    parser.add_argument("--magnetic-tile", type=Path, default=MAGNETIC_TILE, help=public_data.HELP)
    parser.add_argument("--calibration-row", default="shipped",
                        help="the setting whose calibration is checked on the first data set ('none' skips it)")
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), help="false-reject rates to calibrate for")
    parser.add_argument("--small-archive", type=int, default=40, metavar="N",
                        help="also calibrate from a seeded N of the training images, cross-fitted (0: skip)")
    parser.add_argument("--cost-rounds", type=int, default=7, help="rounds of the scoring-cost measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine's cores: 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--save", type=Path, metavar="FILE", help="also write the JSON object to FILE")
    args = parser.parse_args()
    if args.list:
        for name in GRID:
            print(f"{name:<16}{json.dumps(row_settings(name))}")
        return 0
    rows = args.rows.split(",") if args.rows else list(GRID)
    unknown = [r for r in rows if r not in GRID]
    datasets = args.datasets.split(",")
    if unknown or any(d not in DATASETS for d in datasets):
        parser.error(f"unknown rows {unknown} or data sets {datasets}; rows: {', '.join(GRID)}")
    if "magnetic-tile" in datasets and not (args.magnetic_tile / "train" / "good").is_dir():
        parser.error(f"--magnetic-tile {args.magnetic_tile}: no train/good/ there; point it at the data set")
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    targets = [float(t) for t in args.targets.split(",")]
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="quality-line-") as line_folder:
        sets = []
        for name in datasets:
            if name == "magnetic-tile":
                sets.append(Dataset(name, args.magnetic_tile / "train" / "good", args.magnetic_tile / "test"))
            else:
                samples.write_line(Path(line_folder))
                sets.append(Dataset(name, Path(line_folder) / "train" / "good", Path(line_folder) / "test"))
        frames = [read_image(path, 10**8) for path in find_images(sets[0].test)[:: 7][:COST_FRAMES]]

        results: dict[str, dict[str, Any]] = {}
        plugins: dict[str, DfkdePlugin] = {}
        seen: dict[str, str] = {}
        for row in rows:
            dfkde = row_settings(row)
            same = seen.setdefault(json.dumps(dfkde, sort_keys=True), row)
            if same != row:  # "shipped" is one of the grid's settings: measured once
                results[row] = results[same] | {"same_as": same}
                continue
            results[row] = {"settings": dfkde, "datasets": {}}
            for dataset in sets:
                fitted, evaluation, plugin = fit_and_evaluate(dataset, dfkde, args.device)
                results[row]["datasets"][dataset.name] = _quality(evaluation, fitted)
                plugins.setdefault(row, plugin)
                q = results[row]["datasets"][dataset.name]
                print(f"[{time.perf_counter() - started:6.0f} s] {row:<16}{dataset.name:<15}AUROC {q['auroc']:.3f}",
                      file=sys.stderr, flush=True)
        costs = scoring_cost(plugins, frames, args.cost_rounds)
        baseline = statistics.median(costs["before"]) if "before" in costs else None
        for row, times in costs.items():
            results[row]["cost"] = {"ms_per_frame": statistics.median(times), "rounds": times,
                                    "relative_to_before": statistics.median(times) / baseline if baseline else None}

        checks = []
        if args.calibration_row != "none":
            dfkde = row_settings(args.calibration_row)
            archives = [("cross-fit", sets[0]), ("held-out", sets[0])]
            if args.small_archive:
                archives.append(("cross-fit", _subset(sets[0], args.small_archive, Path(line_folder) / "small")))
            for method, dataset in archives:
                for target in targets:
                    try:
                        fitted, evaluation, _ = fit_and_evaluate(dataset, dfkde, args.device, calibration=method,
                                                                 target_false_reject=target)
                    except FitError as exc:  # refit refuses a target the archive cannot promise, before fitting
                        checks.append({"method": method, "target": target, "refused": str(exc)})
                        continue
                    c = evaluation.figures.confusion
                    k, n = c.good_failed, c.good_failed + c.good_passed
                    checks.append({"method": method, "target": target, "good_failed": k, "good": n, "rate": k / n,
                                   "interval": clopper_pearson(k, n), "verdict": calibration_verdict(target, k, n),
                                   "calibration_images": fitted.calibration["held_out"],
                                   "calibration_rate": fitted.calibration["held_out_false_reject"],
                                   "recall": c.recall, "auroc": evaluation.figures.auroc,
                                   "fit_seconds": fitted.seconds,
                                   "fold_seconds": fitted.calibration.get("fold_seconds")})
    seconds = time.perf_counter() - started

    report = {"seconds": seconds, "device": args.device, "torch_threads": torch.get_num_threads(),
              "machine": f"{platform.processor() or platform.machine()}", "rows": results,
              "calibration": {"setting": args.calibration_row, "data": sets[0].name, "checks": checks},
              "shipped": row_settings("shipped")}
    if args.save:
        args.save.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_tables(report, sets))
    return 0


def _tables(report: dict[str, Any], sets: list[Dataset]) -> str:
    header = (f"  {'setting':<17}{'layers':<18}{'size':>5}{'comps':>6} {'pre':<6}{'filter':>7}  {'data':<14}"
              f"{'runtime':<14}{'AUROC':>6}{'AP':>7}{'recall':>8}{'FRR':>7}{'':>9}{'fit s':>7}{'eval/s':>8}"
              f"{'ms/frame':>10}{'x':>6}")
    lines = [
        (f"bench/quality.py: {len(report['rows'])} settings x {len(sets)} data sets; {report['seconds']:.0f} s; "
         f"device {report['device']}, torch threads {report['torch_threads']}"),
        ("every fit is `inspector refit` (calibration: automatic, target 0.5%), every figure `inspector evaluate`; "
         "FRR = false-reject rate on the good test images"),
        (f"cost: ms per frame scoring {COST_FRAMES} prepared frames in batches of {COST_BATCH}, median of rounds "
         "alternating every setting; x = relative to 'before'"),
        "",
        header,
    ]
    for row, result in report["rows"].items():
        if "same_as" in result:
            lines.append(f"  {row:<17}= {result['same_as']}")
            continue
        s = result["settings"]
        cost = result.get("cost", {})
        for i, (name, q) in enumerate(result["datasets"].items()):
            head = (f"  {row:<17}{'+'.join(s['layers']):<18}{s['input_size']:>5}{s['n_comps']:>6} "
                    f"{s['pre_processing']:<6}{s['filter_count']:>7}")
            head = head if i == 0 else " " * len(head)
            tail = ""
            if i == 0 and cost:
                rel = cost["relative_to_before"]
                tail = f"{cost['ms_per_frame']:>10.1f}{(f'{rel:.2f}' if rel else ''):>6}"
            backbone = f"{s['runtime']} {s['precision']}" if i == 0 else ""
            lines.append(f"{head}  {name:<14}{backbone:<14}{q['auroc']:>6.3f}{q['average_precision']:>7.3f}"
                         f"{_percent(q['recall']):>8}{_percent(q['false_reject_rate']):>7}"
                         f"{'(' + str(q['good_failed']) + '/' + str(q['good']) + ')':>9}"
                         f"{q['fit_seconds']:>7.1f}{q['eval_images_per_second']:>8.1f}{tail}")
    checks = report["calibration"]["checks"]
    if checks:
        title = (f"calibration of '{report['calibration']['setting']}' on {report['calibration']['data']}: "
                 f"false rejects among the good test images at the threshold calibrated for each target "
                 f"({CONFIDENCE:.0%} Clopper-Pearson interval)")
        columns = (f"  {'method':<10}{'target':>7}{'calibrated on':>15}{'there':>8}{'fold s':>8}{'test good':>11}"
                   f"{'rate':>7}{'interval':>18}{'recall':>8}{'AUROC':>7}  verdict")
        lines += ["", title, columns]
        for c in checks:
            if "refused" in c:
                lines.append(f"  {c['method']:<10}{c['target']:>7.1%}  refused by refit: {c['refused'][:160]}")
                continue
            low, high = c["interval"]
            folds = "-" if c["fold_seconds"] is None else f"{c['fold_seconds']:.1f}"
            lines.append(f"  {c['method']:<10}{c['target']:>7.1%}{c['calibration_images']:>10} imgs"
                         f"{_percent(c['calibration_rate']):>8}{folds:>8}"
                         f"{str(c['good_failed']) + '/' + str(c['good']):>11}"
                         f"{_percent(c['rate']):>7}{'[' + f'{low:.1%}, {high:.1%}' + ']':>18}"
                         f"{_percent(c['recall']):>8}{c['auroc']:>7.3f}  {c['verdict']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
