"""In-process stand-ins for the four services, for the orchestrator's domain tests (no network, no models).

They implement :mod:`trapline.orchestrator.ports` with simple, deterministic behaviour: the detector finds
one centred "animal" in three frames out of four, the embedder hashes crop bytes into unit vectors, the
selector picks unlabelled points at random (seeded), the trainer is a nearest-centroid classifier and a
fine-tune "succeeds" at once with a new version name. End-to-end tests use the real services instead.
"""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np

from trapline.orchestrator.db import Detection
from trapline.orchestrator.ports import Detected, PointData, TrainedClassifier, TrainerJob
from trapline.orchestrator.storage import cut_crops
from trapline.runtime.errors import FailedPrecondition, NotFound, Unavailable


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


class FakeDetector:
    def __init__(self) -> None:
        self.calls = 0
        self.frames = 0
        self.down = False
        self.delay = 0.0

    async def detect(self, images, threshold):
        if self.down:
            raise Unavailable("the detector at test is unavailable")
        if self.delay:
            await asyncio.sleep(self.delay)
        self.calls += 1
        self.frames += len(images)
        out = []
        for _, data in images:
            if _digest(data) % 4 == 0:
                dets = [Detection("1", 0.1, (0.1, 0.1, 0.2, 0.2))]  # below threshold: empty frame
            else:
                dets = [Detection("1", 0.95, (0.25, 0.25, 0.5, 0.5)), Detection("2", 0.3, (0.0, 0.0, 0.1, 0.1))]
            wanted = [i for i, d in enumerate(dets) if d.category == "1" and d.conf >= (threshold or 0.9)]
            try:
                w, h, crops = cut_crops(data, dets, wanted)
            except Exception as exc:  # noqa: BLE001
                out.append(Detected(0, 0, [], {}, threshold or 0.9, failure=f"cannot decode: {exc}"))
                continue
            out.append(Detected(w, h, dets, crops, threshold or 0.9))
        return out, "fake-detector-1"


class FakeEmbedder:
    def __init__(self, dim: int = 16) -> None:
        self.dim = dim
        self.active = "base-v1"
        self.calls = 0

    async def embed(self, crops, version):
        self.calls += 1
        version = version or self.active
        rows = []
        for c in crops:
            rng = np.random.default_rng(_digest(c + version.encode()))
            v = rng.normal(size=self.dim)
            rows.append(v / np.linalg.norm(v))
        return np.array(rows, np.float32).reshape(len(crops), self.dim), version

    async def active_version(self):
        return self.active

    async def load(self, version):
        self.active = version


class FakeSelector:
    def __init__(self) -> None:
        self.points: dict[str, dict[str, dict[str, np.ndarray]]] = {}  # project -> version -> id -> vec
        self.active: dict[str, str] = {}
        self.labels: dict[str, dict[str, str]] = {}
        self.predictions: dict[str, dict[str, np.ndarray]] = {}
        self.upserts = 0

    async def upsert(self, project, version, points: list[PointData], vectors):
        self.upserts += 1
        store = self.points.setdefault(project, {}).setdefault(version, {})
        self.active.setdefault(project, version)
        for p, v in zip(points, vectors):
            store[p.id] = v

    async def set_labels(self, project, labels):
        known = self.points.get(project, {}).get(self.active.get(project, ""), {})
        missing = [i for i, _ in labels if i not in known]
        if missing:
            raise NotFound(f"unknown ids {missing[:3]}")
        self.labels.setdefault(project, {}).update(dict(labels))

    async def set_predictions(self, project, ids, classes, probabilities):
        self.predictions.setdefault(project, {}).update(zip(ids, probabilities))

    async def select(self, project, strategy, count, exclude, seed):
        points = self.points.get(project, {}).get(self.active.get(project, ""), {})
        labelled = self.labels.get(project, {})
        candidates = sorted(i for i in points if i not in labelled and i not in set(exclude))
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(candidates))[:count]
        return [candidates[i] for i in order]

    async def switch(self, project, version):
        if version not in self.points.get(project, {}):
            raise FailedPrecondition(f"no points under {version}")
        if len(self.points[project][version]) != len(self.points[project][self.active[project]]):
            raise FailedPrecondition("the new version lacks points")
        self.active[project] = version


class FakeTrainer:
    def __init__(self) -> None:
        self.models: dict[str, tuple[list[str], np.ndarray]] = {}
        self.trained = 0
        self.finetunes: list[list[tuple[str, str, str]]] = []

    async def train(self, project, vectors, labels, seed):
        self.trained += 1
        classes = sorted(set(labels))
        labels = np.array(labels)
        centres = np.stack([vectors[labels == c].mean(axis=0) for c in classes])
        version = f"clf-{self.trained}"
        self.models[version] = (classes, centres)
        return TrainedClassifier(version, classes, 0.5, 0)

    async def predict(self, project, version, vectors):
        classes, centres = self.models[version]
        logits = vectors @ centres.T * 5
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        return classes, (p / p.sum(axis=1, keepdims=True)).astype(np.float32)

    async def start_finetune(self, project, base_version, crops, seed):
        self.finetunes.append(list(crops))
        return TrainerJob(f"tj-{len(self.finetunes)}", "RUNNING")

    async def job(self, job_id):
        n = job_id.split("-")[1]
        return TrainerJob(job_id, "SUCCEEDED", 1, 1, "", {"model_version": f"ft-{n}"})


def fake_ports() -> dict:
    return {"detector": FakeDetector(), "embedder": FakeEmbedder(), "selector": FakeSelector(),
            "trainer": FakeTrainer()}
