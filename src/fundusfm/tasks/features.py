"""Frozen backbone features, extracted once per (weights, resolution, preprocessing, images).

The linear protocol (LF) of the grid fits every fold x fraction head on the same features,
so the backbone runs once per init and resolution instead of once per epoch per cell
(DINOv2's practice). Features are pooled in eval mode, without augmentation, and stored as
`<root>/<key>.npy` with `<key>.json` naming the rows; the key hashes the backbone weights,
the backbone's pooling and input normalisation, the preprocessing settings and every image's
path, size and modification time, so a changed input can never return stale features.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from fundusfm.data.datasets import CachedImages, FoldData
from fundusfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalise
from fundusfm.io import value_sha256, write_json, write_npy
from fundusfm.models.backbone import Backbone


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state (names, shapes and values), independent of device."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def feature_key(backbone: Backbone, data: FoldData) -> str:
    rows = []
    for source in data.sources(np.arange(len(data.manifest.table))):
        entry = data.cache.index[str(source)]
        rows.append([str(source), int(entry["size"]), int(entry["mtime_ns"])])
    blob = {"weights": weights_digest(backbone), "cache": data.cache.dir.name, "rows": rows}
    spec = {k: v for k, v in backbone.spec().items() if k != "arch" and v is not None}
    if spec:  # pooling, timm settings, normalisation (a plain ResNet's keys are unchanged)
        blob["spec"] = spec
    return value_sha256(blob)[:20]


@torch.no_grad()
def extract(
    backbone: Backbone,
    dataset,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> np.ndarray:
    """Pooled features (N x num_features) of every image of `dataset`, in its order.

    `mean`/`std`: the normalisation the backbone was trained with (a bundle's own).
    """
    backbone.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    out = []
    for images, _, _ in tqdm(loader, desc="features", disable=not progress, leave=False):
        out.append(backbone.pool(normalise(images.to(device), mean, std)).float().cpu())
    return torch.cat(out).numpy()


def cached_features(
    backbone: Backbone,
    data: FoldData,
    root: Path,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
) -> tuple[np.ndarray, bool]:
    """Features of every manifest row, from `root` when present; also says if it was a hit."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    key = feature_key(backbone, data)
    path = root / f"{key}.npy"
    if path.is_file():
        return np.load(path), True
    rows = np.arange(len(data.manifest.table))
    dataset = CachedImages(data.cache, data.sources(rows), data.labels[rows])
    features = extract(backbone, dataset, batch_size, device, progress)
    write_npy(path, features)
    record = {
        "manifest": str(data.manifest.path),
        "arch": backbone.arch,
        "cache": str(data.cache.dir),
        "image_ids": data.manifest.table["image_id"].tolist(),
    }
    write_json(root / f"{key}.json", record)
    return features, False
