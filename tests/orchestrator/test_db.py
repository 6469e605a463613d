"""The orchestrator's database: migrations, idempotent image registration, labels and corrections."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from trapline.orchestrator.db import MIGRATIONS, Database, Detection, ImageRecord, Settings
from trapline.runtime.errors import AlreadyExists, NotFound


@pytest.fixture
def db(tmp_path):
    db = Database(tmp_path / "o.db")
    db.migrate()
    db.create_project("p", "P", Settings(), ["deer", "fox"])
    yield db
    db.close()


def test_migrations_run_once_and_the_file_is_in_wal_mode(tmp_path):
    path = tmp_path / "o.db"
    db = Database(path)
    assert db.schema_version() == 0 and not db.migrated
    assert db.migrate() == len(MIGRATIONS)
    db.close()
    again = Database(path)
    assert again.migrated and again.migrate() == len(MIGRATIONS)
    again.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert {"projects", "images", "detections", "crops", "labels", "label_events", "batches", "jobs",
            "ground_truth", "vectors", "predictions", "model_versions"} <= {
        r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_projects_keep_paper_defaults_and_refuse_duplicates(db):
    p = db.project("p")
    assert (p.settings.seed_labels, p.settings.batch_size, p.settings.finetune_every, p.settings.strategy) == \
        (1000, 100, 2000, "kcenter")
    with pytest.raises(AlreadyExists):
        db.create_project("p", "again", Settings(), [])
    with pytest.raises(NotFound):
        db.project("nope")


def test_the_same_image_twice_is_one_image(db):
    recs = [ImageRecord(key=f"/x/{i}.jpg", uri=f"/x/{i}.jpg", file=f"{i}.jpg") for i in range(5)]
    assert db.add_images("p", "j1", recs) == (5, 5)
    assert db.add_images("p", "j2", recs + [ImageRecord(key="/x/9.jpg", uri="/x/9.jpg", file="9.jpg")]) == (1, 6)
    assert len(db.images("p")) == 6
    # images already finished are not handed to a later job
    first = db.job_images("j2", "pending")[0]
    db.record_detections(first["id"], 10, 10, [], {}, "p", 0.9, "d")
    assert db.add_images("p", "j3", recs) == (0, 4)


def test_recording_detections_twice_replaces_them(db):
    db.add_images("p", "j", [ImageRecord(key="a", uri="a", file="a")])
    image = db.images("p")[0]["id"]
    dets = [Detection("1", 0.95, (0.1, 0.1, 0.2, 0.2)), Detection("1", 0.99, (0.5, 0.5, 0.2, 0.2))]
    for _ in range(2):  # a resumed job redoes an image it had half-stored
        ids = db.record_detections(image, 100, 80, dets, {0: "file:///c/0", 1: "file:///c/1"}, "p", 0.9, "d")
    assert ids == [f"{image}-0", f"{image}-1"] and db.crop_count("p") == 2
    db.put_vectors("v1", ids, np.eye(2, 4, dtype=np.float32))
    db.put_vectors("v1", ids, np.eye(2, 4, dtype=np.float32))
    got_ids, vectors = db.project_vectors("p", "v1")
    assert got_ids == ids and vectors.shape == (2, 4)
    assert [r["id"] for r in db.crops_without_vector("p", "v2", 10)] == ids


def test_labels_repeat_idempotently_and_changes_are_corrections(db):
    db.add_images("p", "j", [ImageRecord(key="a", uri="a", file="a")])
    image = db.images("p")[0]["id"]
    ids = db.record_detections(image, 1, 1, [Detection("1", 1, (0, 0, 1, 1))], {0: "file:///c"}, "p", 0.9, "d")
    assert db.store_labels("p", "", "ana", [(ids[0], "deer")])[1:] == (1, 0, 0)
    assert db.store_labels("p", "", "ana", [(ids[0], "deer")])[1:] == (0, 1, 0)
    changed, *counts = db.store_labels("p", "", "ben", [(ids[0], "fox")])
    assert counts == [0, 0, 1] and changed == [(ids[0], "fox")]
    events = db.label_events("p")
    assert [(e["label"], e["previous"], e["labeller"]) for e in events] == [("deer", "", "ana"), ("fox", "deer", "ben")]
    assert db.labels("p") == {ids[0]: "fox"} and db.label_count("p") == 1
