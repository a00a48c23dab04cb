"""Scoring a batch against a 40,000-point KDE: our vectorised log-space pass vs the per-sample loop.

The baseline is the straightforward loop anomalib's GaussianKDE runs (one query at a time,
float32 densities). Both run in one process on the same data, interleaved, so a noisy
machine slows both alike. Prints the median of each, their ratio, and how many queries the
baseline's float32 density lost to underflow (scores that tie at probability 1).

    .venv/bin/python bench/kde_scoring.py [--points 40000] [--batch 64] [--repeats 15] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from inspector_dfkde.kde import GaussianKDE


def per_sample_loop(kde: GaussianKDE, features: torch.Tensor) -> torch.Tensor:
    """The baseline: densities one query at a time, as anomalib computes them."""
    dataset = kde.whitened
    norm = torch.exp(kde.log_norm) * dataset.shape[0]  # anomalib's norm excludes the 1/n of the mean
    queries = features @ kde.bw_transform
    estimate = torch.zeros(queries.shape[0], device=queries.device)
    for i in range(queries.shape[0]):
        embedding = ((dataset - queries[i]) ** 2).sum(dim=1)
        estimate[i] = torch.mean(torch.exp(-embedding / 2) * norm)
    return estimate


def _time(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=40000)
    parser.add_argument("--dims", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    generator = torch.Generator().manual_seed(0)
    training = torch.randn(args.points, args.dims, generator=generator) * 0.2
    near = training[: args.batch // 2] + 0.02 * torch.randn(args.batch // 2, args.dims, generator=generator)
    far = 3.0 * torch.randn(args.batch - args.batch // 2, args.dims, generator=generator)
    queries = torch.cat([near, far]).to(device)
    kde = GaussianKDE().fit(training).to(device)

    with torch.inference_mode():
        ours_log = kde.log_density(queries)
        loop_density = per_sample_loop(kde, queries)
        ours, loop = [], []
        for _ in range(args.repeats):
            ours.append(_time(lambda: kde.log_density(queries), device))
            loop.append(_time(lambda: per_sample_loop(kde, queries), device))

    agree = torch.isclose(torch.log(loop_density[loop_density > 0]), ours_log[loop_density > 0], rtol=1e-3)
    lost = int((loop_density == 0).sum())
    t_ours, t_loop = statistics.median(ours), statistics.median(loop)
    print(f"KDE of {args.points} points in {args.dims} dimensions, batch of {args.batch}, device {device}, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"  per-sample loop (baseline): {t_loop * 1e3:9.2f} ms/batch  {args.batch / t_loop:10.0f} frames/s")
    print(f"  vectorised log-space      : {t_ours * 1e3:9.2f} ms/batch  {args.batch / t_ours:10.0f} frames/s")
    print(f"  speed-up                  : {t_loop / t_ours:9.1f}x")
    print(f"  baseline densities that underflowed to 0: {lost} of {args.batch}; "
          f"ours finite: {bool(torch.isfinite(ours_log).all())}; "
          f"agreement where the baseline is finite: {int(agree.sum())} of {int(agree.numel())}")


if __name__ == "__main__":
    main()
