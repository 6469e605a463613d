"""Commands that drive the orchestrator: projects, ingest, status, label, export."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import grpc

from ..api.common.v1 import common_pb2
from ..api.orchestrator.v1 import orchestrator_pb2 as pb
from ..api.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from ._common import CommandError, add_connection_args, channel, explain, metadata, progress_bar

FORMATS = {
    "megadetector": pb.EXPORT_FORMAT_MEGADETECTOR,
    "coco": pb.EXPORT_FORMAT_COCO_CAMERA_TRAPS,
    "csv": pb.EXPORT_FORMAT_CSV,
}
STRATEGIES = {name.removeprefix("STRATEGY_").lower(): value for name, value in pb.Strategy.items() if value}


def _uri(path: str) -> str:
    return str(Path(path).resolve()) if "://" not in path else path


def ingest_request(project: str, source: str, kind: str) -> pb.StartIngestRequest:
    """Build a StartIngest request; ``kind`` auto-detects from the path."""
    path = Path(source)
    if kind == "auto":
        if path.is_dir():
            kind = "folder"
        elif path.suffix.lower() == ".json":
            import json

            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise CommandError(f"cannot read {source} as JSON: {exc}") from None
            kind = "megadetector" if "detection_categories" in doc or (
                doc.get("images") and "file" in doc["images"][0]) else "coco"
        elif not path.exists():
            raise CommandError(f"{source}: no such file or folder")
        else:
            raise CommandError(f"{source}: give a folder of images, a MegaDetector JSON or a COCO Camera Traps JSON")
    request = pb.StartIngestRequest(project_id=project)
    if kind == "folder":
        request.folder_uri = _uri(source)
    elif kind == "megadetector":
        request.megadetector_json_uri = _uri(source)
    elif kind == "coco":
        request.coco_json_uri = _uri(source)
    else:
        raise CommandError(f"unknown source kind {kind!r}")
    return request


async def watch_job(stub: pb_grpc.OrchestratorServiceStub, job: common_pb2.Job, meta, label: str = "") -> common_pb2.Job:
    last = job
    async for update in stub.WatchJob(pb.WatchJobRequest(job_id=job.id), metadata=meta):
        last = update.job
        progress_bar(last.done, last.total, label=label)
    return last


async def ensure_project(stub, args, meta) -> None:
    try:
        await stub.GetProject(pb.GetProjectRequest(project_id=args.project), metadata=meta)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND or not getattr(args, "create", False):
            raise
        settings = pb.ProjectSettings(
            seed_labels=args.seed_labels or 0, batch_size=args.batch_size or 0,
            finetune_every=args.finetune_every or 0, strategy=STRATEGIES.get(args.strategy or "", 0),
            allow_new_classes=True,
        )
        await stub.CreateProject(pb.CreateProjectRequest(project_id=args.project, name=args.project,
                                                         settings=settings), metadata=meta)
        print(f"created project {args.project}")


async def cmd_ingest(args: argparse.Namespace) -> int:
    request = ingest_request(args.project, args.source, args.kind)
    async with channel(args) as ch:
        stub = pb_grpc.OrchestratorServiceStub(ch)
        meta = metadata(args)
        await ensure_project(stub, args, meta)
        job = (await stub.StartIngest(request, metadata=meta)).job
        print(f"ingest job {job.id} started")
        job = await watch_job(stub, job, meta, label="ingest ")
        progress = await stub.GetProgress(pb.GetProgressRequest(project_id=args.project), metadata=meta)
    failures = int(job.metrics.get("failures", 0))
    print(f"frames {progress.images}  empty {progress.empty_images}  animals/crops {progress.crops}  "
          f"failures {failures}  ({pb_state(job)})")
    if job.state == common_pb2.JOB_STATE_FAILED:
        raise CommandError(f"ingest failed: {job.error}")
    return 0


def pb_state(job: common_pb2.Job) -> str:
    return common_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()


async def cmd_status(args: argparse.Namespace) -> int:
    async with channel(args) as ch:
        stub = pb_grpc.OrchestratorServiceStub(ch)
        meta = metadata(args)
        if not args.project:
            projects = (await stub.ListProjects(pb.ListProjectsRequest(), metadata=meta)).projects
            if not projects:
                print("no projects yet: `trapline ingest --create PROJECT SOURCE` makes one")
            for p in projects:
                print(p.id)
            return 0
        p = await stub.GetProgress(pb.GetProgressRequest(project_id=args.project), metadata=meta)
    rows = [("images", p.images), ("empty images", p.empty_images), ("crops", p.crops), ("labelled", p.labelled),
            ("rounds", p.rounds), ("embedding", p.embedding_version or "-"),
            ("classifier", p.classifier_version or "-"),
            ("accuracy (held out)", f"{p.classifier_accuracy:.3f}" if p.classifier_version and p.classifier_accuracy == p.classifier_accuracy else "-"),
            ("classes", ", ".join(p.classes) or "-")]
    for job in p.active_jobs:
        rows.append((f"job {job.kind}", f"{pb_state(job)} {job.done}/{job.total} {job.unit}"))
    for key, value in rows:
        print(f"{key:<20} {value}")
    return 0


def _read_answer(prompt: str) -> str:
    try:
        return input(prompt).strip()
    except EOFError:
        return "q"


async def cmd_label(args: argparse.Namespace) -> int:
    async with channel(args) as ch:
        stub = pb_grpc.OrchestratorServiceStub(ch)
        meta = metadata(args)
        while True:
            progress = await stub.GetProgress(pb.GetProgressRequest(project_id=args.project), metadata=meta)
            classes = list(progress.classes)
            batch = await stub.NextBatch(pb.NextBatchRequest(project_id=args.project, labeller=args.labeller,
                                                             count=args.count), metadata=meta)
            if not batch.items:
                print("nothing left to label")
                return 0
            print(f"batch {batch.batch_id}: {len(batch.items)} crops picked by {batch.strategy}")
            labels = []
            for i, item in enumerate(batch.items, 1):
                guess = (f"model says {item.predicted_label} ({item.predicted_confidence:.2f})"
                         if item.predicted_label else "no guess yet")
                print(f"\n[{i}/{len(batch.items)}] {item.crop_uri}\n  frame {item.image_uri}; {guess}")
                if classes:
                    print("  " + "  ".join(f"{n}) {c}" for n, c in enumerate(classes, 1)))
                answer = _read_answer("  species (name or number; Enter = accept guess, s = skip, q = quit): ")
                if answer == "q":
                    break
                if answer == "s":
                    continue
                if answer == "" and item.predicted_label:
                    answer = item.predicted_label
                if answer.isdigit() and 1 <= int(answer) <= len(classes):
                    answer = classes[int(answer) - 1]
                if answer:
                    labels.append(pb.CropLabel(crop_id=item.crop_id, label=answer))
                    if answer not in classes:
                        classes.append(answer)
            if labels:
                try:
                    result = await stub.SubmitLabels(pb.SubmitLabelsRequest(
                        project_id=args.project, batch_id=batch.batch_id, labeller=args.labeller, labels=labels),
                        metadata=meta)
                except grpc.aio.AioRpcError as exc:
                    print(f"labels not stored: {explain(exc)}", file=sys.stderr)
                    continue
                print(f"stored {result.accepted} new, {result.corrected} corrected; {result.total_labels} labels "
                      f"in the project" + (f"; fine-tune job {result.finetune_job_id}" if result.finetune_job_id else ""))
            if answer == "q":
                return 0


async def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.output).resolve()
    async with channel(args) as ch:
        stub = pb_grpc.OrchestratorServiceStub(ch)
        response = await stub.Export(pb.ExportRequest(project_id=args.project, format=FORMATS[args.format]),
                                     metadata=metadata(args))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(response.content)
    print(f"wrote {out} ({response.images} images, {args.format})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="ingest a folder, a MegaDetector JSON or a COCO Camera Traps JSON")
    p.add_argument("project")
    p.add_argument("source", help="folder of images, MegaDetector batch output JSON, or COCO Camera Traps JSON")
    p.add_argument("--kind", choices=("auto", "folder", "megadetector", "coco"), default="auto")
    p.add_argument("--create", action="store_true", help="create the project if it does not exist")
    p.add_argument("--seed-labels", type=int, default=0, help="with --create: random labels first (default 1000)")
    p.add_argument("--batch-size", type=int, default=0, help="with --create: crops per batch (default 100)")
    p.add_argument("--finetune-every", type=int, default=0, help="with --create: labels between fine-tunes (2000)")
    p.add_argument("--strategy", choices=sorted(STRATEGIES), default=None, help="with --create (default kcenter)")
    add_connection_args(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("status", help="a project's progress (or the list of projects)")
    p.add_argument("project", nargs="?")
    add_connection_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("label", help="label crops in the terminal, batch after batch")
    p.add_argument("project")
    p.add_argument("--labeller", default="cli", help="your name (recorded with each label)")
    p.add_argument("--count", type=int, default=0, help="crops per batch (default: the project's batch size)")
    add_connection_args(p)
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("export", help="export results as MegaDetector JSON, COCO Camera Traps or CSV")
    p.add_argument("project")
    p.add_argument("--format", choices=sorted(FORMATS), default="megadetector")
    p.add_argument("-o", "--output", required=True, help="file to write")
    add_connection_args(p)
    p.set_defaults(func=cmd_export)


def run(func, args) -> int:
    try:
        return asyncio.run(func(args))
    except grpc.aio.AioRpcError as exc:
        raise CommandError(explain(exc)) from None
