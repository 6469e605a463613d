"""The embedder service on a real in-process gRPC server: Embed, ListModels, LoadModel and bad requests."""

from __future__ import annotations

import asyncio
import shutil

import grpc
import numpy as np
import pytest

from trapline.api.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from trapline.embedder.server import DEFAULT_VERSION, EmbedderApp, EmbedderSettings
from trapline.embedder.tensors import from_tensor
from trapline.runtime.testing import serve_app


def make_app(tmp_path, bundled_store, **kw) -> EmbedderApp:
    store = tmp_path / "models"
    if not store.exists():
        shutil.copytree(bundled_store.root, store)
    return EmbedderApp(EmbedderSettings(port=0, data_dir=tmp_path / "embedder", model_store=str(store),
                                        threads=2, **kw))


async def test_embed_returns_normalized_vectors_from_the_active_version(tmp_path, bundled_store, crop_jpegs):
    async with serve_app(make_app(tmp_path, bundled_store)) as channel:
        stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
        r = await stub.Embed(embedder_pb2.EmbedRequest(crops=crop_jpegs[:4]))
        v = from_tensor(r.vectors, "vectors")
        assert r.model_version == DEFAULT_VERSION and v.shape == (4, 256) and v.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
        models = (await stub.ListModels(embedder_pb2.ListModelsRequest())).models
        assert [(m.version, m.active, m.dimension, m.loss) for m in models] == [(DEFAULT_VERSION, True, 256, "triplet")]
        assert len(models[0].sha256) == 64 and models[0].uri.startswith("file://")


async def test_bad_requests_get_clear_statuses(tmp_path, bundled_store, crop_jpegs):
    async with serve_app(make_app(tmp_path, bundled_store, max_crops=8)) as channel:
        stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
        cases = [
            (embedder_pb2.EmbedRequest(), grpc.StatusCode.INVALID_ARGUMENT, "no crops"),
            (embedder_pb2.EmbedRequest(crops=[crop_jpegs[0], b"GIF89a-nope"]), grpc.StatusCode.INVALID_ARGUMENT,
             "crops[1]"),
            (embedder_pb2.EmbedRequest(crops=crop_jpegs[:1], model_version="v404"), grpc.StatusCode.NOT_FOUND, "v404"),
            (embedder_pb2.EmbedRequest(crops=crop_jpegs[:9]), grpc.StatusCode.RESOURCE_EXHAUSTED, "limit is 8"),
        ]
        for request, code, text in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Embed(request)
            assert err.value.code() == code and text in err.value.details(), err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.LoadModel(embedder_pb2.LoadModelRequest(version="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_embedding_during_a_model_switch_never_fails(tmp_path, bundled_store, crop_jpegs):
    store = tmp_path / "models"
    shutil.copytree(bundled_store.root, store)
    twin = store / "twin"
    shutil.copytree(store / DEFAULT_VERSION, twin)
    (twin / "manifest.json").write_text((twin / "manifest.json").read_text().replace(DEFAULT_VERSION, "twin"))
    async with serve_app(make_app(tmp_path, bundled_store)) as channel:
        stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
        calls = [stub.Embed(embedder_pb2.EmbedRequest(crops=crop_jpegs[:8])) for _ in range(4)]
        switch = stub.LoadModel(embedder_pb2.LoadModelRequest(version="twin"))
        results = await asyncio.gather(*calls, switch)
        assert {r.model_version for r in results[:4]} <= {DEFAULT_VERSION, "twin"}
        assert results[4].model.version == "twin" and results[4].providers
        after = await stub.Embed(embedder_pb2.EmbedRequest(crops=crop_jpegs[:1]))
        assert after.model_version == "twin"
        pinned = await stub.Embed(embedder_pb2.EmbedRequest(crops=crop_jpegs[:1], model_version=DEFAULT_VERSION))
        assert pinned.model_version == DEFAULT_VERSION, "a request may name a version other than the active one"
    # The choice survives a restart.
    async with serve_app(make_app(tmp_path, bundled_store)) as channel:
        r = await embedder_pb2_grpc.EmbedderServiceStub(channel).Embed(embedder_pb2.EmbedRequest(crops=crop_jpegs[:1]))
        assert r.model_version == "twin"
