"""Ingest: a resumable, idempotent job whose stages overlap through bounded queues.

    pending images -> [detect or cut given boxes] -> [store crops] -> [embed] -> [upsert to the selector]

Each stage is a task; the queues between them are small, so a slow stage holds the others back
(back-pressure) and the whole runs near the speed of the slowest stage. Every image's progress is in
the database (``pending -> detected -> embedded -> done``, or ``failed``), and every write is keyed
(image key, crop id '<image>-<detection>', vector (crop, version), selector point id), so a killed job
started again picks each image up where it was and nothing is duplicated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .db import Database, Detection, ImageRecord
from .formats import ANIMAL, read_coco, read_csv, read_megadetector
from .jobs import JobBoard, patiently
from .ports import Detected, DetectorPort, EmbedderPort, PointData, SelectorPort
from .storage import CropStore, Roots, cut_crops, list_images

log = logging.getLogger("trapline.orchestrator.ingest")

#: Threshold for detections given by a MegaDetector import when the project says "model default"
#: (MegaDetector v5's recommended threshold).
GIVEN_DEFAULT_THRESHOLD = 0.2
_END = object()


@dataclass
class IngestSettings:
    detect_batch: int = 8  # frames per Detect call
    embed_batch: int = 64  # crops per Embed call
    queue_size: int = 4  # items between two stages


def expand_source(kind: str, uri: str, roots: Roots, image_root: str = "") -> list[ImageRecord]:
    """The images a StartIngest source names (blocking: reads files). Checks every path against the roots."""
    if kind == "uris":
        raise ValueError("use expand_uris")
    field = {"folder": "folder_uri", "megadetector": "megadetector_json_uri", "coco": "coco_json_uri",
             "csv": "csv_uri"}[kind]
    if kind == "folder":
        folder = roots.check(uri, field)
        if not folder.is_dir():
            from trapline.runtime.errors import NotFound

            raise NotFound(f"no such folder: {uri}", field=field)
        return [ImageRecord(key=str(p), uri=str(p), file=str(p.relative_to(folder))) for p in list_images(folder)]
    path = roots.existing_file(uri, field)
    base = roots.check(image_root, "image_root_uri") if image_root else path.parent

    def resolve(name: str) -> tuple[str, str]:
        p = roots.check(name, field, base=base)
        return str(p), str(p)

    text = path.read_text(encoding="utf-8-sig")
    if kind == "csv":
        return read_csv(text, resolve)
    try:
        doc = json.loads(text)
    except ValueError as exc:
        from trapline.runtime.errors import InvalidArgument

        raise InvalidArgument(f"{uri} is not valid JSON: {exc}", field=field) from None
    return read_megadetector(doc, resolve) if kind == "megadetector" else read_coco(doc, resolve)


def expand_uris(uris: Sequence[str], roots: Roots) -> list[ImageRecord]:
    out = []
    for i, uri in enumerate(uris):
        p = roots.check(uri, f"uris.uris[{i}]")
        out.append(ImageRecord(key=str(p), uri=str(p), file=uri))
    return out


class Ingest:
    """Runs ingest jobs. ``lock(project)`` is the project's lock, held while writing to the selector so that
    an embedding switch never interleaves with an upsert."""

    def __init__(self, db: Database, crops: CropStore, board: JobBoard, detector: DetectorPort,
                 embedder: EmbedderPort, selector: SelectorPort, lock, settings: IngestSettings | None = None) -> None:
        self.db, self.crops, self.board = db, crops, board
        self.detector, self.embedder, self.selector = detector, embedder, selector
        self.lock = lock
        self.settings = settings or IngestSettings()

    async def run(self, job_id: str) -> None:
        job = await self.board.start(job_id)
        project = job.project
        s = self.settings
        q_detect: asyncio.Queue[Any] = asyncio.Queue(s.queue_size)
        q_store: asyncio.Queue[Any] = asyncio.Queue(s.queue_size)
        q_embed: asyncio.Queue[Any] = asyncio.Queue(s.queue_size)
        q_upsert: asyncio.Queue[Any] = asyncio.Queue(s.queue_size)
        threshold = (await asyncio.to_thread(self.db.project, project)).settings.detection_threshold
        t0 = time.monotonic()
        timings = {"detect": 0.0, "store": 0.0, "embed": 0.0, "upsert": 0.0}

        async def produce() -> None:
            # Resume what an earlier run left half-way, then the pending images.
            embedded = await asyncio.to_thread(self.db.job_images, job_id, "embedded")
            for start in range(0, len(embedded), s.embed_batch):
                rows = embedded[start:start + s.embed_batch]
                crops = await asyncio.to_thread(self.db.image_crops, [r["id"] for r in rows])
                await q_upsert.put((rows, crops, None, ""))
            detected = await asyncio.to_thread(self.db.job_images, job_id, "detected")
            for row in detected:
                crops = await asyncio.to_thread(self.db.image_crops, [row["id"]])
                jpegs = await asyncio.to_thread(lambda: [self.crops.get(c["uri"]) for c in crops])
                await q_embed.put((row, crops, jpegs))
            pending = await asyncio.to_thread(self.db.job_images, job_id, "pending")
            for start in range(0, len(pending), s.detect_batch):
                await q_detect.put(pending[start:start + s.detect_batch])
            await q_detect.put(_END)

        async def detect() -> None:
            while (rows := await q_detect.get()) is not _END:
                t = time.monotonic()
                results = await self._detect(rows, threshold)
                timings["detect"] += time.monotonic() - t
                await q_store.put(results)
            await q_store.put(_END)

        async def store() -> None:
            while (results := await q_store.get()) is not _END:
                t = time.monotonic()
                stored = await asyncio.to_thread(self._store, project, results)
                timings["store"] += time.monotonic() - t
                for row, crops, jpegs in stored:
                    if crops:
                        await q_embed.put((row, crops, jpegs))
                await self._progress(job_id, t0, timings)
            await q_embed.put(_END)

        async def embed() -> None:
            done = False
            while not done:
                item = await q_embed.get()
                if item is _END:
                    break
                items = [item]
                while sum(len(i[1]) for i in items) < s.embed_batch and not q_embed.empty():
                    nxt = q_embed.get_nowait()
                    if nxt is _END:
                        done = True
                        break
                    items.append(nxt)
                t = time.monotonic()
                rows = [i[0] for i in items]
                crops = [c for i in items for c in i[1]]
                jpegs = [j for i in items for j in i[2]]
                version = await self._embedding_version(project)
                vectors, version = await patiently(lambda: self.embedder.embed(jpegs, version), "embedder")
                await asyncio.to_thread(self._put_vectors, version, [c["id"] for c in crops], vectors,
                                        [r["id"] for r in rows])
                timings["embed"] += time.monotonic() - t
                await q_upsert.put((rows, crops, vectors, version))
            await q_upsert.put(_END)

        async def upsert() -> None:
            while (item := await q_upsert.get()) is not _END:
                rows, crops, vectors, version = item
                t = time.monotonic()
                async with self.lock(project):
                    current = await self._embedding_version(project)
                    if vectors is None or version != current:  # resumed, or the embedding switched meanwhile
                        vectors = await self._vectors_for(project, current, crops)
                    points = [PointData(c["id"], str(c["image_id"]), c["location"], c["seq_id"]) for c in crops]
                    if points:
                        await patiently(lambda: self.selector.upsert(project, current, points, vectors), "selector")
                    await asyncio.to_thread(self.db.set_image_status, [r["id"] for r in rows], "done")
                timings["upsert"] += time.monotonic() - t
                await self._progress(job_id, t0, timings)

        async with asyncio.TaskGroup() as group:
            for stage in (produce, detect, store, embed, upsert):
                group.create_task(stage())
        job = await self._progress(job_id, t0, timings)
        counts = await asyncio.to_thread(self.db.job_image_counts, job_id)
        await self.board.update(job_id, state="SUCCEEDED", message=f"{counts.get('done', 0)} images ingested, "
                                f"{counts.get('failed', 0)} failed", result={"images": str(job.done)})

    async def _embedding_version(self, project: str) -> str:
        p = await asyncio.to_thread(self.db.project, project)
        if p.embedding_version:
            return p.embedding_version
        version = await patiently(self.embedder.active_version, "embedder")
        await asyncio.to_thread(self.db.update_project, project, embedding_version=version)
        await asyncio.to_thread(self.db.add_model_version, project, "embedding", version, 0)
        return version

    async def _vectors_for(self, project: str, version: str, crops: Sequence[Any]) -> np.ndarray:
        ids = [c["id"] for c in crops]
        try:
            return await asyncio.to_thread(self.db.get_vectors, version, ids)
        except KeyError:
            jpegs = await asyncio.to_thread(lambda: [self.crops.get(c["uri"]) for c in crops])
            vectors, got = await patiently(lambda: self.embedder.embed(jpegs, version), "embedder")
            await asyncio.to_thread(self.db.put_vectors, got, ids, vectors)
            return vectors

    def _put_vectors(self, version: str, crop_ids: list[str], vectors: np.ndarray, image_ids: list[int]) -> None:
        self.db.put_vectors(version, crop_ids, vectors)
        self.db.set_image_status(image_ids, "embedded")

    async def _detect(self, rows: Sequence[Any], threshold: float) -> list[tuple[Any, Detected, str]]:
        given = [r for r in rows if r["given"] is not None]
        fresh = [r for r in rows if r["given"] is None]
        out: dict[int, tuple[Any, Detected, str]] = {}
        if given:
            for r, d in zip(given, await asyncio.to_thread(lambda: [self._cut_given(r, threshold) for r in given])):
                out[r["id"]] = (r, d, "given")
        if fresh:
            frames = await asyncio.to_thread(lambda: [_read(r["uri"]) for r in fresh])
            readable = [(r, data) for r, (data, _) in zip(fresh, frames) if data is not None]
            for r, (data, error) in zip(fresh, frames):
                if data is None:
                    out[r["id"]] = (r, Detected(0, 0, [], {}, threshold, failure=error), "")
            if readable:
                results, model = await patiently(
                    lambda: self.detector.detect([(str(r["id"]), d) for r, d in readable], threshold), "detector")
                for (r, _), d in zip(readable, results):
                    out[r["id"]] = (r, d, model)
        return [out[r["id"]] for r in rows]

    def _cut_given(self, row: Any, threshold: float) -> Detected:
        threshold = threshold or GIVEN_DEFAULT_THRESHOLD
        dets = [Detection(c, float(conf), tuple(box)) for c, conf, box in json.loads(row["given"])]
        wanted = [i for i, d in enumerate(dets) if d.category == ANIMAL and d.conf >= threshold]
        data, error = _read(row["uri"])
        if data is None:
            return Detected(0, 0, dets, {}, threshold, failure=error)
        try:
            width, height, crops = cut_crops(data, dets, wanted)
        except Exception as exc:  # noqa: BLE001 - undecodable frame: a per-image failure
            return Detected(0, 0, dets, {}, threshold, failure=f"cannot decode image: {exc}")
        return Detected(width, height, dets, crops, threshold)

    def _store(self, project: str, results: Sequence[tuple[Any, Detected, str]]) -> list[tuple[Any, list, list]]:
        out = []
        for row, d, model in results:
            uris = {i: self.crops.put(project, f"{row['id']}-{i}", jpeg) for i, jpeg in d.crops.items()}
            self.db.record_detections(row["id"], d.width, d.height, d.detections if not d.failure else [],
                                      uris, project, d.threshold, model, d.failure)
            crops = self.db.image_crops([row["id"]]) if uris else []
            out.append((row, crops, [d.crops[c["idx"]] for c in crops]))
        return out

    async def _progress(self, job_id: str, t0: float, timings: dict[str, float]):
        counts = await asyncio.to_thread(self.db.job_image_counts, job_id)
        total = sum(counts.values())
        done = counts.get("done", 0) + counts.get("failed", 0)
        elapsed = time.monotonic() - t0
        rate = done / elapsed if elapsed > 0 else 0
        metrics = {"failures": float(counts.get("failed", 0)), **{f"{k}_seconds": round(v, 3) for k, v in timings.items()}}
        return await self.board.update(job_id, done=done, total=total, metrics=metrics,
                                       message=f"{done}/{total} images")


def _read(uri: str) -> tuple[bytes | None, str]:
    try:
        return Path(uri).read_bytes(), ""
    except OSError as exc:
        return None, f"cannot read image: {exc.strerror or exc}"
