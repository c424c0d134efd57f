"""Vessel segmentation metrics, counted only inside the field of view.

Per image: Dice (F1), IoU, sensitivity, specificity, accuracy at the threshold, AUROC and
AUPRC of the probabilities, and clDice (Shit et al., 2021: Dice of each mask's skeleton
with the other mask). Pooled: the same over all images' FOV pixels together (counts summed,
clDice from summed skeleton overlaps), as most vessel papers report.

AUROC and AUPRC are computed from pixel counts in 1,000 probability bins: exact up to
ties inside a bin (the saved 8-bit probability PNGs are coarser), and memory-flat on
datasets of 2048 x 2048 images. Pixels outside the FOV count nowhere.

The binarisation threshold is chosen from the same bin counts (`dice_by_threshold`,
`best_threshold`, `choose_threshold`): the pooled Dice of `prob >= t` for every t of `GRID`
(0.01 .. 0.99; each a bin edge, so exact up to a probability lying on an edge), the
maximum kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from skimage.morphology import skeletonize

from fundusfm.errors import ConfigError, DataError

BINS = 1000
GRID = np.round(np.arange(1, 100) / 100, 2)  # candidate thresholds, each a bin edge
NAMES = (
    "dice",
    "iou",
    "sensitivity",
    "specificity",
    "accuracy",
    "auroc",
    "auprc",
    "cldice",
)


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


@dataclass
class Counts:
    """Sufficient statistics of one image, or of many summed."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    pos_hist: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))
    neg_hist: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))
    skel_pred: int = 0  # skeleton pixels of the prediction
    skel_pred_in_truth: int = 0
    skel_truth: int = 0
    skel_truth_in_pred: int = 0

    def __add__(self, o: Counts) -> Counts:
        return Counts(
            self.tp + o.tp,
            self.fp + o.fp,
            self.fn + o.fn,
            self.tn + o.tn,
            self.pos_hist + o.pos_hist,
            self.neg_hist + o.neg_hist,
            self.skel_pred + o.skel_pred,
            self.skel_pred_in_truth + o.skel_pred_in_truth,
            self.skel_truth + o.skel_truth,
            self.skel_truth_in_pred + o.skel_truth_in_pred,
        )


def count(prob: np.ndarray, truth: np.ndarray, fov: np.ndarray, threshold: float) -> Counts:
    """Counts of one image: `prob` in [0, 1] (or a 0/1 mask), `truth` and `fov` boolean."""
    if not prob.shape == truth.shape == fov.shape:
        raise DataError(
            f"shapes differ: probabilities {prob.shape}, vessel mask {truth.shape}, FOV mask "
            f"{fov.shape}; every mask must have the size of its image"
        )
    fov = fov.astype(bool)
    truth = truth.astype(bool) & fov
    pred = (prob >= threshold) & fov
    pos_hist, neg_hist = fov_histograms(prob, truth, fov)
    skel_p, skel_t = skeletonize(pred), skeletonize(truth)
    return Counts(
        tp=int((pred & truth).sum()),
        fp=int((pred & ~truth).sum()),
        fn=int((~pred & truth).sum()),
        tn=int((~pred & ~truth & fov).sum()),
        pos_hist=pos_hist,
        neg_hist=neg_hist,
        skel_pred=int(skel_p.sum()),
        skel_pred_in_truth=int((skel_p & truth).sum()),
        skel_truth=int(skel_t.sum()),
        skel_truth_in_pred=int((skel_t & pred).sum()),
    )


def fov_histograms(
    prob: np.ndarray, truth: np.ndarray, fov: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Counts of vessel and of background pixels inside the FOV in BINS probability bins."""
    fov = fov.astype(bool)
    p, t = prob[fov], truth.astype(bool)[fov]
    bins = np.minimum((p * BINS).astype(np.int64), BINS - 1)
    return np.bincount(bins[t], minlength=BINS), np.bincount(bins[~t], minlength=BINS)


def _auroc_auprc(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    P, N = pos.sum(), neg.sum()
    if P == 0 or N == 0:
        return float("nan"), float("nan")
    tp = np.cumsum(pos[::-1]).astype(float)  # thresholds from high to low
    fp = np.cumsum(neg[::-1]).astype(float)
    tpr, fpr = np.concatenate([[0.0], tp / P]), np.concatenate([[0.0], fp / N])
    auroc = float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2))
    precision = tp / np.maximum(tp + fp, 1)
    auprc = float(np.sum(np.diff(tpr) * precision))  # average precision
    return auroc, auprc


def scores(c: Counts) -> dict[str, float]:
    """Every metric of NAMES from counts (NaN where undefined, e.g. no vessel pixel)."""
    auroc, auprc = _auroc_auprc(c.pos_hist, c.neg_hist)
    t_prec = c.skel_pred_in_truth / c.skel_pred if c.skel_pred else 0.0
    t_sens = c.skel_truth_in_pred / c.skel_truth if c.skel_truth else 0.0
    return {
        "dice": _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn),
        "iou": _ratio(c.tp, c.tp + c.fp + c.fn),
        "sensitivity": _ratio(c.tp, c.tp + c.fn),
        "specificity": _ratio(c.tn, c.tn + c.fp),
        "accuracy": _ratio(c.tp + c.tn, c.tp + c.tn + c.fp + c.fn),
        "auroc": auroc,
        "auprc": auprc,
        # both skeletons empty: undefined; one empty or no overlap: 0 (not NaN, which a
        # mean over images would silently skip)
        "cldice": float("nan")
        if not (c.skel_pred or c.skel_truth)
        else _ratio(2 * t_prec * t_sens, t_prec + t_sens)
        if t_prec + t_sens
        else 0.0,
    }


def summary(per_image: list[Counts]) -> dict[str, float]:
    """Pooled metrics and the mean of the per-image ones (keys `<name>` and `<name>_mean`)."""
    if not per_image:
        return {}
    pooled = scores(sum(per_image[1:], per_image[0]))
    table = np.array([[scores(c)[n] for n in NAMES] for c in per_image], dtype=float)
    means = [float(np.nanmean(c)) if np.isfinite(c).any() else float("nan") for c in table.T]
    return {**pooled, **{f"{n}_mean": float(m) for n, m in zip(NAMES, means, strict=True)}}


@dataclass(frozen=True)
class ThresholdPick:
    """A threshold of maximum pooled Dice and that Dice, on `images` images."""

    threshold: float
    dice: float
    images: int = 0


def dice_by_threshold(pos: np.ndarray, neg: np.ndarray, grid: np.ndarray = GRID) -> np.ndarray:
    """Pooled Dice of `prob >= t` for each t of `grid` (multiples of 1/BINS) from bin counts;
    NaN where there is no vessel pixel and none predicted."""
    edges = np.rint(np.asarray(grid, float) * BINS).astype(int)
    if not np.allclose(edges / BINS, grid) or edges.min() < 1 or edges.max() >= BINS:
        raise ConfigError(f"thresholds must be multiples of 1/{BINS} inside (0, 1): {grid}")
    at_least_pos = np.cumsum(pos[::-1])[::-1]  # [k]: pixels in bin k or above
    at_least_neg = np.cumsum(neg[::-1])[::-1]
    tp, fp = at_least_pos[edges].astype(float), at_least_neg[edges].astype(float)
    fn = float(pos.sum()) - tp
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / denominator, np.nan)


def best_threshold(
    pos: np.ndarray, neg: np.ndarray, grid: np.ndarray = GRID, images: int = 0
) -> ThresholdPick:
    """The threshold of `grid` with the highest pooled Dice. Equal Dice over a range of
    thresholds (no pixel between them): the middle of the first such range."""
    dice = dice_by_threshold(pos, neg, grid)
    if not pos.sum() or np.isnan(dice).all():
        raise DataError("no vessel pixel inside the FOV: a threshold cannot be chosen")
    best = np.flatnonzero(dice >= np.nanmax(dice) - 1e-12)
    gaps = np.flatnonzero(np.diff(best) > 1)
    run = best[: gaps[0] + 1] if len(gaps) else best
    k = int(run[(len(run) - 1) // 2])
    return ThresholdPick(float(grid[k]), float(dice[k]), images)


def choose_threshold(
    probs: list[np.ndarray], truths: list[np.ndarray], fovs: list[np.ndarray]
) -> ThresholdPick:
    """The threshold of maximum Dice over these images' FOV pixels pooled (`GRID`)."""
    pos, neg = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
    for prob, truth, fov in zip(probs, truths, fovs, strict=True):
        p, n = fov_histograms(prob, truth, fov)
        pos, neg = pos + p, neg + n
    return best_threshold(pos, neg, images=len(probs))
