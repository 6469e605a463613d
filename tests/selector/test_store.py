"""The same behavioural tests for every store backend (edge; qdrant-client local mode = the server's API)."""

from __future__ import annotations

import numpy as np

from trapline.selector.store import point_id

from .conftest import embedding_like


def test_round_trip_vectors_and_payloads(store_factory):
    store = store_factory()
    x = embedding_like(300, dim=32)
    ids = [point_id(f"crop-{i}") for i in range(300)]
    store.create("c", 32)
    store.upsert("c", ids, x, [{"crop_id": f"crop-{i}", "row": i, "labelled": 0} for i in range(300)])
    assert store.count("c") == 300 and store.dimension("c") == 32 and store.collections() == ["c"]
    got = {r.id: r for batch in store.scroll("c", with_vectors=True, batch=64) for r in batch}
    assert set(got) == set(ids)
    for i in (0, 17, 299):
        r = got[ids[i]]
        assert r.payload["crop_id"] == f"crop-{i}" and r.payload["row"] == i
        np.testing.assert_array_equal(r.vector, x[i])


def test_set_payload_merges_and_integer_flags_round_trip(store_factory):
    store = store_factory()
    store.create("c", 4)
    ids = [point_id(str(i)) for i in range(3)]
    store.upsert("c", ids, np.eye(3, 4, dtype=np.float32), [{"crop_id": str(i), "labelled": 0} for i in range(3)])
    store.set_payload("c", [(ids[1], {"labelled": 1, "label": "zebra", "pred": {"zebra": 0.75, "lion": 0.25}})])
    got = {r.id: r.payload for b in store.scroll("c") for r in b}
    assert got[ids[1]] == {"crop_id": "1", "labelled": 1, "label": "zebra", "pred": {"zebra": 0.75, "lion": 0.25}}
    assert got[ids[0]] == {"crop_id": "0", "labelled": 0}
    assert isinstance(got[ids[1]]["labelled"], int), "flags are stored as integers (edge turns booleans to 0/1)"


def test_upsert_replaces_vector_and_payload(store_factory):
    store = store_factory()
    store.create("c", 2)
    pid = point_id("a")
    store.upsert("c", [pid], np.array([[1, 0]], np.float32), [{"crop_id": "a", "v": 1}])
    store.upsert("c", [pid], np.array([[0, 1]], np.float32), [{"crop_id": "a", "v": 2}])
    (r,) = [r for b in store.scroll("c", with_vectors=True) for r in b]
    assert store.count("c") == 1 and r.payload["v"] == 2
    np.testing.assert_array_equal(r.vector, [0, 1])


def test_alias_switch_and_persistence_across_reopen(store_factory):
    store = store_factory()
    store.create("p__v1", 2)
    store.create("p__v2", 2)
    store.switch_alias("p", "p__v1")
    assert store.aliases() == {"p": "p__v1"}
    store.switch_alias("p", "p__v2")
    assert store.aliases() == {"p": "p__v2"}
    store.upsert("p__v2", [point_id("a")], np.ones((1, 2), np.float32), [{"crop_id": "a"}])
    store.close()
    again = store_factory()
    assert again.aliases() == {"p": "p__v2"}
    assert again.collections() == ["p__v1", "p__v2"] and again.count("p__v2") == 1


def test_point_ids_are_stable_uuids():
    assert point_id("crop-1") == point_id("crop-1") != point_id("crop-2")
    # pinned: a changed namespace would orphan every stored point
    assert point_id("crop-1") == "61752e9b-4386-5354-8dba-305bf8e6d7c7"
