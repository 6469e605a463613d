"""The default detector's reference training code: training crops keep their boxes right, and the
evaluation's AP50 / recall / precision are computed correctly on real frames' ground truth."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from trapline.trainer.references.detector import data as D
from trapline.trainer.references.detector import engine

FRAMES = Path(__file__).resolve().parents[1] / "data" / "frames"


@pytest.fixture(scope="module")
def val_frames():
    frames = D.gt_frames(FRAMES, "serengeti_boxes", "validation")
    assert len(frames) >= 10
    return frames


def test_training_crops_keep_boxes_inside_and_on_the_animal(val_frames, tmp_path):
    random.seed(0)
    cache = D.FrameCache(val_frames, 640, tmp_path)
    ds = D.TrainDataset(val_frames, cache, crop=256, scale_range=(300, 640), gray_p=0.0)
    seen = 0
    for i in range(len(ds)):
        x, t = ds[i]
        assert x.shape[0] == 3 and x.shape[1] <= 256 and x.shape[2] <= 256 and 0 <= x.min() and x.max() <= 1
        b = t["boxes"].numpy()
        assert len(b) == len(t["labels"])
        if len(b):
            seen += len(b)
            assert (b[:, 0] >= 0).all() and (b[:, 2] <= x.shape[2]).all() and (b[:, 3] <= x.shape[1]).all()
            assert ((b[:, 2] - b[:, 0]) >= 2).all() and ((b[:, 3] - b[:, 1]) >= 2).all()
    assert seen >= 5, "crops are centred on animals most of the time"


def test_ap50_recall_precision_on_ground_truth(val_frames):
    images = [np.zeros((960, 1280, 3), np.uint8) for _ in val_frames]
    by_id = {id(im): f for im, f in zip(images, val_frames)}

    def perfect(img):
        f = by_id[id(img)]
        return f.boxes, np.ones(len(f.boxes), int), np.full(len(f.boxes), 0.95, np.float32)

    def first_box_missed(img):  # each frame's first box moved fully off its animal (IoU 0)
        f = by_id[id(img)]
        b = f.boxes.copy()
        b[0, [0, 2]] += (b[0, 2] - b[0, 0]) * 1.01 if b[0, 2] < 0.5 else -(b[0, 2] - b[0, 0]) * 1.01
        return b, np.ones(len(b), int), np.full(len(b), 0.95, np.float32)

    r = engine.evaluate_boxes(perfect, val_frames, images, 640, 0.9)
    assert (r["ap50"], r["recall"], r["precision"]) == (1.0, 1.0, 1.0)
    assert sum(v["gt_boxes"] for v in r["by_size"].values()) == r["gt_boxes"]
    r = engine.evaluate_boxes(first_box_missed, val_frames, images, 640, 0.9)
    n = sum(len(f.boxes) for f in val_frames)
    expected = round((n - len(val_frames)) / n, 4)
    assert r["recall"] == expected and r["precision"] == expected
    r = engine.evaluate_boxes(perfect, val_frames, images, 640, 0.99)
    assert r["recall"] == 0.0 and r["ap50"] == 1.0, "the threshold only affects recall/precision, not AP50"
