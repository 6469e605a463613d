"""Labelled crops for model building are cut exactly as the detector cuts them; splits never share a frame."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from trapline.detector.crops import crop_box
from trapline.trainer.crops import NON_ANIMAL, load_set, split_by_source

from .conftest import FRAMES


def test_megadetector_boxes_are_cut_with_the_detectors_rule():
    root = FRAMES / "cct_sample"
    crops = load_set(root, min_conf=0.5)
    assert crops and all(c.pixels.shape == (256, 256, 3) for c in crops)
    assert not {c.label for c in crops} & NON_ANIMAL
    md = {im["file"]: im for im in json.loads((root / "megadetector.json").read_text())["images"]}
    first = crops[0]
    name = first.source.split("/", 1)[1]
    det = next(d for d in md[name]["detections"] if d["category"] == "1" and d["conf"] >= 0.5)
    with Image.open(root / name) as im:
        expected = crop_box(np.asarray(im.convert("RGB")), det["bbox"])
    assert np.array_equal(first.pixels, expected), "model-building crops must match the detector's crops"


def test_sets_without_boxes_give_whole_frames():
    crops = load_set(FRAMES / "serengeti_fieldguide")
    assert len(crops) == len({c.source for c in crops}) and all(c.pixels.shape == (256, 256, 3) for c in crops)


def test_split_by_source_keeps_each_frame_on_one_side():
    crops = load_set(FRAMES / "serengeti_fieldguide")
    for seed in range(3):
        train, test = split_by_source(crops, 1 / 3, seed)
        assert sorted(train + test) == list(range(len(crops)))
        assert not {crops[i].source for i in train} & {crops[i].source for i in test}
        assert {crops[i].label for i in test} <= {crops[i].label for i in train}
    assert split_by_source(crops, 1 / 3, 0) == split_by_source(crops, 1 / 3, 0)
