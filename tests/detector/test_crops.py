"""Crops: 256x256, cut from the box's region, stretched (paper) or padded to a square (option)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from trapline.detector.crops import PADDED_SQUARE, RESIZE, count_bin, crop_box, encode_jpeg
from trapline.detector.decoding import decode_image


def _frame_with_patch(animal_jpeg):
    img = decode_image(animal_jpeg).copy()
    h, w = img.shape[:2]
    x1, y1, x2, y2 = int(0.2 * w), int(0.3 * h), int(0.5 * w), int(0.4 * h)  # a wide box
    img[y1:y2, x1:x2] = (250, 20, 20)
    return img, (x1 / w, y1 / h, (x2 - x1) / w, (y2 - y1) / h)


def test_resize_crop_is_256_square_of_exactly_the_box(animal_jpeg):
    img, bbox = _frame_with_patch(animal_jpeg)
    crop = crop_box(img, bbox, 256, RESIZE)
    assert crop.shape == (256, 256, 3)
    inner = crop[8:-8, 8:-8].reshape(-1, 3).mean(0)
    assert inner[0] > 240 and inner[1] < 30, f"crop should be the red box, mean colour {inner}"


def test_padded_square_keeps_aspect_and_pads_outside_the_frame(animal_jpeg):
    img, bbox = _frame_with_patch(animal_jpeg)
    crop = crop_box(img, bbox, 256, PADDED_SQUARE)
    assert crop.shape == (256, 256, 3)
    h, w = img.shape[:2]
    box_h = bbox[3] * h / (bbox[2] * w) * 256  # the box's height once its width fills the crop
    mid = crop[128, 16:-16].mean(0)
    assert mid[0] > 240 and mid[1] < 30, "the middle row is the box"
    assert crop[int(128 - box_h / 2) - 12, 128, 1] > 25, "above the box is frame content, not the box"
    edge = crop_box(img, (0.0, 0.0, 0.05, 0.2), 256, PADDED_SQUARE)
    assert edge[:, :16].max() == 0, "a box on the left edge is padded with black outside the frame"


def test_crops_encode_as_jpeg_of_the_requested_size(animal_jpeg):
    img, bbox = _frame_with_patch(animal_jpeg)
    data = encode_jpeg(crop_box(img, bbox, 128), 90)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG" and im.size == (128, 128)


def test_count_bins_follow_the_paper():
    assert [count_bin(n) for n in (0, 1, 10, 11, 50, 51, 300)] == ["", "1-10", "1-10", "11-50", "11-50", "51+", "51+"]
