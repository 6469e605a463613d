"""The orchestrator servicer on a real in-process gRPC server, with in-process stand-ins for the other four
services (see fakes.py): ingest of the real frames, the loop, exports, bad inputs, restarts.
End-to-end tests with every real service as its own process are in test_end_to_end.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from pathlib import Path

import grpc
import pytest

from trapline.api.common.v1 import common_pb2
from trapline.api.orchestrator.v1 import orchestrator_pb2 as pb
from trapline.api.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from trapline.orchestrator.db import Detection, ImageRecord
from trapline.orchestrator.formats import check_megadetector
from trapline.orchestrator.server import OrchestratorApp, OrchestratorSettings
from trapline.runtime.errors import Unavailable
from trapline.runtime.testing import running_server

from .fakes import fake_ports

FRAMES = Path(__file__).resolve().parents[1] / "data" / "frames"


@pytest.fixture
def frames(tmp_path):
    """A writable copy of two sample sets (so exports and a bad file can sit beside them)."""
    root = tmp_path / "frames"
    for name in ("cct_sample", "md_test_images"):
        shutil.copytree(FRAMES / name, root / name)
    return root


def make_app(tmp_path, frames, ports, **kw):
    settings = OrchestratorSettings(port=0, data_dir=tmp_path / "orch", image_roots=str(frames), detect_batch=4,
                                    embed_batch=8, queue_size=2, **kw)
    return OrchestratorApp(settings, ports=ports)


@contextlib.asynccontextmanager
async def serve(app):
    async with running_server(app) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield pb_grpc.OrchestratorServiceStub(channel)


async def wait_job(stub, job_id):
    last = None
    async for update in stub.WatchJob(pb.WatchJobRequest(job_id=job_id)):
        last = update.job
    return last


async def create(stub, pid="p", **settings):
    defaults = dict(seed_labels=4, batch_size=3, finetune_every=-1, classes=["coyote", "deer", "bird"])
    defaults.update(settings)
    await stub.CreateProject(pb.CreateProjectRequest(project_id=pid, settings=pb.ProjectSettings(**defaults)))


async def test_ingest_a_folder_twice_gives_each_image_once(tmp_path, frames):
    ports = fake_ports()
    async with serve(make_app(tmp_path, frames, ports)) as stub:
        await create(stub)
        folder = str(frames / "cct_sample" / "images")
        job = (await stub.StartIngest(pb.StartIngestRequest(project_id="p", folder_uri=folder))).job
        assert job.kind == "ingest" and job.total == 16
        job = await wait_job(stub, job.id)
        assert job.state == common_pb2.JOB_STATE_SUCCEEDED, job.error
        assert (job.done, job.total) == (16, 16)
        first = await stub.GetProgress(pb.GetProgressRequest(project_id="p"))
        assert first.images == 16 and 0 < first.empty_images < 16 and first.crops == 16 - first.empty_images
        assert first.embedding_version == "base-v1"
        again = await wait_job(stub, (await stub.StartIngest(pb.StartIngestRequest(project_id="p",
                                                                                  folder_uri=folder))).job.id)
        assert again.state == common_pb2.JOB_STATE_SUCCEEDED and again.total == 0
        second = await stub.GetProgress(pb.GetProgressRequest(project_id="p"))
        assert (second.images, second.crops) == (first.images, first.crops)
        assert ports["detector"].frames == 16, "an image already ingested was detected again"
        assert len(ports["selector"].points["p"]["base-v1"]) == first.crops
        results = (await stub.GetResults(pb.GetResultsRequest(project_id="p"))).images
        assert len(results) == 16
        for r in results:
            assert r.count == len(r.crops) and r.empty == (r.count == 0)
            assert r.count_bin == ("0" if r.count == 0 else "1-10")


async def test_megadetector_json_is_taken_as_given_without_the_detector(tmp_path, frames):
    ports = fake_ports()
    async with serve(make_app(tmp_path, frames, ports)) as stub:
        await create(stub, detection_threshold=0.5)
        md = frames / "md_test_images" / "megadetector.json"
        job = await wait_job(stub, (await stub.StartIngest(pb.StartIngestRequest(
            project_id="p", megadetector_json_uri=str(md)))).job.id)
        assert job.state == common_pb2.JOB_STATE_SUCCEEDED, job.error
        assert ports["detector"].frames == 0
        doc = json.loads(md.read_text())
        expected = sum(1 for im in doc["images"] for d in im["detections"] if d["category"] == "1" and d["conf"] >= 0.5)
        progress = await stub.GetProgress(pb.GetProgressRequest(project_id="p"))
        assert progress.images == len(doc["images"]) and progress.crops == expected
        crop_files = list((tmp_path / "orch" / "crops" / "p").glob("*.jpg"))
        assert len(crop_files) == expected
        from PIL import Image
        with Image.open(crop_files[0]) as im:
            assert im.size == (256, 256)
        exported = json.loads((await stub.Export(pb.ExportRequest(
            project_id="p", format=pb.EXPORT_FORMAT_MEGADETECTOR))).content)
        assert check_megadetector(exported) == []
        assert [im["file"] for im in exported["images"]] == [im["file"] for im in doc["images"]]


async def test_coco_ingest_keeps_metadata_and_never_shows_labels(tmp_path, frames):
    ports = fake_ports()
    async with serve(make_app(tmp_path, frames, ports)) as stub:
        await create(stub)
        coco = frames / "cct_sample" / "coco_ct.json"
        job = await wait_job(stub, (await stub.StartIngest(pb.StartIngestRequest(
            project_id="p", coco_json_uri=str(coco)))).job.id)
        assert job.state == common_pb2.JOB_STATE_SUCCEEDED, job.error
        progress = await stub.GetProgress(pb.GetProgressRequest(project_id="p"))
        assert progress.labelled == 0 and progress.images == 16
        out = json.loads((await stub.Export(pb.ExportRequest(project_id="p",
                                                             format=pb.EXPORT_FORMAT_COCO_CAMERA_TRAPS))).content)
        src = {im["id"]: im for im in json.loads(coco.read_text())["images"]}
        assert {im["id"] for im in out["images"]} == set(src)
        for im in out["images"]:
            assert im == src[im["id"]]
        assert all(a.get("human") is False for a in out["annotations"])


async def label_for(crop_id: str) -> str:
    return ["coyote", "deer"][hash(crop_id) % 2]


async def test_the_loop_seeds_randomly_then_uses_the_strategy_and_fine_tunes(tmp_path, frames):
    ports = fake_ports()
    async with serve(make_app(tmp_path, frames, ports)) as stub:
        await create(stub, finetune_every=6, strategy=pb.STRATEGY_MARGIN)
        await wait_job(stub, (await stub.StartIngest(pb.StartIngestRequest(
            project_id="p", folder_uri=str(frames / "cct_sample" / "images")))).job.id)
        seen: set[str] = set()
        strategies, versions = [], []
        finetune_job = ""
        for round_ in range(3):
            batch = await stub.NextBatch(pb.NextBatchRequest(project_id="p", labeller="ana", include_crops=True))
            assert len(batch.items) == 3 and batch.batch_id
            assert all(item.crop_jpeg[:2] == b"\xff\xd8" for item in batch.items)
            strategies.append(batch.strategy)
            ids = [item.crop_id for item in batch.items]
            assert not seen & set(ids), "a labelled crop was handed out again"
            seen |= set(ids)
            labels = [pb.CropLabel(crop_id=i, label=["coyote", "deer"][n % 2]) for n, i in enumerate(ids)]
            reply = await stub.SubmitLabels(pb.SubmitLabelsRequest(project_id="p", batch_id=batch.batch_id,
                                                                   labeller="ana", labels=labels))
            assert (reply.accepted, reply.unchanged, reply.corrected) == (3, 0, 0)
            assert reply.total_labels == 3 * (round_ + 1)
            versions.append(reply.classifier_version)
            finetune_job = finetune_job or reply.finetune_job_id
        assert strategies == ["random", "random", "margin"]
        assert all(versions) and len(set(versions)) == 3, "the classifier must be retrained after every batch"
        assert finetune_job, "6 labels with finetune_every=6 must start a fine-tune"
        job = await wait_job(stub, finetune_job)
        assert job.state == common_pb2.JOB_STATE_SUCCEEDED, job.error
        assert job.result["model_version"] == "ft-1"
        progress = await stub.GetProgress(pb.GetProgressRequest(project_id="p"))
        assert progress.embedding_version == "ft-1" and progress.rounds == 3 and progress.labelled == 9
        assert ports["selector"].active["p"] == "ft-1"
        assert ports["embedder"].active == "ft-1"
        assert len(ports["trainer"].finetunes[0]) == 6
        batch = await stub.NextBatch(pb.NextBatchRequest(project_id="p", labeller="ana"))
        assert batch.items and not seen & {i.crop_id for i in batch.items}
        results = (await stub.GetResults(pb.GetResultsRequest(project_id="p", page_size=5))).images
        assert len(results) <= 5
        human = [c for page in [results] for r in page for c in r.crops if c.human]
        assert all(c.confidence == 1.0 for c in human)


async def test_two_labellers_never_share_a_crop_and_abandoned_batches_are_released(tmp_path, frames):
    ports = fake_ports()
    async with serve(make_app(tmp_path, frames, ports)) as stub:
        await create(stub, batch_size=4)
        await wait_job(stub, (await stub.StartIngest(pb.StartIngestRequest(
            project_id="p", folder_uri=str(frames / "cct_sample" / "images")))).job.id)
        a, b = await asyncio.gather(stub.NextBatch(pb.NextBatchRequest(project_id="p", labeller="ana")),
                                    stub.NextBatch(pb.NextBatchRequest(project_id="p", labeller="ben")))
        ids_a, ids_b = {i.crop_id for i in a.items}, {i.crop_id for i in b.items}
        assert len(ids_a) == len(ids_b) == 4 and not ids_a & ids_b
        c = await stub.NextBatch(pb.NextBatchRequest(project_id="p", labeller="cat", count=50))
        assert not {i.crop_id for i in c.items} & (ids_a | ids_b)


async def test_bad_inputs_get_clear_status_codes(tmp_path, frames):
    ports = fake_ports()
    async with serve(make_app(tmp_path, frames, ports)) as stub:
        await create(stub)
        await wait_job(stub, (await stub.StartIngest(pb.StartIngestRequest(
            project_id="p", folder_uri=str(frames / "cct_sample" / "images")))).job.id)
        batch = await stub.NextBatch(pb.NextBatchRequest(project_id="p", labeller="ana"))
        crop = batch.items[0].crop_id

        async def code(call):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            return err.value.code(), err.value.details()

        submit = lambda labels, **kw: stub.SubmitLabels(pb.SubmitLabelsRequest(  # noqa: E731
            project_id="p", labeller="ana", labels=[pb.CropLabel(crop_id=c, label=lb) for c, lb in labels], **kw))
        assert (await code(submit([("no-such-crop", "deer")])))[0] == grpc.StatusCode.NOT_FOUND
        status, details = await code(submit([(crop, "unicorn")]))
        assert status == grpc.StatusCode.INVALID_ARGUMENT and "coyote" in details and "unicorn" in details
        assert (await code(submit([])))[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert (await code(submit([(crop, "deer")], batch_id="b-nope")))[0] == grpc.StatusCode.NOT_FOUND
        first = await submit([(crop, "deer")])
        repeat = await submit([(crop, "deer")])
        change = await submit([(crop, "coyote")])
        assert (first.accepted, repeat.unchanged, change.corrected) == (1, 1, 1) and change.total_labels == 1
        assert (await code(stub.CreateProject(pb.CreateProjectRequest(project_id="Bad Id"))))[0] == \
            grpc.StatusCode.INVALID_ARGUMENT
        assert (await code(stub.CreateProject(pb.CreateProjectRequest(project_id="p"))))[0] == \
            grpc.StatusCode.ALREADY_EXISTS
        assert (await code(stub.GetProgress(pb.GetProgressRequest(project_id="nope"))))[0] == grpc.StatusCode.NOT_FOUND
        assert (await code(stub.StartIngest(pb.StartIngestRequest(project_id="p", folder_uri="/etc"))))[0] == \
            grpc.StatusCode.PERMISSION_DENIED
        assert (await code(stub.StartIngest(pb.StartIngestRequest(project_id="p"))))[0] == \
            grpc.StatusCode.INVALID_ARGUMENT
        assert (await code(stub.Export(pb.ExportRequest(project_id="p"))))[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert (await code(stub.Export(pb.ExportRequest(project_id="p", format=pb.EXPORT_FORMAT_CSV,
                                                        destination_uri="/tmp/x.csv"))))[0] == \
            grpc.StatusCode.PERMISSION_DENIED
        assert (await code(stub.GetJob(pb.GetJobRequest(job_id="nope"))))[0] == grpc.StatusCode.NOT_FOUND


async def test_new_classes_are_added_when_allowed(tmp_path, frames):
    async with serve(make_app(tmp_path, frames, fake_ports())) as stub:
        await create(stub, allow_new_classes=True, classes=[])
        await wait_job(stub, (await stub.StartIngest(pb.StartIngestRequest(
            project_id="p", folder_uri=str(frames / "cct_sample" / "images")))).job.id)
        batch = await stub.NextBatch(pb.NextBatchRequest(project_id="p", labeller="ana"))
        await stub.SubmitLabels(pb.SubmitLabelsRequest(project_id="p", labeller="ana", labels=[
            pb.CropLabel(crop_id=batch.items[0].crop_id, label="wombat")]))
        assert "wombat" in (await stub.GetProgress(pb.GetProgressRequest(project_id="p"))).classes


async def test_an_unreadable_frame_is_a_per_image_failure(tmp_path, frames):
    (frames / "cct_sample" / "images" / "broken.jpg").write_bytes(b"\xff\xd8not a jpeg")
    async with serve(make_app(tmp_path, frames, fake_ports())) as stub:
        await create(stub)
        job = await wait_job(stub, (await stub.StartIngest(pb.StartIngestRequest(
            project_id="p", folder_uri=str(frames / "cct_sample" / "images")))).job.id)
        assert job.state == common_pb2.JOB_STATE_SUCCEEDED and job.metrics["failures"] == 1
        results = (await stub.GetResults(pb.GetResultsRequest(project_id="p"))).images
        assert [r.failure != "" for r in results].count(True) == 1
        csv_text = (await stub.Export(pb.ExportRequest(project_id="p", format=pb.EXPORT_FORMAT_CSV))).content.decode()
        assert "broken.jpg" in csv_text
        out = frames / "exports" / "p.json"
        reply = await stub.Export(pb.ExportRequest(project_id="p", format=pb.EXPORT_FORMAT_MEGADETECTOR,
                                                   destination_uri=str(out)))
        assert reply.uri.startswith("file://") and check_megadetector(json.loads(out.read_text())) == []


async def test_killed_mid_ingest_the_job_resumes_without_losing_or_duplicating(tmp_path, frames):
    ports = fake_ports()
    ports["detector"].delay = 0.3
    folder = str(frames / "cct_sample" / "images")
    async with serve(make_app(tmp_path, frames, ports)) as stub:
        await create(stub)
        job = (await stub.StartIngest(pb.StartIngestRequest(project_id="p", folder_uri=folder))).job
        for _ in range(100):
            now = (await stub.GetJob(pb.GetJobRequest(job_id=job.id))).job
            if now.done >= 4:
                break
            await asyncio.sleep(0.05)
        assert 0 < now.done < 16, "the test needs to stop the server mid-ingest"
    # The server stopped with the job unfinished (as after a kill); a new one resumes it at start.
    ports["detector"].delay = 0.0
    async with serve(make_app(tmp_path, frames, ports)) as stub:
        job = await wait_job(stub, job.id)
        assert job.state == common_pb2.JOB_STATE_SUCCEEDED, job.error
        assert (job.done, job.total) == (16, 16)
        progress = await stub.GetProgress(pb.GetProgressRequest(project_id="p"))
        assert progress.images == 16
        crop_files = list((tmp_path / "orch" / "crops" / "p").glob("*.jpg"))
        assert len(crop_files) == progress.crops
        assert len(ports["selector"].points["p"]["base-v1"]) == progress.crops
        assert ports["detector"].frames <= 16 + 4 * 2, "resume re-detected more than the in-flight batches"


async def test_labels_survive_a_service_outage_and_a_restart(tmp_path, frames):
    ports = fake_ports()
    async with serve(make_app(tmp_path, frames, ports)) as stub:
        await create(stub)
        await wait_job(stub, (await stub.StartIngest(pb.StartIngestRequest(
            project_id="p", folder_uri=str(frames / "cct_sample" / "images")))).job.id)
        batch = await stub.NextBatch(pb.NextBatchRequest(project_id="p", labeller="ana"))
        original = ports["selector"].set_labels

        async def down(*a, **kw):
            raise Unavailable("the selector at test is unavailable")

        ports["selector"].set_labels = down
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SubmitLabels(pb.SubmitLabelsRequest(
                project_id="p", labeller="ana", batch_id=batch.batch_id,
                labels=[pb.CropLabel(crop_id=i.crop_id, label="deer") for i in batch.items]))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        ports["selector"].set_labels = original
    async with serve(make_app(tmp_path, frames, ports)) as stub:
        progress = await stub.GetProgress(pb.GetProgressRequest(project_id="p"))
        assert progress.labelled == 3, "labels stored before the outage were lost"
        nxt = await stub.NextBatch(pb.NextBatchRequest(project_id="p", labeller="ana", count=20))
        assert not {i.crop_id for i in nxt.items} & {i.crop_id for i in batch.items}
        assert set(ports["selector"].labels["p"]) == {i.crop_id for i in batch.items}


async def test_background_retraining_answers_at_once_and_prediction_strategies_wait_for_it(tmp_path, frames):
    ports = fake_ports()
    trainer = ports["trainer"]
    original = trainer.train

    async def slow_train(*a, **kw):
        await asyncio.sleep(0.5)
        return await original(*a, **kw)

    trainer.train = slow_train
    async with serve(make_app(tmp_path, frames, ports)) as stub:
        await create(stub, seed_labels=2, batch_size=2, strategy=pb.STRATEGY_MARGIN)
        await wait_job(stub, (await stub.StartIngest(pb.StartIngestRequest(
            project_id="p", folder_uri=str(frames / "cct_sample" / "images")))).job.id)
        batch = await stub.NextBatch(pb.NextBatchRequest(project_id="p", labeller="ana"))
        reply = await stub.SubmitLabels(pb.SubmitLabelsRequest(
            project_id="p", labeller="ana", batch_id=batch.batch_id, retrain_in_background=True,
            labels=[pb.CropLabel(crop_id=i.crop_id, label=lb) for i, lb in zip(batch.items, ["deer", "coyote"])]))
        assert reply.accepted == 2 and reply.classifier_version == ""
        assert set(ports["selector"].labels["p"]) == {i.crop_id for i in batch.items}, \
            "the selector must know the labels before the answer"
        assert (await stub.GetProgress(pb.GetProgressRequest(project_id="p"))).classifier_version == ""
        nxt = await stub.NextBatch(pb.NextBatchRequest(project_id="p", labeller="ana"))
        assert nxt.strategy == "margin" and all(i.predicted_label for i in nxt.items), \
            "a margin batch must wait for the background classifier"
        assert trainer.trained == 1


async def test_a_csv_export_ingests_back_into_the_same_images_and_crops(tmp_path, frames):
    ports = fake_ports()
    async with serve(make_app(tmp_path, frames, ports)) as stub:
        await create(stub, detection_threshold=0.5)
        await wait_job(stub, (await stub.StartIngest(pb.StartIngestRequest(
            project_id="p", megadetector_json_uri=str(frames / "md_test_images" / "megadetector.json")))).job.id)
        csv_path = frames / "md_test_images" / "export.csv"
        await stub.Export(pb.ExportRequest(project_id="p", format=pb.EXPORT_FORMAT_CSV, destination_uri=str(csv_path)))
        await create(stub, pid="again", detection_threshold=0.5)
        job = await wait_job(stub, (await stub.StartIngest(pb.StartIngestRequest(
            project_id="again", csv_uri=str(csv_path)))).job.id)
        assert job.state == common_pb2.JOB_STATE_SUCCEEDED, job.error
        a = await stub.GetProgress(pb.GetProgressRequest(project_id="p"))
        b = await stub.GetProgress(pb.GetProgressRequest(project_id="again"))
        assert (a.images, a.crops, a.empty_images) == (b.images, b.crops, b.empty_images)
        assert ports["detector"].frames == 0
        ra = (await stub.GetResults(pb.GetResultsRequest(project_id="p"))).images
        rb = (await stub.GetResults(pb.GetResultsRequest(project_id="again"))).images
        assert [r.uri for r in ra] == [r.uri for r in rb]
        for x, y in zip(ra, rb):
            assert [round(c.bbox.x_min, 4) for c in x.crops] == [round(c.bbox.x_min, 4) for c in y.crops]


async def test_serving_without_the_other_services_and_unavailable_names_the_missing_one(tmp_path, frames):
    settings = OrchestratorSettings(port=0, data_dir=tmp_path / "orch", image_roots=str(frames),
                                    selector_address="127.0.0.1:1", trainer_address="127.0.0.1:1",
                                    embedder_address="127.0.0.1:1", detector_address="127.0.0.1:1",
                                    call_timeout_seconds=5)
    app = OrchestratorApp(settings)
    async with serve(app) as stub:
        await create(stub)
        assert (await stub.GetProgress(pb.GetProgressRequest(project_id="p"))).images == 0
        # one finished image with a crop, as an earlier ingest would have left it
        app.db.add_images("p", "j", [ImageRecord(key="a.jpg", uri="a.jpg", file="a.jpg")])
        image = app.db.images("p")[0]["id"]
        app.db.record_detections(image, 10, 10, [Detection("1", 1.0, (0, 0, 1, 1))], {0: "file:///x.jpg"}, "p", 0.9, "d")
        app.db.set_image_status([image], "done")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.NextBatch(pb.NextBatchRequest(project_id="p", labeller="ana"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "selector" in err.value.details()


async def test_ingest_stages_overlap(tmp_path, frames):
    """While the detector works on one batch of frames, the embedder works on crops of an earlier one."""
    ports = fake_ports()
    active: set[str] = set()
    overlapped = []

    def instrument(name, port, method):
        original = getattr(port, method)

        async def wrapped(*a, **kw):
            active.add(name)
            overlapped.append(set(active))
            try:
                await asyncio.sleep(0.05)
                return await original(*a, **kw)
            finally:
                active.discard(name)

        setattr(port, method, wrapped)

    instrument("detect", ports["detector"], "detect")
    instrument("embed", ports["embedder"], "embed")
    async with serve(make_app(tmp_path, frames, ports)) as stub:
        await create(stub)
        job = await wait_job(stub, (await stub.StartIngest(pb.StartIngestRequest(
            project_id="p", folder_uri=str(frames / "cct_sample" / "images")))).job.id)
        assert job.state == common_pb2.JOB_STATE_SUCCEEDED
    assert any({"detect", "embed"} <= s for s in overlapped), "detection and embedding never ran at the same time"


async def test_next_batch_shrinks_to_what_is_left_and_is_empty_when_all_is_labelled(tmp_path, frames):
    async with serve(make_app(tmp_path, frames, fake_ports())) as stub:
        await create(stub, batch_size=100)
        await wait_job(stub, (await stub.StartIngest(pb.StartIngestRequest(
            project_id="p", folder_uri=str(frames / "cct_sample" / "images")))).job.id)
        crops = (await stub.GetProgress(pb.GetProgressRequest(project_id="p"))).crops
        batch = await stub.NextBatch(pb.NextBatchRequest(project_id="p", labeller="ana"))
        assert len(batch.items) == crops
        other = await stub.NextBatch(pb.NextBatchRequest(project_id="p", labeller="ben"))
        assert not other.items and not other.batch_id, "everything is in ana's open batch"
        await stub.SubmitLabels(pb.SubmitLabelsRequest(project_id="p", labeller="ana", batch_id=batch.batch_id, labels=[
            pb.CropLabel(crop_id=i.crop_id, label=["deer", "coyote"][n % 2]) for n, i in enumerate(batch.items)]))
        done = await stub.NextBatch(pb.NextBatchRequest(project_id="p", labeller="ana"))
        assert not done.items
        assert (await stub.GetProgress(pb.GetProgressRequest(project_id="p"))).rounds == 1


async def test_a_fine_tune_interrupted_by_a_restart_resumes_and_switches(tmp_path, frames):
    ports = fake_ports()
    trainer = ports["trainer"]
    release = asyncio.Event()
    finished = trainer.job

    async def job(job_id):
        if not release.is_set():
            from trapline.orchestrator.ports import TrainerJob
            return TrainerJob(job_id, "RUNNING", 0, 5)
        return await finished(job_id)

    trainer.job = job
    async with serve(make_app(tmp_path, frames, ports)) as stub:
        await create(stub, seed_labels=2, batch_size=3, finetune_every=3)
        await wait_job(stub, (await stub.StartIngest(pb.StartIngestRequest(
            project_id="p", folder_uri=str(frames / "cct_sample" / "images")))).job.id)
        batch = await stub.NextBatch(pb.NextBatchRequest(project_id="p", labeller="ana"))
        reply = await stub.SubmitLabels(pb.SubmitLabelsRequest(project_id="p", labeller="ana", batch_id=batch.batch_id,
                                                               labels=[pb.CropLabel(crop_id=i.crop_id, label=lb) for i, lb
                                                                       in zip(batch.items, ["deer", "coyote", "deer"])]))
        assert reply.finetune_job_id
        await asyncio.sleep(0.3)
        running = (await stub.GetJob(pb.GetJobRequest(job_id=reply.finetune_job_id))).job
        assert running.state == common_pb2.JOB_STATE_RUNNING
    release.set()
    async with serve(make_app(tmp_path, frames, ports)) as stub:
        job = await wait_job(stub, reply.finetune_job_id)
        assert job.state == common_pb2.JOB_STATE_SUCCEEDED, job.error
        assert len(trainer.finetunes) == 1, "the restart must resume the trainer's job, not start another"
        progress = await stub.GetProgress(pb.GetProgressRequest(project_id="p"))
        assert progress.embedding_version == "ft-1" and job.metrics["reembedded"] == progress.crops
    import sqlite3

    with sqlite3.connect(tmp_path / "orch" / "orchestrator.db") as conn:
        versions = {r[0] for r in conn.execute("SELECT DISTINCT version FROM vectors")}
    assert versions == {"ft-1"}, "vectors of the old embedding are kept after the switch"


async def test_ingest_a_uri_list_inside_the_roots_only(tmp_path, frames):
    images = sorted((frames / "cct_sample" / "images").glob("*.jpg"))[:3]
    async with serve(make_app(tmp_path, frames, fake_ports())) as stub:
        await create(stub)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.StartIngest(pb.StartIngestRequest(project_id="p", uris=pb.UriList(
                uris=[str(images[0]), "/etc/passwd"])))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "uris.uris[1]" in err.value.details()
        job = await wait_job(stub, (await stub.StartIngest(pb.StartIngestRequest(project_id="p", uris=pb.UriList(
            uris=[images[0].as_uri(), str(images[1]), str(images[2]), str(images[2])])))).job.id)
        assert job.state == common_pb2.JOB_STATE_SUCCEEDED and job.total == 3
        assert (await stub.GetProgress(pb.GetProgressRequest(project_id="p"))).images == 3
