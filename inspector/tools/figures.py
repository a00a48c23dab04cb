"""Detection figures, pure functions of labels (True = defective) and anomaly scores, numpy only:
image AUROC (the Mann-Whitney U, ties counted half), average precision (the step-wise sum sklearn
uses), the confusion at a threshold with precision, recall, F1 and false-reject rate, and the
threshold that would maximise F1. `inspector evaluate` reports them; tests check them against scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def _checked(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=float)
    if y.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be two 1-d arrays of one length")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite numbers")
    return y, s


def _both_classes(y: np.ndarray, what: str) -> tuple[int, int]:
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"{what} needs at least one defective and one good image")
    return n_pos, n_neg


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values` in ascending order, tied values sharing the mean of their ranks."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="mergesort")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def auroc(labels, scores) -> float:
    """Area under the ROC curve: the Mann-Whitney U of the defective scores over n_pos * n_neg, ties
    counting half (the chance that a random defective image outscores a random good one)."""
    y, s = _checked(labels, scores)
    n_pos, n_neg = _both_classes(y, "AUROC")
    u = average_ranks(s)[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _sweep(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each distinct score as a threshold, highest first, with the true and false positives of
    calling every image at or over it defective."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last image of each group of equal scores
    tp = np.cumsum(y)[last]
    fp = last + 1 - tp
    return s[last], tp, fp


def average_precision(labels, scores) -> float:
    """Sum over the distinct thresholds, highest first, of (R_n - R_{n-1}) * P_n: precision weighted
    by the gain in recall, without interpolation (scikit-learn's definition)."""
    y, s = _checked(labels, scores)
    n_pos, _ = _both_classes(y, "average precision")
    _, tp, fp = _sweep(y, s)
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


@dataclass(frozen=True)
class Confusion:
    """Verdicts at one threshold: a frame fails when its score is at or over it."""

    good_passed: int
    good_failed: int
    defective_passed: int
    defective_failed: int

    @property
    def precision(self) -> float:
        """Share of failed frames that are defective; NaN when none failed."""
        failed = self.good_failed + self.defective_failed
        return self.defective_failed / failed if failed else math.nan

    @property
    def recall(self) -> float:
        """Share of defective frames that failed; NaN without defective frames."""
        defective = self.defective_passed + self.defective_failed
        return self.defective_failed / defective if defective else math.nan

    @property
    def f1(self) -> float:
        """2 TP / (2 TP + FP + FN); 0 when nothing defective failed, NaN with no defective and no failed frame."""
        denominator = 2 * self.defective_failed + self.good_failed + self.defective_passed
        return 2 * self.defective_failed / denominator if denominator else math.nan

    @property
    def false_reject_rate(self) -> float:
        """Share of good frames that failed; NaN without good frames."""
        good = self.good_passed + self.good_failed
        return self.good_failed / good if good else math.nan

    def as_dict(self) -> dict[str, int]:
        return {"good_passed": self.good_passed, "good_failed": self.good_failed,
                "defective_passed": self.defective_passed, "defective_failed": self.defective_failed}


def confusion(labels, scores, threshold: float) -> Confusion:
    y, s = _checked(labels, scores)
    failed = s >= threshold
    return Confusion(good_passed=int((~y & ~failed).sum()), good_failed=int((~y & failed).sum()),
                     defective_passed=int((y & ~failed).sum()), defective_failed=int((y & failed).sum()))


@dataclass(frozen=True)
class BestF1:
    """The threshold (frames at or over it fail) with the highest F1; the highest such threshold when
    several tie. Any threshold above `next_below` (the next lower distinct score; None: none) and at
    most `threshold` gives the same verdicts."""

    threshold: float
    next_below: float | None
    f1: float
    precision: float
    recall: float


def best_f1_threshold(labels, scores) -> BestF1:
    y, s = _checked(labels, scores)
    n_pos, _ = _both_classes(y, "the F1-best threshold")
    thresholds, tp, fp = _sweep(y, s)
    f1 = 2 * tp / (tp + fp + n_pos)  # 2 TP / (2 TP + FP + FN), as FN = n_pos - TP
    best = int(np.argmax(f1))  # the first maximum: the highest threshold among equals
    return BestF1(
        threshold=float(thresholds[best]),
        next_below=float(thresholds[best + 1]) if best + 1 < len(thresholds) else None,
        f1=float(f1[best]),
        precision=float(tp[best] / (tp[best] + fp[best])),
        recall=float(tp[best] / n_pos),
    )


@dataclass(frozen=True)
class Figures:
    """Every figure of an evaluation, from the probabilities of each class."""

    threshold: float
    good: int
    defective: int
    auroc: float
    average_precision: float
    confusion: Confusion
    kinds: dict[str, dict[str, float]]  # kind -> images, recall, auroc (that kind against good)
    best_f1: BestF1


def figures(good: np.ndarray, kinds: dict[str, np.ndarray], threshold: float) -> Figures:
    """The figures from the scores of the good images and of each defect kind (kinds may be empty arrays)."""
    good = np.asarray(good, dtype=float)
    kinds = {kind: np.asarray(scores, dtype=float) for kind, scores in kinds.items()}
    defective = np.concatenate([good[:0], *kinds.values()])
    labels = np.r_[np.zeros(len(good), bool), np.ones(len(defective), bool)]
    scores = np.r_[good, defective]
    per_kind = {
        kind: {"images": len(kind_scores),
               "recall": float(np.mean(kind_scores >= threshold)) if len(kind_scores) else math.nan,
               "auroc": auroc(np.r_[np.zeros(len(good), bool), np.ones(len(kind_scores), bool)],
                              np.r_[good, kind_scores]) if len(kind_scores) else math.nan}
        for kind, kind_scores in sorted(kinds.items())
    }
    return Figures(threshold=threshold, good=len(good), defective=len(defective), auroc=auroc(labels, scores),
                   average_precision=average_precision(labels, scores),
                   confusion=confusion(labels, scores, threshold), kinds=per_kind,
                   best_f1=best_f1_threshold(labels, scores))
