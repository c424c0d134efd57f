"""Importers of public fundus datasets: each turns a dataset as downloaded into a manifest.

`common` holds the registry and the helpers adapters share; `generic` reads the user's own
folders and CSV tables, `classification` and `grading` the disease and DR-grading datasets,
`vessels` the vessel-segmentation datasets; `registry` is the one entry point
(`import_dataset`). Adapters may import the rest of `data`, `config`, `io` and `errors`.
"""
