"""The detector service: a thin gRPC layer over :mod:`trapline.detector.engine` (ONNX Runtime, no torch).

Settings (env prefix ``TRAPLINE_DETECTOR_``, see :class:`DetectorSettings`): model_path (an ONNX file with its
manifest.json; default the bundled model), device, threads, decode_workers, max_batch, max_pixels, image_roots.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from trapline.api.common.v1 import common_pb2
from trapline.api.detector.v1 import detector_pb2, detector_pb2_grpc
from trapline.defaults import PORTS
from trapline.runtime import App, Registration, ServiceSettings, run
from trapline.runtime.errors import InvalidArgument, ResourceExhausted

from . import crops as C
from .decoding import DEFAULT_MAX_PIXELS
from .engine import Detector, ImageResult, Item, Options
from .sources import ImageSources, LocalFiles

log = logging.getLogger("trapline.detector")

DEFAULT_MODEL = Path(__file__).parent / "models" / "default" / "model.onnx"
_BINS = {"": detector_pb2.COUNT_BIN_UNSPECIFIED, "1-10": detector_pb2.COUNT_BIN_1_10,
         "11-50": detector_pb2.COUNT_BIN_11_50, "51+": detector_pb2.COUNT_BIN_51_PLUS}
_MODES = {detector_pb2.CROP_MODE_UNSPECIFIED: C.RESIZE, detector_pb2.CROP_MODE_RESIZE: C.RESIZE,
          detector_pb2.CROP_MODE_PADDED_SQUARE: C.PADDED_SQUARE}


class DetectorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TRAPLINE_DETECTOR_", extra="ignore", validate_default=True)

    port: int = Field(PORTS["detector"], ge=0, le=65535)
    data_dir: Path = Field(Path("var/detector"), description="Detector state (none yet).")
    model_path: Path = Field(DEFAULT_MODEL, description="ONNX model with manifest.json next to it; default: the "
                             "bundled Faster R-CNN. A MegaDetector v5 ONNX export works with a yolov5 manifest.")
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$", description="auto: CUDA when ONNX Runtime can use it.")
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0: its default.")
    decode_workers: int = Field(2, ge=1, le=64, description="Threads reading and decoding frames ahead of inference.")
    max_batch: int = Field(64, ge=1, le=4096, description="Most images in one Detect request.")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Frames with more pixels fail (decompression bombs).")
    image_roots: str = Field("", description="Comma-separated folders that image URIs may point into; "
                             "empty: the working directory.")

    def roots(self) -> list[Path]:
        names = [r.strip() for r in self.image_roots.split(",") if r.strip()]
        return [Path(n) for n in names] or [Path.cwd()]


def options_from(msg: detector_pb2.DetectOptions) -> Options:
    """Validate request options (proto3 zeros mean defaults) into the engine's Options."""
    for name in ("threshold", "report_threshold"):
        v = getattr(msg, name)
        if not 0.0 <= v <= 1.0:
            raise InvalidArgument(f"must be in [0, 1], got {v}", field=f"options.{name}")
    size = msg.crop_size or 256
    if not 16 <= size <= 1024:
        raise InvalidArgument(f"crop size must be 16..1024 px, got {size}", field="options.crop_size")
    quality = msg.crop_jpeg_quality or 90
    if not 1 <= quality <= 100:
        raise InvalidArgument(f"JPEG quality must be 1..100, got {quality}", field="options.crop_jpeg_quality")
    if msg.crop_mode not in _MODES:
        raise InvalidArgument(f"unknown crop mode {msg.crop_mode}", field="options.crop_mode")
    return Options(threshold=msg.threshold or None, report_threshold=msg.report_threshold,
                   return_crops=msg.return_crops, crop_size=size, crop_mode=_MODES[msg.crop_mode],
                   crop_quality=quality)


def result_message(r: ImageResult) -> detector_pb2.ImageResult:
    return detector_pb2.ImageResult(
        image_id=r.image_id, width=r.width, height=r.height,
        detections=[common_pb2.Detection(category=d.category, confidence=d.conf,
                                         bbox=common_pb2.BoundingBox(x_min=d.bbox[0], y_min=d.bbox[1],
                                                                     width=d.bbox[2], height=d.bbox[3]))
                    for d in r.detections],
        count=r.count, count_bin=_BINS[r.count_bin], empty=r.empty,
        crops=[detector_pb2.Crop(detection_index=c.detection_index, jpeg=c.jpeg, width=c.width, height=c.height)
               for c in r.crops],
        failure=r.failure, threshold=r.threshold)


class DetectorServicer(detector_pb2_grpc.DetectorServiceServicer):
    def __init__(self, app: "DetectorApp") -> None:
        self.app = app

    def _item(self, image: detector_pb2.ImageInput, field: str) -> Item:
        kind = image.source.WhichOneof("source")
        if kind == "data":
            data = image.source.data
            return Item(image.image_id, lambda: data)
        if kind == "uri":
            return Item(image.image_id, self.app.sources.reader(image.source.uri, f"{field}.source.uri"))
        raise InvalidArgument("set source.data (image bytes) or source.uri", field=f"{field}.source")

    async def Detect(self, request, context):  # noqa: N802 - gRPC method name
        n = len(request.images)
        if n == 0:
            raise InvalidArgument("no images: send at least one", field="images")
        if n > self.app.settings.max_batch:
            raise ResourceExhausted(f"{n} images in one request; the limit is {self.app.settings.max_batch}",
                                    field="images")
        options = options_from(request.options)
        items = [self._item(im, f"images[{i}]") for i, im in enumerate(request.images)]
        results = await asyncio.to_thread(self.app.detector.detect, items, options)
        return detector_pb2.DetectResponse(results=[result_message(r) for r in results],
                                           model_version=self.app.detector.manifest.version)

    async def DetectStream(self, request_iterator, context) -> AsyncIterator[detector_pb2.DetectStreamResponse]:  # noqa: N802
        """Images are gathered into small groups as they arrive so that decoding still overlaps inference."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=4 * self.app.settings.decode_workers + 4)
        options: list[Options] = []

        async def reader() -> None:
            try:
                i = 0
                async for req in request_iterator:
                    if not options:
                        options.append(options_from(req.options))
                    await queue.put(self._item(req.image, f"requests[{i}].image"))
                    i += 1
            except BaseException as exc:  # surface validation errors to the response side
                await queue.put(exc)
                return
            await queue.put(None)

        task = asyncio.create_task(reader())
        try:
            done = False
            while not done:
                group = [await queue.get()]
                while not queue.empty() and len(group) < 8:
                    group.append(queue.get_nowait())
                if group[-1] is None:
                    done = True
                    group.pop()
                for g in group:
                    if isinstance(g, BaseException):
                        raise g
                if group:
                    results = await asyncio.to_thread(self.app.detector.detect, group, options[0])
                    for r in results:
                        yield detector_pb2.DetectStreamResponse(result=result_message(r))
        finally:
            task.cancel()

    async def GetModelInfo(self, request, context):  # noqa: N802
        d = self.app.detector
        m = d.manifest
        return detector_pb2.GetModelInfoResponse(
            name=m.name, version=m.version, layout=m.layout, input_height=m.input.long_side,
            input_width=m.input.long_side, categories=m.categories, default_threshold=m.default_threshold,
            providers=d.providers, sha256=m.sha256, metrics=m.flat_metrics())


class DetectorApp(App[DetectorSettings]):
    detector: Detector
    sources: ImageSources

    def registrations(self):
        return [Registration(DetectorServicer(self), detector_pb2_grpc.add_DetectorServiceServicer_to_server,
                             "trapline.detector.v1.DetectorService")]

    def _load(self) -> None:
        s = self.settings
        self.detector = Detector(s.model_path, device=s.device, threads=s.threads, decode_workers=s.decode_workers,
                                 max_pixels=s.max_pixels)
        self.sources = ImageSources(LocalFiles(s.roots()))
        m = self.detector.manifest
        log.info("detector %s %s (%s, long side %d) on %s; image roots %s", m.name, m.version, m.layout,
                 m.input.long_side, self.detector.providers, [str(r) for r in s.roots()])

    async def startup(self) -> None:
        await asyncio.to_thread(self._load)

    async def shutdown(self) -> None:
        if hasattr(self, "detector"):
            await asyncio.to_thread(self.detector.close)


def main() -> None:
    run(DetectorApp, DetectorSettings)


if __name__ == "__main__":
    main()
