"""Classification heads and the Classifier (backbone + head) that training and bundles share."""

from __future__ import annotations

import torch
from torch import nn

from fundusfm.errors import ConfigError
from fundusfm.models.backbone import Backbone

HEADS = ("linear", "mlp")


def make_head(
    kind: str, in_features: int, num_classes: int, hidden: int = 512, dropout: float = 0.0
) -> nn.Module:
    """`linear`, or `mlp`: the paper's Linear(F, 512) -> BatchNorm1d -> ReLU -> Linear(512, C)."""
    if kind == "linear":
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout else []
        return nn.Sequential(*layers, nn.Linear(in_features, num_classes))
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            *([nn.Dropout(dropout)] if dropout else []),
            nn.Linear(hidden, num_classes),
        )
    raise ConfigError(f"unknown head {kind!r}; choose one of {HEADS}")


def scores_from_logits(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Class probabilities: softmax for binary/multiclass, sigmoid per label for multilabel."""
    return torch.sigmoid(logits) if kind == "multilabel" else torch.softmax(logits, dim=1)


class Classifier(nn.Module):
    """Backbone features pooled, then a head. Its state dict is what bundles store."""

    def __init__(self, backbone: Backbone, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.pool(x))
