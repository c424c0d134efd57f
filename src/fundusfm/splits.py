"""Patient-grouped, stratified k-fold splits with validation parts and nested labelled fractions.

`splits.csv` has one row per image:

    image_id, patient_id   the image and the patient it is grouped by
    fold                   0..K-1: the cross-validation fold whose test part holds the image;
                           -1 for images in the held-out part
    holdout                1 if the image is in the optional held-out part (never trained on)
    val_fold               k if the image belongs to the validation part of fold k, else -1
    frac_<f>               1 if the image is in the labelled fraction f (e.g. frac_0.1)

For fold k: test = `fold == k`; validation = `val_fold == k`; training at fraction f =
`fold != k and fold != -1 and val_fold != k and frac_<f> == 1`. `fold_sets` spells this out.

How it is made (all assignments are of whole patients, so no patient is ever on two sides):
1. Patients are assigned to the held-out part and then to K folds by iterative stratification
   (Sechidis et al., 2011) on their label counts, which handles binary, multiclass and
   multilabel tasks alike: the rarest label is placed first, each patient going to the part
   that most lacks that label.
2. Each fold gives `val_fraction` of its patients, stratified the same way, to the validation
   part of each other fold, so every fold's validation part is about `val_fraction` of its
   training patients and is carved from them. In very small sets, where that share rounds
   to nobody, a fold's validation part gets one patient of the commonest class.
   A fold left with an empty training, validation or test part is an error, not a warning.
3. Within each fold and stratum (a patient's rarest label) patients are put in a random
   order; fraction f takes the first ceil(f * n) of them. Fractions are therefore nested
   (1% inside 5% inside ...), stratified, and hold at least one patient of every stratum.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .config import ConfigError, SplitConfig
from .manifest import Manifest, TaskSpec, encode_labels


def label_matrix(manifest: Manifest, task: TaskSpec) -> np.ndarray:
    """(N, C) 0/1 matrix to stratify on; multilabel rows with no label get a 'none' column."""
    y = encode_labels(manifest, task)
    if task.kind != "multilabel":
        return np.eye(len(task.class_names), dtype=np.int64)[y]
    none = (y.sum(axis=1) == 0).astype(np.int64)[:, None]
    return np.hstack([y, none])


def _strata(manifest: Manifest, task_name: str | None) -> np.ndarray:
    """The label matrix to stratify on; one constant column for a manifest without tasks
    (vessel datasets): then the split is grouped by patient only."""
    if task_name is None and not manifest.spec.tasks:
        return np.ones((len(manifest.table), 1), dtype=np.int64)
    _, task = manifest.task(task_name)
    manifest.require(*task.columns)
    return label_matrix(manifest, task)


def stratified_assign(
    counts: np.ndarray, sizes: np.ndarray, proportions: list[float], rng: np.random.Generator
) -> np.ndarray:
    """Assign groups to parts with the given proportions, balancing every label's count.

    `counts` is (G, C): how many images of each label a group has; `sizes` is (G,) images.
    """
    n_groups = len(counts)
    p = np.asarray(proportions, dtype=float) / sum(proportions)
    need = p[:, None] * counts.sum(axis=0)[None, :]
    room = p * sizes.sum()
    part = np.full(n_groups, -1)
    order = rng.permutation(n_groups)
    counts, sizes = counts[order], sizes[order]
    remaining = counts.sum(axis=0).astype(float)
    while (part < 0).any():
        open_rows = part < 0
        totals = np.where(remaining > 0, remaining, np.inf)
        label = int(np.argmin(totals)) if np.isfinite(totals).any() else -1
        rows = (
            np.flatnonzero(open_rows & (counts[:, label] > 0))
            if label >= 0
            else np.flatnonzero(open_rows)
        )
        for g in rows:
            if label >= 0:
                best = np.flatnonzero(need[:, label] == need[:, label].max())
            else:
                best = np.arange(len(p))
            best = best[room[best] == room[best].max()] if len(best) > 1 else best
            f = int(best[0] if len(best) == 1 else rng.choice(best))
            part[g] = f
            need[f] -= counts[g]
            room[f] -= sizes[g]
            remaining -= counts[g]
    out = np.empty(n_groups, dtype=int)
    out[order] = part
    return out


def make_splits(manifest: Manifest, cfg: SplitConfig) -> pd.DataFrame:
    """Build the split table for a manifest (see module docstring); deterministic for a seed."""
    k = cfg.folds
    if cfg.val_fraction * (k - 1) > 1:
        raise ConfigError(
            f"val_fraction={cfg.val_fraction} is too large for {k} folds: "
            f"at most 1/(folds-1) = {1 / (k - 1):.3f}"
        )
    fractions = sorted(set(cfg.fractions))
    if not fractions or fractions[0] <= 0 or fractions[-1] > 1:
        raise ConfigError(f"fractions must lie in (0, 1], got {cfg.fractions}")
    manifest.require("image_id", "patient_id")
    manifest.require_unique_ids()
    y = _strata(manifest, cfg.task)
    t = manifest.table
    if (t["patient_id"] == "").any():
        i = int(np.flatnonzero((t["patient_id"] == "").to_numpy())[0])
        raise ConfigError(
            f"{manifest.path} line {manifest.line(i)}: empty patient_id; every image needs one "
            "(use the image_id when the patient is unknown)"
        )
    patients, group = np.unique(t["patient_id"].to_numpy(), return_inverse=True)
    n_groups = len(patients)
    counts = np.zeros((n_groups, y.shape[1]), dtype=np.int64)
    np.add.at(counts, group, y)
    sizes = np.bincount(group, minlength=n_groups)
    rng = np.random.default_rng(cfg.seed)

    fold = np.zeros(n_groups, dtype=int)
    holdout = np.zeros(n_groups, dtype=bool)
    if cfg.test_fraction > 0:
        holdout = (
            stratified_assign(counts, sizes, [cfg.test_fraction, 1 - cfg.test_fraction], rng) == 0
        )
    cv = np.flatnonzero(~holdout)
    if len(cv) < k:
        raise ConfigError(f"{len(cv)} patients (after the held-out part) cannot fill {k} folds")
    fold[cv] = stratified_assign(counts[cv], sizes[cv], [1.0] * k, rng)
    fold[holdout] = -1

    val_fold = np.full(n_groups, -1)
    if cfg.val_fraction > 0:
        for j in range(k):
            members = np.flatnonzero(fold == j)
            others = [f for f in range(k) if f != j]
            props = [cfg.val_fraction] * len(others) + [1 - cfg.val_fraction * len(others)]
            part = stratified_assign(counts[members], sizes[members], props, rng)
            for i, other in enumerate(others):
                val_fold[members[part == i]] = other
        # Small sets: a share can round to no patient. Give such a fold one patient of the
        # commonest class from its training part, so that model selection stays possible.
        common = counts.sum(axis=0).argmax()
        for j in range(k):
            if (val_fold == j).any():
                continue
            free = np.flatnonzero((fold != j) & (fold >= 0) & (val_fold == -1))
            if len(free):
                best = free[counts[free, common] == counts[free, common].max()]
                val_fold[rng.choice(best)] = j

    # Nested fractions: a random order within each (fold, stratum); f takes the first ceil(f*n).
    frequency = y.sum(axis=0)
    rarest = np.where(counts > 0, frequency[None, :], np.inf).argmin(axis=1)
    quantile = np.zeros(n_groups)
    for j in range(-1, k):
        for s in np.unique(rarest[fold == j]):
            members = np.flatnonzero((fold == j) & (rarest == s))
            quantile[members[rng.permutation(len(members))]] = np.arange(len(members)) / len(
                members
            )

    table = pd.DataFrame(
        {
            "image_id": t["image_id"].to_numpy(),
            "patient_id": t["patient_id"].to_numpy(),
            "fold": fold[group],
            "holdout": holdout[group].astype(int),
            "val_fold": val_fold[group],
        }
    )
    for f in fractions:
        table[fraction_column(f)] = (quantile[group] < f - 1e-12).astype(int)
    for j in range(k):
        parts = fold_sets(table, j, fractions[0])
        empty = [p for p in ("train", "test") if not parts[p]]
        if cfg.val_fraction > 0 and not parts["val"]:
            empty.append("validation")
        if empty:
            raise ConfigError(
                f"fold {j} has an empty {' and '.join(empty)} part with {n_groups} patients; "
                "use fewer folds or smaller val/test fractions"
            )
    return table


def fraction_column(fraction: float) -> str:
    return f"frac_{fraction:g}"


def fold_sets(splits: pd.DataFrame, fold: int, fraction: float = 1.0) -> dict[str, list[str]]:
    """Image ids of the training, validation and test parts of one fold at one fraction."""
    col = fraction_column(fraction)
    if col not in splits.columns:
        have = [c.removeprefix("frac_") for c in splits.columns if c.startswith("frac_")]
        raise ConfigError(f"fraction {fraction:g} is not in the splits; available: {have}")
    if fold not in set(splits["fold"]):
        raise ConfigError(f"fold {fold} is not in the splits (folds: {sorted(set(splits.fold))})")
    in_cv = splits["fold"] >= 0
    train = in_cv & (splits["fold"] != fold) & (splits["val_fold"] != fold) & (splits[col] == 1)
    return {
        "train": splits.loc[train, "image_id"].tolist(),
        "val": splits.loc[splits["val_fold"] == fold, "image_id"].tolist(),
        "test": splits.loc[splits["fold"] == fold, "image_id"].tolist(),
        "holdout": splits.loc[splits["holdout"] == 1, "image_id"].tolist(),
    }


def summarise(splits: pd.DataFrame, manifest: Manifest, task_name: str | None) -> pd.DataFrame:
    """Per fold and fraction: part sizes and the smallest class count in the training part."""
    y = _strata(manifest, task_name)
    names = ["all"]
    if manifest.spec.tasks or task_name is not None:
        names = manifest.task(task_name)[1].class_names
        y = y[:, : len(names)]
    row_of = {iid: i for i, iid in enumerate(manifest.table["image_id"])}
    fractions = [float(c.removeprefix("frac_")) for c in splits.columns if c.startswith("frac_")]
    rows = []
    for k in sorted(f for f in set(splits["fold"]) if f >= 0):
        for f in fractions:
            parts = fold_sets(splits, k, f)
            per_class = y[[row_of[i] for i in parts["train"]]].sum(axis=0)
            rows.append(
                {
                    "fold": k,
                    "fraction": f,
                    "train": len(parts["train"]),
                    "val": len(parts["val"]),
                    "test": len(parts["test"]),
                    "min_class_train": int(per_class.min()) if len(per_class) else 0,
                    "classes_missing": ",".join(
                        c for c, n in zip(names, per_class, strict=True) if n == 0
                    ),
                }
            )
    return pd.DataFrame(rows)
