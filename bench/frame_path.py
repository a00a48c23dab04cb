"""The frame path before and after a change, side by side in one run: `inspector bench` on two trees.

The baseline tree is this working tree with the files that carry the frame-path work (BASELINE_FILES) taken
from a git revision (`--baseline`, default HEAD); everything else, the bench included, is the same code.
Rounds alternate the order (baseline first, then current first, ...), and each figure is the median over
the rounds. With `--plugin null` (the default) it is the path's own ceiling: frames/s through the real
broker and the worker's CPU per frame and stage; with `--plugin dfkde` the real model end to end.

    .venv/bin/python bench/frame_path.py --rounds 2
    .venv/bin/python bench/frame_path.py --plugin dfkde --encoding jpeg --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE_FILES = ("inspector/worker/consumer.py", "inspector/worker/pikaconnection.py",
                  "inspector/worker/envelopes.py")
TRIES = 3
STAGES = ("consume", "hand-off", "parse", "decode", "prepare", "decode other", "batch", "score", "result encode",
          "publish", "confirm", "ack", "settled", "pika I/O")


def baseline_tree(revision: str, folder: Path) -> Path:
    """A copy of the packages with BASELINE_FILES as they are at `revision` (one the revision lacks stays as it
    is here: before the consumer was split, consumer.py held the whole frame path and imports no other). The
    plugins come, as installed, through their entry points."""
    shutil.copytree(ROOT / "inspector", folder / "inspector", ignore=shutil.ignore_patterns("__pycache__"))
    for name in BASELINE_FILES:
        shown = subprocess.run(["git", "show", f"{revision}:{name}"], cwd=ROOT, capture_output=True, check=False)
        if shown.returncode == 0:
            (folder / name).write_bytes(shown.stdout)
        elif name == BASELINE_FILES[0]:
            raise SystemExit(f"{name} is not at {revision}: {shown.stderr.decode(errors='replace')}")
    return folder


def run_bench(tree: Path, config: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "inspector.cli", "bench", "--config", str(config), "--encoding", args.encoding,
               "--half-load-s", str(args.half_load_s), "--json"]
    if args.plugin != "dfkde":
        command += ["--plugin", args.plugin]
    if args.frames:
        command += ["--frames", str(args.frames)]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
    environment["PYTHONPATH"] = str(tree)
    for attempt in range(1, TRIES + 1):
        done = subprocess.run(command, cwd=tree, env=environment, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return json.loads(done.stdout)
        # a shared broker: another client's `rabbitmqctl close_all_connections` loses a run's frames
        print(f"bench in {tree} failed ({done.returncode}), try {attempt} of {TRIES}:\n{done.stderr[-1500:]}",
              file=sys.stderr)
    sys.exit(f"bench in {tree} failed {TRIES} times")


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summary(reports: list[dict]) -> dict[str, dict[str, float | None]]:
    """Per kind: the figures compared, each the median over the rounds."""
    out: dict[str, dict[str, float | None]] = {}
    for kind in reports[0]["broker"]:
        runs = [r["broker"][kind] for r in reports]
        figures: dict[str, float | None] = {
            "3a frames/s": median([r["saturation"]["frames_per_second"] for r in runs]),
            "3r RabbitMQ alone frames/s": median([r["rabbitmq_alone"]["frames_per_second"] for r in runs]),
            "3b p50 ms": median([r["half_load"]["latency_ms"]["p50"] for r in runs]),
            "3b p99 ms": median([r["half_load"]["latency_ms"]["p99"] for r in runs]),
        }
        for stage in STAGES:
            figures[f"cpu us {stage}"] = median([r["saturation"]["cpu"]["stages_us"][stage] for r in runs])
        for role in ("broker", "decode", "score"):
            figures[f"cpu us {role} thread"] = median([r["saturation"]["cpu"]["threads_us"][role] for r in runs])
        figures["cpu us total"] = median([r["saturation"]["cpu"]["total_us"] for r in runs])
        figures["cpu us without image decode"] = median([r["saturation"]["cpu"]["without_image_decode_us"]
                                                         for r in runs])
        figures["cpu us 3r plain consumer"] = median([r["rabbitmq_alone"]["cpu_us"] for r in runs])
        out[kind] = figures
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="HEAD", help="git revision of BASELINE_FILES (default HEAD)")
    parser.add_argument("--plugin", default="null", help="null (the path's ceiling, default) or dfkde")
    parser.add_argument("--encoding", default="jpeg,mono8,jpeg:256", help="--encoding of inspector bench")
    parser.add_argument("--half-load-s", type=float, default=3.0)
    parser.add_argument("--frames", type=int, help="saturation backlog (default: the bench's own choice)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write every report to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="frame-path-") as folder:
        base = baseline_tree(args.baseline, Path(folder) / "baseline")
        config = Path(folder) / "inspector.toml"
        config.write_text('device = "cpu"\n')
        trees = {"baseline": base, "current": ROOT}
        reports: dict[str, list[dict]] = {"baseline": [], "current": []}
        for round_ in range(args.rounds):
            order = ["baseline", "current"] if round_ % 2 == 0 else ["current", "baseline"]
            for name in order:
                print(f"round {round_ + 1}: {name} ...", file=sys.stderr, flush=True)
                reports[name].append(run_bench(trees[name], config, args))
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1))

    before, after = summary(reports["baseline"]), summary(reports["current"])
    machine = reports["current"][0]["machine"]
    print(f"frame path, plugin {args.plugin}: baseline ({', '.join(BASELINE_FILES)} at {args.baseline}) against "
          f"this tree; median of {args.rounds} alternating rounds")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; device {machine['device']}")
    for kind in after:
        size = reports["current"][0]["frames"]["bytes"][kind] / 1024
        print(f"\n{kind} ({size:.0f} KiB a frame){'':<16}{'baseline':>10}{'current':>10}{'change':>9}")
        for figure, value in after[kind].items():
            old = before[kind][figure]
            change = f"{(value - old) / old:+.0%}" if value is not None and old else ""
            cells = "".join(f"{'n/a' if v is None else f'{v:.1f}':>10}" for v in (old, value))
            print(f"  {figure:<36}{cells}{change:>9}")


if __name__ == "__main__":
    main()
