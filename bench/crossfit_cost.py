"""What cross-fitted calibration costs, next to a plain hold-out, in one run on the same images.

Three ways to get a calibrated DFKDE from one archive, each through inspector.tools.refit's own code:
held out (fit on 90%, score 10%); cross-fitted with the backbone features extracted once and only PCA
and the KDE refitted per fold (what refit does for DFKDE); and cross-fitted by fitting a fresh plugin
per fold from the images (what refit does for a plugin that cannot reuse embeddings). They run in rounds
that rotate their order. Then one PCA + KDE fit on one CPU thread (what the plugin uses) against torch's
threads, alternating.

    .venv/bin/python bench/crossfit_cost.py [--data MAGNETIC_TILE/train/good] [--folds 5]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch

import datasets
from inspector.imagefiles import find_images
from inspector.plugin import decode_size, score_all
from inspector.tools.imagestream import ImageStream
from inspector.tools.progress import Progress
from inspector.tools.refit import cross_fit, kfold, split_held_out
from inspector_dfkde.plugin import DfkdePlugin, DfkdeSettings

ROOT = Path(__file__).resolve().parents[1]
DATA = datasets.magnetic_tile() / "train" / "good"
BATCH = 32  # refit.batch_size
FIT_ROUNDS = 9


class ContractOnly:
    """The DFKDE plugin seen only through the plugin contract, as a third-party plugin would be."""

    def __init__(self, inner: DfkdePlugin) -> None:
        self.prepare, self.fit, self.score = inner.prepare, inner.fit, inner.score
        self.min_images, self.decode_size = inner.min_images, inner.decode_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="a folder of good images")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each method, in rotating order")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    settings = DfkdeSettings()
    paths = find_images(args.data)
    folds = kfold(len(paths), args.folds, 0)

    def stream(plugin) -> ImageStream:
        return ImageStream(plugin.prepare, args.threads, 10**9, progress, decode_size(plugin))

    def held_out() -> float | None:
        plugin = DfkdePlugin.create(settings, device)
        fit_paths, held_paths = split_held_out(paths, 0.1, 0)
        plugin.fit(stream(plugin).batches(fit_paths, BATCH))
        score_all(plugin, stream(plugin).batches(held_paths, BATCH))
        return None

    def reused() -> float:
        plugin = DfkdePlugin.create(settings, device)
        crossed = cross_fit(plugin, lambda: DfkdePlugin.create(settings, device), paths, folds,
                            lambda: stream(plugin), BATCH)
        scores["reused"] = crossed.scores.raw
        return crossed.fold_seconds

    def afresh() -> float:
        plugin = ContractOnly(DfkdePlugin.create(settings, device))
        crossed = cross_fit(plugin, lambda: ContractOnly(DfkdePlugin.create(settings, device)), paths, folds,
                            lambda: stream(plugin), BATCH)
        scores["afresh"] = crossed.scores.raw
        return crossed.fold_seconds

    methods = {"held-out: fit 90%, score 10%": held_out, "cross-fit, features reused": reused,
               "cross-fit, fitted afresh per fold": afresh}
    scores: dict[str, object] = {}
    timings: dict[str, list[tuple[float, float | None]]] = {name: [] for name in methods}
    plugin = DfkdePlugin.create(settings, device)
    with Progress(len(paths) * (args.folds + 4) * args.rounds, "bench", interval_s=1e9) as progress:
        for batch in stream(plugin).batches(paths[: 2 * BATCH], BATCH):  # warm-up: first-call allocations
            plugin.embed(batch)
        for r in range(args.rounds):
            names = list(methods)
            for name in names[r % len(names):] + names[: r % len(names)]:
                started = time.perf_counter()
                folds_seconds = methods[name]()
                timings[name].append((time.perf_counter() - started, folds_seconds))
    same = float(abs(scores["reused"] - scores["afresh"]).max())

    with Progress(len(paths), "bench", interval_s=1e9) as progress:
        embeddings = torch.cat([plugin.embed(b) for b in stream(plugin).batches(paths, BATCH)])
    fits: dict[int, list[float]] = {1: [], args.threads: []}
    for r in range(FIT_ROUNDS):
        for threads in (1, args.threads)[:: 1 if r % 2 == 0 else -1]:
            torch.set_num_threads(threads)
            started = time.perf_counter()
            plugin.model.fit(embeddings)
            fits[threads].append(1000 * (time.perf_counter() - started))
    torch.set_num_threads(args.threads)

    s = plugin.describe()
    print(f"{len(paths)} images under {args.data}; {s['backbone']} {'+'.join(s['layers'])} at {s['input_size']} px, "
          f"n_comps {s['n_comps']}; {args.folds} folds; batches of {BATCH}; torch threads {args.threads}; device cpu")
    for name, runs in timings.items():
        seconds = [total for total, _ in runs]
        extra = ""
        if runs[0][1] is not None:
            extra = f"   (fold fits and scoring: {', '.join(f'{f:.1f}' for _, f in runs)} s)"
        print(f"  {name:<36}{statistics.median(seconds):7.1f} s  ({', '.join(f'{t:.1f}' for t in seconds)}){extra}")
    print(f"  out-of-fold log-densities, reused against afresh: largest difference {same:.2e}")
    one, many = statistics.median(fits[1]), statistics.median(fits[args.threads])
    print(f"  one PCA + KDE fit of {len(embeddings)} embeddings x {embeddings.shape[1]}: 1 thread {one:.0f} ms, "
          f"{args.threads} threads {many:.0f} ms ({many / one:.1f}x; median of {FIT_ROUNDS}, alternating)")


if __name__ == "__main__":
    main()
