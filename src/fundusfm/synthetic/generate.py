"""Generate a labelled set of procedural fundus photographs (the data of the demo and tests).

Patients, not images, are sampled: each patient has two eyes that share pigmentation and
camera look, and diseases that are often bilateral (diabetic retinopathy, myopia) or usually
one-sided (vein occlusion). Labels therefore correlate within a patient, as in real data, and
a split that ignores patients leaks. A share of diseased eyes is drawn mildly (a handful of
microaneurysms, a borderline cup) so that the tasks are learnable but not trivial. Every class
of every declared task gets at least one patient when the set is large enough (`plan_patients`).

Output folder:
    images/<id>.jpg            the photographs
    vessels/<id>.png           binary vessel masks
    fov/<id>.png               field-of-view masks
    lesions/<type>/<id>.png    one binary mask per lesion type present in that image
    manifest.csv, manifest.yaml
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from fundusfm.config.core import SynthConfig, dump_config
from fundusfm.data.manifest import DatasetSpec, TaskSpec, save_manifest
from fundusfm.errors import ConfigError
from fundusfm.synthetic.lesions import dr_grade
from fundusfm.synthetic.render import EyeCase, render_eye

DISEASES = ("dr", "amd", "glaucoma", "myopia", "rvo")
CLASSES = ("normal", *DISEASES)
# Chance that a patient's disease shows in the second eye as well.
BILATERAL = {"dr": 0.85, "amd": 0.7, "glaucoma": 0.7, "myopia": 0.9, "rvo": 0.1}


def dataset_spec(name: str = "synthetic") -> DatasetSpec:
    """The tasks a generated manifest declares."""
    return DatasetSpec(
        name=name,
        root=".",
        tasks={
            "abnormal": TaskSpec(kind="binary", columns=["abnormal"], classes=["0", "1"]),
            "disease": TaskSpec(kind="multiclass", columns=["disease"], classes=list(CLASSES)),
            "diseases": TaskSpec(kind="multilabel", columns=list(DISEASES)),
            "dr_grade": TaskSpec(
                kind="multiclass", columns=["dr_grade"], classes=["0", "1", "2", "3", "4"]
            ),
        },
    )


def _severity(rng: np.random.Generator, subtle: float) -> float:
    return float(rng.uniform(0.05, 0.3) if rng.random() < subtle else rng.uniform(0.3, 1.0))


def _draw_primary(cfg: SynthConfig, rng: np.random.Generator) -> str:
    """A patient's diagnosis drawn with the configured prevalences (a patient's first draw)."""
    names = list(cfg.prevalence)
    p = np.array([cfg.prevalence[k] for k in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


# Severity ranges of DR grades 1-4 (lesions.dr_grade), to draw an eye of a given grade.
GRADE_SEVERITY = {1: (0.05, 0.3), 2: (0.3, 0.6), 3: (0.6, 0.85), 4: (0.85, 1.0)}


def sample_patient(
    cfg: SynthConfig, index: int, primary: str | None = None, grade: int | None = None
) -> list[EyeCase]:
    """Draw one patient's two eyes: diagnosis, which eyes show it, severities, appearance.

    `primary` replaces the drawn diagnosis and `grade` the DR grade of the eye that shows it
    (how `plan_patients` makes a small set hold every class).
    """
    rng = np.random.default_rng([cfg.seed, index, 0])
    drawn = _draw_primary(cfg, rng)  # drawn even when replaced: the other draws stay the same
    primary = primary or drawn
    diseases = [] if primary == "normal" else [primary]
    if diseases and rng.random() < cfg.comorbidity:
        diseases.append(str(rng.choice([k for k in DISEASES if k != primary])))
    index_eye = "right" if rng.random() < 0.5 else "left"
    pigment = float(rng.beta(2, 2))
    tint = tuple(float(t) for t in rng.normal(1.0, 0.04, 3))
    eyes = []
    for eye in ("right", "left"):
        present = {}
        for k, dis in enumerate(diseases):
            if (eye == index_eye and k == 0) or rng.random() < BILATERAL[dis]:
                present[dis] = _severity(rng, cfg.subtle)
        if grade is not None and eye == index_eye and primary == "dr":
            present["dr"] = float(
                np.random.default_rng([cfg.seed, index, 9]).uniform(*GRADE_SEVERITY[grade])
            )
        dr = dr_grade(present["dr"]) if "dr" in present else 0
        eyes.append(EyeCase(eye=eye, diseases=present, pigment=pigment, tint=tint, dr_grade=dr))
    return eyes


def _shown(cfg: SynthConfig, index: int, planned: tuple) -> set[tuple[str, object]]:
    """The task classes a patient's two eyes put in the manifest: ("disease", d), ("grade", g)."""
    eyes = sample_patient(cfg, index, *planned)
    return {("disease", next(iter(e.diseases), "normal")) for e in eyes} | {
        ("grade", e.dr_grade) for e in eyes
    }


def _candidates(plan: list, changed: set[int], target: tuple[str, object]) -> list[int]:
    """Patients that may give way to `target`, the least costly to the prevalences first.

    A missing DR grade goes to a DR patient first (the diagnosis stays); otherwise patients
    of the commonest diagnosis come first. Later patients first: the choice is fixed by the seed.
    """
    counts = Counter(primary for primary, _ in plan)
    return sorted(
        (i for i in range(len(plan)) if i not in changed),
        key=lambda i: (target[0] == "grade" and plan[i][0] == "dr", counts[plan[i][0]], i),
        reverse=True,
    )


def _change_for(cfg: SynthConfig, target: tuple[str, object]) -> tuple[str, int | None]:
    """The (diagnosis, DR grade) that makes a patient show `target`."""
    kind, value = target
    if kind == "disease":
        return str(value), None
    if value:
        return "dr", int(value)
    # grade 0 is any eye without DR: the most prevalent other diagnosis
    return max((c for c in CLASSES if c != "dr"), key=lambda c: cfg.prevalence.get(c, 0)), None


def plan_patients(cfg: SynthConfig, n_patients: int, full: int) -> list[tuple[str, int | None]]:
    """Each patient's diagnosis and forced DR grade (None: as drawn), covering every class.

    `data check` refuses a task class without images, so every diagnosis of positive
    prevalence and every DR grade gets an eye among the `full` (two-eyed) patients whenever
    there are enough (9 patients, 18 images, with the default prevalences). One patient is
    changed per missing class, and only one whose change loses no class that only it shows;
    every other patient keeps what was drawn, so prevalences stay as configured.
    """
    plan = [
        (_draw_primary(cfg, np.random.default_rng([cfg.seed, i, 0])), None)
        for i in range(n_patients)
    ]
    shown = {i: _shown(cfg, i, plan[i]) for i in range(full)}
    wanted = {("disease", c) for c in CLASSES if cfg.prevalence.get(c, 0) > 0}
    wanted |= {("grade", 0)} if wanted - {("disease", "dr")} else set()
    wanted |= {("grade", g) for g in GRADE_SEVERITY} if ("disease", "dr") in wanted else set()
    changed: set[int] = set()
    for target in sorted(wanted - set().union(*shown.values()), key=str):
        holders = Counter(c for held in shown.values() for c in held)
        if holders[target]:  # covered on the way (a new DR patient shows its grade too)
            continue
        for i in _candidates(plan[:full], changed, target):
            planned = _change_for(cfg, target)
            new = _shown(cfg, i, planned)
            if target in new and {c for c in shown[i] if holders[c] == 1} <= new:
                plan[i], shown[i] = planned, new
                changed.add(i)
                break
    return plan


def _save_mask(mask: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path, compress_level=1)  # 1-bit PNG, fast to write
    return path.as_posix()


def _make_patient(args: tuple[SynthConfig, int, Path, int, tuple]) -> list[dict]:
    """Render and write one patient's eyes (up to `n_eyes`); return their manifest rows."""
    cfg, index, out, n_eyes, planned = args
    rows = []
    pid = f"P{index:05d}"
    for k, case in enumerate(sample_patient(cfg, index, *planned)[:n_eyes]):
        rng = np.random.default_rng([cfg.seed, index, 1 + k])
        r = render_eye(cfg.size, case, cfg.camera, rng)
        iid = f"{pid}_{case.eye}"
        rel = Path("images") / f"{iid}.{cfg.format}"
        img = Image.fromarray(r.image, "RGB")
        if cfg.format == "jpg":
            img.save(out / rel, quality=cfg.jpeg_quality)
        else:
            img.save(out / rel, compress_level=1)
        _save_mask(r.vessels, out / "vessels" / f"{iid}.png")
        _save_mask(r.fov, out / "fov" / f"{iid}.png")
        for name, mask in sorted(r.lesions.items()):
            _save_mask(mask, out / "lesions" / name / f"{iid}.png")
        primary = next(iter(case.diseases), "normal")
        row = {
            "image_id": iid,
            "path": rel.as_posix(),
            "patient_id": pid,
            "eye": case.eye,
            "abnormal": int(bool(case.diseases)),
            "disease": primary,
            **{dis: int(dis in case.diseases) for dis in DISEASES},
            "dr_grade": case.dr_grade,
            "severity": round(max(case.diseases.values(), default=0.0), 3),
            "vessel_path": f"vessels/{iid}.png",
            "fov_path": f"fov/{iid}.png",
            "lesion_types": ";".join(sorted(r.lesions)),
            "source": "synthetic",
        }
        rows.append(row)
    return rows


def generate(cfg: SynthConfig, out: Path, progress: bool = True) -> Path:
    """Write `cfg.n` images with masks and a manifest into `out`; returns the manifest path.

    The result depends only on the config (seed included), not on the number of workers.
    """
    unknown = set(cfg.prevalence) - set(CLASSES)
    if unknown:
        raise ConfigError(
            f"prevalence: unknown classes {sorted(unknown)}; use only {list(CLASSES)}"
        )
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    n_patients = (cfg.n + 1) // 2
    plan = plan_patients(cfg, n_patients, full=cfg.n // 2)
    jobs = [(cfg, i, out, min(2, cfg.n - 2 * i), plan[i]) for i in range(n_patients)]
    workers = cfg.workers or os.cpu_count() or 1
    bar = tqdm(total=cfg.n, desc="synth", unit="img", disable=not progress)
    rows: list[dict] = []
    if workers == 1:
        for job in jobs:
            rows += _make_patient(job)
            bar.update(job[3])
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for job, result in zip(jobs, pool.map(_make_patient, jobs, chunksize=4), strict=True):
                rows += result
                bar.update(job[3])
    bar.close()
    return save_manifest(pd.DataFrame(rows), dataset_spec(), out / "manifest.csv")


def generate_set(cfg: SynthConfig, out: Path, progress: bool = True) -> Path:
    """`fundusfm synth`: a new set in `out` (refused when `out` already holds one), with its
    settings beside it in `config.yaml`; returns the manifest path."""
    out = Path(out)
    if (out / "manifest.csv").exists():
        raise ConfigError(f"{out} already holds a generated set; choose a new folder")
    manifest = generate(cfg, out, progress)
    dump_config(cfg, out / "config.yaml")
    return manifest
