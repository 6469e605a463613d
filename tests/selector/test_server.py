"""The selector through its gRPC API on a real in-process server (port 0), on every store backend."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2

from trapline.api.common.v1 import common_pb2
from trapline.api.selector.v1 import selector_pb2 as pb
from trapline.api.selector.v1 import selector_pb2_grpc
from trapline.runtime.interceptors import STATUS_DETAILS_KEY
from trapline.runtime.testing import serve_app
from trapline.selector.kcenter import reference_kcenter
from trapline.selector.server import SelectorApp, SelectorSettings

from .conftest import embedding_like, probabilities

N, DIM = 300, 256
CLASSES = ["zebra", "wildebeest", "gazelle", "lion"]


def tensor(a: np.ndarray) -> common_pb2.Tensor:
    a = np.ascontiguousarray(a, dtype="<f4")
    return common_pb2.Tensor(dtype=common_pb2.D_TYPE_FLOAT32, shape=list(a.shape), data=a.tobytes())


def points(x: np.ndarray, start: int = 0) -> list[pb.Point]:
    return [pb.Point(id=f"crop-{start + i}", vector=tensor(v), image_id=f"img-{(start + i) // 2}",
                     location=["north", "south"][(start + i) % 2], sequence_id=f"seq-{(start + i) // 3}")
            for i, v in enumerate(x)]


def app(tmp_path, backend) -> SelectorApp:
    return SelectorApp(SelectorSettings(port=0, data_dir=tmp_path / "selector", store=backend))


async def call_error(coro) -> tuple[grpc.StatusCode, str, str]:
    """(code, message, field named in the rich details or '')."""
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await coro
    field = ""
    for key, value in e.value.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
            for d in status.details:
                bad = error_details_pb2.BadRequest()
                if d.Unpack(bad):
                    field = bad.field_violations[0].field
    return e.value.code(), e.value.details(), field


async def test_select_loop_through_the_api_and_restart(tmp_path, backend):
    x = embedding_like(N, DIM, seed=21)
    async with serve_app(app(tmp_path, backend)) as channel:
        stub = selector_pb2_grpc.SelectorServiceStub(channel)
        r = await stub.Upsert(pb.UpsertRequest(project="mara", points=points(x)))
        assert r.upserted == N
        await stub.SetLabels(pb.SetLabelsRequest(project="mara", labels=[
            pb.Label(id=f"crop-{i}", label=CLASSES[i % 4]) for i in range(0, 30, 3)]))
        sel = await stub.Select(pb.SelectRequest(project="mara", strategy="kcenter", count=12))
        lab = np.zeros(N, bool)
        lab[list(range(0, 30, 3))] = True
        ref, ref_scores = reference_kcenter(x, lab, 12)
        assert [s.id for s in sel.selected] == [f"crop-{i}" for i in ref]
        np.testing.assert_allclose([s.score for s in sel.selected], ref_scores, rtol=1e-9)
        assert sel.embedding_version == "default"
        p = probabilities(N, 4, seed=2)
        await stub.SetPredictions(pb.SetPredictionsRequest(
            project="mara", ids=[f"crop-{i}" for i in range(N)], classes=CLASSES, probabilities=tensor(p)))
        margin_sel = await stub.Select(pb.SelectRequest(project="mara", strategy="margin", count=5,
                                                        filter=pb.SelectFilter(locations=["south"])))
        assert all(int(s.id.split("-")[1]) % 2 == 1 for s in margin_sel.selected)
        stats = await stub.GetStats(pb.GetStatsRequest(project="mara"))
        assert (stats.points, stats.labelled, stats.predicted, stats.dimension, stats.backend) == \
            (N, 10, N, DIM, backend)

    async with serve_app(app(tmp_path, backend)) as channel:  # restart on the same data
        stub = selector_pb2_grpc.SelectorServiceStub(channel)
        assert await stub.GetStats(pb.GetStatsRequest(project="mara")) == stats
        again = await stub.Select(pb.SelectRequest(project="mara", strategy="margin", count=5,
                                                   filter=pb.SelectFilter(locations=["south"])))
        assert [s.id for s in again.selected] == [s.id for s in margin_sel.selected]


async def test_switch_embedding_through_the_api(tmp_path, backend):
    async with serve_app(app(tmp_path, backend)) as channel:
        stub = selector_pb2_grpc.SelectorServiceStub(channel)
        await stub.Upsert(pb.UpsertRequest(project="mara", embedding_version="m1",
                                           points=points(embedding_like(50, DIM, seed=1))))
        await stub.SetLabels(pb.SetLabelsRequest(project="mara", labels=[pb.Label(id="crop-3", label="lion")]))
        await stub.Upsert(pb.UpsertRequest(project="mara", embedding_version="m2",
                                           points=points(embedding_like(50, DIM, seed=2))))
        r = await stub.SwitchEmbedding(pb.SwitchEmbeddingRequest(project="mara", embedding_version="m2"))
        assert (r.previous_version, r.embedding_version) == ("m1", "m2")
        stats = await stub.GetStats(pb.GetStatsRequest(project="mara"))
        assert stats.embedding_version == "m2" and stats.labelled == 1
        sel = await stub.Select(pb.SelectRequest(project="mara", strategy="kcenter", count=49))
        assert "crop-3" not in {s.id for s in sel.selected} and sel.embedding_version == "m2"


async def test_bad_requests_get_clear_statuses_naming_the_field(tmp_path, backend):
    async with serve_app(app(tmp_path, backend)) as channel:
        stub = selector_pb2_grpc.SelectorServiceStub(channel)
        x = embedding_like(20, DIM, seed=3)
        await stub.Upsert(pb.UpsertRequest(project="mara", points=points(x)))
        nan_rows = x[:3].copy()
        nan_rows[1, 7] = np.nan
        cases = [
            (stub.Upsert(pb.UpsertRequest(project="mara", points=points(x[:, :128], 100))),
             grpc.StatusCode.INVALID_ARGUMENT, "points[0].vector"),
            (stub.Upsert(pb.UpsertRequest(project="mara", points=points(x[:2], 100) + points(x[:1, :100], 102))),
             grpc.StatusCode.INVALID_ARGUMENT, "points[2].vector"),
            (stub.Upsert(pb.UpsertRequest(project="mara", points=points(nan_rows, 100))),
             grpc.StatusCode.INVALID_ARGUMENT, "points[1].vector"),
            (stub.SetLabels(pb.SetLabelsRequest(project="mara", labels=[pb.Label(id="crop-1", label="lion"),
                                                                        pb.Label(id="ghost", label="lion")])),
             grpc.StatusCode.NOT_FOUND, "labels[1].id"),
            (stub.Select(pb.SelectRequest(project="mara", strategy="k-centre", count=3)),
             grpc.StatusCode.INVALID_ARGUMENT, "strategy"),
            (stub.Select(pb.SelectRequest(project="mara", strategy="kcenter", count=21)),
             grpc.StatusCode.INVALID_ARGUMENT, "count"),
            (stub.Select(pb.SelectRequest(project="mara", strategy="entropy", count=3)),
             grpc.StatusCode.FAILED_PRECONDITION, "strategy"),
            (stub.SetPredictions(pb.SetPredictionsRequest(project="mara", ids=["crop-1"], classes=["a", "b"],
                                                          probabilities=tensor(np.array([[0.2, 0.2]])))),
             grpc.StatusCode.INVALID_ARGUMENT, "probabilities"),
            (stub.GetStats(pb.GetStatsRequest(project="nowhere")), grpc.StatusCode.NOT_FOUND, "project"),
            (stub.SwitchEmbedding(pb.SwitchEmbeddingRequest(project="mara", embedding_version="zzz")),
             grpc.StatusCode.NOT_FOUND, "embedding_version"),
        ]
        for coro, code, field in cases:
            got_code, message, got_field = await call_error(coro)
            assert got_code == code, f"{field}: expected {code}, got {got_code} ({message})"
            assert message.startswith(f"{field}:"), f"the message should name {field!r}: {message!r}"
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                assert got_field == field
        stats = await stub.GetStats(pb.GetStatsRequest(project="mara"))
        assert (stats.points, stats.labelled, stats.predicted) == (20, 0, 0), "nothing was written half-way"


def test_settings_use_a_qdrant_server_when_qdrant_url_is_set(monkeypatch, tmp_path):
    monkeypatch.delenv("QDRANT_URL", raising=False)
    assert SelectorSettings(data_dir=tmp_path).backend() == "edge"
    monkeypatch.setenv("QDRANT_URL", "http://qdrant:6333")
    monkeypatch.setenv("QDRANT_API_KEY", "secret")
    s = SelectorSettings(data_dir=tmp_path)
    assert s.backend() == "remote" and s.qdrant_api_key == "secret" and "secret" not in repr(s)


async def test_unreachable_qdrant_server_fails_startup_with_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("QDRANT_URL", "http://127.0.0.1:9")
    app = SelectorApp(SelectorSettings(port=0, data_dir=tmp_path, connect_seconds=0))
    with pytest.raises(RuntimeError, match=r"cannot use the Qdrant server at http://127.0.0.1:9"):
        await app.startup()
    await app.shutdown()
