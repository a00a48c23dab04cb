"""Split-conformal calibration: where the boundary goes, what it promises, and the probability it gives.

The calibration scores are good parts' log-densities, each from a model fitted without that part (held
out, or out of its fold); lower is more unusual. Sorted, s_(1) <= ... <= s_(n). For a target false-reject
rate q the boundary is the k-th smallest, k = floor(q (n + 1)), and a frame fails at or below it. When
the calibration parts and the fresh good parts are exchangeable (the same line, the same conditions), a
fresh good part falls at or below s_(k) with probability k / (n + 1) <= q, averaged over archives; the
rate of one particular boundary is Beta(k, n + 1 - k) distributed. k = 0 means the archive is too small
for the target, and no threshold can promise it.

The anomaly probability is a frame's rank among those scores, read off a continuous, monotone curve of
the raw score (float64; a hyperbolic tail beyond the calibration range, so defects far beyond every good
part still rank and never tie at 1), stretched piecewise so that the configured threshold falls exactly
on the boundary: see `ConformalScale.probability`.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from inspector.plugin import FalseRejectPromise

RULE = "split-conformal: the k-th smallest calibration score, k = floor(target x (n + 1))"

# A stored table of calibration scores is bounded (8 bytes each: 32 MiB); an archive larger than this
# calibrates on a hold-out instead.
MAX_SCORES = 1 << 22
# The share of the lowest (highest) scores whose mean gap sets the scale of the lower (upper) tail.
TAIL_SHARE = 0.05
# The tails' scale never below this many nats: scores bunched closer than that would otherwise make the tail
# so steep that defects a few nats beyond every good part already round to a probability of exactly 1.
MIN_TAIL_NATS = 0.01


def _exact(target: float) -> Fraction:
    """The target as written (0.29, not the binary 0.28999...), so k does not drop by one at exact products."""
    return Fraction(repr(float(target)))


def boundary_rank(n: int, target: float) -> int:
    """k = floor(q (n + 1)): the boundary is the k-th smallest of n calibration scores."""
    return math.floor(_exact(target) * (n + 1))


def images_needed(target: float) -> int:
    """The fewest calibration scores that give k >= 1 for `target`: n >= ceil(1/q) - 1."""
    return math.ceil(1 / _exact(target)) - 1


def beta_quantile(p: float, a: int, b: int) -> float:
    """The p-quantile of Beta(a, b) for whole a, b >= 1, by bisection on its CDF, which for whole
    parameters is a binomial tail: P(Beta(a, b) <= x) = P(Binomial(a + b - 1, x) >= a). numpy only (scipy
    is no runtime dependency); agrees with scipy.stats.beta.ppf to 1e-9 (tests/test_calibration.py)."""
    if not (a >= 1 and b >= 1 and 0.0 < p < 1.0):
        raise ValueError(f"Beta({a}, {b}) quantile {p}: need whole a, b >= 1 and 0 < p < 1")
    n = a + b - 1
    # Sum the shorter side: P(X <= a-1) over j < a, or P(X >= a) over j >= a, for X ~ Binomial(n, x).
    low_side = a <= n - a + 1
    j = np.arange(0, a) if low_side else np.arange(a, n + 1)
    i = np.arange(1, n + 1, dtype=np.float64)
    log_choose = np.concatenate([[0.0], np.cumsum(np.log((n - i + 1) / i))])[j]

    def cdf(x: float) -> float:
        terms = log_choose + j * math.log(x) + (n - j) * math.log1p(-x)
        top = terms.max()
        tail = math.exp(top) * float(np.exp(terms - top).sum())
        return 1.0 - tail if low_side else tail

    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if cdf(mid) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _tail_scale(gaps: np.ndarray) -> float:
    """The mean of the first gaps between neighbouring sorted scores, in nats; at least MIN_TAIL_NATS."""
    count = max(1, math.ceil(TAIL_SHARE * len(gaps)))
    for chosen in (gaps[:count], gaps):
        scale = float(chosen.mean()) if len(chosen) else 0.0
        if scale > 0 and math.isfinite(scale):
            return max(scale, MIN_TAIL_NATS)
    return 1.0


class ConformalScale:
    """Sorted calibration scores, the boundary's rank k and the threshold placed on it."""

    def __init__(self, scores: np.ndarray, k: int, threshold: float) -> None:
        scores = np.asarray(scores, dtype=np.float64)
        n = len(scores)
        if scores.ndim != 1 or not 1 <= n <= MAX_SCORES:
            raise ValueError(f"calibration scores: need 1 to {MAX_SCORES} of them, got shape {scores.shape}")
        if not np.isfinite(scores).all() or (np.diff(scores) < 0).any():
            raise ValueError("calibration scores must be finite and sorted")
        if not 1 <= k <= n:
            raise ValueError(f"calibration rank {k} outside 1..{n}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold {threshold} outside (0, 1)")
        self.scores, self.k, self.threshold = scores, int(k), float(threshold)
        self.knots, counts = np.unique(scores, return_counts=True)
        self.ranks = np.cumsum(counts).astype(np.float64)  # scores at or below each knot
        self.boundary = float(scores[k - 1])
        self.boundary_rank = float(self.ranks[np.searchsorted(self.knots, self.boundary)])  # k, or more on ties
        self.low_scale = _tail_scale(np.diff(self.knots))
        self.high_scale = _tail_scale(np.diff(self.knots)[::-1])

    @classmethod
    def fit(cls, raw: np.ndarray, target: float, threshold: float) -> "ConformalScale":
        """From unsorted calibration scores; ValueError when k = 0 (see images_needed)."""
        raw = np.sort(np.asarray(raw, dtype=np.float64))
        k = boundary_rank(len(raw), target)
        if k < 1:
            raise ValueError(f"a false-reject rate of {target} needs at least {images_needed(target)} calibration "
                             f"images, got {len(raw)}")
        return cls(raw, k, threshold)

    @property
    def n(self) -> int:
        return len(self.scores)

    def rank(self, raw: np.ndarray) -> np.ndarray:
        """How many calibration scores lie at or below each raw score, continuous and increasing in it: the
        counts at the scores, linear between them, hyperbolic beyond them (0 far below, n + 1 far above)."""
        raw = np.asarray(raw, dtype=np.float64)
        first, last, n = self.knots[0], self.knots[-1], float(self.n)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            inside = self._between_knots(raw)
            below = self.ranks[0] / (1.0 + (first - raw) / self.low_scale)
            above = n + 1.0 / (1.0 + self.high_scale / (raw - last))
        return np.where(raw < first, below, np.where(raw > last, above, inside))

    def _between_knots(self, raw: np.ndarray) -> np.ndarray:
        """The rank by linear interpolation between the knots. Not np.interp: it takes the slope first, and
        between knots a subnormal apart that slope overflows to inf; the fraction of the gap never does."""
        last = len(self.knots) - 1
        low = np.clip(np.searchsorted(self.knots, raw, side="right") - 1, 0, last)
        high = np.minimum(low + 1, last)
        x0, x1 = self.knots[low], self.knots[high]
        gap = x1 - x0
        fraction = np.clip(np.where(gap > 0, (raw - x0) / np.where(gap > 0, gap, 1.0), 0.0), 0.0, 1.0)
        return self.ranks[low] + fraction * (self.ranks[high] - self.ranks[low])

    def probability(self, raw: np.ndarray) -> np.ndarray:
        """The anomaly probability of raw scores (log-densities), float64 in [0, 1], a frame failing iff it
        is at or over the threshold, iff its raw score is at or below the boundary.

        With R the rank above and R_b the boundary's (k), a frame at or below the boundary gets
        t + (1 - t)(1 - R / R_b): from t at the boundary to 1 beyond every good part; a frame above it gets
        t (n + 1 - R) / (n + 1 - R_b): from just under t to 0. For a good part of the same line, p / t is
        uniform on [0, 1), the share of the passing good parts that look less unusual. With
        t = 1 - k / (n + 1) both pieces are 1 - R / (n + 1): the conformal rank itself.
        """
        raw = np.asarray(raw, dtype=np.float64)
        t, n1, rb = self.threshold, self.n + 1.0, self.boundary_rank
        r = self.rank(raw)
        fails = raw <= self.boundary
        with np.errstate(invalid="ignore"):
            failing = np.maximum(t + (1.0 - t) * (1.0 - r / rb), t)
            passing = np.minimum(t * (n1 - r) / (n1 - rb), np.nextafter(t, 0.0))
            return np.clip(np.where(fails, failing, np.where(np.isnan(raw), np.nan, passing)), 0.0, 1.0)

    def promise(self, interval: tuple[float, float] = (0.05, 0.95)) -> FalseRejectPromise:
        """What this threshold promises fresh good parts: n, k, the expected rate and an interval for its own."""
        a, b = self.k, self.n + 1 - self.k
        return FalseRejectPromise(n=self.n, k=self.k, expected=self.k / (self.n + 1),
                                  low=beta_quantile(interval[0], a, b), high=beta_quantile(interval[1], a, b),
                                  low_quantile=interval[0], high_quantile=interval[1], distribution=f"Beta({a}, {b})")
