"""Model cards and the hub convention: the README.md a model hub shows beside the weights.

`model_card(meta, parameters, metrics, license)` is the one writer of a bundle's card:
`fundusfm weights info` prints it and `weights export --format timm` writes it as the
folder's README.md, so the two never differ. Everything in it comes from the bundle
(`bundle.json`) and the metrics the caller hands over (a training run's `metrics.json`, or
the `metrics.json` of `fundusfm evaluate`, which holds patient-bootstrap intervals); what
neither records is written as "not recorded in this bundle", never guessed.

The card opens with the hub's YAML metadata (library_name, license, tags, pipeline_tag),
then: model description, use with timm, intended and out-of-scope use, training data,
evaluation, limitations, licence, citation.

The hub folder follows timm's own `push_to_hf_hub` layout (config.json with
`pretrained_cfg`, model.safetensors, README.md). timm builds `TIMM_ARCHS` with the same
parameter names and layout as torchvision, and its ResNet classifier is one Linear layer
(`fc`): a linear head exports whole; an MLP head (the paper's) does not fit `fc`, so only the
backbone goes to timm (`num_classes=0`, pooled features).
"""

from __future__ import annotations

from collections.abc import Sequence

import yaml

from fundusfm import __version__
from fundusfm.bundle import BundleMeta, bundle_notes, read_preprocessing
from fundusfm.card_metrics import (
    NOT_RECORDED,
    config_summary,
    evaluation_section,
    short_path,
)

TIMM_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")  # same layout in timm
CODE_LICENSE = "Apache-2.0"
CITATION = """@misc{jang2024fundus,
  title = {A Disease-Specific Foundation Model Using Over 100K Fundus Images},
  author = {Jang and others},
  year = {2024},
  eprint = {2408.08790},
  archivePrefix = {arXiv}
}"""


def timm_exportable(meta: BundleMeta) -> bool:
    """Whether `weights export --format timm` can write this bundle (a classifier whose
    ResNet timm builds with the same layout)."""
    return not meta.segmentation and meta.architecture.arch in TIMM_ARCHS


def whole_in_timm(meta: BundleMeta) -> bool:
    """True when timm's ResNet holds the whole classifier: a linear head becomes its `fc`."""
    return timm_exportable(meta) and (meta.architecture.head or "linear") == "linear"


def hub_license(meta: BundleMeta, override: str | None = None) -> str | None:
    """The weights' licence: `override`, else what the bundle records, else None."""
    return override or meta.provenance.license


def model_card(
    meta: BundleMeta,
    parameters: int,
    metrics: Sequence[dict] = (),
    license: str | None = None,
) -> str:
    """The card of a bundle as Markdown with hub front matter (see the module docstring).

    `metrics` are metrics.json dicts of this model: a training run's (point estimates per
    part) or `fundusfm evaluate`'s (with `external_ci`); `license` overrides the bundle's."""
    licence = hub_license(meta, license)
    sections = [
        _front_matter(meta, licence),
        f"# {meta.architecture.arch} fundus {meta.task.name} model (fundusfm)",
        _description(meta, parameters),
        _usage(meta),
        _intended_use(),
        _training_data(meta),
        evaluation_section(meta, metrics),
        _limitations(meta),
        _licence(licence),
        _citation(),
    ]
    return "\n\n".join(sections) + "\n"


def card_overview(meta: BundleMeta, parameters: int, metrics: Sequence[dict] = ()) -> str:
    """The card's model description, training data and evaluation sections (Markdown), in
    the words `weights info` prints: what the screening report shows at its top."""
    sections = [
        _description(meta, parameters),
        _training_data(meta),
        evaluation_section(meta, metrics),
    ]
    return "\n\n".join(sections)


def _front_matter(meta: BundleMeta, licence: str | None) -> str:
    head = {}
    if timm_exportable(meta):
        head["library_name"] = "timm"
    head["license"] = licence.lower() if licence else "unknown"
    kind = "image-segmentation" if meta.segmentation else "image-classification"
    if meta.task.kind == "features":
        kind = "image-feature-extraction"
    tags = [kind, *(["timm"] if timm_exportable(meta) else []), "fundus", "retina"]
    head["tags"] = [*tags, "ophthalmology", "medical-imaging", "fundusfm", meta.architecture.arch]
    if timm_exportable(meta):  # what the timm folder holds: the classifier or features
        whole = whole_in_timm(meta)
        head["pipeline_tag"] = "image-classification" if whole else "image-feature-extraction"
    return "---\n" + yaml.safe_dump(head, sort_keys=False) + "---"


def _description(meta: BundleMeta, parameters: int) -> str:
    a, t, p = meta.architecture, meta.task, read_preprocessing(meta)
    hidden = f" (hidden {a.hidden})" if a.head == "mlp" else ""
    model = f"{a.arch} + {a.head or 'linear'} head"
    if meta.segmentation:
        model = f"U-Net on a {a.arch} encoder"
    elif a.type == "backbone":
        model, hidden = f"{a.arch} backbone alone ({a.features}-d pooled features)", ""
    defaulted = f" ({', '.join(p.defaulted)}: not recorded, defaults used)" if p.defaulted else ""
    lines = [
        "## Model description",
        "",
        f"- **Model:** {model}{hidden}, {parameters:,} parameters",
        f"- **Task:** {t.name} ({t.kind}): {', '.join(map(str, t.classes)) or 'no classes'}",
        f"- **Decision rule:** {_decision(meta)}",
        f"- **Input:** {p.resolution} px, mean {list(p.mean)}, std {list(p.std)}{defaulted}",
        f"- **Preprocessing:** {_preprocessing(meta)}",
        *_source(meta),
        *_training_facts(meta),
        f"- **Weights:** sha256 {meta.weights_sha256} (the bundle's model.safetensors)",
    ]
    return "\n".join(lines)


def _source(meta: BundleMeta) -> list[str]:
    """The published checkpoint the backbone started from, and its publisher's recipe."""
    src = meta.provenance.init_source
    if src is None or src.init is None:
        return [f"- **On load:** {'; '.join(src.notes)}"] if src and src.notes else []
    recipe = (
        f"{src.resize}, {src.resolution} px, interpolation {src.interpolation or 'not stated'}, "
        f"mean {list(src.mean or ())}, std {list(src.std or ())} (the backbone maps fundusfm's "
        "ImageNet-normalised input to these)"
    )
    notes = f"; on load: {'; '.join(src.notes)}" if src.notes else ""
    return [
        f"- **Starts from:** {src.title} ({src.init}), file {src.file}, sha256 {src.sha256}",
        f"- **Its publisher's preprocessing:** {recipe}{notes}",
    ]


def _decision(meta: BundleMeta) -> str:
    t = meta.task
    if meta.segmentation:
        return "vessel probability per pixel (sigmoid)"
    if t.kind == "features":
        return "none: pooled features, no classes (fine-tune it or probe its features)"
    if t.kind == "multiclass":
        return "the class of highest probability (argmax; softmax over the classes)"
    how = "chosen on validation data" if t.thresholds_validated else _unvalidated(meta)
    if t.kind == "binary":
        cut = t.thresholds[0] if t.thresholds else 0.5
        return f"{t.classes[-1]} when its probability (softmax) >= {cut}, {how}"
    return f"per-label thresholds {t.thresholds} on sigmoid probabilities, {how}"


def _unvalidated(meta: BundleMeta) -> str:
    imported = meta.provenance.source_file is not None
    why = meta.task.thresholds_note or ("imported weights" if imported else NOT_RECORDED)
    return f"not chosen on validation data ({why})"


def _preprocessing(meta: BundleMeta) -> str:
    p = read_preprocessing(meta)
    if p.crop is None:
        size = f"padded to a square and resized to {p.resolution} px"
        if p.fov_diameter is not None:
            size = f"scaled so the FOV is {p.fov_diameter} px wide, on a {p.resolution} px square"
        flips = ", predictions averaged over flips" if p.tta_flips else ""
        return f"{size}; input {p.input}{flips}"
    c, rule = p.crop, meta.preprocessing.fov_rule
    return (
        f"field-of-view crop (threshold {c.fov_threshold}, min fraction "
        f"{c.fov_min_fraction}, margin {c.margin}), padded to a square, resized to "
        f"{p.resolution} px ({c.interpolation}); FOV rule {rule or 'not recorded'}; "
        f"`fundusfm preprocess --resolution {p.resolution}` with these settings"
    )


def _training_facts(meta: BundleMeta) -> list[str]:
    facts = {
        "Pretraining": meta.pretraining.strategy if meta.pretraining else None,
        "Adaptation": meta.method,
        "Probe": meta.probe,
        "Made with": ", ".join(f"{k} {v}" for k, v in meta.provenance.versions.items()),
        "Created": meta.provenance.created,
        "fundusfm commit": meta.provenance.git_commit,
    }
    return [f"- **{k}:** {v}" for k, v in facts.items() if v]


def _usage(meta: BundleMeta) -> str:
    lines = ["## Use with timm", ""]
    if meta.segmentation:
        lines.append(
            "A vessel U-Net has no timm export (timm's models are classifiers); load it with "
            "`fundusfm.load_bundle(FOLDER)` and score it with `fundusfm segment eval`."
        )
        return "\n".join(lines)
    if not timm_exportable(meta):
        lines.append(
            f"timm builds only {', '.join(TIMM_ARCHS)} with fundusfm's layout, so this "
            f"{meta.architecture.arch} has no timm export. Load it with "
            "`fundusfm.load_bundle(FOLDER)` or export it with `fundusfm weights export "
            "--format onnx` (or torchvision)."
        )
        return "\n".join(lines)
    whole = whole_in_timm(meta)
    classes = len(meta.task.classes) if whole else 0
    lines += [
        _usage_words(meta, whole),
        "",
        *_timm_snippet(meta.architecture.arch, classes),
        "",
        "Feed it images preprocessed as above (the field-of-view crop first: timm's "
        "transforms alone resize the whole photograph, black border included), scaled to "
        "[0, 1] and normalised with the mean and std of `config.json`. `config.json` also "
        "holds the classes, thresholds and crop settings under `fundusfm`.",
    ]
    return "\n".join(lines)


def _timm_snippet(arch: str, classes: int) -> list[str]:
    """How timm loads the folder: from the hub, a local copy, or the weights file alone
    (whose overlay must carry num_classes, else timm drops the classifier as mismatched)."""
    return [
        "```python",
        "import timm",
        'model = timm.create_model("hf-hub:OWNER/NAME", pretrained=True).eval()',
        '# or a local copy of this folder: timm.create_model("local-dir:FOLDER", pretrained=True)',
        "# or the weights file alone:",
        f'model = timm.create_model("{arch}", pretrained=True, num_classes={classes},',
        f'    pretrained_cfg_overlay=dict(file="FOLDER/model.safetensors", num_classes={classes}))',
        "```",
    ]


def _usage_words(meta: BundleMeta, whole: bool) -> str:
    if whole:
        score = "sigmoid" if meta.task.kind == "multilabel" else "softmax"
        return (
            "`fundusfm weights export --format timm` writes this folder; timm's "
            f"{meta.architecture.arch} loads it whole and returns logits in the order of "
            f"`label_names` (probabilities: {score})."
        )
    return (
        "The bundle's head is an MLP, which does not fit timm's one-Linear classifier `fc`: "
        "`fundusfm weights export --format timm --backbone-only` writes the backbone alone "
        f"(`num_classes=0`: pooled features, {meta.architecture.arch}'s `num_features` wide). "
        "The whole classifier is in the fundusfm bundle and in "
        "`weights export --format torchvision` (the head as `fc.*`)."
    )


def _intended_use() -> str:
    return "\n".join(
        [
            "## Intended use",
            "",
            "Research on colour fundus photographs: a starting point for fine-tuning and "
            "linear probing, benchmarks of initialisations, and reproduction of Jang et al. "
            "(arXiv 2408.08790) with the fundusfm protocol.",
            "",
            "## Out-of-scope use",
            "",
            "- Not a medical device; not cleared or approved by any regulator. Do not use its "
            "outputs to diagnose, screen, triage or treat patients.",
            "- Other imaging (OCT, angiography, anterior-segment or smartphone photographs) and "
            "images not preprocessed as described above.",
            "- Cameras, sites and populations it has not been validated on (see Limitations).",
        ]
    )


def _training_data(meta: BundleMeta) -> str:
    prov = meta.provenance
    lines = ["## Training data", ""]
    if prov.source_file:
        lines.append(
            f"Imported from `{prov.source_file}` (sha256 {prov.source_sha256}, loaded "
            f"{prov.loaded_by or 'weights-only'}); the data these weights were trained on "
            f"are {NOT_RECORDED}: see their publisher."
        )
        return "\n".join(lines)
    if prov.manifest_sha256:
        lines.append(f"- **Manifest:** {short_path(prov.manifest)}, sha256 {prov.manifest_sha256}")
    else:
        lines.append(f"- **Manifest:** {NOT_RECORDED}")
    lines += [f"- **{k}:** {v}" for k, v in config_summary(prov.config or {}).items()]
    return "\n".join(lines)


def _limitations(meta: BundleMeta) -> str:
    lines = [
        "## Limitations",
        "",
        "- Camera and population shift: performance on other cameras, sites, populations "
        "and image quality is unknown until measured there (`fundusfm evaluate`; its shift "
        "check flags images unlike the validation images).",
        "- Two eyes per patient: images of one patient are correlated. Splits and intervals "
        "here group by patient; figures computed per image without that are optimistic.",
        "- Inputs must be preprocessed exactly as described (field-of-view crop, resolution, "
        "normalisation); other preprocessing changes the outputs.",
        "- Labels are those of the training data, with their graders' errors and definitions.",
    ]
    lines += [f"- {note}" for note in bundle_notes(meta)]
    return "\n".join(lines)


def _licence(licence: str | None) -> str:
    weights = licence or f"unspecified ({NOT_RECORDED}; ask whoever trained or released them)"
    return "\n".join(
        [
            "## Licence",
            "",
            f"- **Weights:** {weights}.",
            f"- **Code:** fundusfm is {CODE_LICENSE}.",
            "- The licences of the training images and of any starting weights (e.g. "
            "torchvision's ImageNet weights) may restrict use too.",
        ]
    )


def _citation() -> str:
    toolkit = (
        "@software{fundusfm,\n  title = {fundusfm: disease-specific foundation models for "
        f"retinal fundus photographs}},\n  version = {{{__version__}}}\n}}"
    )
    return "\n".join(
        [
            "## Citation",
            "",
            "Jang et al., A Disease-Specific Foundation Model Using Over 100K Fundus Images, "
            "arXiv 2408.08790; and the fundusfm toolkit.",
            "",
            "```bibtex",
            CITATION,
            "```",
            "",
            "```bibtex",
            toolkit,
            "```",
        ]
    )
