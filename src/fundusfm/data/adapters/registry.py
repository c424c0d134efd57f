"""The one registry of public datasets, classification and vessels alike: layouts -> manifests.

`import_dataset` dispatches every name `fundusfm data import NAME` takes: the vessel sets
(drive, chase_db1, stare, hrf, fives: `adapters.vessels`, image + vessel + FOV masks and the
official split) and the classification sets below. For a classification set it finds the
dataset's label files under ROOT (mirrors add folders, so they are searched for, never
assumed), and writes a manifest with `image_id` (namespaced by split where names repeat),
`path` (relative to ROOT),
`patient_id`, `eye`, `split` (official, or `all`), `source`, the dataset's own label columns,
`abnormal` (1/0; how it is derived is below and in the sidecar) and tasks in the sidecar YAML.
Then near-duplicates are grouped (see data/dedup.py): images that are copies of each other share
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

from pathlib import Path

# the adapter modules register themselves in REGISTRY when imported
from fundusfm.data.adapters import classification, generic, grading  # noqa: F401
from fundusfm.data.adapters.common import REGISTRY
from fundusfm.data.adapters.vessels import IMPORTERS as VESSEL_IMPORTERS
from fundusfm.data.adapters.vessels import import_vessels
from fundusfm.data.dedup import group_patients
from fundusfm.data.manifest import DatasetSpec, is_utf8, load_manifest, printable, save_manifest
from fundusfm.errors import ConfigError, DataError


def dataset_names() -> dict[str, str]:
    """Every importable dataset and its kind (`vessels` or `classification`)."""
    return {
        **dict.fromkeys(VESSEL_IMPORTERS, "vessels"),
        **dict.fromkeys(REGISTRY, "classification"),
    }


def import_dataset(
    name: str,
    root: Path,
    out: Path,
    group_duplicates: bool = True,
    max_distance: int = 6,
    progress: bool = True,
) -> tuple[Path, str, list[str]]:
    """Write the manifest of a public dataset; returns it, a one-line summary and the notes."""
    if name in VESSEL_IMPORTERS:
        path = import_vessels(name, root, out)
        t = load_manifest(path).table
        derived = int((t.fov_source == "derived").sum())
        summary = (
            f"{len(t)} images ({t.split.value_counts().to_dict()}), {derived} FOV masks derived"
        )
        unmasked = int((t.vessel_path == "").sum())
        notes = [
            f"{unmasked} images have no vessel mask: kept (labels, classification), left out "
            "of segmentation training and scoring"
        ]
        return path, summary, notes if unmasked else []
    path, notes = _import_classification(name, root, out, group_duplicates, max_distance, progress)
    t = load_manifest(path).table
    summary = (
        f"{len(t)} images, {t.patient_id.nunique()} patient groups, "
        f"splits {t.split.value_counts().to_dict()}"
    )
    return path, summary, notes


def _import_classification(
    name: str, root: Path, out: Path, group_duplicates: bool, max_distance: int, progress: bool
) -> tuple[Path, list[str]]:
    """Write the manifest of a public classification dataset; returns it and the notes."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {sorted(dataset_names())}")
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")
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
        raise DataError(f"no {name} images found under {root} (see `fundusfm data import --help`)")
    same_file = frame["path"][frame["path"].duplicated()]
    if len(same_file):
        raise DataError(f"{same_file.iloc[0]} is listed twice; report this layout")
    duplicated = frame["image_id"][frame["image_id"].duplicated()]
    if len(duplicated):
        raise DataError(f"image id {duplicated.iloc[0]!r} appears twice; report this layout")
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
