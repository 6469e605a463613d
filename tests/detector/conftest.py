"""Fixtures of the detector tests: real frames from tests/data/frames, the bundled model, a YOLOv5 fixture."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trapline.detector.engine import Detector
from trapline.detector.server import DEFAULT_MODEL

from .yolo_fixture import build

FRAMES = Path(__file__).resolve().parents[1] / "data" / "frames"


def labelled(set_name: str) -> dict[str, set[str]]:
    """file path -> set of label names, from the set's coco_ct.json."""
    db = json.loads((FRAMES / set_name / "coco_ct.json").read_text())
    cats = {c["id"]: c["name"] for c in db["categories"]}
    files = {im["id"]: str(FRAMES / set_name / im["file_name"]) for im in db["images"]}
    out: dict[str, set[str]] = {}
    for a in db["annotations"]:
        out.setdefault(files[a["image_id"]], set()).add(cats[a["category_id"]])
    return out


@pytest.fixture(scope="session")
def frames() -> Path:
    return FRAMES


@pytest.fixture(scope="session")
def animal_jpeg() -> bytes:
    return (FRAMES / "carpathia" / "images" / "bear__100002_1.jpg").read_bytes()


@pytest.fixture(scope="session")
def bad_inputs(animal_jpeg) -> dict[str, bytes]:
    """Every kind of broken or odd file a camera-trap folder holds, made from a real frame."""
    im = Image.open(io.BytesIO(animal_jpeg)).convert("RGB")

    def save(image, fmt, **kw) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kw)
        return buf.getvalue()

    bomb = Image.new("1", (12_000, 12_000))  # 144 MP, a few kB as PNG
    return {
        "truncated": animal_jpeg[: len(animal_jpeg) // 2],
        "corrupt": animal_jpeg[:200] + bytes(range(256)) * 40,
        "zero_byte": b"",
        "not_an_image": b"Thumbs.db is not a photo\n" * 20,
        "bomb": save(bomb, "PNG"),
    }


@pytest.fixture(scope="session")
def odd_but_valid(animal_jpeg) -> dict[str, bytes]:
    """Frames that must decode: CMYK JPEG, grayscale (IR) JPEG, 16-bit PNG, EXIF-rotated JPEG."""
    im = Image.open(io.BytesIO(animal_jpeg)).convert("RGB")
    im = im.resize((im.width // 2, im.height // 2))

    def save(image, fmt, **kw) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kw)
        return buf.getvalue()

    gray16 = Image.fromarray((np.asarray(im.convert("L"), np.uint16) * 257).astype(np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return {
        "cmyk": save(im.convert("CMYK"), "JPEG", quality=92),
        "grayscale": save(im.convert("L"), "JPEG", quality=92),
        "png16": save(gray16, "PNG"),
        "exif_rotated": save(im, "JPEG", quality=92, exif=exif),
        "reference": save(im, "JPEG", quality=92),
    }


@pytest.fixture()
def yolo_model(tmp_path) -> Path:
    return build(tmp_path / "yolo")


@pytest.fixture(scope="session")
def default_detector() -> Detector:
    assert DEFAULT_MODEL.is_file(), f"the bundled default model is missing at {DEFAULT_MODEL}"
    d = Detector(DEFAULT_MODEL, threads=2)
    yield d
    d.close()
