"""siamese-cv: triplet-loss image embeddings and reverse image search, as a DVC pipeline."""

__version__ = "0.1.0"
