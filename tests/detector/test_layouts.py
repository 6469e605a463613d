"""Both model layouts decode to MegaDetector boxes: YOLOv5 against a hand-computed case on a real ONNX graph,
Faster R-CNN outputs read in the exporter's order (boxes, labels, scores)."""

from __future__ import annotations

import numpy as np
import pytest

from trapline.detector.engine import Detector
from trapline.detector.layouts import Prepared, TorchvisionFasterRCNN, nms
from trapline.detector.manifest import ModelManifest

from .yolo_fixture import EXPECTED, FRAME_H, FRAME_W


def test_yolov5_layout_matches_the_hand_computed_boxes(yolo_model):
    det = Detector(yolo_model)
    try:
        prepared = det.layout.prepare(np.zeros((FRAME_H, FRAME_W, 3), np.uint8))
        x = prepared.feeds["images"]
        assert x.shape == (1, 3, 64, 64), "letterboxed to the long side, padded to a multiple of the stride"
        assert (prepared.scale, prepared.pad_x, prepared.pad_y) == (0.32, 0.0, 13.0)
        assert np.isclose(x[0, 0, 0, 0], 114 / 255), "letterbox padding is YOLOv5's grey, scaled by 1/255"
        got = det.detect_array(np.zeros((FRAME_H, FRAME_W, 3), np.uint8))
        assert [d.category for d in got] == [e[0] for e in EXPECTED], "B suppressed by NMS, D kept (other class), E dropped"
        for d, e in zip(got, EXPECTED):
            assert d.conf == pytest.approx(e[1], abs=1e-6)
            assert d.bbox == pytest.approx(e[2:], abs=1e-6)
    finally:
        det.close()


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]], np.float32)
    assert nms(boxes, np.array([0.5, 0.9, 0.4]), 0.45).tolist() == [1, 2]


def test_faster_rcnn_outputs_are_read_as_boxes_labels_scores():
    m = ModelManifest(name="t", layout="torchvision_frcnn", input={"long_side": 640}, default_threshold=0.5)
    outputs = [np.array([[64, 48, 128, 96]], np.float32), np.array([1], np.int64), np.array([0.7], np.float32)]
    prepared = Prepared({}, width=1280, height=960, scale=0.5)
    for names in (["boxes", "labels", "scores"], ["scores", "boxes", "labels"]):  # by name when named so
        layout = TorchvisionFasterRCNN(m, "images", names)
        ordered = [outputs[["boxes", "labels", "scores"].index(n)] for n in names]
        (d,) = layout.decode(ordered, prepared)
        assert (d.category, round(d.conf, 4)) == ("1", 0.7)
        assert d.bbox == pytest.approx((0.1, 0.1, 0.1, 0.1))
    layout = TorchvisionFasterRCNN(m, "images", ["o0", "o1", "o2"])  # unnamed: by position
    assert layout.decode(outputs, prepared)[0].conf == pytest.approx(0.7)


def test_faster_rcnn_prepare_resizes_the_long_side_and_pads_to_the_stride():
    m = ModelManifest(name="t", layout="torchvision_frcnn", input={"long_side": 640}, default_threshold=0.5)
    p = TorchvisionFasterRCNN(m).prepare(np.full((1000, 1500, 3), 255, np.uint8))
    x = p.feeds["images"]
    assert x.shape == (1, 3, 448, 640) and p.scale == pytest.approx(640 / 1500)
    assert x[0, :, :427].min() == pytest.approx(1.0) and x[0, :, 427:].max() == 0.0
