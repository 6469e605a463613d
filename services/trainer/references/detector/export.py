"""ONNX export (legacy exporter: torchvision's detection models need it) with a parity check against torch."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch


def export_onnx(model, path: Path, opset: int = 17) -> None:
    model.eval()
    example = [torch.rand(3, 480, 640)]
    tmp = path.with_suffix(".onnx.tmp")
    torch.onnx.export(
        model, (example,), str(tmp), opset_version=opset, dynamo=False,
        input_names=["image"], output_names=["boxes", "labels", "scores"],
        dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "n"}, "labels": {0: "n"}, "scores": {0: "n"}},
    )
    tmp.replace(path)


def parity(model, onnx_path: Path, images_uint8: list[torch.Tensor], threads: int = 2) -> dict:
    """Max absolute differences between torch eager and ONNX Runtime on real frames (boxes in px, scores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    model.eval()
    worst_box = worst_score = 0.0
    count_mismatch = 0
    for img in images_uint8:
        x = img.float() / 255.0
        with torch.no_grad():
            ref = model([x])[0]
        boxes, labels, scores = session.run(None, {"image": x.numpy()})
        n = min(len(scores), len(ref["scores"]))
        count_mismatch += int(len(scores) != len(ref["scores"]))
        strong = ref["scores"][:n].numpy() >= 0.2
        if n and strong.any():
            worst_box = max(worst_box, float(np.abs(boxes[:n][strong] - ref["boxes"][:n].numpy()[strong]).max()))
            worst_score = max(worst_score, float(np.abs(scores[:n][strong] - ref["scores"][:n].numpy()[strong]).max()))
    return {"max_box_diff_px": worst_box, "max_score_diff": worst_score, "frames": len(images_uint8),
            "frames_with_different_detection_count": count_mismatch}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
