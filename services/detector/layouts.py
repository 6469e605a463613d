"""Model layouts behind one interface: frame in, MegaDetector-format detections out.

Each layout splits its work in two so that the batch pipeline can overlap them: :meth:`prepare` (resize,
pad, normalize: numpy only, runs in the decoding workers) and :meth:`decode` (raw ONNX outputs -> detections
in normalized frame coordinates). Both take and return plain numpy; a test can drive them without a model.

* ``torchvision_frcnn``: a torchvision Faster R-CNN exported with the legacy exporter. The frame is resized
  so its long side is ``input.long_side`` and padded to a multiple of the stride; the graph returns absolute
  ``x1, y1, x2, y2`` boxes, labels and scores, in that order (reading them the other way round gives
  scores of 1.0).
* ``yolov5``: MegaDetector v5's export. Letterbox to ``input.long_side`` (padding to a multiple of the
  stride, or to the graph's fixed size), /255, output ``[B, N, 4 + 1 + classes]`` with centre-x, centre-y,
  width, height in letterboxed pixels; score = objectness x class; NMS per class at IoU 0.45; the letterbox
  is undone before normalizing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from .manifest import ModelManifest


@dataclass(frozen=True)
class Detection:
    category: str  # "1" animal, "2" person, "3" vehicle
    conf: float
    bbox: tuple[float, float, float, float]  # normalized x_min, y_min, width, height


@dataclass
class Prepared:
    """A frame ready for the graph, plus what is needed to map boxes back onto the frame."""

    feeds: dict[str, np.ndarray]
    width: int  # original frame size
    height: int
    scale: float  # frame pixels * scale = graph pixels
    pad_x: float = 0.0  # left/top padding in graph pixels (letterbox)
    pad_y: float = 0.0


class Layout(Protocol):
    manifest: ModelManifest

    def prepare(self, image: np.ndarray) -> Prepared: ...

    def decode(self, outputs: list[np.ndarray], prepared: Prepared) -> list[Detection]: ...


def _resize(image: np.ndarray, long_side: int) -> tuple[np.ndarray, float]:
    h, w = image.shape[:2]
    s = long_side / max(h, w)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    if (nw, nh) == (w, h):
        return image, 1.0
    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR)), s


def _normalize(image: np.ndarray, manifest: ModelManifest) -> np.ndarray:
    n = manifest.normalization
    x = image.astype(np.float32) * np.float32(n.scale)
    if any(m != 0 for m in n.mean) or any(s != 1 for s in n.std):
        x = (x - np.asarray(n.mean, np.float32)) / np.asarray(n.std, np.float32)
    return x.transpose(2, 0, 1)


def _to_detections(xyxy: np.ndarray, scores: np.ndarray, cats: list[str], w: int, h: int) -> list[Detection]:
    """Absolute frame-pixel boxes -> normalized MegaDetector boxes, highest confidence first."""
    out = []
    for i in np.argsort(-scores, kind="stable"):
        x1, y1, x2, y2 = np.clip(xyxy[i], 0, [w, h, w, h])
        if x2 <= x1 or y2 <= y1:
            continue
        out.append(Detection(cats[i], float(scores[i]),
                             (float(x1 / w), float(y1 / h), float((x2 - x1) / w), float((y2 - y1) / h))))
    return out


class TorchvisionFasterRCNN:
    """torchvision Faster R-CNN ONNX: one image [1, 3, H, W] in, (boxes, labels, scores) out."""

    def __init__(self, manifest: ModelManifest, input_name: str = "images", output_names: list[str] | None = None):
        self.manifest = manifest
        self.input_name = input_name
        names = output_names or ["boxes", "labels", "scores"]
        # By name when the graph names them so, otherwise by position: boxes, labels, scores.
        self.order = [names.index(k) for k in ("boxes", "labels", "scores")] if set(names) >= {
            "boxes", "labels", "scores"} else [0, 1, 2]

    def prepare(self, image: np.ndarray) -> Prepared:
        h, w = image.shape[:2]
        resized, s = _resize(image, self.manifest.input.long_side)
        stride = self.manifest.input.stride
        rh, rw = resized.shape[:2]
        x = np.zeros((3, math.ceil(rh / stride) * stride, math.ceil(rw / stride) * stride), np.float32)
        x[:, :rh, :rw] = _normalize(resized, self.manifest)
        return Prepared({self.input_name: x[None]}, w, h, s)

    def decode(self, outputs: list[np.ndarray], prepared: Prepared) -> list[Detection]:
        boxes, labels, scores = (np.asarray(outputs[i]) for i in self.order)
        boxes = boxes.reshape(-1, 4).astype(np.float32) / prepared.scale
        cats = [str(int(c)) for c in labels.reshape(-1)]
        return _to_detections(boxes, scores.reshape(-1).astype(np.float32), cats, prepared.width, prepared.height)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression over x1, y1, x2, y2 boxes; indices kept, best first."""
    order = np.argsort(-scores, kind="stable")
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        lt = np.maximum(boxes[i, :2], boxes[rest, :2])
        rb = np.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        overlap = inter / (areas[i] + areas[rest] - inter + 1e-9)
        order = rest[overlap <= iou]
    return np.asarray(keep, np.int64)


class YoloV5:
    """MegaDetector v5 (YOLOv5) ONNX: letterboxed [B, 3, H, W] in, [B, N, 5 + classes] out."""

    PAD_VALUE = 114  # YOLOv5's letterbox grey

    def __init__(self, manifest: ModelManifest, input_name: str = "images",
                 fixed_hw: tuple[int, int] | None = None, max_detections: int = 300):
        self.manifest = manifest
        self.input_name = input_name
        self.fixed_hw = fixed_hw
        self.max_detections = max_detections

    def prepare(self, image: np.ndarray) -> Prepared:
        h, w = image.shape[:2]
        resized, s = _resize(image, self.manifest.input.long_side)
        rh, rw = resized.shape[:2]
        if self.fixed_hw:
            th, tw = self.fixed_hw
        else:
            stride = self.manifest.input.stride
            th, tw = math.ceil(rh / stride) * stride, math.ceil(rw / stride) * stride
        top, left = (th - rh) // 2, (tw - rw) // 2  # YOLOv5 centres the frame in its padding
        canvas = np.full((th, tw, 3), self.PAD_VALUE, np.uint8)
        canvas[top:top + rh, left:left + rw] = resized
        x = _normalize(canvas, self.manifest)
        return Prepared({self.input_name: x[None]}, w, h, s, pad_x=float(left), pad_y=float(top))

    def decode(self, outputs: list[np.ndarray], prepared: Prepared) -> list[Detection]:
        pred = np.asarray(outputs[0], np.float32)
        pred = pred.reshape(-1, pred.shape[-1])
        obj = pred[:, 4]
        cls_scores = pred[:, 5:] * obj[:, None]
        cls = cls_scores.argmax(1)
        conf = cls_scores[np.arange(len(pred)), cls]
        ok = (obj > self.manifest.min_confidence) & (conf > self.manifest.min_confidence)
        pred, cls, conf = pred[ok], cls[ok], conf[ok]
        if not len(pred):
            return []
        cx, cy, bw, bh = pred[:, 0], pred[:, 1], pred[:, 2], pred[:, 3]
        xyxy = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
        # Per-class NMS, as YOLOv5's non_max_suppression does (offset boxes by class so classes never overlap).
        offset = cls[:, None].astype(np.float32) * 4096.0
        keep = nms(xyxy + offset, conf, self.manifest.nms_iou)[: self.max_detections]
        xyxy, cls, conf = xyxy[keep], cls[keep], conf[keep]
        xyxy = (xyxy - [prepared.pad_x, prepared.pad_y, prepared.pad_x, prepared.pad_y]) / prepared.scale
        mapping = self.manifest.class_to_category or {}
        cats = [mapping.get(int(c), str(int(c) + 1)) for c in cls]
        return _to_detections(xyxy, conf, cats, prepared.width, prepared.height)


def make_layout(manifest: ModelManifest, session: Any | None = None) -> Layout:
    """The layout object for a manifest, reading input/output names and fixed sizes from the session."""
    input_name, output_names, fixed = "images", None, None
    if session is not None:
        inp = session.get_inputs()[0]
        input_name = inp.name
        output_names = [o.name for o in session.get_outputs()]
        shape = list(inp.shape)
        if len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape[2:]):
            fixed = (int(shape[2]), int(shape[3]))
    if manifest.layout == "torchvision_frcnn":
        return TorchvisionFasterRCNN(manifest, input_name, output_names)
    return YoloV5(manifest, input_name, fixed)
