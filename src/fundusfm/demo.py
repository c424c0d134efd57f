"""`fundusfm demo`: the paper's whole protocol on generated images, on a CPU, in minutes.

1. generate an upstream set, a downstream set and an external set with shifted appearance
   (another camera's colour, more blur and noise), and check their manifests;
2. pretrain a "Fundus" backbone on the upstream set (and "ImageNet+Fundus" when ImageNet
   weights are on this machine, can be downloaded, and the demo is not offline);
3. split the downstream set by patient (5 folds, nested labelled fractions);
4. run the grid: Scratch vs Fundus (plus ImageNet and ImageNet+Fundus when available),
   LF and FF, every fraction and fold, each trained cell also scored on the external set;
5. explain: Grad-CAM of each init's FF model (fold 0, the largest fraction) over abnormal
   external images, and t-SNE of the inits' backbones over the downstream set (the
   paper's Figs. 5 and 3), into the grid's explain/ folder where the report finds them;
6. write the report (CSV, PNG, one HTML file) and print its path.
Every intermediate file stays under the output folder. `--full` switches to the paper's
settings (ResNet-50, 512 px, larger sets) for a GPU.
"""

from __future__ import annotations

import time
from pathlib import Path

from fundusfm.config.core import changed_settings, dump_config
from fundusfm.config.grid import ClassificationExternal, ClassificationGrid, DemoConfig
from fundusfm.data.manifest import load_manifest
from fundusfm.data.splits import make_splits
from fundusfm.data.validate import check_manifest
from fundusfm.errors import ConfigError, DataError, WeightsNotFound
from fundusfm.explain.gradcam import explain_gradcam
from fundusfm.explain.tsne import explain_tsne
from fundusfm.grid.cells import cell_dir, expand
from fundusfm.grid.report import build_report
from fundusfm.grid.runner import run_grid
from fundusfm.io import write_csv
from fundusfm.models.backbone import ARCHS
from fundusfm.models.inits import imagenet_state
from fundusfm.synthetic.generate import generate
from fundusfm.tasks.classify import pretrain

# The paper's settings, for `fundusfm demo --full` on a GPU.
FULL_PRESET = [
    "upstream.n=4000",
    "upstream.size=640",
    "downstream.n=1000",
    "downstream.size=640",
    "external.n=300",
    "external.size=640",
    "pretrain.model.arch=resnet50",
    "pretrain.data.resolution=512",
    "pretrain.train.epochs=10",
    "pretrain.train.lr=0.0003",
    "pretrain.train.workers=8",
    "grid.base.model.arch=resnet50",
    "grid.base.data.resolution=512",
    "grid.axes.resolution=[256, 512]",
    "grid.axes.fraction=[0.01, 0.05, 0.1, 0.25, 0.5, 1.0]",
    "grid.base.train.epochs=10",
    "grid.base.train.lr=0.0001",
    "grid.base.train.workers=8",
    "split.fractions=[0.01, 0.05, 0.1, 0.25, 0.5, 1.0]",
]


def imagenet_ready(arch: str, version: str, offline: bool) -> tuple[bool, str]:
    """Whether ImageNet weights can be had: from the torch hub cache, or by download."""
    if ARCHS[arch][1] is None:
        return False, (
            f"{arch} has no ImageNet weights (add the arms with --set pretrain.model.arch="
            "resnet18 --set grid.base.model.arch=resnet18, or run --full)"
        )
    try:
        imagenet_state(arch, version)
        return True, "found in the torch hub cache"
    except WeightsNotFound as exc:
        if offline:
            return False, f"offline: not downloading ({str(exc).splitlines()[0]})"
    import torchvision

    try:  # online: torchvision stores them in the hub cache for next time
        torchvision.models.get_model_weights(arch)[version].get_state_dict(progress=False)
        return True, "downloaded into the torch hub cache"
    except Exception as exc:  # no network, proxy, disk: say why and skip the arms
        return False, f"download failed ({type(exc).__name__}: {exc})"


def _generate_sets(cfg: DemoConfig, data: Path, progress: bool, step) -> dict[str, Path]:
    """The upstream, downstream and external sets (generated once), each checked."""
    manifests = {}
    for name in ("upstream", "downstream", "external"):
        synth = getattr(cfg, name)
        path = data / name / "manifest.csv"
        if not path.is_file():
            step(f"generating the {name} set: {synth.n} images at {synth.size} px")
            generate(synth, data / name, progress=progress)
        report = check_manifest(load_manifest(path), progress=False)
        real = [p for p in report.problems if "has no images" not in p.message]
        if real:
            raise DataError(
                f"{path}: {len(real)} problems, first: {real[0]}; remove {path.parent} to "
                "generate it again (`fundusfm data check` lists every problem)"
            )
        manifests[name] = path
    return manifests


def _pretrain_inits(cfg: DemoConfig, out: Path, upstream: Path, progress: bool, step) -> dict:
    """Pretrain the fundus backbones (once each); the grid's inits by name."""
    arch = cfg.grid.base.model.arch
    ok, why = imagenet_ready(arch, cfg.grid.base.model.imagenet_version, cfg.imagenet == "offline")
    if not ok:
        step(f"ImageNet arms skipped: {why}")
    inits = {"scratch": "scratch", **({"imagenet": "imagenet"} if ok else {})}
    p = cfg.pretrain
    for strategy in ["fundus", "imagenet+fundus"] if ok else ["fundus"]:
        run_dir = out / "runs" / f"pretrain_{strategy}"
        if not (run_dir / "metrics.json").is_file():
            step(
                f"pretraining {strategy} on the upstream set ({p.model.arch}, "
                f"{p.data.resolution} px, {p.train.epochs} epochs)"
            )
            run = p.run.model_copy(update={"out": run_dir, "resume": True, "progress": progress})
            data = p.data.model_copy(update={"manifest": upstream})
            pretrain(p.model_copy(update={"strategy": strategy, "data": data, "run": run}))
        inits[strategy] = str(run_dir / "bundle")
    return inits


def _grid_config(
    cfg: DemoConfig, out: Path, manifests: dict, splits: Path, inits: dict
) -> ClassificationGrid:
    """The demo's grid: the downstream set and its splits, the inits, the external set."""
    g = cfg.grid
    data = g.base.data.model_copy(update={"manifest": manifests["downstream"], "splits": splits})
    external = ClassificationExternal(
        name="shifted_camera", manifest=manifests["external"], task=g.base.data.task
    )
    return g.model_copy(
        update={
            "out": out / "runs" / "grid",
            "base": g.base.model_copy(update={"data": data}),
            "axes": g.axes.model_copy(update={"init": inits}),
            "external": [external],
        }
    )


GRADCAM_IMAGES = 6  # abnormal external images in the gallery, the same for every init


def _gradcam_images(external: Path, task: str) -> list[Path]:
    """The first abnormal images of the external set (no init trained on any of them)."""
    m = load_manifest(external)
    rows = m.table[m.table[task].astype(str) == "1"].head(GRADCAM_IMAGES)
    return [m.image_path(p) for p in rows["path"]]


def _explain(grid: ClassificationGrid, manifests: dict, inits: dict, step) -> None:
    """The report's Grad-CAM gallery and t-SNE panels (done once; a rerun keeps them)."""
    a, root = grid.axes, Path(grid.out) / "explain"
    method = "ff" if "ff" in a.method else a.method[0]
    images = _gradcam_images(manifests["external"], grid.base.data.task)
    chosen = {  # per init: its cell of that method at the first fold, largest fraction
        c.init_label: c
        for c in expand(grid)
        if (c.method, c.fraction, c.fold, c.resolution)
        == (method, max(a.fraction), a.fold[0], max(a.resolution))
    }
    for label, cell in chosen.items():
        bundle, out = cell_dir(grid, cell) / "bundle", root / "gradcam" / label
        if (bundle / "bundle.json").is_file() and not (out / "summary.json").is_file():
            step(f"Grad-CAM of {label} ({cell.id}) over {len(images)} external images")
            explain_gradcam(bundle, out, images=images, progress=False)
    if not (root / "tsne" / "tsne.png").is_file():
        models = [v for v in inits.values() if v in ("scratch", "imagenet") or Path(v).is_dir()]
        step(f"t-SNE of the inits' backbones ({', '.join(inits)}) over the downstream set")
        explain_tsne(
            models,
            manifests["downstream"],
            root / "tsne",
            arch=grid.base.model.arch,
            resolution=max(a.resolution),
            progress=False,
        )


def _open_folder(cfg: DemoConfig, out: Path) -> None:
    """Create `out`, or reopen it when it holds the same demo (rerunning resumes)."""
    previous = out / "config.yaml"
    changed = changed_settings(cfg, previous)
    if changed:
        raise ConfigError(
            f"{out} holds a demo with other settings (in {', '.join(changed)}); rerun with "
            "the same settings to resume, or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, previous)


def run_demo(cfg: DemoConfig, out: Path, progress: bool = True, say=print) -> Path:
    """Run the whole demo inside `out`; returns the path of the HTML report."""
    out = Path(out)
    _open_folder(cfg, out)
    start = time.perf_counter()

    def step(text: str) -> None:
        say(f"[{time.perf_counter() - start:5.0f} s] {text}")

    manifests = _generate_sets(cfg, out / "data", progress, step)
    inits = _pretrain_inits(cfg, out, manifests["upstream"], progress, step)
    splits = out / "data" / "downstream" / "splits.csv"
    if not splits.is_file():
        s = cfg.split
        step(f"splitting the downstream set: {s.folds} folds, fractions {s.fractions}")
        write_csv(splits, make_splits(load_manifest(manifests["downstream"]), s))
    grid = _grid_config(cfg, out, manifests, splits, inits)
    dump_config(grid, out / "grid.yaml")
    a = grid.axes
    n_cells = len(a.init) * len(a.method) * len(a.resolution) * len(a.fraction) * len(a.fold)
    step(
        f"running the grid: {n_cells} cells ({', '.join(inits)} x "
        f"{', '.join(m.upper() for m in a.method)} x fractions {a.fraction} x "
        f"{len(a.fold)} folds)"
    )
    counts = run_grid(grid, progress=False, say=lambda text: None)
    _explain(grid, manifests, inits, step)
    step("writing the report")
    report = build_report(grid, cfg.n_boot)
    step(f"done: {report}")
    if counts["failed"]:
        raise RuntimeError(
            f"{counts['failed']} grid cells failed (the report covers the others): see "
            f"`fundusfm grid status {out / 'grid.yaml'}` and each cell's error.txt"
        )
    return report
