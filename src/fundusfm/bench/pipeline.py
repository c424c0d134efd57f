"""Row (a): is training limited by the model's compute, or by the input pipeline?

One training epoch through the real data path - `CachedImages` reading the preprocessing
cache with augmentation, the loader `engine.loop.fit` uses (`engine.loop.training_loader`:
built once, worker processes kept across epochs, reseeded per epoch, pinned memory on CUDA)
and the engine's own training epoch (`engine.loop.Trainer.epoch`: normalisation on the
device, forward, backward, optimiser and schedule step) - is timed against the same
`Trainer.epoch` on the same batches held on the device. The two alternate (A B B A ...)
so that drift on a shared machine falls on both sides; the ratio is the pipeline's total
time over the in-memory total. 1.00 means the loader costs nothing; the goal is at most 1.10.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fundusfm.config.core import AugmentConfig, TrainConfig
from fundusfm.data.datasets import FoldData
from fundusfm.engine.device import Runtime
from fundusfm.engine.loop import Job, Trainer, batches_per_epoch, training_loader
from fundusfm.models.backbone import Backbone
from fundusfm.models.heads import Classifier, make_head
from fundusfm.tasks.classify_job import classification_loss, make_loss


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


def _trainer(s: PipelineSetting, data: FoldData, dataset) -> tuple[Trainer, TrainConfig]:
    """The engine's own `Trainer` (model, optimiser, schedule, scaler, step) for the setting."""
    kind, n_classes = data.task.kind, len(data.task.class_names)
    cfg = TrainConfig(
        batch_size=s.batch_size,
        workers=s.workers,
        seed=s.seed,
        amp="auto" if s.amp else "off",
        channels_last="on" if s.channels_last else "off",
    )
    torch.manual_seed(s.seed)
    backbone = Backbone(s.arch)
    model = Classifier(backbone, make_head("mlp", backbone.num_features, n_classes))
    criterion = make_loss(kind, cfg, data.labels[data.parts["train"]], n_classes)
    job = Job(model=model, train_set=dataset, loss=classification_loss(kind, criterion))
    rt = Runtime.of(torch.device(s.device), cfg.amp, cfg.channels_last, s.batch_size, s.workers)
    return Trainer(job, cfg, rt, batches_per_epoch(len(dataset), s.batch_size)[0]), cfg


def bench_pipeline(data: FoldData, s: PipelineSetting) -> dict:
    """Alternate training epochs through the loader and on in-memory batches; time both."""
    dataset = data.dataset("train", AugmentConfig(), s.seed)
    trainer, cfg = _trainer(s, data, dataset)
    drop_last = batches_per_epoch(len(dataset), s.batch_size)[1]
    loader, generator = training_loader(trainer.job, cfg, trainer.rt, drop_last)

    # The in-memory side: the epoch's uint8 batches, already on the device.
    generator.manual_seed(s.seed * 100_003)
    device = trainer.rt.device
    resident = [tuple(t.to(device) for t in batch) for batch in loader]
    steps, images = len(resident), sum(len(b[0]) for b in resident)
    trainer.epoch(resident[:1])  # first-call set-up (kernel selection, allocations), untimed
    trainer.sync()

    def through_loader(epoch: int) -> float:
        dataset.set_epoch(epoch)
        start = time.perf_counter()
        generator.manual_seed(s.seed * 100_003 + epoch)
        trainer.epoch(loader, epoch)
        trainer.sync()
        return time.perf_counter() - start

    def in_memory() -> float:
        start = time.perf_counter()
        trainer.epoch(resident)
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
