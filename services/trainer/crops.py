"""Labelled 256x256 crops from COCO Camera Traps sets (PIL + numpy only; no torch, no grpc).

Used by the model-building references, the experiment, the benchmarks and the tests to cut crops the way
the detector does by default (``trapline.detector.crops.crop_box``, mode "resize": the box, floor/ceil to
whole pixels, stretched to 256x256 with bilinear filtering, as the paper does). Boxes come from, in order
of preference:

1. ground-truth ``bbox`` in ``coco_ct.json`` (absolute ``[x, y, w, h]`` pixels);
2. ``megadetector.json`` animal detections with ``conf >= min_conf`` (normalized ``[x, y, w, h]``);
3. the whole frame (sets without boxes: the field-guide sets are clear, hand-picked shots).

Every crop keeps its ``source`` (``<set>/<frame>``) so that experiments can split by source and never
put two crops of the same frame on both sides of a split.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CROP_SIZE = 256

#: The species sets of /work/shared/data usable for metric learning (labels per frame).
SPECIES_SETS = ("serengeti_fieldguide", "gorongosa_fieldguide", "chicago_fieldguide", "carpathia", "cct_sample")
#: Classes that are not animals: kept out of embedding training by default.
NON_ANIMAL = frozenset({"empty", "human", "vehicle", "car", "mower", "riding-mower", "unknown", "livestock"})


@dataclass(frozen=True)
class Crop:
    """One labelled crop: RGB uint8 pixels [256, 256, 3], its label and where it came from."""

    pixels: np.ndarray
    label: str
    source: str  # "<set>/<file_name>": crops of one frame share it
    dataset: str

    def jpeg(self, quality: int = 90) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(self.pixels).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


#: Bumped whenever the crop rule changes (feature caches are keyed by it).
CROP_RULE = "detector-resize-1"


def detector_crop(image: Image.Image, box: tuple[float, float, float, float] | None, size: int = CROP_SIZE) -> np.ndarray:
    """Cut ``box`` (absolute x, y, w, h; None = whole frame) with the detector's rule, ``size`` x ``size``."""
    from trapline.detector.crops import crop_box

    image = image.convert("RGB")
    if box is None:
        return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))
    x, y, w, h = box
    return crop_box(np.asarray(image), (x / image.width, y / image.height, w / image.width, h / image.height), size)


def _md_boxes(path: Path, min_conf: float) -> dict[str, list[tuple[float, float, float, float]]]:
    if not path.is_file():
        return {}
    out: dict[str, list[tuple[float, float, float, float]]] = {}
    for im in json.loads(path.read_text())["images"]:
        boxes = [tuple(d["bbox"]) for d in im.get("detections") or []
                 if str(d.get("category")) == "1" and float(d.get("conf", 0)) >= min_conf]
        out[im["file"]] = boxes  # type: ignore[assignment]
    return out


def load_set(
    root: str | Path,
    *,
    min_conf: float = 0.5,
    exclude: frozenset[str] = NON_ANIMAL,
    max_per_frame: int = 3,
    size: int = CROP_SIZE,
) -> list[Crop]:
    """Labelled crops of one COCO Camera Traps set folder (``images/``, ``coco_ct.json``)."""
    root = Path(root)
    db = json.loads((root / "coco_ct.json").read_text())
    names = {c["id"]: c["name"] for c in db["categories"]}
    by_image: dict[str, list[dict]] = {}
    for ann in db["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    md = _md_boxes(root / "megadetector.json", min_conf)
    crops: list[Crop] = []
    for im in db["images"]:
        anns = by_image.get(im["id"], [])
        labels = {names[a["category_id"]] for a in anns}
        if len(labels) != 1:
            continue  # unlabelled or mixed frames are ambiguous for a per-crop label
        label = labels.pop()
        if label in exclude:
            continue
        path = root / im["file_name"]
        if not path.is_file():
            continue
        with Image.open(path) as image:
            image.load()
            gt = [tuple(a["bbox"]) for a in anns if "bbox" in a]
            if gt:
                boxes: list = gt
            elif im["file_name"] in md:
                if not md[im["file_name"]]:
                    continue  # MegaDetector saw no animal: no crop to label
                boxes = [(x * image.width, y * image.height, w * image.width, h * image.height)
                         for x, y, w, h in md[im["file_name"]]]
            else:
                boxes = [None]
            source = f"{root.name}/{im['file_name']}"
            for box in boxes[:max_per_frame]:
                crops.append(Crop(detector_crop(image, box, size), label, source, root.name))
    return crops


def load_sets(data_root: str | Path, sets: tuple[str, ...] = SPECIES_SETS, **kwargs) -> list[Crop]:
    """Crops of several sets under ``data_root`` (sets that are missing are skipped)."""
    out: list[Crop] = []
    for name in sets:
        if (Path(data_root) / name / "coco_ct.json").is_file():
            out.extend(load_set(Path(data_root) / name, **kwargs))
    return out


def split_by_source(crops: list[Crop], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, test): per class, whole sources go to one side; classes with one source stay in train."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[str]] = {}
    for c in crops:
        srcs = by_label.setdefault(c.label, [])
        if c.source not in srcs:
            srcs.append(c.source)
    test_sources: set[str] = set()
    for label in sorted(by_label):
        srcs = sorted(by_label[label])
        if len(srcs) < 2:
            continue
        n_test = max(1, int(round(len(srcs) * test_fraction)))
        n_test = min(n_test, len(srcs) - 1)
        test_sources.update(rng.permutation(srcs)[:n_test].tolist())
    train = [i for i, c in enumerate(crops) if c.source not in test_sources]
    test = [i for i, c in enumerate(crops) if c.source in test_sources]
    return train, test
