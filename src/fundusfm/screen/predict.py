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
summarises the run (engine included), with Grad-CAM thumbnails when asked for; the maps
always come from PyTorch. An existing output folder is refused without overwrite.
"""

from __future__ import annotations

import base64
import html
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fundusfm.bundle import bundle_notes
from fundusfm.config.screen import QualityConfig
from fundusfm.data.decode import SUPPORTED_SUFFIXES
from fundusfm.data.manifest import printable
from fundusfm.data.preprocess import crop_resize, decode_for
from fundusfm.data.transforms import to_tensor
from fundusfm.explain.gradcam import gradcam_maps, overlay
from fundusfm.inference import Scorer, scorer
from fundusfm.models.loaded import Bundle, load_bundle
from fundusfm.screen.quality import assess
from fundusfm.tasks.shift import ShiftScorer, flag_summary, shift_line, shift_scorer

MEASURES = ("fov_fraction", "brightness", "saturated", "focus")


class ScreenImages(Dataset):
    """Decode, assess and preprocess one file; errors become a row, never an exception."""

    def __init__(self, files: list[Path], bundle: Bundle, quality: QualityConfig):
        self.files, self.pre, self.quality = files, bundle.preprocessing.config(), quality

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        item = {"index": i, "image": None, "status": "scored", "reason": "", "measures": {}}
        try:
            rgb, _ = decode_for(self.files[i], self.pre)
            q = assess(rgb, self.quality)
            item["measures"] = q.measures
            if not q.gradable:
                item.update(status="ungradable", reason="; ".join(q.reasons))
                return item
            item["image"], _ = crop_resize(rgb, self.pre)
        except Exception as exc:
            item.update(status="unreadable", reason=f"{type(exc).__name__}: {exc}")
        return item


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


def _thumbnail(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_report(
    table: pd.DataFrame, out: Path, bundle_path: Path, notes: list[str], engine: str = ""
) -> Path:
    counts = table["status"].value_counts().to_dict()
    parts = [
        "<h1>fundusfm screening report</h1>",
        f"<p>bundle: {html.escape(str(bundle_path))}<br>"
        + (f"engine: {html.escape(engine)}<br>" if engine else "")
        + ", ".join(f"{k}: {v}" for k, v in counts.items())
        + "</p>",
        *(f"<p><strong>note:</strong> {html.escape(n)}</p>" for n in notes),
    ]
    cams = sorted((out / "gradcam").glob("*.png")) if (out / "gradcam").is_dir() else []
    for cam in cams[:200]:
        parts.append(
            f'<figure style="display:inline-block;margin:4px"><img width="160" '
            f'src="data:image/png;base64,{_thumbnail(cam)}"/>'
            f"<figcaption>{html.escape(cam.stem)}</figcaption></figure>"
        )
    parts.append(table.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="", border=0))
    style = "body{font-family:sans-serif;margin:2em}table{font-size:12px;border-collapse:collapse}"
    page = f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head>"
    (out / "report.html").write_text(page + f"<body>{''.join(parts)}</body></html>", "utf-8")
    return out / "report.html"


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
        raise FileNotFoundError(f"not a folder: {folder}")
    if out.resolve() == folder.resolve() or out.resolve() in folder.resolve().parents:
        raise ValueError(f"--out {out} would hold the input folder {folder}; choose another")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; use --overwrite or another --out")


def _unsupported_rows(files: list[Path], folder: Path) -> list[dict]:
    return [
        {
            "file": printable(p.relative_to(folder).as_posix()),
            "status": "unsupported",
            "reason": "not an image format fundusfm reads "
            + printable(f"({p.suffix or 'no extension'})"),
        }
        for p in files
        if p.suffix.lower() not in SUPPORTED_SUFFIXES
    ]


def _save_gradcam(bundle: Bundle, ok: list[dict], probs, images: list[Path], out: Path) -> None:
    """Thumbnails of the predicted class's map (Grad-CAM runs in PyTorch: it needs gradients)."""
    targets = [int(np.argmax(p)) for p in probs]
    with torch.enable_grad():
        maps = gradcam_maps(bundle, [b["image"] for b in ok], targets)
    for b, cam in zip(ok, maps, strict=True):
        thumb = Image.fromarray(overlay(b["image"], cam)).resize((160, 160))
        thumb.save(out / "gradcam" / f"{printable(images[b['index']].stem)}_{b['index']}.png")


def _batch_rows(
    bundle, score: Scorer, shift: ShiftScorer, batch, images, folder, out, gradcam
) -> list[dict]:
    """Score the gradable images of one loader batch; one row per item."""
    ok = [b for b in batch if b["image"] is not None]
    scored = {}
    if ok:
        tensors = torch.stack([to_tensor(b["image"]) for b in ok])
        probs = score(tensors)
        chosen = decisions(bundle, probs)
        scored = {
            b["index"]: (p, d, s)
            for b, p, d, s in zip(ok, probs, chosen, shift(tensors), strict=True)
        }
        if gradcam:
            _save_gradcam(bundle, ok, probs, images, out)
    rows = []
    for b in batch:
        row = {
            "file": printable(images[b["index"]].relative_to(folder).as_posix()),
            "status": b["status"],
            "reason": printable(b["reason"]),
        }
        if b["index"] in scored:
            p, d, s = scored[b["index"]]
            row.update({f"p_{c}": float(v) for c, v in zip(bundle.classes, p, strict=True)})
            row["decision"] = d
            row.update(s)
        row.update({k: b["measures"].get(k) for k in MEASURES})
        rows.append(row)
    return rows


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
    """Score every image under `folder` (table also written to `out`).

    `engine` (auto, torch, onnxruntime; `fundusfm.inference`) computes the probabilities;
    `workers` processes (default `default_workers()`; 0: none) decode, assess and crop the
    next batches while one is scored.
    """
    folder, out = Path(folder), Path(out)
    _check_folders(folder, out, overwrite)
    bundle = load_bundle(bundle_path, device)  # before --overwrite removes anything
    if bundle.kind == "segmentation":
        raise ValueError("predict screens with classifiers; use `fundusfm segment eval`")
    score = scorer(bundle, engine, progress)  # a graph that cannot be built: nothing removed
    shift = shift_scorer(bundle, score.engine)
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    images = [p for p in files if p.suffix.lower() in SUPPORTED_SUFFIXES]
    rows = _unsupported_rows(files, folder)
    out.mkdir(parents=True, exist_ok=True)
    if gradcam:
        (out / "gradcam").mkdir()
    loader = DataLoader(
        ScreenImages(images, bundle, quality or QualityConfig()),
        batch_size=batch_size,
        num_workers=default_workers() if workers is None else workers,
        collate_fn=list,
    )
    for batch in tqdm(loader, disable=not progress, desc="screening", unit="batch"):
        rows += _batch_rows(bundle, score, shift, batch, images, folder, out, gradcam)
    table = pd.DataFrame(rows).sort_values("file", kind="stable").reset_index(drop=True)
    table.to_csv(out / "predictions.csv", index=False)
    scored = table["shift"].dropna().tolist() if "shift" in table else []
    said = [*score.notes, *shift.notes]
    if shift.available and scored:
        said.append(shift_line(flag_summary(scored), "scored images"))
    write_report(table, out, bundle_path, [*bundle_notes(bundle.meta), *said], score.engine)
    return Screening(table, score.engine, said)
