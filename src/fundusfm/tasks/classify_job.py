"""What classification hands the engine loop: which layers train, the loss, the training
order and the validation score that picks the best epoch (`engine.loop.Job`)."""

from __future__ import annotations

import math

import numpy as np
import torch
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.utils.data import RandomSampler, WeightedRandomSampler

from fundusfm.config.core import TrainConfig
from fundusfm.data.datasets import FoldData
from fundusfm.engine import distributed as ddp
from fundusfm.engine.device import Runtime
from fundusfm.engine.loop import Job
from fundusfm.engine.predict import predict
from fundusfm.errors import ConfigError, DataError
from fundusfm.evaluation.metrics import classification_metrics, validation_loss
from fundusfm.models.heads import Classifier
from fundusfm.models.timm_backbone import TimmBackbone

LOWER_IS_BETTER = {"brier", "loss"}
MATCH_PREV_GROUP = (99999,)  # timm's mark of a group folded into the one before it


def set_trainable(model: Classifier, method: str, partial_stages: int = 1) -> list[nn.Module]:
    """Freeze what the method does not train; return the modules to keep in eval mode.

    `lf` trains only the head on a frozen backbone (its BatchNorm statistics frozen too),
    `ff` trains everything, `partial` the last k residual stages and the head.
    """
    stages = model.backbone.stages()
    trained = {"lf": 0, "ff": len(stages), "partial": partial_stages}[method]
    frozen = stages[: len(stages) - trained]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    return frozen


def make_loss(kind: str, cfg: TrainConfig, train_labels: np.ndarray, n_classes: int):
    if kind == "multilabel":
        pos_weight = None
        if cfg.class_weighted_loss:
            pos = train_labels.sum(axis=0).clip(min=1)
            pos_weight = torch.tensor((len(train_labels) - pos) / pos, dtype=torch.float32)
        return nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    weight = None
    if cfg.class_weighted_loss:
        counts = np.bincount(train_labels, minlength=n_classes).clip(min=1)
        weight = torch.tensor(len(train_labels) / (n_classes * counts), dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def check_select_metric(kind: str, metric: str, val_labels: np.ndarray, n_classes: int) -> None:
    """Fail before training when the selection metric cannot be computed on this validation part.

    A validation part that lacks a class leaves AUROC undefined or partial: selection would
    silently keep the first epoch. Better to say so and let the user choose.
    """
    if metric == "loss":
        return
    scores = np.random.default_rng(0).dirichlet(np.ones(n_classes), size=len(val_labels))
    probe = classification_metrics(kind, val_labels, scores)
    if metric not in probe:
        raise ConfigError(
            f"train.select_metric={metric!r} is not a {kind} metric; choose one of "
            f"{sorted([*probe, 'loss'])}"
        )
    partial = probe.get("classes_scored", n_classes) < n_classes
    if math.isnan(probe[metric]) or (partial and metric.startswith(("auroc", "auprc"))):
        raise DataError(
            f"validation {metric} is undefined or partial: the validation part "
            f"({len(val_labels)} images) lacks some classes. Set train.select_metric=loss, or "
            "make validation parts larger (`fundusfm split ... --set val_fraction=0.2`)"
        )


def make_sampler(labels: np.ndarray, kind: str, balanced: bool, generator: torch.Generator):
    """Training order: a shuffle, or draws in proportion 1/class count (`balanced_sampler`)."""
    if not balanced:
        return RandomSampler(range(len(labels)), generator=generator)
    if kind == "multilabel":
        raise ConfigError("train.balanced_sampler needs a binary or multiclass task")
    counts = np.bincount(labels).astype(float)
    weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
    return WeightedRandomSampler(weights, len(labels), replacement=True, generator=generator)


def classification_loss(kind: str, criterion: nn.Module):
    """The loop's loss(logits, targets) for a classification criterion (targets[0]: labels)."""

    placed: list[torch.device] = []  # the criterion (its class weights) moves once

    def loss(logits: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        if placed != [logits.device]:
            criterion.to(logits.device)
            placed[:] = [logits.device]
        y = targets[0]
        return criterion(logits, y.float() if kind == "multilabel" else y)

    return loss


class _OwnTopNorm:
    """A ViT as timm's layer decay sees it, but with the final norm a layer of its own on top
    (BEiT, MAE, RETFound): timm's ViT matcher folds it into the last block, which would then
    train at the full lr instead of lr * decay."""

    def __init__(self, net: nn.Module):
        self.net = net

    def named_parameters(self, *args, **kwargs):
        return self.net.named_parameters(*args, **kwargs)

    def group_matcher(self, coarse: bool = False) -> dict:
        def own(spec):
            if not isinstance(spec, list | tuple):
                return spec
            top = (MATCH_PREV_GROUP[0] - 1,)
            return [
                (regex, top if suffix == MATCH_PREV_GROUP else suffix) for regex, suffix in spec
            ]

        return {k: own(v) for k, v in self.net.group_matcher(coarse=coarse).items()}


def optimizer_groups(model: Classifier, cfg: TrainConfig) -> list[dict] | None:
    """The optimiser's parameter groups: None (all trainable parameters, one group) unless
    `train.layer_decay` is set. Then layer-wise lr decay: timm's groups of the backbone
    (`param_groups_layer_decay`; a ViT's stem, i.e. patch embedding, class token and position
    embedding, is layer 0, block k layer k + 1, its final norm the top) at
    lr * layer_decay ** (top - layer), no weight decay on 1-d parameters and those the timm
    model names in `no_weight_decay()`, and the head (all outside the backbone) at the full lr.
    A torchvision ResNet decays by stage (`_stage_groups`). Only trainable parameters appear
    (freeze first); a model gives the same groups every run, so that a resumed optimiser
    state fits."""
    if cfg.layer_decay is None:
        return None
    backbone = model.backbone
    if not isinstance(backbone, TimmBackbone):
        return _stage_groups(model, cfg)
    if not hasattr(backbone.net, "group_matcher"):
        raise ConfigError(
            f"train.layer_decay: {backbone.arch} has no layer grouping in timm; "
            "unset train.layer_decay"
        )
    net = backbone.net
    groups = param_groups_layer_decay(
        _OwnTopNorm(net) if backbone.is_vit else net,
        weight_decay=cfg.weight_decay,
        no_weight_decay_list=getattr(net, "no_weight_decay", set)(),
        layer_decay=cfg.layer_decay,
    )
    for group in groups:
        group["lr"] = cfg.lr * group["lr_scale"]
    in_net = {id(p) for p in net.parameters()}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_net]
    if rest:
        groups.append(
            {"params": rest, "lr": cfg.lr, "lr_scale": 1.0, "weight_decay": cfg.weight_decay}
        )
    return groups


def _stage_groups(model: Classifier, cfg: TrainConfig) -> list[dict]:
    """A torchvision ResNet's layer-wise decay, so that one grid can mix it with ViTs: its
    stem is layer 0, residual stage k layer k, the head the top (5): lr * decay ** (5 - k);
    weight decay as without it (every parameter)."""
    stages = model.backbone.stages()
    groups = []
    for k, stage in enumerate(stages):
        params = [p for p in stage.parameters() if p.requires_grad]
        scale = cfg.layer_decay ** (len(stages) - k)
        groups.append({"params": params, "lr": cfg.lr * scale, "lr_scale": scale,
                       "weight_decay": cfg.weight_decay})  # fmt: skip
    head = [p for p in model.head.parameters() if p.requires_grad]
    groups.append({"params": head, "lr": cfg.lr, "lr_scale": 1.0, "weight_decay": cfg.weight_decay})
    return [g for g in groups if g["params"]]


def classification_job(
    model: Classifier, data: FoldData, cfg: TrainConfig, method: str, partial_stages: int = 1
) -> Job:
    """The loop's job for one fold: train on `data`'s training part, select on its validation;
    with `train.layer_decay`, layer-wise lr decay (`optimizer_groups`)."""
    kind, n_classes = data.task.kind, len(data.task.class_names)
    train_labels = data.labels[data.parts["train"]]
    check_select_metric(kind, cfg.select_metric, data.labels[data.parts["val"]], n_classes)
    criterion = make_loss(kind, cfg, train_labels, n_classes)
    val_set = data.dataset("val")
    frozen = set_trainable(model, method, partial_stages)  # before the groups: trainable only

    def validate(m: nn.Module, rt: Runtime) -> dict[str, float]:
        scores, labels, _ = ddp.gather_predictions(*predict(m, ddp.shard(val_set), rt, kind))
        metrics = classification_metrics(kind, labels, scores)
        return {**metrics, "loss": validation_loss(kind, labels, scores)}

    return Job(
        model=model,
        frozen=frozen,
        param_groups=optimizer_groups(model, cfg),
        train_set=data.dataset("train", cfg.augment, cfg.seed),
        loss=classification_loss(kind, criterion),
        validate=validate,
        select=cfg.select_metric,
        lower_is_better=cfg.select_metric in LOWER_IS_BETTER,
        sampler=lambda g: make_sampler(train_labels, kind, cfg.balanced_sampler, g),
    )
