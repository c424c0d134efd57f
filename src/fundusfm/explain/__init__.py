"""Explanations of a trained bundle: Grad-CAM maps with ROAD faithfulness (`gradcam`) and
t-SNE/UMAP embeddings with patient-grouped neighbour scores (`tsne`). Imports `models`,
`tasks.features`, `evaluation` and `data`.
"""
