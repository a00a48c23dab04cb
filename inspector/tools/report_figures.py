"""The plots of `inspector evaluate --report`, each a PNG as bytes, and the ROC curve's points.

matplotlib's object interface on its Agg canvas: no pyplot, no global backend, no display. The ROC
points are computed here with numpy (one point per distinct score, as scikit-learn's `roc_curve` with
`drop_intermediate=False`); the tests hold them to scikit-learn.
"""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.figure import Figure

GOOD_COLOUR = "#2e7d32"
DEFECT_COLOUR = "#c62828"
DPI = 100


def roc_points(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates, thresholds): calling every image scoring at or over each
    distinct score defective, highest first, after a first point (0, 0) at threshold infinity."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=float)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last image of each group of equal scores
    tp = np.cumsum(y)[last]
    fp = last + 1 - tp
    positives, negatives = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return (np.r_[0.0, fp / negatives], np.r_[0.0, tp / positives], np.r_[np.inf, s[last]])


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def roc_png(fpr: np.ndarray, tpr: np.ndarray, auroc: float, at_threshold: tuple[float, float],
            threshold: float) -> bytes:
    """The ROC curve with the model's operating point (false-reject rate, recall at its threshold)."""
    figure = Figure(figsize=(5, 4.4))
    ax = figure.add_subplot()
    ax.plot(fpr, tpr, color=DEFECT_COLOUR, drawstyle="steps-post", label=f"ROC, AUROC {auroc:.3f}")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", label="chance")
    ax.plot(*at_threshold, "o", color="black", label=f"at the threshold {threshold:g}")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="false-reject rate (good parts failed)",
           ylabel="recall (defective parts failed)", title="ROC curve")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _png(figure)


def histogram_png(good: np.ndarray, defective: np.ndarray, threshold: float,
                  target: tuple[float, float] | None) -> bytes:
    """The anomaly probabilities of good and defective parts, the threshold, and where the calibration's
    target false-reject rate would put the threshold on this set's good parts: `target` is (rate, score)."""
    figure = Figure(figsize=(8, 4))
    ax = figure.add_subplot()
    bins = np.linspace(0.0, 1.0, 41)
    ax.hist(good, bins=bins, color=GOOD_COLOUR, alpha=0.6, label=f"good ({len(good)})")
    ax.hist(defective, bins=bins, color=DEFECT_COLOUR, alpha=0.6, label=f"defective ({len(defective)})")
    ax.axvline(threshold, color="black", linewidth=2, label=f"threshold {threshold:g} (fails at or over)")
    if target is not None and math.isfinite(target[1]):
        rate, score = target
        ax.axvline(score, color="#1565c0", linestyle="--", linewidth=2,
                   label=f"calibration target {rate:.2%} false rejects: {score:.3f} on these good parts")
    ax.set(xlim=(0, 1), xlabel="anomaly probability", ylabel="images", title="Scores of good and defective parts")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize="small", frameon=False)
    return _png(figure)


def confusion_png(good_passed: int, good_failed: int, defective_passed: int, defective_failed: int) -> bytes:
    """The confusion matrix at the model's threshold, counts written in each cell."""
    counts = np.array([[good_passed, good_failed], [defective_passed, defective_failed]])
    figure = Figure(figsize=(4, 3.4))
    ax = figure.add_subplot()
    ax.imshow(counts / max(counts.sum(axis=1).max(), 1), cmap="Blues", vmin=0, vmax=1)
    for (row, column), value in np.ndenumerate(counts):
        share = value / max(counts[row].sum(), 1)
        ax.text(column, row, f"{value}\n{share:.1%}", ha="center", va="center",
                color="white" if share > 0.6 else "black", fontsize=12)
    ax.set_xticks([0, 1], ["passed", "failed"])
    ax.set_yticks([0, 1], ["good", "defective"])
    ax.set(xlabel="verdict", ylabel="part", title="Confusion at the threshold")
    return _png(figure)


def kinds_png(kinds: dict[str, dict[str, float]]) -> bytes:
    """Recall per defect kind, with the number of images of each."""
    names = list(kinds)
    recall = [0.0 if kinds[k]["recall"] is None or math.isnan(kinds[k]["recall"]) else kinds[k]["recall"]
              for k in names]
    figure = Figure(figsize=(6, 0.5 * len(names) + 1.2))
    ax = figure.add_subplot()
    bars = ax.barh(names, recall, color=DEFECT_COLOUR, alpha=0.8)
    for bar, name, value in zip(bars, names, recall):
        ax.text(min(value, 0.98) + 0.01, bar.get_y() + bar.get_height() / 2,
                f"{value:.0%} of {kinds[name]['images']}", va="center", fontsize=9)
    ax.set(xlim=(0, 1.15), xlabel="recall at the threshold", title="Recall per defect kind")
    ax.invert_yaxis()
    return _png(figure)
