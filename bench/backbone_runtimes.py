"""DFKDE scoring speed by backbone runtime (torch, ONNX Runtime, OpenVINO) and thread count on this machine,
alternating in one process, with how far each runtime's features and scores move from torch's.

The shipped model (backbone, layers, packaged weights) at each input size, fitted once with torch on the
synthetic line and scored on batches of `--batch` prepared images. Threads: torch's intra-op count, which the
runtimes take too (plugins/dfkde/runtimes.py), set before each group is built; every (runtime, threads) pair
is timed once per round, in turn, so that drift in a shared machine hits them alike. Prints ms per image
(median of the rounds), the multiple of torch at the same threads, the largest feature error relative to the
largest feature, and the largest log-density change as a share of good parts' spread.

    .venv/bin/python bench/backbone_runtimes.py [--sizes 128,256] [--threads 1,2] [--batch 4] [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from inspector.tools import samples
from inspector_dfkde.model import DfkdeModel
from inspector_dfkde.plugin import DfkdeSettings
from inspector_dfkde.runtimes import RUNTIMES, missing_packages


def _stack(images):
    return torch.stack([torch.from_numpy(image).permute(2, 0, 1) for image in images])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="128,256")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    runtimes = [r for r in args.runtimes.split(",") if not missing_packages(r)]
    shipped = DfkdeSettings()
    backbone = DfkdeModel(shipped.backbone, layers=shipped.layers, weights=shipped.weights).backbone
    train = _stack(samples.make_images(40, seed=1))
    test = _stack(samples.make_images(20, seed=2) + samples.make_images(20, defective=True, seed=3))
    print(f"torch {torch.__version__}; batches of {args.batch}; median of {args.rounds} alternating rounds")
    for size in (int(s) for s in args.sizes.split(",")):
        reference = DfkdeModel(backbone, n_comps=shipped.n_comps, input_size=size)
        reference.fit(reference.get_features(train))
        p_ref, l_ref = reference.score(test)
        spread = l_ref[:20].std().item()
        f_ref = reference.get_features(test)
        models: dict[tuple[str, int], DfkdeModel] = {}
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for runtime in runtimes:
                model = DfkdeModel(backbone, n_comps=shipped.n_comps, input_size=size, runtime=runtime)
                model.pca_model, model.kde_model, model.max_length = (reference.pca_model, reference.kde_model,
                                                                      reference.max_length)
                model.score(test[: args.batch])  # builds the runner at these threads; warms it up
                models[(runtime, threads)] = model
        times: dict[tuple[str, int], list[float]] = {key: [] for key in models}
        batch = test[: args.batch]
        for _ in range(args.rounds):
            for (runtime, threads), model in models.items():
                torch.set_num_threads(threads)
                started = time.perf_counter()
                model.score(batch)
                times[(runtime, threads)].append((time.perf_counter() - started) * 1000 / args.batch)
        for (runtime, threads), model in models.items():
            torch.set_num_threads(threads)
            ms = statistics.median(times[(runtime, threads)])
            torch_ms = statistics.median(times[("torch", threads)]) if ("torch", threads) in times else ms
            feature_error = ((model.get_features(test) - f_ref).abs().max() / f_ref.abs().max()).item()
            density_change = (model.score(test)[1] - l_ref).abs().max().item() / spread
            print(f"{size:>4} px  {runtime:<12} {threads} thread{'s' if threads > 1 else ' '}  {ms:7.2f} ms/image  "
                  f"{torch_ms / ms:4.2f}x torch  feature error {feature_error:.1e}  "
                  f"log-density change {density_change:.1e} of the spread")


if __name__ == "__main__":
    main()
