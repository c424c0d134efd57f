"""Settings: the typed configs of every command, YAML loading, `--set` overrides and dumping.

`core` holds the shared sections (data, model, train, runtime, run) and the classification
configs, `segment`, `grid` and `screen` the configs of those commands (`grid.GridConfig`: a
classification or a segmentation grid, told apart by `kind`). The bottom layer: it imports
nothing of fundusfm but `errors` and `io`.
"""
