"""Builds the default embedding model: ``python -m trapline.trainer.references.embedder.train``."""
