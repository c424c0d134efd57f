"""Legacy import: the authors' released checkpoints as bundles (`fundusfm weights import-legacy`).

The paper's released checkpoints are whole pickled models: an `nn.DataParallel` around a
torchvision ResNet-50 whose `fc` is the MLP head Linear(2048, 512) - BatchNorm1d - ReLU -
Linear(512, 2), so every key starts with `module.`. Loading a pickle runs code from the file,
so `import_legacy` first tries PyTorch's weights-only loader (plain state dicts pass, with or
without the prefix) and unpickles whole models only when the caller says it trusts the file.
Exports and the card are `weights.py`'s.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fundusfm.bundle import (
    BundleMeta,
    file_sha256,
    provenance,
    save_bundle,
)
from fundusfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fundusfm.errors import ConfigError, WeightsError, WeightsNotFound
from fundusfm.models.loaded import build_model
from fundusfm.models.peers import read_checkpoint

ARCH_BLOCKS = {(1, 1, 1, 1): "resnet10", (2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet34"}
BOTTLENECK_BLOCKS = {(3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101"}


def _state_of(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict | nn.Module):
                return _state_of(obj[key])
        state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if state:
            return {k.removeprefix("module."): v for k, v in state.items()}
    raise WeightsError(
        "the checkpoint holds no state dict (expected a model or tensors by name); give a "
        "file written with torch.save(model) or torch.save(model.state_dict())"
    )


def _arch_of(state: dict[str, torch.Tensor]) -> str:
    blocks = tuple(
        len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)
    )
    table = BOTTLENECK_BLOCKS if "layer1.0.conv3.weight" in state else ARCH_BLOCKS
    if blocks not in table:
        raise WeightsError(
            f"not a torchvision ResNet: residual blocks per stage {blocks}; import-legacy "
            f"reads {', '.join(sorted({*ARCH_BLOCKS.values(), *BOTTLENECK_BLOCKS.values()}))}"
        )
    return table[blocks]


def _head_of(state: dict[str, torch.Tensor]) -> tuple[str, int, int]:
    """(head kind, hidden units, outputs) from the `fc.*` keys."""
    if "fc.weight" in state:
        return "linear", 512, state["fc.weight"].shape[0]
    if {"fc.0.weight", "fc.1.running_mean", "fc.3.weight"} <= state.keys():
        return "mlp", state["fc.0.weight"].shape[0], state["fc.3.weight"].shape[0]
    fc = sorted(k for k in state if k.startswith("fc."))
    raise WeightsError(
        f"unrecognised classifier head (keys {fc[:6]}); expected a Linear fc.* or the "
        "paper's MLP fc.0/1/3 (Linear-BatchNorm1d-ReLU-Linear)"
    )


def _our_keys(state: dict[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    """The torchvision keys renamed to a fundusfm classifier's (`backbone.net.*`, `head.*`)."""
    ours = {}
    for key, value in state.items():
        if key.startswith("fc."):
            rest = key[3:]
            ours["head." + ("0." + rest if head == "linear" else rest)] = value
        else:
            ours["backbone.net." + key] = value
    return ours


def _class_names(outputs: int, classes: list[str] | None) -> list[str]:
    """One name per output: those given, else normal/abnormal (2 outputs) or 0..C-1."""
    if outputs < 2:
        raise WeightsError(
            f"the head has {outputs} output; fundusfm bundles need one output per class "
            "(a single-logit binary head would need a sigmoid, which is not supported here)"
        )
    classes = classes or (
        ["normal", "abnormal"] if outputs == 2 else [str(i) for i in range(outputs)]
    )
    if len(classes) != outputs:
        raise ConfigError(
            f"--classes gives {len(classes)} class names for a head with {outputs} outputs; "
            f"give {outputs} names, comma-separated"
        )
    return classes


def import_legacy(
    path: Path,
    out: Path,
    trust_pickle: bool = False,
    classes: list[str] | None = None,
    resolution: int = 512,
    license: str | None = None,
) -> Path:
    """Convert a released checkpoint into a bundle; returns the bundle folder. `license`
    records the weights' licence (a hub id) when their publisher states one."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFound(f"checkpoint not found: {path}")
    state = _state_of(read_checkpoint(path, trust_pickle))
    arch = _arch_of(state)
    head, hidden, outputs = _head_of(state)
    classes = _class_names(outputs, classes)
    raw = {
        "architecture": {"arch": arch, "head": head, "hidden": hidden, "outputs": outputs},
        "task": {
            "name": "abnormal" if outputs == 2 else "imported",
            "kind": "binary" if outputs == 2 else "multiclass",
            "classes": classes,
            "thresholds": [0.5] if outputs == 2 else [],
            "thresholds_validated": False,
        },
        "preprocessing": {
            "resolution": resolution,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
        "provenance": {
            **provenance({"imported_from": str(path)}, None),
            "source_file": path.name,
            "source_sha256": file_sha256(path),
            "loaded_by": "unpickling (--trust-pickle)" if trust_pickle else "weights-only",
            "license": license,
        },
    }
    meta = BundleMeta.model_validate(raw)

    model = build_model(meta)
    missing, unexpected = model.load_state_dict(_our_keys(state, head), strict=False)
    if missing or unexpected:
        raise WeightsError(
            f"weights do not fit a {arch} with a {head} head: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    return save_bundle(model, out, meta)
