"""End to end: every service as its own process (trapline.local.LocalStack on free ports, embedded Qdrant),
the real sample frames, the orchestrator driven over gRPC as a portal would.

Tests that need a service whose server module has not landed yet are skipped, naming it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from trapline.api.common.v1 import common_pb2
from trapline.api.orchestrator.v1 import orchestrator_pb2 as pb
from trapline.api.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from trapline.client import channel_options
from trapline.local import ORDER, LocalStack, free_ports
from trapline.orchestrator.formats import check_megadetector

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FRAMES = Path(__file__).resolve().parents[1] / "data" / "frames"
MISSING = [s for s in ORDER if importlib.util.find_spec(f"trapline.{s}.server") is None]


def needs(*services: str):
    missing = [s for s in services if s in MISSING]
    return pytest.mark.skipif(bool(missing), reason=f"server module not there yet: {', '.join(missing)}")


class Stack:
    """A LocalStack plus a way to kill and restart the orchestrator alone."""

    def __init__(self, root: Path, services: list[str]) -> None:
        self.frames = root / "frames"
        for name in ("cct_sample", "md_test_images", "serengeti_fieldguide"):
            shutil.copytree(FRAMES / name, self.frames / name)
        env = {"TRAPLINE_ORCHESTRATOR_IMAGE_ROOTS": str(self.frames),
               "TRAPLINE_ORCHESTRATOR_DETECT_BATCH": "4", "TRAPLINE_ORCHESTRATOR_EMBED_BATCH": "16",
               "TRAPLINE_TRAINER_EPOCHS": "1", "TRAPLINE_TRAINER_THREADS": "1",
               "TRAPLINE_EMBEDDER_THREADS": "1", "TRAPLINE_DETECTOR_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self.local = LocalStack(data_dir=root / "stack", services=services, ports=free_ports(), extra_env=env)

    @property
    def address(self) -> str:
        return self.local.address("orchestrator")

    def kill_orchestrator(self) -> None:
        proc = self.local.procs["orchestrator"]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def start_orchestrator(self) -> None:
        log = open(self.local.data_dir / "logs" / "orchestrator.log", "ab")
        self.local.procs["orchestrator"] = subprocess.Popen(
            [sys.executable, "-c", "from trapline.orchestrator.server import main; main()"],
            env=self.local.env_for("orchestrator"), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    services = [s for s in ORDER if s not in MISSING]
    if "orchestrator" not in services:
        pytest.skip("orchestrator server missing")
    root = tmp_path_factory.mktemp("e2e")
    st = Stack(root, services)
    st.local.start()
    st.detector_failure = ""
    st.detector_note = ""
    try:
        try:
            asyncio.run(st.local.wait_serving(timeout=300))
        except RuntimeError as exc:
            if "detector exited" not in str(exc):
                raise
            # The detector cannot start with its default model (not built yet?). Run the real detector service
            # with the detector tests' tiny YOLOv5-interface model instead (one animal in every frame), so the
            # orchestrator-detector path is still exercised; if even that fails, skip the tests that need it.
            log = (st.local.data_dir / "logs" / "detector.log").read_text(errors="replace").strip().splitlines()
            st.detector_failure = next((line for line in reversed(log) if ("Error" in line or "Precondition" in line)
                                        and "Event loop" not in line), str(exc))
            st.local.stop()
            st.local.procs = {}
            try:
                from tests.detector.yolo_fixture import build

                st.local.extra_env["TRAPLINE_DETECTOR_MODEL_PATH"] = str(build(root / "yolo-fixture"))
                st.local.start()
                asyncio.run(st.local.wait_serving(timeout=300))
                st.detector_note = f"default model unavailable ({st.detector_failure}); YOLOv5 fixture model used"
                st.detector_failure = ""
            except Exception:  # noqa: BLE001 - fall back to no detector
                st.local.stop()
                st.local.procs = {}
                st.local.services = [s for s in services if s != "detector"]
                st.local.start()
                asyncio.run(st.local.wait_serving(timeout=300))
        yield st
    finally:
        st.local.stop()


async def stub_for(stack: Stack):
    channel = grpc.aio.insecure_channel(stack.address, options=channel_options())
    return channel, pb_grpc.OrchestratorServiceStub(channel)


async def wait_job(stub, job_id: str, timeout: float = 600) -> common_pb2.Job:
    last = None

    async def watch():
        nonlocal last
        async for update in stub.WatchJob(pb.WatchJobRequest(job_id=job_id)):
            last = update.job

    await asyncio.wait_for(watch(), timeout)
    return last


async def wait_serving(stack: Stack) -> None:
    from trapline.local import _check

    for _ in range(120):
        if await _check(stack.address) == "SERVING":
            return
        await asyncio.sleep(0.5)
    raise AssertionError("the orchestrator did not come back")


@needs("embedder", "selector", "trainer", "orchestrator")
async def test_loop_from_a_megadetector_output_through_two_rounds_and_a_fine_tune(stack):
    channel, stub = await stub_for(stack)
    async with channel:
        await stub.CreateProject(pb.CreateProjectRequest(project_id="md_loop", settings=pb.ProjectSettings(
            seed_labels=4, batch_size=4, finetune_every=8, allow_new_classes=True, detection_threshold=0.1)))
        md = stack.frames / "cct_sample" / "megadetector.json"
        job = await wait_job(stub, (await stub.StartIngest(pb.StartIngestRequest(
            project_id="md_loop", megadetector_json_uri=str(md)))).job.id)
        assert job.state == common_pb2.JOB_STATE_SUCCEEDED, job.error
        progress = await stub.GetProgress(pb.GetProgressRequest(project_id="md_loop"))
        assert progress.images == 16 and progress.crops >= 8, progress
        base_version = progress.embedding_version
        labelled: set[str] = set()
        finetune = ""
        for round_ in range(3):
            batch = await stub.NextBatch(pb.NextBatchRequest(project_id="md_loop", labeller="ana"))
            assert len(batch.items) == 4 and batch.strategy == ("random" if round_ < 1 else "kcenter")
            ids = {i.crop_id for i in batch.items}
            assert not ids & labelled
            labelled |= ids
                # two classes with two crops each per batch: the classifier and the triplet fine-tune can train
            labels = [pb.CropLabel(crop_id=i.crop_id, label="coyote" if n % 2 else "other")
                      for n, i in enumerate(batch.items)]
            reply = await stub.SubmitLabels(pb.SubmitLabelsRequest(project_id="md_loop", batch_id=batch.batch_id,
                                                                   labeller="ana", labels=labels))
            assert reply.accepted == 4 and reply.classifier_version, "the classifier is retrained after a batch"
            finetune = finetune or reply.finetune_job_id
        assert finetune, "8 labels with finetune_every=8 start a fine-tune"
        ft = await wait_job(stub, finetune)
        assert ft.state == common_pb2.JOB_STATE_SUCCEEDED, ft.error
        progress = await stub.GetProgress(pb.GetProgressRequest(project_id="md_loop"))
        assert progress.embedding_version == ft.result["model_version"] != base_version
        assert progress.labelled == 12 and progress.rounds == 3
        batch = await stub.NextBatch(pb.NextBatchRequest(project_id="md_loop", labeller="ana"))
        assert batch.items and not {i.crop_id for i in batch.items} & labelled
        assert all(i.predicted_label for i in batch.items), "unlabelled crops carry the model's guess"

        md_out = json.loads((await stub.Export(pb.ExportRequest(project_id="md_loop",
                                                                format=pb.EXPORT_FORMAT_MEGADETECTOR))).content)
        assert check_megadetector(md_out) == []
        n_classified = sum(1 for im in md_out["images"] for d in im["detections"] if d.get("classifications"))
        assert n_classified == progress.crops
        coco = json.loads((await stub.Export(pb.ExportRequest(project_id="md_loop",
                                                              format=pb.EXPORT_FORMAT_COCO_CAMERA_TRAPS))).content)
        assert sum(1 for a in coco["annotations"] if a.get("human")) == 12
        csv_text = (await stub.Export(pb.ExportRequest(project_id="md_loop", format=pb.EXPORT_FORMAT_CSV))).content
        assert csv_text.decode().count("\n") >= 1 + 16


@needs("embedder", "selector", "trainer", "orchestrator")
async def test_killed_mid_loop_no_label_is_lost_and_resubmitting_is_idempotent(stack):
    channel, stub = await stub_for(stack)
    async with channel:
        await stub.CreateProject(pb.CreateProjectRequest(project_id="md_kill", settings=pb.ProjectSettings(
            seed_labels=2, batch_size=3, finetune_every=-1, allow_new_classes=True, detection_threshold=0.1)))
        md = stack.frames / "cct_sample" / "megadetector.json"
        await wait_job(stub, (await stub.StartIngest(pb.StartIngestRequest(
            project_id="md_kill", megadetector_json_uri=str(md)))).job.id)
        first = await stub.NextBatch(pb.NextBatchRequest(project_id="md_kill", labeller="ana"))
        labels = [pb.CropLabel(crop_id=i.crop_id, label=["a", "b"][n % 2]) for n, i in enumerate(first.items)]
        await stub.SubmitLabels(pb.SubmitLabelsRequest(project_id="md_kill", batch_id=first.batch_id,
                                                       labeller="ana", labels=labels))
        second = await stub.NextBatch(pb.NextBatchRequest(project_id="md_kill", labeller="ana"))
        labels2 = [pb.CropLabel(crop_id=i.crop_id, label=["b", "a"][n % 2]) for n, i in enumerate(second.items)]
        call = asyncio.ensure_future(stub.SubmitLabels(pb.SubmitLabelsRequest(
            project_id="md_kill", batch_id=second.batch_id, labeller="ana", labels=labels2)))
        await asyncio.sleep(0.05)
    stack.kill_orchestrator()  # while the second round may be in flight
    with pytest.raises(BaseException):
        await call
    stack.start_orchestrator()
    await wait_serving(stack)
    channel, stub = await stub_for(stack)
    async with channel:
        progress = await stub.GetProgress(pb.GetProgressRequest(project_id="md_kill"))
        assert progress.labelled in (3, 6), "a half-stored round"
        again = await stub.SubmitLabels(pb.SubmitLabelsRequest(project_id="md_kill", batch_id=second.batch_id,
                                                               labeller="ana", labels=labels2))
        assert again.total_labels == 6 and again.accepted + again.unchanged == 3
        nxt = await stub.NextBatch(pb.NextBatchRequest(project_id="md_kill", labeller="ana", count=10))
        done = {i.crop_id for i in first.items} | {i.crop_id for i in second.items}
        assert not {i.crop_id for i in nxt.items} & done, "a labelled crop came back after the restart"
        results = (await stub.GetResults(pb.GetResultsRequest(project_id="md_kill"))).images
        crop_ids = [c.crop_id for r in results for c in r.crops]
        assert len(crop_ids) == len(set(crop_ids)) == progress.crops


@needs("detector", "embedder", "selector", "trainer", "orchestrator")
async def test_detector_ingest_of_coco_and_a_folder_survives_a_kill(stack):
    if stack.detector_failure:
        pytest.skip(f"the detector did not start: {stack.detector_failure}")
    channel, stub = await stub_for(stack)
    async with channel:
        await stub.CreateProject(pb.CreateProjectRequest(project_id="det", settings=pb.ProjectSettings(
            seed_labels=4, batch_size=4, finetune_every=-1, allow_new_classes=True)))
        coco = stack.frames / "cct_sample" / "coco_ct.json"
        job = await wait_job(stub, (await stub.StartIngest(pb.StartIngestRequest(
            project_id="det", coco_json_uri=str(coco)))).job.id)
        assert job.state == common_pb2.JOB_STATE_SUCCEEDED, job.error
        progress = await stub.GetProgress(pb.GetProgressRequest(project_id="det"))
        assert progress.images == 16 and progress.labelled == 0
        folder = stack.frames / "serengeti_fieldguide" / "images"
        total = len(list(folder.glob("*.jpg")))
        job = (await stub.StartIngest(pb.StartIngestRequest(project_id="det", folder_uri=str(folder)))).job
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            now = (await stub.GetJob(pb.GetJobRequest(job_id=job.id))).job
            if now.done >= 1 or now.state != common_pb2.JOB_STATE_RUNNING:
                break
            await asyncio.sleep(0.05)
    stack.kill_orchestrator()
    assert now.done < total, "the ingest ended before the kill, so the test would not show a resume"
    stack.start_orchestrator()
    await wait_serving(stack)
    channel, stub = await stub_for(stack)
    async with channel:
        job = await wait_job(stub, job.id)
        assert job.state == common_pb2.JOB_STATE_SUCCEEDED, job.error
        assert (job.done, job.total) == (total, total)
        progress = await stub.GetProgress(pb.GetProgressRequest(project_id="det"))
        assert progress.images == 16 + total
        results = []
        token = ""
        while True:
            page = await stub.GetResults(pb.GetResultsRequest(project_id="det", page_size=20, page_token=token))
            results += page.images
            token = page.next_page_token
            if not token:
                break
        assert len(results) == 16 + total and len({r.uri for r in results}) == len(results)
        crop_ids = [c.crop_id for r in results for c in r.crops]
        assert len(crop_ids) == len(set(crop_ids)) == progress.crops
        crops_dir = stack.local.data_dir / "orchestrator" / "crops" / "det"
        assert len(list(crops_dir.glob("*.jpg"))) == progress.crops, "a crop file was duplicated or lost"
        md_out = json.loads((await stub.Export(pb.ExportRequest(project_id="det",
                                                                format=pb.EXPORT_FORMAT_MEGADETECTOR))).content)
        assert check_megadetector(md_out) == []
        batch = await stub.NextBatch(pb.NextBatchRequest(project_id="det", labeller="ana"))
        assert len(batch.items) == min(4, progress.crops)
