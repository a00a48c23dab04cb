"""False rejects on fresh good parts at calibrated targets, for an archive and for the same archive with every
image twice (the second re-encoded as a JPEG at another quality, as a second frame of the same part would be),
under the calibration before and after folds that keep a part's frames together and the split-conformal rule.

Per archive, two `inspector refit` runs (run_refit, cross-fitted) into throwaway stores:

- before: folds of single images at random (`[refit] group_twins = false`, no pattern, sidecar or time
  blocks; --before-folds folds, 5 as it was), and the boundary at np.quantile(out-of-fold scores, target)
  (numpy's default, type 7), computed here from the refit's stored out-of-fold scores;
- after: the shipped refit (grouping as `[refit]` sets it, automatic folds), and the boundary at the k-th
  lowest out-of-fold score, k = floor(target x (n + 1)) (plugins/dfkde/conformal.py).

Each fitted model scores the fresh good test images once, read as `inspector evaluate` reads them; every
target's rate comes from those scores (a frame fails at or below the boundary), with a 95% Clopper-Pearson
interval. `inspector evaluate` then runs once per "after" model as a check: its false-reject rate at the
refit's own target must be the one computed here.

    nice -n 5 .venv/bin/python bench/calibration_twins.py            # magnetic-tile: ~10 min on 2 busy cores
    .venv/bin/python bench/calibration_twins.py --data DIR --dfkde input_size=64 --json
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import CONFIDENCE, clopper_pearson  # noqa: E402  (bench/quality.py, beside this file)

import datasets
from inspector import config  # noqa: E402
from inspector.imagefiles import find_images  # noqa: E402
from inspector.plugin import decode_size  # noqa: E402
from inspector.tools.evaluate import EvaluateOptions, load_current, read_like_a_capture, run_evaluate  # noqa: E402
from inspector.tools.refit import RefitOptions, run_refit  # noqa: E402
from inspector.worker.decode import DecodeLimits  # noqa: E402
from inspector_dfkde.conformal import boundary_rank  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAGNETIC_TILE = datasets.magnetic_tile()
TARGETS = (0.005, 0.01, 0.02)
TWIN_QUALITY = 90  # the second frame's JPEG quality
MODEL = "default"
RULES = ("before", "after")


def write_twins(train: Path, folder: Path, quality: int = TWIN_QUALITY) -> int:
    """Every image of `train` linked into `folder`, and beside it a JPEG of it at `quality`: a second frame of
    the same part, re-encoded. Returns the images written."""
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for i, path in enumerate(find_images(train)):
        (folder / f"{i:05d}-{path.name}").symlink_to(path.resolve())
        with Image.open(path) as image:
            image = image.convert("L" if image.mode in ("L", "I;16", "I", "1") else "RGB")
            image.save(folder / f"{i:05d}-{path.stem}.twin.jpg", format="JPEG", quality=quality)
        count += 2
    return count


def _settings(root: Path, dfkde: dict[str, Any], refit: dict[str, Any], device: str) -> config.Settings:
    lines = [f'device = "{device}"', "[store]", f"path = {json.dumps(str(root / 'models'))}", "[refit]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in refit.items()]
    lines += ["[plugins.dfkde]"] + [f"{key} = {json.dumps(value)}" for key, value in dfkde.items()]
    path = root / "inspector.toml"
    path.write_text("\n".join(lines) + "\n")
    return config.load(path)


def stored_scores(settings: config.Settings, good: list[Path], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The stored version's out-of-fold calibration scores, sorted (kept by the conformal calibration), and its
    raw scores (log-densities) of the fresh good images, read as evaluate reads them."""
    served = load_current(settings, MODEL, torch.device(settings.device))
    scale = getattr(served.plugin.model, "calibration", None)
    if scale is None:
        raise SystemExit("the refit stored no calibration scores (plugins/dfkde/conformal.py's ConformalScale); "
                         "this benchmark needs the conformal calibration")
    read = functools.partial(read_like_a_capture, limits=DecodeLimits.from_settings(settings.worker),
                             min_size=decode_size(served.plugin))
    raw = []
    for start in range(0, len(good), batch_size):
        batch = torch.stack([served.plugin.prepare(read(path)) for path in good[start : start + batch_size]])
        raw.append(np.asarray(served.plugin.score(batch).raw, dtype=np.float64))
    return np.sort(np.asarray(scale.scores, dtype=np.float64)), np.concatenate(raw)


def boundary(rule: str, oof: np.ndarray, target: float) -> float:
    if rule == "before":
        return float(np.quantile(oof, target))  # type 7, as calibrate did
    k = boundary_rank(len(oof), target)
    return float("nan") if k < 1 else float(oof[k - 1])


def measure(archive: Path, test: Path, rule: str, targets: list[float], dfkde: dict[str, Any], args: argparse.Namespace
            ) -> dict[str, Any]:
    """One refit of `archive` under `rule`'s calibration, its fresh good scores, every target's rate."""
    refit_keys = {"group_twins": False} if rule == "before" else {}
    options = {"fold_order": "random", "folds": args.before_folds} if rule == "before" else {}
    good = find_images(test / "good")
    with tempfile.TemporaryDirectory(prefix="twins-") as folder:
        settings = _settings(Path(folder), dfkde, refit_keys, args.device)
        started = time.perf_counter()
        fitted = run_refit(settings, RefitOptions(data=archive, model=MODEL, announce=False, calibration="cross-fit",
                                                  target_false_reject=args.refit_target, **options))
        fit_seconds = time.perf_counter() - started
        oof, fresh = stored_scores(settings, good, settings.worker.batch_size)
        check = None
        if rule == "after":
            evaluation = run_evaluate(settings, EvaluateOptions(data=test, model=MODEL,
                                                                batch_size=settings.worker.batch_size))
            c = evaluation.figures.confusion
            check = {"target": args.refit_target, "good_failed": c.good_failed, "good": c.good_failed + c.good_passed}
    rates = {}
    for target in targets:
        edge = boundary(rule, oof, target)
        failed = int(np.sum(fresh <= edge))
        k = boundary_rank(len(oof), target)
        rates[str(target)] = {"boundary": edge, "good_failed": failed, "good": len(fresh), "rate": failed / len(fresh),
                              "interval": clopper_pearson(failed, len(fresh)),
                              "expected": (k / (len(oof) + 1)) if rule == "after" else None}
    if check is not None:
        mine = rates.get(str(args.refit_target))
        check["agrees"] = mine is None or mine["good_failed"] == check["good_failed"]
    groups = getattr(fitted, "groups", None)
    return {"images": fitted.used, "calibration_images": len(oof), "folds": (fitted.calibration or {}).get("folds"),
            "groups": groups, "fit_seconds": round(fit_seconds, 1), "rates": rates, "evaluate_check": check}


def table(report: dict[str, Any]) -> str:
    lines = [f"bench/calibration_twins.py on {report['data']}: {report['fresh_good']} fresh good images; "
             f"{report['seconds']:.0f} s",
             f"false-reject rate on the fresh good images at each target ({CONFIDENCE:.0%} Clopper-Pearson interval);"
             " before: single-image random folds, np.quantile; after: grouped folds, k = floor(q (n + 1))",
             "",
             f"  {'archive':<9}{'images':>7}{'target':>8}   {'before':<30}{'after':<30}{'after: expected':>16}"]
    for name, archive in report["archives"].items():
        for i, target in enumerate(report["targets"]):
            cells = []
            for rule in RULES:
                r = archive[rule]["rates"][str(target)]
                low, high = r["interval"]
                cells.append(f"{r['rate']:>6.1%} [{low:.1%}, {high:.1%}] {r['good_failed']:>3}/{r['good']:<4}")
            expected = archive["after"]["rates"][str(target)]["expected"]
            head = f"  {name:<9}{archive['after']['images']:>7}" if i == 0 else " " * 18
            lines.append(f"{head}{target:>8.1%}   {cells[0]:<30}{cells[1]:<30}{expected:>16.2%}")
        for rule in RULES:
            a = archive[rule]
            groups = a["groups"] or {}
            check = a["evaluate_check"]
            note = "" if check is None else (f"; evaluate at {check['target']:.1%}: {check['good_failed']}/"
                                            f"{check['good']} ({'agrees' if check['agrees'] else 'DIFFERS'})")
            lines.append(f"  {'':<9}{rule}: {a['calibration_images']} calibration scores, {a['folds']} folds, "
                         f"{groups.get('groups', '-')} groups, fit {a['fit_seconds']:.0f} s{note}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=MAGNETIC_TILE, help=datasets.HELP)
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), help="false-reject rates")
    parser.add_argument("--refit-target", type=float, default=0.01, help="the target each refit is run at")
    parser.add_argument("--before-folds", type=int, default=5, help="folds of the 'before' calibration")
    parser.add_argument("--dfkde", action="append", default=[], metavar="KEY=VALUE",
                        help="a [plugins.dfkde] setting (JSON value), e.g. input_size=64")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine's cores: 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    if not (args.data / "train" / "good").is_dir() or not (args.data / "test" / "good").is_dir():
        parser.error(f"--data {args.data}: needs train/good/ and test/good/ (MVTec AD's layout)")
    dfkde = {}
    for item in args.dfkde:
        key, _, value = item.partition("=")
        try:
            dfkde[key] = json.loads(value)
        except ValueError:
            dfkde[key] = value
    targets = [float(t) for t in args.targets.split(",")]
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report: dict[str, Any] = {"data": str(args.data), "targets": targets, "twin_quality": TWIN_QUALITY,
                              "dfkde": dfkde, "archives": {}}
    with tempfile.TemporaryDirectory(prefix="twins-archive-") as folder:
        archives = {"plain": args.data / "train" / "good", "twice": Path(folder)}
        write_twins(archives["plain"], archives["twice"])
        for name, archive in archives.items():
            report["archives"][name] = {}
            for rule in RULES:
                report["archives"][name][rule] = measure(archive, args.data / "test", rule, targets, dfkde, args)
                print(f"[{time.perf_counter() - started:6.0f} s] {name} {rule}", file=sys.stderr, flush=True)
    report["fresh_good"] = len(find_images(args.data / "test" / "good"))
    report["seconds"] = time.perf_counter() - started
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
