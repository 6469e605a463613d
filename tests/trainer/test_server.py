"""The trainer service on a real in-process gRPC server, and a fine-tune that the embedder then loads."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from trapline.api.common.v1 import common_pb2
from trapline.api.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from trapline.api.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from trapline.embedder.server import DEFAULT_VERSION, EmbedderApp, EmbedderSettings
from trapline.embedder.tensors import from_tensor, to_tensor
from trapline.runtime.testing import serve_app
from trapline.trainer.server import TrainerApp, TrainerSettings

from .conftest import few_crops


def trainer_app(tmp_path, store, **kw) -> TrainerApp:
    return TrainerApp(TrainerSettings(port=0, data_dir=tmp_path / "trainer", model_store=str(store.root), threads=2,
                                      train_blocks=1, **kw))


async def test_train_classifier_then_predict(tmp_path, store):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 32)).astype(np.float32)
    y = np.repeat([0, 1, 2], 40)
    x = centers[y] + 0.3 * rng.normal(size=(120, 32)).astype(np.float32)
    names = np.array(["lion", "zebra", "gnu"])[y].tolist()
    async with serve_app(trainer_app(tmp_path, store)) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        r = await stub.TrainClassifier(trainer_pb2.TrainClassifierRequest(
            project="serengeti", vectors=to_tensor(x), labels=names, seed=1))
        assert r.classifier_version == "clf-0001" and list(r.classes) == ["gnu", "lion", "zebra"]
        assert r.metrics.accuracy > 0.9 and r.metrics.holdout_size == 24
        assert from_tensor(r.metrics.confusion, "c").shape == (3, 3) and set(r.metrics.per_class_recall) == set(names)
        p = await stub.Predict(trainer_pb2.PredictRequest(project="serengeti", vectors=to_tensor(x[:5])))
        probs = from_tensor(p.probabilities, "p")
        assert probs.shape == (5, 3) and p.classifier_version == "clf-0001"
        np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)

        bad = [
            (stub.TrainClassifier, trainer_pb2.TrainClassifierRequest(project="p", vectors=to_tensor(x), labels=["a"] * 120),
             grpc.StatusCode.INVALID_ARGUMENT, "two classes"),
            (stub.TrainClassifier, trainer_pb2.TrainClassifierRequest(
                project="p", vectors=common_pb2.Tensor(dtype=common_pb2.D_TYPE_FLOAT32, shape=[2, 4], data=b"x"),
                labels=["a", "b"]), grpc.StatusCode.INVALID_ARGUMENT, "vectors.data"),
            (stub.Predict, trainer_pb2.PredictRequest(project="nobody", vectors=to_tensor(x[:1])),
             grpc.StatusCode.NOT_FOUND, "TrainClassifier first"),
            (stub.Predict, trainer_pb2.PredictRequest(project="serengeti", vectors=to_tensor(x[:1, :8])),
             grpc.StatusCode.INVALID_ARGUMENT, "[n, 32]"),
        ]
        for call, request, code, text in bad:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(request)
            assert err.value.code() == code and text in err.value.details(), err.value.details()


def _labelled(crops):
    return [trainer_pb2.LabelledCrop(id=f"c{i}", jpeg=c.jpeg(), label=c.label) for i, c in enumerate(crops)]


async def test_fine_tune_job_end_to_end_then_the_embedder_loads_the_new_version(tmp_path, store, real_crops):
    crops = few_crops(real_crops, classes=3, per_class=2)
    async with serve_app(trainer_app(tmp_path, store)) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        started = await stub.StartFineTune(trainer_pb2.StartFineTuneRequest(
            project="serengeti", crops=_labelled(crops), epochs=1, seed=1, classes_per_batch=3, crops_per_class=2))
        job_id = started.job.id
        updates = [u.job async for u in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id))]
        final = updates[-1]
        assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
        assert any(u.state == common_pb2.JOB_STATE_RUNNING and "loss" in u.metrics for u in updates)
        assert final.done == final.total == 1 and final.unit == "epochs" and final.elapsed_seconds > 0
        version = final.result["model_version"]
        assert version == "ft-0001" and final.result["parent_version"] == DEFAULT_VERSION
        got = await stub.GetJob(trainer_pb2.GetJobRequest(job_id=job_id))
        assert got.job.state == common_pb2.JOB_STATE_SUCCEEDED
        # A request naming no base continues from the newest version: fine-tunes accumulate.
        again = (await stub.StartFineTune(trainer_pb2.StartFineTuneRequest(
            crops=_labelled(crops), epochs=1, classes_per_batch=3, crops_per_class=2))).job
        last = [u.job async for u in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=again.id))][-1]
        assert last.result["parent_version"] == "ft-0001" and last.result["model_version"] == "ft-0002"
    manifest = store.verify(version).manifest
    assert manifest["parent_version"] == DEFAULT_VERSION and manifest["training"]["loss"] == "triplet"
    assert manifest["metrics"]["onnx_parity_max_abs_diff"] < 1e-4

    app = EmbedderApp(EmbedderSettings(port=0, data_dir=tmp_path / "embedder", model_store=str(store.root)))
    async with serve_app(app) as channel:
        emb = embedder_pb2_grpc.EmbedderServiceStub(channel)
        loaded = await emb.LoadModel(embedder_pb2.LoadModelRequest(version=version))
        assert loaded.model.parent_version == DEFAULT_VERSION
        r = await emb.Embed(embedder_pb2.EmbedRequest(crops=[c.jpeg() for c in crops]))
        assert r.model_version == version
        v = from_tensor(r.vectors, "v")
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
        old = from_tensor((await emb.Embed(embedder_pb2.EmbedRequest(
            crops=[c.jpeg() for c in crops], model_version=DEFAULT_VERSION))).vectors, "v")
        assert not np.allclose(v, old), "the fine-tuned version must embed differently from its parent"


async def test_fine_tune_bad_requests_and_cancel(tmp_path, store, real_crops):
    crops = few_crops(real_crops, classes=3, per_class=3)
    async with serve_app(trainer_app(tmp_path, store)) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        one_class = [trainer_pb2.LabelledCrop(jpeg=c.jpeg(), label="zebra") for c in crops[:3]]
        one_each = _labelled(crops[::3])
        not_image = _labelled(crops[:6]) + [trainer_pb2.LabelledCrop(jpeg=b"%PDF-1.4", label=crops[0].label)]
        outside = [trainer_pb2.LabelledCrop(uri="/etc/hostname", label="a")] + _labelled(crops[:4])
        cases = [
            (trainer_pb2.StartFineTuneRequest(crops=one_class), grpc.StatusCode.INVALID_ARGUMENT, "two classes"),
            (trainer_pb2.StartFineTuneRequest(crops=one_each), grpc.StatusCode.INVALID_ARGUMENT, "two crops each"),
            (trainer_pb2.StartFineTuneRequest(crops=not_image), grpc.StatusCode.INVALID_ARGUMENT, "crops[6]"),
            (trainer_pb2.StartFineTuneRequest(crops=_labelled(crops), base_version="v404"),
             grpc.StatusCode.NOT_FOUND, "v404"),
            (trainer_pb2.StartFineTuneRequest(crops=outside), grpc.StatusCode.PERMISSION_DENIED, "crop roots"),
            (trainer_pb2.StartFineTuneRequest(), grpc.StatusCode.INVALID_ARGUMENT, "no crops"),
            (trainer_pb2.StartFineTuneRequest(resume_job_id="job-x"), grpc.StatusCode.NOT_FOUND, "job-x"),
        ]
        for request, code, text in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.StartFineTune(request)
            assert err.value.code() == code and text in err.value.details(), err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetJob(trainer_pb2.GetJobRequest(job_id="job-x"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        job = (await stub.StartFineTune(trainer_pb2.StartFineTuneRequest(
            crops=_labelled(crops), epochs=50, classes_per_batch=3, crops_per_class=2))).job
        await stub.CancelJob(trainer_pb2.CancelJobRequest(job_id=job.id))
        final = [u.job async for u in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.id))][-1]
        assert final.state == common_pb2.JOB_STATE_CANCELLED
        assert final.done < 50
        with pytest.raises(grpc.aio.AioRpcError) as err:  # only CANCELLED/FAILED jobs resume; this one is
            await stub.StartFineTune(trainer_pb2.StartFineTuneRequest(resume_job_id="job-none"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        resumed = (await stub.StartFineTune(trainer_pb2.StartFineTuneRequest(resume_job_id=job.id))).job
        assert resumed.state == common_pb2.JOB_STATE_QUEUED
        await stub.CancelJob(trainer_pb2.CancelJobRequest(job_id=job.id))
