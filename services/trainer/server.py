"""The trainer service: a thin gRPC layer over the MLP (:mod:`.mlp`) and fine-tune jobs (:mod:`.finetune`).

Settings (env prefix ``TRAPLINE_TRAINER_``, see :class:`TrainerSettings`). torch work runs off the event
loop: classifier training in a thread, fine-tunes on the job runner's worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from trapline.api.common.v1 import common_pb2
from trapline.api.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from trapline.defaults import PORTS
from trapline.embedder.modelstore import ModelStore, open_store
from trapline.embedder.tensors import from_tensor, to_tensor
from trapline.runtime import App, Registration, ServiceSettings, run
from trapline.runtime.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted

from . import mlp
from .finetune import FineTuneParams, run_finetune, submit_finetune
from .jobs import FINAL, Job, JobRunner

log = logging.getLogger("trapline.trainer")

_STATES = {"QUEUED": common_pb2.JOB_STATE_QUEUED, "RUNNING": common_pb2.JOB_STATE_RUNNING,
           "SUCCEEDED": common_pb2.JOB_STATE_SUCCEEDED, "FAILED": common_pb2.JOB_STATE_FAILED,
           "CANCELLED": common_pb2.JOB_STATE_CANCELLED}
_LOSSES = {trainer_pb2.LOSS_UNSPECIFIED: "triplet", trainer_pb2.LOSS_TRIPLET: "triplet",
           trainer_pb2.LOSS_CROSS_ENTROPY: "cross_entropy"}


class TrainerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TRAPLINE_TRAINER_", extra="ignore", validate_default=True)

    port: int = Field(PORTS["trainer"], ge=0, le=65535)
    data_dir: Path = Field(Path("var/trainer"), description="Classifiers and jobs (inputs, checkpoints).")
    model_store: str = Field("", description="URI of the embedder model store; empty: <data_dir>/../models.")
    default_base_version: str = Field("", description="Base version when a request names none; empty: the "
                                      "newest version in the model store that carries torch weights.")
    threads: int = Field(0, ge=0, description="torch threads; 0: torch's default.")
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$",
                        description="Fine-tune device; auto: CUDA when torch sees a GPU (the MLP runs in numpy).")
    epochs: int = Field(5, ge=1, le=200, description="Fine-tune epochs when a request says 0.")
    classes_per_batch: int = Field(8, ge=2, description="P when a request says 0.")
    crops_per_class: int = Field(4, ge=2, description="K when a request says 0.")
    train_blocks: int = Field(2, ge=0, description="Backbone stages fine-tuned besides the head.")
    lr: float = Field(1e-3, gt=0)
    max_labels: int = Field(2_000_000, ge=1, description="Most rows in one TrainClassifier request.")
    crop_roots: str = Field("", description="Comma-separated folders crop URIs may point into; "
                            "empty: the parent of data_dir (the stack's data folder).")

    def store_uri(self) -> str:
        return self.model_store or str(Path(self.data_dir).parent / "models")

    def roots(self) -> list[Path]:
        names = [r.strip() for r in self.crop_roots.split(",") if r.strip()]
        return [Path(r).resolve() for r in names] or [Path(self.data_dir).resolve().parent]


def job_message(job: Job) -> common_pb2.Job:
    def ts(t: float) -> Timestamp:
        out = Timestamp()
        out.FromNanoseconds(int(t * 1e9))
        return out

    return common_pb2.Job(
        id=job.id, kind=job.kind, state=_STATES[job.state], done=int(job.done), total=int(job.total), unit=job.unit,
        message=job.message, error=job.error, created_at=ts(job.created_at), updated_at=ts(job.updated_at),
        elapsed_seconds=job.elapsed_seconds, eta_seconds=job.eta_seconds,
        metrics={k: float(v) for k, v in job.metrics.items()}, result=dict(job.result))


def read_crop_uri(uri: str, roots: list[Path], field: str) -> bytes:
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise InvalidArgument(f"crop URI scheme {parsed.scheme!r} is not supported (a path or file://)", field=field)
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else uri).resolve()
    if not any(path.is_relative_to(r) for r in roots):
        raise PermissionDenied("crop URI is outside the trainer's crop roots (TRAPLINE_TRAINER_CROP_ROOTS)",
                               field=field)
    if not path.is_file():
        raise NotFound(f"no crop at {uri}", field=field)
    return path.read_bytes()


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, app: "TrainerApp") -> None:
        self.app = app

    async def TrainClassifier(self, request, context):  # noqa: N802 - gRPC method name
        store = self.app.classifiers
        store.check_project(request.project)
        x = from_tensor(request.vectors, "vectors", ndim=2)
        if len(x) > self.app.settings.max_labels:
            raise ResourceExhausted(f"{len(x)} rows; the limit is {self.app.settings.max_labels}", field="vectors")
        labels = list(request.labels)

        def work():
            clf = mlp.train(x, labels, holdout_fraction=request.holdout_fraction, seed=request.seed,
                            threads=self.app.settings.threads)
            return clf, store.save(request.project, clf)

        clf, version = await asyncio.to_thread(work)
        m = clf.metrics
        return trainer_pb2.TrainClassifierResponse(
            classifier_version=version, classes=clf.classes,
            metrics=trainer_pb2.ClassifierMetrics(accuracy=m.accuracy, per_class_recall=m.per_class_recall,
                                                  confusion=to_tensor(m.confusion), holdout_size=m.holdout_size))

    async def Predict(self, request, context):  # noqa: N802
        x = from_tensor(request.vectors, "vectors", ndim=2)

        def work():
            clf = self.app.classifiers.load(request.project, request.classifier_version)
            return clf, clf.predict_proba(x)

        clf, probs = await asyncio.to_thread(work)
        return trainer_pb2.PredictResponse(classes=clf.classes, probabilities=to_tensor(probs),
                                           classifier_version=clf.version)

    async def StartFineTune(self, request, context):  # noqa: N802
        app, s = self.app, self.app.settings
        if request.resume_job_id:
            job = await asyncio.to_thread(app.runner.resume, request.resume_job_id)
            return trainer_pb2.StartFineTuneResponse(job=job_message(job))
        if not request.crops:
            raise InvalidArgument("no crops: fine-tuning needs labelled crops", field="crops")
        crops, labels, ids = [], [], []
        for i, c in enumerate(request.crops):
            if c.jpeg:
                data = c.jpeg
            elif c.uri:
                data = await asyncio.to_thread(read_crop_uri, c.uri, s.roots(), f"crops[{i}].uri")
            else:
                raise InvalidArgument("a crop needs jpeg bytes or a uri", field=f"crops[{i}]")
            crops.append(data)
            labels.append(c.label)
            ids.append(c.id or str(i))
        if request.loss not in _LOSSES:
            raise InvalidArgument("unknown loss", field="loss")
        params = FineTuneParams(
            project=request.project or "default", base_version=request.base_version, loss=_LOSSES[request.loss],
            epochs=request.epochs or s.epochs, margin=request.margin or 0.2, seed=request.seed,
            classes_per_batch=request.classes_per_batch or s.classes_per_batch,
            crops_per_class=request.crops_per_class or s.crops_per_class, train_blocks=s.train_blocks, lr=s.lr,
            device=s.device)
        job = await asyncio.to_thread(submit_finetune, app.runner, app.store, params, crops, labels, ids,
                                      s.default_base_version or app.newest_base())
        return trainer_pb2.StartFineTuneResponse(job=job_message(job))

    async def GetJob(self, request, context):  # noqa: N802
        return trainer_pb2.GetJobResponse(job=job_message(self.app.runner.get(request.job_id)))

    async def WatchJob(self, request, context):  # noqa: N802
        runner = self.app.runner
        job = runner.get(request.job_id)
        seen = -1
        while True:
            job, rev = await asyncio.to_thread(runner.wait_change, request.job_id, seen, 1.0)
            if rev != seen:
                seen = rev
                yield trainer_pb2.WatchJobResponse(job=job_message(job))
            if job.state in FINAL:
                return

    async def CancelJob(self, request, context):  # noqa: N802
        job = await asyncio.to_thread(self.app.runner.cancel, request.job_id)
        return trainer_pb2.CancelJobResponse(job=job_message(job))


class TrainerApp(App[TrainerSettings]):
    store: ModelStore
    runner: JobRunner
    classifiers: mlp.ClassifierStore

    def registrations(self):
        return [Registration(TrainerServicer(self), trainer_pb2_grpc.add_TrainerServiceServicer_to_server,
                             "trapline.trainer.v1.TrainerService")]

    def newest_base(self) -> str:
        """The newest stored version with torch weights (a fine-tune continues from the latest one)."""
        versions = [v for v in self.store.versions() if v.weights_path is not None]
        return versions[-1].version if versions else ""

    def _start(self) -> None:
        s = self.settings
        if s.threads:
            os.environ.setdefault("OMP_NUM_THREADS", str(s.threads))
        data = Path(s.data_dir)
        self.store = open_store(s.store_uri())
        from trapline.embedder.server import seed_bundled

        seed_bundled(self.store)  # the default base version, when the embedder has not started yet
        self.classifiers = mlp.ClassifierStore(data / "classifiers")
        self.runner = JobRunner(data / "jobs", {"fine_tune": lambda ctx: run_finetune(ctx, self.store, s.threads)})
        requeued = self.runner.recover()
        if requeued:
            log.info("resuming %d interrupted job(s): %s", len(requeued), ", ".join(requeued))

    async def startup(self) -> None:
        await asyncio.to_thread(self._start)

    async def shutdown(self) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None:
            await asyncio.to_thread(runner.close)


def main() -> None:
    run(TrainerApp, TrainerSettings)


if __name__ == "__main__":
    main()
