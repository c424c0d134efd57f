"""Patient-grouped, stratified k-fold splits with validation parts and nested labelled fractions.

`splits.csv` has one row per image:

    image_id, patient_id   the image and the patient it is grouped by
    fold                   0..K-1: the cross-validation fold whose test part holds the image;
                           -1 for images in the held-out part
    holdout                1 if the image is in the optional held-out part (never trained on)
    val_fold               k if the image belongs to the validation part of fold k, else -1
    frac_<f>_fold<k>       1 if the image is labelled (trained or validated on) in fold k at
                           fraction f (e.g. frac_0.1_fold3)

For fold k: test = `fold == k`; validation at fraction f = `val_fold == k and
frac_<f>_fold<k> == 1`; training at fraction f = `fold not in (k, -1) and val_fold != k and
frac_<f>_fold<k> == 1`. `fold_sets` spells this out.

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
3. Patients are ranked at random once within each stratum (a patient's rarest label)
   across all cross-validation patients. Fraction f of fold k takes, per stratum, the
   round(f * n) best-ranked patients of fold k's own training pool (n: the stratum's patients
   in that pool), at least one; a label the pool has but the choice lacks (multilabel) adds
   its best-ranked patient. So for every fold and fraction the training part holds f of its
   pool to within one patient per stratum, with the pool's class mix (each class keeps at
   least one patient where it has any); fractions are nested (1% inside 5% inside ...) and
   deterministic. With `val_policy: scaled` (the default) the validation part shrinks by the
   same rule, so a 1% cell selects its epoch, probe and threshold on about 1% of the
   validation labels; `fixed` keeps the whole validation part at every fraction.
   `summarise` (written beside splits.csv as `<name>.summary.csv`) gives the realised
   shares and class counts of every fold x fraction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fundusfm.config.core import SplitConfig, dump_config
from fundusfm.data.manifest import Manifest, TaskSpec, encode_labels, load_manifest
from fundusfm.errors import ConfigError, DataError
from fundusfm.io import write_csv


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


def _check_settings(cfg: SplitConfig) -> list[float]:
    k = cfg.folds
    if cfg.val_fraction * (k - 1) > 1:
        raise ConfigError(
            f"val_fraction={cfg.val_fraction} is too large for {k} folds: "
            f"at most 1/(folds-1) = {1 / (k - 1):.3f}"
        )
    fractions = sorted(set(cfg.fractions))
    if not fractions or fractions[0] <= 0 or fractions[-1] > 1:
        raise ConfigError(f"fractions must lie in (0, 1], got {cfg.fractions}")
    return fractions


def _patients(manifest: Manifest, cfg: SplitConfig):
    """Patients, each image's patient, label counts and image counts per patient."""
    manifest.require("image_id", "patient_id")
    manifest.require_unique_ids()
    y = _strata(manifest, cfg.task)
    t = manifest.table
    if (t["patient_id"] == "").any():
        i = int(np.flatnonzero((t["patient_id"] == "").to_numpy())[0])
        raise DataError(
            f"{manifest.path} line {manifest.line(i)}: empty patient_id; every image needs one "
            "(use the image_id when the patient is unknown)"
        )
    patients, group = np.unique(t["patient_id"].to_numpy(), return_inverse=True)
    counts = np.zeros((len(patients), y.shape[1]), dtype=np.int64)
    np.add.at(counts, group, y)
    return patients, group, counts, np.bincount(group, minlength=len(patients))


def _folds(counts, sizes, cfg: SplitConfig, rng) -> tuple[np.ndarray, np.ndarray]:
    """Each patient's fold (-1: held out) and whether it is in the held-out test part."""
    k, n_groups = cfg.folds, len(sizes)
    fold = np.zeros(n_groups, dtype=int)
    holdout = np.zeros(n_groups, dtype=bool)
    if cfg.test_fraction > 0:
        holdout = (
            stratified_assign(counts, sizes, [cfg.test_fraction, 1 - cfg.test_fraction], rng) == 0
        )
    cv = np.flatnonzero(~holdout)
    if len(cv) < k:
        raise DataError(f"{len(cv)} patients (after the held-out part) cannot fill {k} folds")
    fold[cv] = stratified_assign(counts[cv], sizes[cv], [1.0] * k, rng)
    fold[holdout] = -1
    return fold, holdout


def _validation_folds(counts, sizes, fold, cfg: SplitConfig, rng) -> np.ndarray:
    """The fold whose validation part each patient is in (-1: none)."""
    k = cfg.folds
    val_fold = np.full(len(sizes), -1)
    if cfg.val_fraction <= 0:
        return val_fold
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
    return val_fold


def _check_parts(table: pd.DataFrame, cfg: SplitConfig, smallest: float, n_groups: int) -> None:
    for j in range(cfg.folds):
        parts = fold_sets(table, j, smallest)
        empty = [p for p in ("train", "test") if not parts[p]]
        if cfg.val_fraction > 0 and not parts["val"]:
            empty.append("validation")
        if empty:
            raise DataError(
                f"fold {j} has an empty {' and '.join(empty)} part with {n_groups} patients; "
                "use fewer folds or smaller val/test fractions"
            )


def make_splits(manifest: Manifest, cfg: SplitConfig) -> pd.DataFrame:
    """Build the split table for a manifest (see module docstring); deterministic for a seed."""
    fractions = _check_settings(cfg)
    patients, group, counts, sizes = _patients(manifest, cfg)
    rng = np.random.default_rng(cfg.seed)
    fold, holdout = _folds(counts, sizes, cfg, rng)
    val_fold = _validation_folds(counts, sizes, fold, cfg, rng)
    t = manifest.table
    table = pd.DataFrame(
        {
            "image_id": t["image_id"].to_numpy(),
            "patient_id": t["patient_id"].to_numpy(),
            "fold": fold[group],
            "holdout": holdout[group].astype(int),
            "val_fold": val_fold[group],
        }
    )
    labelled = labelled_fractions(counts, fold, val_fold, fractions, cfg.val_policy, rng)
    for (f, j), chosen in labelled.items():
        table[fraction_column(f, j)] = chosen[group].astype(int)
    _check_parts(table, cfg, fractions[0], len(patients))
    return table


def stratum_of(counts: np.ndarray) -> np.ndarray:
    """Each patient's stratum: the rarest label it has (over all patients)."""
    frequency = counts.sum(axis=0)
    return np.where(counts > 0, frequency[None, :], np.inf).argmin(axis=1)


def take_fraction(
    pool: np.ndarray, fraction: float, stratum: np.ndarray, rank: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Patients (a bool mask) of the labelled fraction of one pool (a bool mask).

    Per stratum, the `round(fraction * n)` best-ranked patients of the pool, at least one;
    then every label the pool has but the choice lacks gets its best-ranked patient (only
    possible for multilabel tasks, whose strata are the rarest label of each patient).
    """
    chosen = np.zeros(len(pool), dtype=bool)
    for s in np.unique(stratum[pool]):
        members = np.flatnonzero(pool & (stratum == s))
        keep = (
            len(members) if fraction >= 1 else max(1, int(np.floor(fraction * len(members) + 0.5)))
        )
        chosen[members[np.argsort(rank[members], kind="stable")[:keep]]] = True
    for label in np.flatnonzero(counts[pool].sum(axis=0) > 0):
        if not counts[chosen, label].any():
            having = np.flatnonzero(pool & (counts[:, label] > 0))
            chosen[having[np.argmin(rank[having])]] = True
    return chosen


def labelled_fractions(
    counts: np.ndarray,
    fold: np.ndarray,
    val_fold: np.ndarray,
    fractions: list[float],
    val_policy: str,
    rng: np.random.Generator,
) -> dict[tuple[float, int], np.ndarray]:
    """(fraction, fold) -> patients labelled in that fold's training or validation part.

    Patients are ranked once within each stratum across all cross-validation patients;
    each fold then takes the fraction of its own training pool (and, with `scaled`, of its
    validation pool) by that rank, so fractions are nested, deterministic and the share
    they claim of every fold's pool.
    """
    stratum = stratum_of(counts)
    rank = np.zeros(len(counts))
    for s in np.unique(stratum):
        members = np.flatnonzero((stratum == s) & (fold >= 0))
        rank[members[rng.permutation(len(members))]] = np.arange(len(members)) / len(members)
    out = {}
    for j in sorted(set(fold[fold >= 0].tolist())):
        pools = {
            "train": (fold >= 0) & (fold != j) & (val_fold != j),
            "val": val_fold == j,
        }
        previous = {role: np.zeros(len(counts), dtype=bool) for role in pools}
        for f in fractions:
            labelled = np.zeros(len(counts), dtype=bool)
            for role, pool in pools.items():
                if role == "val" and val_policy == "fixed":
                    part = pool
                else:
                    part = take_fraction(pool, f, stratum, rank, counts) | previous[role]
                previous[role] = part
                labelled |= part
            out[(f, j)] = labelled
    return out


def fraction_column(fraction: float, fold: int) -> str:
    return f"frac_{fraction:g}_fold{fold}"


def fractions_of(splits: pd.DataFrame) -> list[float]:
    """The labelled fractions a split table holds."""
    found = {c.split("_")[1] for c in splits.columns if c.startswith("frac_") and "_fold" in c}
    return sorted(float(f) for f in found)


def _check_columns(splits: pd.DataFrame, fold: int, fraction: float) -> str:
    if any(c.startswith("frac_") and "_fold" not in c for c in splits.columns):
        raise DataError(
            "these splits were made by an older fundusfm, whose fractions held more than their "
            "share of small classes; make them again with `fundusfm split`"
        )
    if fold not in set(splits["fold"]):
        raise DataError(f"fold {fold} is not in the splits (folds: {sorted(set(splits.fold))})")
    col = fraction_column(fraction, fold)
    if col not in splits.columns:
        have = [f"{f:g}" for f in fractions_of(splits)]
        raise DataError(f"fraction {fraction:g} is not in the splits; available: {have}")
    return col


def pools(splits: pd.DataFrame, fold: int) -> dict[str, pd.Series]:
    """Row masks of one fold's training pool (all fractions draw from it), validation pool
    (at full fraction) and test part."""
    in_cv = splits["fold"] >= 0
    return {
        "train": in_cv & (splits["fold"] != fold) & (splits["val_fold"] != fold),
        "val": splits["val_fold"] == fold,
        "test": splits["fold"] == fold,
    }


def fold_sets(splits: pd.DataFrame, fold: int, fraction: float = 1.0) -> dict[str, list[str]]:
    """Image ids of the training, validation and test parts of one fold at one fraction."""
    labelled = splits[_check_columns(splits, fold, fraction)] == 1
    pool = pools(splits, fold)
    return {
        "train": splits.loc[pool["train"] & labelled, "image_id"].tolist(),
        "val": splits.loc[pool["val"] & labelled, "image_id"].tolist(),
        "test": splits.loc[pool["test"], "image_id"].tolist(),
        "holdout": splits.loc[splits["holdout"] == 1, "image_id"].tolist(),
    }


def labelled_counts(splits: pd.DataFrame, fold: int, fraction: float) -> dict:
    """What one fold at one fraction trains and selects on, against its pools: the numbers
    every cell's metrics.json and the report state (share = of the training pool's images)."""
    labelled = splits[_check_columns(splits, fold, fraction)] == 1
    pool = pools(splits, fold)
    out: dict = {"fraction_nominal": float(fraction)}
    for role in ("train", "val"):
        part = pool[role] & labelled
        out[f"{role}_images"] = int(part.sum())
        out[f"{role}_patients"] = int(splits.loc[part, "patient_id"].nunique())
        out[f"{role}_pool_images"] = int(pool[role].sum())
        out[f"{role}_pool_patients"] = int(splits.loc[pool[role], "patient_id"].nunique())
    out["labelled_images"] = out["train_images"] + out["val_images"]
    out["share"] = out["train_images"] / max(1, out["train_pool_images"])
    out["share_patients"] = out["train_patients"] / max(1, out["train_pool_patients"])
    return out


def summarise(splits: pd.DataFrame, manifest: Manifest, task_name: str | None) -> pd.DataFrame:
    """Per fold and fraction: the realised share of the training pool, part sizes, and the
    images of each class in the training and validation parts (the split's sidecar table)."""
    y = _strata(manifest, task_name)
    names = ["all"]
    if manifest.spec.tasks or task_name is not None:
        names = manifest.task(task_name)[1].class_names
        y = y[:, : len(names)]
    row_of = {iid: i for i, iid in enumerate(manifest.table["image_id"])}
    rows = []
    for k in sorted(f for f in set(splits["fold"]) if f >= 0):
        for f in fractions_of(splits):
            parts = fold_sets(splits, k, f)
            counts = labelled_counts(splits, k, f)
            row = {"fold": k, "fraction": f, "share": counts["share"], **counts}
            row.pop("fraction_nominal")
            row["test_images"] = len(parts["test"])
            per_class = {}
            for role in ("train", "val"):
                per_class[role] = y[[row_of[i] for i in parts[role]]].sum(axis=0)
                row.update(
                    {f"{role}_{c}": int(n) for c, n in zip(names, per_class[role], strict=True)}
                )
            row["classes_missing"] = ",".join(
                c for c, n in zip(names, per_class["train"], strict=True) if n == 0
            )
            rows.append(row)
    return pd.DataFrame(rows)


def write_splits(manifest: Path, cfg: SplitConfig, out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`fundusfm split`: splits.csv, its per-fold summary and the settings beside it."""
    m = load_manifest(manifest)
    table = make_splits(m, cfg)
    summary = summarise(table, m, cfg.task)
    write_csv(out, table)
    write_csv(Path(out).with_suffix(".summary.csv"), summary)
    dump_config(cfg, Path(out).with_suffix(".config.yaml"))
    return table, summary
