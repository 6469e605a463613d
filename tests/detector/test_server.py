"""The detector service on a real in-process gRPC server (port 0): batches with bad images, URI roots,
options, streaming and model info. Uses the YOLOv5 fixture graph, whose output is known exactly."""

from __future__ import annotations

import io

import grpc
import pytest
from PIL import Image

from trapline.api.common.v1 import common_pb2
from trapline.api.detector.v1 import detector_pb2, detector_pb2_grpc
from trapline.detector.server import DetectorApp, DetectorSettings
from trapline.runtime.testing import serve_app


def app_for(model, roots, **kw) -> DetectorApp:
    return DetectorApp(DetectorSettings(port=0, model_path=model, image_roots=str(roots), threads=1, **kw))


def data_input(image_id: str, data: bytes) -> detector_pb2.ImageInput:
    return detector_pb2.ImageInput(image_id=image_id, source=common_pb2.ImageSource(data=data))


def uri_input(image_id: str, uri: str) -> detector_pb2.ImageInput:
    return detector_pb2.ImageInput(image_id=image_id, source=common_pb2.ImageSource(uri=uri))


async def test_bad_images_fail_alone_and_results_keep_request_order(yolo_model, frames, animal_jpeg, bad_inputs,
                                                                    odd_but_valid):
    roots = frames
    good_uri = f"file://{frames}/carpathia/images/bear__100002_1.jpg"
    images = [data_input("good", animal_jpeg)]
    images += [data_input(k, v) for k, v in bad_inputs.items()]
    images += [data_input(k, odd_but_valid[k]) for k in ("cmyk", "grayscale", "png16", "exif_rotated")]
    images += [uri_input("by-uri", good_uri), uri_input("missing", str(frames / "carpathia" / "nope.jpg"))]
    async with serve_app(app_for(yolo_model, roots)) as channel:
        stub = detector_pb2_grpc.DetectorServiceStub(channel)
        resp = await stub.Detect(detector_pb2.DetectRequest(
            images=images, options=detector_pb2.DetectOptions(return_crops=True)))
    assert [r.image_id for r in resp.results] == [i.image_id for i in images], "results come back in request order"
    by_id = {r.image_id: r for r in resp.results}
    for bad in (*bad_inputs, "missing"):
        r = by_id[bad]
        assert r.failure.startswith("Failure image access"), f"{bad}: {r.failure!r}"
        assert not r.detections and not r.crops
    for ok in ("good", "cmyk", "grayscale", "png16", "exif_rotated", "by-uri"):
        r = by_id[ok]
        assert not r.failure, f"{ok} should decode: {r.failure}"
        # The fixture always yields one animal (0.72) and two people (0.45): threshold 0.2 counts one animal.
        assert [d.category for d in r.detections] == ["1", "2", "2"]
        assert (r.count, r.empty, r.count_bin) == (1, False, detector_pb2.COUNT_BIN_1_10)
        assert r.threshold == pytest.approx(0.2), "the manifest's default threshold applies"
        (crop,) = r.crops
        assert crop.detection_index == 0 and (crop.width, crop.height) == (256, 256)
        with Image.open(io.BytesIO(crop.jpeg)) as im:
            assert im.format == "JPEG" and im.size == (256, 256)
    rot, ref = by_id["exif_rotated"], by_id["cmyk"]
    assert (rot.width, rot.height) == (ref.height, ref.width), "sizes are reported after EXIF orientation"


async def test_threshold_option_controls_empty_and_count(yolo_model, frames, animal_jpeg):
    async with serve_app(app_for(yolo_model, frames)) as channel:
        stub = detector_pb2_grpc.DetectorServiceStub(channel)
        hi = await stub.Detect(detector_pb2.DetectRequest(
            images=[data_input("a", animal_jpeg)],
            options=detector_pb2.DetectOptions(threshold=0.9, report_threshold=0.5)))
    (r,) = hi.results
    assert r.empty and r.count == 0 and r.count_bin == detector_pb2.COUNT_BIN_UNSPECIFIED
    assert [round(d.confidence, 2) for d in r.detections] == [0.72], "report_threshold drops the 0.45 boxes"
    b = r.detections[0].bbox
    assert 0 <= b.x_min <= 1 and 0 < b.width <= 1


async def test_uri_outside_the_roots_is_refused(yolo_model, frames, tmp_path, animal_jpeg):
    (tmp_path / "private.jpg").write_bytes(animal_jpeg)
    async with serve_app(app_for(yolo_model, frames / "carpathia")) as channel:
        stub = detector_pb2_grpc.DetectorServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Detect(detector_pb2.DetectRequest(images=[
                data_input("ok", animal_jpeg), uri_input("x", str(tmp_path / "private.jpg"))]))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "images[1].source.uri" in err.value.details() and "outside the configured image roots" in err.value.details()


async def test_bad_requests_get_clear_statuses(yolo_model, frames, animal_jpeg):
    cases = [
        (detector_pb2.DetectRequest(), grpc.StatusCode.INVALID_ARGUMENT, "no images"),
        (detector_pb2.DetectRequest(images=[data_input("a", animal_jpeg)] * 3), grpc.StatusCode.RESOURCE_EXHAUSTED,
         "limit is 2"),
        (detector_pb2.DetectRequest(images=[data_input("a", animal_jpeg)],
                                    options=detector_pb2.DetectOptions(threshold=1.5)),
         grpc.StatusCode.INVALID_ARGUMENT, "options.threshold"),
        (detector_pb2.DetectRequest(images=[data_input("a", animal_jpeg)],
                                    options=detector_pb2.DetectOptions(crop_size=5000)),
         grpc.StatusCode.INVALID_ARGUMENT, "options.crop_size"),
        (detector_pb2.DetectRequest(images=[detector_pb2.ImageInput(image_id="nothing")]),
         grpc.StatusCode.INVALID_ARGUMENT, "images[0].source"),
        (detector_pb2.DetectRequest(images=[uri_input("s3", "s3://bucket/a.jpg")]),
         grpc.StatusCode.INVALID_ARGUMENT, "unsupported URI scheme"),
    ]
    async with serve_app(app_for(yolo_model, frames, max_batch=2)) as channel:
        stub = detector_pb2_grpc.DetectorServiceStub(channel)
        for request, code, text in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Detect(request)
            assert err.value.code() == code and text in err.value.details(), (text, err.value.details())


async def test_stream_returns_results_in_the_order_sent(yolo_model, frames, animal_jpeg, bad_inputs):
    ids = [f"frame-{i}" for i in range(11)]

    async def requests():
        for i, image_id in enumerate(ids):
            data = bad_inputs["truncated"] if i == 4 else animal_jpeg
            yield detector_pb2.DetectStreamRequest(
                image=data_input(image_id, data),
                options=detector_pb2.DetectOptions(return_crops=True) if i == 0 else None)

    async with serve_app(app_for(yolo_model, frames)) as channel:
        stub = detector_pb2_grpc.DetectorServiceStub(channel)
        got = [r.result async for r in stub.DetectStream(requests())]
    assert [r.image_id for r in got] == ids
    assert got[4].failure and not got[3].failure and len(got[10].crops) == 1, "options of the first message apply"


async def test_model_info_reports_the_manifest_and_the_providers_in_use(yolo_model, frames):
    app = app_for(yolo_model, frames)
    async with serve_app(app) as channel:
        info = await detector_pb2_grpc.DetectorServiceStub(channel).GetModelInfo(detector_pb2.GetModelInfoRequest())
        in_use = app.detector.session.get_providers()
    assert (info.name, info.layout, info.input_width) == ("yolov5-fixture", "yolov5", 64)
    assert dict(info.categories) == {"1": "animal", "2": "person", "3": "vehicle"}
    assert info.default_threshold == pytest.approx(0.2)
    assert list(info.providers) == in_use and "CPUExecutionProvider" in in_use
