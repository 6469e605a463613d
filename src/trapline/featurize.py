"""Turn a COCO Camera Traps set into features files through the running detector and embedder.

For every labelled frame: the detector finds and crops the animals (each crop inherits the frame's label,
location and sequence), the embedder maps each crop to a vector. The same frames resized whole to the crop
size give the "full frames" features, the paper's crops-vs-frames comparison. Empty frames and frames
whose label is ``empty`` are left out of species features.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from .api.common.v1 import common_pb2
from .api.detector.v1 import detector_pb2, detector_pb2_grpc
from .api.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from .client import channel_options

NON_SPECIES = {"empty", "human", "person", "vehicle", "car", "unknown"}


def load_coco(path: Path) -> tuple[list[dict], dict]:
    """Images with one species label each, and the raw document."""
    doc = json.loads(path.read_text())
    cats = {c["id"]: c["name"] for c in doc.get("categories", [])}
    label_of: dict = {}
    for ann in doc.get("annotations", []):
        label_of.setdefault(ann["image_id"], cats.get(ann["category_id"], str(ann["category_id"])))
    images = []
    for im in doc.get("images", []):
        label = label_of.get(im["id"])
        if label is None or label.lower() in NON_SPECIES:
            continue
        images.append({**im, "label": label})
    return images, doc


def tensor_to_array(t: common_pb2.Tensor) -> np.ndarray:
    if t.dtype != common_pb2.D_TYPE_FLOAT32:
        raise ValueError("expected float32 vectors")
    return np.frombuffer(t.data, dtype="<f4").reshape(tuple(t.shape))


async def featurize(coco_path: Path, detector: str, embedder: str, *, images_root: Path | None = None,
                    threshold: float = 0.0, batch: int = 8,
                    on_progress: Callable[[int, int], None] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Return {"crops": arrays, "frames": arrays} ready for ``np.savez``."""
    from PIL import Image

    images, _doc = load_coco(coco_path)
    root = images_root or coco_path.parent
    out: dict[str, dict[str, list]] = {k: {"vectors": [], "labels": [], "locations": [], "sequences": []}
                                       for k in ("crops", "frames")}
    opts = channel_options(128)
    async with grpc.aio.insecure_channel(detector, options=opts) as dch, \
            grpc.aio.insecure_channel(embedder, options=opts) as ech:
        det = detector_pb2_grpc.DetectorServiceStub(dch)
        emb = embedder_pb2_grpc.EmbedderServiceStub(ech)
        for start in range(0, len(images), batch):
            chunk = images[start: start + batch]
            datas = [(root / im["file_name"]).read_bytes() for im in chunk]
            response = await det.Detect(detector_pb2.DetectRequest(
                images=[detector_pb2.ImageInput(image_id=str(im["id"]), source=common_pb2.ImageSource(data=d))
                        for im, d in zip(chunk, datas)],
                options=detector_pb2.DetectOptions(threshold=threshold, return_crops=True)))
            frames = []
            for data in datas:
                with Image.open(io.BytesIO(data)) as img:
                    buf = io.BytesIO()
                    img.convert("RGB").resize((256, 256), Image.BILINEAR).save(buf, "JPEG", quality=90)
                    frames.append(buf.getvalue())
            for kind, crops, owners in (
                ("crops", [c.jpeg for r in response.results for c in r.crops],
                 [im for im, r in zip(chunk, response.results) for _ in r.crops]),
                ("frames", frames, chunk),
            ):
                if not crops:
                    continue
                vectors = tensor_to_array((await emb.Embed(embedder_pb2.EmbedRequest(crops=crops))).vectors)
                out[kind]["vectors"].append(vectors)
                out[kind]["labels"] += [im["label"] for im in owners]
                out[kind]["locations"] += [str(im.get("location", "")) for im in owners]
                out[kind]["sequences"] += [str(im.get("seq_id", im["id"])) for im in owners]
            if on_progress:
                on_progress(min(start + batch, len(images)), len(images))
    result = {}
    for kind, arrays in out.items():
        if not arrays["vectors"]:
            continue
        result[kind] = {"vectors": np.concatenate(arrays["vectors"]).astype(np.float32),
                        "labels": np.array(arrays["labels"]), "locations": np.array(arrays["locations"]),
                        "sequences": np.array(arrays["sequences"])}
    return result
