"""Shared fixtures: real-shaped data (L2-normalised 256-d vectors with embedding-like structure) and stores."""

from __future__ import annotations

import numpy as np
import pytest

from trapline.selector.store import open_store

BACKENDS = ["edge", "local"]  # local = qdrant-client local mode: the same QdrantClient calls as a remote server


def embedding_like(n: int, dim: int = 256, seed: int = 0, clusters: int = 12) -> np.ndarray:
    """Clustered, low intrinsic dimension, L2-normalised: the shape of CNN crop embeddings."""
    rng = np.random.default_rng(seed)
    latent = 16
    mix = rng.standard_normal((latent, dim)).astype(np.float32)
    centres = rng.standard_normal((clusters, latent)).astype(np.float32) * 2
    z = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, latent)).astype(np.float32)
    x = z @ mix + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def probabilities(n: int, classes: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, classes)) * 2
    p = np.exp(logits - logits.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def store_factory(tmp_path, backend):
    """Opens (and reopens) a store of the current backend under tmp_path; closes what it opened."""
    opened = []

    def make():
        s = open_store(backend, path=tmp_path / "qdrant")
        opened.append(s)
        return s

    yield make
    for s in opened:
        try:
            s.close()
        except Exception:
            pass
