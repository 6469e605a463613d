"""Portal formats in and out: MegaDetector batch output, COCO Camera Traps and CSV (pure functions).

Importers turn a parsed document into :class:`~trapline.orchestrator.db.ImageRecord`s; exporters turn
:class:`ImageOut`s (images with their detections and crop labels) into a document. Importing a document
and exporting it again keeps every field the importer understands: file names, image sizes, location,
sequence, date, other image fields verbatim, detections (category, confidence, box).

MegaDetector batch output: https://lila.science/megadetector-output-format (format 1.0 to 1.5). Boxes
are normalized ``[x_min, y_min, width, height]``; categories "1" animal, "2" person, "3" vehicle. We
write format 1.4 with ``classification_categories`` and per-detection ``classifications`` (Timelapse and
AddaxAI read these). COCO Camera Traps: https://lila.science/coco-camera-traps (boxes in absolute pixels).
Its annotations are ground truth; the importer keeps them aside (never shown to the loop).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from trapline.detector.crops import count_bin as detector_bin
from trapline.runtime.errors import InvalidArgument

from .db import Detection, ImageRecord

MD_CATEGORIES = {"1": "animal", "2": "person", "3": "vehicle"}
ANIMAL = "1"
#: Fields of a MegaDetector image entry that the importer interprets (the rest is kept verbatim).
_MD_IMAGE_FIELDS = {"file", "detections", "failure", "max_detection_conf"}
_COCO_IMAGE_FIELDS = {"id", "file_name", "width", "height"}
CSV_COLUMNS = ["image_id", "file", "uri", "location", "seq_id", "datetime", "width", "height", "empty", "count",
               "count_bin", "failure", "crop_id", "category", "detection_conf", "x_min", "y_min", "box_width",
               "box_height", "label", "confidence", "human"]

# A function that turns a file name from a document into (key, uri); it checks the configured roots.
Resolve = Callable[[str], tuple[str, str]]


def count_bin(count: int) -> str:
    """The paper's count bins as the portal formats spell them: the detector's bins, with "0" for none."""
    return detector_bin(count) or "0"


def _clamp_box(box: Sequence[Any], where: str) -> tuple[float, float, float, float]:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise InvalidArgument(f"a bbox must be [x_min, y_min, width, height], got {box!r}", field=where)
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        raise InvalidArgument(f"bbox values must be numbers, got {box!r}", field=where) from None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise InvalidArgument(f"bbox values must be finite, got {box!r}", field=where)
    x, y = min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0)
    return x, y, min(max(w, 0.0), 1.0 - x), min(max(h, 0.0), 1.0 - y)


# --------------------------------------------------------------------------------------------- import


def read_megadetector(doc: Any, resolve: Resolve) -> list[ImageRecord]:
    """Images of a MegaDetector batch output (any format version from 1.0); detections taken as given."""
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise InvalidArgument("not a MegaDetector batch output: no 'images' list", field="megadetector_json_uri")
    categories = doc.get("detection_categories") or MD_CATEGORIES
    out = []
    for n, entry in enumerate(doc["images"]):
        where = f"images[{n}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise InvalidArgument("each image needs a 'file'", field=where)
        key, uri = resolve(entry["file"])
        failure = entry.get("failure") or ""
        detections = []
        for i, d in enumerate(entry.get("detections") or []):
            cat = str(d.get("category", ""))
            if cat not in categories:
                raise InvalidArgument(f"detection category {cat!r} is not in detection_categories",
                                      field=f"{where}.detections[{i}]")
            detections.append(Detection(cat, float(d.get("conf", 0.0)),
                                        _clamp_box(d.get("bbox"), f"{where}.detections[{i}].bbox")))
        extra = {k: v for k, v in entry.items() if k not in _MD_IMAGE_FIELDS}
        out.append(ImageRecord(key=key, uri=uri, file=entry["file"], location=_text(extra.get("location")),
                               seq_id=_text(extra.get("seq_id")), datetime=_text(extra.get("datetime")),
                               extra=extra, given=None if failure else detections, failure=str(failure)))
    return out


def read_coco(doc: Any, resolve: Resolve) -> list[ImageRecord]:
    """Images of a COCO Camera Traps file; annotations become hidden ground truth."""
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise InvalidArgument("not a COCO Camera Traps file: no 'images' list", field="coco_json_uri")
    names = {c["id"]: str(c["name"]) for c in doc.get("categories") or []}
    truth: dict[Any, list[dict[str, Any]]] = {}
    for n, a in enumerate(doc.get("annotations") or []):
        if a.get("category_id") not in names:
            raise InvalidArgument(f"category_id {a.get('category_id')!r} is not in categories",
                                  field=f"annotations[{n}]")
        truth.setdefault(a.get("image_id"), []).append({
            "id": a.get("id", ""), "category": names[a["category_id"]], "bbox": a.get("bbox"),
            "extra": {k: v for k, v in a.items() if k not in {"id", "image_id", "category_id", "bbox"}}})
    out = []
    for n, im in enumerate(doc["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("file_name"), str) or "id" not in im:
            raise InvalidArgument("each image needs an 'id' and a 'file_name'", field=f"images[{n}]")
        key, uri = resolve(im["file_name"])
        extra = {k: v for k, v in im.items() if k not in _COCO_IMAGE_FIELDS}
        out.append(ImageRecord(
            key=key, uri=uri, file=im["file_name"], source_id=json.dumps(im["id"]),
            width=int(im.get("width") or 0), height=int(im.get("height") or 0),
            location=_text(im.get("location")), seq_id=_text(im.get("seq_id")),
            datetime=_text(im.get("datetime", im.get("date_captured"))), extra=extra,
            ground_truth=truth.get(im["id"], [])))
    return out


def read_csv(text: str, resolve: Resolve) -> list[ImageRecord]:
    """Images of a CSV with a ``file`` (or ``uri``) column, one row per detection or per image.
    Optional: location, seq_id, datetime, width, height; detections from category, detection_conf,
    x_min, y_min, box_width, box_height (normalized), taken as given when present."""
    reader = csv.DictReader(io.StringIO(text))
    cols = set(reader.fieldnames or [])
    if not cols & {"file", "uri"}:
        raise InvalidArgument("a CSV needs a 'file' or 'uri' column", field="csv_uri")
    has_boxes = {"x_min", "y_min", "box_width", "box_height"} <= cols
    by_file: dict[str, ImageRecord] = {}
    for n, row in enumerate(reader, start=2):
        name = row.get("file") or row.get("uri") or ""
        if not name:
            raise InvalidArgument("empty file name", field=f"line {n}")
        rec = by_file.get(name)
        if rec is None:
            key, uri = resolve(row.get("uri") or name)
            rec = ImageRecord(key=key, uri=uri, file=name, location=row.get("location", ""),
                              seq_id=row.get("seq_id", ""), datetime=row.get("datetime", ""),
                              width=int(row.get("width") or 0), height=int(row.get("height") or 0),
                              failure=row.get("failure", ""), given=[] if has_boxes else None)
            by_file[name] = rec
        if has_boxes and row.get("x_min"):
            box = _clamp_box([row["x_min"], row["y_min"], row["box_width"], row["box_height"]], f"line {n}")
            rec.given.append(Detection(row.get("category") or ANIMAL, float(row.get("detection_conf") or 1.0), box))
    return list(by_file.values())


def _text(value: Any) -> str:
    return "" if value is None else str(value)


# --------------------------------------------------------------------------------------------- export


@dataclass
class CropOut:
    """A counted detection with its species: a human label, else the model's guess, else none."""

    crop_id: str
    label: str
    confidence: float
    human: bool


@dataclass
class ImageOut:
    image_id: int
    file: str
    uri: str
    source_id: str
    width: int
    height: int
    location: str
    seq_id: str
    datetime: str
    extra: dict[str, Any]
    failure: str
    threshold: float
    detections: list[Detection] = field(default_factory=list)
    crops: dict[int, CropOut] = field(default_factory=dict)  # detection index -> crop

    @property
    def count(self) -> int:
        return len(self.crops)

    @property
    def empty(self) -> bool:
        return not self.failure and self.count == 0


def _r(v: float, digits: int = 4) -> float:
    return float(round(float(v), digits))


def write_megadetector(images: Sequence[ImageOut], classes: Sequence[str], *, detector: str = "",
                       classifier: str = "", completed: str = "") -> dict[str, Any]:
    """A MegaDetector batch output (format 1.4) with the loop's species as classifications."""
    cls_ids = {name: str(i) for i, name in enumerate(classes)}
    categories = dict(MD_CATEGORIES)
    out_images = []
    for im in images:
        entry: dict[str, Any] = {"file": im.file}
        entry.update({k: v for k, v in im.extra.items() if k not in _MD_IMAGE_FIELDS and k != "classifications"})
        if im.failure:
            entry["failure"] = im.failure
            entry["detections"] = None
            out_images.append(entry)
            continue
        dets = []
        for i, d in enumerate(im.detections):
            categories.setdefault(d.category, d.category)
            det: dict[str, Any] = {"category": d.category, "conf": _r(d.conf), "bbox": [_r(v) for v in d.bbox]}
            crop = im.crops.get(i)
            if crop is not None and crop.label in cls_ids:
                det["classifications"] = [[cls_ids[crop.label], _r(crop.confidence)]]
            dets.append(det)
        entry["detections"] = dets
        out_images.append(entry)
    info: dict[str, Any] = {"format_version": "1.4", "detector": detector or "trapline detector",
                            "classifier": classifier or "trapline MLP classifier"}
    if completed:
        info["detection_completion_time"] = completed
        info["classification_completion_time"] = completed
    thresholds = sorted({im.threshold for im in images if im.threshold > 0})
    if thresholds:
        info["detector_metadata"] = {"typical_detection_threshold": round(float(thresholds[0]), 4)}
    return {"info": info, "detection_categories": categories,
            "classification_categories": {v: k for k, v in cls_ids.items()}, "images": out_images}


def check_megadetector(doc: Any) -> list[str]:
    """Problems with a MegaDetector batch output under the format's rules (1.4+); empty when valid."""
    problems: list[str] = []
    if not isinstance(doc, dict):
        return ["the document is not a JSON object"]
    for key in ("info", "detection_categories", "images"):
        if key not in doc:
            problems.append(f"missing top-level '{key}'")
    info = doc.get("info") or {}
    version = str(info.get("format_version", ""))
    try:
        if tuple(int(p) for p in version.split(".")) < (1, 4):
            problems.append(f"format_version {version!r} is older than 1.4")
    except ValueError:
        problems.append(f"format_version {version!r} is not a version number")
    det_cats = doc.get("detection_categories") or {}
    cls_cats = doc.get("classification_categories") or {}
    for cats, name in ((det_cats, "detection_categories"), (cls_cats, "classification_categories")):
        if not isinstance(cats, dict) or not all(isinstance(k, str) and k.isdigit() and isinstance(v, str)
                                                 for k, v in cats.items()):
            problems.append(f"{name} must map integer strings to names")
    files = set()
    for n, im in enumerate(doc.get("images") or []):
        where = f"images[{n}]"
        if not isinstance(im.get("file"), str):
            problems.append(f"{where}: no 'file'")
            continue
        if im["file"] in files:
            problems.append(f"{where}: file {im['file']!r} listed twice")
        files.add(im["file"])
        if im.get("failure"):
            if im.get("detections"):
                problems.append(f"{where}: a failed image must not have detections")
            continue
        if not isinstance(im.get("detections"), list):
            problems.append(f"{where}: 'detections' must be a list unless 'failure' is set")
            continue
        for i, d in enumerate(im["detections"]):
            dw = f"{where}.detections[{i}]"
            if str(d.get("category")) not in det_cats:
                problems.append(f"{dw}: category {d.get('category')!r} not in detection_categories")
            conf = d.get("conf")
            if not isinstance(conf, (int, float)) or not 0 <= conf <= 1:
                problems.append(f"{dw}: conf {conf!r} not in [0, 1]")
            box = d.get("bbox")
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                problems.append(f"{dw}: bbox must be four numbers")
            elif not (all(0 <= v <= 1 for v in box) and box[0] + box[2] <= 1.0001 and box[1] + box[3] <= 1.0001):
                problems.append(f"{dw}: bbox {box} is not a normalized box inside the image")
            for c in d.get("classifications") or []:
                if not (isinstance(c, list) and len(c) == 2 and str(c[0]) in cls_cats
                        and isinstance(c[1], (int, float)) and 0 <= c[1] <= 1):
                    problems.append(f"{dw}: classification {c!r} must be [category in classification_categories, "
                                    "confidence in [0, 1]]")
    return problems


def write_coco(images: Sequence[ImageOut], classes: Sequence[str], *, description: str = "") -> dict[str, Any]:
    """COCO Camera Traps: images with their fields, one annotation per crop (box in pixels, category, whether a
    human or the model gave it), and one 'empty' annotation per empty image."""
    names = ["empty", *[c for c in classes if c != "empty"]]
    if any(not c.label for im in images for c in im.crops.values()):
        names.append("animal")  # crops without a label or a prediction yet
    cat_ids = {name: i for i, name in enumerate(names)}
    out_images, annotations = [], []
    for im in images:
        image_id = json.loads(im.source_id) if im.source_id else im.file
        entry = {"id": image_id, "file_name": im.file, "width": im.width, "height": im.height}
        entry.update(im.extra)
        if im.failure:
            entry["failure"] = im.failure
        out_images.append(entry)
        if im.empty:
            annotations.append({"id": f"{im.image_id}-empty", "image_id": image_id, "category_id": cat_ids["empty"],
                                "human": False, "conf": 1.0})
        for i, crop in sorted(im.crops.items()):
            x, y, w, h = im.detections[i].bbox
            annotations.append({
                "id": crop.crop_id, "image_id": image_id, "category_id": cat_ids[crop.label or "animal"],
                "bbox": [_r(x * im.width, 2), _r(y * im.height, 2), _r(w * im.width, 2), _r(h * im.height, 2)],
                "human": crop.human, "conf": _r(crop.confidence), "detection_conf": _r(im.detections[i].conf)})
    return {"info": {"version": "1.0", "description": description or "Trapline export"},
            "images": out_images, "annotations": annotations,
            "categories": [{"id": i, "name": n} for n, i in cat_ids.items()]}


def write_csv(images: Sequence[ImageOut]) -> str:
    """One row per crop, and one per image without crops (empty or failed)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for im in images:
        base = {"image_id": im.image_id, "file": im.file, "uri": im.uri, "location": im.location,
                "seq_id": im.seq_id, "datetime": im.datetime, "width": im.width, "height": im.height,
                "empty": int(im.empty), "count": im.count, "count_bin": count_bin(im.count), "failure": im.failure}
        if not im.crops:
            writer.writerow(base)
        for i, crop in sorted(im.crops.items()):
            d = im.detections[i]
            writer.writerow({**base, "crop_id": crop.crop_id, "category": d.category, "detection_conf": _r(d.conf),
                             "x_min": _r(d.bbox[0]), "y_min": _r(d.bbox[1]), "box_width": _r(d.bbox[2]),
                             "box_height": _r(d.bbox[3]), "label": crop.label, "confidence": _r(crop.confidence),
                             "human": int(crop.human)})
    return buf.getvalue()
