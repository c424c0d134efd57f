"""A bundle loaded as a model for inference: its architecture built, its weights verified and
loaded, and `predict` applying the bundle's own normalisation (`bundle.read_preprocessing`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fundusfm.bundle import BundleMeta, Preprocessing, read_bundle, read_preprocessing
from fundusfm.data.transforms import normalise, to_tensor
from fundusfm.data.vessel_input import to_input
from fundusfm.errors import DataError, WeightsError
from fundusfm.models.backbone import build_backbone
from fundusfm.models.heads import Classifier, make_head, scores_from_logits
from fundusfm.models.unet import build_unet, vessel_probabilities


class Features(torch.nn.Module):
    """A backbone alone (an imported foundation model): its pooled features."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.pool(x)


def build_model(meta: BundleMeta) -> torch.nn.Module:
    """An untrained model with the architecture a bundle describes (Classifier, U-Net or a
    backbone alone)."""
    a = meta.architecture
    if meta.segmentation:
        return build_unet(a.arch, a.decoder_channels)
    resolution = meta.preprocessing.resolution
    backbone = build_backbone(a.arch, resolution, a.timm_kwargs, a.pool, a.input_mean, a.input_std)
    if a.type == "backbone":
        return Features(backbone)
    head = make_head(a.head or "linear", backbone.num_features, a.outputs, a.hidden, a.dropout)
    return Classifier(backbone, head)


@dataclass
class Bundle:
    """A loaded bundle: metadata, the model in eval mode, and prediction."""

    path: Path
    meta: BundleMeta
    model: torch.nn.Module

    @property
    def kind(self) -> str:
        return self.meta.task.kind

    @property
    def classes(self) -> list[str]:
        return list(self.meta.task.classes)

    def require_classifier(self, use: str) -> None:
        """Refuse a vessel U-Net or a backbone alone where `use` needs classes."""
        if self.kind == "segmentation":
            raise WeightsError(f"{use} takes classifiers; {self.path} segments vessels: "
                               "use `fundusfm segment eval`")  # fmt: skip
        if self.kind == "features":
            raise WeightsError(
                f"{use} takes classifiers; {self.path} is a backbone alone (imported "
                "weights, no classes): fine-tune it first, e.g. `fundusfm finetune --set "
                f"model.init={self.path}`"
            )

    @property
    def preprocessing(self) -> Preprocessing:
        return read_preprocessing(self.meta)

    @property
    def resolution(self) -> int:
        return self.preprocessing.resolution

    @property
    def thresholds(self) -> list[float]:
        """Decision thresholds (binary: of the positive class; multiclass: none, argmax)."""
        return [float(t) for t in self.meta.task.thresholds]

    @property
    def thresholds_validated(self) -> bool:
        """False when the thresholds were not chosen on validation data (imported, one class)."""
        return self.meta.task.thresholds_validated

    @torch.no_grad()
    def predict(self, images, batch_size: int = 32) -> np.ndarray:
        """Probabilities for preprocessed images (RxRx3 uint8 arrays or a uint8 batch):
        (N, C) for a classifier, (N, F) pooled features for a backbone alone, (N, R, R)
        vessel probabilities for a segmentation bundle
        (images framed as it says, `data.vessel_frame`; its input form and test-time flips
        are applied here)."""
        if isinstance(images, torch.Tensor):
            batch = images if images.dim() == 4 else images.unsqueeze(0)
        else:
            arrays = [np.asarray(a) for a in images]
            if any(a.ndim != 3 or a.shape[2] != 3 for a in arrays):
                raise DataError("images must be HxWx3 RGB arrays (fundusfm.data.decode.read_rgb)")
            batch = torch.stack([to_tensor(a) for a in arrays])
        if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[1] != 3:
            raise DataError(
                f"expected uint8 images with 3 channels (N x 3 x H x W or HxWx3 arrays), got "
                f"{batch.dtype} {tuple(batch.shape)}; the bundle normalises them itself"
            )
        if batch.shape[-1] != self.resolution or batch.shape[-2] != self.resolution:
            raise DataError(
                f"images are {tuple(batch.shape[-2:])}, the bundle expects "
                f"{self.resolution}x{self.resolution} (preprocess them with its settings)"
            )
        device = next(self.model.parameters()).device
        pre = self.preprocessing
        mean, std = pre.mean, pre.std
        out = []
        for i in range(0, len(batch), batch_size):
            x = batch[i : i + batch_size].to(device)
            if self.kind == "segmentation":
                x = normalise(to_input(x, pre.input), mean, std)
                out.append(vessel_probabilities(self.model, x, pre.tta_flips).cpu())
            elif self.kind == "features":
                out.append(self.model(normalise(x, mean, std)).float().cpu())
            else:
                logits = self.model(normalise(x, mean, std))
                out.append(scores_from_logits(logits, self.kind).float().cpu())
        return torch.cat(out).numpy()


def load_bundle(path: Path, device: str = "cpu") -> Bundle:
    """Load a bundle for inference (weights verified, model in eval mode on `device`)."""
    meta, state = read_bundle(path)
    model = build_model(meta)
    model.load_state_dict(state)
    model.eval().to(device)
    return Bundle(Path(path), meta, model)
