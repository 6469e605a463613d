"""Fixtures: real crops from tests/data/frames and the bundled default model in a temporary store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from trapline.embedder.modelstore import ModelStore
from trapline.embedder.server import DEFAULT_VERSION, seed_bundled
from trapline.trainer.crops import load_set

FRAMES = Path(__file__).resolve().parents[1] / "data" / "frames"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def real_crops():
    crops = load_set(FRAMES / "serengeti_fieldguide")
    assert len({c.label for c in crops}) >= 8
    return crops


@pytest.fixture(scope="session")
def seeded_store_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bundled-models")
    seed_bundled(ModelStore(root))
    assert (root / DEFAULT_VERSION / "weights.npz").is_file()
    return root


@pytest.fixture
def store(seeded_store_root, tmp_path) -> ModelStore:
    """A writable store (per test) holding the default model."""
    shutil.copytree(seeded_store_root, tmp_path / "models")
    return ModelStore(tmp_path / "models")


def few_crops(crops, classes: int, per_class: int):
    """The first ``per_class`` crops of the first ``classes`` classes (sorted by label)."""
    out = []
    for label in sorted({c.label for c in crops})[:classes]:
        out += [c for c in crops if c.label == label][:per_class]
    return out
