"""`GET /v1/model`: the bundle's model card as JSON, and the card's text.

The fields are what `fundusfm weights info` prints (`card.model_card`), taken from the same
places: bundle.json (task, classes, thresholds and whether they were `validated`,
preprocessing, provenance, shift reference) and the metrics the card reports
(`weights.card_metrics`: the training run's metrics.json when the bundle is a run's
`bundle/`). What the bundle does not record is null, never guessed. `threshold.words` is
the decision rule as the screening report writes it (`report_page.threshold_words`: a
threshold to 3 decimals, validated or not), so the page and report.html say it alike.
"""

from __future__ import annotations

from fundusfm.bundle import bundle_notes
from fundusfm.card import model_card
from fundusfm.card_metrics import config_summary, short_path
from fundusfm.config.serve import ServeConfig
from fundusfm.io import json_safe
from fundusfm.models.loaded import Bundle
from fundusfm.screen.report import cuts
from fundusfm.screen.report_page import threshold_words
from fundusfm.weights import shown_metrics


def _preprocessing(bundle: Bundle) -> dict:
    pre = bundle.preprocessing
    return {
        "resolution": pre.resolution,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "crop": pre.crop.model_dump(mode="json") if pre.crop else None,
        "fov_rule": bundle.meta.preprocessing.fov_rule,
        "defaulted": list(pre.defaulted),
    }


def _training_data(bundle: Bundle) -> dict:
    prov = bundle.meta.provenance
    return {
        "manifest": short_path(prov.manifest) if prov.manifest else None,
        "manifest_sha256": prov.manifest_sha256,
        "imported_from": prov.source_file,
        "source_sha256": prov.source_sha256,
        "settings": config_summary(prov.config or {}),
    }


def decision_words(bundle: Bundle) -> str:
    """The decision rule in the report's words (`threshold_words` of `report.cuts`)."""
    drawn = cuts(bundle)
    if bundle.kind == "binary":
        ((_, (cut, validated)),) = drawn.items()
        return threshold_words(cut, validated)
    if bundle.kind == "multilabel":
        return ", ".join(f"{c}: {threshold_words(t, v)}" for c, (t, v) in drawn.items())
    return "the class of highest probability (multiclass: no threshold)"


def model_info(bundle: Bundle, engine: str, notes: list[str], settings: ServeConfig) -> dict:
    """The card's fields, the server's engine and settings, notes, and the card's text."""
    meta, task = bundle.meta, bundle.meta.task
    metrics, unread = shown_metrics(bundle.path, bundle.meta)
    info = {
        "name": f"{meta.architecture.arch} fundus {task.name} model",
        "architecture": meta.architecture.model_dump(mode="json", exclude_none=True),
        "task": {"name": task.name, "kind": task.kind},
        "classes": bundle.classes,
        "threshold": {
            "values": bundle.thresholds,
            "validated": bundle.thresholds_validated,
            "note": task.thresholds_note,
            "words": decision_words(bundle),
        },
        "preprocessing": _preprocessing(bundle),
        "training_data": _training_data(bundle),
        "provenance": meta.provenance.model_dump(mode="json", exclude={"config"}),
        "pretraining": meta.pretraining.strategy if meta.pretraining else None,
        "method": meta.method,
        "shift_reference": meta.shift.model_dump(mode="json") if meta.shift else None,
        "validation_metrics": metrics,
        "weights_sha256": meta.weights_sha256,
        "notes": [*bundle_notes(meta), *notes, *unread],
        "server": {
            "engine": engine,
            "gradcam": settings.gradcam,
            "max_upload_bytes": settings.max_upload_bytes,
            "max_pixels": settings.max_pixels,
            "max_concurrent": settings.max_concurrent,
        },
        "card": model_card(meta, sum(p.numel() for p in bundle.model.parameters()), metrics),
    }
    return json_safe(info)
