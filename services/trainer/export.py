"""ONNX export of an embedding net, with a torch-vs-ONNX Runtime parity check, and publishing to the store."""

from __future__ import annotations

import tempfile
import warnings
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from trapline.embedder.modelstore import MODEL_FILE, WEIGHTS_FILE, ModelStore, StoredVersion

from .models import EmbeddingNet, ModelSpec, Preprocessing, partial_state, save_weights

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
OPSET = 17


class ParityError(RuntimeError):
    """The exported ONNX model does not reproduce the torch model."""


def export_onnx(model: EmbeddingNet, path: str | Path, image_size: int = 224) -> None:
    """Export with a dynamic batch axis (input "images" [n,3,S,S] -> output "embeddings" [n,d])."""
    model = model.eval()
    dummy = torch.zeros(2, 3, image_size, image_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and constant-folding notes
        torch.onnx.export(
            model, (dummy,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "n"}, OUTPUT_NAME: {0: "n"}}, opset_version=OPSET,
            do_constant_folding=True, dynamo=False,
        )


def parity(model: EmbeddingNet, onnx_path: str | Path, inputs: np.ndarray) -> float:
    """Largest absolute difference between torch and ONNX Runtime (CPU) outputs on ``inputs``."""
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(inputs)).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: inputs})[0]
    return float(np.abs(ref - got).max())


def export_checked(model: EmbeddingNet, path: str | Path, inputs: np.ndarray, image_size: int = 224,
                   tolerance: float = 1e-4) -> float:
    """Export, then check parity on ``inputs`` (real preprocessed crops); ParityError beyond ``tolerance``."""
    export_onnx(model, path, image_size)
    diff = parity(model, path, inputs)
    if not diff <= tolerance:
        raise ParityError(f"ONNX output differs from torch by {diff:.2e} (tolerance {tolerance:.0e})")
    return diff


def publish_model(
    store: ModelStore,
    model: EmbeddingNet,
    *,
    version: str,
    parent_version: str,
    spec: ModelSpec,
    preprocessing: Preprocessing,
    training: dict,
    metrics: dict,
    parity_inputs: np.ndarray,
    tolerance: float = 1e-4,
) -> StoredVersion:
    """Export + parity check + weights, then publish atomically as ``version``."""
    with tempfile.TemporaryDirectory(prefix="trapline-export-") as tmp:
        onnx_path = Path(tmp) / MODEL_FILE
        t0 = time.perf_counter()
        diff = export_checked(model, onnx_path, parity_inputs, preprocessing.size, tolerance)
        weights_path = Path(tmp) / WEIGHTS_FILE
        save_weights(partial_state(model, pretrained=spec.base == "imagenet"), weights_path)
        manifest = {
            "version": version,
            "parent_version": parent_version,
            "created_at": time.time(),
            "format": "onnx",
            "input": INPUT_NAME,
            "output": OUTPUT_NAME,
            "opset": OPSET,
            "architecture": spec.as_dict(),
            "dimension": model.dim,
            "normalized": True,
            "preprocessing": preprocessing.as_dict(),
            "training": training,
            "metrics": {**metrics, "onnx_parity_max_abs_diff": diff, "export_seconds": time.perf_counter() - t0},
        }
        return store.publish({MODEL_FILE: onnx_path, WEIGHTS_FILE: weights_path}, manifest)
