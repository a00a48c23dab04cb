"""What the evidence archive costs a worker's scoring throughput: the sample line's test set through a real
`inspector run` with `[evidence]` off, on without maps and on (the defaults, maps included), in rotating
rounds in one run, on this machine.

The model is fitted as `make run` fits its first one (`inspector samples`, then refit on train/good with a
quarter held out for a 2% false-reject calibration). Each round starts a fresh worker process with evidence
off, on with `maps = false`, or on with the defaults (every fail and error, maps when the plugin draws them),
into a folder on this machine's disk, waits until it is ready, publishes the test set (`--repeat` times, each frame
its own id) as a backlog at once, and times it from the first publish to the last result, and reads the worker process's
CPU time over the same span. Every frame must come back once; with evidence on, every rejected frame must be
in the archive, with nothing else, when the worker has stopped. Half of the test set is defective: a reject
rate far above a real line's, so the archive's share of the work is far above a real line's too.

    .venv/bin/python bench/evidence_overhead.py [--rounds 4] [--repeat 5] [--warm-up 1]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import tempfile
import threading
import time
from pathlib import Path

import pika

from inspector import config
from inspector.imageformats import CONTENT_TYPE_OF_SUFFIX
from inspector.imagefiles import find_images
from inspector.tools import samples
from inspector.tools.bench.fleet import WorkerProcess
from inspector.tools.refit import RefitOptions, run_refit

EXCHANGES = ("captures", "results", "control", "dead")


MODES = ("off", "on, no maps", "on")


def write_config(root: Path, store: Path, prefix: str, evidence: Path | None, maps: bool = True) -> Path:
    path = root / f"{prefix}.toml"
    exchanges = "\n".join(f'{e} = "{prefix}.{e}"' for e in EXCHANGES)
    text = (f'device = "cpu"\n[store]\npath = "{store}"\n[broker.exchanges]\n{exchanges}\n'
            f'[worker]\nqueue = "{prefix}.q"\ndead_letter_queue = "{prefix}.dead"\n'
            f'[metrics]\nhost = "127.0.0.1"\nport = 0\n')
    if evidence is not None:
        text += f'[evidence]\nenabled = true\npath = "{evidence}"\nmaps = {str(maps).lower()}\n'
    path.write_text(text)
    return path


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, all its threads (Linux /proc): what a frame costs the machine,
    whatever else shares its cores."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def round_of(frames: list[tuple[str, bytes, str]], root: Path, store: Path, evidence: Path | None,
             maps: bool = True) -> dict:
    """One worker process, one backlog of `frames` (id, body, content type); frames/s and the verdicts."""
    prefix = f"evidence-bench-{secrets.token_hex(4)}"
    path = write_config(root, store, prefix, evidence, maps)
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
    channel = connection.channel()
    for exchange in EXCHANGES:
        channel.exchange_declare(f"{prefix}.{exchange}", exchange_type="topic", durable=True)
    results = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(results, f"{prefix}.results", routing_key="#")
    worker = WorkerProcess(path, cwd=root)
    verdicts: dict[str, str] = {}
    try:
        worker.wait_ready()
        done = threading.Event()
        publisher = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
        out = publisher.channel()
        out.confirm_delivery()
        started, cpu_before = time.perf_counter(), cpu_seconds(worker.process.pid)
        for frame_id, body, content_type in frames:
            out.basic_publish(f"{prefix}.captures", "line1.cam1", body,
                              pika.BasicProperties(content_type=content_type, message_id=frame_id))
        publisher.close()

        def on_result(_ch, _method, _properties, body) -> None:
            result = json.loads(body)
            verdicts[result["frame_id"]] = result["verdict"]
            if len(verdicts) >= len(frames):
                done.set()

        channel.basic_consume(results, on_result, auto_ack=True)
        deadline = time.monotonic() + 900
        while not done.is_set() and time.monotonic() < deadline:
            connection.process_data_events(time_limit=0.2)
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(worker.process.pid) - cpu_before
    finally:
        code = worker.stop()
        for queue in (f"{prefix}.q", f"{prefix}.dead"):
            channel.queue_delete(queue)
        for exchange in EXCHANGES:
            channel.exchange_delete(f"{prefix}.{exchange}")
        connection.close()
    if len(verdicts) != len(frames):
        raise SystemExit(f"lost frames: {len(frames) - len(verdicts)} of {len(frames)} unanswered")
    if code != 0:
        raise SystemExit(f"the worker exited {code}:\n{worker.output()[-3000:]}")
    return {"frames_per_second": len(frames) / elapsed, "seconds": elapsed, "cpu_ms": cpu / len(frames) * 1000,
            "verdicts": verdicts}


def component_costs(frames: list[tuple[str, bytes, str]], folder: Path) -> tuple[float, float, float]:
    """In this process, without a broker: (microseconds per frame the scoring thread spends on evidence for a
    frame it keeps: the ticket and the hand-over; the same for a pass it does not keep; milliseconds per frame
    of the writer thread's whole work, wall time until flushed)."""
    from types import SimpleNamespace

    from inspector.config import EvidenceSettings, MetricsSettings
    from inspector.messages import parse_capture
    from inspector.worker.evidence import Evidence
    from inspector.worker.metrics import Metrics

    evidence = Evidence(EvidenceSettings(enabled=True, path=str(folder), queue_size=len(frames) + 1,
                                         queue_bytes=sum(len(b) for _, b, _ in frames) + 1), Metrics(MetricsSettings()))
    captures = [parse_capture("line1.cam1", SimpleNamespace(message_id=f, content_type=c, headers={}, timestamp=None),
                              body, False) for f, body, c in frames]
    result = json.dumps({"schema": "inspection.result/1", "verdict": "fail"}).encode()
    at = "2026-12-01T00:00:00.000Z"
    started = time.perf_counter()
    for capture in captures:
        evidence.ticket(capture, "pass", at, capture.body)
    passes = (time.perf_counter() - started) / len(captures) * 1e6
    evidence.start()
    started = time.perf_counter()
    for capture in captures:
        evidence.ticket(capture, "fail", at, capture.body).send(result)
    kept = (time.perf_counter() - started) / len(captures) * 1e6
    evidence.flush(600)
    writer = (time.perf_counter() - started) / len(captures) * 1e3
    evidence.stop()
    return kept, passes, writer


def check_archive(folder: Path, verdicts: dict[str, str]) -> tuple[int, int]:
    """(frames kept, maps kept); SystemExit unless every fail and error is kept with its result, and nothing else."""
    results = {p.name[: -len(".json")] for p in folder.rglob("*.json") if not p.name.endswith(".capture.json")}
    wanted = {f for f, v in verdicts.items() if v in ("fail", "error")}
    if results != wanted:
        raise SystemExit(f"the archive holds {len(results)} frames, {len(wanted)} were rejected; "
                         f"missing {sorted(wanted - results)[:5]}, extra {sorted(results - wanted)[:5]}")
    return len(results), sum(1 for _ in folder.rglob("*.map.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each mode, in rotating order")
    parser.add_argument("--repeat", type=int, default=5, help="times the test set is sent per round")
    parser.add_argument("--warm-up", type=int, default=1, help="rounds (evidence off) run first and not counted")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="inspector-evidence-") as folder:
        root = Path(folder)
        samples.write_line(root / "sample-line")
        settings = config.load(write_config(root, root / "models", "fit", None))
        run_refit(settings, RefitOptions(data=root / "sample-line" / "train" / "good", model="default",
                                         held_out_share=0.25, target_false_reject=0.02, announce=False))
        test = root / "sample-line" / "test"
        files = find_images(test)
        frames = [(f"{n}-{path.relative_to(test).as_posix().replace('/', '_')}", path.read_bytes(),
                   CONTENT_TYPE_OF_SUFFIX.get(path.suffix.lower(), "application/octet-stream"))
                  for n in range(args.repeat) for path in files]
        print(f"sample line test set: {len(files)} PNG frames of 256 x 256, sent {args.repeat} times per round "
              f"({len(frames)} frames) as a backlog; a fresh `inspector run` per round, evidence {', '.join(MODES)} "
              f"in rotating order, {args.rounds} rounds each, into a folder on this disk")
        for _ in range(args.warm_up):
            r = round_of(frames, root, root / "models", None)
            print(f"  warm-up round          : {r['frames_per_second']:6.1f} frames/s (not counted)", flush=True)
        figures: dict[str, list[float]] = {mode: [] for mode in MODES}
        cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
        for index in range(args.rounds):
            for mode in MODES[index % 3:] + MODES[: index % 3]:
                archive = root / f"evidence-{index}-{len(mode)}" if mode != "off" else None
                r = round_of(frames, root, root / "models", archive, maps=mode == "on")
                figures[mode].append(r["frames_per_second"])
                cpu[mode].append(r["cpu_ms"])
                rejected = sum(v != "pass" for v in r["verdicts"].values())
                note = ""
                if archive is not None:
                    kept, maps = check_archive(archive, r["verdicts"])
                    note = f"; kept {kept} of {rejected} rejected frames, {maps} maps"
                print(f"  round {index + 1} evidence {mode:11}: {r['frames_per_second']:6.1f} frames/s "
                      f"({r['seconds']:.1f} s), worker CPU {r['cpu_ms']:.1f} ms/frame; {rejected} of {len(frames)} "
                      f"rejected{note}", flush=True)
        kept, passes, writer = component_costs(frames, root / "components")
        print(f"in process: the scoring thread spends {kept:.1f} us on a frame it keeps, {passes:.2f} us on a pass it "
              f"does not; the writer thread takes {writer:.2f} ms per kept frame without a map (wall time, "
              f"{len(frames)} frames)")
        off, off_cpu = statistics.median(figures["off"]), statistics.median(cpu["off"])
        print(f"median: evidence off {off:.1f} frames/s, worker CPU {off_cpu:.1f} ms/frame")
        for mode in MODES[1:]:
            on, on_cpu = statistics.median(figures[mode]), statistics.median(cpu[mode])
            print(f"median: evidence {mode:11} {on:.1f} frames/s ({(on / off - 1) * 100:+.1f}% of off), worker CPU "
                  f"{on_cpu:.1f} ms/frame ({(on_cpu / off_cpu - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
