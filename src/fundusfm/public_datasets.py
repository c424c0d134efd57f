"""Importers for public classification datasets: their layouts -> one manifest each.

`fundusfm data import NAME ROOT --out manifest.csv` finds the dataset's label files under
ROOT (mirrors add folders, so they are searched for, never assumed), and writes a manifest
with `image_id` (namespaced by split where names repeat), `path` (relative to ROOT),
`patient_id`, `eye`, `split` (official, or `all`), `source`, the dataset's own label columns,
`abnormal` (1/0; how it is derived is below and in the sidecar) and tasks in the sidecar YAML.
Then near-duplicates are grouped (see dedup.py): images that are copies of each other share
a patient id, so a patient-grouped split never puts them on two sides. The import prints what
it grouped, dropped and why.

Normal/abnormal per dataset (a DR-only set's "normal" means "no DR", not "no disease"):
    eye_diseases  folder normal vs cataract / diabetic_retinopathy / glaucoma
    jsiec         0.0.Normal vs the other 38 folders (0.1 tessellated, 0.2 large cup and
                  29.0 blur are flagged in `ambiguous` for a report with and without them)
    rfmid         Disease_Risk
    odir          per eye from that eye's keywords: normal only if "normal fundus" is its only
                  diagnostic keyword; eyes with quality keywords only are dropped
    aptos, eyepacs  grade 0 = no DR
    idrid         grade 0 and DME risk 0 = no DR
    messidor2     grade 0 and DME 0 = no DR; ungradable images dropped
    folder, csv   a class named normal (any case) is normal, others abnormal
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from .config import ConfigError
from .decode import SUPPORTED_SUFFIXES
from .dedup import group_patients
from .manifest import DatasetSpec, TaskSpec, is_utf8, printable, save_manifest
from .manifest import read_table as read_sniffed

Importer = Callable[[Path], tuple[pd.DataFrame, dict[str, TaskSpec], list[str]]]
REGISTRY: dict[str, Importer] = {}


def importer(name: str):
    def register(fn: Importer) -> Importer:
        REGISTRY[name] = fn
        return fn

    return register


def images_under(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
    )


def find_file(root: Path, pattern: str) -> Path | None:
    """The first file under root whose name matches a regex (case-insensitive)."""
    rx = re.compile(pattern, re.IGNORECASE)
    return next((p for p in sorted(root.rglob("*")) if p.is_file() and rx.fullmatch(p.name)), None)


def read_table(path: Path, **kwargs) -> pd.DataFrame:
    """A CSV with header cells cleaned (trailing spaces, non-breaking spaces, BOM)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", **kwargs)
    table.columns = [str(c).replace("\u00a0", " ").strip() for c in table.columns]
    return table.loc[:, [c for c in table.columns if c and not c.startswith("Unnamed")]]


def _binary(frame: pd.DataFrame) -> TaskSpec:
    frame["abnormal"] = frame["abnormal"].astype(int).astype(str)
    return TaskSpec(kind="binary", columns=["abnormal"], classes=["0", "1"])


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
        "abnormal": _binary(frame),
    }
    return frame, tasks, notes


@importer("folder")
def image_folder(root: Path):
    """Generic ImageFolder: ROOT/<class>/**/image; every image its own patient."""
    rows = []
    for path in images_under(root):
        rel = path.relative_to(root)
        if len(rel.parts) < 2:
            continue
        label = rel.parts[0]
        rows.append(
            {
                "image_id": rel.with_suffix("").as_posix(),
                "path": rel.as_posix(),
                "patient_id": rel.with_suffix("").as_posix(),
                "eye": "unknown",
                "split": "all",
                "source": "folder",
                "label": label,
                "abnormal": int(label.lower() != "normal"),
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame, {}, []
    classes = sorted(frame["label"].unique())
    tasks = {"label": TaskSpec(kind="multiclass", columns=["label"], classes=classes)}
    if "normal" in {c.lower() for c in classes}:
        tasks["abnormal"] = _binary(frame)
    else:
        frame = frame.drop(columns="abnormal")
    return frame, tasks, ["every image is its own patient (ImageFolder has no patient ids)"]


@importer("csv")
def csv_table(root: Path):
    """Generic table: ROOT/labels.csv (or the only CSV) with path,label[,patient_id,eye,split]."""
    table_path = root / "labels.csv"
    if not table_path.is_file():
        found = sorted(root.glob("*.csv"))
        if len(found) != 1:
            raise ConfigError(f"{root}: put the table in labels.csv (path,label[,patient_id])")
        table_path = found[0]
    t, lines = read_sniffed(table_path)  # a BOM, `;` or tab delimiters and CRLF are fine
    missing = [c for c in ("path", "label") if c not in t.columns]
    if missing:
        raise ConfigError(
            f"{table_path}: missing columns {missing}; needs path,label (found: "
            f"{', '.join(t.columns)})"
        )
    for col in ("path", "label"):
        if (t[col] == "").any():
            i = int((t[col] == "").to_numpy().argmax())
            raise ConfigError(
                f"{table_path} line {lines[i]}: empty {col} ({int((t[col] == '').sum())} of "
                f"{len(t)} rows); fill it in or remove the row"
            )
    repeated = t["path"].duplicated().to_numpy()
    if repeated.any():
        second = int(repeated.argmax())
        first = int((t["path"] == t["path"].iat[second]).to_numpy().argmax())
        raise ConfigError(
            f"{table_path} lines {lines[first]} and {lines[second]} both list "
            f"{t['path'].iat[second]!r}; keep one row per image"
        )
    absent = ~t["path"].map(lambda rel: (root / rel).is_file()).to_numpy()
    if absent.any():
        i = int(absent.argmax())
        raise ConfigError(
            f"{table_path} line {lines[i]}: no file {t['path'].iat[i]!r} under {root} "
            f"({int(absent.sum())} of {len(t)} missing); paths are relative to that folder"
        )
    ids = t["path"].str.replace(r"\.[^./]+$", "", regex=True)
    if "patient_id" in t:  # a blank patient id is the image's own, never one shared patient
        t["patient_id"] = t["patient_id"].where(t["patient_id"] != "", ids)
    frame = pd.DataFrame(
        {
            "image_id": ids,
            "path": t["path"],
            "patient_id": t.get("patient_id", ids),
            "eye": t.get("eye", "unknown"),
            "split": t.get("split", "all"),
            "source": "csv",
            "label": t["label"],
        }
    )
    classes = sorted(frame["label"].unique())
    tasks = {"label": TaskSpec(kind="multiclass", columns=["label"], classes=classes)}
    if "normal" in {c.lower() for c in classes}:
        frame["abnormal"] = (frame["label"].str.lower() != "normal").astype(int)
        tasks["abnormal"] = _binary(frame)
    return frame, tasks, [] if "patient_id" in t else ["no patient_id column: one per image"]


def import_dataset(
    name: str,
    root: Path,
    out: Path,
    group_duplicates: bool = True,
    max_distance: int = 6,
    progress: bool = True,
) -> tuple[Path, list[str]]:
    """Write the manifest of a public classification dataset; returns it and the notes."""
    from . import public_datasets_more  # noqa: F401  (registers the remaining adapters)

    if name not in REGISTRY:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {sorted(REGISTRY)}")
    root = Path(root).resolve()
    if not root.is_dir():
        raise ConfigError(f"not a folder: {root}")
    frame, tasks, notes = REGISTRY[name](root)
    if not frame.empty:  # a manifest is UTF-8 text: names in another encoding cannot go in
        bad = ~frame["path"].map(is_utf8)
        if bad.any():
            shown = ", ".join(printable(p) for p in frame["path"][bad][:3])
            notes.append(
                f"skipped {int(bad.sum())} files whose names are not valid UTF-8 ({shown}); "
                "rename them to import them"
            )
            frame = frame[~bad].reset_index(drop=True)
    if frame.empty:
        raise ConfigError(
            f"no {name} images found under {root} (see `fundusfm data import --help`)"
        )
    same_file = frame["path"][frame["path"].duplicated()]
    if len(same_file):
        raise ConfigError(f"{same_file.iloc[0]} is listed twice; report this layout")
    duplicated = frame["image_id"][frame["image_id"].duplicated()]
    if len(duplicated):
        raise ConfigError(f"image id {duplicated.iloc[0]!r} appears twice; report this layout")
    if group_duplicates:
        paths = [root / p for p in frame["path"]]
        joined, report = group_patients(
            paths, frame["image_id"].tolist(), frame["patient_id"].tolist(), max_distance, progress
        )
        frame["patient_id"] = joined
        notes.append(f"duplicates: {report.summary()}")
        notes += [f"  e.g. {a} ~ {b} ({d} bits)" for a, b, d in report.examples[:5]]
    frame = frame.astype(str)
    spec = DatasetSpec(name=name, root=str(root), tasks=tasks)
    return save_manifest(frame, spec, out), notes
