"""Row (a): is training limited by the model's compute, or by the input pipeline?

One training epoch through the real data path - `CachedImages` reading the preprocessing
cache with augmentation, the loader `engine.loop.fit` uses (`engine.loop.training_loader`:
built once, worker processes kept across epochs, reseeded per epoch, pinned memory on CUDA),
normalisation on the device, forward, backward and optimiser step - is timed against the
same number of steps on batches that are already on the device, normalised (and
channels-last where training uses it). The two alternate (A B B A ...) so that drift on a
shared machine falls on both sides; the ratio is the pipeline's total time over the
in-memory total. 1.00 means the loader costs nothing; the issue's goal is at most 1.10.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from fundusfm.config.core import AugmentConfig, TrainConfig
from fundusfm.data.datasets import FoldData
from fundusfm.data.transforms import normalise
from fundusfm.engine.loop import amp_dtype, make_loss, training_loader
from fundusfm.models.backbone import Backbone
from fundusfm.models.heads import Classifier, make_head


@dataclass
class PipelineSetting:
    arch: str = "resnet50"
    resolution: int = 224
    batch_size: int = 32
    workers: int = 0
    rounds: int = 2
    device: str = "cpu"
    amp: bool = False  # CUDA only: bf16 (or fp16) autocast, as train.amp=auto
    channels_last: bool = False
    seed: int = 0

    def describe(self) -> str:
        extra = [f"workers {self.workers}"]
        if self.workers:
            extra.append("persistent workers")
        if self.amp:
            extra.append("AMP")
        if self.channels_last:
            extra.append("channels_last")
        return (
            f"{self.arch}, {self.resolution} px, batch {self.batch_size}, "
            f"{', '.join(extra)}, {self.device}"
        )


class _Trainer:
    """Model, optimiser and the training step of `engine.loop.fit` (one micro-batch per step)."""

    def __init__(self, s: PipelineSetting, data: FoldData, train_labels):
        self.device = torch.device(s.device)
        kind, n_classes = data.task.kind, len(data.task.class_names)
        self.multilabel = kind == "multilabel"
        torch.manual_seed(s.seed)
        backbone = Backbone(s.arch)
        self.model = Classifier(backbone, make_head("mlp", backbone.num_features, n_classes))
        self.model.to(self.device).train()
        self.channels_last = s.channels_last
        if s.channels_last:
            self.model.to(memory_format=torch.channels_last)
        cfg = TrainConfig()
        self.amp = amp_dtype("auto" if s.amp else "off", self.device)
        self.criterion = make_loss(kind, cfg, train_labels, n_classes).to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)

    def inputs(self, images: torch.Tensor, y: torch.Tensor):
        """What the training loop does to a loader batch before the forward pass."""
        x = normalise(images.to(self.device, non_blocking=True))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(self.device)
        return x, (y.float() if self.multilabel else y)

    def step(self, x: torch.Tensor, target: torch.Tensor) -> None:
        with torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext():
            loss = self.criterion(self.model(x).float(), target)
        if not torch.isfinite(loss):
            raise RuntimeError(f"the loss became {loss.item()} during the benchmark")
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def make_loader(dataset, labels, s: PipelineSetting, drop_last: bool):
    """The training loader and its generator, exactly as `engine.loop.fit` builds them."""
    cfg = TrainConfig(batch_size=s.batch_size, workers=s.workers, seed=s.seed)
    return training_loader(
        dataset, labels, "binary", cfg, s.batch_size, drop_last, torch.device(s.device)
    )


def bench_pipeline(data: FoldData, s: PipelineSetting) -> dict:
    """Alternate training epochs through the loader and on in-memory batches; time both."""
    train_rows = data.parts["train"]
    dataset = data.dataset("train", AugmentConfig(), s.seed)
    drop_last = len(dataset) > s.batch_size
    trainer = _Trainer(s, data, data.labels[train_rows])

    # The in-memory side: the epoch's batches, already normalised on the device.
    loader, generator = make_loader(dataset, data.labels[train_rows], s, drop_last)
    generator.manual_seed(s.seed * 100_003)
    resident = [trainer.inputs(images, y) for images, y, _ in loader]
    steps, images = len(resident), sum(len(y) for _, y in resident)
    trainer.step(*resident[0])  # first-call set-up (kernel selection, allocations), untimed
    trainer.sync()

    def through_loader(epoch: int) -> float:
        dataset.set_epoch(epoch)
        start = time.perf_counter()
        generator.manual_seed(s.seed * 100_003 + epoch)
        for images, y, _ in loader:
            trainer.step(*trainer.inputs(images, y))
        trainer.sync()
        return time.perf_counter() - start

    def in_memory() -> float:
        start = time.perf_counter()
        for x, target in resident:
            trainer.step(x, target)
        trainer.sync()
        return time.perf_counter() - start

    loader_s, memory_s = [], []
    for r in range(s.rounds):  # A B, then B A: a trend in machine speed hits both sides
        if r % 2 == 0:
            loader_s.append(through_loader(r + 1))
            memory_s.append(in_memory())
        else:
            memory_s.append(in_memory())
            loader_s.append(through_loader(r + 1))
    ratio = sum(loader_s) / sum(memory_s)
    return {
        "setting": s.describe(),
        "steps_per_epoch": steps,
        "images_per_epoch": images,
        "loader_epoch_s": loader_s,
        "memory_epoch_s": memory_s,
        "loader_images_per_s": images * len(loader_s) / sum(loader_s),
        "memory_images_per_s": images * len(memory_s) / sum(memory_s),
        "ratio": ratio,
    }
