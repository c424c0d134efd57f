"""Predictions in eval mode: classification scores of every image of a dataset (validation,
test, evaluate; `score_dataset` takes any scorer, `predict` a model) and vessel
probabilities of a list of vessel images (segmentation)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fundusfm.config.segment import InputMode
from fundusfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fundusfm.data.vessel_images import VesselImage, batch_of
from fundusfm.data.vessel_input import to_input
from fundusfm.engine import distributed as ddp
from fundusfm.engine.device import Runtime
from fundusfm.models.heads import scores_from_logits
from fundusfm.models.unet import vessel_probabilities


@torch.no_grad()
def score_dataset(
    score: Callable[[torch.Tensor], np.ndarray], dataset, batch_size: int, workers: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores, labels and dataset indices of every image of `dataset` (items: uint8 image,
    y, index); `score` turns a uint8 batch into probabilities (a model on a device here, or
    any engine's scorer, `fundusfm.inference.scorer`)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    scores, labels, index = [], [], []
    for images, y, i in loader:
        scores.append(np.asarray(score(images), dtype=np.float32))
        labels.append(y)
        index.append(i)
    if not index:  # an empty share (more ranks than images)
        return np.zeros((0,)), np.zeros((0,)), np.zeros((0,), dtype=np.int64)
    return np.concatenate(scores), torch.cat(labels).numpy(), torch.cat(index).numpy()


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

    def score(images: torch.Tensor) -> np.ndarray:
        with rt.autocast():
            logits = model(rt.inputs(images, mean, std))
        return scores_from_logits(logits.float(), kind).cpu().numpy()

    return score_dataset(score, dataset, rt.batch_size, rt.workers)


@torch.no_grad()
def predict_vessels(
    model,
    images: list[VesselImage],
    rt: Runtime,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    input: InputMode = "rgb",
    tta_flips: bool = False,
) -> np.ndarray:
    """Vessel probabilities (N x R x R) at the training size; `mean`/`std`, `input` (the
    input form, `data.vessel_input`) and `tta_flips`: a bundle's own or the run's."""
    model.eval()
    out = []
    for i in range(0, len(images), rt.batch_size):
        x, _, _ = batch_of(images[i : i + rt.batch_size])
        with rt.autocast():
            probs = vessel_probabilities(model, rt.inputs(to_input(x, input), mean, std), tta_flips)
        out.append(probs.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1, 1), np.float32)


def predict_vessels_sharded(
    model, images: list[VesselImage], rt: Runtime, input: InputMode = "rgb", tta_flips=False
) -> np.ndarray:
    """`predict_vessels` of every image; under torchrun each rank predicts a share."""
    rows = np.arange(ddp.rank(), len(images), ddp.world_size())
    probs = predict_vessels(model, [images[i] for i in rows], rt, input=input, tta_flips=tta_flips)
    return ddp.gather_predictions(probs, rows, rows)[0]
