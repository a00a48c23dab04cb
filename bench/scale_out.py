"""Throughput with 1, 2 and 3 worker processes on one capture queue, in one run on this machine: what one
worker costs, and what adding one brings, for the capacity plan.

Each round starts N real `inspector run` processes on the run's own exchanges and queue (a throwaway model,
fitted on generated parts into a temporary store they share), waits until every one is ready, publishes a
backlog of frames at once, and times it from the first publish to the last result; every frame must come
back exactly once. Each worker's share comes from a scrape of its own /metrics.

    .venv/bin/python bench/scale_out.py [--workers 1 2 3] [--frames 240] [--resolution 512]
"""

from __future__ import annotations

import argparse
import io
import secrets
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pika
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from inspector import config
from inspector.tools import samples
from inspector.tools.bench.fleet import WorkerProcess
from inspector.tools.refit import RefitOptions, run_refit

EXCHANGES = ("captures", "results", "control", "dead")


def write_config(root: Path, store: Path, prefix: str) -> Path:
    path = root / f"{prefix}.toml"
    exchanges = "\n".join(f'{e} = "{prefix}.{e}"' for e in EXCHANGES)
    path.write_text(f'device = "cpu"\n[store]\npath = "{store}"\n[broker.exchanges]\n{exchanges}\n'
                    f'[worker]\nqueue = "{prefix}.q"\ndead_letter_queue = "{prefix}.dead"\n'
                    f'[metrics]\nhost = "127.0.0.1"\nport = 0\n')
    return path


def frames_per_worker(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "inspector_frames_total")


def round_of(workers: int, frames: list[bytes], count: int, root: Path, store: Path) -> dict:
    prefix = f"scale-{secrets.token_hex(4)}"
    path = write_config(root, store, prefix)
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
    channel = connection.channel()
    for exchange in EXCHANGES:
        channel.exchange_declare(f"{prefix}.{exchange}", exchange_type="topic", durable=True)
    results = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(results, f"{prefix}.results", routing_key="#")
    fleet = [WorkerProcess(path, cwd=root) for _ in range(workers)]
    try:
        for worker in fleet:
            worker.wait_ready()
        seen: dict[str, int] = {}
        done = threading.Event()
        publisher = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
        out = publisher.channel()
        out.confirm_delivery()
        started = time.perf_counter()
        for i in range(count):
            out.basic_publish(f"{prefix}.captures", f"line{i % 2}.cam{i % 3}", frames[i % len(frames)],
                              pika.BasicProperties(content_type="image/jpeg", message_id=f"s{i}", delivery_mode=2))
        published = time.perf_counter() - started
        publisher.close()

        def on_result(_ch, _method, properties, _body) -> None:
            seen[properties.correlation_id] = seen.get(properties.correlation_id, 0) + 1
            if len(seen) >= count:
                done.set()

        channel.basic_consume(results, on_result, auto_ack=True)
        deadline = time.monotonic() + 600
        while not done.is_set() and time.monotonic() < deadline:
            connection.process_data_events(time_limit=0.2)
        elapsed = time.perf_counter() - started
        shares = [frames_per_worker(w.metrics_port) for w in fleet if w.metrics_port]
    finally:
        for worker in fleet:
            worker.stop()
        for queue in (f"{prefix}.q", f"{prefix}.dead"):
            channel.queue_delete(queue)
        for exchange in EXCHANGES:
            channel.exchange_delete(f"{prefix}.{exchange}")
        connection.close()
    lost = count - len(seen)
    duplicates = sum(n - 1 for n in seen.values())
    return {"workers": workers, "frames_per_second": count / elapsed, "seconds": elapsed, "published_s": published,
            "shares": shares, "lost": lost, "duplicates": duplicates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="inspector-scale-") as folder:
        root = Path(folder)
        samples.write_folder(root / "fit", 40, size=256)
        settings = config.load(write_config(root, root / "models", "fit"))
        run_refit(settings, RefitOptions(data=root / "fit" / "good", model="default", calibrate=False,
                                         held_out_share=0.0, announce=False))
        frames = []
        for image in samples.make_images(8, seed=3, size=args.resolution):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=90)
            frames.append(buffer.getvalue())
        size = sum(map(len, frames)) // len(frames)
        print(f"{args.frames} JPEG frames of {args.resolution}x{args.resolution} ({size / 1000:.0f} KB) per round, "
              "a backlog published at once; workers are real `inspector run` processes on one queue")
        for workers in args.workers:
            r = round_of(workers, frames, args.frames, root, root / "models")
            shares = ", ".join(f"{s:.0f}" for s in r["shares"])
            print(f"  {workers} worker{'s' if workers > 1 else ' '}: {r['frames_per_second']:6.1f} frames/s "
                  f"({r['seconds']:.1f} s); frames per worker {shares}; lost {r['lost']}, duplicated "
                  f"{r['duplicates']}")


if __name__ == "__main__":
    main()
