"""Embedded store: Qdrant's engine in-process through ``qdrant-edge-py``, one shard per collection."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from qdrant_edge import (CountRequest, Distance, EdgeConfig, EdgeShard, EdgeVectorParams, Point, ScrollRequest,
                         UpdateOperation)

from . import Record, VectorStore


class EdgeStore(VectorStore):
    backend = "edge"

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        (self.root / "collections").mkdir(parents=True, exist_ok=True)
        self._shards: dict[str, EdgeShard] = {}
        self._dims: dict[str, int] = {}
        self._lock = threading.Lock()
        for meta in sorted((self.root / "collections").glob("*.json")):
            name = meta.stem
            if (self.root / "collections" / name).is_dir():
                self._dims[name] = int(json.loads(meta.read_text())["dimension"])
                self._shards[name] = EdgeShard.load(str(self.root / "collections" / name))

    def _shard(self, collection: str) -> EdgeShard:
        try:
            return self._shards[collection]
        except KeyError:
            raise KeyError(f"no collection {collection!r}") from None

    def collections(self) -> list[str]:
        return sorted(self._shards)

    def create(self, collection: str, dimension: int) -> None:
        with self._lock:
            if collection in self._shards:
                raise ValueError(f"collection {collection!r} exists")
            path = self.root / "collections" / collection
            if path.exists():  # a half-created shard from a crash: no metadata was written for it
                shutil.rmtree(path)
            cfg = EdgeConfig(vectors=EdgeVectorParams(size=dimension, distance=Distance.Euclid))
            self._shards[collection] = EdgeShard.create(str(path), cfg)
            _atomic_write(self.root / "collections" / f"{collection}.json", {"dimension": dimension})
            self._dims[collection] = dimension

    def dimension(self, collection: str) -> int:
        return self._dims[collection]

    def upsert(self, collection: str, ids: list[str], vectors: np.ndarray, payloads: list[dict]) -> None:
        shard = self._shard(collection)
        rows = np.asarray(vectors, dtype=np.float32).tolist()
        shard.update(UpdateOperation.upsert_points([Point(i, v, p) for i, v, p in zip(ids, rows, payloads)]))
        shard.flush()

    def set_payload(self, collection: str, updates: list[tuple[str, dict]]) -> None:
        shard = self._shard(collection)
        for pid, payload in updates:
            shard.update(UpdateOperation.set_payload([pid], payload))
        shard.flush()

    def scroll(self, collection: str, *, with_vectors: bool = False, batch: int = 8192) -> Iterator[list[Record]]:
        shard = self._shard(collection)
        offset = None
        while True:
            recs, offset = shard.scroll(ScrollRequest(offset=offset, limit=batch, with_payload=True,
                                                      with_vector=with_vectors))
            if recs:
                yield [Record(str(r.id), dict(r.payload or {}),
                              np.asarray(r.vector, dtype=np.float32) if with_vectors else None) for r in recs]
            if offset is None:
                return

    def count(self, collection: str) -> int:
        return int(self._shard(collection).count(CountRequest(exact=True)))

    def aliases(self) -> dict[str, str]:
        path = self.root / "aliases.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def switch_alias(self, alias: str, collection: str) -> None:
        with self._lock:
            self._shard(collection)
            table = self.aliases()
            table[alias] = collection
            _atomic_write(self.root / "aliases.json", table)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.flush()
            shard.close()
        self._shards.clear()


def _atomic_write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
