"""Feature maps of the initialisations, side by side (`fundusfm explain tsne`; paper Fig. 3).

For each model (a bundle's backbone, or an init by name) the pooled backbone features of
every manifest image are embedded in 2-D with t-SNE (scikit-learn) or UMAP (umap-learn, if
installed), coloured by the task's class, one panel per model. Two numbers per model make
the picture quantitative: the silhouette score of the classes and the 5-nearest-neighbour
accuracy (5-fold cross-validated), each on the features and on the 2-D embedding.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from .backbone import create_backbone
from .bundle import read_bundle
from .config import PreprocessConfig
from .datasets import CachedImages
from .features import extract
from .manifest import encode_labels, load_manifest
from .preprocess import build_cache, open_cache
from .train import resolve_device


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


def separation(points: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """Silhouette and cross-validated 5-NN accuracy of the classes in `points`."""
    kinds, counts = np.unique(classes, return_counts=True)
    if len(kinds) < 2:
        return {"silhouette": float("nan"), "knn_accuracy": float("nan")}
    knn = KNeighborsClassifier(n_neighbors=min(5, len(points) - 1))
    cv = (  # stratified where every class can fill 5 folds; plain 5-fold otherwise
        StratifiedKFold(5, shuffle=True, random_state=0)
        if counts.min() >= 5
        else KFold(min(5, len(points)), shuffle=True, random_state=0)
    )
    accuracy = cross_val_score(knn, points, classes, cv=cv).mean()
    return {"silhouette": float(silhouette_score(points, classes)), "knn_accuracy": float(accuracy)}


def embed_2d(features: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    if method == "umap":
        try:
            import umap
        except ImportError as exc:
            raise RuntimeError("UMAP needs umap-learn: pip install umap-learn") from exc
        return umap.UMAP(random_state=seed).fit_transform(features)
    perplexity = float(min(30.0, max(2.0, (len(features) - 1) / 3)))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


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
) -> pd.DataFrame:
    """One panel and one row of separation figures per model; returns the figures."""
    if not models:
        raise ValueError("give at least one bundle or --init name")
    bundles = [m for m in models if (Path(m) / "bundle.json").is_file()]
    if bundles:
        meta, _ = read_bundle(Path(bundles[0]))
        arch = arch or meta["architecture"]["arch"]
        resolution = resolution or int(meta["preprocessing"]["resolution"])
    arch, resolution = arch or "resnet50", resolution or 512
    manifest = load_manifest(manifest_path)
    classes, names, task_name = class_of_images(manifest, task)
    pre = PreprocessConfig(resolution=resolution)
    cache_root = cache or Path(manifest_path).parent / "cache"
    report = build_cache(manifest, pre, cache_root, progress=progress)
    if report.errors:
        raise ValueError(f"{len(report.errors)} images could not be read: {report.errors[0][1:]}")
    images = open_cache(manifest, pre, cache_root)
    sources = [manifest.image_path(p).resolve() for p in manifest.table["path"]]
    dataset = CachedImages(images, sources, np.zeros(len(sources), dtype=np.int64))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, coords = [], []
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4.2), squeeze=False)
    for ax, spec in zip(axes[0], models, strict=True):
        torch.manual_seed(0)  # a scratch backbone is the same random network every run
        backbone = create_backbone(arch, spec)
        features = extract(backbone, dataset, batch_size, resolve_device(device), progress)
        points = embed_2d(features, method)
        label = _label(spec)
        on_features = separation(features, classes)
        on_points = separation(points, classes)
        rows.append(
            {
                "model": label,
                "source": spec,
                "images": len(features),
                "silhouette_features": on_features["silhouette"],
                "knn_accuracy_features": on_features["knn_accuracy"],
                "silhouette_embedding": on_points["silhouette"],
                "knn_accuracy_embedding": on_points["knn_accuracy"],
            }
        )
        coords.append(
            pd.DataFrame(
                {
                    "model": label,
                    "image_id": manifest.table["image_id"],
                    "class": classes,
                    "x": points[:, 0],
                    "y": points[:, 1],
                }
            )
        )
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
    axes[0][0].legend(fontsize=7, markerscale=2)
    fig.suptitle(f"{method.upper()} of pooled features, coloured by {task_name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / f"{method}.png", dpi=110)
    plt.close(fig)
    table = pd.DataFrame(rows)
    table.to_csv(out / "separation.csv", index=False)
    pd.concat(coords).to_csv(out / "embedding.csv", index=False)
    return table
