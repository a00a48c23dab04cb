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
from inspector.errors import InspectorError

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

    config = commands.add_parser("config", help="check the configuration and print it as JSON")
    _add_config(config)
    config.set_defaults(func=_cmd_config)
    return parser


def _cmd_demo(settings, args) -> int:
    from inspector.demo import run_demo

    return run_demo(settings, train=args.train, test=args.test, seed=args.seed)


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
        return args.func(settings, args)
    except InspectorError as exc:
        print(f"inspector: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("inspector: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
