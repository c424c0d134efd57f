"""Evaluation: metrics from predictions, never from models.

`metrics` (AUROC, AUPRC, thresholds, calibration), `seg_metrics` (vessel metrics inside the
field of view), `stats` (patient bootstrap intervals, clustered DeLong, paired tests). Takes
arrays and tables; imports only numpy/scipy/scikit-learn and `errors`.
"""
