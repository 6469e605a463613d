"""The orchestrator's durable state: one SQLite file per deployment (WAL), migrated at start.

Everything the loop needs to survive a restart lives here: projects and their loop settings, images,
detections, crops, crop vectors per embedding version, human labels with their history (who, when,
which batch, corrections), model predictions, batches, model versions and jobs. Ground-truth labels
from a COCO Camera Traps import are kept in their own table and never read by the loop.

Plain ``sqlite3``, no grpc, no asyncio: callers run these methods off the event loop
(``asyncio.to_thread``). One connection guarded by a lock; each public method is one transaction.
PostgreSQL is not supported: the SQL uses SQLite's upserts and ``user_version`` migrations, and the
orchestrator is one process per deployment, which SQLite in WAL mode serves well.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trapline.runtime.errors import AlreadyExists, InvalidArgument, NotFound

#: Schema migrations, applied in order; PRAGMA user_version records how many ran.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE projects (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        settings TEXT NOT NULL,            -- JSON of ProjectSettings with defaults filled in
        classes TEXT NOT NULL,             -- JSON list, grows when new classes are allowed
        embedding_version TEXT NOT NULL DEFAULT '',
        classifier_version TEXT NOT NULL DEFAULT '',
        classifier_accuracy REAL NOT NULL DEFAULT 0,
        finetunes_started INTEGER NOT NULL DEFAULT 0,
        pending_sync INTEGER NOT NULL DEFAULT 0, -- labels stored but not yet pushed to selector/trainer
        created_at REAL NOT NULL
    );
    CREATE TABLE images (
        id INTEGER PRIMARY KEY,            -- ingest order
        project TEXT NOT NULL REFERENCES projects(id),
        key TEXT NOT NULL,                 -- the image's identity in the project (resolved path or URI)
        uri TEXT NOT NULL,
        file TEXT NOT NULL,                -- name as the source gave it (MegaDetector 'file', COCO 'file_name')
        source_id TEXT NOT NULL DEFAULT '',-- COCO image id, when imported from COCO
        width INTEGER NOT NULL DEFAULT 0,
        height INTEGER NOT NULL DEFAULT 0,
        location TEXT NOT NULL DEFAULT '',
        seq_id TEXT NOT NULL DEFAULT '',
        datetime TEXT NOT NULL DEFAULT '',
        extra TEXT NOT NULL DEFAULT '{}',  -- other source fields, kept for export
        given TEXT,                        -- JSON detections given by the source (MegaDetector import)
        threshold REAL NOT NULL DEFAULT 0, -- detection threshold applied
        detector TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL DEFAULT 'pending',  -- pending -> detected -> embedded -> done | failed
        failure TEXT NOT NULL DEFAULT '',
        job_id TEXT NOT NULL DEFAULT '',
        UNIQUE (project, key)
    );
    CREATE INDEX images_job ON images(job_id, status);
    CREATE TABLE detections (
        image_id INTEGER NOT NULL REFERENCES images(id),
        idx INTEGER NOT NULL,
        category TEXT NOT NULL,
        conf REAL NOT NULL,
        x REAL NOT NULL, y REAL NOT NULL, w REAL NOT NULL, h REAL NOT NULL,
        PRIMARY KEY (image_id, idx)
    );
    CREATE TABLE crops (
        id TEXT PRIMARY KEY,               -- '<image rowid>-<detection idx>'
        project TEXT NOT NULL,
        image_id INTEGER NOT NULL REFERENCES images(id),
        idx INTEGER NOT NULL,
        uri TEXT NOT NULL
    );
    CREATE INDEX crops_project ON crops(project);
    CREATE TABLE vectors (
        crop_id TEXT NOT NULL,
        version TEXT NOT NULL,
        vec BLOB NOT NULL,                 -- float32 little-endian
        PRIMARY KEY (crop_id, version)
    );
    CREATE TABLE labels (                  -- the current human label of a crop
        crop_id TEXT PRIMARY KEY,
        project TEXT NOT NULL,
        label TEXT NOT NULL,
        labeller TEXT NOT NULL,
        batch_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX labels_project ON labels(project);
    CREATE TABLE label_events (            -- every label given, corrections included
        id INTEGER PRIMARY KEY,
        project TEXT NOT NULL,
        crop_id TEXT NOT NULL,
        label TEXT NOT NULL,
        previous TEXT NOT NULL DEFAULT '', -- non-empty: a correction
        labeller TEXT NOT NULL,
        batch_id TEXT NOT NULL,
        at REAL NOT NULL
    );
    CREATE TABLE predictions (             -- the model's label of a crop
        crop_id TEXT PRIMARY KEY,
        label TEXT NOT NULL,
        confidence REAL NOT NULL,
        classifier_version TEXT NOT NULL
    );
    CREATE TABLE ground_truth (            -- hidden labels from a COCO import; never read by the loop
        image_id INTEGER NOT NULL REFERENCES images(id),
        idx INTEGER NOT NULL,
        annotation_id TEXT NOT NULL,
        category TEXT NOT NULL,
        bbox TEXT NOT NULL DEFAULT '',     -- JSON absolute [x, y, w, h] when the source had one
        extra TEXT NOT NULL DEFAULT '{}',
        PRIMARY KEY (image_id, idx)
    );
    CREATE TABLE batches (
        id TEXT PRIMARY KEY,
        project TEXT NOT NULL,
        labeller TEXT NOT NULL,
        strategy TEXT NOT NULL,
        embedding_version TEXT NOT NULL,
        created_at REAL NOT NULL,
        closed_at REAL,                    -- set when answered in full, or abandoned
        completed INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX batches_open ON batches(project, closed_at);
    CREATE TABLE batch_items (
        batch_id TEXT NOT NULL,
        crop_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        PRIMARY KEY (batch_id, crop_id)
    );
    CREATE TABLE model_versions (
        project TEXT NOT NULL,
        kind TEXT NOT NULL,                -- 'classifier' | 'embedding'
        version TEXT NOT NULL,
        labels INTEGER NOT NULL,           -- human labels when it was made
        metrics TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        PRIMARY KEY (project, kind, version)
    );
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        project TEXT NOT NULL,
        kind TEXT NOT NULL,                -- 'ingest' | 'fine_tune'
        state TEXT NOT NULL,               -- QUEUED RUNNING SUCCEEDED FAILED CANCELLED
        done INTEGER NOT NULL DEFAULT 0,
        total INTEGER NOT NULL DEFAULT 0,
        unit TEXT NOT NULL DEFAULT '',
        message TEXT NOT NULL DEFAULT '',
        error TEXT NOT NULL DEFAULT '',
        params TEXT NOT NULL DEFAULT '{}',
        result TEXT NOT NULL DEFAULT '{}',
        metrics TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        started_at REAL,
        updated_at REAL NOT NULL
    );
    """,
)

FINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


@dataclass
class Settings:
    """A project's loop settings with the paper's defaults (zero values in requests mean these)."""

    detection_threshold: float = 0.0  # 0: the detector model's own default
    seed_labels: int = 1000
    batch_size: int = 100
    finetune_every: int = 2000  # negative: never
    strategy: str = "kcenter"
    allow_new_classes: bool = False
    seed: int = 0

    def to_json(self) -> str:
        return dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        return cls(**json.loads(text))


@dataclass
class Project:
    id: str
    name: str
    settings: Settings
    classes: list[str]
    embedding_version: str
    classifier_version: str
    classifier_accuracy: float
    finetunes_started: int
    created_at: float
    pending_sync: bool = False


@dataclass
class Detection:
    """One detection, MegaDetector's convention: category id string, confidence, normalized [x, y, w, h]."""

    category: str
    conf: float
    bbox: tuple[float, float, float, float]


@dataclass
class ImageRecord:
    """An image as a source describes it (before detection)."""

    key: str
    uri: str
    file: str
    source_id: str = ""
    width: int = 0
    height: int = 0
    location: str = ""
    seq_id: str = ""
    datetime: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    given: list[Detection] | None = None  # detections taken as given (MegaDetector import)
    failure: str = ""
    ground_truth: list[dict[str, Any]] = field(default_factory=list)  # hidden: {"category", "bbox", "id", "extra"}


@dataclass
class Job:
    id: str
    project: str
    kind: str
    state: str
    done: int
    total: int
    unit: str
    message: str
    error: str
    params: dict[str, Any]
    result: dict[str, Any]
    metrics: dict[str, float]
    created_at: float
    started_at: float | None
    updated_at: float

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


@dataclass
class CropInfo:
    id: str
    image_id: int
    image_uri: str
    uri: str
    detection: Detection
    predicted: str = ""
    predicted_confidence: float = 0.0
    label: str = ""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Database:
    """The orchestrator's store. Every method is one transaction; call from a worker thread."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self.vector_generation: dict[str, int] = {}  # version -> writes so far in this process (cache keys)
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")

    # -- plumbing -------------------------------------------------------------------------------------

    def migrate(self) -> int:
        """Apply pending migrations; returns the schema version."""
        with self._lock:
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            for n, script in enumerate(MIGRATIONS[version:], start=version + 1):
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in re.sub(r"--[^\n]*", "", script).split(";"):
                        if statement.strip():
                            self._conn.execute(statement)
                    self._conn.execute(f"PRAGMA user_version = {n}")
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            return self._conn.execute("PRAGMA user_version").fetchone()[0]

    def schema_version(self) -> int:
        with self._lock:
            return self._conn.execute("PRAGMA user_version").fetchone()[0]

    @property
    def migrated(self) -> bool:
        return self.schema_version() == len(MIGRATIONS)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def _q(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # -- projects -------------------------------------------------------------------------------------

    def create_project(self, project_id: str, name: str, settings: Settings, classes: list[str],
                       embedding_version: str = "") -> Project:
        with self.tx() as c:
            if c.execute("SELECT 1 FROM projects WHERE id=?", (project_id,)).fetchone():
                raise AlreadyExists(f"project {project_id!r} already exists", field="project_id")
            c.execute("INSERT INTO projects (id, name, settings, classes, embedding_version, created_at) "
                      "VALUES (?,?,?,?,?,?)", (project_id, name, settings.to_json(), dumps(classes),
                                              embedding_version, time.time()))
        return self.project(project_id)

    def project(self, project_id: str) -> Project:
        rows = self._q("SELECT * FROM projects WHERE id=?", (project_id,))
        if not rows:
            raise NotFound(f"no project {project_id!r}", field="project_id")
        return _project(rows[0])

    def projects(self) -> list[Project]:
        return [_project(r) for r in self._q("SELECT * FROM projects ORDER BY created_at, id")]

    def update_project(self, project_id: str, **values: Any) -> None:
        allowed = {"embedding_version", "classifier_version", "classifier_accuracy", "finetunes_started", "classes",
                   "pending_sync"}
        if not values or set(values) - allowed:
            raise ValueError(f"cannot update {sorted(set(values) - allowed)}")
        values = {k: dumps(v) if k == "classes" else v for k, v in values.items()}
        sets = ", ".join(f"{k}=?" for k in values)
        with self.tx() as c:
            c.execute(f"UPDATE projects SET {sets} WHERE id=?", (*values.values(), project_id))

    def add_model_version(self, project: str, kind: str, version: str, labels: int,
                          metrics: dict[str, Any] | None = None) -> None:
        with self.tx() as c:
            c.execute("INSERT OR REPLACE INTO model_versions VALUES (?,?,?,?,?,?)",
                      (project, kind, version, labels, dumps(metrics or {}), time.time()))

    def model_versions(self, project: str, kind: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM model_versions WHERE project=?" + (" AND kind=?" if kind else "") + " ORDER BY created_at"
        rows = self._q(sql, (project, kind) if kind else (project,))
        return [{**dict(r), "metrics": json.loads(r["metrics"])} for r in rows]

    # -- images and ingest ----------------------------------------------------------------------------

    def add_images(self, project: str, job_id: str, records: Iterable[ImageRecord]) -> tuple[int, int]:
        """Register images for an ingest job. Known images (same key) are not duplicated: if still unfinished
        they are handed to this job. Returns (new images, images this job will process)."""
        new = 0
        with self.tx() as c:
            for r in records:
                cur = c.execute(
                    "INSERT INTO images (project, key, uri, file, source_id, width, height, location, seq_id, "
                    "datetime, extra, given, status, failure, job_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                    "ON CONFLICT (project, key) DO NOTHING",
                    (project, r.key, r.uri, r.file, r.source_id, r.width, r.height, r.location, r.seq_id,
                     r.datetime, dumps(r.extra),
                     None if r.given is None else dumps([[d.category, d.conf, list(d.bbox)] for d in r.given]),
                     "failed" if r.failure else "pending", r.failure, job_id))
                if cur.rowcount:
                    new += 1
                    image_id = cur.lastrowid
                    for i, gt in enumerate(r.ground_truth):
                        c.execute("INSERT INTO ground_truth VALUES (?,?,?,?,?,?)",
                                  (image_id, i, str(gt.get("id", "")), gt["category"],
                                   dumps(gt["bbox"]) if gt.get("bbox") is not None else "",
                                   dumps(gt.get("extra", {}))))
                else:
                    c.execute("UPDATE images SET job_id=? WHERE project=? AND key=? AND status NOT IN "
                              "('done', 'failed')", (job_id, project, r.key))
            mine = c.execute("SELECT COUNT(*) FROM images WHERE job_id=?", (job_id,)).fetchone()[0]
        return new, mine

    def job_images(self, job_id: str, status: str, limit: int = 1_000_000) -> list[sqlite3.Row]:
        return self._q("SELECT * FROM images WHERE job_id=? AND status=? ORDER BY id LIMIT ?", (job_id, status, limit))

    def job_image_counts(self, job_id: str) -> dict[str, int]:
        rows = self._q("SELECT status, COUNT(*) n FROM images WHERE job_id=? GROUP BY status", (job_id,))
        return {r["status"]: r["n"] for r in rows}

    def record_detections(self, image_id: int, width: int, height: int, detections: Sequence[Detection],
                          crops: dict[int, str], project: str, threshold: float, detector: str,
                          failure: str = "") -> list[str]:
        """Store an image's detections and crop URIs (crop files already written); returns the crop ids.
        Idempotent: a re-run replaces what an interrupted one wrote."""
        with self.tx() as c:
            c.execute("DELETE FROM detections WHERE image_id=?", (image_id,))
            c.execute("DELETE FROM crops WHERE image_id=?", (image_id,))
            for i, d in enumerate(detections):
                c.execute("INSERT INTO detections VALUES (?,?,?,?,?,?,?,?)",
                          (image_id, i, d.category, float(d.conf), *map(float, d.bbox)))
            ids = []
            for idx, uri in sorted(crops.items()):
                crop_id = f"{image_id}-{idx}"
                c.execute("INSERT INTO crops VALUES (?,?,?,?,?)", (crop_id, project, image_id, idx, uri))
                ids.append(crop_id)
            status = "failed" if failure else ("detected" if ids else "done")
            c.execute("UPDATE images SET width=CASE WHEN ?>0 THEN ? ELSE width END, "
                      "height=CASE WHEN ?>0 THEN ? ELSE height END, threshold=?, detector=?, status=?, failure=? "
                      "WHERE id=?", (width, width, height, height, threshold, detector, status, failure, image_id))
        return ids

    def set_image_status(self, image_ids: Sequence[int], status: str) -> None:
        with self.tx() as c:
            c.executemany("UPDATE images SET status=? WHERE id=?", [(status, i) for i in image_ids])

    def image_crops(self, image_ids: Sequence[int]) -> list[sqlite3.Row]:
        marks = ",".join("?" * len(image_ids))
        return self._q(f"SELECT c.*, i.location, i.seq_id FROM crops c JOIN images i ON i.id=c.image_id "
                       f"WHERE c.image_id IN ({marks}) ORDER BY c.image_id, c.idx", list(image_ids))

    # -- vectors --------------------------------------------------------------------------------------

    def put_vectors(self, version: str, crop_ids: Sequence[str], vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        with self.tx() as c:
            c.executemany("INSERT OR REPLACE INTO vectors VALUES (?,?,?)",
                          [(cid, version, vectors[i].tobytes()) for i, cid in enumerate(crop_ids)])
            self.vector_generation[version] = self.vector_generation.get(version, 0) + 1

    def get_vectors(self, version: str, crop_ids: Sequence[str]) -> np.ndarray:
        """Vectors of ``crop_ids`` under ``version``, in that order; KeyError names a missing one."""
        found: dict[str, bytes] = {}
        ids = list(crop_ids)
        for start in range(0, len(ids), 900):
            part = ids[start:start + 900]
            marks = ",".join("?" * len(part))
            for r in self._q(f"SELECT crop_id, vec FROM vectors WHERE version=? AND crop_id IN ({marks})",
                             (version, *part)):
                found[r["crop_id"]] = r["vec"]
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"{len(missing)} crops have no {version!r} vector, e.g. {missing[0]}")
        if not ids:
            return np.zeros((0, 0), np.float32)
        return np.stack([np.frombuffer(found[i], dtype="<f4") for i in ids]).astype(np.float32)

    def project_vectors(self, project: str, version: str) -> tuple[list[str], np.ndarray]:
        """Every crop of the project with a vector under ``version``: (ids, [n, d])."""
        rows = self._q("SELECT v.crop_id, v.vec FROM vectors v JOIN crops c ON c.id=v.crop_id "
                       "WHERE c.project=? AND v.version=? ORDER BY c.image_id, c.idx", (project, version))
        if not rows:
            return [], np.zeros((0, 0), np.float32)
        data = np.frombuffer(b"".join(r["vec"] for r in rows), dtype="<f4").reshape(len(rows), -1)
        return [r["crop_id"] for r in rows], data.astype(np.float32)

    def drop_other_vectors(self, project: str, keep: str) -> int:
        """Delete the project's vectors of every embedding version but ``keep`` (after a switch)."""
        with self.tx() as c:
            return c.execute("DELETE FROM vectors WHERE version<>? AND crop_id IN (SELECT id FROM crops WHERE "
                             "project=?)", (keep, project)).rowcount

    def count_without_vector(self, project: str, version: str) -> int:
        return self._q("SELECT COUNT(*) FROM crops c LEFT JOIN vectors v ON v.crop_id=c.id AND v.version=? "
                       "WHERE c.project=? AND v.crop_id IS NULL", (version, project))[0][0]

    def crops_without_vector(self, project: str, version: str, limit: int) -> list[sqlite3.Row]:
        return self._q("SELECT c.*, i.location, i.seq_id FROM crops c JOIN images i ON i.id=c.image_id "
                       "LEFT JOIN vectors v ON v.crop_id=c.id AND v.version=? "
                       "WHERE c.project=? AND v.crop_id IS NULL ORDER BY c.image_id, c.idx LIMIT ?",
                       (version, project, limit))

    # -- crops, labels, predictions -------------------------------------------------------------------

    def crop_count(self, project: str) -> int:
        return self._q("SELECT COUNT(*) FROM crops WHERE project=?", (project,))[0][0]

    def crops(self, project: str, crop_ids: Sequence[str]) -> list[CropInfo]:
        """Crops with their detection, image URI, prediction and label, in the order asked; unknown ids skipped."""
        out: dict[str, CropInfo] = {}
        ids = list(crop_ids)
        for start in range(0, len(ids), 900):
            part = ids[start:start + 900]
            marks = ",".join("?" * len(part))
            rows = self._q(
                "SELECT c.id, c.image_id, c.uri, i.uri image_uri, d.category, d.conf, d.x, d.y, d.w, d.h, "
                "p.label plabel, p.confidence pconf, l.label hlabel FROM crops c JOIN images i ON i.id=c.image_id "
                "JOIN detections d ON d.image_id=c.image_id AND d.idx=c.idx "
                "LEFT JOIN predictions p ON p.crop_id=c.id LEFT JOIN labels l ON l.crop_id=c.id "
                f"WHERE c.project=? AND c.id IN ({marks})", (project, *part))
            for r in rows:
                out[r["id"]] = CropInfo(r["id"], r["image_id"], r["image_uri"], r["uri"],
                                        Detection(r["category"], r["conf"], (r["x"], r["y"], r["w"], r["h"])),
                                        r["plabel"] or "", r["pconf"] or 0.0, r["hlabel"] or "")
        return [out[i] for i in ids if i in out]

    def unknown_crops(self, project: str, crop_ids: Sequence[str]) -> list[str]:
        known = {c.id for c in self.crops(project, crop_ids)}
        return [i for i in crop_ids if i not in known]

    def label_count(self, project: str) -> int:
        return self._q("SELECT COUNT(*) FROM labels WHERE project=?", (project,))[0][0]

    def labels(self, project: str) -> dict[str, str]:
        return {r["crop_id"]: r["label"] for r in self._q("SELECT crop_id, label FROM labels WHERE project=? "
                                                          "ORDER BY created_at, crop_id", (project,))}

    def label_events(self, project: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self._q("SELECT * FROM label_events WHERE project=? ORDER BY id", (project,))]

    def store_labels(self, project: str, batch_id: str, labeller: str,
                     labels: Sequence[tuple[str, str]]) -> tuple[list[tuple[str, str]], int, int, int]:
        """Store human labels. Returns (changed (crop, label) pairs, accepted, unchanged, corrected).
        A repeated label is a no-op; a different one replaces it and is recorded as a correction."""
        now = time.time()
        changed: list[tuple[str, str]] = []
        accepted = unchanged = corrected = 0
        with self.tx() as c:
            for crop_id, label in labels:
                row = c.execute("SELECT label FROM labels WHERE crop_id=?", (crop_id,)).fetchone()
                if row is not None and row["label"] == label:
                    unchanged += 1
                    continue
                previous = row["label"] if row is not None else ""
                if row is None:
                    accepted += 1
                    c.execute("INSERT INTO labels VALUES (?,?,?,?,?,?,?)",
                              (crop_id, project, label, labeller, batch_id, now, now))
                else:
                    corrected += 1
                    c.execute("UPDATE labels SET label=?, labeller=?, batch_id=?, updated_at=? WHERE crop_id=?",
                              (label, labeller, batch_id, now, crop_id))
                c.execute("INSERT INTO label_events (project, crop_id, label, previous, labeller, batch_id, at) "
                          "VALUES (?,?,?,?,?,?,?)", (project, crop_id, label, previous, labeller, batch_id, now))
                changed.append((crop_id, label))
            if batch_id:
                open_left = c.execute(
                    "SELECT COUNT(*) FROM batch_items b LEFT JOIN labels l ON l.crop_id=b.crop_id "
                    "WHERE b.batch_id=? AND l.crop_id IS NULL", (batch_id,)).fetchone()[0]
                if open_left == 0:
                    c.execute("UPDATE batches SET closed_at=?, completed=1 WHERE id=? AND closed_at IS NULL",
                              (now, batch_id))
        return changed, accepted, unchanged, corrected

    def put_predictions(self, crop_ids: Sequence[str], labels: Sequence[str], confidences: Sequence[float],
                        classifier_version: str) -> None:
        with self.tx() as c:
            c.executemany("INSERT OR REPLACE INTO predictions VALUES (?,?,?,?)",
                          [(i, lb, float(p), classifier_version) for i, lb, p in zip(crop_ids, labels, confidences)])

    def selectable_count(self, project: str) -> int:
        """Unlabelled crops of finished images: what the selector can hand out at most."""
        return self._q("SELECT COUNT(*) FROM crops c JOIN images i ON i.id=c.image_id LEFT JOIN labels l "
                       "ON l.crop_id=c.id WHERE c.project=? AND i.status='done' AND l.crop_id IS NULL", (project,))[0][0]

    def unlabelled_crop_ids(self, project: str) -> list[str]:
        return [r[0] for r in self._q("SELECT c.id FROM crops c LEFT JOIN labels l ON l.crop_id=c.id "
                                      "WHERE c.project=? AND l.crop_id IS NULL ORDER BY c.image_id, c.idx",
                                      (project,))]

    # -- batches --------------------------------------------------------------------------------------

    def batch(self, batch_id: str) -> sqlite3.Row | None:
        rows = self._q("SELECT * FROM batches WHERE id=?", (batch_id,))
        return rows[0] if rows else None

    def open_batch_crops(self, project: str, except_labeller: str, since: float) -> list[str]:
        """Unlabelled crops in other labellers' open batches (created after ``since``)."""
        return [r[0] for r in self._q(
            "SELECT b.crop_id FROM batch_items b JOIN batches t ON t.id=b.batch_id "
            "LEFT JOIN labels l ON l.crop_id=b.crop_id WHERE t.project=? AND t.closed_at IS NULL "
            "AND t.labeller<>? AND t.created_at>=? AND l.crop_id IS NULL", (project, except_labeller, since))]

    def create_batch(self, project: str, labeller: str, strategy: str, embedding_version: str,
                     crop_ids: Sequence[str]) -> str:
        """A new open batch for ``labeller``; their previous open batch is abandoned (its crops released)."""
        batch_id = new_id("b")
        now = time.time()
        with self.tx() as c:
            c.execute("UPDATE batches SET closed_at=? WHERE project=? AND labeller=? AND closed_at IS NULL",
                      (now, project, labeller))
            c.execute("INSERT INTO batches VALUES (?,?,?,?,?,?,NULL,0)",
                      (batch_id, project, labeller, strategy, embedding_version, now))
            c.executemany("INSERT INTO batch_items VALUES (?,?,?)", [(batch_id, cid, i) for i, cid in enumerate(crop_ids)])
        return batch_id

    def batch_crop_ids(self, batch_id: str) -> list[str]:
        return [r[0] for r in self._q("SELECT crop_id FROM batch_items WHERE batch_id=? ORDER BY position",
                                      (batch_id,))]

    def rounds(self, project: str) -> int:
        return self._q("SELECT COUNT(*) FROM batches WHERE project=? AND completed=1", (project,))[0][0]

    # -- results --------------------------------------------------------------------------------------

    def images(self, project: str, after_id: int = 0, limit: int = 1_000_000) -> list[sqlite3.Row]:
        return self._q("SELECT * FROM images WHERE project=? AND id>? ORDER BY id LIMIT ?", (project, after_id, limit))

    def image_details(self, image_ids: Sequence[int]) -> tuple[dict[int, list[sqlite3.Row]], dict[int, list[sqlite3.Row]]]:
        """Detections and crops (with label/prediction) of the images, by image id."""
        dets: dict[int, list[sqlite3.Row]] = {i: [] for i in image_ids}
        crops: dict[int, list[sqlite3.Row]] = {i: [] for i in image_ids}
        ids = list(image_ids)
        for start in range(0, len(ids), 900):
            part = ids[start:start + 900]
            marks = ",".join("?" * len(part))
            for r in self._q(f"SELECT * FROM detections WHERE image_id IN ({marks}) ORDER BY image_id, idx", part):
                dets[r["image_id"]].append(r)
            for r in self._q(
                    "SELECT c.id, c.image_id, c.idx, c.uri, l.label hlabel, l.labeller, p.label plabel, "
                    "p.confidence pconf FROM crops c LEFT JOIN labels l ON l.crop_id=c.id "
                    f"LEFT JOIN predictions p ON p.crop_id=c.id WHERE c.image_id IN ({marks}) "
                    "ORDER BY c.image_id, c.idx", part):
                crops[r["image_id"]].append(r)
        return dets, crops

    def detectors(self, project: str) -> list[str]:
        """Detector model versions that produced the project's detections ("given": taken from an import)."""
        return [r[0] for r in self._q("SELECT DISTINCT detector FROM images WHERE project=? AND detector<>'' "
                                      "ORDER BY detector", (project,))]

    def ground_truth(self, project: str) -> dict[int, list[sqlite3.Row]]:
        """Hidden ground truth by image id: for simulation and evaluation only, never for the loop."""
        out: dict[int, list[sqlite3.Row]] = {}
        for r in self._q("SELECT g.* FROM ground_truth g JOIN images i ON i.id=g.image_id WHERE i.project=? "
                         "ORDER BY g.image_id, g.idx", (project,)):
            out.setdefault(r["image_id"], []).append(r)
        return out

    def counts(self, project: str) -> dict[str, int]:
        q = self._q(
            "SELECT (SELECT COUNT(*) FROM images WHERE project=:p AND status IN ('done','detected','embedded')) images, "
            "(SELECT COUNT(*) FROM images i WHERE project=:p AND status IN ('done','detected','embedded') "
            " AND NOT EXISTS (SELECT 1 FROM crops c WHERE c.image_id=i.id)) empty, "
            "(SELECT COUNT(*) FROM crops WHERE project=:p) crops, "
            "(SELECT COUNT(*) FROM labels WHERE project=:p) labelled", {"p": project})[0]
        return dict(q)

    # -- jobs -----------------------------------------------------------------------------------------

    def create_job(self, project: str, kind: str, unit: str, params: dict[str, Any], total: int = 0) -> Job:
        job_id = new_id(kind.replace("_", ""))
        now = time.time()
        with self.tx() as c:
            c.execute("INSERT INTO jobs (id, project, kind, state, total, unit, params, created_at, updated_at) "
                      "VALUES (?,?,?,?,?,?,?,?,?)", (job_id, project, kind, "QUEUED", total, unit, dumps(params),
                                                     now, now))
        return self.job(job_id)

    def job(self, job_id: str) -> Job:
        rows = self._q("SELECT * FROM jobs WHERE id=?", (job_id,))
        if not rows:
            raise NotFound(f"no job {job_id!r}", field="job_id")
        return _job(rows[0])

    def jobs(self, project: str | None = None, active: bool = False) -> list[Job]:
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if project is not None:
            sql += " AND project=?"
            args.append(project)
        if active:
            sql += " AND state IN ('QUEUED', 'RUNNING')"
        return [_job(r) for r in self._q(sql + " ORDER BY created_at", args)]

    def update_job(self, job_id: str, **values: Any) -> Job:
        allowed = {"state", "done", "total", "message", "error", "params", "result", "metrics", "started_at"}
        if set(values) - allowed:
            raise ValueError(f"cannot update {sorted(set(values) - allowed)}")
        values = {k: dumps(v) if k in ("params", "result", "metrics") else v for k, v in values.items()}
        values["updated_at"] = time.time()
        sets = ", ".join(f"{k}=?" for k in values)
        with self.tx() as c:
            c.execute(f"UPDATE jobs SET {sets} WHERE id=?", (*values.values(), job_id))
        return self.job(job_id)


def _project(r: sqlite3.Row) -> Project:
    return Project(r["id"], r["name"], Settings.from_json(r["settings"]), json.loads(r["classes"]),
                   r["embedding_version"], r["classifier_version"], r["classifier_accuracy"],
                   r["finetunes_started"], r["created_at"], bool(r["pending_sync"]))


def _job(r: sqlite3.Row) -> Job:
    return Job(r["id"], r["project"], r["kind"], r["state"], r["done"], r["total"], r["unit"], r["message"],
               r["error"], json.loads(r["params"]), json.loads(r["result"]), json.loads(r["metrics"]),
               r["created_at"], r["started_at"], r["updated_at"])


def check_project_id(project_id: str) -> None:
    if not re.fullmatch(r"[a-z0-9_-]{1,64}", project_id or ""):
        raise InvalidArgument("use 1-64 lower-case letters, digits, '-' or '_'", field="project_id")
