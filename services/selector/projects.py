"""The selector's domain core: projects of crop vectors, labels and predictions, and selection over them.

The vector store (Qdrant, embedded or server) is the source of truth: every point's vector and payload
(crop id, image id, location, sequence id, ``labelled`` 0/1, label, prediction) is written there before a
call returns. For speed the selector keeps, per embedding version, a float32 memory-mapped ``.npy`` copy
of the vectors (row order = the ``row`` payload field) and in-memory columns of the metadata; at start it
rebuilds them from the store (the ``.npy`` is reused when it is complete and no write was interrupted).

Names: project ``p`` is the alias ``trapline_p``; its version ``v`` is the collection ``trapline_p__v``.
SwitchEmbedding copies labels and predictions into the new version's collection, then switches the alias.

Every method is blocking (call it off the event loop); each project has its own lock. Errors are
``trapline.runtime.errors`` naming the request field.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from pathlib import Path

import numpy as np

from trapline.runtime import errors

from .kcenter import KCenter
from .store import VectorStore, point_id
from .strategies import STRATEGIES, Pool, Selection, select, strategy_names
from .vectorfile import VectorFile

log = logging.getLogger("trapline.selector")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,63}$")
DEFAULT_VERSION = "default"
PREFIX = "trapline_"


def alias_of(project: str) -> str:
    return f"{PREFIX}{project}"


def collection_of(project: str, version: str) -> str:
    return f"{PREFIX}{project}__{version}"


def check_name(value: str, field: str) -> str:
    if not NAME.match(value or ""):
        raise errors.InvalidArgument(
            f"{value!r} is not a valid name: 1-64 letters, digits, '.' or '-', starting with a letter or digit",
            field=field)
    return value


def _grow(arr: np.ndarray, n: int, fill) -> np.ndarray:
    if n <= len(arr):
        return arr
    new = np.full((max(n, 2 * len(arr), 1024),) + arr.shape[1:], fill, dtype=arr.dtype)
    new[: len(arr)] = arr
    return new


@dataclasses.dataclass
class PointMeta:
    ids: list[str]
    image_ids: list[str]
    locations: list[str]
    sequences: list[str]


class Version:
    """One embedding version of a project: vectors (memmap) plus metadata columns, mirrored from the store."""

    def __init__(self, project: str, name: str, dim: int, vectors: VectorFile) -> None:
        self.project, self.name, self.dim, self.file = project, name, dim, vectors
        self.collection = collection_of(project, name)
        self.n = 0
        self.ids: list[str] = []
        self.row_of: dict[str, int] = {}
        self.image_ids: list[str] = []
        self.locations: list[str] = []
        self.sequences: list[str] = []
        self.loc_vocab: dict[str, int] = {}
        self.seq_vocab: dict[str, int] = {}  # "" (no sequence) has code -1
        self.loc_codes = np.zeros(0, np.int32)
        self.seq_codes = np.zeros(0, np.int32)
        self.labelled = np.zeros(0, bool)
        self.labels: list[str] = []
        self.classes: list[str] = []
        self.class_index: dict[str, int] = {}
        self.probs = np.zeros((0, 0), np.float32)
        self.kcenter: KCenter | None = None

    # columns ------------------------------------------------------------------
    @staticmethod
    def _code(vocab: dict[str, int], value: str) -> int:
        return vocab.setdefault(value, len(vocab))

    def put_meta(self, row: int, crop: str, image: str, location: str, sequence: str) -> None:
        if row == self.n:
            self.n += 1
            self.ids.append(crop)
            self.image_ids.append(image)
            self.locations.append(location)
            self.sequences.append(sequence)
            self.labels.append("")
            self.row_of[crop] = row
            self.loc_codes = _grow(self.loc_codes, self.n, -1)
            self.seq_codes = _grow(self.seq_codes, self.n, -1)
            self.labelled = _grow(self.labelled, self.n, False)
            self.probs = _grow(self.probs, self.n, np.nan)
        else:
            self.image_ids[row], self.locations[row], self.sequences[row] = image, location, sequence
        self.loc_codes[row] = self._code(self.loc_vocab, location)
        self.seq_codes[row] = self._code(self.seq_vocab, sequence) if sequence else -1

    def ensure_classes(self, classes: list[str]) -> np.ndarray:
        for c in classes:
            if c not in self.class_index:
                self.class_index[c] = len(self.classes)
                self.classes.append(c)
        if self.probs.shape[1] < len(self.classes):
            wider = np.full((len(self.probs), len(self.classes)), np.nan, np.float32)
            wider[:, : self.probs.shape[1]] = self.probs
            had = ~np.isnan(wider[:, 0]) if self.probs.shape[1] else np.zeros(len(wider), bool)
            wider[had, self.probs.shape[1]:] = 0.0
            self.probs = wider
        return np.array([self.class_index[c] for c in classes], dtype=np.int64)

    def set_prediction_rows(self, rows: np.ndarray, cols: np.ndarray, p: np.ndarray) -> None:
        block = np.zeros((len(rows), self.probs.shape[1]), np.float32)
        block[:, cols] = p
        self.probs[rows] = block

    def payload(self, row: int) -> dict:
        """The full payload of a row as the store keeps it."""
        out = {"crop_id": self.ids[row], "image_id": self.image_ids[row], "location": self.locations[row],
               "sequence_id": self.sequences[row], "row": row, "labelled": int(self.labelled[row]),
               "label": self.labels[row]}
        if self.probs.shape[1] and not np.isnan(self.probs[row, 0]):
            out.update(self.prediction_payload(row))
        return out

    def prediction_payload(self, row: int) -> dict:
        p = self.probs[row]
        return {"pred": {c: float(p[i]) for c, i in self.class_index.items()},
                "prediction": self.classes[int(np.argmax(p))]}

    def predicted(self) -> np.ndarray:
        if self.probs.shape[1] == 0:
            return np.zeros(self.n, bool)
        return ~np.isnan(self.probs[: self.n, 0])

    def vectors(self) -> np.ndarray:
        return self.file.array()[: self.n]


class Project:
    def __init__(self, name: str) -> None:
        self.name = name
        self.active = ""
        self.versions: dict[str, Version] = {}
        self.lock = threading.RLock()


class Selector:
    """Projects over a :class:`VectorStore`, with a vector cache under ``data_dir``."""

    def __init__(self, store: VectorStore, data_dir: Path, *, coarse_centres: int = 32) -> None:
        self.store = store
        self.data_dir = Path(data_dir)
        self.coarse_centres = coarse_centres
        self.projects: dict[str, Project] = {}
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- recovery
    def load(self) -> None:
        """Rebuild every project from the store (call once at start)."""
        aliases = self.store.aliases()
        collections = self.store.collections()
        for alias, target in aliases.items():
            if not alias.startswith(PREFIX):
                continue
            project = Project(alias[len(PREFIX):])
            prefix = collection_of(project.name, "")
            for coll in collections:
                if coll.startswith(prefix):
                    version = coll[len(prefix):]
                    project.versions[version] = self._load_version(project.name, version)
            project.active = target[len(prefix):]
            self.projects[project.name] = project
            log.info("project %s: %d versions, active %s with %d points", project.name, len(project.versions),
                     project.active, project.versions[project.active].n)

    def _vector_path(self, collection: str) -> Path:
        return self.data_dir / "vectors" / f"{collection}.npy"

    def _load_version(self, project: str, name: str) -> Version:
        coll = collection_of(project, name)
        dim = self.store.dimension(coll)
        path = self._vector_path(coll)
        dirty = path.with_suffix(".dirty")
        if dirty.exists() and path.exists():
            path.unlink()  # an interrupted write: the store is the truth, rebuild the copy from it
        ver = Version(project, name, dim, VectorFile(path, dim))
        records = []
        for batch in self.store.scroll(coll):
            records.extend(batch)
        records.sort(key=lambda r: int(r.payload["row"]))
        rows_ok = all(int(r.payload["row"]) == i for i, r in enumerate(records))
        if not rows_ok:
            raise RuntimeError(f"collection {coll}: row numbers are not 0..n-1; the store was edited by hand?")
        preds: list[tuple[int, dict]] = []
        for i, r in enumerate(records):
            p = r.payload
            ver.put_meta(i, p["crop_id"], p.get("image_id", ""), p.get("location", ""), p.get("sequence_id", ""))
            ver.labelled[i] = bool(int(p.get("labelled", 0)))
            ver.labels[i] = p.get("label", "") or ""
            if p.get("pred"):
                preds.append((i, p["pred"]))
        if preds:
            ver.ensure_classes(list(dict.fromkeys(c for _, pred in preds for c in pred)))  # first-seen order
            block = np.zeros((len(preds), len(ver.classes)), np.float32)
            for k, (_, pred) in enumerate(preds):
                for c, v in pred.items():
                    block[k, ver.class_index[c]] = v
            ver.probs[np.array([i for i, _ in preds])] = block
        if ver.file.rows < ver.n or dirty.exists():
            vec = np.zeros((ver.n, dim), np.float32)
            for batch in self.store.scroll(coll, with_vectors=True):
                for r in batch:
                    vec[int(r.payload["row"])] = r.vector
            ver.file.write_all(vec)
            log.info("rebuilt %s from the store (%d vectors)", path, ver.n)
        dirty.unlink(missing_ok=True)
        return ver

    # ---------------------------------------------------------------- helpers
    def _project(self, name: str) -> Project:
        check_name(name, "project")
        project = self.projects.get(name)
        if project is None:
            raise errors.NotFound(f"no project {name!r}; Upsert points first", field="project")
        return project

    def _rows(self, ver: Version, ids: list[str], field: str) -> np.ndarray:
        rows = np.empty(len(ids), np.int64)
        for i, crop in enumerate(ids):
            r = ver.row_of.get(crop)
            if r is None:
                raise errors.NotFound(f"no point {crop!r} in project {ver.project!r}", field=field.format(i=i))
            rows[i] = r
        return rows

    # ---------------------------------------------------------------- API
    def upsert(self, project: str, version: str, ids: list[str], vectors: np.ndarray, meta: PointMeta) -> int:
        check_name(project, "project")
        version = version or ""
        if version:
            check_name(version, "embedding_version")
        if not ids:
            raise errors.InvalidArgument("no points given", field="points")
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or len(vectors) != len(ids):
            raise errors.InvalidArgument(f"expected {len(ids)} vectors, got shape {vectors.shape}", field="points")
        seen: set[str] = set()
        for i, crop in enumerate(ids):
            if not crop:
                raise errors.InvalidArgument("crop id is empty", field=f"points[{i}].id")
            if crop in seen:
                raise errors.InvalidArgument(f"crop id {crop!r} appears twice in one request", field=f"points[{i}].id")
            seen.add(crop)
        bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
        if len(bad):
            raise errors.InvalidArgument("vector contains NaN or inf", field=f"points[{bad[0]}].vector")
        with self._lock:
            proj = self.projects.get(project)
            if proj is None:
                proj = Project(project)
        with proj.lock:
            version = version or proj.active or DEFAULT_VERSION
            ver = proj.versions.get(version)
            dim = ver.dim if ver is not None else vectors.shape[1]
            if vectors.shape[1] != dim:
                raise errors.InvalidArgument(
                    f"vector has {vectors.shape[1]} values but project {project!r} version {version!r} "
                    f"stores {dim}-dimensional vectors", field="points[0].vector")
            if ver is None:
                coll = collection_of(project, version)
                if coll not in self.store.collections():
                    self.store.create(coll, dim)
                ver = Version(project, version, dim, VectorFile(self._vector_path(coll), dim))
                if ver.file.rows:  # a stale copy from a deleted collection
                    ver.file.write_all(np.empty((0, dim), np.float32))
                proj.versions[version] = ver
            rows = np.array([ver.row_of.get(c, -1) for c in ids], np.int64)
            new = rows < 0
            rows[new] = ver.n + np.arange(int(new.sum()))
            dirty = ver.file.path.with_suffix(".dirty")
            dirty.touch()
            replaced = rows[~new]
            previous = np.array(ver.vectors()[replaced])
            ver.file.write(rows, vectors.astype(np.float32))
            n_before = ver.n
            for i, crop in enumerate(ids):
                ver.put_meta(int(rows[i]), crop, meta.image_ids[i], meta.locations[i], meta.sequences[i])
            try:
                self.store.upsert(ver.collection, [point_id(c) for c in ids], vectors,
                                  [ver.payload(int(r)) for r in rows])
            except Exception:  # the store refused: undo the copy so both still agree
                self._forget_rows(ver, n_before)
                ver.file.write(replaced, previous)
                dirty.unlink(missing_ok=True)
                raise
            dirty.unlink(missing_ok=True)
            ver.kcenter = None  # vectors changed: the next k-Center round is cold
            if not proj.active:
                self.store.switch_alias(alias_of(project), ver.collection)
                proj.active = version
            with self._lock:
                self.projects[project] = proj
            return len(ids)

    def _forget_rows(self, ver: Version, n_before: int) -> None:
        for crop in ver.ids[n_before:]:
            ver.row_of.pop(crop, None)
        for col in (ver.ids, ver.image_ids, ver.locations, ver.sequences, ver.labels):
            del col[n_before:]
        ver.n = n_before

    def set_labels(self, project: str, labels: list[tuple[str, str]]) -> int:
        proj = self._project(project)
        if not labels:
            raise errors.InvalidArgument("no labels given", field="labels")
        with proj.lock:
            ver = proj.versions[proj.active]
            rows = self._rows(ver, [c for c, _ in labels], "labels[{i}].id")
            for i, (_, name) in enumerate(labels):
                if not name:
                    raise errors.InvalidArgument("label is empty", field=f"labels[{i}].label")
            self.store.set_payload(ver.collection, [(point_id(c), {"labelled": 1, "label": name})
                                                    for c, name in labels])
            for r, (_, name) in zip(rows, labels):
                ver.labelled[r] = True
                ver.labels[r] = name
            return len(labels)

    def set_predictions(self, project: str, ids: list[str], classes: list[str], probs: np.ndarray) -> int:
        proj = self._project(project)
        if not ids:
            raise errors.InvalidArgument("no ids given", field="ids")
        if not classes or any(not c for c in classes) or len(set(classes)) != len(classes):
            raise errors.InvalidArgument("class names must be non-empty and distinct", field="classes")
        probs = np.asarray(probs)
        if probs.shape != (len(ids), len(classes)):
            raise errors.InvalidArgument(
                f"expected shape [{len(ids)}, {len(classes)}] (ids x classes), got {list(probs.shape)}",
                field="probabilities")
        if not np.isfinite(probs).all():
            raise errors.InvalidArgument("contains NaN or inf", field="probabilities")
        bad = (probs < 0).any(axis=1) | (probs > 1 + 1e-6).any(axis=1) | (np.abs(probs.sum(axis=1) - 1) > 1e-3)
        if bad.any():
            raise errors.InvalidArgument(f"row {int(np.flatnonzero(bad)[0])} is not a probability distribution "
                                         "(values in [0, 1] summing to 1)", field="probabilities")
        with proj.lock:
            ver = proj.versions[proj.active]
            rows = self._rows(ver, ids, "ids[{i}]")
            if len(set(ids)) != len(ids):
                raise errors.InvalidArgument("an id appears twice", field="ids")
            cols = ver.ensure_classes(classes)  # new class columns are harmless if the write fails
            old = ver.probs[rows].copy()
            ver.set_prediction_rows(rows, cols, probs.astype(np.float32))
            try:
                self.store.set_payload(ver.collection, [(point_id(ver.ids[r]), ver.prediction_payload(int(r)))
                                                        for r in rows])
            except Exception:
                ver.probs[rows] = old
                raise
            return len(ids)

    def select(self, project: str, strategy: str, count: int, *, locations: list[str] = (),
               sequence_ids: list[str] = (), exclude_ids: list[str] = (), one_per_sequence: bool = False,
               seed: int = 0) -> tuple[Selection, list[str], str]:
        """(selection, crop ids of the picks, embedding version used)."""
        if strategy not in STRATEGIES:
            raise errors.InvalidArgument(f"unknown strategy {strategy!r}; choose one of "
                                         f"{', '.join(strategy_names())}", field="strategy")
        proj = self._project(project)
        with proj.lock:
            ver = proj.versions[proj.active]
            eligible = np.ones(ver.n, bool)
            if locations:
                codes = [ver.loc_vocab[v] for v in locations if v in ver.loc_vocab]
                eligible &= np.isin(ver.loc_codes[: ver.n], codes)
            if sequence_ids:
                codes = [ver.seq_vocab[v] for v in sequence_ids if v in ver.seq_vocab]
                eligible &= np.isin(ver.seq_codes[: ver.n], codes)
            if exclude_ids:  # ids the selector does not know cannot be returned anyway: ignored
                rows = [ver.row_of[c] for c in exclude_ids if c in ver.row_of]
                eligible[np.array(rows, dtype=np.int64)] = False
            if strategy == "kcenter" and ver.kcenter is None:
                ver.kcenter = KCenter(ver.vectors(), coarse_centres=self.coarse_centres)
            pool = Pool(ver.vectors(), ver.labelled[: ver.n].copy(), eligible,
                        probabilities=ver.probs[: ver.n] if ver.probs.shape[1] else None,
                        sequences=ver.seq_codes[: ver.n], one_per_sequence=one_per_sequence,
                        kcenter=ver.kcenter)
            result = select(strategy, pool, count, seed or None)
            return result, [ver.ids[i] for i in result.indices], ver.name

    def switch_embedding(self, project: str, version: str) -> tuple[str, str]:
        proj = self._project(project)
        check_name(version, "embedding_version")
        with proj.lock:
            target = proj.versions.get(version)
            if target is None:
                raise errors.NotFound(f"project {project!r} has no embedding version {version!r}; Upsert its "
                                      "vectors with embedding_version set first", field="embedding_version")
            previous = proj.active
            if version == previous:
                return previous, version
            old = proj.versions[previous]
            carry = np.flatnonzero(old.labelled[: old.n] | old.predicted())
            missing = [old.ids[r] for r in carry if old.ids[r] not in target.row_of]
            if missing:
                raise errors.FailedPrecondition(
                    f"{len(missing)} labelled or predicted crops are missing from version {version!r} "
                    f"(e.g. {missing[:3]}); upsert them there before switching", field="embedding_version")
            updates, staged = [], []
            for r in carry:
                crop = old.ids[r]
                t = target.row_of[crop]
                fields: dict = {"labelled": int(old.labelled[r]), "label": old.labels[r]}
                if old.probs.shape[1] and not np.isnan(old.probs[r, 0]):
                    fields.update(old.prediction_payload(int(r)))
                updates.append((point_id(crop), fields))
                staged.append((t, fields))
            self.store.set_payload(target.collection, updates)
            for t, fields in staged:
                target.labelled[t] = bool(fields["labelled"])
                target.labels[t] = fields["label"]
                if "pred" in fields:
                    cols = target.ensure_classes(list(fields["pred"]))
                    target.set_prediction_rows(np.array([t]), cols,
                                               np.array([list(fields["pred"].values())], np.float32))
            self.store.switch_alias(alias_of(project), target.collection)
            proj.active = version
            return previous, version

    def stats(self, project: str) -> dict:
        proj = self._project(project)
        with proj.lock:
            ver = proj.versions[proj.active]
            return {"points": ver.n, "labelled": int(ver.labelled[: ver.n].sum()),
                    "predicted": int(ver.predicted().sum()), "embedding_version": ver.name,
                    "dimension": ver.dim, "backend": self.store.backend}

    def close(self) -> None:
        self.store.close()
