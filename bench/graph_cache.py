"""What the graph cache saves a fresh process: building the backbone's OpenVINO runner with the export
(graph_cache off) against reading the kept graph back and checking it (a warm cache), each in a fresh Python
process, the two alternating, so a shared machine's drift falls on both.

    .venv/bin/python bench/graph_cache.py [--rounds 5] [--input-size 128] [--runtime openvino]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One fresh process: build the shipped backbone, then time only the runner (export or cache read + check).
CHILD = """
import json, sys, time
from inspector_dfkde import graphcache
from inspector_dfkde.model import DfkdeModel
from inspector_dfkde.plugin import DfkdeSettings
setting, size, runtime = sys.argv[1], int(sys.argv[2]), sys.argv[3]
graphcache.use(setting)
s = DfkdeSettings()
model = DfkdeModel(s.backbone, layers=s.layers, weights=s.weights, input_size=size, runtime=runtime)
started = time.perf_counter()
model._runner()
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def once(setting: str, size: int, runtime: str) -> float:
    done = subprocess.run([sys.executable, "-c", CHILD, setting, str(size), runtime], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--runtime", default="openvino", choices=("openvino", "onnxruntime"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="graph-cache-") as folder:
        cache = str(Path(folder) / "graphs")
        once(cache, args.input_size, args.runtime)  # fills the cache
        times: dict[str, list[float]] = {"export (graph_cache off)": [], "kept graph, checked": []}
        for r in range(args.rounds):
            order = [("export (graph_cache off)", "off"), ("kept graph, checked", cache)]
            for name, setting in order if r % 2 == 0 else order[::-1]:
                times[name].append(once(setting, args.input_size, args.runtime))
    print(f"the shipped backbone's {args.runtime} runner at {args.input_size} px in a fresh process; median of "
          f"{args.rounds} alternating rounds")
    for name, values in times.items():
        print(f"  {name:<26}{statistics.median(values):>7.2f} s   rounds: {', '.join(f'{v:.2f}' for v in values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
