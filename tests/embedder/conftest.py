"""Shared fixtures: real crops from tests/data/frames and a model store holding the bundled default model."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from trapline.embedder.modelstore import ModelStore
from trapline.embedder.server import BUNDLED, DEFAULT_VERSION, seed_bundled
from trapline.trainer.crops import load_set

FRAMES = Path(__file__).resolve().parents[1] / "data" / "frames"


@pytest.fixture(scope="session")
def real_crops():
    """Labelled 256x256 crops of the committed Serengeti field-guide frames (12 species x 3)."""
    crops = load_set(FRAMES / "serengeti_fieldguide")
    assert len(crops) >= 24, "the sample frames should give at least 24 labelled crops"
    return crops


@pytest.fixture(scope="session")
def crop_jpegs(real_crops):
    return [c.jpeg() for c in real_crops]


@pytest.fixture(scope="session")
def bundled_store(tmp_path_factory) -> ModelStore:
    """A store seeded with the bundled default model (read-only use)."""
    if not (BUNDLED / DEFAULT_VERSION / "model.onnx").is_file():
        pytest.fail(f"the default embedding model is missing from {BUNDLED}; build it with "
                    "python -m trapline.trainer.references.embedder.train --bundle services/embedder/default_model")
    store = ModelStore(tmp_path_factory.mktemp("models"))
    seed_bundled(store)
    return store


def png_bytes(w: int, h: int, color=(120, 80, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()
