"""Classification scores of every image of a dataset, in eval mode (validation, test, evaluate)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fundusfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fundusfm.engine.device import Runtime
from fundusfm.models.heads import scores_from_logits


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset,
    rt: Runtime,
    kind: str,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores, labels and dataset indices of every image of `dataset` (items: image, y, index).

    `mean`/`std` normalise the uint8 images: a bundle's own (`Bundle.preprocessing`) when
    scoring a bundle; models trained here use ImageNet's.
    """
    model.eval()
    loader = DataLoader(dataset, batch_size=rt.batch_size, shuffle=False, num_workers=rt.workers)
    scores, labels, index = [], [], []
    for images, y, i in loader:
        with rt.autocast():
            logits = model(rt.inputs(images, mean, std))
        scores.append(scores_from_logits(logits.float(), kind).cpu())
        labels.append(y)
        index.append(i)
    if not index:  # an empty share (more ranks than images)
        return np.zeros((0,)), np.zeros((0,)), np.zeros((0,), dtype=np.int64)
    return torch.cat(scores).numpy(), torch.cat(labels).numpy(), torch.cat(index).numpy()
