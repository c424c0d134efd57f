"""The Grad-CAM gallery (the paper's Fig. 5) and the t-SNE panels (its Fig. 3) of a grid report.

The grid does not compute them (they need a trained bundle per init and a GPU hour, not a
cell); the report shows them when `fundusfm explain` wrote them under the grid's out folder:

    fundusfm explain gradcam BUNDLE --manifest M --out OUT/explain/gradcam/<init label>
    fundusfm explain tsne BUNDLE... [--init scratch ...] --manifest M --out OUT/explain/tsne

One Grad-CAM folder per init (a single folder straight at OUT/explain/gradcam works too);
the gallery shows the same images for every init where the folders share them. Without
these files the report has no such sections and says nothing about them.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fundusfm.grid.html import Figure, Section, esc, figure, gallery, number, paragraph, table
from fundusfm.io import read_json

TILES = 6  # overlays shown per init (the page inlines them; a gallery, not an archive)
HOW = "Made with `fundusfm explain {what} --out {out}`; the grid itself does not run it."


def gradcam_folders(root: Path) -> list[Path]:
    """Folders under `root/explain/gradcam` holding Grad-CAM overlays, by name."""
    base = Path(root) / "explain" / "gradcam"
    return sorted({p.parent.parent for p in base.glob("**/overlays/*.png")})


def _captions(folder: Path) -> dict[str, str]:
    """Overlay name -> 'image: class, probability p' from the folder's gradcam.csv."""
    path = folder / "gradcam.csv"
    if not path.is_file():
        return {}
    rows = pd.read_csv(path, dtype={"image": str, "class": str}).to_dict("records")
    return {
        f"{r['image']}_{r['class']}": f"{r['image']}: {r['class']}, probability "
        f"{number(r['probability'])}"
        for r in rows
    }


def _summary_line(folder: Path) -> str:
    path = folder / "summary.json"
    if not path.is_file():
        return ""
    s = read_json(path)
    text = f"{s.get('maps', '?')} maps; mean ROAD faithfulness {number(s.get('road_mean'))}"
    if s.get("enrichment_median") is not None:
        text += f"; median lesion enrichment {number(s['enrichment_median'])}"
    return text + "."


def gradcam_section(root: Path) -> Section | None:
    """One row of overlays per init folder, the same images where they share them."""
    folders = gradcam_folders(root)
    if not folders:
        return None
    names = {f: {p.stem for p in (f / "overlays").glob("*.png")} for f in folders}
    common = set.intersection(*names.values())
    base = Path(root) / "explain" / "gradcam"
    parts = [
        paragraph(
            "Grad-CAM maps (last residual stage, for the predicted class unless a class was "
            "asked for) over the images, one row per initialisation; red marks the regions "
            "that raise the class score most. ROAD scores how much the score depends on the "
            "marked regions (higher: more faithful). "
            + HOW.format(what="gradcam BUNDLE --manifest M", out=f"{base}/<init>"),
            "note",
        )
    ]
    for folder in folders:
        captions = _captions(folder)
        chosen = sorted(common or names[folder])[:TILES]
        tiles = [
            (folder / "overlays" / f"{n}.png", captions.get(n, n.replace("_", " "))) for n in chosen
        ]
        label = folder.relative_to(base).as_posix() if folder != base else "the bundle"
        parts += [f"<h3>{esc(label)}</h3>", paragraph(_summary_line(folder)), gallery(tiles)]
    return Section(
        "gradcam", "Grad-CAM maps of the initialisations (the paper's Fig. 5)", "".join(parts)
    )


def tsne_section(root: Path) -> Section | None:
    """The t-SNE (or UMAP) panels of `fundusfm explain tsne` with their separation table."""
    base = Path(root) / "explain" / "tsne"
    images = sorted(p for name in ("tsne", "umap") for p in base.glob(f"**/{name}.png"))
    if not images:
        return None
    how = HOW.format(what="tsne BUNDLE... --manifest M", out=base)
    parts = [paragraph(how, "note")]
    for path in images:
        method = "t-SNE" if path.stem == "tsne" else "UMAP"
        caption = (
            f"The pooled backbone features of every image of the manifest embedded in 2-D "
            f"with {method}, coloured by the task's class, one panel per initialisation; "
            "above each panel the silhouette score of the classes and the 5-nearest-neighbour "
            "accuracy (cross-validated with folds grouped by patient) on the features."
        )
        parts.append(figure(Figure(path, f"{method} of the initialisations' features", caption)))
        sep = path.parent / "separation.csv"
        if sep.is_file():
            parts.append(table(pd.read_csv(sep).drop(columns=["source"], errors="ignore")))
    return Section(
        "tsne", "Feature maps of the initialisations (the paper's Fig. 3)", "".join(parts)
    )


def explain_sentences(gradcam: bool, tsne: bool) -> list[str]:
    """Sentences for the methods paragraph on the explain outputs the report shows."""
    out = []
    if gradcam:
        out.append(
            "Grad-CAM maps (pytorch-grad-cam, last residual stage) were computed for each "
            "initialisation's model and scored for faithfulness with ROAD."
        )
    if tsne:
        out.append(
            "Pooled backbone features of each initialisation were embedded in 2-D with t-SNE, "
            "with the silhouette score and a patient-grouped 5-nearest-neighbour accuracy of "
            "the classes."
        )
    return out
