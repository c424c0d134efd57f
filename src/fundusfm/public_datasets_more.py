"""More public dataset layouts (JSIEC, RFMiD, ODIR-5K, APTOS, EyePACS, IDRiD, Messidor-2).

Each function registers itself in public_datasets.REGISTRY; layouts, label semantics and
quirks follow shared DATASETS.md (sections 1-6).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from .config import ConfigError
from .manifest import TaskSpec
from .public_datasets import _binary, find_file, images_under, importer, read_table

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
        "abnormal": _binary(frame),
        "category": TaskSpec(kind="multiclass", columns=["category"], classes=present),
    }
    return frame, tasks, ["no patient ids in JSIEC: every image is its own patient"]


def _index(root: Path) -> dict[str, list[Path]]:
    """Image files by lower-case stem (several files may share one across splits)."""
    out: dict[str, list[Path]] = {}
    for p in images_under(root):
        out.setdefault(p.stem.lower(), []).append(p)
    return out


def _in_split(paths: list[Path], words: tuple[str, ...], root: Path) -> Path | None:
    """The file whose folders below ROOT name the split (e.g. 'Training' or 'Test')."""
    for p in paths:
        parts = " ".join(p.relative_to(root).parent.parts).lower()
        if any(w in parts for w in words):
            return p
    return None


RFMID_SPLITS = {
    "training": ("train", ("training",)),
    "validation": ("val", ("validation", "evaluation")),
    "testing": ("test", ("testing", "test_set", "test")),
}


@importer("rfmid")
def rfmid(root: Path):
    """RFMiD: three label CSVs (47 columns) and per-split image folders; ids restart per split."""
    images = _index(root)
    frames, notes = [], []
    for key, (split, words) in RFMID_SPLITS.items():
        csv = find_file(root, rf"(?:[a-c]\. )?RFMiD_{key}_Labels\.csv")
        if csv is None:
            continue
        t = read_table(csv)
        if "Disease_Risk" not in t.columns or "ID" not in t.columns:
            raise ConfigError(f"{csv}: expected the RFMiD header (ID, Disease_Risk, DR, ...)")
        conditions = [c for c in t.columns if c not in ("ID", "Disease_Risk")]
        rows = []
        for _, r in t.iterrows():
            path = _in_split(images.get(r["ID"].strip().lower(), []), words, root)
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
        "abnormal": _binary(frame),
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
        raise ConfigError(f"no ODIR annotation table (*annotation*.xlsx, full_df.csv) under {root}")
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
    images, rows, dropped, missing = _index(root), [], 0, 0
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
        "abnormal": _binary(frame),
        "categories": TaskSpec(kind="multilabel", columns=letters),
    }
    notes = [
        f"labels are per eye, from each eye's keywords; {dropped} quality-only eyes dropped, "
        f"{missing} listed images not found"
    ]
    return frame, tasks, notes


def _grades(frame: pd.DataFrame, column: str, classes: list[str]) -> TaskSpec:
    return TaskSpec(kind="multiclass", columns=[column], classes=classes)


@importer("aptos")
def aptos(root: Path):
    """APTOS 2019: train.csv (id_code, diagnosis 0-4) + train_images/<id_code>.png."""
    csv = find_file(root, r"train\.csv")
    if csv is None:
        raise ConfigError(f"no APTOS train.csv under {root}")
    t, images, rows = read_table(csv), _index(root), []
    for _, r in t.iterrows():
        found = images.get(r["id_code"].lower())
        if found:
            rows.append(
                {
                    "image_id": f"aptos_{r['id_code']}",
                    "path": found[0].relative_to(root).as_posix(),
                    "patient_id": f"aptos_{r['id_code']}",
                    "eye": "unknown",
                    "split": "train",
                    "source": "aptos",
                    "dr_grade": r["diagnosis"],
                    "abnormal": int(r["diagnosis"] != "0"),
                }
            )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame, {}, []
    tasks = {"dr_grade": _grades(frame, "dr_grade", list("01234")), "abnormal": _binary(frame)}
    return frame, tasks, ["abnormal means DR grade >= 1 (APTOS grades DR only)"]


@importer("eyepacs")
def eyepacs(root: Path):
    """EyePACS (Kaggle DR 2015): trainLabels.csv and retinopathy_solution.csv (Usage)."""
    images, rows = _index(root), []
    for csv_name, default_split in (("trainLabels.csv", "train"), ("retinopathy_solution.csv", "")):
        csv = find_file(root, re.escape(csv_name))
        if csv is None:
            continue
        for _, r in read_table(csv).iterrows():
            found = images.get(r["image"].lower())
            if not found:
                continue
            split = default_split or {"public": "val", "private": "test"}.get(
                r.get("Usage", "").lower(), "test"
            )
            patient, _, side = r["image"].partition("_")
            rows.append(
                {
                    "image_id": f"eyepacs_{split}_{r['image']}",
                    "path": found[0].relative_to(root).as_posix(),
                    "patient_id": f"eyepacs_{patient}",  # one subject across val and test
                    "eye": side or "unknown",
                    "split": split,
                    "source": "eyepacs",
                    "dr_grade": r["level"],
                    "abnormal": int(r["level"] != "0"),
                }
            )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame, {}, []
    tasks = {"dr_grade": _grades(frame, "dr_grade", list("01234")), "abnormal": _binary(frame)}
    return frame, tasks, ["abnormal means DR level >= 1; both eyes share the patient id"]


@importer("idrid")
def idrid(root: Path):
    """IDRiD disease grading: two CSVs (trailing-space header, padding columns)."""
    images, rows = _index(root), []
    for key, split, words in (
        ("Training", "train", ("training",)),
        ("Testing", "test", ("testing",)),
    ):
        csv = find_file(root, rf"(?:[ab]\. )?IDRiD_Disease Grading_{key} Labels\.csv")
        if csv is None:
            continue
        for _, r in read_table(csv).iterrows():
            name = r.get("Image name", "").strip()
            path = _in_split(images.get(name.lower(), []), words, root)
            if not name or path is None:
                continue
            grade, dme = r["Retinopathy grade"], r["Risk of macular edema"]
            rows.append(
                {
                    "image_id": f"idrid_{split}_{name}",
                    "path": path.relative_to(root).as_posix(),
                    "patient_id": f"idrid_{split}_{name}",
                    "eye": "unknown",
                    "split": split,
                    "source": "idrid",
                    "dr_grade": grade,
                    "dme_risk": dme,
                    "abnormal": int(grade != "0" or dme != "0"),
                }
            )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame, {}, []
    tasks = {
        "dr_grade": _grades(frame, "dr_grade", list("01234")),
        "dme_risk": _grades(frame, "dme_risk", list("012")),
        "abnormal": _binary(frame),
    }
    return frame, tasks, ["abnormal means DR grade >= 1 or DME risk >= 1"]


@importer("messidor2")
def messidor2(root: Path):
    """Messidor-2 images with the adjudicated grades (messidor_data.csv) and exam pairs."""
    csv = find_file(root, r"messidor_data\.csv")
    if csv is None:
        raise ConfigError(f"no messidor_data.csv (adjudicated grades) under {root}")
    patient_of: dict[str, str] = {}
    pairs = find_file(root, r"messidor-2\.csv")
    if pairs is not None:
        for k, r in read_table(pairs, sep=";").iterrows():
            for side in ("left", "right"):
                stem = Path(r.get(side, "").strip()).stem.lower()
                patient_of[stem] = (f"messidor2_exam{k}", side)
    images, rows, ungradable = _index(root), [], 0
    for _, r in read_table(csv).iterrows():
        name = r["image_id"].strip()
        stem = Path(name).stem.lower()
        found = images.get(stem)
        if not found:
            continue
        if r.get("adjudicated_gradable", "1") == "0":
            ungradable += 1
            continue
        grade, dme = r["adjudicated_dr_grade"], r["adjudicated_dme"]
        rows.append(
            {
                "image_id": f"messidor2_{Path(name).stem}",
                "path": found[0].relative_to(root).as_posix(),
                "patient_id": patient_of.get(stem, (f"messidor2_{Path(name).stem}",))[0],
                "eye": patient_of.get(stem, ("", "unknown"))[1],
                "split": "all",
                "source": "messidor2",
                "dr_grade": grade,
                "dme": dme,
                "abnormal": int(grade != "0" or dme != "0"),
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame, {}, []
    tasks = {"dr_grade": _grades(frame, "dr_grade", list("01234")), "abnormal": _binary(frame)}
    return frame, tasks, [f"{ungradable} ungradable images dropped; abnormal = DR grade or DME"]
