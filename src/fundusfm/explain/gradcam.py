"""Grad-CAM for classifier bundles (`fundusfm explain gradcam`, `predict --gradcam`).

Maps come from pytorch-grad-cam's GradCAM, for the predicted class, a chosen class, or
(multilabel) every label, on the layer `cam_layer` picks for the backbone: a torchvision
ResNet's last residual block (`layer4[-1]`); a timm ViT's last block's `norm1`, its tokens
laid back on the patch grid (`TokenGrid`: prefix tokens dropped, as pytorch-grad-cam's ViT
recipe); a timm CNN's last feature stage (`feature_info[-1]`). Each map is scored for
faithfulness with ROAD (Rong et al., 2022: pytorch-grad-cam's ROADCombined over 20-80%
of pixels removed, most- and least-relevant first; higher means the map points at what
the model uses), measured on the probability the bundle reports (a softmax over classes;
each label's sigmoid for multilabel bundles). On images with lesion masks (generated data),
`lesion_overlap` tells how much of the map's mass falls on lesions against the share of the
image they cover.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.metrics.road import ROADCombined
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import (
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
)
from tqdm import tqdm

from fundusfm.data.decode import read_mask
from fundusfm.data.manifest import load_manifest
from fundusfm.data.preprocess import crop_resize, decode_for
from fundusfm.data.transforms import normalise, to_tensor
from fundusfm.errors import ConfigError, DataError, WeightsError
from fundusfm.inference import scorer
from fundusfm.io import read_json, write_csv, write_json, write_npy
from fundusfm.models.backbone import Backbone
from fundusfm.models.heads import Classifier
from fundusfm.models.loaded import Bundle, load_bundle
from fundusfm.models.timm_backbone import TimmBackbone


def _inputs(bundle: Bundle, images: list[np.ndarray]) -> torch.Tensor:
    p = bundle.preprocessing
    x = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in images])
    return normalise(x, p.mean, p.std)


class SigmoidTarget:
    """A multilabel model's probability of one label: the sigmoid of that label's logit.

    pytorch-grad-cam's targets are the raw logit or a softmax over all outputs; a softmax
    would make independent labels compete (one label's score falls when another's rises).
    """

    def __init__(self, label: int):
        self.label = label

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(model_output[..., self.label])


def probability_targets(kind: str, targets: list[int]) -> list:
    """Each target class's probability as the bundle reports it (`Bundle.predict`): sigmoid per
    label for multilabel bundles, softmax over the classes otherwise."""
    make = SigmoidTarget if kind == "multilabel" else ClassifierOutputSoftmaxTarget
    return [make(t) for t in targets]


SUPPORTED = (
    "Grad-CAM supports classifiers on torchvision ResNets (resnet10/18/34/50/101), timm ViTs "
    "(timm:vit_*, DINOv2 and other ViTs with a class or register tokens) and timm CNNs with "
    "NCHW feature maps (timm:convnext_*, timm:efficientnet_*, ...)"
)


class TokenGrid:
    """A ViT's tokens (N x L x C) as feature maps (N x C x H x W): the `prefix` tokens (class,
    registers) dropped, the patch tokens laid out row by row on the H x W patch grid."""

    def __init__(self, prefix: int, grid: tuple[int, int]):
        self.prefix, self.grid = int(prefix), (int(grid[0]), int(grid[1]))

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        (n, length, c), (h, w) = tokens.shape, self.grid
        if length - self.prefix != h * w:
            raise ConfigError(
                f"a ViT with {length} tokens has not {self.prefix} prefix tokens and a "
                f"{h}x{w} patch grid; Grad-CAM needs images at the bundle's resolution"
            )
        return tokens[:, self.prefix :].reshape(n, h, w, c).permute(0, 3, 1, 2)


Reshape = Callable[[torch.Tensor], torch.Tensor] | None


def cam_layer(model: torch.nn.Module) -> tuple[torch.nn.Module, Reshape]:
    """The layer Grad-CAM reads (module docstring) and how its output becomes N x C x H x W
    (None: it already is); a `ConfigError` naming what is supported for anything else."""
    if not isinstance(model, Classifier):
        raise ConfigError(
            "Grad-CAM explains classifiers: this bundle has no classes (a backbone alone, "
            "imported weights): fine-tune it first, e.g. `fundusfm finetune --set model.init=...`"
        )
    backbone = model.backbone
    if isinstance(backbone, Backbone):
        return backbone.net.layer4[-1], None
    if isinstance(backbone, TimmBackbone):
        return _vit_layer(backbone) if backbone.is_vit else _cnn_layer(backbone)
    raise ConfigError(f"{SUPPORTED}; this backbone is a {type(backbone).__name__}")


def _vit_layer(backbone: TimmBackbone) -> tuple[torch.nn.Module, Reshape]:
    net = backbone.net
    block = net.blocks[-1]
    grid = getattr(net.patch_embed, "grid_size", None)
    if not hasattr(block, "norm1") or grid is None or not hasattr(net, "num_prefix_tokens"):
        raise ConfigError(f"{SUPPORTED}; {backbone.arch} is not a ViT of timm's layout")
    return block.norm1, TokenGrid(net.num_prefix_tokens, tuple(grid))


def _cnn_layer(backbone: TimmBackbone) -> tuple[torch.nn.Module, Reshape]:
    net = backbone.net
    info = getattr(net, "feature_info", None)
    if not info or getattr(net, "output_fmt", "NCHW") != "NCHW":
        raise ConfigError(f"{SUPPORTED}; {backbone.arch} is not one of them")
    return net.get_submodule(info[-1]["module"]), None


def gradcam_maps(bundle: Bundle, images: list[np.ndarray], targets: list[int]) -> np.ndarray:
    """Grad-CAM maps (N x R x R, each scaled to [0, 1]) for preprocessed RxRx3 images.

    The target is the class's raw logit for every kind (Selvaraju et al.'s pre-softmax score).
    For a multilabel label this gives the same map as its sigmoid would: the sigmoid's slope
    is one positive factor per image, which the scaling of each map to [0, 1] removes.
    """
    layer, reshape = cam_layer(bundle.model)
    with GradCAM(model=bundle.model, target_layers=[layer], reshape_transform=reshape) as cam:
        return cam(
            input_tensor=_inputs(bundle, images),
            targets=[ClassifierOutputTarget(t) for t in targets],
        )


def road_scores(bundle: Bundle, images, maps: np.ndarray, targets: list[int]) -> np.ndarray:
    """ROAD faithfulness per map (higher: removing what the map points at hurts more).

    Measured on the class's probability as the bundle reports it (`probability_targets`).
    """
    metric = ROADCombined(percentiles=[20, 40, 60, 80])
    with torch.no_grad():
        return np.asarray(
            metric(
                _inputs(bundle, images),
                maps,
                probability_targets(bundle.kind, targets),
                bundle.model,
            ),
            dtype=float,
        ).reshape(-1)


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    return show_cam_on_image(image.astype(np.float32) / 255.0, cam, use_rgb=True)


def lesion_overlap(cam: np.ndarray, lesions: np.ndarray) -> dict[str, float]:
    """Share of CAM mass on lesion pixels, their share of the image, and the ratio (1 = chance)."""
    mass = float((cam * lesions).sum() / max(cam.sum(), 1e-12))
    area = float(lesions.mean())
    return {
        "cam_mass_on_lesions": mass,
        "lesion_area": area,
        "enrichment": mass / area if area else float("nan"),
    }


@dataclass
class Source:
    name: str
    path: Path
    lesion_masks: list[Path]


def _sources(bundle_images: list[Path] | None, manifest: Path | None) -> list[Source]:
    if manifest is None:
        paths = [Path(p) for p in bundle_images or []]
        stems = [p.stem for p in paths]
        clash = {s for s in stems if stems.count(s) > 1}  # a/x.jpg and b/x.jpg stay apart
        return [
            Source(f"{k}_{p.stem}" if p.stem in clash else p.stem, p, [])
            for k, p in enumerate(paths)
        ]
    m = load_manifest(manifest)
    out = []
    for _, row in m.table.iterrows():
        masks = []
        for kind in str(row.get("lesion_types", "") or "").split(";"):
            candidate = m.root / "lesions" / kind / f"{row['image_id']}.png"
            if kind and candidate.is_file():
                masks.append(candidate)
        out.append(Source(str(row["image_id"]), m.image_path(row["path"]), masks))
    return out


def _crop_mask(paths: list[Path], box: tuple, scale: float, size: int) -> np.ndarray:
    union = None
    for p in paths:
        mask = read_mask(p)
        union = mask if union is None else union | mask
    x, y, side = (v * scale for v in box)
    img = Image.fromarray(union).crop((round(x), round(y), round(x + side), round(y + side)))
    return np.asarray(img.resize((size, size), Image.Resampling.NEAREST), dtype=bool)


def _decode_chunk(sources, pre, errors: list) -> tuple[list, list, list]:
    """Decoded, cropped images of a chunk; an unreadable one is recorded, the others go on."""
    chunk, arrays, boxes = [], [], []
    for s in sources:
        try:
            rgb, scale = decode_for(s.path, pre)
            arr, box = crop_resize(rgb, pre)
        except Exception as exc:
            errors.append({"image": s.name, "file": str(s.path), "reason": f"{exc}"})
            continue
        chunk.append(s)
        arrays.append(arr)
        boxes.append((box, scale))
    return chunk, arrays, boxes


def _targets(probs, kind: str, classes: list[str], class_name: str | None) -> list[tuple]:
    """(image in chunk, class index) to explain: the named class, every label, or the top."""
    jobs = []
    for k, p in enumerate(probs):
        if class_name is not None:
            jobs.append((k, classes.index(class_name)))
        elif kind == "multilabel":
            jobs += [(k, j) for j in range(len(classes))]
        else:
            jobs.append((k, int(np.argmax(p))))
    return jobs


def _explain_chunk(bundle, score, chunk, arrays, boxes, class_name, road: bool, pre, out) -> list:
    """Maps, overlays and rows of one decoded chunk (probabilities from `score`)."""
    classes = bundle.classes
    probs = score(torch.stack([to_tensor(a) for a in arrays]))
    jobs = _targets(probs, bundle.kind, classes, class_name)
    imgs, targets = [arrays[k] for k, _ in jobs], [j for _, j in jobs]
    maps = gradcam_maps(bundle, imgs, targets)
    faith = road_scores(bundle, imgs, maps, targets) if road else [float("nan")] * len(jobs)
    rows = []
    for (k, j), cam, score in zip(jobs, maps, faith, strict=True):
        s, name = chunk[k], f"{chunk[k].name}_{classes[j]}"
        Image.fromarray(overlay(arrays[k], cam)).save(out / "overlays" / f"{name}.png")
        write_npy(out / "maps" / f"{name}.npy", cam.astype(np.float16))
        row = {
            "image": s.name,
            "file": str(s.path),
            "class": classes[j],
            "probability": float(probs[k][j]),
            "road": float(score),
        }
        if s.lesion_masks:
            box, scale = boxes[k]
            row.update(lesion_overlap(cam, _crop_mask(s.lesion_masks, box, scale, pre.resolution)))
        rows.append(row)
    return rows


def _summary(table: pd.DataFrame, unreadable: int) -> dict:
    road = float(table["road"].mean())
    summary = {"maps": len(table), "unreadable": unreadable, "road_mean": road}
    if "enrichment" in table:
        with_lesions = table.dropna(subset=["enrichment"])
        summary.update(
            images_with_lesions=len(with_lesions),
            cam_mass_on_lesions_mean=float(with_lesions["cam_mass_on_lesions"].mean()),
            lesion_area_mean=float(with_lesions["lesion_area"].mean()),
            enrichment_median=float(with_lesions["enrichment"].median()),
        )
    return summary


def _classifier(bundle_path: Path, class_name: str | None) -> Bundle:
    """The bundle to explain: a classifier, with `class_name` (if given) among its classes."""
    bundle = load_bundle(bundle_path)
    if bundle.kind == "segmentation":
        raise WeightsError(
            f"Grad-CAM explains classifiers; {bundle_path} segments vessels (give a "
            "classifier bundle)"
        )
    if bundle.kind == "features":
        raise ConfigError(
            f"Grad-CAM explains classifiers; {bundle_path} is a backbone alone (imported "
            "weights, no classes): fine-tune it first, e.g. `fundusfm finetune --set "
            f"model.init={bundle_path}`"
        )
    if class_name is not None and class_name not in bundle.classes:
        raise ConfigError(
            f"--class {class_name!r} is not one of the bundle's classes: {bundle.classes}"
        )
    return bundle


def explain_gradcam(
    bundle_path: Path,
    out: Path,
    images: list[Path] | None = None,
    manifest: Path | None = None,
    class_name: str | None = None,
    road: bool = True,
    batch_size: int = 8,
    progress: bool = True,
    engine: str = "torch",
) -> pd.DataFrame:
    """Overlays, raw maps, ROAD and (with lesion masks) lesion overlap; returns the table.

    `engine` (`fundusfm.inference`) computes the reported probabilities and so the class
    explained by default; the maps and ROAD always run in PyTorch (gradients, logits).
    """
    bundle = _classifier(bundle_path, class_name)
    sources = _sources(images, manifest)
    if not sources:
        raise ConfigError("no images: give image files or --manifest")
    score = scorer(bundle, engine, progress)
    pre = bundle.preprocessing.config()
    out = Path(out)
    for sub in ("overlays", "maps"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rows, errors = [], []
    for i in tqdm(range(0, len(sources), batch_size), disable=not progress, desc="grad-cam"):
        chunk, arrays, boxes = _decode_chunk(sources[i : i + batch_size], pre, errors)
        if chunk:
            rows += _explain_chunk(bundle, score, chunk, arrays, boxes, class_name, road, pre, out)
    table = pd.DataFrame(rows)
    write_csv(out / "gradcam.csv", table)
    write_csv(out / "errors.csv", pd.DataFrame(errors, columns=["image", "file", "reason"]))
    if table.empty:
        raise DataError(
            f"no image could be read; see {out / 'errors.csv'} for why (each file and reason)"
        )
    summary = _summary(table, len(errors))
    summary.update(engine=score.engine, engine_notes=list(score.notes))
    write_json(out / "summary.json", summary)
    return table


def gradcam_summary(out: Path) -> dict:
    """The summary.json `explain_gradcam` wrote into `out`."""
    return read_json(Path(out) / "summary.json")
