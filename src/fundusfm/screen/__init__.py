"""Screening: `fundusfm predict` over a folder of photographs (`predict`, its per-file
functions that `serve` reuses) with its image quality gate (`quality`), the shift flag
(`tasks.shift`) and the HTML report a person reads (`report`, `report_page`,
`report_tables`: the bundle's card, counts, histogram, sortable table, ungradable groups).
Imports `inference`, `models`, `bundle`, `card`, `weights` (the card's metrics), `tasks`,
`explain`, `engine`, `data`, `config` and `io`.
"""
