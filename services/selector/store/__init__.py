"""Vector stores behind one interface: Qdrant's engine in-process (``edge``) or a Qdrant server (``remote``).

Everything above :class:`VectorStore` (the project logic in :mod:`trapline.selector.projects`) is the same
code for every backend, and the same behavioural tests run against each (``tests/selector/test_store.py``).

* :class:`~.edge.EdgeStore` (default): ``qdrant-edge-py``, one shard directory per collection on local disk,
  aliases in a JSON file replaced atomically. Measured here ~56k points/s upsert (qdrant-client's local mode:
  ~1.3k/s, and it warns above 20k points), so it is the embedded default.
* :class:`~.qdrant.QdrantStore`: ``qdrant_client.QdrantClient`` against a server (``QDRANT_URL``,
  ``QDRANT_API_KEY``). The same class also drives qdrant-client's local mode (``path=``), which implements
  the same client API; the tests use that because no Qdrant server can run on the build machine.

Payload conventions (all backends): flags are integers (qdrant-edge stores booleans as 0/1, so a boolean
filter would never match), point ids are UUIDv5 of the crop id.
"""

from __future__ import annotations

import abc
import dataclasses
import uuid
from collections.abc import Iterator

import numpy as np

_NAMESPACE = uuid.UUID("6f1d5f0e-3a4c-4e55-9b0e-747261706c6e")  # fixed: ids must not change between releases


def point_id(crop_id: str) -> str:
    """Stable Qdrant point id (UUID string) for a crop id; the same in every collection of a project."""
    return str(uuid.uuid5(_NAMESPACE, crop_id))


@dataclasses.dataclass
class Record:
    id: str
    payload: dict
    vector: np.ndarray | None = None


class VectorStore(abc.ABC):
    """The operations the selector needs from Qdrant, whatever runs it."""

    backend: str = "?"

    @abc.abstractmethod
    def collections(self) -> list[str]: ...

    @abc.abstractmethod
    def create(self, collection: str, dimension: int) -> None: ...

    @abc.abstractmethod
    def dimension(self, collection: str) -> int: ...

    @abc.abstractmethod
    def upsert(self, collection: str, ids: list[str], vectors: np.ndarray, payloads: list[dict]) -> None:
        """Insert or replace points (vector and whole payload)."""

    @abc.abstractmethod
    def set_payload(self, collection: str, updates: list[tuple[str, dict]]) -> None:
        """Merge fields into the payloads of existing points."""

    @abc.abstractmethod
    def scroll(self, collection: str, *, with_vectors: bool = False, batch: int = 8192) -> Iterator[list[Record]]:
        """Every point, in batches (any order)."""

    @abc.abstractmethod
    def count(self, collection: str) -> int: ...

    @abc.abstractmethod
    def aliases(self) -> dict[str, str]:
        """alias -> collection."""

    @abc.abstractmethod
    def switch_alias(self, alias: str, collection: str) -> None:
        """Point ``alias`` at ``collection`` in one atomic step (created if absent)."""

    def close(self) -> None:  # noqa: B027 - optional
        pass


def open_store(kind: str, *, path=None, url: str | None = None, api_key: str | None = None) -> VectorStore:
    """``edge`` (path), ``local`` (qdrant-client local mode at path) or ``remote`` (url, api_key)."""
    if kind == "edge":
        from .edge import EdgeStore

        return EdgeStore(path)
    if kind in ("local", "remote"):
        from .qdrant import QdrantStore

        return QdrantStore(path=path) if kind == "local" else QdrantStore(url=url, api_key=api_key)
    raise ValueError(f"unknown store backend {kind!r} (edge, local, remote)")
