"""The manifest next to each detector model file: what the ONNX graph expects and how to read its outputs.

``model.onnx`` + ``manifest.json`` in one folder. The fields the service needs::

    {
      "name": "trapline-frcnn-efflite0", "version": "1",
      "layout": "torchvision_frcnn",            # or "yolov5" (MegaDetector v5 export)
      "input": {"long_side": 640, "stride": 32}, # frcnn: resize keeping aspect; yolov5: letterbox size + stride
      "normalization": {"scale": 0.00392156862745098, "mean": [0, 0, 0], "std": [1, 1, 1]},
      "categories": {"1": "animal", "2": "person", "3": "vehicle"},
      "default_threshold": 0.9,
      "sha256": "...", "metrics": {"ap50": 0.7, ...}
    }

Anything else (data used, command, training device, full metrics) is kept and shown, not interpreted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trapline.integrity import sha256_file
from trapline.runtime.errors import FailedPrecondition

Layout = Literal["torchvision_frcnn", "yolov5"]
MEGADETECTOR_CATEGORIES = {"1": "animal", "2": "person", "3": "vehicle"}


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    long_side: int = Field(gt=0, description="Frames are resized so their long side is this many pixels.")
    stride: int = Field(32, gt=0, description="Padded sizes are multiples of this.")


class Normalization(BaseModel):
    model_config = ConfigDict(extra="allow")

    scale: float = 1.0 / 255.0
    mean: list[float] = [0.0, 0.0, 0.0]
    std: list[float] = [1.0, 1.0, 1.0]


class ModelManifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    version: str = ""
    layout: Layout
    input: InputSpec
    normalization: Normalization = Normalization()
    categories: dict[str, str] = Field(default_factory=lambda: dict(MEGADETECTOR_CATEGORIES))
    default_threshold: float = Field(ge=0.0, le=1.0)
    #: YOLOv5 only: NMS IoU and the confidence below which raw boxes are dropped before NMS.
    nms_iou: float = Field(0.45, gt=0.0, le=1.0)
    min_confidence: float = Field(0.005, ge=0.0, le=1.0)
    #: YOLOv5 only: map from class index to category id; default index i -> str(i + 1).
    class_to_category: dict[int, str] | None = None
    sha256: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)

    def flat_metrics(self) -> dict[str, float]:
        """Numeric top-level metrics (for GetModelInfo); nested ones are flattened with dots."""
        out: dict[str, float] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, bool):
                return
            if isinstance(value, (int, float)):
                out[prefix] = float(value)
            elif isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)

        walk("", self.metrics)
        return out



def load_manifest(model_path: str | Path, *, verify: bool = True) -> ModelManifest:
    """Read ``manifest.json`` next to ``model_path``; check the file's sha256 when the manifest has one."""
    model_path = Path(model_path)
    path = model_path.with_name("manifest.json")
    if not model_path.is_file():
        raise FailedPrecondition(f"no model file at {model_path}")
    if not path.is_file():
        raise FailedPrecondition(f"no manifest.json next to {model_path}: layout and input size are unknown")
    try:
        manifest = ModelManifest.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as exc:
        raise FailedPrecondition(f"invalid manifest {path}: {exc}") from None
    if verify and manifest.sha256:
        actual = sha256_file(model_path)
        if actual != manifest.sha256:
            raise FailedPrecondition(f"{model_path} has sha256 {actual}, its manifest says {manifest.sha256}")
    if not manifest.version:
        manifest.version = (manifest.sha256 or sha256_file(model_path))[:12]
    return manifest
