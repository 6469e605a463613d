"""The labelling loop (Norouzzadeh et al., Algorithm 2), sequenced over the other services.

    NextBatch:    random until the seed size, then the project's strategy (the selector picks; crops in
                  other labellers' open batches are excluded so two labellers never get the same crop)
    SubmitLabels: validate, store (corrections recorded), selector.SetLabels, trainer.TrainClassifier +
                  Predict, selector.SetPredictions; every ``finetune_every`` labels a fine-tune job:
                  trainer.StartFineTune -> re-embed every crop with the new version -> selector.Upsert under
                  it -> selector.SwitchEmbedding -> embedder.LoadModel -> retrain on the new vectors.

The orchestrator sequences; the selector ranks and the trainer trains. Labels are durable before any
other service is told: a project whose services missed an update is marked ``pending_sync`` and brought
up to date (all labels, retrain) before its next batch or submission.
"""

from __future__ import annotations

import asyncio
import math
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trapline.runtime.errors import FailedPrecondition, InvalidArgument, NotFound

from .db import CropInfo, Database, Project
from .jobs import JobBoard, patiently
from .ports import EmbedderPort, PointData, SelectorPort, TrainerPort
from .storage import CropStore

log = logging.getLogger("trapline.orchestrator.loop")

PREDICT_CHUNK = 16_384  # rows per Predict / SetPredictions call (16 MiB of float32 vectors at d=256)
MAX_BATCH = 10_000
#: Strategies that rank by the classifier's predictions: NextBatch waits for a background retrain first.
USES_PREDICTIONS = frozenset({"confidence", "margin", "entropy", "informative_diverse", "margin_cluster_mean"})


@dataclass
class BatchOut:
    batch_id: str
    strategy: str
    items: list[CropInfo]
    jpegs: list[bytes]


@dataclass
class SubmitOut:
    accepted: int
    unchanged: int
    corrected: int
    total_labels: int
    classifier_version: str
    finetune_job_id: str


class Locks:
    """One asyncio lock per project: batch creation, label rounds, selector writes and switches take turns."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def __call__(self, project: str) -> asyncio.Lock:
        return self._locks[project]


class Loop:
    def __init__(self, db: Database, crops: CropStore, board: JobBoard, embedder: EmbedderPort,
                 selector: SelectorPort, trainer: TrainerPort, lock: Locks, *, batch_ttl: float = 86_400.0,
                 finetune_poll: float = 1.0, embed_batch: int = 64) -> None:
        self.db, self.crops, self.board = db, crops, board
        self.embedder, self.selector, self.trainer = embedder, selector, trainer
        self.lock = lock
        self.batch_ttl = batch_ttl
        self.finetune_poll = finetune_poll
        self.embed_batch = embed_batch
        self.timings: dict[str, float] = {}  # last round's stages, seconds (for the benchmark and logs)
        self._vectors: dict[tuple[str, str], tuple[int, list[str], np.ndarray]] = {}
        self._retrain_locks = Locks()
        self._retrains: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()

    def retraining(self, project_id: str) -> asyncio.Task[None] | None:
        task = self._retrains.get(project_id)
        return task if task is not None and not task.done() else None

    def _schedule_retrain(self, project_id: str) -> None:
        if self.retraining(project_id):
            self._again.add(project_id)  # coalesce: one more pass after the running one
            return

        async def passes() -> None:
            while True:
                self._again.discard(project_id)
                try:
                    await self.retrain(project_id)
                    await asyncio.to_thread(self.db.update_project, project_id, pending_sync=0)
                except Exception:  # noqa: BLE001 - pending_sync stays set; the next call re-syncs
                    log.exception("background retrain of %s failed", project_id)
                    return
                if project_id not in self._again:
                    return

        self._retrains[project_id] = asyncio.create_task(passes(), name=f"retrain {project_id}")

    async def stop(self) -> None:
        for task in list(self._retrains.values()):
            task.cancel()
        await asyncio.gather(*self._retrains.values(), return_exceptions=True)

    def _project_vectors(self, project_id: str, version: str) -> tuple[list[str], np.ndarray]:
        """Every crop vector of the project under ``version``, cached until a vector of that version is written."""
        generation = self.db.vector_generation.get(version, 0)
        cached = self._vectors.get((project_id, version))
        if cached is None or cached[0] != generation:
            ids, vectors = self.db.project_vectors(project_id, version)
            self._vectors = {k: v for k, v in self._vectors.items() if k[0] != project_id}
            self._vectors[(project_id, version)] = cached = (generation, ids, vectors)
        return cached[1], cached[2]

    async def _project(self, project_id: str) -> Project:
        return await asyncio.to_thread(self.db.project, project_id)

    # -- NextBatch ------------------------------------------------------------------------------------

    async def next_batch(self, project_id: str, labeller: str, count: int, include_crops: bool) -> BatchOut:
        p = await self._project(project_id)
        count = count or p.settings.batch_size
        if not 1 <= count <= MAX_BATCH:
            raise InvalidArgument(f"count must be in [1, {MAX_BATCH}], got {count}", field="count")
        labeller = labeller or "anonymous"
        t = time.perf_counter()
        if p.settings.strategy in USES_PREDICTIONS and (task := self.retraining(project_id)):
            await asyncio.shield(task)  # this strategy ranks by predictions: wait for the fresh ones
        self.timings["wait_retrain"] = time.perf_counter() - t
        async with self.lock(project_id):
            if not self.retraining(project_id):
                await self._sync_if_needed(project_id)
            t = time.perf_counter()
            labelled = await asyncio.to_thread(self.db.label_count, project_id)
            strategy = "random" if labelled < p.settings.seed_labels else p.settings.strategy
            exclude = await asyncio.to_thread(self.db.open_batch_crops, project_id, labeller,
                                              time.time() - self.batch_ttl)
            batches = await asyncio.to_thread(self.db.rounds, project_id)
            seed = p.settings.seed * 1_000_003 + labelled * 7 + batches + 1
            available = await asyncio.to_thread(self.db.selectable_count, project_id) - len(exclude)
            ids = await self.selector.select(project_id, strategy, min(count, available), exclude, seed) \
                if available > 0 else []
            self.timings["select"] = time.perf_counter() - t
            batch_id = ""
            if ids:
                batch_id = await asyncio.to_thread(self.db.create_batch, project_id, labeller, strategy,
                                                   p.embedding_version, ids)
        items = await asyncio.to_thread(self.db.crops, project_id, ids)
        jpegs = await asyncio.to_thread(lambda: [self.crops.get(c.uri) for c in items]) if include_crops else []
        return BatchOut(batch_id, strategy, items, jpegs)

    # -- SubmitLabels ---------------------------------------------------------------------------------

    async def submit(self, project_id: str, batch_id: str, labeller: str,
                     labels: Sequence[tuple[str, str]], background: bool = False) -> SubmitOut:
        p = await self._project(project_id)
        labeller = labeller or "anonymous"
        await asyncio.to_thread(self._validate, p, batch_id, labels)
        async with self.lock(project_id):
            p = await self._project(project_id)
            new_classes = [c for c in dict.fromkeys(lb for _, lb in labels) if c not in p.classes]
            was_pending = p.pending_sync
            t = time.perf_counter()
            changed, accepted, unchanged, corrected = await asyncio.to_thread(
                self._store, p, batch_id, labeller, labels, new_classes)
            self.timings = {"store": time.perf_counter() - t}
            version = ""
            if changed or was_pending:
                version = await self._sync(project_id, None if was_pending else changed, background=background)
            total = await asyncio.to_thread(self.db.label_count, project_id)
            job_id = await self._maybe_finetune(project_id, total)
        return SubmitOut(accepted, unchanged, corrected, total, version, job_id)

    def _validate(self, p: Project, batch_id: str, labels: Sequence[tuple[str, str]]) -> None:
        if not labels:
            raise InvalidArgument("no labels given", field="labels")
        seen: dict[str, str] = {}
        for i, (crop_id, label) in enumerate(labels):
            if not crop_id:
                raise InvalidArgument("crop_id is empty", field=f"labels[{i}].crop_id")
            if not label.strip() or label != label.strip():
                raise InvalidArgument(f"label {label!r} must be a non-empty name without surrounding spaces",
                                      field=f"labels[{i}].label")
            if seen.setdefault(crop_id, label) != label:
                raise InvalidArgument(f"crop {crop_id} is given two different labels", field=f"labels[{i}]")
        unknown = self.db.unknown_crops(p.id, list(seen))
        if unknown:
            shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            raise NotFound(f"unknown crop ids in project {p.id}: {shown}", field="labels")
        if batch_id:
            batch = self.db.batch(batch_id)
            if batch is None or batch["project"] != p.id:
                raise NotFound(f"no batch {batch_id!r} in project {p.id}", field="batch_id")
        if not p.settings.allow_new_classes:
            bad = sorted({lb for _, lb in labels} - set(p.classes))
            if bad:
                known = ", ".join(p.classes) if p.classes else "(none: create the project with classes)"
                raise InvalidArgument(f"unknown species {', '.join(bad)}; known: {known}", field="labels")

    def _store(self, p: Project, batch_id: str, labeller: str, labels: Sequence[tuple[str, str]],
               new_classes: list[str]):
        # pending_sync first: if we die after storing, the next call re-syncs the other services.
        self.db.update_project(p.id, pending_sync=1, **({"classes": p.classes + new_classes} if new_classes else {}))
        return self.db.store_labels(p.id, batch_id, labeller, labels)

    async def _sync_if_needed(self, project_id: str) -> None:
        p = await self._project(project_id)
        if p.pending_sync:
            await self._sync(project_id, None)

    async def _sync(self, project_id: str, changed: Sequence[tuple[str, str]] | None, background: bool = False) -> str:
        """Tell the selector the labels (``changed`` or, if None, all), retrain, refresh predictions."""
        t = time.perf_counter()
        if changed is None:
            changed = list((await asyncio.to_thread(self.db.labels, project_id)).items())
        if changed:
            await self.selector.set_labels(project_id, changed)
        self.timings["set_labels"] = time.perf_counter() - t
        if background:
            self._schedule_retrain(project_id)
            return ""
        version = await self.retrain(project_id)
        await asyncio.to_thread(self.db.update_project, project_id, pending_sync=0)
        return version

    async def retrain(self, project_id: str) -> str:
        """Train the classifier on every human label (current embedding), predict every crop, publish the
        predictions. Returns the classifier version, or "" while fewer than two classes are labelled."""
        async with self._retrain_locks(project_id):
            return await self._retrain(project_id)

    async def _retrain(self, project_id: str) -> str:
        p = await self._project(project_id)
        t = time.perf_counter()
        ids, vectors = await asyncio.to_thread(self._project_vectors, project_id, p.embedding_version)
        labels = await asyncio.to_thread(self.db.labels, project_id)
        index = {cid: i for i, cid in enumerate(ids)}
        rows = [index[c] for c in labels if c in index]
        names = [lb for c, lb in labels.items() if c in index]
        self.timings["load_vectors"] = time.perf_counter() - t
        if len(set(names)) < 2:
            return ""
        t = time.perf_counter()
        clf = await self.trainer.train(project_id, vectors[rows], names, p.settings.seed)
        self.timings["train"] = time.perf_counter() - t
        t = time.perf_counter()
        labelled = set(labels)
        todo = np.array([i for i, cid in enumerate(ids) if cid not in labelled], dtype=np.int64)
        todo_ids = [ids[i] for i in todo]
        classes: list[str] = clf.classes
        probs = np.zeros((0, len(classes)), np.float32)
        parts = []
        for start in range(0, len(todo), PREDICT_CHUNK):
            classes, part = await self.trainer.predict(project_id, clf.version, vectors[todo[start:start + PREDICT_CHUNK]])
            parts.append(part)
        if parts:
            probs = np.concatenate(parts)
        self.timings["predict"] = time.perf_counter() - t

        async def store() -> None:
            t = time.perf_counter()
            if len(todo_ids):
                top = probs.argmax(axis=1)
                await asyncio.to_thread(self.db.put_predictions, todo_ids, [classes[k] for k in top],
                                        probs[np.arange(len(top)), top].tolist(), clf.version)
            self.timings["store_predictions"] = time.perf_counter() - t

        async def publish() -> None:
            t = time.perf_counter()
            for start in range(0, len(todo_ids), PREDICT_CHUNK):
                await self.selector.set_predictions(project_id, todo_ids[start:start + PREDICT_CHUNK], classes,
                                                    probs[start:start + PREDICT_CHUNK])
            self.timings["set_predictions"] = time.perf_counter() - t

        await asyncio.gather(store(), publish())  # our copy and the selector's, side by side
        total = len(labels)
        accuracy = float(clf.accuracy)  # NaN when the labels are too few to hold any out
        await asyncio.to_thread(self.db.update_project, project_id, classifier_version=clf.version,
                                classifier_accuracy=accuracy if math.isfinite(accuracy) else -1.0)
        await asyncio.to_thread(self.db.add_model_version, project_id, "classifier", clf.version, total,
                                {"accuracy": clf.accuracy, "holdout_size": clf.holdout_size})
        return clf.version

    # -- fine-tuning ----------------------------------------------------------------------------------

    async def _maybe_finetune(self, project_id: str, total: int) -> str:
        p = await self._project(project_id)
        every = p.settings.finetune_every
        if every <= 0 or total // every <= p.finetunes_started:
            return ""
        active = await asyncio.to_thread(self.db.jobs, project_id, True)
        if any(j.kind == "fine_tune" for j in active):
            return ""  # one at a time; the next threshold crossing starts the next
        job = await asyncio.to_thread(self.db.create_job, project_id, "fine_tune", "stages",
                                      {"base_version": p.embedding_version, "labels": total}, 3)
        await asyncio.to_thread(self.db.update_project, project_id, finetunes_started=total // every)
        self.board.spawn(job.id, lambda: self.run_finetune(job.id))
        return job.id

    async def run_finetune(self, job_id: str) -> None:
        """Fine-tune -> re-embed -> switch -> retrain; resumable at each stage (the job's params record it)."""
        job = await self.board.start(job_id)
        project_id, params = job.project, dict(job.params)
        p = await self._project(project_id)
        if not params.get("trainer_job_id"):
            labels = await asyncio.to_thread(self.db.labels, project_id)
            infos = await asyncio.to_thread(self.db.crops, project_id, list(labels))
            crops = [(c.id, c.uri, labels[c.id]) for c in infos]
            started = await patiently(lambda: self.trainer.start_finetune(
                project_id, params["base_version"], crops, p.settings.seed), "trainer")
            params["trainer_job_id"] = started.id
            await self.board.update(job_id, params=params, done=0, message="fine-tuning the embedding")
        new_version = params.get("model_version", "")
        while not new_version:
            tj = await patiently(lambda: self.trainer.job(params["trainer_job_id"]), "trainer")
            if tj.state == "SUCCEEDED":
                new_version = tj.result.get("model_version", "")
                if not new_version:
                    raise FailedPrecondition("the trainer's fine-tune job succeeded without a model_version")
                params["model_version"] = new_version
                await self.board.update(job_id, params=params, done=1, message=f"re-embedding with {new_version}",
                                        metrics={"trainer_done": float(tj.done), "trainer_total": float(tj.total)})
            elif tj.state in ("FAILED", "CANCELLED"):
                raise FailedPrecondition(f"fine-tune {tj.id} {tj.state.lower()}: {tj.error}")
            else:
                await self.board.update(job_id, metrics={"trainer_done": float(tj.done),
                                                         "trainer_total": float(tj.total)})
                await asyncio.sleep(self.finetune_poll)
        # Re-embed every crop outside the lock (NextBatch keeps using the old embedding), then the
        # stragglers ingested meanwhile and the switch under the lock.
        await self._reembed(project_id, new_version, job_id)
        async with self.lock(project_id):
            await self._reembed(project_id, new_version, job_id)
            await self.selector.switch(project_id, new_version)
            await asyncio.to_thread(self.db.update_project, project_id, embedding_version=new_version)
            labels = await asyncio.to_thread(self.db.label_count, project_id)
            await asyncio.to_thread(self.db.add_model_version, project_id, "embedding", new_version, labels)
            try:
                await self.embedder.load(new_version)  # new ingests default to it; we always name versions
            except Exception as exc:  # noqa: BLE001 - not needed for correctness
                log.warning("embedder LoadModel(%s) failed: %s", new_version, exc)
            await self._sync(project_id, None)
        dropped = await asyncio.to_thread(self.db.drop_other_vectors, project_id, new_version)
        log.info("%s switched to %s; %d vectors of older versions dropped", project_id, new_version, dropped)
        await self.board.update(job_id, state="SUCCEEDED", done=3, message=f"switched to {new_version}",
                                result={"model_version": new_version})

    async def _reembed(self, project_id: str, version: str, job_id: str) -> None:
        total = await asyncio.to_thread(self.db.crop_count, project_id)
        done = total - await asyncio.to_thread(self.db.count_without_vector, project_id, version)
        while True:
            await self.board.update(job_id, metrics={"reembedded": float(done), "crops": float(total)})
            rows = await asyncio.to_thread(self.db.crops_without_vector, project_id, version, self.embed_batch)
            if not rows:
                return
            done += len(rows)
            jpegs = await asyncio.to_thread(lambda: [self.crops.get(r["uri"]) for r in rows])
            vectors, _ = await patiently(lambda: self.embedder.embed(jpegs, version), "embedder")
            points = [PointData(r["id"], str(r["image_id"]), r["location"], r["seq_id"]) for r in rows]
            await patiently(lambda: self.selector.upsert(project_id, version, points, vectors), "selector")
            await asyncio.to_thread(self.db.put_vectors, version, [r["id"] for r in rows], vectors)
