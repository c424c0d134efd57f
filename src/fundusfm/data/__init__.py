"""Data: from raw images and label tables to batches.

Decoding (`decode`), manifests (`manifest`, checked by `validate` for `fundusfm data check`),
public-dataset importers (`adapters/`), label harmonisation (`labels`, with `vocabulary/`),
near-duplicate grouping (`dedup`), the field-of-view crop and the per-resolution image cache
(`preprocess`), patient-grouped splits and labelled fractions (`splits`), augmentation
(`transforms`) and the datasets that feed training (`datasets`, `vessel_images`, with
`vessel_frame`: square or FOV-scaled framing and back; `vessel_input`: the input form and
camera-shift augmentation). It may
import `config`, `io` and `errors`; nothing here knows about models or training.
"""
