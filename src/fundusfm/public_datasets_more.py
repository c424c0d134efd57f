"""More public dataset layouts (JSIEC, RFMiD, ODIR-5K, APTOS, EyePACS, IDRiD, Messidor-2).

Each function registers itself in public_datasets.REGISTRY; layouts, label semantics and
quirks follow shared DATASETS.md (sections 1-6).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .manifest import TaskSpec
from .public_datasets import _binary, images_under, importer

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
        if label not in JSIEC_CLASSES or path.name in seen:
            continue  # the Kaggle copy nests 1000images/1000images/: the first copy wins
        seen.add(path.name)
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
