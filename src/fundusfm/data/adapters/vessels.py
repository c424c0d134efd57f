"""Importers for public vessel-segmentation datasets: their layouts -> one manifest each.

`fundusfm data import drive|chase_db1|stare|hrf|fives ROOT --out manifest.csv` writes a manifest
whose rows carry the image (`path`, relative to ROOT), the vessel mask of the first observer
(`vessel_path`), the second observer's where the dataset has one (`vessel2_path`), the
field-of-view mask (`fov_path`), the official `split` (train/test) and `patient_id`/`eye`.
A dataset that ships no FOV masks gets them derived from the image (preprocessing's FOV
region, holes filled) and written beside the manifest under `fov/`; the manifest says
which with `fov_source`. HRF and FIVES also carry their diagnosis as a label column.

A copy where some images lack their manual mask (DRIVE's withheld test annotations, a
mirror missing files) imports whole: those rows keep their image, split and labels with an
empty `vessel_path` (classification can use them); segmentation training and scoring leave
them out and say how many. STARE lists only its 20 labelled images (the `ah` masks).

Layouts (see shared DATASETS.md, section 7):
    DRIVE      {training,test}/images/NN_{training,test}.tif, 1st_manual/NN_manual1.gif,
               2nd_manual/NN_manual2.gif (test only, palette 0/1), mask/NN_*_mask.gif
    CHASE_DB1  flat Image_NN{L,R}.jpg + _1stHO.png + _2ndHO.png (official zip), or the same
               split into {training,test}/{images,1st_manual,2nd_manual,mask}/; child NN is
               the patient. No official split in the flat zip: 01-10 train, 11-14 test.
    STARE      imNNNN.ppm(.gz), imNNNN.ah.ppm(.gz) (Hoover, observer 1), imNNNN.vk.ppm(.gz)
               (Kouznetsova, observer 2), anywhere under ROOT (the tars unpacked in one folder
               or several); optional all-mg-codes.txt adds the diagnosis (code 0 = normal).
               Every file is unpacked to PNG (labels binarised at 128) under `stare/` beside
               the manifest, the manifest's data root. No official split: the first 10
               labelled ids train, the other 10 test.
    HRF        images/NN_{h,g,dr}.jpg (any case), manual1/NN_x.tif, mask/NN_x_mask.tif
    FIVES      {train,test}/{Original,Ground truth}/N_{A,D,G,N}.png; names repeat across splits
"""

from __future__ import annotations

import gzip
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from fundusfm.data.decode import read_rgb
from fundusfm.data.manifest import DatasetSpec, TaskSpec, save_manifest
from fundusfm.data.preprocess import fov_mask
from fundusfm.errors import ConfigError, DataError, NoFieldOfView

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".gif", ".ppm", ".bmp"}


def _files(folder: Path) -> dict[str, Path]:
    """Image files of a folder by lower-case stem (extensions matched case-insensitively)."""
    if not folder.is_dir():
        return {}
    return {
        p.stem.lower(): p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    }


def derive_fov(image: Path, threshold: float = 0.06) -> np.ndarray:
    """Field-of-view mask of a fundus photograph: preprocessing's FOV region, holes filled."""
    try:
        region = fov_mask(read_rgb(image).max(axis=2), threshold)
    except NoFieldOfView as exc:
        raise DataError(f"{image}: {exc}") from exc
    return ndimage.binary_fill_holes(region)


def _rel(path: Path | None, root: Path) -> str:
    """Relative to ROOT, or absolute for files written beside the manifest."""
    if path is None:
        return ""
    path = path.resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _drive(root: Path) -> list[dict]:
    rows = []
    for split, folder in (("train", "training"), ("test", "test")):
        for stem, image in _files(root / folder / "images").items():
            num = stem.split("_")[0]
            first = _files(root / folder / "1st_manual").get(f"{num}_manual1")
            second = _files(root / folder / "2nd_manual").get(f"{num}_manual2")
            fov = _files(root / folder / "mask").get(f"{stem}_mask")
            rows.append(
                {
                    "image_id": f"drive_{stem}",
                    "image": image,
                    "vessel": first,
                    "vessel2": second,
                    "fov": fov,
                    "split": split,
                    "patient_id": f"drive_{num}",
                    "eye": "unknown",
                }
            )
    return rows


def _chase(root: Path) -> list[dict]:
    rows = []
    layouts = [(root, None)] + [(root / s, s) for s in ("training", "test")]
    for base, split_dir in layouts:
        images = _files(base / "images") if split_dir else _files(base)
        manual1 = _files(base / "1st_manual") if split_dir else images
        manual2 = _files(base / "2nd_manual") if split_dir else images
        masks = _files(base / "mask") if split_dir else {}
        for stem, image in images.items():
            m = re.fullmatch(r"image_(\d+)([lr])", stem)
            if not m:
                continue
            child, side = int(m.group(1)), m.group(2)
            split = {"training": "train", "test": "test"}.get(
                split_dir or "", "train" if child <= 10 else "test"
            )
            rows.append(
                {
                    "image_id": f"chase_{stem}",
                    "image": image,
                    "vessel": manual1.get(f"{stem}_1stho"),
                    "vessel2": manual2.get(f"{stem}_2ndho"),
                    "fov": masks.get(stem),
                    "split": split,
                    "patient_id": f"chase_{child:02d}",
                    "eye": "left" if side == "l" else "right",
                }
            )
    return rows


def _hrf(root: Path) -> list[dict]:
    names = {"h": "healthy", "g": "glaucoma", "dr": "diabetic_retinopathy"}
    rows = []
    for stem, image in _files(root / "images").items():
        m = re.fullmatch(r"(\d+)_(h|g|dr)", stem)
        if not m:
            continue
        rows.append(
            {
                "image_id": f"hrf_{stem}",
                "image": image,
                "vessel": _files(root / "manual1").get(stem),
                "vessel2": None,
                "fov": _files(root / "mask").get(f"{stem}_mask"),
                "split": "all",
                "patient_id": f"hrf_{stem}",
                "eye": "unknown",
                "diagnosis": names[m.group(2)],
                "abnormal": int(m.group(2) != "h"),
            }
        )
    return rows


def _fives(root: Path) -> list[dict]:
    names = {"a": "amd", "d": "diabetic_retinopathy", "g": "glaucoma", "n": "normal"}
    marker = next(root.rglob("Original"), None)  # mirrors add a wrapping folder
    base = marker.parent.parent if marker is not None else root
    rows = []
    for split in ("train", "test"):
        truth = _files(base / split / "Ground truth")
        for stem, image in _files(base / split / "Original").items():
            m = re.fullmatch(r"(\d+)_([adgn])", stem)
            if not m:
                continue
            rows.append(
                {
                    "image_id": f"fives_{split}_{stem}",
                    "image": image,
                    "vessel": truth.get(stem),
                    "vessel2": None,
                    "fov": None,
                    "split": split,
                    "patient_id": f"fives_{split}_{stem}",
                    "eye": "unknown",
                    "diagnosis": names[m.group(2)],
                    "abnormal": int(m.group(2) != "n"),
                }
            )
    return rows


STARE_CODES = {
    "0": "normal",
    "1": "hollenhorst_emboli",
    "2": "brao",
    "3": "cilioretinal_artery_occlusion",
    "4": "brvo",
    "5": "crvo",
    "6": "hemi_crvo",
    "7": "background_dr",
    "8": "proliferative_dr",
    "9": "arteriosclerotic_retinopathy",
    "10": "hypertensive_retinopathy",
    "11": "coats",
    "12": "macroaneurysm",
    "13": "cnv",
    "14": "histoplasmosis",
}


def _stare_codes(root: Path) -> dict[str, list[str]]:
    """all-mg-codes.txt: id, then the diagnosis codes, then free text (tab-separated)."""
    found = next(root.rglob("all-mg-codes.txt"), None)
    codes: dict[str, list[str]] = {}
    if found is None:
        return codes
    for line in found.read_text(errors="replace").splitlines():
        tokens = line.split()
        if tokens and re.fullmatch(r"im\d{4}", tokens[0]):
            numbers = []
            for token in tokens[1:]:  # the leading numbers are the codes, then free text
                if not token.isdigit():
                    break
                numbers.append(token)
            if numbers:  # no code: the diagnosis stays unknown (not "abnormal")
                codes[tokens[0]] = numbers
    return codes


def _stare_file(path: Path, out_dir: Path, label: bool) -> Path:
    """A PNG copy of a STARE file beside the manifest: gunzipped, a label binarised at 128."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / (path.name.removesuffix(".gz").removesuffix(".ppm") + ".png")
    if not target.is_file():
        data = gzip.decompress(path.read_bytes()) if path.suffix.lower() == ".gz" else None
        img = Image.open(io.BytesIO(data) if data is not None else path)
        arr = np.asarray(img.convert("L")) >= 128 if label else np.asarray(img.convert("RGB"))
        Image.fromarray(arr).save(target)
    return target


def _stare(root: Path, out_dir: Path) -> list[dict]:
    files: dict[tuple[str, str], Path] = {}
    for p in sorted(root.rglob("im*")):
        m = re.fullmatch(r"(im\d{4})(?:\.(ah|vk))?\.ppm(?:\.gz)?", p.name.lower())
        if m and p.is_file():
            files.setdefault((m.group(1), m.group(2) or "image"), p)
    labelled = sorted({i for i, kind in files if kind == "ah" and (i, "image") in files})
    codes = _stare_codes(root)
    rows = []
    for k, iid in enumerate(labelled):
        second = files.get((iid, "vk"))
        row = {
            "image_id": f"stare_{iid}",
            "image": _stare_file(files[(iid, "image")], out_dir, label=False),
            "vessel": _stare_file(files[(iid, "ah")], out_dir, label=True),
            "vessel2": _stare_file(second, out_dir, label=True) if second else None,
            "fov": None,
            "split": "train" if k < len(labelled) // 2 else "test",
            "patient_id": f"stare_{iid}",
            "eye": "unknown",
        }
        if iid in codes:
            names = [STARE_CODES.get(c, f"code_{c}") for c in codes[iid]]
            row.update(diagnosis="+".join(names), abnormal=int(codes[iid] != ["0"]))
        rows.append(row)
    return rows


IMPORTERS = {
    "drive": _drive,
    "chase_db1": _chase,
    "stare": _stare,
    "hrf": _hrf,
    "fives": _fives,
}


def import_vessels(name: str, root: Path, out: Path) -> Path:
    """Write the manifest (and derived FOV masks) of a vessel dataset; returns its path."""
    if name not in IMPORTERS:
        raise ConfigError(f"unknown vessel dataset {name!r}; choose one of {list(IMPORTERS)}")
    root, out = Path(root).resolve(), Path(out)
    if name == "stare":  # unpacked PNG copies beside the manifest become the data root
        rows = _stare(root, out.parent / "stare")
        root = (out.parent / "stare").resolve()
    else:
        rows = IMPORTERS[name](root)
    if not rows:
        raise DataError(f"no {name} images found under {root} (see the layouts in --help)")
    fov_dir = out.parent / "fov" / name
    table = []
    for r in rows:
        fov, source = r["fov"], "dataset"
        if fov is None:
            fov_dir.mkdir(parents=True, exist_ok=True)
            fov = fov_dir / f"{r['image_id']}.png"
            if not fov.is_file():
                Image.fromarray(derive_fov(r["image"])).save(fov)
            source = "derived"
        row = {
            "image_id": r["image_id"],
            "path": _rel(r["image"], root),
            "patient_id": r["patient_id"],
            "eye": r["eye"],
            "split": r["split"],
            "vessel_path": _rel(r["vessel"], root),
            "vessel2_path": _rel(r["vessel2"], root),
            "fov_path": _rel(fov, root),
            "fov_source": source,
            "source": name,
        }
        if "diagnosis" in r:
            row.update(diagnosis=r["diagnosis"], abnormal=str(r["abnormal"]))
        table.append(row)
    frame = pd.DataFrame(table)
    tasks = {}
    if "diagnosis" in frame and frame["diagnosis"].notna().all():
        tasks["abnormal"] = TaskSpec(kind="binary", columns=["abnormal"])
        if name != "stare":  # STARE lists code combinations, not one class per image
            classes = sorted(frame["diagnosis"].unique())
            tasks["diagnosis"] = TaskSpec(kind="multiclass", columns=["diagnosis"], classes=classes)
    spec = DatasetSpec(name=name, root=str(root), tasks=tasks)
    return save_manifest(frame, spec, out)
