"""The embedding engine on ONNX Runtime: determinism, normalization, bad crops, hot model switch."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest

from trapline.embedder.engine import Embedder
from trapline.embedder.modelstore import ModelStore
from trapline.embedder.server import DEFAULT_VERSION
from trapline.runtime.errors import InvalidArgument, NotFound

from .conftest import png_bytes


@pytest.fixture(scope="module")
def embedder(bundled_store):
    e = Embedder(bundled_store, threads=2)
    e.load(DEFAULT_VERSION)
    return e


def test_vectors_are_256d_float32_and_l2_normalized(embedder, crop_jpegs):
    vectors, version = embedder.embed(crop_jpegs[:6])
    assert version == DEFAULT_VERSION
    assert vectors.shape == (6, 256) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_embedding_is_deterministic_and_independent_of_batching(bundled_store, embedder, crop_jpegs):
    a, _ = embedder.embed(crop_jpegs[:5])
    b, _ = embedder.embed(crop_jpegs[:5])
    assert np.array_equal(a, b), "the same crops must give bit-identical vectors"
    fresh = Embedder(bundled_store, batch_size=2)
    fresh.load(DEFAULT_VERSION)
    c, _ = fresh.embed(crop_jpegs[:5])
    np.testing.assert_allclose(a, c, atol=1e-5, err_msg="vectors must not depend on the batch a crop is in")


def test_same_species_crops_are_closer_than_other_species(embedder, real_crops, crop_jpegs):
    vectors, _ = embedder.embed(crop_jpegs)
    labels = np.array([c.label for c in real_crops])
    sim = vectors @ vectors.T
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    assert sim[same & off].mean() > sim[~same].mean() + 0.1, "same-species crops should be nearer each other"


def test_other_sizes_and_png_are_resized_not_rejected(embedder):
    vectors, _ = embedder.embed([png_bytes(300, 180), png_bytes(64, 64)])
    assert vectors.shape == (2, 256)


@pytest.mark.parametrize("bad, why", [
    (b"not an image at all", "not a decodable image"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 50, "not a decodable image"),  # a truncated JPEG header
    (b"", "empty crop"),
])
def test_a_crop_that_is_not_an_image_is_invalid_argument_naming_it(embedder, crop_jpegs, bad, why):
    with pytest.raises(InvalidArgument) as err:
        embedder.embed([crop_jpegs[0], bad])
    assert err.value.field == "crops[1]" and why in err.value.message


def test_too_small_or_too_large_crops_are_invalid_argument(embedder):
    with pytest.raises(InvalidArgument, match="sides must be"):
        embedder.embed([png_bytes(4, 4)])
    with pytest.raises(InvalidArgument, match="sides must be"):
        embedder.embed([png_bytes(5000, 10)])


def test_an_empty_batch_is_invalid_argument(embedder):
    with pytest.raises(InvalidArgument, match="no crops"):
        embedder.embed([])


def test_an_unknown_version_is_not_found(embedder, crop_jpegs):
    with pytest.raises(NotFound, match="no model version 'v404'"):
        embedder.embed(crop_jpegs[:1], "v404")
    with pytest.raises(InvalidArgument):
        embedder.embed(crop_jpegs[:1], "../etc")


def test_a_switch_during_a_call_lets_the_call_finish_on_the_old_version(bundled_store, crop_jpegs, tmp_path):
    store = ModelStore(tmp_path / "models")
    old = bundled_store.get(DEFAULT_VERSION)
    store.import_folder(old.path)
    twin = tmp_path / "twin"
    shutil.copytree(old.path, twin)
    (twin / "manifest.json").write_text((twin / "manifest.json").read_text().replace(DEFAULT_VERSION, "twin"))
    store.import_folder(twin)
    e = Embedder(store, batch_size=4, threads=1)
    e.load(DEFAULT_VERSION)
    results: dict = {}
    started = threading.Event()
    model = e.model()
    original_run = model.run

    def slow_run(batch):  # signal once the old model is in use, then keep going
        started.set()
        return original_run(batch)

    model.run = slow_run  # type: ignore[method-assign]
    t = threading.Thread(target=lambda: results.update(old=e.embed(crop_jpegs[:16])))
    t.start()
    assert started.wait(60)
    e.load("twin")
    t.join(120)
    assert results["old"][1] == DEFAULT_VERSION, "a call in flight during a switch must finish on the old version"
    vectors, version = e.embed(crop_jpegs[:2])
    assert version == "twin" and vectors.shape == (2, 256)
    np.testing.assert_allclose(vectors, results["old"][0][:2], atol=1e-5)  # same weights, new id


def test_cuda_is_asked_for_only_when_onnx_runtime_offers_it(monkeypatch):
    import trapline.embedder.engine as engine

    monkeypatch.setattr(engine, "_cuda_unusable", False)
    monkeypatch.setattr(engine.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert engine.choose_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert engine.choose_providers("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(engine.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert engine.choose_providers("auto") == ["CPUExecutionProvider"]
    assert engine.choose_providers("cuda") == ["CPUExecutionProvider"]


def test_the_active_model_reports_the_providers_its_session_really_uses(embedder):
    providers = embedder.active.session.get_providers()
    assert embedder.active.providers == providers and providers[-1] == "CPUExecutionProvider"


def test_the_embedder_service_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys, trapline.embedder.server, trapline.embedder.engine, trapline.embedder.preprocess; "
            "bad = [m for m in ('torch', 'torchvision') if m in sys.modules]; "
            "assert not bad, f'embedder imported {bad}'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
