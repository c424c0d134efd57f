"""Evaluation: metrics from predictions, never from models.

`metrics` (AUROC, AUPRC, thresholds, calibration), `seg_metrics` (vessel metrics inside the
field of view), `stats` (patient bootstrap intervals, clustered DeLong, paired tests). Takes
arrays and tables; imports numpy, pandas, scipy, scikit-learn, scikit-image and `errors`,
nothing else of fundusfm.
"""
