"""Diabetic-retinopathy grading datasets: APTOS, EyePACS, IDRiD and Messidor-2 (grade 0 = no DR).

Layouts follow shared DATASETS.md; each adapter registers itself with `common.importer`."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from fundusfm.data.adapters.common import (
    binary_task,
    find_file,
    importer,
    in_split,
    index_images,
    read_table,
)
from fundusfm.data.manifest import TaskSpec
from fundusfm.errors import DataError


def _grades(frame: pd.DataFrame, column: str, classes: list[str]) -> TaskSpec:
    return TaskSpec(kind="multiclass", columns=[column], classes=classes)


@importer("aptos")
def aptos(root: Path):
    """APTOS 2019: train.csv (id_code, diagnosis 0-4) + train_images/<id_code>.png."""
    csv = find_file(root, r"train\.csv")
    if csv is None:
        raise DataError(f"no APTOS train.csv under {root}")
    t, images, rows = read_table(csv), index_images(root), []
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
    tasks = {"dr_grade": _grades(frame, "dr_grade", list("01234")), "abnormal": binary_task(frame)}
    return frame, tasks, ["abnormal means DR grade >= 1 (APTOS grades DR only)"]


@importer("eyepacs")
def eyepacs(root: Path):
    """EyePACS (Kaggle DR 2015): trainLabels.csv and retinopathy_solution.csv (Usage)."""
    images, rows = index_images(root), []
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
    tasks = {"dr_grade": _grades(frame, "dr_grade", list("01234")), "abnormal": binary_task(frame)}
    return frame, tasks, ["abnormal means DR level >= 1; both eyes share the patient id"]


@importer("idrid")
def idrid(root: Path):
    """IDRiD disease grading: two CSVs (trailing-space header, padding columns)."""
    images, rows = index_images(root), []
    for key, split, words in (
        ("Training", "train", ("training",)),
        ("Testing", "test", ("testing",)),
    ):
        csv = find_file(root, rf"(?:[ab]\. )?IDRiD_Disease Grading_{key} Labels\.csv")
        if csv is None:
            continue
        for _, r in read_table(csv).iterrows():
            name = r.get("Image name", "").strip()
            path = in_split(images.get(name.lower(), []), words, root)
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
        "abnormal": binary_task(frame),
    }
    return frame, tasks, ["abnormal means DR grade >= 1 or DME risk >= 1"]


@importer("messidor2")
def messidor2(root: Path):
    """Messidor-2 images with the adjudicated grades (messidor_data.csv) and exam pairs."""
    csv = find_file(root, r"messidor_data\.csv")
    if csv is None:
        raise DataError(f"no messidor_data.csv (adjudicated grades) under {root}")
    patient_of: dict[str, str] = {}
    pairs = find_file(root, r"messidor-2\.csv")
    if pairs is not None:
        for k, r in read_table(pairs, sep=";").iterrows():
            for side in ("left", "right"):
                stem = Path(r.get(side, "").strip()).stem.lower()
                patient_of[stem] = (f"messidor2_exam{k}", side)
    images, rows, ungradable = index_images(root), [], 0
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
    tasks = {"dr_grade": _grades(frame, "dr_grade", list("01234")), "abnormal": binary_task(frame)}
    return frame, tasks, [f"{ungradable} ungradable images dropped; abnormal = DR grade or DME"]
