from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fundusfm.config.core import SplitConfig
from fundusfm.data.manifest import DatasetSpec, Manifest, TaskSpec, load_manifest
from fundusfm.data.splits import fold_sets, labelled_counts, make_splits, pools, summarise
from fundusfm.errors import ConfigError, DataError

FRACTIONS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0]


@pytest.fixture(scope="module")
def manifest(synth_large: Path):
    return load_manifest(synth_large)


@pytest.fixture(scope="module")
def splits(manifest) -> pd.DataFrame:
    return make_splits(manifest, SplitConfig(folds=5, fractions=FRACTIONS, task="disease"))


def test_no_patient_in_two_folds(splits):
    assert splits.groupby("patient_id")["fold"].nunique().max() == 1
    assert splits.groupby("patient_id")["val_fold"].nunique().max() == 1
    assert set(splits["fold"]) == {0, 1, 2, 3, 4}


def test_folds_balanced_and_stratified(splits, manifest):
    sizes = splits["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 0.25 * sizes.mean()
    disease = manifest.table.set_index("image_id").loc[splits.image_id, "disease"].to_numpy()
    overall = pd.Series(disease).value_counts(normalize=True)
    for k in range(5):
        share = pd.Series(disease[splits["fold"].to_numpy() == k]).value_counts(normalize=True)
        for cls, p in overall.items():
            assert abs(share.get(cls, 0) - p) < 0.08, (k, cls)


def test_fold_parts_disjoint_and_patient_clean(splits):
    patient = dict(zip(splits.image_id, splits.patient_id, strict=True))
    for k in range(5):
        parts = fold_sets(splits, k, 1.0)
        train, val, test = (set(parts[p]) for p in ("train", "val", "test"))
        assert not (train & val) and not (train & test) and not (val & test)
        assert len(train) + len(val) + len(test) == len(splits)
        train_p = {patient[i] for i in train}
        assert not train_p & {patient[i] for i in val | test}
        assert 0.05 <= len(val) / (len(train) + len(val)) <= 0.16


PREVALENCE = [0.50, 0.25, 0.12, 0.08, 0.05]


def prevalence_manifest(n_patients: int, seed: int = 0) -> Manifest:
    """One image per patient, five classes at 50/25/12/8/5%."""
    rng = np.random.default_rng(seed)
    counts = np.round(np.array(PREVALENCE) * n_patients).astype(int)
    counts[0] += n_patients - counts.sum()
    labels = rng.permutation(np.repeat(np.arange(5), counts))
    classes = [f"c{i}" for i in range(5)]
    table = pd.DataFrame(
        {
            "image_id": [f"p{i}" for i in range(n_patients)],
            "path": [f"p{i}.png" for i in range(n_patients)],
            "patient_id": [f"p{i}" for i in range(n_patients)],
            "eye": "left",
            "disease": [classes[k] for k in labels],
        }
    )
    task = TaskSpec(kind="multiclass", columns=["disease"], classes=classes)
    spec = DatasetSpec(name="prevalence", tasks={"disease": task})
    return Manifest(Path("prevalence.csv"), table, spec, Path("."))


@pytest.mark.parametrize("n_patients", [300, 1000, 3000])
def test_fractions_hold_their_share_and_the_pools_class_mix(n_patients):
    m = prevalence_manifest(n_patients)
    splits = make_splits(m, SplitConfig(folds=5, fractions=FRACTIONS, task="disease"))
    label = dict(zip(m.table.image_id, m.table.disease, strict=True))
    classes = [f"c{i}" for i in range(5)]
    for k in range(5):
        pool = splits.loc[pools(splits, k)["train"], "image_id"]
        pool_counts = pool.map(label).value_counts()
        previous: set[str] = set()
        for f in FRACTIONS[:-1]:
            train = fold_sets(splits, k, f)["train"]
            # within one patient per stratum (five strata) of f of this fold's own pool
            assert abs(len(train) - f * len(pool)) <= 5, (k, f, len(train), len(pool))
            counts = pd.Series(train).map(label).value_counts()
            for c in classes:  # the pool's class mix, each class kept
                assert abs(counts.get(c, 0) - f * pool_counts[c]) <= 1, (k, f, c)
                assert counts.get(c, 0) >= 1
            assert previous <= set(train)  # nested
            previous = set(train)
            summary = labelled_counts(splits, k, f)
            assert summary["train_images"] == len(train)
            assert summary["share"] == pytest.approx(len(train) / len(pool))


def test_validation_shrinks_with_the_fraction_unless_fixed():
    m = prevalence_manifest(1000)
    scaled = make_splits(m, SplitConfig(folds=5, fractions=FRACTIONS, task="disease"))
    fixed = make_splits(
        m, SplitConfig(folds=5, fractions=FRACTIONS, task="disease", val_policy="fixed")
    )
    for k in range(5):
        at_1 = fold_sets(scaled, k, 0.01)
        # at 1% validation is at most the training part plus one patient per class
        assert len(at_1["val"]) <= len(at_1["train"]) + 5
        full_val = fold_sets(scaled, k, 1.0)["val"]
        assert len(at_1["val"]) < len(full_val) / 10
        assert set(at_1["val"]) <= set(full_val)
        label = dict(zip(m.table.image_id, m.table.disease, strict=True))
        assert set(pd.Series(at_1["val"]).map(label)) == {f"c{i}" for i in range(5)}
        assert fold_sets(fixed, k, 0.01)["val"] == full_val  # fixed: never shrinks
        counts = labelled_counts(scaled, k, 0.01)
        assert counts["labelled_images"] == len(at_1["train"]) + len(at_1["val"])


def test_fractions_nested_stratified_with_every_class(splits, manifest):
    for k in range(5):
        previous: set[str] = set()
        for f in FRACTIONS:
            train = set(fold_sets(splits, k, f)["train"])
            assert previous <= train
            previous = train
    summary = summarise(splits, manifest, "disease")
    assert (summary["classes_missing"] == "").all()
    assert summary.groupby("fold")["share"].apply(lambda s: s.is_monotonic_increasing).all()


def test_old_splits_without_per_fold_fractions_are_refused(splits):
    old = splits[["image_id", "patient_id", "fold", "holdout", "val_fold"]].assign(frac_1=1)
    with pytest.raises(DataError, match="older fundusfm"):
        fold_sets(old, 0, 1.0)


def test_deterministic_for_seed(manifest, splits):
    cfg = SplitConfig(folds=5, fractions=FRACTIONS, task="disease")
    again = make_splits(manifest, cfg)
    pd.testing.assert_frame_equal(splits, again)
    other = make_splits(manifest, cfg.model_copy(update={"seed": 1}))
    assert not other["fold"].equals(splits["fold"])


def test_holdout_part(manifest):
    s = make_splits(manifest, SplitConfig(folds=3, fractions=[0.5, 1], test_fraction=0.2))
    held = s[s.holdout == 1]
    assert 0.12 < len(held) / len(s) < 0.28
    assert (held["fold"] == -1).all() and (held["val_fold"] == -1).all()
    assert not set(held.patient_id) & set(s[s.holdout == 0].patient_id)
    for k in range(3):
        parts = fold_sets(s, k, 1.0)
        assert not set(parts["train"]) & set(held.image_id)
        assert set(parts["holdout"]) == set(held.image_id)


def test_multilabel_task(manifest):
    s = make_splits(manifest, SplitConfig(folds=4, fractions=[0.1, 1], task="diseases"))
    assert s.groupby("patient_id")["fold"].nunique().max() == 1
    labels = manifest.table.set_index("image_id").loc[s.image_id, ["dr", "amd"]].astype(int)
    for k in range(4):
        in_fold = labels[s["fold"].to_numpy() == k]
        assert in_fold["dr"].sum() > 0 and in_fold["amd"].sum() > 0


def test_errors(manifest, splits):
    with pytest.raises(ConfigError, match="too large"):
        make_splits(manifest, SplitConfig(folds=5, val_fraction=0.3))
    with pytest.raises(DataError, match=r"fraction 0\.3 is not in the splits"):
        fold_sets(splits, 0, 0.3)
    with pytest.raises(ConfigError, match="task 'nope'"):
        make_splits(manifest, SplitConfig(task="nope"))
    small = manifest.table.head(6)
    m = type(manifest)(manifest.path, small, manifest.spec, manifest.root)
    with pytest.raises(DataError, match="cannot fill"):
        make_splits(m, SplitConfig(folds=5, task="abnormal"))


def test_rows_follow_manifest_order(manifest, splits):
    assert list(splits.image_id) == list(manifest.table.image_id)
    assert np.isin(splits["val_fold"], [-1, 0, 1, 2, 3, 4]).all()


def test_small_sets_keep_every_part_filled(manifest):
    small = manifest.table.head(20)  # 10 patients
    m = type(manifest)(manifest.path, small, manifest.spec, manifest.root)
    s = make_splits(m, SplitConfig(folds=5, fractions=[0.5, 1], val_fraction=0.1, task="abnormal"))
    for k in range(5):
        parts = fold_sets(s, k, 0.5)
        assert parts["train"] and parts["val"] and parts["test"]


def test_holdout_leaving_too_few_patients_is_an_error(manifest):
    small = manifest.table.head(10)  # 5 patients
    m = type(manifest)(manifest.path, small, manifest.spec, manifest.root)
    with pytest.raises(DataError, match="after the held-out part"):
        make_splits(m, SplitConfig(folds=5, test_fraction=0.2, val_fraction=0, task="abnormal"))
