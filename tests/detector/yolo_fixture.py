"""A tiny ONNX graph with MegaDetector v5's (YOLOv5) interface, built with onnx.helper: it ignores its input
and always returns the fixed raw predictions below, so the decoding can be checked against hand-computed boxes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Raw rows: centre-x, centre-y, width, height (letterboxed pixels), objectness, 3 class scores.
RAW = np.array([
    [32, 32, 32, 16, 0.9, 0.8, 0.1, 0.1],    # A: animal, conf 0.72
    [33, 32, 32, 16, 0.8, 0.7, 0.2, 0.1],    # B: animal, overlaps A (IoU > 0.45): suppressed by NMS
    [10, 20, 8, 8, 0.5, 0.1, 0.9, 0.0],      # C: person, conf 0.45
    [30, 30, 30, 10, 0.5, 0.1, 0.9, 0.0],    # D: person on top of A: kept (NMS is per class)
    [50, 40, 10, 10, 0.001, 0.9, 0.0, 0.0],  # E: objectness 0.001: dropped before NMS
], np.float32)

# For a 200x120 frame at long side 64, stride 32: scale 0.32, resized 64x38, padded to 64x64 with 13 px on top.
FRAME_W, FRAME_H = 200, 120
EXPECTED = [  # (category, conf, normalized x_min, y_min, width, height)
    ("1", 0.72, 50 / 200, 34.375 / 120, 100 / 200, 50 / 120),
    ("2", 0.45, 18.75 / 200, 9.375 / 120, 25 / 200, 25 / 120),
    ("2", 0.45, 46.875 / 200, 37.5 / 120, 93.75 / 200, 31.25 / 120),
]


def build(folder: Path, long_side: int = 64, stride: int = 32, threshold: float = 0.2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    const = helper.make_node("Constant", [], ["raw"], value=numpy_helper.from_array(RAW[None], "raw_value"))
    # Use the input (shape only) so the graph keeps it: output = raw + 0 * ReduceMax(images)
    red = helper.make_node("ReduceMax", ["images"], ["mx"], keepdims=0)
    zero = helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.float32), "z"))
    mul = helper.make_node("Mul", ["mx", "zero"], ["nil"])
    add = helper.make_node("Add", ["raw", "nil"], ["output"])
    graph = helper.make_graph(
        [const, red, zero, mul, add], "yolov5_fixture",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, "height", "width"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, len(RAW), 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = folder / "model.onnx"
    onnx.save(model, path)
    (folder / "manifest.json").write_text(json.dumps({
        "name": "yolov5-fixture", "version": "test", "layout": "yolov5",
        "input": {"long_side": long_side, "stride": stride},
        "normalization": {"scale": 1 / 255.0, "mean": [0, 0, 0], "std": [1, 1, 1]},
        "categories": {"1": "animal", "2": "person", "3": "vehicle"},
        "default_threshold": threshold, "nms_iou": 0.45,
    }))
    return path
