"""Screening a folder with a bundle (`fundusfm predict BUNDLE FOLDER --out DIR`).

Every file under the folder (recursively) gets one row of `predictions.csv`:
    file        path relative to the folder (bytes of a name that are not UTF-8 are
                written as `\\xNN`, so the CSV and the report are always valid UTF-8)
    status      scored | ungradable (failed the quality gate: not scored) |
                unreadable (could not be decoded; `reason` says why) |
                unsupported (not an image format fundusfm reads)
    reason      why an image was not scored
    p_<class>   probabilities (scored images only)
    decision    the predicted class at the bundle's validated threshold(s)
    shift_distance, shift_percentile, shift, shift_image_stats
                how unlike the bundle's validation images a scored image is
                (`fundusfm.tasks.shift`): `shift` is in-distribution, shifted (distance above
                the 95th percentile of validation) or unavailable (no reference stored)
    fov_fraction, brightness, saturated, focus   the quality measures
Images are decoded, quality-checked and preprocessed in DataLoader workers while the
previous batch is scored (one bad file never stops the batch); `engine` chooses what scores
(`fundusfm.inference`: ONNX Runtime on the CPU when installed, else PyTorch). `report.html`
(`screen.report`) is one offline page for a person: the bundle's card and threshold, counts
per status, a histogram of the abnormal probability, the scored images with thumbnails (and
Grad-CAM overlays under `gradcam`, whose maps always come from PyTorch) in a sortable,
filterable table, and the images not scored grouped by reason. An existing output folder
is refused without overwrite.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fundusfm.bundle import bundle_notes
from fundusfm.config.core import PreprocessConfig
from fundusfm.config.screen import QualityConfig
from fundusfm.data.decode import SUPPORTED_SUFFIXES
from fundusfm.data.manifest import printable
from fundusfm.data.preprocess import crop_resize, decode_for
from fundusfm.data.transforms import to_tensor
from fundusfm.errors import ConfigError, DataError, FundusError
from fundusfm.explain.gradcam import gradcam_maps, overlay
from fundusfm.inference import Scorer, scorer
from fundusfm.models.loaded import Bundle, load_bundle
from fundusfm.screen.quality import assess
from fundusfm.screen.report import write_report
from fundusfm.tasks.shift import COLUMNS as SHIFT_COLUMNS
from fundusfm.tasks.shift import ShiftScorer, flag_summary, shift_line, shift_scorer

MEASURES = ("fov_fraction", "brightness", "saturated", "focus")


class ScreenImages(Dataset):
    """Decode, assess and preprocess one file; errors become a row, never an exception."""

    def __init__(self, files: list[Path], bundle: Bundle, quality: QualityConfig):
        self.files, self.pre, self.quality = files, bundle.preprocessing.config(), quality

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        return prepare_item(self.files[i], self.pre, self.quality, i)


def prepare_item(path: Path, pre: PreprocessConfig, quality: QualityConfig, index: int = 0) -> dict:
    """One file as `predict` sees it before scoring: decoded, quality-checked, cropped.

    `image` is the preprocessed RxRx3 array, or None when the file is `ungradable` or
    `unreadable` (`reason` says why); errors become the item's status, never an exception.
    `fundusfm serve` prepares each upload with it too, so both give one file the same row.
    """
    item = {"index": index, "image": None, "status": "scored", "reason": "", "measures": {}}
    try:
        rgb, _ = decode_for(path, pre)
        q = assess(rgb, quality)
        item["measures"] = q.measures
        if not q.gradable:
            item.update(status="ungradable", reason="; ".join(q.reasons))
            return item
        item["image"], _ = crop_resize(rgb, pre)
    except Exception as exc:
        item.update(status="unreadable", reason=unreadable_reason(exc))
    return item


def unreadable_reason(exc: Exception) -> str:
    """Why a file is `unreadable`, in a user's words: a fundusfm error's own message (it
    names the fault), anything else as `could not decode: ...` (never a class name)."""
    if isinstance(exc, FundusError):
        return str(exc)
    return f"could not decode: {exc or 'an unexpected error in the image decoder'}"


def decisions(bundle: Bundle, probs: np.ndarray) -> list[str]:
    """Class decisions at the bundle's thresholds (multiclass: argmax; multilabel: a list)."""
    classes, thresholds = bundle.classes, bundle.thresholds
    if bundle.kind == "binary" and thresholds:
        return [classes[1] if p[1] >= thresholds[0] else classes[0] for p in probs]
    if bundle.kind == "multilabel":
        cut = thresholds or [0.5] * len(classes)
        return [
            ";".join(c for c, v, t in zip(classes, p, cut, strict=True) if v >= t) for p in probs
        ]
    return [classes[int(np.argmax(p))] for p in probs]


def decided_class(bundle: Bundle, p: np.ndarray) -> int:
    """The class whose Grad-CAM explains the decision `decisions` made for `p`.

    Binary: the class decided at the validated threshold (so an image called abnormal at a
    threshold below 0.5 shows what made it abnormal, not its argmax "normal"); multilabel:
    the most probable label among those decided (the most probable label when none is);
    multiclass: the argmax, which is the decision.
    """
    if bundle.kind == "binary" and bundle.thresholds:
        return int(p[1] >= bundle.thresholds[0])
    if bundle.kind == "multilabel":
        cut = bundle.thresholds or [0.5] * len(bundle.classes)
        above = [i for i, (v, t) in enumerate(zip(p, cut, strict=True)) if v >= t]
        return max(above, key=lambda i: p[i]) if above else int(np.argmax(p))
    return int(np.argmax(p))


def decision_overlays(bundle: Bundle, images: list[np.ndarray], probs) -> list[np.ndarray]:
    """Grad-CAM overlays (RxRx3 uint8) of the decided class of each preprocessed image, as
    `predict --gradcam` and `serve` show them (PyTorch, whatever engine scored: gradients)."""
    targets = [decided_class(bundle, p) for p in probs]
    with torch.enable_grad():
        maps = gradcam_maps(bundle, images, targets)
    return [overlay(image, cam) for image, cam in zip(images, maps, strict=True)]


def gradcam_file(out: Path, image: Path, index: int) -> Path:
    """Where `gradcam` writes the overlay of `image`, `index` its place among the images;
    the stem is cut to 100 bytes so that the name stays under the file system's limit."""
    stem = printable(image.stem).encode()[:100].decode("utf-8", "ignore")
    return out / "gradcam" / f"{stem}_{index}.png"


def _report_files(files, images, folder: Path, out: Path, gradcam: bool) -> tuple:
    """The report's links from a row's `file` to the file it read and its Grad-CAM overlay."""
    names = {p: printable(p.relative_to(folder).as_posix()) for p in files}
    cams = {names[p]: gradcam_file(out, p, i) for i, p in enumerate(images)} if gradcam else None
    return {n: p for p, n in names.items()}, cams


def default_workers() -> int:
    """Decoding processes beside inference: one per core but one (at least 1, at most 4)."""
    return max(1, min(4, (os.cpu_count() or 1) - 1))


@dataclass
class Screening:
    """What `screen` did: the predictions table, the engine that scored, its notes."""

    table: pd.DataFrame
    engine: str
    notes: list[str] = field(default_factory=list)


def _check_folders(folder: Path, out: Path, overwrite: bool) -> None:
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise DataError(f"{folder} {what}; give the folder that holds the photographs to screen")
    there, screened = out.resolve(), folder.resolve()
    if there == screened or there in screened.parents:
        raise ConfigError(f"--out {out} would hold the input folder {folder}; choose another")
    if screened in there.parents:  # its overlays and report would be screened next time
        raise ConfigError(f"--out {out} is inside the folder screened ({folder}); choose another")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"--out {out} exists and is not empty; add --overwrite to replace it, or choose "
            "another --out"
        )


def unsupported_reason(name: Path) -> str | None:
    """Why a file of this name is `unsupported` (its suffix), or None for an image suffix."""
    if name.suffix.lower() in SUPPORTED_SUFFIXES:
        return None
    return "not an image format fundusfm reads " + printable(f"({name.suffix or 'no extension'})")


def _unsupported_rows(files: list[Path], folder: Path) -> list[dict]:
    return [
        {
            "file": printable(p.relative_to(folder).as_posix()),
            "status": "unsupported",
            "reason": unsupported_reason(p),
        }
        for p in files
        if unsupported_reason(p) is not None
    ]


def _save_gradcam(bundle: Bundle, ok: list[dict], probs, images: list[Path], out: Path) -> None:
    """Thumbnails of the Grad-CAM of each image's decision (`decision_overlays`)."""
    cams = decision_overlays(bundle, [b["image"] for b in ok], probs)
    for b, cam in zip(ok, cams, strict=True):
        Image.fromarray(cam).resize((160, 160)).save(
            gradcam_file(out, images[b["index"]], b["index"])
        )


def score_items(bundle: Bundle, score: Scorer, shift: ShiftScorer, items: list[dict]) -> dict:
    """Probabilities, decision and shift columns of the gradable items, by item index."""
    ok = [b for b in items if b["image"] is not None]
    if not ok:
        return {}
    tensors = torch.stack([to_tensor(b["image"]) for b in ok])
    probs = score(tensors)
    chosen = decisions(bundle, probs)
    return {
        b["index"]: (p, d, s) for b, p, d, s in zip(ok, probs, chosen, shift(tensors), strict=True)
    }


def predictions_table(rows: list[dict], classes: list) -> pd.DataFrame:
    """`predictions.csv` as a table: one row per file, sorted by file, the columns in one
    order whatever kind of row comes first (file, status, reason, p_<class>, decision, the
    shift columns, the quality measures; anything else after them). `serve` writes its CSV
    with it too, so a file gets the same line from both."""
    order = ["file", "status", "reason", *(f"p_{c}" for c in classes), "decision"]
    order += [*SHIFT_COLUMNS, *MEASURES]
    seen = list(dict.fromkeys(k for r in rows for k in r)) or ["file", "status"]
    columns = [c for c in order if c in seen] + [c for c in seen if c not in order]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values("file", kind="stable").reset_index(drop=True)


def item_row(bundle: Bundle, item: dict, file: str, scored: tuple | None) -> dict:
    """The predictions.csv row of one item (`scored`: its entry of `score_items`, if any)."""
    row = {"file": file, "status": item["status"], "reason": printable(item["reason"])}
    if scored is not None:
        p, d, s = scored
        row.update({f"p_{c}": float(v) for c, v in zip(bundle.classes, p, strict=True)})
        row["decision"] = d
        row.update(s)
    row.update({k: item["measures"].get(k) for k in MEASURES})
    return row


def _batch_rows(
    bundle, score: Scorer, shift: ShiftScorer, batch, images, folder, out, gradcam
) -> list[dict]:
    """Score the gradable images of one loader batch; one row per item."""
    scored = score_items(bundle, score, shift, batch)
    ok = [b for b in batch if b["index"] in scored]
    if gradcam and ok:
        _save_gradcam(bundle, ok, [scored[b["index"]][0] for b in ok], images, out)
    return [
        item_row(
            bundle,
            b,
            printable(images[b["index"]].relative_to(folder).as_posix()),
            scored.get(b["index"]),
        )
        for b in batch
    ]


def _ready(bundle_path, folder: Path, out: Path, overwrite: bool, device, engine, progress):
    """The folders checked, the bundle loaded and its scorers built, then `out` emptied:
    anything that fails before leaves a previous output folder as it was."""
    _check_folders(folder, out, overwrite)
    bundle = load_bundle(bundle_path, device)  # before --overwrite removes anything
    bundle.require_classifier("predict")
    score = scorer(bundle, engine, progress)  # a graph that cannot be built: nothing removed
    shift = shift_scorer(bundle, score.engine)
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    return bundle, score, shift


@dataclass
class _Run:
    """One screening's inputs and tools, passed to its steps."""

    bundle: Bundle
    score: Scorer
    shift: ShiftScorer
    folder: Path
    out: Path
    gradcam: bool


def _rows(run: _Run, files: list[Path], images: list[Path], loader: DataLoader, progress) -> list:
    """Every file's row: the unsupported ones, then each loader batch scored."""
    rows = _unsupported_rows(files, run.folder)
    run.out.mkdir(parents=True, exist_ok=True)
    if run.gradcam:
        (run.out / "gradcam").mkdir()
    for batch in tqdm(loader, disable=not progress, desc="screening", unit="batch"):
        rows += _batch_rows(
            run.bundle, run.score, run.shift, batch, images, run.folder, run.out, run.gradcam
        )
    return rows


def _shift_notes(run: _Run, table: pd.DataFrame) -> list[str]:
    """The scorer's and shift's notes, with the share of scored images flagged shifted."""
    flags = table["shift"].dropna().tolist() if "shift" in table else []
    said = [*run.score.notes, *run.shift.notes]
    if run.shift.available and flags:
        said.append(shift_line(flag_summary(flags), "scored images"))
    return said


def screen(
    bundle_path: Path,
    folder: Path,
    out: Path,
    quality: QualityConfig | None = None,
    overwrite: bool = False,
    gradcam: bool = False,
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    engine: str = "torch",
) -> Screening:
    """Score every image under `folder` (table and report written to `out`).

    `engine` (auto, torch, onnxruntime; `fundusfm.inference`) computes the probabilities;
    `workers` processes (default `default_workers()`; 0: none) decode, assess and crop the
    next batches while one is scored.
    """
    given, folder, out, started = folder, Path(folder), Path(out), datetime.now()
    bundle, score, shift = _ready(bundle_path, folder, out, overwrite, device, engine, progress)
    run = _Run(bundle, score, shift, folder, out, gradcam)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    images = [p for p in files if p.suffix.lower() in SUPPORTED_SUFFIXES]
    loader = DataLoader(
        ScreenImages(images, bundle, quality or QualityConfig()),
        batch_size=batch_size,
        num_workers=default_workers() if workers is None else workers,
        collate_fn=list,
    )
    rows = _rows(run, files, images, loader, progress)
    table = predictions_table(rows, bundle.classes)
    table.to_csv(out / "predictions.csv", index=False)
    said = _shift_notes(run, table)
    sources, cams = _report_files(files, images, folder, out, gradcam)
    notes = [*bundle_notes(bundle.meta), *said]
    write_report(table, out, bundle, notes, score.engine, sources, cams, folder=given, when=started)
    return Screening(table, score.engine, said)
