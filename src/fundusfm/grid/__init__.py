"""The experiment grid: cells (task x init x method x resolution x fraction x fold), their
fingerprints and status (`cells`), running them (`runner`), and the report built from their
predictions (`report`, `figures`, `seg_report`). `cells` and the report never import torch,
so `grid status` and `grid report` start fast; `runner` imports the tasks.
"""
