"""The `inspector` command: parses arguments, calls one function per command, maps errors to exit codes.

Exit status: 0 success, 2 bad usage or invalid configuration, 1 a runtime failure.
An operator mistake prints one clear message, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from inspector import __version__
from inspector.errors import ConfigError, InspectorError

log = logging.getLogger("inspector")


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="TOML configuration (default: ./inspector.toml if present); INSPECTOR_* variables override it",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inspector", description="Visual inspection of line camera frames.")
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
    sample.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write (created)")
    sample.add_argument("--train", type=int, default=200, help="good training images (default 200)")
    sample.add_argument("--test", type=int, default=40, help="good test images (default 40)")
    sample.add_argument("--defective", type=int, default=10, help="test images per defect kind (default 10)")
    sample.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    sample.add_argument("--format", default="png", choices=["png", "jpg", "bmp", "tiff", "webp"])
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=_cmd_samples)

    demo = commands.add_parser(
        "demo",
        help="fit the configured model on a synthetic part and score good and defective frames",
        description="Fit the configured plugin on synthetic images of one part, then score held-out good "
        "and defective images of it, and print how well it separates them. Needs no broker.",
    )
    _add_config(demo)
    demo.add_argument("--train", type=int, default=200, help="good images to fit on (default 200)")
    demo.add_argument("--test", type=int, default=40, help="held-out good images and defective images each (default 40)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

    refit = commands.add_parser(
        "refit",
        help="fit a new model version from a folder of normal images, store it, announce it",
        description="Fit a new version of a model from a folder tree of images of good parts, calibrate "
        "its threshold on a held-out share of them, write it to the model store as the current version "
        "and announce it to the running workers.",
    )
    _add_config(refit)
    refit.add_argument("--data", type=Path, required=True, metavar="DIR", help="folder of good-part images (recursive)")
    refit.add_argument("--model", metavar="NAME", help="the model to refit (default: default_model)")
    refit.add_argument("--target-false-reject", type=float, metavar="RATE",
                       help="false-reject rate on good parts to calibrate for (default: refit.target_false_reject)")
    refit.add_argument("--held-out", type=float, metavar="SHARE",
                       help="share of images held out for calibration (default: refit.held_out_share)")
    refit.add_argument("--no-calibrate", action="store_true",
                       help="keep the configured threshold and offset; use every image for the fit")
    refit.add_argument("--keep", type=int, metavar="N", help="keep only the newest N versions (never the current)")
    refit.add_argument("--no-announce", action="store_true", help="store the version without telling the workers")
    refit.set_defaults(func=_cmd_refit)

    models = commands.add_parser("models", help="what is in the model store; make an older version current")
    model_commands = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = model_commands.add_parser("list", help="every model and its versions")
    _add_config(listing)
    listing.set_defaults(func=_cmd_models_list)
    show = model_commands.add_parser("show", help="the manifest of a version (default: the current one)")
    _add_config(show)
    show.add_argument("name")
    show.add_argument("version", nargs="?")
    show.set_defaults(func=_cmd_models_show)
    rollback = model_commands.add_parser("rollback", help="make VERSION current again and announce it")
    _add_config(rollback)
    rollback.add_argument("name")
    rollback.add_argument("version")
    rollback.add_argument("--no-announce", action="store_true", help="switch without telling the workers")
    rollback.set_defaults(func=_cmd_models_rollback)

    config = commands.add_parser("config", help="check the configuration and print it as JSON")
    _add_config(config)
    config.set_defaults(func=_cmd_config)
    return parser


def _cmd_run(settings, args) -> int:
    from inspector.worker import run_worker

    return run_worker(settings)


def _cmd_samples(settings, args) -> int:
    from inspector import samples

    for name in ("train", "test", "defective", "size"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    try:
        counts = samples.write_line(args.out, train=args.train, test=args.test, defective_per_kind=args.defective,
                                    seed=args.seed, size=args.size, fmt=args.format)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for part, folders in counts.items():
        listing = ", ".join(f"{folder} {n}" for folder, n in folders.items())
        print(f"{args.out / part}: {listing}")
    return 0


def _cmd_demo(settings, args) -> int:
    from inspector.demo import run_demo

    return run_demo(settings, train=args.train, test=args.test, seed=args.seed)


def _cmd_refit(settings, args) -> int:
    from inspector.refit import RefitOptions, run_refit

    options = RefitOptions(
        data=args.data.expanduser(),
        model=args.model or settings.default_model,
        calibrate=not args.no_calibrate,
        target_false_reject=(
            args.target_false_reject if args.target_false_reject is not None else settings.refit.target_false_reject
        ),
        held_out_share=args.held_out if args.held_out is not None else settings.refit.held_out_share,
        keep=args.keep if args.keep is not None else settings.refit.keep,
        announce=not args.no_announce,
    )
    if options.keep < 0:
        raise ConfigError(f"--keep {options.keep}: must be 0 (keep all) or more")
    result = run_refit(settings, options)
    print(f"model {options.model!r}: version {result.version} is current")
    print(f"  images: {result.found} found, {result.used} used for the fit, {result.held_out} held out, "
          f"{result.skipped} skipped")
    print(f"  time: {result.seconds:.1f} s, {result.images_per_second:.1f} images/s")
    if result.calibration:
        c = result.calibration
        print(f"  calibration: threshold {c['threshold']} at log-density {c['boundary_log_density']:.3f} for a "
              f"false-reject rate of {c['target_false_reject']:.2%} (held out: {c['held_out_false_reject']:.2%} "
              f"of {c['held_out']})")
    else:
        print("  calibration: none; the configured threshold and offset are kept")
    if result.pruned:
        print(f"  pruned: {', '.join(result.pruned)}")
    if result.announced:
        print(f"  announced model.{options.model} on {settings.broker.exchanges.control}")
    elif options.announce:
        print("  not announced: the broker is unreachable; workers pick the version up when they next start "
              f"or are told (inspector models rollback {options.model} {result.version})")
    return 0


def _store(settings):
    from inspector.store import ModelStore

    return ModelStore(settings.store.path)


def _cmd_models_list(settings, args) -> int:
    store = _store(settings)
    names = store.names()
    if not names:
        print(f"no models in {settings.store.path}")
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
    info = _store(settings).info(args.name, args.version)
    print(json.dumps(info.manifest | {"current": info.current, "path": str(info.path)}, indent=2))
    return 0


def _cmd_models_rollback(settings, args) -> int:
    from inspector.broker import announce, announcement
    from inspector.errors import BrokerError

    store = _store(settings)
    store.set_current(args.name, args.version)
    info = store.info(args.name, args.version)
    print(f"model {args.name!r}: version {args.version} is current")
    if args.no_announce:
        return 0
    try:
        announce(settings.broker, announcement(args.name, args.version, info.plugin, "rollback"))
        print(f"  announced model.{args.name} on {settings.broker.exchanges.control}")
    except BrokerError as exc:
        log.warning("%s", exc)
        print("  not announced: the broker is unreachable; workers pick the version up when they next start")
    return 0


def _cmd_config(settings, args) -> int:
    data = settings.model_dump(mode="json")
    data["plugins"] = {
        name: settings.plugin_settings(name).model_dump(mode="json")
        for name in sorted({m.plugin for m in settings.models.values()} | set(settings.plugins))
    }
    print(json.dumps(data, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # argparse itself exits 2 on bad usage
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from inspector import config

        settings = config.load(args.config)
        logging.getLogger().setLevel(settings.log_level)
        logging.getLogger("pika").setLevel(max(logging.WARNING, logging.getLogger().level))
        return args.func(settings, args)
    except InspectorError as exc:
        print(f"inspector: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # disk full, permission denied, a store path that is a file, ...
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"inspector: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("inspector: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
