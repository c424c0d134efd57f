"""Screening: `fundusfm predict` over a folder of photographs (`predict`) with its image
quality gate (`quality`). Imports `models`, `explain`, `data` and `config`.
"""
