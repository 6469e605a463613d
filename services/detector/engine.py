"""The detection engine: an ONNX Runtime session, its layout, and the batch pipeline.

``Detector.detect(items)`` reads and decodes frames in a thread pool (PIL and ONNX Runtime release the GIL)
while the session runs on the frames already prepared, so decoding overlaps inference; results come back in
request order, and an image that cannot be read carries a ``failure`` while the rest of the batch succeeds.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import crops as C
from .decoding import DEFAULT_MAX_PIXELS, ImageFailure, decode_image
from .layouts import Detection, Layout, Prepared, make_layout
from .manifest import ModelManifest, load_manifest

log = logging.getLogger("trapline.detector")

ANIMAL = "1"

#: Set once ONNX Runtime listed CUDA but could not use it; later sessions go straight to the CPU.
_cuda_unusable = False


def create_session(model_path: str | Path, device: str = "auto", threads: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime session: CUDA first when ``device`` allows and ORT offers it, CPU as fallback.

    onnxruntime-gpu lists CUDA as available even on machines without a GPU and then silently runs on the
    CPU, so what is in use must be read from ``session.get_providers()`` after creation, never assumed.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # No busy-waiting between runs: the CPU is shared with the decoding workers (and often other services);
    # a spinning ORT thread pool slows them more than it speeds up the next run.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    global _cuda_unusable
    providers = ["CPUExecutionProvider"]
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers() and not _cuda_unusable:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(model_path), opts, providers=providers)
    except Exception as exc:
        if providers == ["CPUExecutionProvider"]:
            raise
        log.warning("session with CUDA failed (%s); using the CPU", exc)
        session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    in_use = session.get_providers()
    if providers[0] == "CUDAExecutionProvider" and "CUDAExecutionProvider" not in in_use:
        _cuda_unusable = True  # listed but not loadable (no GPU or libraries): do not retry for every session
    if device == "cuda" and "CUDAExecutionProvider" not in in_use:
        log.warning("CUDA was requested but ONNX Runtime runs this model on %s", in_use)
    return session


@dataclass
class Options:
    threshold: float | None = None  # None: the manifest's default
    report_threshold: float = 0.0
    return_crops: bool = False
    crop_size: int = 256
    crop_mode: str = C.RESIZE
    crop_quality: int = 90


@dataclass
class CropResult:
    detection_index: int
    jpeg: bytes
    width: int
    height: int


@dataclass
class ImageResult:
    image_id: str
    width: int = 0
    height: int = 0
    detections: list[Detection] = field(default_factory=list)
    count: int = 0
    count_bin: str = ""
    empty: bool = True
    crops: list[CropResult] = field(default_factory=list)
    failure: str = ""
    threshold: float = 0.0


@dataclass
class Item:
    """One image of a batch: its id and a reader of its bytes (from the request or a URI)."""

    image_id: str
    read: Callable[[], bytes]


class Detector:
    """A loaded model: session + manifest + layout, and the batch pipeline around them."""

    def __init__(self, model_path: str | Path, *, device: str = "auto", threads: int = 0,
                 decode_workers: int = 2, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.model_path = Path(model_path)
        self.manifest: ModelManifest = load_manifest(self.model_path)
        self.session = create_session(self.model_path, device, threads)
        self.providers: list[str] = self.session.get_providers()
        self.layout: Layout = make_layout(self.manifest, self.session)
        self.max_pixels = max_pixels
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._pool = ThreadPoolExecutor(max_workers=max(1, decode_workers), thread_name_prefix="detector-decode")
        self._closed = threading.Event()

    # ---- single frame --------------------------------------------------------------------------------
    def infer(self, prepared: Prepared) -> list[Detection]:
        outputs = self.session.run(self.output_names, prepared.feeds)
        return self.layout.decode(outputs, prepared)

    def detect_array(self, image: np.ndarray) -> list[Detection]:
        """Detections for one RGB uint8 frame (no threshold applied beyond the model's own)."""
        return self.infer(self.layout.prepare(image))

    # ---- batches ---------------------------------------------------------------------------------------
    def _load(self, item: Item) -> tuple[np.ndarray, Prepared]:
        image = decode_image(item.read(), self.max_pixels)
        return image, self.layout.prepare(image)

    def detect(self, items: Sequence[Item], options: Options | None = None) -> list[ImageResult]:
        """Detect in a batch; decoding runs ahead in the pool while the session works, results in order."""
        options = options or Options()
        futures: list[Future] = [self._pool.submit(self._load, it) for it in items]
        return [self._finish(it, fut, options) for it, fut in zip(items, futures)]

    def _finish(self, item: Item, fut: Future, options: Options) -> ImageResult:
        thr = self.manifest.default_threshold if options.threshold is None else options.threshold
        result = ImageResult(item.image_id, threshold=thr)
        try:
            image, prepared = fut.result()
        except ImageFailure as exc:
            result.failure = str(exc)
            return result
        except Exception:  # a reader or decoder bug must still only fail this image
            log.exception("reading %s failed", item.image_id)
            result.failure = "Failure image access: internal error while reading the image"
            return result
        result.height, result.width = image.shape[:2]
        try:
            detections = self.infer(prepared)
        except Exception:
            log.exception("inference on %s failed", item.image_id)
            result.failure = "Failure inference: internal error while running the model"
            return result
        summarize(result, detections, image, options, thr)
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def summarize(result: ImageResult, detections: list[Detection], image: np.ndarray, options: Options,
              threshold: float) -> ImageResult:
    """The paper's three uses of a detector: empty flag, count (and its bin), crops of the counted boxes."""
    # Counted detections are always reported, whatever report_threshold says, so crops can point at them.
    floor = min(options.report_threshold, threshold)
    result.detections = [d for d in detections if d.conf >= floor]
    counted = [i for i, d in enumerate(result.detections) if d.category == ANIMAL and d.conf >= threshold]
    result.count = len(counted)
    result.count_bin = C.count_bin(result.count)
    result.empty = result.count == 0
    if options.return_crops:
        for i in counted:
            pixels = C.crop_box(image, result.detections[i].bbox, options.crop_size, options.crop_mode)
            result.crops.append(CropResult(i, C.encode_jpeg(pixels, options.crop_quality), options.crop_size,
                                           options.crop_size))
    return result
