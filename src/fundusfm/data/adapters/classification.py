"""Disease-classification datasets: the 4-class eye-disease set, JSIEC, RFMiD and ODIR-5K.

Layouts, label semantics and quirks follow shared DATASETS.md; each adapter registers
itself with `common.importer`."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from fundusfm.data.adapters.common import (
    binary_task,
    find_file,
    images_under,
    importer,
    in_split,
    index_images,
    read_table,
)
from fundusfm.data.manifest import TaskSpec
from fundusfm.errors import ConfigError, DataError


@importer("eye_diseases")
def eye_diseases(root: Path, keep_augmented: bool = False):
    """The 4-class Kaggle compilation (shared/data/eye_diseases_classification)."""
    classes = ["normal", "cataract", "diabetic_retinopathy", "glaucoma"]
    rows, notes, dropped = [], [], 0
    for path in images_under(root):
        label = path.parent.name
        if label not in classes:
            continue
        stem = path.stem
        eye = "unknown"
        if m := re.fullmatch(r"(\d+)_(left|right)", stem):
            source = "eyepacs" if path.suffix.lower() == ".jpeg" else "odir"
            patient, eye = f"{source}_{m.group(1)}", m.group(2)
        elif re.fullmatch(r"_\d+_\d+", stem):
            if not keep_augmented:
                dropped += 1
                continue
            source, patient = "augmented", f"aug_{label}_{stem}"
        else:
            source, patient = "cataract_dataset", f"cds_{stem.lower()}"
        rows.append(
            {
                "image_id": f"{label}/{stem}",
                "path": path.relative_to(root).as_posix(),
                "patient_id": patient,
                "eye": eye,
                "split": "all",
                "source": source,
                "disease": label,
                "abnormal": int(label != "normal"),
            }
        )
    frame = pd.DataFrame(rows)
    if dropped:
        notes.append(f"dropped {dropped} augmented copies (_<n>_<n>.jpg) of other images")
    tasks = {
        "disease": TaskSpec(kind="multiclass", columns=["disease"], classes=classes),
        "abnormal": binary_task(frame),
    }
    return frame, tasks, notes


JSIEC_CLASSES = [
    "0.0.Normal", "0.1.Tessellated fundus", "0.2.Large optic cup", "0.3.DR1", "1.0.DR2",
    "1.1.DR3", "2.0.BRVO", "2.1.CRVO", "3.RAO", "4.Rhegmatogenous RD", "5.0.CSCR",
    "5.1.VKH disease", "6.Maculopathy", "7.ERM", "8.MH", "9.Pathological myopia",
    "10.0.Possible glaucoma", "10.1.Optic atrophy", "11.Severe hypertensive retinopathy",
    "12.Disc swelling and elevation", "13.Dragged Disc", "14.Congenital disc abnormality",
    "15.0.Retinitis pigmentosa", "15.1.Bietti crystalline dystrophy",
    "16.Peripheral retinal degeneration and break", "17.Myelinated nerve fiber",
    "18.Vitreous particles", "19.Fundus neoplasm", "20.Massive hard exudates",
    "21.Yellow-white spots-flecks", "22.Cotton-wool spots", "23.Vessel tortuosity",
    "24.Chorioretinal atrophy-coloboma", "25.Preretinal hemorrhage", "26.Fibrosis",
    "27.Laser Spots", "28.Silicon oil in eye", "29.0.Blur fundus without PDR",
    "29.1.Blur fundus with suspected PDR",
]  # fmt: skip
JSIEC_AMBIGUOUS = {"0.1.Tessellated fundus", "0.2.Large optic cup", "29.0.Blur fundus without PDR"}


@importer("jsiec")
def jsiec(root: Path):
    """JSIEC 1000 images in 39 class folders; a nested copy of the root folder is skipped."""
    rows, seen = [], set()
    for path in images_under(root):
        label = path.parent.name
        if label not in JSIEC_CLASSES or path.name.lower() in seen:
            continue  # the Kaggle copy nests 1000images/1000images/: the first copy wins
        seen.add(path.name.lower())
        stem = path.name.split("..")[0].split(".")[0]
        rows.append(
            {
                "image_id": f"jsiec_{stem}",
                "path": path.relative_to(root).as_posix(),
                "patient_id": f"jsiec_{stem}",
                "eye": "unknown",
                "split": "all",
                "source": "jsiec",
                "category": label,
                "abnormal": int(label != "0.0.Normal"),
                "ambiguous": int(label in JSIEC_AMBIGUOUS),
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame, {}, []
    present = [c for c in JSIEC_CLASSES if c in set(frame["category"])]
    tasks = {
        "abnormal": binary_task(frame),
        "category": TaskSpec(kind="multiclass", columns=["category"], classes=present),
    }
    return frame, tasks, ["no patient ids in JSIEC: every image is its own patient"]


RFMID_SPLITS = {
    "training": ("train", ("training",)),
    "validation": ("val", ("validation", "evaluation")),
    "testing": ("test", ("testing", "test_set", "test")),
}


@importer("rfmid")
def rfmid(root: Path):
    """RFMiD: three label CSVs (47 columns) and per-split image folders; ids restart per split."""
    images = index_images(root)
    frames, notes = [], []
    for key, (split, words) in RFMID_SPLITS.items():
        csv = find_file(root, rf"(?:[a-c]\. )?RFMiD_{key}_Labels\.csv")
        if csv is None:
            continue
        t = read_table(csv)
        if "Disease_Risk" not in t.columns or "ID" not in t.columns:
            raise DataError(f"{csv}: expected the RFMiD header (ID, Disease_Risk, DR, ...)")
        conditions = [c for c in t.columns if c not in ("ID", "Disease_Risk")]
        rows = []
        for _, r in t.iterrows():
            path = in_split(images.get(r["ID"].strip().lower(), []), words, root)
            if path is None:
                notes.append(f"{split}: no image for ID {r['ID']}")
                continue
            row = {
                "image_id": f"rfmid_{split}_{r['ID'].strip()}",
                "path": path.relative_to(root).as_posix(),
                "patient_id": f"rfmid_{split}_{r['ID'].strip()}",
                "eye": "unknown",
                "split": split,
                "source": "rfmid",
                "abnormal": int(r["Disease_Risk"]),
            }
            row.update({c: int(r[c] or 0) for c in conditions})
            rows.append(row)
        frame = pd.DataFrame(rows)
        if not frame.empty:
            risky = (frame["abnormal"] == 0) & (frame[conditions].sum(axis=1) > 0)
            if risky.any():
                notes.append(
                    f"{split}: {int(risky.sum())} images with Disease_Risk 0 and a condition"
                )
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if frame.empty:
        return frame, {}, notes
    conditions = [c for c in frame.columns if c.isupper() and c != "ID"]
    for c in conditions:
        frame[c] = frame[c].astype(str)
    tasks = {
        "abnormal": binary_task(frame),
        "conditions": TaskSpec(kind="multilabel", columns=conditions),
    }
    return frame, tasks, [*notes[:10], "no patient ids in RFMiD: every image is its own patient"]


ODIR_LETTERS = {
    "D": ("nonproliferative retinopathy", "non proliferative retinopathy", "diabetic retinopathy",
          "proliferative retinopathy"),
    "G": ("glaucoma",),
    "C": ("cataract",),
    "A": ("age-related macular degeneration",),
    "H": ("hypertensive retinopathy",),
    "M": ("pathological myopia", "myopic retinopathy", "myopic maculopathy", "myopia"),
}  # fmt: skip
ODIR_QUALITY = ("lens dust", "low image quality", "optic disk photographically invisible",
                "image offset", "anterior segment image", "no fundus image")  # fmt: skip


def odir_eye(keywords: str) -> dict | None:
    """Per-eye labels from that eye's keywords; None when only quality keywords remain."""
    parts = re.split("[\uff0c,]", keywords)  # ODIR joins keywords with a full-width comma
    words = [w.strip().lower() for w in parts if w.strip()]
    diagnostic = [w for w in words if w not in ODIR_QUALITY]
    if not diagnostic:
        return None
    flags = dict.fromkeys(["N", *ODIR_LETTERS, "O"], 0)
    for w in diagnostic:
        if w == "normal fundus":
            flags["N"] = 1
            continue
        letters = [k for k, names in ODIR_LETTERS.items() if any(n in w for n in names)]
        for k in letters or ["O"]:
            flags[k] = 1
    if any(flags[k] for k in flags if k != "N"):
        flags["N"] = 0
    flags["abnormal"] = int(not flags["N"])
    flags["quality_flag"] = int(len(words) > len(diagnostic))
    return flags


@importer("odir")
def odir(root: Path):
    """ODIR-5K: per-patient table (CSV, or XLSX with openpyxl) -> one row per eye."""
    rx = re.compile(r".*annotation.*\.(csv|xlsx)|data\.xlsx", re.IGNORECASE)
    tables = [p for p in sorted(root.rglob("*")) if p.is_file() and rx.fullmatch(p.name)]
    tables = tables or [p for p in [find_file(root, r"full_df\.csv")] if p]
    if not tables:
        raise DataError(f"no ODIR annotation table (*annotation*.xlsx, full_df.csv) under {root}")
    frames = []
    for table_path in tables:  # OIA-ODIR: training, off-site and on-site test tables
        if table_path.suffix.lower() == ".xlsx":
            try:
                t = pd.read_excel(table_path, dtype=str).fillna("")
            except ImportError as exc:
                raise ConfigError(
                    "reading ODIR's .xlsx needs openpyxl: pip install openpyxl"
                ) from exc
            t.columns = [str(c).replace("\u00a0", " ").strip() for c in t.columns]
        else:
            t = read_table(table_path)
        where = " ".join(table_path.relative_to(root).parts).lower()
        t["split"] = "test" if "on-site" in where else "val" if "off-site" in where else "train"
        frames.append(t.drop_duplicates("ID"))  # full_df.csv repeats a patient per image
    images, rows, dropped, missing = index_images(root), [], 0, 0
    for _, r in pd.concat(frames, ignore_index=True).iterrows():
        for side in ("Left", "Right"):
            name = str(r.get(f"{side}-Fundus", "")).strip()
            found = images.get(Path(name).stem.lower())
            if not name or not found:
                missing += int(bool(name))
                continue
            flags = odir_eye(str(r.get(f"{side}-Diagnostic Keywords", "")))
            if flags is None:
                dropped += 1
                continue
            rows.append(
                {
                    "image_id": f"odir_{Path(name).stem}",
                    "path": found[0].relative_to(root).as_posix(),
                    "patient_id": f"odir_{r['ID']}",
                    "eye": side.lower(),
                    "split": r["split"],
                    "source": "odir",
                    "keywords": str(r.get(f"{side}-Diagnostic Keywords", "")),
                    **flags,
                }
            )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame, {}, []
    letters = ["N", *ODIR_LETTERS, "O"]
    for c in letters:
        frame[c] = frame[c].astype(str)
    tasks = {
        "abnormal": binary_task(frame),
        "categories": TaskSpec(kind="multilabel", columns=letters),
    }
    notes = [
        f"labels are per eye, from each eye's keywords; {dropped} quality-only eyes dropped, "
        f"{missing} listed images not found"
    ]
    return frame, tasks, notes
