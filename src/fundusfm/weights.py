"""Released weights: print a bundle's card, export (the authors' checkpoints are imported by
`legacy.py`).

Exports: `torchvision` writes a plain torchvision ResNet state dict (the head as `fc.*`, in
the authors' layout), loadable with `torch.load(weights_only=True)`; `onnx` writes a model
that takes float images in [0, 1] (N x 3 x R x R, normalised inside) and returns the
bundle's probabilities; `timm` writes a model-hub folder as timm's own `push_to_hf_hub`
does (config.json with `pretrained_cfg`, model.safetensors, and the bundle's model card as
README.md, `card.model_card`), which `timm.create_model` loads with the bundle's outputs
(checked on export). timm's ResNet classifier is one Linear: a linear head exports whole,
an MLP head only with `backbone_only` (num_classes=0: pooled features). The card's metrics
are those of the training run when the bundle sits in its run folder, and of any
metrics.json handed over (`fundusfm evaluate`'s, with patient-bootstrap intervals).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from timm.models import save_for_hf
from torch import nn

from fundusfm import __version__
from fundusfm.bundle import (
    BundleMeta,
    read_meta,
    read_preprocessing,
)
from fundusfm.card import TIMM_ARCHS, hub_license, model_card, timm_exportable, whole_in_timm
from fundusfm.engine.runs import is_finished
from fundusfm.errors import ConfigError, FundusError, WeightsError
from fundusfm.io import read_json, write_atomic, write_text_atomic
from fundusfm.models.heads import Classifier, scores_from_logits
from fundusfm.models.loaded import Bundle, load_bundle

EXPORT_FORMATS = ("torchvision", "onnx", "timm")
# timm's pretrained_cfg describes the ImageNet recipe it would download; these weights are
# not that recipe, so its tag, source and licence are cleared (timm drops null entries)
TIMM_CFG = {
    "tag": None,
    "url": None,
    "hf_hub_id": None,
    "license": None,
    "origin_url": None,
    "test_input_size": None,
    "test_crop_pct": None,
    "paper_ids": "arXiv:2408.08790",
}
TIMM_INTERPOLATION = {  # the crop's resampling in timm's (PIL's) names
    "lanczos": "lanczos",
    "bicubic": "bicubic",
    "bilinear": "bilinear",
    "area": "box",
}


def card(bundle_path: Path, metrics: Sequence[Path] = (), license: str | None = None) -> str:
    """The bundle's model card (`card.model_card`): what `weights info` prints and the timm
    folder's README.md. `license` overrides the licence the bundle records."""
    return bundle_card(load_bundle(bundle_path), metrics, license)


def bundle_card(bundle: Bundle, metrics: Sequence[Path] = (), license: str | None = None) -> str:
    """`card` of a loaded bundle (its weights' sha256 already checked)."""
    parameters = sum(p.numel() for p in bundle.model.parameters())
    found = card_metrics(bundle.path, bundle.meta, metrics)
    return model_card(bundle.meta, parameters, found, license)


def card_metrics(bundle_path: Path, meta: BundleMeta, files: Sequence[Path] = ()) -> list[dict]:
    """The metrics a card reports: the training run's metrics.json when the bundle is its
    run folder's `bundle/`, then each file of `files` (a run's or `fundusfm evaluate`'s).
    Classifiers only: a vessel U-Net's figures (Dice, clDice) stay in its metrics.json."""
    if meta.segmentation:
        if files:
            raise ConfigError("model cards report classification metrics; this bundle segments")
        return []
    folder = Path(bundle_path).resolve()
    paths = [folder.parent / "metrics.json"] if folder.name == "bundle" else []
    paths = [p for p in paths if is_finished(p.parent)]
    paths += [Path(f).resolve() for f in files if Path(f).resolve() not in paths]
    return [_metrics_of(path, meta) for path in paths]


def shown_metrics(bundle_path: Path, meta: BundleMeta) -> tuple[list[dict], list[str]]:
    """`card_metrics` for a page that must still show (the screening report, `serve`'s
    /v1/model): the metrics, or none and a note saying why they are not shown."""
    try:
        return card_metrics(bundle_path, meta), []
    except FundusError as exc:
        return [], [f"validation metrics not shown: {exc}"]


def _metrics_of(path: Path, meta: BundleMeta) -> dict:
    """A metrics.json of this model, or a ConfigError saying why it is not one."""
    if not path.is_file():
        raise ConfigError(f"metrics file not found: {path}")
    metrics = read_json(path)
    if "external_ci" in metrics:
        named = [c.get("class") for c in metrics["external_ci"].get("per_class", [])]
        if named and named != [str(c) for c in meta.task.classes]:
            raise ConfigError(
                f"{path} scores the classes {named}, the bundle has {meta.task.classes}: "
                "the metrics of another model"
            )
    elif not isinstance(metrics.get("val"), dict):
        raise ConfigError(
            f"{path} is neither a training run's metrics.json nor `fundusfm evaluate`'s"
        )
    return metrics


def torchvision_state(model: Classifier, head: str) -> dict[str, torch.Tensor]:
    """The classifier as a torchvision ResNet state dict, the head as `fc.*`."""
    out = {}
    layers = sorted({int(k.split(".")[1]) for k in model.state_dict() if k.startswith("head.")})
    for key, value in model.state_dict().items():
        if key.startswith("backbone.net."):
            out[key[len("backbone.net.") :]] = value
        elif key.startswith("head."):
            index, rest = key[len("head.") :].split(".", 1)
            if head == "linear":  # head.<i>.weight (after an optional dropout) -> fc.weight
                out["fc." + rest] = value
            else:  # the last Linear is fc.3, as in the authors' files, with or without dropout
                out[f"fc.{3 if int(index) == layers[-1] else int(index)}.{rest}"] = value
    return out


class _Exported(nn.Module):
    def __init__(self, model: nn.Module, kind: str, mean, std):
        super().__init__()
        self.model, self.kind = model, kind
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return scores_from_logits(self.model((images - self.mean) / self.std), self.kind)


def exported_module(bundle) -> nn.Module:
    """The module `export --format onnx` writes: float images in, probabilities out."""
    p = bundle.preprocessing
    return _Exported(bundle.model, bundle.kind, p.mean, p.std).eval()


def export(
    bundle_path: Path,
    fmt: str,
    out: Path,
    backbone_only: bool = False,
    metrics: Sequence[Path] = (),
    license: str | None = None,
) -> Path:
    """Write the bundle as a torchvision state dict (.pth), an ONNX model (.onnx) or a timm
    model-hub folder (`backbone_only`, `metrics` and `license` are the folder's)."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if fmt != "timm" and (backbone_only or metrics or license):
        raise ConfigError(
            "--backbone-only, --metrics and --license belong to --format timm (the folder "
            "with a model card); the torchvision and onnx exports carry no card"
        )
    meta = read_meta(bundle_path)  # refusals first, before the weights are read
    if meta.segmentation or meta.task.kind == "features":
        what = "segments vessels" if meta.segmentation else "is a backbone alone (no classes)"
        raise WeightsError(f"export supports classification bundles; this one {what}")
    if fmt == "torchvision" and meta.architecture.arch.startswith("timm:"):
        raise WeightsError(
            f"{meta.architecture.arch} is a timm model, not a torchvision ResNet: export it "
            "with --format onnx"
        )
    if fmt == "timm":
        check_timm_exportable(meta, backbone_only)
    bundle = load_bundle(bundle_path)
    out = Path(out)
    if fmt == "timm":
        readme = bundle_card(bundle, metrics, license)
        return export_timm(bundle, out, backbone_only, hub_license(bundle.meta, license), readme)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchvision":
        state = torchvision_state(bundle.model, bundle.meta.architecture.head)
        return write_atomic(out, lambda tmp: torch.save(state, tmp))
    return _export_onnx(bundle, out)


def _export_onnx(bundle: Bundle, out: Path) -> Path:
    try:
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError as exc:
        raise ConfigError("ONNX export needs: pip install 'fundusfm[onnx]'") from exc
    wrapped = exported_module(bundle)
    r = bundle.resolution
    example = torch.rand(2, 3, r, r)
    torch.onnx.export(
        wrapped,
        (example,),
        str(out),
        dynamo=True,
        input_names=["images"],
        output_names=["probabilities"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        verbose=False,
    )
    return out


def check_timm_exportable(meta: BundleMeta, backbone_only: bool) -> None:
    """Refuse, with the reason, what timm's ResNet cannot hold (see the module docstring)."""
    arch = meta.architecture.arch
    if not timm_exportable(meta):
        raise WeightsError(
            f"timm cannot build {arch} with fundusfm's layout (it can: {', '.join(TIMM_ARCHS)}; "
            "timm's resnet10t has a deep stem and is another network); export it with "
            "--format torchvision or onnx"
        )
    if not whole_in_timm(meta) and not backbone_only:
        raise WeightsError(
            f"the bundle's head is an MLP, and timm's {arch} classifier is one Linear (fc): "
            "add --backbone-only to export the backbone alone (timm num_classes=0, pooled "
            "features), or use --format torchvision, which keeps the head as fc.*"
        )
    if whole_in_timm(meta) and backbone_only:
        raise ConfigError(
            "--backbone-only is for MLP heads; a linear head exports whole (timm's "
            "reset_classifier(0) or forward_head(x, pre_logits=True) gives the features)"
        )


def timm_model(bundle: Bundle, backbone_only: bool = False) -> nn.Module:
    """timm's ResNet holding the bundle's weights (its backbone alone with `backbone_only`),
    in eval mode; refused, with the reason, when timm's layout cannot hold them."""
    meta = bundle.meta
    check_timm_exportable(meta, backbone_only)
    arch, head = meta.architecture.arch, meta.architecture.head or "linear"
    state = torchvision_state(bundle.model, head)
    if backbone_only:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    outputs = 0 if backbone_only else meta.architecture.outputs
    with torch.device("meta"):  # no weights drawn: every tensor comes from the bundle
        net = timm.create_model(arch, num_classes=outputs, pretrained_cfg_overlay=TIMM_CFG)
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise WeightsError(f"the bundle's weights do not fit timm's {arch}: {exc}") from exc
    return net.eval()


def _check_timm(bundle: Bundle, net: nn.Module, backbone_only: bool) -> None:
    """The exported network computes what the bundle's does (timm's layout may change)."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = bundle.model.backbone.pool(x) if backbone_only else bundle.model(x)
        gap = float((net(x) - ours).abs().max())
    if gap > 1e-4:
        raise WeightsError(
            f"timm's {bundle.meta.architecture.arch} differs from the bundle's "
            f"by {gap:.2g}: not exported"
        )


def timm_config(bundle: Bundle, backbone_only: bool, license: str | None) -> tuple[dict, dict]:
    """(model_config, data_config) for timm's `save_for_hf`: label names, licence, the
    bundle's input size and normalisation, and what timm has no field for (`fundusfm`)."""
    pre = bundle.preprocessing
    model_config: dict = {"fundusfm": _fundusfm_config(bundle.meta, backbone_only)}
    if not backbone_only:
        model_config["label_names"] = [str(c) for c in bundle.meta.task.classes]
    if license:
        model_config["pretrained_cfg"] = {"license": license.lower()}
    r = pre.resolution
    data_config = {
        "input_size": (3, r, r),
        "mean": tuple(pre.mean),
        "std": tuple(pre.std),
        "crop_pct": 1.0,  # the bundle's images are already square and at size
        "crop_mode": "center",
        "interpolation": TIMM_INTERPOLATION[pre.crop.interpolation if pre.crop else "bilinear"],
    }
    return model_config, data_config


def _fundusfm_config(meta: BundleMeta, backbone_only: bool) -> dict:
    """config.json's `fundusfm` entry: the decision rule and the crop, beside timm's fields."""
    t, pre = meta.task, read_preprocessing(meta)
    return {
        "task": t.name,
        "kind": t.kind,
        "classes": list(t.classes),
        "thresholds": list(t.thresholds),
        "thresholds_validated": t.thresholds_validated,
        "head": meta.architecture.head or "linear",
        "head_included": not backbone_only,
        "crop": pre.crop.model_dump() if pre.crop else None,
        "crop_defaulted": "crop" in pre.defaulted,  # not recorded: fundusfm's default crop
        "fov_rule": meta.preprocessing.fov_rule,
        "bundle_weights_sha256": meta.weights_sha256,
        "exported_by": f"fundusfm {__version__}",
    }


def export_timm(
    bundle: Bundle, out: Path, backbone_only: bool, license: str | None, readme: str
) -> Path:
    """The timm model-hub folder of a classifier bundle: model.safetensors and config.json
    as timm's own `save_for_hf` writes them (what `push_to_hf_hub` uploads; safetensors
    only, no pickle), and README.md, the card."""
    net = timm_model(bundle, backbone_only)
    _check_timm(bundle, net, backbone_only)
    model_config, data_config = timm_config(bundle, backbone_only, license)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".timm-") as staging:
        save_for_hf(
            net,
            staging,
            model_config=model_config,
            safe_serialization=True,
            data_config=data_config,
        )
        for name in ("model.safetensors", "config.json"):  # each file replaced atomically
            write_atomic(out / name, lambda tmp, name=name: os.replace(Path(staging) / name, tmp))
    write_text_atomic(out / "README.md", readme)
    return out
