"""The main job: the whole system on the real sample frames, end to end, in one command.

1. start the five services as local processes (embedded Qdrant, SQLite, local stores) in ``--data-dir``;
2. create a project whose loop is scaled to the sample (seed, batch and fine-tune sizes below);
3. ingest real labelled frames (COCO Camera Traps): detection, empty frames (checked against the labels),
   counts, crops, embeddings;
4. run the active-learning loop with an oracle that answers from the frames' ground truth: random seed
   labels, then k-Center batches; the classifier is retrained after every batch and the embedding is
   fine-tuned once, after which everything is re-embedded;
5. write a table of accuracy against labels, a learning-curve PNG, and a MegaDetector batch output JSON
   (with species classifications) that Timelapse and AddaxAI can open.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from .api.common.v1 import common_pb2
from .api.orchestrator.v1 import orchestrator_pb2 as pb
from .api.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from .client import channel_options
from .featurize import NON_SPECIES
from .local import LocalStack, free_ports

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SETS = ("serengeti_fieldguide", "cct_sample")


@dataclass
class DemoConfig:
    frames: Path = REPO / "tests" / "data" / "frames"
    sets: tuple[str, ...] = DEFAULT_SETS
    out: Path = Path("demo-output")
    data_dir: Path = Path("var/demo")
    seed_labels: int = 12
    batch_size: int = 6
    finetune_every: int = 24
    strategy: int = pb.STRATEGY_KCENTER
    max_labels: int = 0  # 0: until every crop is labelled
    threshold: float = 0.0  # 0: the detector model's default
    extra_env: dict = field(default_factory=dict)  # e.g. smaller fine-tunes in CI


def frame_labels(frames: Path, sets: tuple[str, ...]) -> dict[str, str]:
    """Resolved image path -> its ground-truth label, from the sets' COCO Camera Traps files (empties, people and
    vehicles included)."""
    out: dict[str, str] = {}
    for name in sets:
        coco = frames / name / "coco_ct.json"
        doc = json.loads(coco.read_text())
        cats = {c["id"]: c["name"] for c in doc["categories"]}
        by_image = {a["image_id"]: cats[a["category_id"]] for a in doc["annotations"]}
        for im in doc["images"]:
            if im["id"] in by_image:
                out[str((coco.parent / im["file_name"]).resolve())] = by_image[im["id"]]
    return out


def species_only(labels: dict[str, str]) -> dict[str, str]:
    """The frames whose label is a species: what the oracle answers from."""
    return {path: label for path, label in labels.items() if label.lower() not in NON_SPECIES}


def _path_of(uri: str) -> str:
    return str(Path(uri.removeprefix("file://")).resolve())


async def _results(stub: pb_grpc.OrchestratorServiceStub, project: str):
    """Every image result of the project, page after page, paired with its resolved path."""
    token = ""
    while True:
        page = await stub.GetResults(pb.GetResultsRequest(project_id=project, page_token=token))
        for image in page.images:
            yield _path_of(image.uri), image
        token = page.next_page_token
        if not token:
            return


async def _empty_accuracy(stub: pb_grpc.OrchestratorServiceStub, project: str, labels: dict[str, str]) -> dict:
    """The detector's empty flag against ground truth: a frame should be empty unless its label is an animal."""
    correct = total = 0
    async for path, image in _results(stub, project):
        label = labels.get(path)
        if label is not None:
            total += 1
            correct += image.empty == (label.lower() in NON_SPECIES)
    return {"frames": total, "correct": correct}


async def _accuracy(stub: pb_grpc.OrchestratorServiceStub, project: str, truth: dict[str, str]) -> tuple[float, int]:
    """Accuracy of the current species per crop (human or model) against ground truth, over crops the model labelled."""
    correct = total = 0
    async for path, image in _results(stub, project):
        label = truth.get(path)
        for crop in image.crops:
            if label is None or crop.human or not crop.label:
                continue
            total += 1
            correct += crop.label == label
    return (correct / total if total else float("nan")), total


async def run_demo(config: DemoConfig, log=print) -> dict:
    config.out.mkdir(parents=True, exist_ok=True)
    labels = frame_labels(config.frames, config.sets)
    truth = species_only(labels)
    stack = LocalStack(data_dir=config.data_dir.resolve(), ports=free_ports(),
                       extra_env={"TRAPLINE_ORCHESTRATOR_IMAGE_ROOTS": str(config.frames.resolve()),
                                  "TRAPLINE_ORCHESTRATOR_DETECT_BATCH": "4", **config.extra_env})
    started = time.monotonic()
    log(f"starting services in {stack.data_dir} ...")
    stack.start()
    try:
        await stack.wait_serving(timeout=600)
        log(f"all five services SERVING after {time.monotonic() - started:.0f}s")
        async with grpc.aio.insecure_channel(stack.address("orchestrator"), options=channel_options(128)) as ch:
            stub = pb_grpc.OrchestratorServiceStub(ch)
            project = f"demo-{int(time.time())}"
            settings = pb.ProjectSettings(detection_threshold=config.threshold, seed_labels=config.seed_labels,
                                          batch_size=config.batch_size, finetune_every=config.finetune_every,
                                          strategy=config.strategy, allow_new_classes=True, seed=1)
            await stub.CreateProject(pb.CreateProjectRequest(project_id=project, name="Trapline demo",
                                                             settings=settings))
            for name in config.sets:
                t0 = time.monotonic()
                job = (await stub.StartIngest(pb.StartIngestRequest(
                    project_id=project, coco_json_uri=str((config.frames / name / "coco_ct.json").resolve())))).job
                async for update in stub.WatchJob(pb.WatchJobRequest(job_id=job.id)):
                    job = update.job
                if job.state != common_pb2.JOB_STATE_SUCCEEDED:
                    raise RuntimeError(f"ingest of {name} ended {common_pb2.JobState.Name(job.state)}: {job.error}")
                log(f"ingested {name}: {job.done} frames in {time.monotonic() - t0:.0f}s")
            progress = await stub.GetProgress(pb.GetProgressRequest(project_id=project))
            empties = await _empty_accuracy(stub, project, labels)
            log(f"{progress.images} frames, {progress.empty_images} empty, {progress.crops} crops; the empty flag "
                f"agrees with ground truth on {empties['correct']} of {empties['frames']} frames")
            curve: list[dict] = []
            finetunes: list[str] = []
            t_loop = time.monotonic()
            while True:
                batch = await stub.NextBatch(pb.NextBatchRequest(project_id=project, labeller="oracle"))
                if not batch.items:
                    break
                labels = [pb.CropLabel(crop_id=i.crop_id, label=truth.get(_path_of(i.image_uri), "unknown"))
                          for i in batch.items]
                result = await stub.SubmitLabels(pb.SubmitLabelsRequest(
                    project_id=project, batch_id=batch.batch_id, labeller="oracle", labels=labels))
                if result.finetune_job_id:
                    finetunes.append(result.finetune_job_id)
                    log(f"  fine-tune job {result.finetune_job_id} started at {result.total_labels} labels")
                accuracy, evaluated = await _accuracy(stub, project, truth)
                curve.append({"labels": result.total_labels, "strategy": batch.strategy,
                              "accuracy_unlabelled": accuracy, "evaluated_crops": evaluated,
                              "classifier": result.classifier_version})
                log(f"  {result.total_labels:4d} labels ({batch.strategy}): accuracy on the "
                    f"{evaluated} crops still unlabelled = {accuracy:.3f}")
                if config.max_labels and result.total_labels >= config.max_labels:
                    break
            for job_id in finetunes:  # the loop does not wait for fine-tunes; the demo shows their outcome
                async for update in stub.WatchJob(pb.WatchJobRequest(job_id=job_id)):
                    job = update.job
                log(f"  fine-tune {job_id}: {common_pb2.JobState.Name(job.state).removeprefix('JOB_STATE_').lower()}"
                    f" {dict(job.result)}")
            progress = await stub.GetProgress(pb.GetProgressRequest(project_id=project))
            export = await stub.Export(pb.ExportRequest(project_id=project, format=pb.EXPORT_FORMAT_MEGADETECTOR))
            (config.out / "megadetector.json").write_bytes(export.content)
            csv_export = await stub.Export(pb.ExportRequest(project_id=project, format=pb.EXPORT_FORMAT_CSV))
            (config.out / "results.csv").write_bytes(csv_export.content)
        summary = {
            "project": project, "frames": progress.images, "empty_frames": progress.empty_images,
            "crops": progress.crops, "labels": progress.labelled, "empty_flag_vs_truth": empties, "embedding_version": progress.embedding_version,
            "classifier_accuracy_heldout": progress.classifier_accuracy, "curve": curve,
            "loop_seconds": round(time.monotonic() - t_loop, 1),
            "total_seconds": round(time.monotonic() - started, 1),
        }
        (config.out / "summary.json").write_text(json.dumps(summary, indent=1))
        _plot(curve, config.out / "learning_curve.png")
        return summary
    finally:
        stack.stop()


def _plot(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    curve = [c for c in curve if c["evaluated_crops"]]
    xs = [c["labels"] for c in curve]
    ax.plot(xs, [c["accuracy_unlabelled"] for c in curve], marker="o")
    ax.set_xlabel("human labels")
    ax.set_ylabel("accuracy on crops not yet labelled")
    ax.set_title("Trapline demo: active learning on real camera-trap frames")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(summary: dict) -> str:
    lines = ["| labels | picked by | accuracy on unlabelled crops | crops evaluated |", "|---|---|---|---|"]
    for c in summary["curve"]:
        if not c["evaluated_crops"]:
            continue
        lines.append(f"| {c['labels']} | {c['strategy']} | {c['accuracy_unlabelled']:.3f} | {c['evaluated_crops']} |")
    return "\n".join(lines)


def main_async(config: DemoConfig) -> dict:
    return asyncio.run(run_demo(config))
