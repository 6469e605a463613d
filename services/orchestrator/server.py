"""The orchestrator service: the front door for portals. A thin gRPC layer over :mod:`.loop`,
:mod:`.ingest`, :mod:`.formats` and the database (:mod:`.db`).

Settings (env prefix ``TRAPLINE_ORCHESTRATOR_``): DETECTOR_ADDRESS, EMBEDDER_ADDRESS, SELECTOR_ADDRESS,
TRAINER_ADDRESS (default 127.0.0.1 and the default ports), DATA_DIR, DATABASE_URL (``sqlite:///path``;
default <data_dir>/orchestrator.db), CROP_STORE_URI (default <data_dir>/crops), IMAGE_ROOTS (comma-separated
folders that image URIs and export destinations may point into; default: the working directory).

Health is SERVING once the database is migrated; the other services need not be up. A call that needs a
service that is down fails with UNAVAILABLE naming it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from trapline.api.common.v1 import common_pb2
from trapline.api.orchestrator.v1 import orchestrator_pb2 as pb
from trapline.api.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from trapline.defaults import PORTS
from trapline.runtime import App, Registration, ServiceSettings, run
from trapline.runtime.errors import InvalidArgument

from . import formats
from .clients import DetectorClient, EmbedderClient, SelectorClient, TrainerClient
from .db import Database, Job, Project, Settings, check_project_id
from .ingest import Ingest, IngestSettings, expand_source, expand_uris
from .jobs import JobBoard
from .loop import Locks, Loop
from .results import image_outs
from .storage import CropStore, Roots

log = logging.getLogger("trapline.orchestrator")

STRATEGIES = {pb.STRATEGY_KCENTER: "kcenter", pb.STRATEGY_RANDOM: "random", pb.STRATEGY_CONFIDENCE: "confidence",
              pb.STRATEGY_MARGIN: "margin", pb.STRATEGY_ENTROPY: "entropy",
              pb.STRATEGY_INFORMATIVE_DIVERSE: "informative_diverse",
              pb.STRATEGY_MARGIN_CLUSTER_MEAN: "margin_cluster_mean"}
STRATEGY_ENUM = {v: k for k, v in STRATEGIES.items()}
JOB_STATES = {"QUEUED": common_pb2.JOB_STATE_QUEUED, "RUNNING": common_pb2.JOB_STATE_RUNNING,
              "SUCCEEDED": common_pb2.JOB_STATE_SUCCEEDED, "FAILED": common_pb2.JOB_STATE_FAILED,
              "CANCELLED": common_pb2.JOB_STATE_CANCELLED}


def _address(service: str) -> str:
    return f"127.0.0.1:{PORTS[service]}"


class OrchestratorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TRAPLINE_ORCHESTRATOR_", extra="ignore", validate_default=True)

    port: int = Field(PORTS["orchestrator"], ge=0, le=65535)
    data_dir: Path = Field(Path("var/orchestrator"), description="Database and (by default) the crop store.")
    detector_address: str = Field(_address("detector"))
    embedder_address: str = Field(_address("embedder"))
    selector_address: str = Field(_address("selector"))
    trainer_address: str = Field(_address("trainer"))
    database_url: str = Field("", description="sqlite:///PATH; empty: <data_dir>/orchestrator.db. "
                              "PostgreSQL is not supported.")
    crop_store_uri: str = Field("", description="Folder or file:// URI for crops; empty: <data_dir>/crops.")
    image_roots: str = Field("", description="Comma-separated folders image URIs and export destinations may "
                             "point into; empty: the working directory.")
    detect_batch: int = Field(8, ge=1, le=256, description="Frames per Detect call during ingest.")
    embed_batch: int = Field(64, ge=1, le=2048, description="Crops per Embed call.")
    queue_size: int = Field(4, ge=1, le=1024, description="Items buffered between ingest stages.")
    batch_ttl_seconds: float = Field(86_400.0, gt=0, description="An open batch reserves its crops this long.")
    call_timeout_seconds: float = Field(600.0, gt=0, description="Deadline of calls to the other services.")

    @field_validator("database_url")
    @classmethod
    def _sqlite_only(cls, value: str) -> str:
        if value and not value.startswith("sqlite:///"):
            raise ValueError("only sqlite:///PATH is supported (PostgreSQL is not implemented)")
        return value

    def database_path(self) -> Path:
        return Path(self.database_url.removeprefix("sqlite:///")) if self.database_url else \
            Path(self.data_dir) / "orchestrator.db"

    def roots(self) -> list[Path]:
        names = [r.strip() for r in self.image_roots.split(",") if r.strip()]
        return [Path(n) for n in names] or [Path.cwd()]


def _ts(t: float | None) -> Timestamp:
    out = Timestamp()
    if t:
        out.FromNanoseconds(int(t * 1e9))
    return out


def job_message(job: Job) -> common_pb2.Job:
    end = job.updated_at if job.final else time.time()
    elapsed = end - job.started_at if job.started_at else 0.0
    eta = elapsed / job.done * (job.total - job.done) if job.done and job.total > job.done and not job.final else 0.0
    return common_pb2.Job(
        id=job.id, kind=job.kind, state=JOB_STATES[job.state], done=job.done, total=job.total, unit=job.unit,
        message=job.message, error=job.error, created_at=_ts(job.created_at), updated_at=_ts(job.updated_at),
        elapsed_seconds=elapsed, eta_seconds=eta, metrics={k: float(v) for k, v in job.metrics.items()},
        result={k: str(v) for k, v in job.result.items()})


def project_message(p: Project) -> pb.Project:
    s = p.settings
    return pb.Project(id=p.id, name=p.name, created_at=_ts(p.created_at), settings=pb.ProjectSettings(
        detection_threshold=s.detection_threshold, seed_labels=s.seed_labels, batch_size=s.batch_size,
        finetune_every=s.finetune_every, strategy=STRATEGY_ENUM[s.strategy], classes=p.classes,
        allow_new_classes=s.allow_new_classes, seed=s.seed))


def settings_from(msg: pb.ProjectSettings) -> Settings:
    d = Settings()
    if not 0 <= msg.detection_threshold <= 1:
        raise InvalidArgument("must be in [0, 1]", field="settings.detection_threshold")
    for name in ("seed_labels", "batch_size"):
        if getattr(msg, name) < 0:
            raise InvalidArgument("must not be negative", field=f"settings.{name}")
    if msg.strategy not in STRATEGIES and msg.strategy != pb.STRATEGY_UNSPECIFIED:
        raise InvalidArgument(f"unknown strategy {msg.strategy}", field="settings.strategy")
    if len(set(msg.classes)) != len(msg.classes) or any(not c.strip() for c in msg.classes):
        raise InvalidArgument("class names must be unique and non-empty", field="settings.classes")
    return Settings(detection_threshold=msg.detection_threshold, seed_labels=msg.seed_labels or d.seed_labels,
                    batch_size=msg.batch_size or d.batch_size, finetune_every=msg.finetune_every or d.finetune_every,
                    strategy=STRATEGIES.get(msg.strategy, d.strategy), allow_new_classes=msg.allow_new_classes,
                    seed=msg.seed)


class OrchestratorServicer(pb_grpc.OrchestratorServiceServicer):
    def __init__(self, app: "OrchestratorApp") -> None:
        self.app = app

    @property
    def db(self) -> Database:
        return self.app.db

    async def CreateProject(self, request, context):  # noqa: N802 - gRPC method names
        check_project_id(request.project_id)
        settings = settings_from(request.settings)
        p = await asyncio.to_thread(self.db.create_project, request.project_id, request.name or request.project_id,
                                    settings, list(request.settings.classes))
        return pb.CreateProjectResponse(project=project_message(p))

    async def GetProject(self, request, context):  # noqa: N802
        return pb.GetProjectResponse(project=project_message(await asyncio.to_thread(self.db.project,
                                                                                     request.project_id)))

    async def ListProjects(self, request, context):  # noqa: N802
        return pb.ListProjectsResponse(projects=[project_message(p) for p in await asyncio.to_thread(self.db.projects)])

    async def StartIngest(self, request, context):  # noqa: N802
        app = self.app
        await asyncio.to_thread(self.db.project, request.project_id)
        kind = request.WhichOneof("source")
        if kind is None:
            raise InvalidArgument("give one source: folder_uri, uris, megadetector_json_uri, coco_json_uri or csv_uri",
                                  field="source")
        if kind == "uris":
            if not request.uris.uris:
                raise InvalidArgument("no URIs given", field="uris")
            records = await asyncio.to_thread(expand_uris, list(request.uris.uris), app.image_roots)
            params = {"source": "uris", "count": len(request.uris.uris)}
        else:
            short = {"folder_uri": "folder", "megadetector_json_uri": "megadetector", "coco_json_uri": "coco",
                     "csv_uri": "csv"}[kind]
            uri = getattr(request, kind)
            records = await asyncio.to_thread(expand_source, short, uri, app.image_roots, request.image_root_uri)
            params = {"source": short, "uri": uri}
        job = await asyncio.to_thread(self.db.create_job, request.project_id, "ingest", "images", params)
        new, mine = await asyncio.to_thread(self.db.add_images, request.project_id, job.id, records)
        job = await app.board.update(job.id, total=mine, message=f"{len(records)} images in the source, {new} new")
        app.board.spawn(job.id, lambda: app.ingest.run(job.id))
        return pb.StartIngestResponse(job=job_message(job))

    async def GetJob(self, request, context):  # noqa: N802
        return pb.GetJobResponse(job=job_message(await self.app.board.get(request.job_id)))

    async def WatchJob(self, request, context):  # noqa: N802
        async for job in self.app.board.watch(request.job_id):
            yield pb.WatchJobResponse(job=job_message(job))

    async def NextBatch(self, request, context):  # noqa: N802
        out = await self.app.loop.next_batch(request.project_id, request.labeller, request.count,
                                             request.include_crops)
        items = []
        for i, c in enumerate(out.items):
            x, y, w, h = c.detection.bbox
            items.append(pb.BatchItem(
                crop_id=c.id, image_id=str(c.image_id), image_uri=c.image_uri,
                bbox=common_pb2.BoundingBox(x_min=x, y_min=y, width=w, height=h), crop_uri=c.uri,
                crop_jpeg=out.jpegs[i] if out.jpegs else b"", predicted_label=c.predicted,
                predicted_confidence=c.predicted_confidence))
        return pb.NextBatchResponse(batch_id=out.batch_id, items=items, strategy=out.strategy)

    async def SubmitLabels(self, request, context):  # noqa: N802
        out = await self.app.loop.submit(request.project_id, request.batch_id, request.labeller,
                                         [(lb.crop_id, lb.label) for lb in request.labels],
                                         background=request.retrain_in_background)
        return pb.SubmitLabelsResponse(accepted=out.accepted, unchanged=out.unchanged, corrected=out.corrected,
                                       total_labels=out.total_labels, classifier_version=out.classifier_version,
                                       finetune_job_id=out.finetune_job_id)

    async def GetResults(self, request, context):  # noqa: N802
        await asyncio.to_thread(self.db.project, request.project_id)
        size = request.page_size or 500
        if not 1 <= size <= 10_000:
            raise InvalidArgument("must be in [1, 10000]", field="page_size")
        try:
            after = int(request.page_token or 0)
        except ValueError:
            raise InvalidArgument("not a token from GetResults", field="page_token") from None
        outs, next_after = await asyncio.to_thread(image_outs, self.db, request.project_id, after, size)
        images = []
        for im in outs:
            crops = []
            for i, c in sorted(im.crops.items()):
                d = im.detections[i]
                crops.append(pb.CropResult(
                    crop_id=c.crop_id, bbox=common_pb2.BoundingBox(x_min=d.bbox[0], y_min=d.bbox[1], width=d.bbox[2],
                                                                   height=d.bbox[3]),
                    detection_confidence=d.conf, label=c.label, confidence=c.confidence, human=c.human))
            images.append(pb.ImageResult(image_id=str(im.image_id), uri=im.uri, empty=im.empty, count=im.count,
                                         count_bin=formats.count_bin(im.count), crops=crops, failure=im.failure))
        return pb.GetResultsResponse(images=images, next_page_token=str(next_after) if next_after else "")

    async def Export(self, request, context):  # noqa: N802
        p = await asyncio.to_thread(self.db.project, request.project_id)
        if request.format == pb.EXPORT_FORMAT_UNSPECIFIED or request.format not in pb.ExportFormat.values():
            raise InvalidArgument("choose MEGADETECTOR, COCO_CAMERA_TRAPS or CSV", field="format")
        destination = None
        if request.destination_uri:
            destination = self.app.image_roots.check(request.destination_uri, "destination_uri")
        outs, _ = await asyncio.to_thread(image_outs, self.db, p.id)
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        if request.format == pb.EXPORT_FORMAT_MEGADETECTOR:
            detectors = await asyncio.to_thread(self.db.detectors, p.id)
            doc = formats.write_megadetector(outs, p.classes, completed=now, detector=", ".join(detectors),
                                             classifier=f"trapline MLP {p.classifier_version or '(none yet)'}")
            content = json.dumps(doc, indent=1).encode()
        elif request.format == pb.EXPORT_FORMAT_COCO_CAMERA_TRAPS:
            content = json.dumps(formats.write_coco(outs, p.classes, description=f"Trapline project {p.id}"),
                                 indent=1).encode()
        else:
            content = formats.write_csv(outs).encode()
        if destination is None:
            return pb.ExportResponse(content=content, images=len(outs))

        def write() -> None:
            destination.parent.mkdir(parents=True, exist_ok=True)
            tmp = destination.with_name(destination.name + ".tmp")
            tmp.write_bytes(content)
            tmp.replace(destination)

        await asyncio.to_thread(write)
        return pb.ExportResponse(uri=destination.as_uri(), images=len(outs))

    async def GetProgress(self, request, context):  # noqa: N802
        p = await asyncio.to_thread(self.db.project, request.project_id)
        counts = await asyncio.to_thread(self.db.counts, p.id)
        rounds = await asyncio.to_thread(self.db.rounds, p.id)
        active = await asyncio.to_thread(self.db.jobs, p.id, True)
        return pb.GetProgressResponse(
            images=counts["images"], empty_images=counts["empty"], crops=counts["crops"], labelled=counts["labelled"],
            rounds=rounds, embedding_version=p.embedding_version, classifier_version=p.classifier_version,
            classifier_accuracy=p.classifier_accuracy if p.classifier_accuracy >= 0 else float("nan"), classes=p.classes,
            active_jobs=[job_message(j) for j in active])


class OrchestratorApp(App[OrchestratorSettings]):
    def __init__(self, settings: OrchestratorSettings, ports: dict | None = None) -> None:
        super().__init__(settings)
        self.ports = ports  # tests may give in-process detector/embedder/selector/trainer

    def registrations(self):
        return [Registration(OrchestratorServicer(self), pb_grpc.add_OrchestratorServiceServicer_to_server,
                             "trapline.orchestrator.v1.OrchestratorService")]

    async def startup(self) -> None:
        s = self.settings

        def open_db() -> Database:
            db = Database(s.database_path())
            db.migrate()
            return db

        self.db = await asyncio.to_thread(open_db)
        self.crop_store = CropStore(s.crop_store_uri or str(Path(s.data_dir) / "crops"))
        self.image_roots = Roots(s.roots())
        kw = {"max_message_mb": s.max_message_mb, "timeout": s.call_timeout_seconds}
        ports = self.ports or {}
        self.detector = ports.get("detector") or DetectorClient(s.detector_address, **kw)
        self.embedder = ports.get("embedder") or EmbedderClient(s.embedder_address, **kw)
        self.selector = ports.get("selector") or SelectorClient(s.selector_address, **kw)
        self.trainer = ports.get("trainer") or TrainerClient(s.trainer_address, **kw)
        self.board = JobBoard(self.db)
        locks = Locks()
        self.ingest = Ingest(self.db, self.crop_store, self.board, self.detector, self.embedder, self.selector, locks,
                             IngestSettings(s.detect_batch, s.embed_batch, s.queue_size))
        self.loop = Loop(self.db, self.crop_store, self.board, self.embedder, self.selector, self.trainer, locks,
                         batch_ttl=s.batch_ttl_seconds, embed_batch=s.embed_batch)
        for job in await asyncio.to_thread(self.db.jobs, None, True):  # resume what a previous run left
            log.info("resuming %s job %s", job.kind, job.id)
            work = self.ingest.run if job.kind == "ingest" else self.loop.run_finetune
            self.board.spawn(job.id, lambda work=work, job_id=job.id: work(job_id))

    async def shutdown(self) -> None:
        await self.board.stop_all()
        await self.loop.stop()
        for client in (self.detector, self.embedder, self.selector, self.trainer):
            if hasattr(client, "close"):
                await client.close()
        await asyncio.to_thread(self.db.close)


def main() -> None:
    run(OrchestratorApp, OrchestratorSettings)
