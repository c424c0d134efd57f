"""Feature maps of the initialisations, side by side (`fundusfm explain tsne`; paper Fig. 3).

For each model (a bundle's backbone, or an init by name) the pooled backbone features of
every manifest image are embedded in 2-D with t-SNE (scikit-learn) or UMAP (umap-learn, if
installed), coloured by the task's class, one panel per model. Two numbers per model make
the picture quantitative: the silhouette score of the classes and the 5-nearest-neighbour
accuracy (5-fold cross-validated with folds grouped by patient, so a neighbour is never the
same patient's other eye), each on the features and on the 2-D embedding. Each bundle's
images are preprocessed as its `bundle.json` says (resolution, FOV crop, mean/std).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.neighbors import KNeighborsClassifier

from fundusfm.bundle import read_bundle, read_preprocessing
from fundusfm.config.core import CropConfig, PreprocessConfig
from fundusfm.data.datasets import CachedImages
from fundusfm.data.manifest import encode_labels, load_manifest, patient_of
from fundusfm.data.preprocess import build_cache, open_cache
from fundusfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fundusfm.engine.device import resolve_device
from fundusfm.errors import ConfigError, DataError
from fundusfm.inference import torch_only
from fundusfm.io import write_atomic, write_csv
from fundusfm.models.inits import create_backbone
from fundusfm.tasks.features import extract


def _label(spec: str) -> str:
    path = Path(spec)
    return path.parent.name if path.name == "bundle" else path.name


def class_of_images(manifest, task_name: str | None) -> tuple[np.ndarray, list[str], str]:
    """One class name per image (multilabel: its first label, or 'none')."""
    name, task = manifest.task(task_name)
    y = encode_labels(manifest, task)
    names = task.class_names
    if task.kind == "multilabel":
        return np.array([names[r.argmax()] if r.any() else "none" for r in y]), names, name
    return np.array([names[i] for i in y]), names, name


def separation(
    points: np.ndarray, classes: np.ndarray, patients: np.ndarray | None = None
) -> dict[str, float]:
    """Silhouette and cross-validated 5-NN accuracy of the classes in `points`.

    The kNN folds are grouped by patient (StratifiedGroupKFold): an image's neighbours in
    the training folds are other patients' images, never the same patient's other eye.
    """
    kinds = np.unique(classes)
    if len(kinds) < 2:
        return {"silhouette": float("nan"), "knn_accuracy": float("nan")}
    groups = np.arange(len(points)) if patients is None else np.asarray(patients)
    n_folds = min(5, len(np.unique(groups)))
    if n_folds < 2:
        return {"silhouette": float(silhouette_score(points, classes)), "knn_accuracy": np.nan}
    correct = []
    folds = StratifiedGroupKFold(n_folds, shuffle=True, random_state=0)
    with warnings.catch_warnings():  # a class rarer than the folds is still split by group
        warnings.simplefilter("ignore", UserWarning)
        for train, test in folds.split(points, classes, groups):
            knn = KNeighborsClassifier(n_neighbors=min(5, len(train)))
            correct.append(knn.fit(points[train], classes[train]).predict(points[test]))
            correct[-1] = correct[-1] == classes[test]
    accuracy = float(np.concatenate(correct).mean())
    return {"silhouette": float(silhouette_score(points, classes)), "knn_accuracy": accuracy}


def embed_2d(features: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    if method == "umap":
        try:
            import umap
        except ImportError as exc:
            raise ConfigError(
                "UMAP needs umap-learn: pip install umap-learn, or leave out --umap (t-SNE)"
            ) from exc
        return umap.UMAP(random_state=seed).fit_transform(features)
    perplexity = float(min(30.0, max(2.0, (len(features) - 1) / 3)))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


@dataclass(frozen=True)
class ModelInput:
    """A model of the figure: its architecture and the preprocessing its backbone expects."""

    spec: str
    arch: str
    pre: PreprocessConfig
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def model_inputs(specs: list[str], arch: str | None, resolution: int | None) -> list[ModelInput]:
    """A bundle brings its own arch, resolution, crop and mean/std (`read_preprocessing`);
    an init name takes `arch`/`resolution`, else the first bundle's, else ResNet-50 at 512 px,
    with the default FOV crop and ImageNet normalisation."""
    metas = {s: read_bundle(Path(s))[0] for s in specs if (Path(s) / "bundle.json").is_file()}
    first = next(iter(metas.values()), None)
    arch = arch or (first.architecture.arch if first else "resnet50")
    resolution = resolution or (read_preprocessing(first).resolution if first else 512)
    out = []
    for spec in specs:
        if spec not in metas:
            pre = PreprocessConfig(resolution=resolution)
            out.append(ModelInput(spec, arch, pre, IMAGENET_MEAN, IMAGENET_STD))
            continue
        p = read_preprocessing(metas[spec])
        crop = p.crop or CropConfig()  # a U-Net encoder: fundus images cropped as by default
        pre = PreprocessConfig(resolution=p.resolution, **crop.model_dump())
        out.append(ModelInput(spec, metas[spec].architecture.arch, pre, p.mean, p.std))
    return out


def model_features(
    m: ModelInput, manifest, cache_root: Path, batch_size: int, device: str, progress: bool
) -> np.ndarray:
    """Pooled backbone features of every manifest image, preprocessed as the model expects."""
    report = build_cache(manifest, m.pre, cache_root, progress=progress)
    if report.errors:
        raise DataError(
            f"{len(report.errors)} images could not be read, first: {report.errors[0][1:]}; "
            "`fundusfm data check` lists them (fix or remove their rows)"
        )
    images = open_cache(manifest, m.pre, cache_root)
    sources = [manifest.image_path(p).resolve() for p in manifest.table["path"]]
    dataset = CachedImages(images, sources, np.zeros(len(sources), dtype=np.int64))
    torch.manual_seed(0)  # a scratch backbone is the same random network every run
    backbone = create_backbone(m.arch, m.spec, img_size=m.pre.resolution)
    dev = resolve_device(device)
    return extract(backbone, dataset, batch_size, dev, progress, m.mean, m.std)


def _panel(ax, label: str, points: np.ndarray, classes, names, on_features: dict) -> None:
    for name in [*names, "none"]:
        sel = classes == name
        if sel.any():
            ax.scatter(points[sel, 0], points[sel, 1], s=8, alpha=0.7, label=name)
    ax.set(
        title=f"{label}\nsilhouette {on_features['silhouette']:.2f}, "
        f"5-NN {on_features['knn_accuracy']:.2f}",
        xticks=[],
        yticks=[],
    )


def explain_tsne(
    models: list[str],
    manifest_path: Path,
    out: Path,
    task: str | None = None,
    arch: str | None = None,
    resolution: int | None = None,
    method: str = "tsne",
    cache: Path | None = None,
    batch_size: int = 32,
    device: str = "auto",
    progress: bool = True,
    engine: str = "torch",
) -> pd.DataFrame:
    """One panel and one row of separation figures per model; returns the figures.

    Features come from PyTorch whatever `engine` says (auto or torch; onnxruntime is
    refused): the ONNX graph of a bundle outputs probabilities, not backbone features.
    """
    torch_only(engine, "t-SNE embeds backbone features")
    if not models:
        raise ConfigError("no model to embed: give at least one bundle or --init name")
    inputs = model_inputs(models, arch, resolution)
    manifest = load_manifest(manifest_path)
    classes, names, task_name = class_of_images(manifest, task)
    patients = patient_of(manifest.table).to_numpy()
    cache_root = cache or Path(manifest_path).parent / "cache"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, coords = [], []
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4.2), squeeze=False)
    for ax, m in zip(axes[0], inputs, strict=True):
        features = model_features(m, manifest, cache_root, batch_size, device, progress)
        points = embed_2d(features, method)
        label = _label(m.spec)
        on_features = separation(features, classes, patients)
        on_points = separation(points, classes, patients)
        rows.append(
            {
                "model": label,
                "source": m.spec,
                "images": len(features),
                "resolution": m.pre.resolution,
                "silhouette_features": on_features["silhouette"],
                "knn_accuracy_features": on_features["knn_accuracy"],
                "silhouette_embedding": on_points["silhouette"],
                "knn_accuracy_embedding": on_points["knn_accuracy"],
            }
        )
        ids = manifest.table["image_id"]
        coords.append(
            pd.DataFrame(
                {
                    "model": label,
                    "image_id": ids,
                    "class": classes,
                    "x": points[:, 0],
                    "y": points[:, 1],
                }
            )
        )
        _panel(ax, label, points, classes, names, on_features)
    axes[0][0].legend(fontsize=7, markerscale=2)
    fig.suptitle(f"{method.upper()} of pooled features, coloured by {task_name}", fontsize=10)
    fig.tight_layout()
    write_atomic(out / f"{method}.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    table = pd.DataFrame(rows)
    write_csv(out / "separation.csv", table)
    write_csv(out / "embedding.csv", pd.concat(coords))
    return table
