"""Tasks: what a command runs, built from the engine, models and data.

`classify` (pretraining and fine-tuning runs, their folders and metrics) with
`classify_job` (what classification hands the engine loop), `evaluate`
(external validation of a bundle), `features` and `probe` (frozen features extracted once and
linear probes fitted on them), `segment` (vessel U-Net training and evaluation) with
`seg_threshold` (its stored threshold) and `seg_transfer` (one bundle scored on several
datasets: transfer.csv), `shift` (the reference of a bundle's validation images and the
distance of new ones to it). Imports `inference`, `engine`, `models`, `evaluation`, `data`,
`bundle`, `config` and `io`.
"""
