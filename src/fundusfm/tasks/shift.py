"""Distribution shift: says when an image is unlike the images a bundle was validated on.

A bundle trained on one camera scores another camera's photographs with a confidence it has
not earned. At the end of classification training (`tasks.classify.write_run`: pretrain,
finetune, the LF probe) the validation images' pooled backbone features, taken with the best
weights, become a reference stored beside the weights (`BUNDLE/shift.safetensors`, named with
its sha256 in bundle.json's `shift`, `bundle.ShiftReference`):

    distance    two Mahalanobis distances (Lee et al. 2018, one per depth of the network):
                the pooled backbone features, reduced by PCA to k = min(32, m - 2)
                dimensions (m: the smaller fit of the cross-fitting below; validation parts
                are small and features 512-2048 wide), and the image statistics (per-channel
                mean and std, 0-1 scale: the input's depth, where a camera's tint, blur and
                noise show first); each covariance Ledoit-Wolf shrunk so it stays invertible.
                `shift_distance` is the feature one, `shift_stats_distance` the other
    percentile  an image's score is the larger of its two distances' percentiles against
                the validation distances; `shift_percentile` is the share (%) of validation
                images with a lower score. The validation distances are cross-fitted (10
                folds, each scored by a reference fitted without it): an in-sample distance
                would be too small to compare new images against
    shift       `shifted` when the score is above the 95th percentile of the validation
                images' scores (`CUTOFF_PERCENTILE`), else `in-distribution`: images like the
                validation ones are flagged at about 5%; `unavailable` for bundles without a
                reference (older bundles, imported weights, a validation part under
                `MIN_VALIDATION` images), with a note saying why
    image stats `shift_image_stats` is true when a statistic lies outside the validation
                images' 1st-99th percentile range (informative; not part of `shift`)
The features always come from PyTorch (the bundle's backbone), whatever engine scores.
`ShiftScorer` is what `predict`, `evaluate` (and a server, per image) call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from sklearn.covariance import LedoitWolf

from fundusfm.bundle import ShiftReference
from fundusfm.data.transforms import normalise
from fundusfm.errors import BundleError
from fundusfm.evaluation.metrics import classification_metrics
from fundusfm.io import file_sha256, write_atomic
from fundusfm.models.loaded import Bundle

METHOD = "mahalanobis-pca-ledoitwolf"
CUTOFF_PERCENTILE = 95.0  # the one cut-off: `shifted` above this percentile of validation
MAX_DIMS = 32  # PCA dimensions at most
MIN_VALIDATION = 8  # fewer validation images: no reference (the distance would mean little)
FOLDS = 10  # cross-fitting of the validation distances
STATS_RANGE = (1.0, 99.0)  # percentiles of the validation image statistics
FILE = "shift.safetensors"
IN, SHIFTED, UNAVAILABLE = "in-distribution", "shifted", "unavailable"
COLUMNS = (
    "shift_distance",
    "shift_stats_distance",
    "shift_percentile",
    "shift",
    "shift_image_stats",
)
NO_REFERENCE = (
    "shift unavailable: the bundle stores no reference of its validation images (made "
    "before fundusfm stored one, imported weights, or under {n} validation images)"
)


@dataclass(frozen=True)
class Reference:
    """What the validation images looked like: two fitted distances (pooled features, image
    stats), the validation images' own cross-fitted scores, and the image-stat ranges."""

    mean: np.ndarray  # (D,) feature mean
    components: np.ndarray  # (k, D) PCA directions
    precision: np.ndarray  # (k, k) Ledoit-Wolf precision in PCA space
    distances: np.ndarray  # (n,) sorted, cross-fitted validation feature distances
    stats_scale: np.ndarray  # (6,) validation std of each image statistic
    stats_mean: np.ndarray  # (6,) the same fit on the (scaled) image statistics
    stats_components: np.ndarray
    stats_precision: np.ndarray
    stats_distances: np.ndarray  # (n,) sorted, cross-fitted
    combined: np.ndarray  # (n,) sorted validation scores (see `score`)
    stats_low: np.ndarray  # (6,) 1st percentile of each image statistic
    stats_high: np.ndarray  # (6,) 99th percentile

    def cutoff(self, percentile: float = CUTOFF_PERCENTILE) -> float:
        """The score above which an image is `shifted`."""
        return float(np.percentile(self.combined, percentile))

    def score(self, features: np.ndarray, stats: np.ndarray):
        """Feature distance, image-stat distance, and the combined score: the larger of the
        two distances' percentiles against validation (one test per depth, Lee et al.)."""
        d = _distance(features, self.mean, self.components, self.precision)
        ds = _distance(stats / self.stats_scale, *self._stats_fit())
        return (
            d,
            ds,
            np.maximum(_share_below(self.distances, d), _share_below(self.stats_distances, ds)),
        )

    def _stats_fit(self):
        return self.stats_mean, self.stats_components, self.stats_precision

    def percentile(self, combined: np.ndarray) -> np.ndarray:
        """Share (%) of validation images with a lower combined score."""
        return _share_below(self.combined, combined)

    def stats_outside(self, stats: np.ndarray) -> np.ndarray:
        return ((stats < self.stats_low) | (stats > self.stats_high)).any(axis=1)


def _share_below(sorted_values: np.ndarray, x: np.ndarray) -> np.ndarray:
    return 100.0 * np.searchsorted(sorted_values, x, side="left") / len(sorted_values)


def _distance(features, mean, components, precision) -> np.ndarray:
    z = (np.asarray(features, np.float64) - mean) @ components.T
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", z, precision, z), 0.0))


def _fit(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, the top-k PCA directions (an SVD: deterministic) and the shrunk precision."""
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    components = vt[:k]
    z = (x - mean) @ components.T
    return mean, components, LedoitWolf(assume_centered=True).fit(z).precision_


def _cross_fitted(x: np.ndarray, k: int, folds: int) -> np.ndarray:
    """Each image's distance to a reference fitted without its fold (no RNG: i % folds);
    an in-sample distance would be too small to compare new images against."""
    fold = np.arange(len(x)) % folds
    distances = np.empty(len(x))
    for j in range(folds):
        held = fold == j
        distances[held] = _distance(x[held], *_fit(x[~held], k))
    return distances


def fit_reference(features: np.ndarray, stats: np.ndarray) -> Reference | None:
    """The reference of validation features (n x D) and image stats (n x 6); None when
    there are too few images or the features are not finite (a diverged model)."""
    x, st = np.asarray(features, np.float64), np.asarray(stats, np.float64)
    n = len(x)
    if n < MIN_VALIDATION or not np.isfinite(x).all():
        return None
    folds = min(FOLDS, n)
    fit_n = n - math.ceil(n / folds)  # the smallest cross-fitting fit
    k = max(1, min(MAX_DIMS, fit_n - 2, x.shape[1]))
    scale = st.std(axis=0) + 1e-9
    ks = max(1, min(st.shape[1], fit_n - 2))
    d, ds = _cross_fitted(x, k, folds), _cross_fitted(st / scale, ks, folds)
    d_sorted, ds_sorted = np.sort(d), np.sort(ds)
    combined = np.maximum(_share_below(d_sorted, d), _share_below(ds_sorted, ds))
    low, high = np.percentile(st, STATS_RANGE, axis=0)
    return Reference(
        *_fit(x, k), d_sorted, scale, *_fit(st / scale, ks), ds_sorted, np.sort(combined), low, high
    )


def image_stats(images: torch.Tensor) -> np.ndarray:
    """Per-image, per-channel mean and std (0-1 scale) of uint8 N x 3 x H x W images."""
    x = images.to(torch.float32).div(255)
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1).double().cpu().numpy()


@torch.no_grad()
def measure(backbone, images: torch.Tensor, mean, std) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features (full precision, eval mode) and image stats of a uint8 batch."""
    device = next(backbone.parameters()).device
    features = backbone.pool(normalise(images.to(device), mean, std)).float().cpu().numpy()
    return features.astype(np.float64), image_stats(images)


def reference_of(
    backbone, dataset, mean, std, batch_size: int = 32, features: np.ndarray | None = None
) -> Reference | None:
    """The reference of a dataset's images (items: uint8 image, y, index), read in order
    without a DataLoader so that no random number is drawn; `features`: already extracted
    (the LF probe's cache), then only the image stats are measured."""
    backbone.eval()
    feats, stats = [], []
    for start in range(0, len(dataset), batch_size):
        stop = min(start + batch_size, len(dataset))
        images = torch.stack([dataset[i][0] for i in range(start, stop)])
        if features is None:
            f, s = measure(backbone, images, mean, std)
            feats.append(f)
        else:
            s = image_stats(images)
        stats.append(s)
    if not stats:
        return None
    x = np.concatenate(feats) if features is None else np.asarray(features)
    return fit_reference(x, np.concatenate(stats))


def save_reference(reference: Reference, folder: Path) -> ShiftReference:
    """Write `folder/shift.safetensors`; the typed entry bundle.json's `shift` holds."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: np.ascontiguousarray(getattr(reference, name), dtype=np.float64)
        for name in Reference.__dataclass_fields__
    }
    path = folder / FILE
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))
    k, d = reference.components.shape
    return ShiftReference(
        file=FILE,
        sha256=file_sha256(path),
        method=METHOD,
        n_validation=len(reference.distances),
        features=d,
        dims=k,
        cutoff_percentile=CUTOFF_PERCENTILE,
    )


def load_reference(bundle: Bundle) -> Reference | None:
    """A bundle's reference (sha256 checked), or None when it records none."""
    entry = bundle.meta.shift
    if entry is None:
        return None
    path = bundle.path / entry.file
    if not path.is_file():
        raise BundleError(f"{path}: bundle.json names a shift reference that is missing")
    digest = file_sha256(path)
    if digest != entry.sha256:
        raise BundleError(
            f"{path}: sha256 {digest[:12]}... does not match bundle.json "
            f"({entry.sha256[:12]}...); the shift reference was changed or damaged"
        )
    tensors = load_file(str(path))
    return Reference(**{name: tensors[name] for name in Reference.__dataclass_fields__})


@dataclass
class ShiftScorer:
    """Shift of uint8 image batches against a bundle's reference: `scorer(images)` gives one
    dict per image (`COLUMNS`); without a reference every image is `unavailable`."""

    bundle: Bundle
    reference: Reference | None
    notes: tuple[str, ...] = ()

    @property
    def available(self) -> bool:
        return self.reference is not None

    def __call__(self, images: torch.Tensor) -> list[dict]:
        if self.reference is None:
            return [dict.fromkeys(COLUMNS, None) | {"shift": UNAVAILABLE} for _ in images]
        pre = self.bundle.preprocessing
        features, stats = measure(self.bundle.model.backbone, images, pre.mean, pre.std)
        ref, entry = self.reference, self.bundle.meta.shift
        distance, stats_distance, combined = ref.score(features, stats)
        shifted = combined > ref.cutoff(entry.cutoff_percentile)
        rows = zip(
            distance,
            stats_distance,
            ref.percentile(combined),
            shifted,
            ref.stats_outside(stats),
            strict=True,
        )
        return [
            {
                "shift_distance": float(d),
                "shift_stats_distance": float(ds),
                "shift_percentile": float(p),
                "shift": SHIFTED if sh else IN,
                "shift_image_stats": bool(o),
            }
            for d, ds, p, sh, o in rows
        ]


def shift_scorer(bundle: Bundle, engine: str = "torch") -> ShiftScorer:
    """The shift scorer of a loaded classifier bundle; `engine`: what scores the
    probabilities (the features come from PyTorch either way, and the notes say so)."""
    reference = load_reference(bundle)
    if reference is None:
        return ShiftScorer(bundle, None, (NO_REFERENCE.format(n=MIN_VALIDATION),))
    notes = ()
    if engine != "torch":
        notes = (f"shift features come from PyTorch (the backbone); probabilities from {engine}",)
    return ShiftScorer(bundle, reference, notes)


def flag_summary(labels: list[str]) -> dict:
    """How many images were flagged `shifted` (`available` false without a reference)."""
    labels = np.asarray(labels, dtype=object)
    if len(labels) == 0 or (labels == UNAVAILABLE).all():
        return {"available": False, "flagged_share": None, "n_flagged": 0, "n": len(labels)}
    flagged = labels == SHIFTED
    return {
        "available": True,
        "method": METHOD,
        "cutoff_percentile": CUTOFF_PERCENTILE,
        "n": len(labels),
        "n_flagged": int(flagged.sum()),
        "flagged_share": float(flagged.mean()),
    }


def shift_summary(kind: str, y, scores, thresholds, labels: list[str]) -> dict:
    """metrics.json's `shift`: the share flagged, and the metrics with and without the
    flagged images (NaN where fewer than two images remain)."""
    summary = flag_summary(labels)
    if not summary["available"]:
        return summary
    keep = np.asarray(labels, dtype=object) != SHIFTED
    y, scores = np.asarray(y), np.asarray(scores)
    metrics_all = classification_metrics(kind, y, scores, thresholds)
    if keep.sum() >= 2:
        metrics_in = classification_metrics(kind, y[keep], scores[keep], thresholds)
    else:
        metrics_in = dict.fromkeys(metrics_all, float("nan"))
    return {**summary, "metrics_all": metrics_all, "metrics_in_distribution": metrics_in}


def shift_line(summary: dict, what: str = "images") -> str:
    """The one line a command prints about shift."""
    if not summary.get("available"):
        return NO_REFERENCE.format(n=MIN_VALIDATION)
    cut = summary["cutoff_percentile"]
    line = (
        f"shift: {summary['n_flagged']} of {summary['n']} {what} "
        f"({100 * summary['flagged_share']:.0f}%) are unlike the bundle's validation images "
        f"(distance above its {cut:g}th percentile; ~{100 - cut:g}% expected)"
    )
    auroc = summary.get("metrics_all", {}).get("auroc")
    if auroc is not None:
        kept = summary["metrics_in_distribution"].get("auroc")
        line += f"; AUROC {auroc:.3f} on all, {kept:.3f} without them"
    return line
