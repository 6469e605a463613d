"""A Qdrant server through ``qdrant_client`` (``QDRANT_URL`` + ``QDRANT_API_KEY``), or its local mode (``path``).

Both modes go through the same ``QdrantClient`` methods, so the tests that run this class in local mode
exercise every call the server path makes (the transport and the server itself are what they do not cover).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from qdrant_client import QdrantClient, models

from . import Record, VectorStore


class QdrantStore(VectorStore):
    def __init__(self, *, url: str | None = None, api_key: str | None = None, path: Path | str | None = None,
                 timeout: int = 60) -> None:
        if (url is None) == (path is None):
            raise ValueError("give a server url or a local path")
        if url is not None:
            self.backend = "remote"
            self.client = QdrantClient(url=url, api_key=api_key or None, timeout=timeout)
        else:
            self.backend = "local"
            Path(path).mkdir(parents=True, exist_ok=True)
            self.client = QdrantClient(path=str(path))

    def collections(self) -> list[str]:
        return sorted(c.name for c in self.client.get_collections().collections)

    def create(self, collection: str, dimension: int) -> None:
        self.client.create_collection(
            collection, vectors_config=models.VectorParams(size=dimension, distance=models.Distance.EUCLID))

    def dimension(self, collection: str) -> int:
        params = self.client.get_collection(collection).config.params.vectors
        return int(params.size)

    def upsert(self, collection: str, ids: list[str], vectors: np.ndarray, payloads: list[dict]) -> None:
        with warnings.catch_warnings():  # local mode warns above 20k points; the server does not
            warnings.simplefilter("ignore", UserWarning)
            self.client.upsert(collection, points=models.Batch(
                ids=list(ids), vectors=np.asarray(vectors, dtype=np.float32).tolist(), payloads=payloads), wait=True)

    def set_payload(self, collection: str, updates: list[tuple[str, dict]]) -> None:
        if not updates:
            return
        ops = [models.SetPayloadOperation(set_payload=models.SetPayload(payload=p, points=[pid]))
               for pid, p in updates]
        for a in range(0, len(ops), 1000):
            self.client.batch_update_points(collection, ops[a: a + 1000], wait=True)

    def scroll(self, collection: str, *, with_vectors: bool = False, batch: int = 8192) -> Iterator[list[Record]]:
        offset = None
        while True:
            recs, offset = self.client.scroll(collection, limit=batch, offset=offset, with_payload=True,
                                              with_vectors=with_vectors)
            if recs:
                yield [Record(str(r.id), dict(r.payload or {}),
                              np.asarray(r.vector, dtype=np.float32) if with_vectors else None) for r in recs]
            if offset is None:
                return

    def count(self, collection: str) -> int:
        return int(self.client.count(collection, exact=True).count)

    def aliases(self) -> dict[str, str]:
        return {a.alias_name: a.collection_name for a in self.client.get_aliases().aliases}

    def switch_alias(self, alias: str, collection: str) -> None:
        ops: list = []
        if alias in self.aliases():
            ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
        ops.append(models.CreateAliasOperation(
            create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)))
        self.client.update_collection_aliases(change_aliases_operations=ops)  # one request: atomic on the server

    def close(self) -> None:
        self.client.close()
