"""The `inspector` command: parses arguments, calls one function per command, maps errors to exit codes.

Exit status: 0 success, 2 bad usage or invalid configuration, 1 a runtime failure.
An operator mistake prints one clear message, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from inspector import __version__, imageformats, logs
from inspector.errors import ConfigError, InspectorError, StateError

if TYPE_CHECKING:  # the plugin contract imports torch, which a command loads only when it needs it
    from inspector.plugin import Calibration

log = logging.getLogger("inspector")


def _add_announce(parser: argparse.ArgumentParser, what: str, doing: str) -> None:
    """--announce / --no-announce, on refit's terms for every command that makes a version current."""
    telling = parser.add_mutually_exclusive_group()
    telling.add_argument("--announce", action="store_true",
                         help=f"announce {what} on the broker even when no broker.url is configured (the default "
                         "URL, a local RabbitMQ)")
    telling.add_argument("--no-announce", action="store_true",
                         help=f"{doing} without telling the workers (default where no broker.url is configured: "
                         "nothing is sent)")


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="TOML configuration (default: the file INSPECTOR_CONFIG names, else ./inspector.toml if present); "
        "INSPECTOR_* variables override it",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inspector", description="Visual inspection of line camera frames.",
                                     epilog=FIRST_RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"inspector {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="the worker: score every capture from RabbitMQ and publish its verdict",
        description="Consume captures from RabbitMQ, score each with the current version of its model, "
        "publish the verdict with publisher confirms and acknowledge the capture. Takes up new model "
        "versions announced by refit or rollback without a restart. SIGTERM or SIGINT: finish the "
        "held captures and exit 0 within worker.shutdown_grace_s.",
    )
    _add_config(run)
    run.set_defaults(func=_cmd_run)

    sample = commands.add_parser(
        "samples",
        help="write a sample line: synthetic good and defective images in MVTec AD's folder layout",
        description="Write DIR/train/good, DIR/test/good and DIR/test/<defect kind> with synthetic images of "
        "one machined part, deterministic by seed: a training archive for refit and a test set to publish "
        "or evaluate, for trying inspector without a camera.",
    )
    _add_config(sample)
    sample.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="folder to write (created; refused when it exists and is not empty)")
    sample.add_argument("--train", type=int, default=200, help="good training images (default 200)")
    sample.add_argument("--test", type=int, default=40, help="good test images (default 40)")
    sample.add_argument("--defective", type=int, default=10, help="test images per defect kind (default 10)")
    sample.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    sample.add_argument("--format", default="png", choices=imageformats.SAMPLE_FORMATS,
                        help="image file format (default png)")
    sample.add_argument("--seed", type=int, default=0, help="seeds the images: the same seed writes the same line "
                        "(default 0)")
    sample.set_defaults(func=_cmd_samples, check_plugins=False)  # writes images: no torch to load

    demo = commands.add_parser(
        "demo",
        help="fit the configured model on a synthetic part and score good and defective frames",
        description="Fit the configured plugin on synthetic images of one part, then score held-out good "
        "and defective images of it, and print how well it separates them. Needs no broker.",
    )
    _add_config(demo)
    demo.add_argument("--train", type=int, default=200, help="good images to fit on (default 200)")
    demo.add_argument("--test", type=int, default=40,
                      help="held-out good images and defective images each (default 40)")
    demo.add_argument("--seed", type=int, default=0, help="seeds the synthetic images (default 0)")
    demo.set_defaults(func=_cmd_demo)

    refit = commands.add_parser(
        "refit",
        help="fit a new model version from a folder of normal images, store it, announce it",
        description="Fit a new version of a model from a folder tree of images of good parts, calibrate "
        "its threshold on good images the fit did not see (a held-out share of them, or every image by "
        "cross-fitting), write it to the model store as the current version and announce it to the running "
        "workers.",
    )
    _add_config(refit)
    refit.add_argument("--data", type=Path, required=True, metavar="DIR",
                       help="folder of good-part images (recursive); a labelled data set's root, or a folder of "
                       "defects or masks, is refused (e.g. pass sample-line/train/good, not sample-line)")
    refit.add_argument("--any-folder", action="store_true",
                       help="fit on every image under --data even where its folders are laid out as a labelled "
                       "data set (defect kinds beside good/, ground_truth/ masks)")
    refit.add_argument("--model", metavar="NAME", help="the model to refit (default: default_model)")
    refit.add_argument("--target-false-reject", type=float, metavar="RATE",
                       help="false-reject rate on good parts to calibrate for (default: refit.target_false_reject)")
    refit.add_argument("--held-out", type=float, metavar="SHARE",
                       help="calibrate on this share of the images held out of the fit (a plain hold-out; "
                       "default: the automatic choice with refit.held_out_share)")
    refit.add_argument("--calibration", choices=("auto", "cross-fit", "held-out"),
                       help="cross-fit: every image scored by a model fitted without its fold, the model fitted on "
                       "all; held-out: a share held out of the fit; auto (default): cross-fit for a plugin that "
                       "reuses embeddings (DFKDE), else held out when that gives at least 200 images")
    refit.add_argument("--folds", type=int, metavar="K", default=0,
                       help="folds of a cross-fit, each of whole parts (default: 20 below 100 images, 10 below "
                       "1000, else 5)")
    refit.add_argument("--fold-order", choices=("random", "time"),
                       help="folds in a seeded order or in capture time order (default: refit.fold_order)")
    refit.add_argument("--group-pattern", metavar="REGEX",
                       help="a part per image from its path under --data: the regex's named group `part` "
                       "(default: refit.group_pattern)")
    refit.add_argument("--group-sidecar", type=Path, metavar="FILE",
                       help="CSV (image,part) or JSON naming each image's part (default: refit.group_sidecar)")
    refit.add_argument("--group-seconds", type=float, metavar="S",
                       help="images within S seconds of the previous are one part (default: refit.group_seconds)")
    refit.add_argument("--no-calibrate", action="store_true",
                       help="keep the configured threshold and offset; use every image for the fit")
    refit.add_argument("--keep", type=int, metavar="N", help="keep only the newest N versions (never the current)")
    _add_announce(refit, "the version", "store the version")
    refit.set_defaults(func=_cmd_refit, check=_check_refit)

    models = commands.add_parser("models", help="what is in the model store; make an older version current")
    model_commands = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = model_commands.add_parser("list", help="every model and its versions")
    _add_config(listing)
    listing.set_defaults(func=_cmd_models_list, check_plugins=False)  # the store alone: no torch to load
    show = model_commands.add_parser("show", help="the manifest of a version (default: the current one)")
    _add_config(show)
    show.add_argument("name", help="the model")
    show.add_argument("version", nargs="?", help="the version (default: the current one)")
    show.set_defaults(func=_cmd_models_show, check_plugins=False)
    rollback = model_commands.add_parser("rollback", help="make VERSION current again and announce it")
    _add_config(rollback)
    rollback.add_argument("name", help="the model")
    rollback.add_argument("version", help="the stored version to make current (see `inspector models list`)")
    _add_announce(rollback, "the switch", "switch")
    rollback.set_defaults(func=_cmd_models_rollback)

    evaluate = commands.add_parser(
        "evaluate",
        help="score a labelled folder (good/ plus one folder per defect kind): AUROC, F1, confusion",
        description="Score every image of a folder laid out as MVTec AD's test/ (DIR/good/ and one folder per "
        "defect kind) with the current version of a model, the way the worker does, and print image AUROC, "
        "average precision, precision, recall, F1 and the confusion at the model's threshold, recall per "
        "defect kind, and for information the threshold that would maximise F1. Needs no broker.",
    )
    _add_config(evaluate)
    evaluate.add_argument("--data", type=Path, required=True, metavar="DIR",
                          help="DIR/good/ and one folder per defect kind, images found recursively")
    evaluate.add_argument("--model", metavar="NAME", help="the model to evaluate (default: default_model)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    evaluate.add_argument("--batch-size", type=int, metavar="N", help="images per batch (default: worker.batch_size)")
    evaluate.add_argument("--report", type=Path, metavar="FILE.html",
                          help="also write one self-contained HTML page: ROC curve, score histograms, confusion, "
                          "recall per kind, and galleries of false rejects, missed defects and closest calls")
    evaluate.set_defaults(func=_cmd_evaluate, check=_check_evaluate)

    explain = commands.add_parser(
        "explain",
        help="draw where the model sees the anomaly: an overlay and a 16-bit map per image, and their results",
        description="Score every image under the --data paths with the current version of a model, the way the "
        "worker does, and write into --out, per image, NAME.png (the image with its anomaly map laid over it and "
        "the verdict, probability and model version written above it) and NAME.map.png (the map alone, 16-bit "
        "greyscale at the image's size, 0 = normal), plus results.jsonl with each image's result in the "
        "worker's shape. NAME is the file's path under its --data argument, folders joined by '__'. Needs no "
        "broker. Exit 2 when the model's plugin draws no maps.",
    )
    _add_config(explain)
    explain.add_argument("--data", type=Path, nargs="+", required=True, metavar="PATH",
                         help="image files or folders (recursive)")
    explain.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write into (created)")
    explain.add_argument("--model", metavar="NAME", help="the model to explain with (default: default_model)")
    explain.set_defaults(func=_cmd_explain, check=_check_explain)

    publish = commands.add_parser(
        "publish",
        help="send image files to the captures exchange as a camera does (demos, replays, load tests)",
        description="Publish image files as captures, with publisher confirms, to the captures exchange, routing "
        "key <line>.<camera>. Each frame gets a unique message_id, a captured_at header and a source header (the "
        "file's name relative to the --images argument it came from), which results carry back in meta. Prints "
        "frames, bytes, seconds and frames/s at the end, also on Ctrl-C (exit 130). Exit 1 when no queue is bound "
        "to the exchange (start `inspector run` once) or RabbitMQ is unreachable; 2 when no image file is found.",
    )
    _add_config(publish)
    publish.add_argument("--images", nargs="+", required=True, metavar="PATH",
                         help="image files, folders (recursive, sorted) or glob patterns (quoted; ** recurses)")
    publish.add_argument("--camera", default="cam1", metavar="ID", help="camera id (default cam1)")
    publish.add_argument("--line", default="line1", metavar="ID", help="line id (default line1)")
    publish.add_argument("--model", metavar="NAME", help="model header: the model that scores the frames")
    as_what = publish.add_mutually_exclusive_group()
    as_what.add_argument("--raw", action="store_true",
                         help="decode each file and send raw pixels (image/x-raw with width, height, pixel_format)")
    as_what.add_argument("--by-reference", action="store_true",
                         help='send {"image_uri": "file:///..."} (the absolute path) instead of the bytes; the '
                         "worker must list a folder holding the files in worker.allowed_roots")
    publish.add_argument("--pixel-format", choices=[f.name for f in imageformats.RAW],
                         help="with --raw: the pixel format to send (default rgb8)")
    publish.add_argument("--rate", type=float, default=0.0, metavar="HZ",
                         help="frames per second (default 0: as fast as the broker confirms)")
    publish.add_argument("--loop", action="store_true", help="repeat the files until Ctrl-C or --count")
    publish.add_argument("--count", type=int, metavar="N", help="stop after N frames in all")
    publish.set_defaults(func=_cmd_publish, check_plugins=False)  # a broker tool: no torch to load

    watch = commands.add_parser(
        "watch",
        help="print verdicts from the results exchange as they come",
        description="Bind a temporary queue (exclusive, auto-delete) to the results exchange and print one line "
        "per result: time, line, camera, verdict, probability (or error code), model version, frame id, source. "
        "Prints 'watching EXCHANGE FILTERS' on stderr once bound, and the count of pass, fail and error on stderr "
        "at the end (Ctrl-C: exit 130; --count or --timeout: exit 0).",
    )
    _add_config(watch)
    watch.add_argument("--filter", action="append", metavar="KEY",
                       help="binding key on <verdict>.<line>.<camera>, repeatable (default '#'; e.g. 'fail.#', "
                       "'*.line1.*')")
    watch.add_argument("--json", action="store_true", help="print each result body as one JSON line (for jq)")
    watch.add_argument("--count", type=int, metavar="N", help="exit after N results")
    watch.add_argument("--timeout", type=float, metavar="S", help="exit 0 after S seconds without a message")
    watch.set_defaults(func=_cmd_watch, check_plugins=False)

    bench = commands.add_parser(
        "bench",
        help="measured throughput and latency: the raw model and the whole path through the broker",
        description="Fit a throwaway model (the default model's plugin and settings) on generated frames in a "
        "temporary store, then measure on generated frames of one resolution: (1) the raw plugin on prepared "
        "tensors at the worker's batch size and device; (2) decode + prepare on the worker's decode threads, per "
        "encoding; (3) the whole path through RabbitMQ with a worker in this process, per encoding: (a) the "
        "throughput draining a backlog of frames, and its ratio to (1), (b) latency p50/p95/p99 from publication "
        "to result at half that rate. Uses exchanges and queues of its own (bench-<random>.*), deleted at the "
        "end; never touches the model store. Prints a table, or one JSON object with --json. Exit 1 when a "
        "frame was lost, duplicated or answered with an error; the targets are reported, not enforced.",
    )
    _add_config(bench)
    bench.add_argument("--resolution", type=int, default=1024, metavar="PX",
                       help="side of the square generated frames (default 1024)")
    bench.add_argument("--encoding", default="jpeg,png", metavar="LIST",
                       help=f"comma list of {', '.join(f.name for f in imageformats.ENCODED)}, "
                       f"{', '.join(f.name for f in imageformats.RAW)} (raw {imageformats.RAW_CONTENT_TYPE}), each "
                       "with an optional :PX for a resolution of its own, e.g. jpeg,mono8,jpeg:256 (default jpeg,png)")
    bench.add_argument("--frames", type=int, metavar="N",
                       help="frames in the saturation backlog (default: about 6 s of work at the rates measured)")
    bench.add_argument("--half-load-s", type=float, default=15.0, metavar="S",
                       help="seconds of publishing at half the saturation rate (default 15)")
    bench.add_argument("--batch-size", type=int, metavar="N", help="frames per batch (default: worker.batch_size)")
    bench.add_argument("--device", metavar="DEVICE", help="auto, cpu, cuda or cuda:N (default: the configured device)")
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    bench.add_argument("--skip-broker", action="store_true", help="stages 1 and 2 only; needs no RabbitMQ")
    bench.add_argument("--plugin", metavar="NAME",
                       help="score with this plugin instead of the default model's; `null` (a fixed score, no work) "
                       "measures the frame path's own ceiling")
    bench.add_argument("--runtime", metavar="LIST",
                       help="comma list of backbone runtimes (torch, onnxruntime, openvino): the whole bench once "
                       "per runtime, then their raw and whole-path rates side by side (default: the configured one)")
    bench.add_argument("--rounds", type=int, default=1, metavar="N",
                       help="with --runtime: the runtimes take turns N times; the medians are compared (default 1)")
    bench.add_argument("--failing", metavar="SHARES",
                       help="comma list of reject shares, e.g. 0.01,0.1: per share, that share of the frames are "
                       "defective parts (the model is then calibrated, so it fails them) and stage 3 runs again with "
                       "the model's regions off, then on, side by side: frames/s at saturation, and latency "
                       "p50/p95 at half load of the frames answered fail and pass; the fails seen are counted, and "
                       "those carrying regions. On the first --encoding only: the model is fitted on that one")
    bench.set_defaults(func=_cmd_bench)

    opcua = commands.add_parser(
        "opcua",
        help="serve each line and camera's latest verdict to PLCs, HMIs and MES over OPC UA",
        description="Take results from the results exchange (a queue of its own, bound with opcua.binding_keys) "
        "and serve, per line and camera, the last verdict, probability, frame id, model version and times, "
        "counters by verdict and a reject pulse (true for opcua.reject_pulse_s after a fail) on an OPC UA server "
        "at opcua.endpoint, under Objects/Inspector/Lines/<line>/<camera>. Needs the `opcua` extra "
        "(pip install 'inspector[opcua]'). SIGTERM or SIGINT: exit 0.",
    )
    _add_config(opcua)
    opcua.set_defaults(func=_cmd_opcua, check_plugins=False)  # a broker tool: no torch to load

    config = commands.add_parser(
        "config", help="check the configuration and print it as JSON",
        description="Read the configuration (the file, then INSPECTOR_* variables over it), check every setting "
        "and plugin table, report every problem found (exit 2), else print the whole tree as JSON with the "
        "defaults filled in; the broker password is never printed.")
    _add_config(config)
    config.set_defaults(func=_cmd_config)
    _order_for_newcomers(commands)
    return parser


# `inspector --help` lists the commands in the order a newcomer takes them: the first run, then the worker and
# its tools, then the rest. A command not named here (a newer one) follows in the order it was added.
NEWCOMER_ORDER = ("samples", "refit", "evaluate", "explain", "models", "run", "publish", "watch", "config", "demo",
                  "bench")
FIRST_RUN_EPILOG = """\
first run, offline (no broker, no camera):
  inspector samples --out sample-line                      a synthetic line in MVTec AD's layout
  inspector refit --data sample-line/train/good            fit a model from its good images
  inspector evaluate --data sample-line/test --report report.html
  inspector explain --data sample-line/test/scratch --out explained
then `inspector run` scores frames from RabbitMQ; `inspector COMMAND --help` says more."""


def _order_for_newcomers(commands: argparse._SubParsersAction) -> None:
    """Sort the help's list of commands (argparse lists them in the order they were added)."""
    def rank(action: argparse.Action) -> int:
        return NEWCOMER_ORDER.index(action.dest) if action.dest in NEWCOMER_ORDER else len(NEWCOMER_ORDER)

    commands._choices_actions.sort(key=rank)


def _cmd_run(settings, args) -> int:
    from inspector.worker.loop import run_worker

    return run_worker(settings)


def _cmd_samples(settings, args) -> int:
    from inspector.tools import samples

    for name in ("train", "test", "defective", "size"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    out = args.out.expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is not a folder" if not out.is_dir() else "exists and is not empty"
        raise ConfigError(f"--out {args.out}: {what} ({out.absolute()}); samples write a fresh folder, so that old "
                          "and new images never mix: name a new folder, or remove this one first")
    try:
        counts = samples.write_line(args.out, train=args.train, test=args.test, defective_per_kind=args.defective,
                                    seed=args.seed, size=args.size, fmt=args.format)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for part, folders in counts.items():
        listing = ", ".join(f"{folder} {n}" for folder, n in folders.items())
        print(f"{args.out / part}: {listing}")
    if args.train:
        print(f"next: inspector refit --data {args.out / 'train' / 'good'}")
    return 0


def _cmd_demo(settings, args) -> int:
    from inspector.tools.demo import run_demo

    return run_demo(settings, train=args.train, test=args.test, seed=args.seed)


def _refit_options(settings, args):
    from inspector.tools.refit_options import RefitOptions

    return RefitOptions(
        data=args.data.expanduser(),
        model=args.model or settings.default_model,
        calibrate=not args.no_calibrate,
        target_false_reject=(
            args.target_false_reject if args.target_false_reject is not None else settings.refit.target_false_reject
        ),
        held_out_share=args.held_out,
        calibration=args.calibration,
        folds=args.folds,
        fold_order=args.fold_order,
        group_pattern=args.group_pattern,
        group_sidecar=args.group_sidecar,
        group_seconds=args.group_seconds,
        keep=args.keep if args.keep is not None else settings.refit.keep,
        announce=True if args.announce else False if args.no_announce else None,
        any_folder=args.any_folder,
    )


def _check_refit(settings, args) -> None:
    from inspector.tools.refit_options import check_options

    check_options(settings, _refit_options(settings, args))


def _cmd_refit(settings, args) -> int:
    from inspector.tools.refit import run_refit
    from inspector.tools.refit_options import broker_configured

    options = _refit_options(settings, args)
    result = run_refit(settings, options)
    print(f"model {options.model!r}: version {result.version} is current")
    print(f"  images: {result.found} found, {result.used} used for the fit, {result.held_out} held out, "
          f"{result.skipped} skipped")
    if result.skipped_reasons:
        print("  skipped: " + ", ".join(f"{count} {reason}" for reason, count in result.skipped_reasons.items()))
    print(f"  time: {result.seconds:.1f} s, {result.images_per_second:.1f} images/s")
    if result.groups:
        g = result.groups
        how = ", ".join(f"{count} by {source.replace('_', ' ')}" for source, count in g.get("merged_by", {}).items())
        print(f"  parts: {g['groups']} groups of {g['images']} images, {g['images_with_twin']} images with a twin "
              f"(kept together){f'; joined {how}' if how else ''}")
    if result.components and result.components.reduced:
        c = result.components
        print(f"  components: {c.used} of the {c.configured} configured: {c.images_per_fit} images per fit "
              f"carry {c.used} at {c.images_per_component} images per component")
    if result.calibrated and result.calibration:
        for line in _calibration_lines(result.calibrated, result.calibration):
            print(f"  {line}")
    else:
        print("  calibration: none; the configured threshold and offset are kept")
    if result.pruned:
        print(f"  pruned: {', '.join(result.pruned)}")
    if result.announced:
        print(f"  announced model.{options.model} on {settings.broker.exchanges.control} at {settings.broker.shown}")
    elif options.announce is None and not broker_configured(settings):
        print(f"  not announced: no broker.url is configured, so nothing was sent (--announce sends it to "
              f"{settings.broker.shown}); a worker on this store takes the version up when it starts")
    elif options.announce is not False:
        print("  not announced: the broker is unreachable; workers pick the version up when they next start "
              f"or are told (inspector models rollback {options.model} {result.version})")
    test = options.data.resolve().parent.parent / "test"
    print(f"next: inspector evaluate --model {options.model} --data "
          + (_shown(test) if (test / "good").is_dir() else "DIR (good/ and one folder per defect kind)"))
    return 0


def _shown(path: Path) -> str:
    """A path to type: relative to the working folder when it lies under it, else absolute."""
    path = path.absolute()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _calibration_lines(calibrated: Calibration, c: dict) -> list[str]:
    """A refit's calibration as an operator reads it: how (refit's record `c`), where the threshold went and
    how fine it can be (the plugin's typed Calibration)."""
    scored, target = c.get("held_out", 0), calibrated.target_false_reject
    how = "automatic choice" if c.get("automatic") else "as asked"
    if c.get("method") == "cross-fit":
        reuse = ("backbone features extracted once and reused" if c.get("reused_embeddings")
                 else "each fold fitted from the images")
        method = (f"cross-fit ({how}): {c.get('folds')} folds over {scored} images, each scored by a model fitted "
                  f"without its fold; the fold fits took {c.get('fold_seconds', 0):.1f} s ({reuse})")
        reached = "out of fold"
    else:
        method = f"held-out ({how}): {scored} images held out of the fit and scored"
        reached = "held out"
    boundary = calibrated.boundary
    where = f" at {calibrated.score_name} {boundary:.3f}" if boundary is not None else ""
    step = c.get("false_reject_resolution") or (1 / scored if scored else 0)
    lines = [
        f"calibration: {method}",
        (f"  threshold {calibrated.threshold}{where} for a false-reject rate of {target:.2%} ({reached}: "
         f"{calibrated.held_out_false_reject:.2%} of {scored})"),
    ]
    promise = calibrated.promise
    if promise is not None:
        # What the threshold promises fresh good parts of this line (DFKDE's split-conformal rule).
        k, n = promise.k, promise.n
        lines.append(f"  expected false-reject rate on fresh good parts: {promise.expected:.2%} (the {_ordinal(k)} "
                     f"lowest of {n} scores, k = floor({target:g} x {n + 1}) = {k}; k/(n+1), at most the target)")
        lines.append(f"  this threshold's own rate: {promise.low:.2%} to {promise.high:.2%} "
                     f"({promise.low_quantile:.0%}-{promise.high_quantile:.0%} of "
                     f"{promise.distribution or 'its Beta distribution'}); more images narrow it")
    else:
        lines.append(f"  resolution: false-reject rates in steps of 1/{scored} = {step:.2%}"
                     + (f"; {target:.2%} is finer than that, so the threshold rests on the lowest-scoring images"
                        if target < step else ""))
    return lines


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def _store(settings):
    from inspector.stores import open_store

    return open_store(settings.store)


def _where(settings, args) -> str:
    """Where the store is and which configuration file said so: a relative store.path hides both."""
    from inspector.stores import is_s3_url

    path = settings.store.path
    shown = path if is_s3_url(path) else str(Path(path).expanduser().absolute())
    return f"{shown} (store.path; {_config_read(args)})"


def _config_read(args) -> str:
    from inspector.config import DEFAULT_CONFIG

    path = config_path(args.config, os.environ) or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    return f"configuration {path.expanduser().absolute()}" if path else (
        f"no configuration file: no --config, no INSPECTOR_CONFIG, no {DEFAULT_CONFIG} in {Path.cwd()}")


def _cmd_models_list(settings, args) -> int:
    store = _store(settings)
    names = store.names()
    if not names:
        print(f"no models in {_where(settings, args)}; configured: {', '.join(sorted(settings.models))}")
        print("next: inspector refit --data DIR (a folder of good parts; inspector samples --out sample-line "
              "writes one to try)")
        return 0
    print(f"{'model':<16}{'version':<26}{'plugin':<10}{'images':>8}  {'threshold':>9}  created")
    for name in names:
        for info in store.versions(name):
            images = (info.manifest.get("images") or {}).get("used", "")
            marker = " *" if info.current else ""
            print(f"{name:<16}{info.version:<26}{info.plugin:<10}{images!s:>8}  "
                  f"{info.manifest.get('threshold', '')!s:>9}  {info.created_at}{marker}")
    print("(* current)")
    return 0


def _cmd_models_show(settings, args) -> int:
    store = _store(settings)
    if args.name in settings.models and args.name not in store.names():
        raise StateError(f"model {args.name!r} is configured but has no versions in {_where(settings, args)}; "
                         f"fit one with `inspector refit --model {args.name} --data DIR`")
    info = store.info(args.name, args.version)
    print(json.dumps(info.manifest | {"current": info.current, "path": str(info.path)}, indent=2))
    return 0


def _cmd_models_rollback(settings, args) -> int:
    from inspector.broker import announce, announcement
    from inspector.errors import BrokerError
    from inspector.tools.refit_options import broker_configured

    store = _store(settings)
    store.set_current(args.name, args.version)
    info = store.info(args.name, args.version)
    print(f"model {args.name!r}: version {args.version} is current")
    if args.no_announce:
        return 0
    if not args.announce and not broker_configured(settings):  # as refit: never to whatever answers by default
        print("  not announced: no broker.url is configured; workers pick the version up when they next start "
              "(--announce sends it to the default broker)")
        return 0
    try:
        announce(settings.broker, announcement(args.name, args.version, info.plugin, "rollback"))
        print(f"  announced model.{args.name} on {settings.broker.exchanges.control}")
    except BrokerError as exc:
        log.warning("%s", exc)
        print("  not announced: the broker is unreachable; workers pick the version up when they next start")
    return 0


def _check_evaluate(settings, args) -> None:
    from inspector.tools.checks import TEST_SET_LAYOUT, check_batch_size, check_folder, check_model

    check_model(settings, args.model or settings.default_model)
    check_batch_size(args.batch_size if args.batch_size is not None else settings.worker.batch_size)
    check_folder(args.data.expanduser(), hint=TEST_SET_LAYOUT)


def _check_explain(settings, args) -> None:
    from inspector.tools.checks import check_model, check_paths

    check_model(settings, args.model or settings.default_model)
    check_paths([path.expanduser() for path in args.data])


def _cmd_evaluate(settings, args) -> int:
    from inspector.tools.evaluate import EvaluateOptions, run_evaluate

    batch_size = args.batch_size if args.batch_size is not None else settings.worker.batch_size
    if args.report is not None and args.report.expanduser().is_dir():
        raise ConfigError(f"--report {args.report}: a folder; name the HTML file to write, "
                          f"e.g. {args.report}/report.html")
    options = EvaluateOptions(data=args.data.expanduser(), model=args.model or settings.default_model,
                              batch_size=batch_size, report=args.report.expanduser() if args.report else None)
    result = run_evaluate(settings, options)
    print(json.dumps(result.as_dict(), indent=2, allow_nan=False) if args.json else result.table())
    if options.report is not None:
        print(f"report: {options.report}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _cmd_explain(settings, args) -> int:
    from inspector.tools.explain import ExplainOptions, run_explain

    options = ExplainOptions(data=[path.expanduser() for path in args.data], out=args.out.expanduser(),
                             model=args.model or settings.default_model, batch_size=settings.worker.batch_size)
    print(run_explain(settings, options).line())
    return 0


def _cmd_publish(settings, args) -> int:
    from inspector.tools.publish import PublishOptions, Summary, publish

    if args.pixel_format and not args.raw:
        raise ConfigError("--pixel-format goes with --raw")
    options = PublishOptions(
        images=args.images, camera=args.camera, line=args.line, model=args.model,
        mode="raw" if args.raw else "reference" if args.by_reference else "encoded",
        pixel_format=args.pixel_format or "rgb8", rate=args.rate, loop=args.loop, count=args.count,
    )
    summary = Summary()
    try:
        publish(settings, options, summary)
    except KeyboardInterrupt:
        print(summary.line())
        return 130
    print(summary.line())
    return 0


def _cmd_watch(settings, args) -> int:
    from inspector.tools.watch import Tally, WatchOptions, watch

    tally = Tally()
    options = WatchOptions(filters=args.filter or ["#"], json=args.json, count=args.count, timeout=args.timeout)
    try:
        watch(settings, options, tally)
    except KeyboardInterrupt:
        print(tally.line(), file=sys.stderr)
        return 130
    print(tally.line(), file=sys.stderr)
    return 0


def _cmd_bench(settings, args) -> int:
    from inspector.tools.bench.run import BenchOptions, run_bench

    options = BenchOptions(
        resolution=args.resolution, encodings=[e.strip().lower() for e in args.encoding.split(",") if e.strip()],
        frames=args.frames, half_load_s=args.half_load_s, batch_size=args.batch_size, device=args.device,
        skip_broker=args.skip_broker, plugin=args.plugin, failing=_shares(args.failing),
    )
    if args.runtime:
        from inspector.tools.bench import runtimes

        rounds = runtimes.run_runtimes(settings, options, [r.strip() for r in args.runtime.split(",") if r.strip()],
                                       args.rounds)
        print(json.dumps(runtimes.summary(rounds), indent=2, allow_nan=False) if args.json
              else runtimes.table(rounds))
        lost = sum(report.frames_lost for reports in rounds for report in reports)
        if lost:
            print(f"inspector: error: {lost} frames were missing, duplicated or answered with an error",
                  file=sys.stderr)
        return 1 if lost else 0
    report = run_bench(settings, options)
    print(json.dumps(report.as_dict(), indent=2, allow_nan=False) if args.json else report.table())
    if report.frames_lost:
        print(f"inspector: error: {report.frames_lost} frames were missing, duplicated or answered with an error",
              file=sys.stderr)
        return 1
    return 0


def _shares(text: str | None) -> list[float]:
    """--failing's comma list of shares; a usage error when one is not a number."""
    shares = []
    for item in (text or "").split(","):
        if item.strip():
            try:
                shares.append(float(item))
            except ValueError:
                raise ConfigError(f"--failing {item.strip()!r}: not a number (a share, e.g. 0.01)") from None
    return shares


def _cmd_opcua(settings, args) -> int:
    from inspector.tools.opcua.bridge import run_bridge

    return run_bridge(settings)


def _cmd_config(settings, args) -> int:
    data = settings.model_dump(mode="json")
    data["plugins"] = {
        name: settings.plugin_settings(name).model_dump(mode="json")
        for name in sorted({m.plugin for m in settings.models.values()} | set(settings.plugins))
    }
    print(json.dumps(data, indent=2))
    return 0


def _variable(environ: Mapping[str, str], name: str) -> str | None:
    """An INSPECTOR_* variable in any case, as the settings read theirs."""
    return next((value for key, value in environ.items() if key.upper() == name), None)


def config_path(option: Path | None, environ: Mapping[str, str]) -> Path | None:
    """The configuration file: `--config`, else the one INSPECTOR_CONFIG names (a container or unit cannot
    always pass an option), else None (./inspector.toml when present)."""
    from inspector.config import CONFIG_ENV

    if option is not None:
        return option
    named = (_variable(environ, CONFIG_ENV) or "").strip()
    if not named:
        return None
    path = Path(named).expanduser()
    if not path.is_file():
        raise ConfigError(f"{CONFIG_ENV}={named}: no such file; mount the configuration there, point "
                          f"{CONFIG_ENV} at it, or unset {CONFIG_ENV} to use ./inspector.toml")
    return path


def _log_format_before_settings(option: Path | None, environ: Mapping[str, str]) -> str:
    """The log format to report an early error in, before the configuration is known to be valid:
    INSPECTOR_LOG_FORMAT, else the file's `log_format` when the file reads as TOML, else text."""
    from inspector.config import CONFIG_ENV

    value = _variable(environ, "INSPECTOR_LOG_FORMAT")
    if value is None:
        path = option or Path((_variable(environ, CONFIG_ENV) or "").strip() or "inspector.toml")
        try:
            value = tomllib.loads(path.expanduser().read_text()).get("log_format")
        except (OSError, ValueError):
            value = None
    return "json" if isinstance(value, str) and value.strip().lower() == "json" else "text"


def _report(log_format: str, message: str, *, error: bool = True) -> None:
    """One line on stderr for the operator: `inspector: error: ...`, or a JSON object when the logs are JSON."""
    if log_format == "json":
        log.log(logging.ERROR if error else logging.WARNING, "%s", message)
    else:
        print(f"inspector: {'error: ' if error else ''}{message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # argparse itself exits 2 on bad usage
    log_format = _log_format_before_settings(args.config, os.environ)
    logs.configure(log_format)
    try:
        from inspector import config

        # Arguments first, then the plugins (they import torch): a mistake is told in well under a second.
        settings = config.load(config_path(args.config, os.environ), check_plugins=False)
        log_format = settings.log_format
        logs.configure(log_format, settings.log_level)
        logging.getLogger("pika").setLevel(max(logging.WARNING, logging.getLogger().level))
        if getattr(args, "check", None) is not None:
            args.check(settings, args)
        if getattr(args, "check_plugins", True):
            config.check_plugin_settings(settings)
        return args.func(settings, args)
    except InspectorError as exc:
        _report(log_format, str(exc))
        return exc.exit_code
    except OSError as exc:  # disk full, permission denied, a store path that is a file, ...
        where = f" ({exc.filename})" if exc.filename else ""
        _report(log_format, f"{exc.strerror or exc}{where}")
        return 1
    except KeyboardInterrupt:
        _report(log_format, "interrupted", error=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())
