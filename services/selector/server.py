"""The selector's gRPC servicer: validates and converts messages, calls :mod:`trapline.selector.projects`.

Run on its own with ``trapline-selector`` (settings prefix ``TRAPLINE_SELECTOR_``). Embedded Qdrant on disk
under ``TRAPLINE_SELECTOR_DATA_DIR`` by default; set ``QDRANT_URL`` (and ``QDRANT_API_KEY``) to use a
Qdrant server instead. Every handler runs its blocking work in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

from trapline.api.common.v1 import common_pb2
from trapline.api.selector.v1 import selector_pb2, selector_pb2_grpc
from trapline.runtime import App, Registration, ServiceSettings, errors, run

from .projects import PointMeta, Selector
from .store import open_store

SERVICE = "trapline.selector.v1.SelectorService"
log = logging.getLogger("trapline.selector")


class SelectorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TRAPLINE_SELECTOR_")

    port: int = Field(50053, ge=0, le=65535)
    data_dir: Path = Field(Path("var/selector"), description="Embedded store and the .npy vector copies.")
    store: Literal["auto", "edge", "local", "remote"] = Field(
        "auto", description="auto: remote when QDRANT_URL is set, else edge (embedded, on disk).")
    qdrant_url: str = Field("", validation_alias=AliasChoices("TRAPLINE_SELECTOR_QDRANT_URL", "QDRANT_URL"))
    qdrant_api_key: str = Field("", repr=False,
                                validation_alias=AliasChoices("TRAPLINE_SELECTOR_QDRANT_API_KEY", "QDRANT_API_KEY"))
    coarse_centres: int = Field(32, ge=1, description="k-Center: routing groups of the coarse bound pass.")
    connect_seconds: float = Field(60.0, ge=0, description="How long to keep retrying an unreachable Qdrant server "
                                   "at start (it may start after the selector).")

    @model_validator(mode="after")
    def _check_remote(self) -> "SelectorSettings":
        if self.store == "remote" and not self.qdrant_url:
            raise ValueError("store=remote needs QDRANT_URL (the Qdrant server's URL, e.g. http://qdrant:6333)")
        return self

    def backend(self) -> str:
        if self.store == "auto":
            return "remote" if self.qdrant_url else "edge"
        return self.store


def _vectors(t: common_pb2.Tensor, field: str) -> np.ndarray:
    if t.dtype != common_pb2.D_TYPE_FLOAT32:
        raise errors.InvalidArgument("must be a float32 tensor", field=field)
    want = int(np.prod(t.shape)) * 4 if len(t.shape) else 0
    if len(t.data) != want:
        raise errors.InvalidArgument(f"shape {list(t.shape)} needs {want} bytes, got {len(t.data)}", field=field)
    return np.frombuffer(t.data, dtype="<f4").reshape(tuple(t.shape))


class SelectorServicer(selector_pb2_grpc.SelectorServiceServicer):
    def __init__(self, app: "SelectorApp") -> None:
        self.app = app

    @property
    def core(self) -> Selector:
        return self.app.selector

    async def Upsert(self, request, context):  # noqa: N802 - gRPC method names
        if not request.points:
            raise errors.InvalidArgument("no points given", field="points")
        rows = []
        for i, p in enumerate(request.points):
            v = _vectors(p.vector, f"points[{i}].vector")
            if v.ndim != 1:
                raise errors.InvalidArgument(f"must have shape [dimension], got {list(v.shape)}",
                                             field=f"points[{i}].vector")
            if rows and len(v) != len(rows[0]):
                raise errors.InvalidArgument(f"has {len(v)} values, points[0] has {len(rows[0])}",
                                             field=f"points[{i}].vector")
            rows.append(v)
        pts = request.points
        meta = PointMeta([p.id for p in pts], [p.image_id for p in pts], [p.location for p in pts],
                         [p.sequence_id for p in pts])
        n = await asyncio.to_thread(self.core.upsert, request.project, request.embedding_version, meta.ids,
                                    np.stack(rows), meta)
        return selector_pb2.UpsertResponse(upserted=n)

    async def SetLabels(self, request, context):  # noqa: N802
        labels = [(x.id, x.label) for x in request.labels]
        n = await asyncio.to_thread(self.core.set_labels, request.project, labels)
        return selector_pb2.SetLabelsResponse(updated=n)

    async def SetPredictions(self, request, context):  # noqa: N802
        probs = _vectors(request.probabilities, "probabilities")
        n = await asyncio.to_thread(self.core.set_predictions, request.project, list(request.ids),
                                    list(request.classes), probs)
        return selector_pb2.SetPredictionsResponse(updated=n)

    async def Select(self, request, context):  # noqa: N802
        f = request.filter
        result, ids, version = await asyncio.to_thread(
            self.core.select, request.project, request.strategy, request.count, locations=list(f.locations),
            sequence_ids=list(f.sequence_ids), exclude_ids=list(f.exclude_ids),
            one_per_sequence=f.one_per_sequence, seed=request.seed)
        return selector_pb2.SelectResponse(
            selected=[selector_pb2.Selected(id=i, score=float(s)) for i, s in zip(ids, result.scores)],
            embedding_version=version)

    async def SwitchEmbedding(self, request, context):  # noqa: N802
        previous, current = await asyncio.to_thread(self.core.switch_embedding, request.project,
                                                    request.embedding_version)
        return selector_pb2.SwitchEmbeddingResponse(previous_version=previous, embedding_version=current)

    async def GetStats(self, request, context):  # noqa: N802
        s = await asyncio.to_thread(self.core.stats, request.project)
        return selector_pb2.GetStatsResponse(**s)


class SelectorApp(App[SelectorSettings]):
    selector: Selector

    def registrations(self):
        return [Registration(SelectorServicer(self), selector_pb2_grpc.add_SelectorServiceServicer_to_server,
                             SERVICE)]

    async def startup(self) -> None:
        s = self.settings
        kind = s.backend()
        store = await asyncio.to_thread(open_store, kind, path=s.data_dir / "qdrant", url=s.qdrant_url or None,
                                        api_key=s.qdrant_api_key or None)
        self.selector = Selector(store, s.data_dir, coarse_centres=s.coarse_centres)
        deadline = time.monotonic() + s.connect_seconds
        delay = 0.5
        while True:
            try:
                await asyncio.to_thread(self.selector.load)
                return
            except Exception as exc:
                if kind != "remote":
                    raise
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cannot use the Qdrant server at {s.qdrant_url}: {exc} (is it running, "
                                       "and is QDRANT_API_KEY right?)") from None
                log.warning("Qdrant at %s not usable yet (%s); retrying in %.1fs", s.qdrant_url, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def shutdown(self) -> None:
        if getattr(self, "selector", None) is not None:
            await asyncio.to_thread(self.selector.close)


def main() -> None:
    run(SelectorApp, SelectorSettings)


if __name__ == "__main__":
    main()
