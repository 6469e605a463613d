"""What the orchestrator needs from the other four services, in domain terms (numpy, dataclasses; no grpc).

:mod:`trapline.orchestrator.clients` implements these over gRPC; tests may implement them in process.
Every method may raise :class:`trapline.runtime.errors.Unavailable` when its service is down.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .db import Detection


@dataclass
class Detected:
    """The detector's answer for one frame."""

    width: int
    height: int
    detections: list[Detection]
    crops: dict[int, bytes]  # detection index -> 256x256 JPEG, for counted animal detections
    threshold: float
    failure: str = ""


@dataclass
class TrainedClassifier:
    version: str
    classes: list[str]
    accuracy: float
    holdout_size: int = 0


@dataclass
class TrainerJob:
    id: str
    state: str  # QUEUED RUNNING SUCCEEDED FAILED CANCELLED
    done: int = 0
    total: int = 0
    error: str = ""
    result: dict[str, str] = field(default_factory=dict)


@dataclass
class PointData:
    id: str
    image_id: str
    location: str
    sequence_id: str


class DetectorPort(Protocol):
    async def detect(self, images: Sequence[tuple[str, bytes]], threshold: float) -> tuple[list[Detected], str]:
        """Detect in encoded frames (id, bytes); returns per-frame results in order and the model version."""


class EmbedderPort(Protocol):
    async def embed(self, crops: Sequence[bytes], version: str) -> tuple[np.ndarray, str]: ...
    async def active_version(self) -> str: ...
    async def load(self, version: str) -> None: ...


class SelectorPort(Protocol):
    async def upsert(self, project: str, version: str, points: Sequence[PointData], vectors: np.ndarray) -> None: ...
    async def set_labels(self, project: str, labels: Sequence[tuple[str, str]]) -> None: ...
    async def set_predictions(self, project: str, ids: Sequence[str], classes: Sequence[str],
                              probabilities: np.ndarray) -> None: ...
    async def select(self, project: str, strategy: str, count: int, exclude: Sequence[str], seed: int) -> list[str]: ...
    async def switch(self, project: str, version: str) -> None: ...


class TrainerPort(Protocol):
    async def train(self, project: str, vectors: np.ndarray, labels: Sequence[str], seed: int) -> TrainedClassifier: ...
    async def predict(self, project: str, version: str, vectors: np.ndarray) -> tuple[list[str], np.ndarray]: ...
    async def start_finetune(self, project: str, base_version: str, crops: Sequence[tuple[str, str, str]],
                             seed: int) -> TrainerJob: ...
    async def job(self, job_id: str) -> TrainerJob: ...
