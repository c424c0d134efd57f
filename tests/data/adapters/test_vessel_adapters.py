"""Vessel dataset importers on small fake trees laid out like the real downloads."""

import gzip
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fundusfm.config.core import SplitConfig
from fundusfm.data.adapters.registry import import_dataset
from fundusfm.data.adapters.vessels import derive_fov, import_vessels
from fundusfm.data.decode import read_mask
from fundusfm.data.manifest import load_manifest
from fundusfm.data.splits import make_splits
from fundusfm.data.validate import check_manifest
from fundusfm.errors import ConfigError, DataError
from tests.conftest import SHARED_DATA
from tests.fakes import camera_frame, dimmed, drive_tree, fundus, mask


def test_drive(tmp_path: Path):
    root = tmp_path / "DRIVE"
    for split, nums in (("training", [21, 22]), ("test", [1, 2])):
        for n in nums:
            fundus(root / split / "images" / f"{n:02d}_{split}.tif", seed=n)
            mask(root / split / "1st_manual" / f"{n:02d}_manual1.gif")
            mask(root / split / "mask" / f"{n:02d}_{split}_mask.gif")
            if split == "test":
                mask(root / split / "2nd_manual" / f"{n:02d}_manual2.gif", mode="P", value=1)
    manifest = import_vessels("drive", root, tmp_path / "m" / "drive.csv")
    t = load_manifest(manifest).table
    assert len(t) == 4 and sorted(t.split.value_counts().items()) == [("test", 2), ("train", 2)]
    row = t.set_index("image_id").loc["drive_01_test"]
    assert row.vessel2_path == "test/2nd_manual/01_manual2.gif" and row.fov_source == "dataset"
    assert read_mask(root / row.vessel2_path).sum() == 400  # palette 0/1 read as foreground
    assert check_manifest(load_manifest(manifest), progress=False).problems == []
    # no task declared: k-fold splits are grouped by patient only
    splits = make_splits(load_manifest(manifest), SplitConfig(folds=2, val_fraction=0.0))
    assert sorted(splits.fold.value_counts().to_list()) == [2, 2]


def test_chase_flat_official_zip_with_derived_fov(tmp_path: Path):
    root = tmp_path / "CHASEDB1"
    for child in (1, 11):
        for side in "LR":
            stem = f"Image_{child:02d}{side}"
            fundus(root / f"{stem}.jpg", seed=child)
            mask(root / f"{stem}_1stHO.png")
            mask(root / f"{stem}_2ndHO.png")
    manifest = import_vessels("chase_db1", root, tmp_path / "m" / "chase.csv")
    t = load_manifest(manifest).table.set_index("image_id")
    assert len(t) == 4
    assert (
        t.loc["chase_image_01l", "split"] == "train" and t.loc["chase_image_11r", "split"] == "test"
    )
    assert t.loc["chase_image_01l", "patient_id"] == t.loc["chase_image_01r", "patient_id"]
    assert t.loc["chase_image_01r", "eye"] == "right"
    assert (t.fov_source == "derived").all()
    fov = read_mask(Path(t.loc["chase_image_01l", "fov_path"]))
    assert 0.5 < fov.mean() < 0.9  # the disc of the fake photo, not the whole frame


def test_fives_names_repeat_across_splits_and_rgb_truth(tmp_path: Path):
    root = tmp_path / "FIVES" / "FIVES A Fundus Image Dataset"
    for split in ("train", "test"):
        for name in ("1_A", "451_N"):
            fundus(root / split / "Original" / f"{name}.png")
            mask(root / split / "Ground truth" / f"{name}.png", mode="RGB")
    manifest = import_vessels("fives", tmp_path / "FIVES", tmp_path / "m" / "fives.csv")
    m = load_manifest(manifest)
    assert len(set(m.table.image_id)) == 4
    assert set(m.table.diagnosis) == {"amd", "normal"}
    assert m.table.set_index("image_id").loc["fives_test_451_n", "abnormal"] == "0"
    assert m.task("diagnosis")[1].kind == "multiclass"
    assert read_mask(root / "train" / "Ground truth" / "1_A.png").sum() == 400


def test_hrf_case_insensitive_and_labels(tmp_path: Path):
    root = tmp_path / "HRF"
    for stem, ext in (("01_h", ".jpg"), ("01_dr", ".JPG"), ("02_g", ".jpg")):
        fundus(root / "images" / f"{stem}{ext}")
        mask(root / "manual1" / f"{stem}.tif")
        mask(root / "mask" / f"{stem}_mask.tif")
    t = load_manifest(import_vessels("hrf", root, tmp_path / "hrf.csv")).table
    assert dict(zip(t.image_id, t.abnormal, strict=True)) == {
        "hrf_01_dr": "1",
        "hrf_01_h": "0",
        "hrf_02_g": "1",
    }


def _gz_ppm(path: Path, arr: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="PPM")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(buffer.getvalue()))


def test_stare_gzipped_ppm_non_binary_labels_and_codes(tmp_path: Path):
    root = tmp_path / "STARE"
    ids = ["im0001", "im0002", "im0044", "im0077"]
    for k, iid in enumerate(ids):
        fundus(tmp_path / "tmp.png", seed=k)
        _gz_ppm(
            root / "stare-images" / f"{iid}.ppm.gz", np.asarray(Image.open(tmp_path / "tmp.png"))
        )
        label = np.zeros((60, 64, 3), np.uint8)
        label[20:30, 10:50] = 200  # labels are not strictly 0/255
        label[40:42, 10:50] = 90  # below 128: background
        _gz_ppm(root / "labels-ah" / f"{iid}.ah.ppm.gz", label)
        if k < 2:
            _gz_ppm(root / "labels-vk" / f"{iid}.vk.ppm.gz", label)
    _gz_ppm(root / "stare-images" / "im0100.ppm.gz", np.zeros((60, 64, 3), np.uint8))  # unlabelled
    (root / "all-mg-codes.txt").write_text(
        "im0001\t7 10\tBackground Diabetic Retinopathy\nim0002\t0\tNormal\n"
        "im0044\t4\tBRVO\nim0077\t0\tNormal\n"
    )
    m = load_manifest(import_vessels("stare", root, tmp_path / "m" / "stare.csv"))
    t = m.table.set_index("image_id")
    assert list(t.index) == [f"stare_{i}" for i in ids]  # the unlabelled image is left out
    assert list(t.split) == ["train", "train", "test", "test"]
    assert (t.vessel2_path != "").sum() == 2 and (t.fov_source == "derived").all()
    assert dict(t.abnormal) == {
        "stare_im0001": "1",
        "stare_im0002": "0",
        "stare_im0044": "1",
        "stare_im0077": "0",
    }
    assert t.loc["stare_im0001", "diagnosis"] == "background_dr+hypertensive_retinopathy"
    vessel = read_mask(m.image_path(t.loc["stare_im0001", "vessel_path"]))
    assert vessel.sum() == 400 and not vessel[41, 20]
    assert m.task("abnormal")[1].kind == "binary"
    assert check_manifest(m, progress=False).problems == []


def test_a_drive_copy_missing_masks_imports_every_image(tmp_path: Path):
    root = drive_tree(tmp_path / "DRIVE", missing=(22, 2))
    path, summary, notes = import_dataset("drive", root, tmp_path / "m" / "drive.csv")
    m = load_manifest(path)
    t = m.table.set_index("image_id")
    assert len(t) == 4 and summary.startswith("4 images")
    assert t.loc[["drive_22_training", "drive_02_test"], "vessel_path"].tolist() == ["", ""]
    assert t.loc["drive_21_training", "vessel_path"] == "training/1st_manual/21_manual1.gif"
    assert (t.fov_source == "dataset").all()  # the rows keep everything else
    assert notes == [
        "2 images have no vessel mask: kept (labels, classification), left out of "
        "segmentation training and scoring"
    ]
    assert check_manifest(m, progress=False).problems == []


def test_chase_and_hrf_copies_missing_masks_keep_rows_and_labels(tmp_path: Path):
    chase = tmp_path / "CHASEDB1"
    for stem in ("Image_01L", "Image_01R", "Image_11L"):
        fundus(chase / f"{stem}.jpg", seed=1)
        if stem != "Image_01R":
            mask(chase / f"{stem}_1stHO.png")
    t = load_manifest(import_vessels("chase_db1", chase, tmp_path / "c.csv")).table
    assert dict(zip(t.image_id, t.vessel_path != "", strict=True)) == {
        "chase_image_01l": True,
        "chase_image_01r": False,
        "chase_image_11l": True,
    }
    hrf = tmp_path / "HRF"
    for seed, stem in enumerate(("01_h", "01_g")):
        fundus(hrf / "images" / f"{stem}.jpg", seed=seed)
        mask(hrf / "mask" / f"{stem}_mask.tif")
    mask(hrf / "manual1" / "01_h.tif")
    m = load_manifest(import_vessels("hrf", hrf, tmp_path / "hrf.csv"))
    row = m.table.set_index("image_id").loc["hrf_01_g"]
    assert (row.vessel_path, row.diagnosis, row.abnormal) == ("", "glaucoma", "1")
    assert m.task("abnormal")[1].kind == "binary"  # the unmasked row serves classification
    assert check_manifest(m, progress=False).problems == []


def test_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="choose one of"):
        import_vessels("messidor", tmp_path, tmp_path / "x.csv")
    with pytest.raises(DataError, match="no drive images"):
        import_vessels("drive", tmp_path, tmp_path / "x.csv")


@pytest.mark.skipif(not (SHARED_DATA / "DRIVE").is_dir(), reason="real data not found")
def test_real_drive_and_chase_and_derived_fov_agreement(tmp_path: Path):
    drive = load_manifest(import_vessels("drive", SHARED_DATA / "DRIVE", tmp_path / "d.csv"))
    assert len(drive.table) == 40 and (drive.table.vessel2_path != "").sum() == 20
    chase = load_manifest(
        import_vessels("chase_db1", SHARED_DATA / "CHASE_DB1", tmp_path / "c.csv")
    )
    assert len(chase.table) == 28 and chase.table.patient_id.nunique() == 14
    row = drive.table.iloc[0]
    ours, official = derive_fov(drive.root / row.path), read_mask(drive.root / row.fov_path)
    assert (ours & official).sum() / (ours | official).sum() > 0.97
    assert pd.Series(chase.table.split).value_counts().to_dict() == {"train": 14, "test": 14}


def test_derived_fov_of_a_dim_labelled_photograph(tmp_path: Path):
    # the same rule as the crop box: noise of a dark photograph and a label are not FOV
    frame, (x0, y0, x1, y1) = camera_frame(5)
    yy, xx = np.mgrid[: frame.shape[0], : frame.shape[1]]
    cx, cy, r = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, (x1 - x0) / 2
    truth = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    dim = dimmed(frame, 0.15)  # peak ~35 grey levels, 0-3 of noise everywhere
    dim[2:14, 2:40] = 255  # a burnt-in label in the black band
    Image.fromarray(dim).save(tmp_path / "dim.png")
    fov = derive_fov(tmp_path / "dim.png")
    assert (fov & truth).sum() / (fov | truth).sum() > 0.97
    assert not fov[2:14, 2:40].any()
