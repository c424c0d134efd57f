"""The one training loop: pretraining, fine-tuning, segmentation and the benchmarks run it.

A task hands `fit` a `Job` (its model, training images, loss and validation score); the loop
owns the rest: device, mixed precision (autocast + GradScaler), channels-last, the DDP wrap
and sampler under torchrun, gradient accumulation, cosine schedule with warm-up, early
stopping, resume, the stop on a non-finite loss, atomic checkpoints and the choice of the best
epoch. After every epoch the job's `validate` scores the model; the best epoch by
`job.select` is kept (`best.safetensors`) and a full checkpoint (`checkpoint.pt`: weights,
optimiser, schedule, scaler, RNG states; tensors and numbers only, read back with
`weights_only=True`) is written atomically, so `resume` continues a killed run to the same
result as an uninterrupted one. Without `validate` the last epoch is kept. Under torchrun
`batch_size` stays the global batch, every rank takes its share of the same order
(`distributed.ShardSampler`) and rank 0 writes every file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler
from tqdm import tqdm

from fundusfm.config.core import LoopConfig
from fundusfm.engine import distributed as ddp
from fundusfm.engine.checkpoint import save_atomic, save_weights
from fundusfm.engine.device import Runtime, resolve_device
from fundusfm.errors import ConfigError, DataError, TrainingDiverged


@dataclass
class FitResult:
    best_epoch: int
    best_metric: float
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False


@dataclass
class Job:
    """What a task hands the loop.

    `train_set` yields (uint8 3xHxW image, *targets) and may have `set_epoch(epoch)` to reseed
    its augmentation; `loss(logits, targets)` gets the targets on the device; `validate(model,
    runtime)` returns the epoch's validation metrics (every rank calls it; it gathers across
    ranks itself) and `select` names the one that picks the best epoch; `sampler(generator)`
    gives the training order (default: a shuffle); `frozen` modules stay in eval mode;
    `param_groups` (the optimiser's groups, each with its own `lr`/`weight_decay`, e.g. layer-wise
    lr decay) replace the one group of all trainable parameters; frozen ones are left out.
    """

    model: nn.Module
    train_set: Dataset
    loss: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]
    validate: Callable[[nn.Module, Runtime], dict[str, float]] | None = None
    select: str = "loss"
    lower_is_better: bool = True  # as for the default, a loss; say False for Dice, AUROC...
    sampler: Callable[[torch.Generator], Sampler[int]] | None = None
    frozen: list[nn.Module] = field(default_factory=list)
    param_groups: list[dict] | None = None


def train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    """Training mode, except frozen parts: their BatchNorm statistics must not move."""
    model.train()
    for module in frozen:
        module.eval()


def cosine_with_warmup(total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def optimizer_params(job: Job) -> list[nn.Parameter] | list[dict]:
    """What the optimiser trains: the job's groups (trainable parameters only, empty groups
    dropped) or, without groups, every trainable parameter of the model in one group."""
    if job.param_groups is None:
        return [p for p in job.model.parameters() if p.requires_grad]
    groups = [
        {**g, "params": [p for p in g["params"] if p.requires_grad]} for g in job.param_groups
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(
    params: list[nn.Parameter] | list[dict], cfg: LoopConfig
) -> torch.optim.Optimizer:
    """AdamW or SGD at `cfg.lr`/`cfg.weight_decay`; a group's own `lr`/`weight_decay` win."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
    )


def training_loader(
    job: Job, cfg: LoopConfig, rt: Runtime, drop_last: bool
) -> tuple[DataLoader, torch.Generator]:
    """The training loader, built once per run; reseed the generator before each epoch.

    Worker processes live across epochs (they see `set_epoch`); under torchrun each rank
    takes its share of the same global order.
    """
    generator = torch.Generator()
    order = job.sampler or (lambda g: RandomSampler(range(len(job.train_set)), generator=g))
    sampler = order(generator)
    loader = DataLoader(
        job.train_set,
        batch_size=rt.batch_size,
        drop_last=drop_last,
        sampler=ddp.ShardSampler(sampler) if ddp.world_size() > 1 else sampler,
        num_workers=rt.workers,
        pin_memory=rt.device.type == "cuda",
        persistent_workers=rt.workers > 0,
    )
    return loader, generator


class Trainer:
    """The model on its device, its optimiser, schedule and scaler, and one training epoch."""

    def __init__(self, job: Job, cfg: LoopConfig, rt: Runtime, batches_per_epoch: int):
        self.job, self.cfg, self.rt = job, cfg, rt
        self.note = ""  # said when the loss diverges (where the last good checkpoint is)
        job.model.to(rt.device)
        if rt.channels_last:
            job.model.to(memory_format=torch.channels_last)
        self.trained = ddp.wrap(job.model, rt.device, cfg.sync_batchnorm)  # model with 1 process
        self.optimizer = make_optimizer(optimizer_params(job), cfg)
        steps = math.ceil(batches_per_epoch / cfg.grad_accum)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            cosine_with_warmup(steps * cfg.epochs, round(steps * cfg.warmup_epochs)),
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=rt.amp == torch.float16)

    def state_dict(self) -> dict:
        return {
            "model": self.job.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.job.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when the scaler was disabled (no fp16)
            self.scaler.load_state_dict(state["scaler"])

    def _loss(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        images, *targets = batch
        x = self.rt.inputs(images)
        targets = [t.to(self.rt.device, non_blocking=True) for t in targets]
        with self.rt.autocast():
            return self.job.loss(self.trained(x).float(), targets)

    def epoch(self, batches, epoch: int = 0) -> tuple[float, int]:
        """One pass over `batches` (a loader, or batches already on the device), `grad_accum`
        micro-batches per optimiser step; returns the summed loss and the number of images."""
        train_mode(self.job.model, self.job.frozen)
        accum, n = self.cfg.grad_accum, len(batches)
        alone = self.trained is self.job.model
        total, seen = 0.0, 0
        self.optimizer.zero_grad(set_to_none=True)
        for step, batch in enumerate(batches):
            last = (step + 1) % accum == 0 or step + 1 == n
            # DDP averages gradients across ranks on the last micro-batch of a step only
            with nullcontext() if last or alone else self.trained.no_sync():
                loss = self._loss(batch)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"the loss became {loss.item()} at epoch {epoch + 1}, batch {step + 1}; "
                        f"try a lower train.lr.{self.note}"
                    )
                group = min(accum, n - step // accum * accum)
                self.scaler.scale(loss / group).backward()
            if last:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
            total += loss.item() * len(batch[0])
            seen += len(batch[0])
            if hasattr(batches, "set_postfix"):
                batches.set_postfix(loss=f"{total / seen:.4f}")
        return total, seen

    def sync(self) -> None:
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize(self.rt.device)


def batches_per_epoch(images: int, batch_size: int) -> tuple[int, bool]:
    """Optimiser micro-batches per epoch and `drop_last`: a last batch is dropped only when
    there is more than one batch (BatchNorm cannot train on a batch of one)."""
    drop_last = images > batch_size
    return (images // batch_size if drop_last else 1), drop_last


def runtime(cfg: LoopConfig) -> Runtime:
    """The run's device (joining torchrun's group, if any), precision, format and rank batch."""
    device = ddp.setup(resolve_device(cfg.device))
    return Runtime.of(
        device, cfg.amp, cfg.channels_last, ddp.local_batch(cfg.batch_size), cfg.workers
    )


def _checkpoint(trainer: Trainer, result: FitResult, epoch: int, bad_epochs: int) -> dict:
    rank_rng = ddp.rng_states()  # collective: every rank takes part
    cuda = trainer.rt.device.type == "cuda"
    return {
        **trainer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "rank_rng": rank_rng,
        "cuda_rng": torch.cuda.get_rng_state_all() if cuda else [],
        "epoch": epoch,
        "bad_epochs": bad_epochs,
        "best_epoch": result.best_epoch,
        "best_metric": result.best_metric,
        "stopped_early": result.stopped_early,
        "history": result.history,
    }


def _restore(trainer: Trainer, checkpoint: Path, best_file: Path) -> tuple[FitResult, int, int]:
    """A checkpoint's state back into `trainer` and the RNGs; (result so far, next epoch, bad)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if "best_epoch" not in state:  # written by a release before the one loop
        raise ConfigError(
            f"{checkpoint} was written by an earlier fundusfm and cannot be resumed; "
            "start the run again in a new run.out (or without --resume after removing it)"
        )
    trainer.load_state_dict(state)
    ddp.restore_rng(state.get("rank_rng", []), state["torch_rng"])
    if trainer.rt.device.type == "cuda" and len(state["cuda_rng"]) and not ddp.launched():
        torch.cuda.set_rng_state_all(list(state["cuda_rng"]))
    start = state["epoch"] + 1
    result = FitResult(
        state["best_epoch"], state["best_metric"], state["history"], state["stopped_early"]
    )
    if result.best_epoch == start and ddp.is_main():  # killed before the best weights
        save_weights(trainer.job.model, best_file)
    return result, start, state["bad_epochs"]


def _improved(job: Job, value: float, result: FitResult) -> bool:
    """Better than the best so far; an undefined (NaN) score never is, and loses to any."""
    if result.best_epoch < 0 or (math.isnan(result.best_metric) and not math.isnan(value)):
        return True
    if job.lower_is_better:
        return value < result.best_metric
    return value > result.best_metric


def _say(record: dict, job: Job, result: FitResult) -> None:
    line = f"epoch {record['epoch']}: loss {record['train_loss']:.4f}"
    if job.validate is not None:
        line += (
            f", val {job.select} {record[f'val_{job.select}']:.4f} "
            f"(best {result.best_metric:.4f} at epoch {result.best_epoch})"
        )
    tqdm.write(line)


def fit(
    job: Job,
    cfg: LoopConfig,
    run_dir: Path,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
) -> FitResult:
    """Train `job.model`; leaves the best epoch's weights in it."""
    run_dir = Path(run_dir)
    rt = runtime(cfg)
    progress = progress and ddp.is_main()
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    n = len(job.train_set)
    if n < ddp.world_size():
        raise DataError(f"{n} training images for {ddp.world_size()} processes")
    batches, drop_last = batches_per_epoch(n, cfg.batch_size)
    trainer = Trainer(job, cfg, rt, batches)
    checkpoint, best_file = run_dir / "checkpoint.pt", run_dir / "best.safetensors"
    trainer.note = f" The last good checkpoint is kept: {checkpoint}"
    result, start, bad_epochs = FitResult(best_epoch=-1, best_metric=float("nan")), 0, 0
    if resume and checkpoint.is_file():
        result, start, bad_epochs = _restore(trainer, checkpoint, best_file)
        start = cfg.epochs if result.stopped_early else start
    loader, generator = training_loader(job, cfg, rt, drop_last)
    for epoch in range(start, cfg.epochs):
        if hasattr(job.train_set, "set_epoch"):
            job.train_set.set_epoch(epoch)
        generator.manual_seed(cfg.seed * 100_003 + epoch)  # the order: (seed, epoch) only
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not progress,
            leave=False,
            unit="batch",
        )
        total, seen = ddp.sum_all(*trainer.epoch(bar, epoch))
        record = {"epoch": epoch + 1, "train_loss": total / max(seen, 1)}
        val = job.validate(job.model, rt) if job.validate is not None else {}
        record.update({f"val_{k}": v for k, v in val.items()})
        value = val[job.select] if job.validate is not None else float(epoch)
        result.history.append(record)
        improved = _improved(job, value, result)
        if improved:
            result.best_epoch, result.best_metric, bad_epochs = epoch + 1, value, 0
        else:
            bad_epochs += 1
        result.stopped_early = bool(job.validate and cfg.patience and bad_epochs >= cfg.patience)
        state = _checkpoint(trainer, result, epoch, bad_epochs)
        if ddp.is_main():
            save_atomic(state, checkpoint)
            if improved:  # after the checkpoint, so that a resume can always restore it
                save_weights(job.model, best_file)
        if progress:
            _say(record, job, result)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, job.model)
        if result.stopped_early:
            break
    ddp.barrier()  # rank 0 has written the best weights
    job.model.load_state_dict(load_file(best_file))
    return result
