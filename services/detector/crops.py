"""Crops of counted detections, as the paper feeds them to the embedder: 256x256 JPEG, bilinear,
aspect ratio ignored (or, as an option, the box padded to a square around its centre first)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

RESIZE = "resize"
PADDED_SQUARE = "padded_square"


def crop_box(image: np.ndarray, bbox: Sequence[float], size: int = 256, mode: str = RESIZE) -> np.ndarray:
    """Cut normalized ``[x_min, y_min, width, height]`` out of an RGB array, as a ``size`` x ``size`` array.

    RESIZE stretches the box to the square; PADDED_SQUARE grows the shorter side around the box centre to
    make a square (black where it leaves the frame), so the animal keeps its shape.
    """
    h, w = image.shape[:2]
    x, y, bw, bh = (float(v) for v in bbox)
    x1, y1, x2, y2 = x * w, y * h, (x + bw) * w, (y + bh) * h
    if mode == PADDED_SQUARE:
        side = max(x2 - x1, y2 - y1)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        x1, y1, x2, y2 = cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2
    elif mode != RESIZE:
        raise ValueError(f"unknown crop mode {mode!r}")
    else:
        x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2)
    box = (int(np.floor(x1)), int(np.floor(y1)), max(int(np.ceil(x2)), int(np.floor(x1)) + 1),
           max(int(np.ceil(y2)), int(np.floor(y1)) + 1))
    region = Image.fromarray(image).crop(box)  # PIL fills outside the frame with black
    return np.asarray(region.resize((size, size), Image.Resampling.BILINEAR))


def encode_jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def count_bin(count: int) -> str:
    """The paper's count bins: "" for none, "1-10", "11-50", "51+"."""
    if count <= 0:
        return ""
    if count <= 10:
        return "1-10"
    if count <= 50:
        return "11-50"
    return "51+"
