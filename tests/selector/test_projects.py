"""The selector's domain core on every backend: round trips, restart recovery, SwitchEmbedding, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from trapline.runtime import errors
from trapline.selector.projects import PointMeta, Selector, collection_of

from .conftest import embedding_like, probabilities

N, DIM = 400, 64


def meta(ids, seq_len=4):
    return PointMeta(list(ids), [f"img-{i}" for i in range(len(ids))],
                     [["north", "south"][i % 2] for i in range(len(ids))],
                     [f"seq-{i // seq_len}" for i in range(len(ids))])


@pytest.fixture
def selector(tmp_path, store_factory):
    def make():
        s = Selector(store_factory(), tmp_path / "cache")
        s.load()
        return s
    return make


def fill(sel: Selector, version: str = "", seed: int = 0):
    ids = [f"crop-{i}" for i in range(N)]
    x = embedding_like(N, DIM, seed=seed)
    sel.upsert("serengeti", version, ids, x, meta(ids))
    return ids, x


def test_round_trip_and_restart_recovers_everything(selector, backend):
    sel = selector()
    ids, x = fill(sel)
    sel.set_labels("serengeti", [(ids[i], "zebra" if i % 2 else "wildebeest") for i in range(0, 40)])
    p = probabilities(N)
    sel.set_predictions("serengeti", ids, ["zebra", "wildebeest", "lion", "hyena", "gazelle"], p)
    before = {s: sel.select("serengeti", s, 15, seed=3)[1] for s in ("kcenter", "margin", "entropy", "random")}
    stats = sel.stats("serengeti")
    assert stats == {"points": N, "labelled": 40, "predicted": N, "embedding_version": "default",
                     "dimension": DIM, "backend": backend}
    sel.close()

    again = selector()  # a restart: everything comes back from the store (+ the .npy copy)
    assert again.stats("serengeti") == stats
    after = {s: again.select("serengeti", s, 15, seed=3)[1] for s in before}
    assert after == before, "selections after a restart must equal those before it"
    ver = again.projects["serengeti"].versions["default"]
    np.testing.assert_array_equal(ver.vectors(), x)
    assert ver.labels[2] == "wildebeest" and ver.labels[3] == "zebra" and ver.labels[50] == ""
    np.testing.assert_allclose(ver.probs[:N], p, rtol=1e-6)


def test_lost_or_interrupted_vector_copy_is_rebuilt_from_the_store(selector, tmp_path):
    sel = selector()
    _, x = fill(sel)
    sel.close()
    npy = tmp_path / "cache" / "vectors" / f"{collection_of('serengeti', 'default')}.npy"
    assert npy.exists()
    npy.unlink()
    again = selector()
    np.testing.assert_array_equal(again.projects["serengeti"].versions["default"].vectors(), x)
    again.close()
    np.save(npy, np.zeros((N, DIM), np.float32))  # corrupt copy ...
    npy.with_suffix(".dirty").touch()  # ... left by an interrupted write
    third = selector()
    np.testing.assert_array_equal(third.projects["serengeti"].versions["default"].vectors(), x)


def test_reupsert_keeps_labels_and_changes_vectors(selector):
    sel = selector()
    ids, x = fill(sel)
    sel.set_labels("serengeti", [(ids[5], "lion")])
    sel.upsert("serengeti", "", [ids[5], "crop-new"], x[:2] * -1, meta([ids[5], "crop-new"]))
    ver = sel.projects["serengeti"].versions["default"]
    assert ver.n == N + 1 and ver.labels[5] == "lion" and ver.labelled[5]
    np.testing.assert_array_equal(ver.vectors()[5], -x[0])
    sel.close()
    again = selector()
    assert again.stats("serengeti")["labelled"] == 1 and again.stats("serengeti")["points"] == N + 1


def test_switch_embedding_keeps_labels_and_predictions(selector):
    sel = selector()
    ids, _ = fill(sel)
    sel.set_labels("serengeti", [(ids[0], "zebra"), (ids[1], "lion")])
    sel.set_predictions("serengeti", ids[:3], ["zebra", "lion"], np.array([[.9, .1], [.2, .8], [.5, .5]]))
    x2 = embedding_like(N, DIM, seed=99)
    sel.upsert("serengeti", "v2", ids, x2, meta(ids))
    assert sel.stats("serengeti")["embedding_version"] == "default", "upserting a new version does not switch"
    assert sel.switch_embedding("serengeti", "v2") == ("default", "v2")
    st = sel.stats("serengeti")
    assert st["embedding_version"] == "v2" and st["labelled"] == 2 and st["predicted"] == 3
    _, picked, version = sel.select("serengeti", "margin", 1)
    assert version == "v2" and picked == [ids[2]]
    sel.close()
    again = selector()
    assert again.stats("serengeti") == st
    assert again.store.aliases()["trapline_serengeti"] == collection_of("serengeti", "v2")


def test_switch_refuses_when_labelled_crops_are_missing_and_changes_nothing(selector):
    sel = selector()
    ids, _ = fill(sel)
    sel.set_labels("serengeti", [(ids[-1], "zebra")])
    sel.upsert("serengeti", "v2", ids[:10], embedding_like(10, DIM, seed=5), meta(ids[:10]))
    with pytest.raises(errors.FailedPrecondition) as e:
        sel.switch_embedding("serengeti", "v2")
    assert e.value.field == "embedding_version" and ids[-1] in e.value.message
    assert sel.stats("serengeti")["embedding_version"] == "default"
    with pytest.raises(errors.NotFound) as e:
        sel.switch_embedding("serengeti", "v3")
    assert e.value.field == "embedding_version"


def store_count(sel: Selector) -> int:
    return sel.store.count(collection_of("serengeti", "default"))


def test_bad_vectors_are_rejected_with_the_field_and_nothing_written(selector):
    sel = selector()
    fill(sel)
    x = embedding_like(3, DIM)
    with pytest.raises(errors.InvalidArgument) as e:
        sel.upsert("serengeti", "", ["a", "b", "c"], x[:, :10], meta("abc"))
    assert e.value.field == "points[0].vector" and f"{DIM}" in e.value.message
    x[1, 4] = np.nan
    with pytest.raises(errors.InvalidArgument) as e:
        sel.upsert("serengeti", "", ["a", "b", "c"], x, meta("abc"))
    assert e.value.field == "points[1].vector"
    x[1, 4] = np.inf
    with pytest.raises(errors.InvalidArgument):
        sel.upsert("serengeti", "", ["a", "b", "c"], x, meta("abc"))
    with pytest.raises(errors.InvalidArgument) as e:
        sel.upsert("serengeti", "", ["a", "a"], np.zeros((2, DIM), np.float32), meta("aa"))
    assert e.value.field == "points[1].id"
    with pytest.raises(errors.InvalidArgument) as e:
        sel.upsert("bad name!", "", ["a"], np.zeros((1, DIM), np.float32), meta("a"))
    assert e.value.field == "project"
    assert store_count(sel) == N and sel.stats("serengeti")["points"] == N


def test_unknown_ids_are_not_found_and_nothing_written(selector):
    sel = selector()
    ids, _ = fill(sel)
    with pytest.raises(errors.NotFound) as e:
        sel.set_labels("serengeti", [(ids[0], "zebra"), ("nope", "lion")])
    assert e.value.field == "labels[1].id"
    with pytest.raises(errors.NotFound) as e:
        sel.set_predictions("serengeti", [ids[0], "nope"], ["a", "b"], np.array([[.5, .5], [.5, .5]]))
    assert e.value.field == "ids[1]"
    _, picked, _ = sel.select("serengeti", "random", N - 1, exclude_ids=["nope", ids[7]], seed=1)
    assert ids[7] not in picked, "excluded ids are never returned; unknown ones are ignored"
    with pytest.raises(errors.NotFound) as e:
        sel.stats("other")
    assert e.value.field == "project"
    st = sel.stats("serengeti")
    assert st["labelled"] == 0 and st["predicted"] == 0
    sel.close()
    assert selector().stats("serengeti")["labelled"] == 0, "the valid half of a rejected request was not stored"


def test_bad_predictions_are_rejected(selector):
    sel = selector()
    ids, _ = fill(sel)
    for probs, classes in [(np.array([[.5, .5, 0]]), ["a", "b"]), (np.array([[.7, .7]]), ["a", "b"]),
                           (np.array([[np.nan, 1]]), ["a", "b"]), (np.array([[-.5, 1.5]]), ["a", "b"])]:
        with pytest.raises(errors.InvalidArgument) as e:
            sel.set_predictions("serengeti", ids[:1], classes, probs)
        assert e.value.field == "probabilities"
    with pytest.raises(errors.InvalidArgument) as e:
        sel.set_predictions("serengeti", ids[:1], ["a", "a"], np.array([[.5, .5]]))
    assert e.value.field == "classes"
    assert sel.stats("serengeti")["predicted"] == 0


def test_select_filters_by_location_and_sequence(selector):
    sel = selector()
    ids, _ = fill(sel)
    _, picked, _ = sel.select("serengeti", "random", 30, locations=["north"], seed=2)
    assert all(int(c.split("-")[1]) % 2 == 0 for c in picked), "north crops are the even ones"
    _, picked, _ = sel.select("serengeti", "kcenter", 20, one_per_sequence=True)
    assert len({int(c.split("-")[1]) // 4 for c in picked}) == 20
    _, picked, _ = sel.select("serengeti", "random", 4, sequence_ids=["seq-3"], seed=1)
    assert sorted(picked) == sorted(ids[12:16])
    with pytest.raises(errors.InvalidArgument) as e:
        sel.select("serengeti", "random", 5, sequence_ids=["seq-3"])
    assert e.value.field == "count"
    with pytest.raises(errors.FailedPrecondition) as e:
        sel.select("serengeti", "entropy", 5)
    assert e.value.field == "strategy"


def test_a_failed_store_write_leaves_memory_and_vector_copy_as_before(selector, monkeypatch):
    sel = selector()
    ids, x = fill(sel)

    def refuse(*args, **kwargs):
        raise ConnectionError("qdrant went away")

    monkeypatch.setattr(sel.store, "upsert", refuse)
    with pytest.raises(ConnectionError):
        sel.upsert("serengeti", "", [ids[0], "crop-new"], -x[:2], meta([ids[0], "crop-new"]))
    ver = sel.projects["serengeti"].versions["default"]
    assert ver.n == N and "crop-new" not in ver.row_of
    np.testing.assert_array_equal(ver.vectors(), x)
    monkeypatch.undo()
    sel.upsert("serengeti", "", ["crop-new"], x[:1], meta(["crop-new"]))
    assert sel.stats("serengeti")["points"] == N + 1
