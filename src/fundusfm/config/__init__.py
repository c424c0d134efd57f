"""Settings: the typed configs of every command, YAML loading, `--set` overrides and dumping.

`core` holds the shared sections (data, model, train, runtime, run) and the classification
configs, `segment`, `grid` and `screen` the configs of those commands. The bottom layer: it
imports nothing of fundusfm but `errors`.
"""
