"""Embeddings to HDF5, UMAP figures and the lens-physics probe."""
