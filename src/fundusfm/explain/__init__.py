"""Explanations of a trained bundle: Grad-CAM maps with ROAD faithfulness (`gradcam`) and
t-SNE/UMAP embeddings with patient-grouped neighbour scores (`tsne`). Imports `inference`
(probabilities), `models`, `bundle`, `tasks.features`, `engine`, `data`, `config` and `io`.
"""
