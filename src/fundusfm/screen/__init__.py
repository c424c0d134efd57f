"""Screening: `fundusfm predict` over a folder of photographs (`predict`) with its image
quality gate (`quality`) and the shift flag (`tasks.shift`). Imports `inference`, `models`,
`bundle`, `tasks`, `explain`, `engine`, `data`, `config` and `io`.
"""
