"""The one training loop: upstream pretraining and downstream fine-tuning both run `fit`.

Methods: `lf` trains only the head on a frozen backbone (its BatchNorm statistics frozen too),
`ff` trains everything, `partial` the last k residual stages and the head. After every epoch
the model is scored on the validation part; the best epoch by `select_metric` is kept
(`best.safetensors`) and a full checkpoint (`checkpoint.pt`: weights, optimiser, schedule,
RNG state; tensors and numbers only, read back with `weights_only=True`) is written
atomically, so `resume` continues a killed run to the same result as an uninterrupted one.
A non-finite loss stops the run with a clear message; the last good checkpoint stays.
Under torchrun the same loop runs data-parallel (see distributed.py): `batch_size` stays the
global batch, rank 0 writes every file, and validation scores are gathered from all ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler
from tqdm import tqdm

from fundusfm.config.core import TrainConfig
from fundusfm.data.datasets import FoldData
from fundusfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalise
from fundusfm.engine import distributed as ddp
from fundusfm.engine.checkpoint import save_atomic, save_weights
from fundusfm.errors import ConfigError, DataError, TrainingDiverged
from fundusfm.evaluation.metrics import classification_metrics
from fundusfm.models.heads import Classifier, scores_from_logits

LOWER_IS_BETTER = {"brier", "loss"}


@dataclass
class FitResult:
    best_epoch: int
    best_metric: float
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA only (bf16 where supported); full precision on CPU and MPS."""
    if setting == "off" or device.type != "cuda":
        return None
    if setting == "fp16":
        return torch.float16
    if setting == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.amp=bf16: this GPU has no bfloat16; use fp16 or auto")
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def set_trainable(model: Classifier, method: str, partial_stages: int = 1) -> list[nn.Module]:
    """Freeze what the method does not train; return the modules to keep in eval mode."""
    stages = model.backbone.stages()
    trained = {"lf": 0, "ff": len(stages), "partial": partial_stages}[method]
    frozen = stages[: len(stages) - trained]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    return frozen


def train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    """Training mode, except frozen parts: their BatchNorm statistics must not move."""
    model.train()
    for module in frozen:
        module.eval()


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


def validation_loss(kind: str, labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean cross-entropy (binary/multiclass) or binary cross-entropy (multilabel) of scores."""
    p = np.clip(scores, 1e-7, 1 - 1e-7)
    if kind == "multilabel":
        return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
    return float(-np.mean(np.log(p[np.arange(len(labels)), labels])))


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


def training_loader(
    train_set,
    labels: np.ndarray,
    kind: str,
    cfg: TrainConfig,
    batch_size: int,
    drop_last: bool,
    device: torch.device,
) -> tuple[DataLoader, torch.Generator]:
    """`fit`'s training loader, built once per run; reseed the generator before each epoch.

    Worker processes live across epochs (they see `set_epoch`, see datasets.py); under
    torchrun each rank takes its share of the same global order.
    """
    generator = torch.Generator()
    sampler = make_sampler(labels, kind, cfg.balanced_sampler, generator)
    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        drop_last=drop_last,
        sampler=ddp.ShardSampler(sampler) if ddp.world_size() > 1 else sampler,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0,
    )
    return loader, generator


def cosine_with_warmup(total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset,
    batch_size: int,
    device: torch.device,
    kind: str,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
    workers: int = 0,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores, labels and dataset indices of every image, in eval mode.

    `mean`/`std` normalise the uint8 images: a bundle's own (`Bundle.preprocessing`) when
    scoring a bundle; models trained here use ImageNet's.
    """
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    scores, labels, index = [], [], []
    for images, y, i in loader:
        x = normalise(images.to(device, non_blocking=True), mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
            logits = model(x)
        scores.append(scores_from_logits(logits.float(), kind).cpu())
        labels.append(y)
        index.append(i)
    if not index:  # an empty share (more ranks than images)
        return np.zeros((0,)), np.zeros((0,)), np.zeros((0,), dtype=np.int64)
    return torch.cat(scores).numpy(), torch.cat(labels).numpy(), torch.cat(index).numpy()


def fit(
    model: Classifier,
    data: FoldData,
    cfg: TrainConfig,
    run_dir: Path,
    method: str = "ff",
    partial_stages: int = 1,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
) -> FitResult:
    """Train `model` on `data`'s training part; leaves the best epoch's weights in `model`."""
    run_dir = Path(run_dir)
    kind, n_classes = data.task.kind, len(data.task.class_names)
    device = ddp.setup(resolve_device(cfg.device))
    progress = progress and ddp.is_main()
    amp = amp_dtype(cfg.amp, device)
    channels_last = cfg.channels_last == "on" or (
        cfg.channels_last == "auto" and device.type == "cuda"
    )
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    frozen = set_trainable(model, method, partial_stages)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    trained = ddp.wrap(model, device, cfg.sync_batchnorm)  # `model` itself with one process
    batch_size = ddp.local_batch(cfg.batch_size)
    train_set = data.dataset("train", cfg.augment, cfg.seed)
    val_set = data.dataset("val")
    train_labels = data.labels[data.parts["train"]]
    check_select_metric(kind, cfg.select_metric, data.labels[data.parts["val"]], n_classes)
    criterion = make_loss(kind, cfg, train_labels, n_classes).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
        )
    drop_last = len(train_set) > cfg.batch_size  # BatchNorm cannot train on a batch of one
    batches = len(train_set) // cfg.batch_size if drop_last else 1
    steps = math.ceil(batches / cfg.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(steps * cfg.epochs, round(steps * cfg.warmup_epochs))
    )
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)

    checkpoint, best_file = run_dir / "checkpoint.pt", run_dir / "best.safetensors"
    result = FitResult(best_epoch=-1, best_metric=float("nan"))
    start, bad_epochs = 0, 0
    if resume and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when the scaler was disabled (no fp16)
            scaler.load_state_dict(state["scaler"])
        ddp.restore_rng(state.get("rank_rng", []), state["torch_rng"])
        if device.type == "cuda" and len(state["cuda_rng"]) and not ddp.launched():
            torch.cuda.set_rng_state_all(list(state["cuda_rng"]))
        start, bad_epochs = state["epoch"] + 1, state["bad_epochs"]
        result = FitResult(
            state["best_epoch"], state["best_metric"], state["history"], state["stopped_early"]
        )
        if result.best_epoch == start and ddp.is_main():  # killed before the best weights
            save_weights(model, best_file)
        if result.stopped_early:
            start = cfg.epochs
    better = (lambda a, b: a < b) if cfg.select_metric in LOWER_IS_BETTER else (lambda a, b: a > b)

    loader, generator = training_loader(
        train_set, train_labels, kind, cfg, batch_size, drop_last, device
    )
    for epoch in range(start, cfg.epochs):
        train_mode(model, frozen)
        train_set.set_epoch(epoch)
        generator.manual_seed(cfg.seed * 100_003 + epoch)  # the order: (seed, epoch) only
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not progress,
            leave=False,
            unit="batch",
        )
        total, seen = 0.0, 0
        optimizer.zero_grad(set_to_none=True)
        for step, (images, y, _) in enumerate(bar):
            x = normalise(images.to(device, non_blocking=True))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            target = y.to(device).float() if kind == "multilabel" else y.to(device)
            last = (step + 1) % cfg.grad_accum == 0 or step + 1 == len(loader)
            # DDP averages gradients across ranks on the last micro-batch of a step only
            with nullcontext() if last or trained is model else trained.no_sync():
                with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                    loss = criterion(trained(x).float(), target)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"the loss became {loss.item()} at epoch {epoch + 1}, batch {step + 1}; "
                        f"try a lower train.lr. The last good checkpoint is kept: {checkpoint}"
                    )
                group = min(cfg.grad_accum, len(loader) - step // cfg.grad_accum * cfg.grad_accum)
                scaler.scale(loss / group).backward()
            if last:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            total += loss.item() * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{total / seen:.4f}")

        scores, labels, _ = ddp.gather_predictions(
            *predict(
                model, ddp.shard(val_set), batch_size, device, kind, amp, channels_last, cfg.workers
            )
        )
        total, seen = ddp.sum_all(total, seen)
        val = classification_metrics(kind, labels, scores)
        val["loss"] = validation_loss(kind, labels, scores)
        value = val[cfg.select_metric]
        record = {
            "epoch": epoch + 1,
            "train_loss": total / max(seen, 1),
            **{f"val_{k}": v for k, v in val.items()},
        }
        result.history.append(record)
        improved = result.best_epoch < 0 or better(value, result.best_metric)
        if improved:
            result.best_epoch, result.best_metric, bad_epochs = epoch + 1, value, 0
        else:
            bad_epochs += 1
        result.stopped_early = bool(cfg.patience and bad_epochs >= cfg.patience)
        rank_rng = ddp.rng_states()  # collective: every rank takes part
        if ddp.is_main():
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "rank_rng": rank_rng,
                "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                "epoch": epoch,
                "bad_epochs": bad_epochs,
                "best_epoch": result.best_epoch,
                "best_metric": result.best_metric,
                "stopped_early": result.stopped_early,
                "history": result.history,
            }
            save_atomic(state, checkpoint)
            if improved:  # after the checkpoint, so that a resume can always restore it
                save_weights(model, best_file)
        if progress:
            tqdm.write(
                f"epoch {epoch + 1}: loss {record['train_loss']:.4f}, "
                f"val {cfg.select_metric} {value:.4f} (best {result.best_metric:.4f} "
                f"at epoch {result.best_epoch})"
            )
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, model)
        if result.stopped_early:
            break
    ddp.barrier()  # rank 0 has written the best weights
    model.load_state_dict(load_file(best_file))
    return result
