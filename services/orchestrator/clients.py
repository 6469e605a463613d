"""The ports of :mod:`.ports` over gRPC: one channel per service, errors mapped back to domain errors.

A service that is down surfaces as :class:`~trapline.runtime.errors.Unavailable` naming it; other
statuses keep their code, with the service named in the message.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import numpy as np

from trapline.api.common.v1 import common_pb2
from trapline.api.detector.v1 import detector_pb2, detector_pb2_grpc
from trapline.api.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from trapline.api.selector.v1 import selector_pb2, selector_pb2_grpc
from trapline.api.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from trapline.client import channel_options
from trapline.runtime import errors

from .db import Detection
from .ports import Detected, PointData, TrainedClassifier, TrainerJob

_ERRORS = {cls.code: cls for cls in (errors.InvalidArgument, errors.NotFound, errors.AlreadyExists,
                                      errors.FailedPrecondition, errors.Unavailable, errors.ResourceExhausted,
                                      errors.PermissionDenied, errors.Cancelled, errors.Aborted)}
_JOB_STATES = {v: k.removeprefix("JOB_STATE_") for k, v in common_pb2.JobState.items()}


def to_tensor(a: np.ndarray) -> common_pb2.Tensor:
    a = np.ascontiguousarray(a, dtype="<f4")
    return common_pb2.Tensor(dtype=common_pb2.D_TYPE_FLOAT32, shape=list(a.shape), data=a.tobytes())


def from_tensor(t: common_pb2.Tensor) -> np.ndarray:
    dtype = {common_pb2.D_TYPE_FLOAT32: "<f4", common_pb2.D_TYPE_FLOAT16: "<f2", common_pb2.D_TYPE_INT64: "<i8",
             common_pb2.D_TYPE_UINT8: "u1"}[t.dtype]
    return np.frombuffer(t.data, dtype=dtype).reshape(tuple(t.shape)).astype(np.float32)


class _Client:
    service = ""

    def __init__(self, address: str, max_message_mb: float = 64.0, timeout: float = 300.0) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=channel_options(max_message_mb))
        self.timeout = timeout

    async def call(self, method, request):
        try:
            return await method(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise errors.Unavailable(f"the {self.service} at {self.address} is unavailable: "
                                         f"{exc.details() or code.name}") from None
            cls = _ERRORS.get(code.name)
            if cls is None:
                raise RuntimeError(f"{self.service} failed: {code.name} {exc.details()}") from None
            raise cls(f"{self.service}: {exc.details()}") from None

    async def close(self) -> None:
        await self.channel.close()


class DetectorClient(_Client):
    service = "detector"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.stub = detector_pb2_grpc.DetectorServiceStub(self.channel)

    async def detect(self, images: Sequence[tuple[str, bytes]], threshold: float) -> tuple[list[Detected], str]:
        request = detector_pb2.DetectRequest(
            images=[detector_pb2.ImageInput(image_id=i, source=common_pb2.ImageSource(data=d)) for i, d in images],
            options=detector_pb2.DetectOptions(threshold=threshold, return_crops=True,
                                               crop_mode=detector_pb2.CROP_MODE_RESIZE))
        response = await self.call(self.stub.Detect, request)
        out = []
        for r in response.results:
            dets = [Detection(d.category, d.confidence, (d.bbox.x_min, d.bbox.y_min, d.bbox.width, d.bbox.height))
                    for d in r.detections]
            crops = {c.detection_index: c.jpeg for c in r.crops}
            out.append(Detected(r.width, r.height, dets if not r.failure else [], crops if not r.failure else {},
                                r.threshold, r.failure))
        return out, response.model_version


class EmbedderClient(_Client):
    service = "embedder"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.stub = embedder_pb2_grpc.EmbedderServiceStub(self.channel)

    async def embed(self, crops: Sequence[bytes], version: str) -> tuple[np.ndarray, str]:
        response = await self.call(self.stub.Embed, embedder_pb2.EmbedRequest(crops=list(crops), model_version=version))
        return from_tensor(response.vectors), response.model_version

    async def active_version(self) -> str:
        response = await self.call(self.stub.ListModels, embedder_pb2.ListModelsRequest())
        active = [m.version for m in response.models if m.active]
        if not active:
            raise errors.FailedPrecondition("the embedder has no active model version")
        return active[0]

    async def load(self, version: str) -> None:
        await self.call(self.stub.LoadModel, embedder_pb2.LoadModelRequest(version=version))


def selector_name(project: str) -> str:
    """The selector's name for a project: its names allow '.' but not '_' (ours allow '_' but not '.')."""
    return project.replace("_", ".")


class SelectorClient(_Client):
    service = "selector"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.stub = selector_pb2_grpc.SelectorServiceStub(self.channel)

    async def upsert(self, project: str, version: str, points: Sequence[PointData], vectors: np.ndarray) -> None:
        request = selector_pb2.UpsertRequest(project=selector_name(project), embedding_version=version, points=[
            selector_pb2.Point(id=p.id, vector=to_tensor(vectors[i]), image_id=p.image_id, location=p.location,
                               sequence_id=p.sequence_id) for i, p in enumerate(points)])
        await self.call(self.stub.Upsert, request)

    async def set_labels(self, project: str, labels: Sequence[tuple[str, str]]) -> None:
        await self.call(self.stub.SetLabels, selector_pb2.SetLabelsRequest(
            project=selector_name(project), labels=[selector_pb2.Label(id=i, label=lb) for i, lb in labels]))

    async def set_predictions(self, project: str, ids: Sequence[str], classes: Sequence[str],
                              probabilities: np.ndarray) -> None:
        await self.call(self.stub.SetPredictions, selector_pb2.SetPredictionsRequest(
            project=selector_name(project), ids=list(ids), classes=list(classes), probabilities=to_tensor(probabilities)))

    async def select(self, project: str, strategy: str, count: int, exclude: Sequence[str], seed: int) -> list[str]:
        response = await self.call(self.stub.Select, selector_pb2.SelectRequest(
            project=selector_name(project), strategy=strategy, count=count, seed=seed,
            filter=selector_pb2.SelectFilter(exclude_ids=list(exclude))))
        return [s.id for s in response.selected]

    async def switch(self, project: str, version: str) -> None:
        await self.call(self.stub.SwitchEmbedding, selector_pb2.SwitchEmbeddingRequest(
            project=selector_name(project), embedding_version=version))


class TrainerClient(_Client):
    service = "trainer"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.stub = trainer_pb2_grpc.TrainerServiceStub(self.channel)

    async def train(self, project: str, vectors: np.ndarray, labels: Sequence[str], seed: int) -> TrainedClassifier:
        response = await self.call(self.stub.TrainClassifier, trainer_pb2.TrainClassifierRequest(
            project=project, vectors=to_tensor(vectors), labels=list(labels), seed=seed))
        return TrainedClassifier(response.classifier_version, list(response.classes), response.metrics.accuracy,
                                 response.metrics.holdout_size)

    async def predict(self, project: str, version: str, vectors: np.ndarray) -> tuple[list[str], np.ndarray]:
        response = await self.call(self.stub.Predict, trainer_pb2.PredictRequest(
            project=project, classifier_version=version, vectors=to_tensor(vectors)))
        return list(response.classes), from_tensor(response.probabilities)

    async def start_finetune(self, project: str, base_version: str, crops: Sequence[tuple[str, str, str]],
                             seed: int) -> TrainerJob:
        response = await self.call(self.stub.StartFineTune, trainer_pb2.StartFineTuneRequest(
            project=project, base_version=base_version, seed=seed,
            crops=[trainer_pb2.LabelledCrop(id=i, uri=u, label=lb) for i, u, lb in crops]))
        return _job(response.job)

    async def job(self, job_id: str) -> TrainerJob:
        return _job((await self.call(self.stub.GetJob, trainer_pb2.GetJobRequest(job_id=job_id))).job)


def _job(job: common_pb2.Job) -> TrainerJob:
    return TrainerJob(job.id, _JOB_STATES[job.state], job.done, job.total, job.error, dict(job.result))
