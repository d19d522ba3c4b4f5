"""Binary classification metrics for a policy's block score, including calibration."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Metrics:
    n: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    confusion: dict[str, int]  # tp, fp, tn, fn (positive = the block label)
    threshold: float
    positives: int
    brier: float  # mean squared error of the block probability
    ece: float  # expected calibration error, equal-width bins
    log_loss: float
    reliability: list[dict[str, float]] = field(default_factory=list)  # per bin: mean score, rate, n

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        c = self.confusion
        return (
            f"n={self.n} accuracy={self.accuracy:.3f} precision={self.precision:.3f} "
            f"recall={self.recall:.3f} F1={self.f1:.3f} (tp={c['tp']} fp={c['fp']} tn={c['tn']} "
            f"fn={c['fn']}) ECE={self.ece:.3f} Brier={self.brier:.3f}"
        )


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def compute_metrics(
    scores: Sequence[float], truth: Sequence[bool], threshold: float = 0.5, bins: int = 10
) -> Metrics:
    """``scores``: probability of the block label; ``truth``: whether the block label is correct."""
    if len(scores) != len(truth):
        raise ValueError("scores and labels differ in length")
    if not scores:
        raise ValueError("no scores to evaluate")
    tp = fp = tn = fn = 0
    for s, t in zip(scores, truth):
        pred = s >= threshold
        if pred and t:
            tp += 1
        elif pred:
            fp += 1
        elif t:
            fn += 1
        else:
            tn += 1
    n = len(scores)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    brier = sum((s - float(t)) ** 2 for s, t in zip(scores, truth)) / n
    eps = 1e-6
    log_loss = -sum(math.log(max(s, eps)) if t else math.log(max(1 - s, eps)) for s, t in zip(scores, truth)) / n
    reliability, ece = [], 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, s in enumerate(scores) if (lo <= s < hi) or (b == bins - 1 and s == 1.0)]
        if not idx:
            continue
        conf = sum(scores[i] for i in idx) / len(idx)
        rate = sum(1 for i in idx if truth[i]) / len(idx)
        ece += len(idx) / n * abs(conf - rate)
        reliability.append({"lo": lo, "hi": hi, "mean_score": conf, "positive_rate": rate, "n": len(idx)})
    return Metrics(
        n=n, accuracy=(tp + tn) / n, precision=precision, recall=recall, f1=f1,
        confusion={"tp": tp, "fp": fp, "tn": tn, "fn": fn}, threshold=threshold,
        positives=tp + fn, brier=brier, ece=ece, log_loss=log_loss, reliability=reliability,
    )


def pick_threshold(scores: Sequence[float], truth: Sequence[bool], default: float = 0.5) -> float:
    """The block threshold with the best accuracy on held-out (validation) scores.

    Candidates are ``default``, the midpoints between neighbouring distinct scores and the two ends
    (block everything / nothing); among equally accurate ones the closest to ``default`` wins, so a
    well-calibrated policy keeps it.
    """
    if len(scores) != len(truth):
        raise ValueError("scores and labels differ in length")
    if not scores:
        return default
    ranked = sorted(zip(scores, truth))
    distinct = sorted(set(scores))
    candidates = {default, 0.0, *((a + b) / 2 for a, b in zip(distinct, distinct[1:]))}
    if distinct[-1] < 1.0:
        candidates.add((distinct[-1] + 1.0) / 2)  # above every score: nothing blocks
    positives = sum(1 for _, t in ranked if t)
    best, best_key = default, (-1, 0.0)
    # Sweep in score order: below the threshold every example is predicted "allow".
    i, below_true = 0, 0
    for t in sorted(candidates):
        while i < len(ranked) and ranked[i][0] < t:
            below_true += ranked[i][1]
            i += 1
        correct = (i - below_true) + (positives - below_true)
        key = (correct, -abs(t - default))
        if key > best_key:
            best, best_key = t, key
    return best


def metrics_at_best_threshold(scores: Sequence[float], truth: Sequence[bool]) -> Metrics:
    """Metrics at :func:`pick_threshold` of the same scores (``.threshold`` is the one picked)."""
    return compute_metrics(scores, truth, pick_threshold(scores, truth))
