"""The paper's MLP (one hidden layer of 100 units) on embedding vectors of real crops."""

from __future__ import annotations

import numpy as np
import pytest

from trapline.embedder.engine import Embedder
from trapline.embedder.server import DEFAULT_VERSION
from trapline.runtime.errors import InvalidArgument, NotFound
from trapline.trainer import mlp
from trapline.trainer.crops import split_by_source


@pytest.fixture(scope="module")
def real_vectors(real_crops, seeded_store_root):
    from trapline.embedder.modelstore import ModelStore

    e = Embedder(ModelStore(seeded_store_root), threads=2)
    e.load(DEFAULT_VERSION)
    vectors, _ = e.embed([c.jpeg() for c in real_crops])
    return vectors, [c.label for c in real_crops]


def test_the_mlp_learns_separable_real_crop_classes(real_crops, real_vectors):
    vectors, labels = real_vectors
    train, test = split_by_source(real_crops, 1 / 3, seed=0)
    assert not {real_crops[i].source for i in train} & {real_crops[i].source for i in test}
    clf = mlp.fit(vectors[train], [labels[i] for i in train], seed=0)
    pred = np.asarray(clf.classes)[clf.predict_proba(vectors[test]).argmax(1)]
    acc = (pred == np.asarray([labels[i] for i in test])).mean()
    chance = 1 / len(set(labels))
    assert acc >= 0.5 and acc > 4 * chance, f"held-out accuracy {acc:.2f} on frames it never saw (chance {chance:.2f})"
    assert clf.w1.shape == (256, mlp.HIDDEN)


def test_training_reports_held_out_metrics_and_is_deterministic_under_a_seed(real_vectors):
    vectors, labels = real_vectors
    a = mlp.train(vectors, labels, holdout_fraction=0.34, seed=3)
    b = mlp.train(vectors, labels, holdout_fraction=0.34, seed=3)
    assert np.array_equal(a.w1, b.w1) and np.array_equal(a.w2, b.w2)
    m = a.metrics
    assert m.holdout_size == int(m.confusion.sum()) >= len(set(labels))
    assert m.accuracy == pytest.approx(np.trace(m.confusion) / m.confusion.sum())
    assert set(m.per_class_recall) <= set(a.classes) and all(0 <= r <= 1 for r in m.per_class_recall.values())


def test_predict_gives_probabilities_in_batches():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    y = np.where(x[:, 0] > 0, "pos", "neg")
    clf = mlp.fit(x, y, seed=0)
    p = clf.predict_proba(x, chunk=7)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(p, clf.predict_proba(x), atol=1e-6)
    assert (np.asarray(clf.classes)[p.argmax(1)] == y).mean() > 0.9
    with pytest.raises(InvalidArgument, match=r"\[n, 16\]"):
        clf.predict_proba(np.zeros((2, 8), np.float32))


@pytest.mark.parametrize("x, y, text", [
    (np.zeros((4, 8), np.float32), ["a"] * 4, "two classes"),
    (np.zeros((4, 8), np.float32), ["a", "b"], "2 labels for 4 vectors"),
    (np.full((2, 8), np.nan, np.float32), ["a", "b"], "NaN"),
    (np.zeros((0, 8), np.float32), [], "non-empty"),
])
def test_bad_training_input_is_invalid_argument(x, y, text):
    with pytest.raises(InvalidArgument, match=text):
        mlp.train(x, y)


def test_classifier_store_versions_per_project(tmp_path):
    store = mlp.ClassifierStore(tmp_path)
    x = np.eye(4, dtype=np.float32).repeat(3, 0)
    clf = mlp.train(x, ["a", "b", "c", "d"] * 3, seed=0)
    assert store.save("p1", clf) == "clf-0001" and store.save("p1", clf) == "clf-0002"
    loaded = mlp.ClassifierStore(tmp_path).load("p1")
    assert loaded.version == "clf-0002" and np.array_equal(loaded.w1, clf.w1)
    with pytest.raises(NotFound, match="no trained classifier"):
        store.load("p2")
    with pytest.raises(NotFound, match="clf-0009"):
        store.load("p1", "clf-0009")
    with pytest.raises(InvalidArgument):
        store.load("../p1")
