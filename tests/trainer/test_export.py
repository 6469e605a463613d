"""Torch and ONNX Runtime agree: the rebuilt torch model of a version reproduces its ONNX file."""

from __future__ import annotations

import numpy as np
import torch

from trapline.embedder.engine import Embedder
from trapline.embedder.server import DEFAULT_VERSION
from trapline.trainer.engine import embed_pixels
from trapline.trainer.export import export_checked, parity
from trapline.trainer.models import ModelSpec, build, load_weights


def _default_torch_model(store):
    v = store.get(DEFAULT_VERSION)
    spec = ModelSpec.from_dict(v.manifest["architecture"])
    return build(spec.arch, spec.dim, weights=load_weights(v.weights_path), image_size=spec.image_size)


def test_bundled_onnx_matches_torch_rebuilt_from_its_weights_on_real_crops(store, real_crops):
    """Covers the whole chain: weights.npz, architecture, preprocessing (PIL in both) and the export."""
    model = _default_torch_model(store)
    crops = real_crops[:6]
    torch_vectors = embed_pixels(model, [c.pixels for c in crops])
    e = Embedder(store, threads=2)
    e.load(DEFAULT_VERSION)
    onnx_vectors, _ = e.embed([c.jpeg(quality=100) for c in crops])
    # JPEG re-encoding of the crop is the only difference: vectors stay very close.
    cos = (torch_vectors * onnx_vectors).sum(1)
    assert cos.min() > 0.98, f"cosine between torch and ONNX vectors {cos.min():.4f}"
    np.testing.assert_allclose(np.linalg.norm(torch_vectors, axis=1), 1.0, atol=1e-5)


def test_export_parity_is_checked_on_the_same_input(tmp_path, store, real_crops):
    model = _default_torch_model(store)
    from trapline.trainer.presets import EvalPreset

    x = torch.stack([EvalPreset()(c.pixels) for c in real_crops[:3]]).numpy()
    diff = export_checked(model, tmp_path / "m.onnx", x)
    assert diff < 1e-4 and parity(model, tmp_path / "m.onnx", x[:1]) < 1e-4


def test_torch_embedding_is_deterministic(store, real_crops):
    model = _default_torch_model(store)
    a = embed_pixels(model, [c.pixels for c in real_crops[:3]])
    b = embed_pixels(model, [c.pixels for c in real_crops[:3]])
    assert np.array_equal(a, b)


def test_resnet50_is_available_without_a_download(tmp_path):
    """The paper's backbone, for GPU deployments: random init (or a local weights file), same head and export."""
    from trapline.trainer.models import partial_state

    model = build("resnet50", pretrained=False, seed=0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 256)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(2))
    weights = partial_state(model, pretrained=False)
    assert "backbone.net.conv1.weight" in weights and "head.weight" in weights
    again = build("resnet50", pretrained=False, seed=1, weights=weights)
    with torch.no_grad():
        torch.testing.assert_close(again(x), y)
