"""Vessel data for segmentation: which images train and test, read at one square size.

Images and masks are brought to the `resolution` square as `data.vessel_frame` says: padded
to a square and resized (the default), or scaled so that the FOV is `fov_diameter` px wide
and centred (bilinear for the image, nearest for masks). Predictions are mapped back to each
image's own size (`vessel_frame.back_to_native`), and every metric is computed there,
against the masks as the dataset ships them: resizing never changes a score.
Metrics count FOV pixels only; a row without `fov_path` gets its FOV derived from the image.
A row without `vessel_path` (a dataset copy missing some masks) is left out of every part
and counted (`SegParts.skipped`); a manifest with no mask at all is a DataError.

Training samples get the camera-shift augmentation (`vessel_input.CameraShift`) and the
input form (`data.input`) on the image alone, then the geometric augmentation (flips,
rotation, the patch crop) on the image and both masks together (torchvision.transforms.v2
with `Mask`), so image and masks stay aligned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

from fundusfm.config.segment import InputMode, SegAugmentConfig, SegDataConfig
from fundusfm.data.adapters.vessels import derive_fov
from fundusfm.data.decode import read_mask, read_rgb
from fundusfm.data.manifest import Manifest
from fundusfm.data.splits import fold_sets
from fundusfm.data.vessel_frame import fov_frame, into_frame, square
from fundusfm.data.vessel_frame import to_native as to_native  # re-exported: older callers
from fundusfm.data.vessel_input import CameraShift, to_input
from fundusfm.errors import ConfigError, DataError

TRAIN_NAMES = {"train", "training"}
TEST_NAMES = {"test", "testing"}


@dataclass
class VesselImage:
    """One image at the training size, with its masks; `shape` is the native (H, W)."""

    image_id: str
    image: np.ndarray  # R x R x 3 uint8
    vessel: np.ndarray  # R x R bool
    fov: np.ndarray  # R x R bool
    shape: tuple[int, int]


def _fov_rel(manifest: Manifest, row: int) -> str:
    return str(manifest.table.iloc[row].get("fov_path", "") or "")


def rows_without_fov(manifest: Manifest, rows: np.ndarray) -> int:
    """How many of these rows have no `fov_path` (their FOV is derived from the image)."""
    return sum(not _fov_rel(manifest, int(r)) for r in rows)


def native_masks(manifest: Manifest, row: int) -> tuple[np.ndarray, np.ndarray]:
    """Vessel and FOV masks of a manifest row at the image's own size.

    A row without `fov_path` gets the FOV derived from its image, as the importers do: a
    whole-image FOV would count the black border as true negatives and inflate specificity,
    accuracy and AUROC.
    """
    t = manifest.table.iloc[row]
    vessel = read_mask(manifest.image_path(t["vessel_path"]))
    fov_rel = _fov_rel(manifest, row)
    if fov_rel:
        fov = read_mask(manifest.image_path(fov_rel))
    else:
        fov = derive_fov(manifest.image_path(t["path"]))
    if fov.shape != vessel.shape:
        raise DataError(
            f"{manifest.path} line {manifest.line(row)}: FOV mask {fov.shape} and vessel mask "
            f"{vessel.shape} differ in size"
        )
    return vessel, fov


_MEMO: dict[tuple, VesselImage] = {}
_MEMO_SETS: list[tuple] = []  # (manifest, size, fov_diameter) sets held, most recent last
MEMO_SETS = 2  # a grid cell reads its training set and one external set at one size


def _remember(current: tuple) -> None:
    """Mark a set as the most recently used; drop the least recently used beyond MEMO_SETS."""
    if current in _MEMO_SETS:
        _MEMO_SETS.remove(current)
    _MEMO_SETS.append(current)
    while len(_MEMO_SETS) > MEMO_SETS:
        gone = _MEMO_SETS.pop(0)
        for key in [k for k in _MEMO if (k[0], *k[3:]) == gone]:
            del _MEMO[key]


def read_vessel_image(
    manifest: Manifest, row: int, size: int, fov_diameter: int | None = None
) -> VesselImage:
    """One manifest row at the network's size (`vessel_frame`: square, or FOV-scaled)."""
    t = manifest.table.iloc[row]
    image = read_rgb(manifest.image_path(t["path"]))
    vessel, fov = native_masks(manifest, row)
    where = f"{manifest.path} line {manifest.line(row)}"
    if image.shape[:2] != vessel.shape:
        raise DataError(
            f"{where}: image {image.shape[:2]} and vessel mask {vessel.shape} differ in size"
        )
    if fov_diameter is None:
        framed = [square(a, size, nearest=a.dtype == bool) for a in (image, vessel, fov)]
    else:
        frame = fov_frame(fov, size, fov_diameter, where)
        framed = [into_frame(a, frame, nearest=a.dtype == bool) for a in (image, vessel, fov)]
    return VesselImage(str(t["image_id"]), *framed, vessel.shape)


def load_images(
    manifest: Manifest,
    rows: np.ndarray,
    size: int,
    progress: bool = True,
    fov_diameter: int | None = None,
) -> list[VesselImage]:
    """Read and frame the given rows (kept in memory for the process: grids reuse them)."""
    stamp = Path(manifest.path).stat().st_mtime_ns
    _remember((str(manifest.path), size, fov_diameter))
    out = []
    for row in tqdm(rows, desc=f"reading images at {size}px", disable=not progress, leave=False):
        key = (str(manifest.path), stamp, int(row), size, fov_diameter)
        if key not in _MEMO:
            _MEMO[key] = read_vessel_image(manifest, int(row), size, fov_diameter)
        out.append(_MEMO[key])
    return out


def _patients_subset(rows: np.ndarray, patients: np.ndarray, share: float, seed: int):
    """A random share of the patients of `rows` (at least one): (chosen rows, the others)."""
    unique = np.unique(patients[rows])
    rng = np.random.default_rng(seed)
    chosen = set(rng.permutation(unique)[: max(1, math.ceil(share * len(unique)))])
    mask = np.array([p in chosen for p in patients[rows]], dtype=bool)
    return rows[mask], rows[~mask]


def has_vessel_mask(manifest: Manifest) -> np.ndarray:
    """Per row: whether it has a vessel mask (`vessel_path` filled in). A dataset copy may
    lack some masks; those rows stay in the manifest (their labels serve classification)
    and segmentation leaves them out. None at all is a DataError."""
    t = manifest.table
    has = (t["vessel_path"].astype(str) != "").to_numpy()
    if not has.any():
        raise DataError(
            f"{manifest.path}: none of its {len(t)} images has a vessel mask (vessel_path is "
            "empty on every row); segmentation needs manual masks: import a copy with them"
        )
    return has


@dataclass
class SegParts:
    """Manifest rows of the train / val / test parts, and per part how many rows were left
    out for having no vessel mask."""

    rows: dict[str, np.ndarray]
    skipped: dict[str, int]

    def skipped_line(self) -> str | None:
        """e.g. "skipped 3 images without a vessel mask (train 2, test 1)"; None if none."""
        total = sum(self.skipped.values())
        if not total:
            return None
        parts = ", ".join(f"{p} {n}" for p, n in self.skipped.items() if n)
        return f"skipped {total} images without a vessel mask ({parts})"


def _named_parts(cfg: SegDataConfig, manifest: Manifest) -> dict[str, np.ndarray]:
    """The rows of each part of fold `cfg.fold` of a splits.csv."""
    ids = manifest.table["image_id"].astype(str).to_numpy()
    splits = pd.read_csv(cfg.splits, dtype={"image_id": str})
    named = fold_sets(splits, cfg.fold, cfg.fraction)
    row_of = {iid: i for i, iid in enumerate(ids)}
    unknown = [i for p in named.values() for i in p if i not in row_of]
    if unknown:
        raise DataError(f"{cfg.splits}: image id {unknown[0]!r} is not in {manifest.path}")
    return {p: np.array([row_of[i] for i in named.get(p, [])], int) for p in named}


def _official_parts(
    cfg: SegDataConfig, manifest: Manifest, has_mask: np.ndarray, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The manifest's split column: train (minus a validation share of patients) and test,
    rows without a vessel mask left out before the fraction and validation are drawn."""
    t = manifest.table
    if "split" not in t.columns:
        raise ConfigError(
            f"{manifest.path} has no split column: set data.splits to a splits.csv "
            "(fundusfm split) or import the dataset with `fundusfm data import`"
        )
    if cfg.fold:
        raise ConfigError("data.fold needs data.splits; the official split has one fold")
    patients = t["patient_id"].astype(str).to_numpy()
    split = t["split"].astype(str).str.lower().to_numpy()
    named = {"train": np.isin(split, list(TRAIN_NAMES)), "test": np.isin(split, list(TEST_NAMES))}
    skipped = {p: int((rows & ~has_mask).sum()) for p, rows in named.items()}
    train, test = (np.flatnonzero(named[p] & has_mask) for p in ("train", "test"))
    if cfg.fraction < 1 and len(train):
        train, _ = _patients_subset(train, patients, cfg.fraction, seed)
    val = np.array([], int)
    if cfg.val_fraction > 0 and len(train):
        val, train = _patients_subset(train, patients, cfg.val_fraction, seed + 1)
    return {"train": train, "val": val, "test": test}, skipped


def seg_parts(cfg: SegDataConfig, manifest: Manifest, seed: int) -> SegParts:
    """Manifest rows of the train / val / test parts (see SegDataConfig); rows without a
    vessel mask are left out and counted."""
    manifest.require("image_id", "path", "patient_id", "vessel_path")
    has_mask = has_vessel_mask(manifest)
    if cfg.splits is not None:
        named = _named_parts(cfg, manifest)
        skipped = {p: int((~has_mask[r]).sum()) for p, r in named.items()}
        parts = {p: r[has_mask[r]] for p, r in named.items()}
    else:
        parts, skipped = _official_parts(cfg, manifest, has_mask, seed)
    parts = {p: parts.get(p, np.array([], int)) for p in ("train", "val", "test")}
    if len(parts["train"]) == 0:
        raise DataError(f"no training images with vessel masks in {manifest.path}")
    return SegParts(parts, {p: skipped.get(p, 0) for p in parts})


class VesselTrainSet(Dataset):
    """Augmented (image, vessel, fov) tensors; `patches_per_image` random crops per image.

    The camera shift and the input form act on the whole image, then flips, rotation and
    the crop on image and masks together. Every draw comes from a generator seeded by
    (seed, epoch, index), as `CachedImages` does: the same images whatever the number of
    loader workers or processes, and a resumed run sees what an uninterrupted one would.
    """

    def __init__(
        self,
        images: list[VesselImage],
        augment: SegAugmentConfig,
        patch: int | None = None,
        patches_per_image: int = 1,
        seed: int = 0,
        input: InputMode = "rgb",
    ):
        self.images, self.patch, self.per_image, self.seed = images, patch, patches_per_image, seed
        self.input = input
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # seen by workers
        geometric = []
        if augment.flip:
            geometric += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
        if augment.rotate:
            geometric.append(v2.RandomRotation(augment.rotate))
        if patch is not None:
            geometric.append(v2.RandomCrop(patch))
        self.geometric = v2.Compose(geometric or [v2.Identity()])
        self.camera = CameraShift(augment)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.images) * self.per_image

    def __getitem__(self, i: int):
        s = self.images[i // self.per_image]
        image = torch.from_numpy(s.image).permute(2, 0, 1).contiguous()
        masks = tv_tensors.Mask(torch.from_numpy(np.stack([s.vessel, s.fov])).to(torch.uint8))
        draw = np.random.default_rng([self.seed, int(self._epoch), i]).integers(2**63)
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global generator
            torch.manual_seed(int(draw))
            image = tv_tensors.Image(to_input(self.camera(image), self.input))
            image, masks = self.geometric(image, masks)
        return image.as_subclass(torch.Tensor), masks[0].float(), masks[1].float()


def batch_of(images: list[VesselImage]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unaugmented uint8 images and float masks of a list of samples."""
    x = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in images])
    vessel = torch.stack([torch.from_numpy(s.vessel) for s in images]).float()
    fov = torch.stack([torch.from_numpy(s.fov) for s in images]).float()
    return x, vessel, fov
