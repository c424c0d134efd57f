"""The methods paragraph of a grid report: the protocol as it ran, in sentences a user can
paste into a paper, written from the grid's settings (`GridConfig`) and its splits file
(what `splits.csv` holds, and the settings `fundusfm split` wrote beside it,
`splits.config.yaml`, when they are there). Nothing here is typed by hand per grid.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fundusfm import __version__
from fundusfm.config.core import LoopConfig, SplitConfig, load_config
from fundusfm.config.grid import ClassificationGrid, GridConfig, SegmentationGrid
from fundusfm.config.segment import SegThresholdConfig
from fundusfm.data.splits import fractions_of
from fundusfm.errors import ConfigError
from fundusfm.evaluation.stats import CLUSTERED_DELONG, DELONG
from fundusfm.grid.html import count
from fundusfm.grid.tables import ALPHA, WILCOXON
from fundusfm.io import read_json

INIT_WORDS = {
    "scratch": "random initialisation",
    "imagenet": "torchvision ImageNet weights",
    "fundus": "supervised fundus pretraining from random initialisation",
    "imagenet+fundus": "ImageNet weights, then supervised fundus pretraining",
}
ENSEMBLE = (  # how a classification grid reports its external sets
    "; the ensemble of the fold models (the mean score per image) is reported with a "
    "patient-bootstrap interval"
)
ACROSS = (  # how a segmentation grid reports its external sets
    " with the threshold stored with it; their pooled Dice and AUROC inside the field of "
    "view are reported as mean and sd over the folds' models, beside the folds' own test sets"
)
TEST_WORDS = {
    DELONG: "DeLong's test for two correlated AUROCs (every patient contributed one image)",
    CLUSTERED_DELONG: "Obuchowski's clustered extension of DeLong's test with patients as "
    "clusters (patients contributed several images)",
    "paired bootstrap (patients)": "a paired bootstrap over patients of the macro AUROC difference",
    WILCOXON: "Wilcoxon's signed-rank test on the paired per-image Dice, with a patient-level "
    "bootstrap interval of the mean difference",
}


def _list(values) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def split_facts(path: Path | None) -> dict:
    """What a splits.csv holds: images, patients, folds, fractions, the validation pool's
    share of each fold's training patients, held-out patients; `settings` (SplitConfig)
    when `fundusfm split` wrote them beside it. Empty without a file."""
    if path is None or not Path(path).is_file():
        return {}
    t = pd.read_csv(path, dtype={"image_id": str, "patient_id": str})
    if not {"fold", "patient_id"} <= set(t.columns):
        return {}
    cv = t[t["fold"] >= 0]
    folds = sorted(int(k) for k in cv["fold"].unique())
    shares = [
        cv.loc[cv.val_fold == k, "patient_id"].nunique()
        / max(1, cv.loc[cv.fold != k, "patient_id"].nunique())
        for k in folds
        if "val_fold" in cv
    ]
    held = t.loc[t["holdout"] == 1, "patient_id"] if "holdout" in t else t["patient_id"][:0]
    facts = {
        "images": len(t),
        "patients": t["patient_id"].nunique(),
        "folds": folds,
        "fractions": fractions_of(t),
        "val_share": sum(shares) / len(shares) if shares else None,
        "holdout_patients": held.nunique(),
    }
    sidecar = Path(path).with_suffix(".config.yaml")
    try:
        facts["settings"] = load_config(SplitConfig, sidecar) if sidecar.is_file() else None
    except ConfigError:  # settings of another version: describe the table alone
        facts["settings"] = None
    return facts


def _folds(facts: dict, run: list[int], task: str) -> str:
    """Patients, folds and the held-out part."""
    if not facts:
        return "The splits file was not found, so its folds cannot be described here."
    s = facts.get("settings")
    strat = (
        f", stratified on the {s.task or task} labels (split seed {s.seed})"
        if s
        else ", stratified on the task's labels"
    )
    k = len(facts["folds"])
    text = (
        f"The {facts['images']} images of {facts['patients']} patients were split by patient "
        f"into {k} folds{strat}, so that no patient's images fell into two folds. Each fold "
        f"served once as the test part of a model trained on the others ({k}-fold "
        f"cross-validation"
    )
    text += ")." if sorted(run) == facts["folds"] else f"; folds run: {_list(run)})."
    if facts["holdout_patients"]:
        text += (
            f" {facts['holdout_patients']} patients were held out of every fold, never "
            "trained on, and scored by every model."
        )
    return text


def _fractions(cfg: GridConfig, facts: dict, select: str) -> str:
    """Validation pool and labelled fractions."""
    s = facts.get("settings")
    text = ""
    if facts.get("val_share") is not None:
        text = (
            f"Of each fold's training patients, {facts['val_share']:.0%} formed its validation "
            f"pool, which chose the epoch or the probe's regularisation (by validation "
            f"{select.upper() if select in ('auroc', 'auprc') else select}) and the decision "
            "threshold (Youden's J). "
        )
    text += (
        f"Labelled fractions {_list(cfg.axes.fraction)} of each fold's training pool were "
        "drawn by patient within each class stratum, with the pool's class mix, nested (a "
        "smaller fraction's patients are inside a larger one's) and with at least one patient "
        "per class; figures place each fraction at its realised share of the pool."
    )
    if s is not None:
        text += (
            " The validation part shrank with the fraction."
            if s.val_policy == "scaled"
            else " The validation part was kept whole at every fraction."
        )
    return text


def _inits(cfg: GridConfig) -> str:
    parts = []
    for label, init in cfg.axes.init.items():
        words = INIT_WORDS.get(init, f"the weights of {init}")
        parts.append(f"{label} ({words})" if label != init or init in INIT_WORDS else words)
    return "; ".join(parts)


def _loop(t: LoopConfig) -> str:
    """One loop's schedule in words."""
    return (
        f"{count(t.epochs, 'epoch')}, batch {t.batch_size}, "
        f"{'AdamW' if t.optimizer == 'adamw' else 'SGD with momentum'} with learning rate "
        f"{t.lr:g} and weight decay {t.weight_decay:g}, a cosine schedule after "
        f"{t.warmup_epochs:g} warm-up epochs"
        + (f", early stopping after {count(t.patience, 'epoch')}" if t.patience else "")
        + f", seed {t.seed}"
    )


def _adaptation(cfg: ClassificationGrid) -> str:
    """Backbone, inits, resolutions, methods and training."""
    m, t = cfg.base.model, cfg.base.train
    head = "a linear head" if m.head == "linear" else f"an MLP head (hidden width {m.hidden})"
    words = {
        "lf": (
            "LF, the backbone frozen in evaluation mode, its pooled features extracted once "
            "per initialisation and resolution, and an L2-regularised logistic-regression "
            f"probe fitted per fold and fraction (C chosen from {_list(cfg.probe.Cs)} on the "
            "validation part)"
            if cfg.probe.mode == "features"
            else "LF, a linear head trained on the frozen backbone"
        ),
        "ff": f"FF, every layer fine-tuned with {head}",
        "partial": f"partial fine-tuning of the last {cfg.base.partial_stages} stage(s)",
    }
    aug = t.augment
    text = (
        f"The backbone was {_arch_words(m.arch)}{_own_archs(cfg)}, initialised "
        f"with {_inits(cfg)}, at input resolution {_list(cfg.axes.resolution)} px"
        f"{_own_sizes(cfg)} (field-of-view crop, square padding, resize). Adaptation methods: "
        f"{'; '.join(words[x] for x in cfg.axes.method)}."
    )
    if any(x != "lf" for x in cfg.axes.method) or cfg.probe.mode == "train":
        text += (
            f" Trained networks used {_loop(t)}; augmentation: "
            f"{'horizontal flips, ' if aug.flip else ''}rotation up to {aug.rotate:g} degrees, "
            f"scaling {aug.scale[0]:g} to {aug.scale[1]:g}, brightness and contrast jitter "
            f"{aug.brightness:g} and {aug.contrast:g}."
        )
    return text


def _arch_words(arch: str) -> str:
    if arch.startswith("timm:"):
        return f"timm's {arch.removeprefix('timm:')}"
    return f"torchvision's {arch.replace('resnet', 'ResNet-')}"


def _own_archs(cfg: ClassificationGrid) -> str:
    """The inits whose bundle holds another architecture than the base's (a ViT from
    `weights import`), read from their bundle.json."""
    own = []
    for label, init in cfg.axes.init.items():
        meta = Path(init) / "bundle.json"
        arch = read_json(meta).get("architecture", {}).get("arch") if meta.is_file() else None
        if arch and arch != cfg.base.model.arch:
            own.append(f"{_arch_words(arch)} for {label}")
    return f" ({'; '.join(own)})" if own else ""


def _own_sizes(cfg: ClassificationGrid) -> str:
    own = cfg.axes.init_resolution
    if not own:
        return ""
    sizes = "; ".join(f"{label} at its own {r} px" for label, r in own.items())
    return f"; {sizes}, compared with the others at each resolution"


def _tests(tests: list[str], n_boot: int, what: str) -> str:
    used = [TEST_WORDS.get(t, t) for t in tests] or ["the test that fits the data"]
    return (
        f"{what} 95% confidence intervals are percentile bootstrap intervals that resample "
        f"patients ({n_boot} resamples). Initialisations were compared pairwise on the same "
        f"images with {'; and '.join(used)}. P-values were adjusted with Holm's step-down "
        "method within each family of the pairwise comparisons of all initialisations at one "
        f"task, method, resolution and fraction; adjusted p < {ALPHA:g} is called significant."
    )


def _external(cfg: GridConfig, done: str, more: str = "") -> str:
    """What every fold's model `done` with the external sets (nothing when there are none)."""
    if not cfg.external:
        return ""
    names = _list(e.name for e in cfg.external)
    return f"Every fold's model also {done} the external set(s) {names}{more}."


def classification_methods(
    cfg: ClassificationGrid,
    facts: dict,
    n_boot: int,
    tasks: list[str],
    tests: list[str],
    extra: list[str],
) -> str:
    """The methods paragraph of a classification grid with these `tasks` and `tests` (the
    comparisons' test names); `extra`: sentences on the explain outputs the report found."""
    task = ", ".join(tasks)
    what = (
        "Performance is the AUROC of the pooled out-of-fold test predictions (macro average "
        "over classes for multiclass and multilabel tasks), with the per-fold mean and sd "
        "beside it."
    )
    sentences = [
        f"Task{'s' if len(tasks) > 1 else ''}: {task}.",
        _folds(facts, cfg.axes.fold, task),
        _fractions(cfg, facts, cfg.base.train.select_metric),
        _adaptation(cfg),
        _tests(tests, n_boot, what),
        _external(cfg, "scored", ENSEMBLE),
        *extra,
        f"Computed with fundusfm {__version__} (`fundusfm grid report`).",
    ]
    return " ".join(s for s in sentences if s)


def _unet(cfg: SegmentationGrid) -> str:
    """The segmentation model and its training."""
    s = cfg.segment
    encoders = {"frozen": "a frozen encoder (decoder trained)", "full": "full fine-tuning"}
    patch = f", on random {s.data.patch} px patches" if s.data.patch else ""
    return (
        f"A U-Net (decoder widths {_list(s.model.decoder_channels)}) on a torchvision "
        f"{s.model.arch.replace('resnet', 'ResNet-')} encoder initialised with {_inits(cfg)}, "
        f"with {' or '.join(encoders[x] for x in cfg.axes.method)}, at "
        f"{_list(cfg.axes.resolution)} px{patch}, was trained with {s.train.bce_weight:g} x "
        f"BCE + {s.train.dice_weight:g} x Dice loss for {_loop(s.train)}; "
        + _threshold(s.train.threshold)
    )


def _threshold(t: SegThresholdConfig) -> str:
    """How each model's probabilities became vessel pixels."""
    if t.rule == "fixed":
        return f"vessel pixels are those at or above probability {t.value:g} (fixed)."
    on = {"auto": "validation images (training images where a fold has none)"}
    on.update(val="validation images", train="training images")
    return (
        "vessel pixels are those at or above a threshold chosen per model, after training, "
        f"for the highest pooled Dice (0.01-0.99) on its {on[t.choose_on]}, and applied "
        "unchanged to its test and external images."
    )


def segmentation_methods(cfg: SegmentationGrid, facts: dict, n_boot: int) -> str:
    """The methods paragraph of a vessel-segmentation grid."""
    s = cfg.segment
    folds = (
        _folds(facts, cfg.axes.fold, "vessel")
        if s.data.splits is not None
        else "Models were trained on the dataset's official training images and tested on its "
        "test images (one fold)."
    )
    what = (
        "Performance is the Dice inside the field of view, per fold and as the mean per-image "
        "Dice over all folds' test images."
    )
    sentences = [
        folds,
        f"Labelled fractions {_list(cfg.axes.fraction)} of the training patients were used.",
        _unet(cfg),
        _tests([WILCOXON], n_boot, what),
        _external(cfg, "segmented", ACROSS),
        f"Computed with fundusfm {__version__} (`fundusfm grid report`).",
    ]
    return " ".join(x for x in sentences if x)
