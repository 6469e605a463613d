"""Training and evaluation frames for the default detector, from the real sets in ``/work/shared/data``.

Training: serengeti_boxes ``training`` split and pw_squirrels ``train`` split (ground-truth boxes), plus
MegaDetector outputs with conf >= 0.8 on cct_sample and md_test_images as pseudo-labels. A pseudo-labelled
frame whose best detection lies between the "background" and "object" confidences is left out (it would teach a
likely animal as background); a frame with no detection >= 0.5 that its labels call empty, or with no detection
>= 0.1 at all, is kept as a negative.
Evaluation: serengeti_boxes ``validation`` (boxes) and the empty-vs-animal labels of cct_sample,
chicago_fieldguide and carpathia.

Frames are decoded once, EXIF-rotated, downscaled to ``cache_long_side`` and cached as uint8 arrays.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

# Labels of the COCO Camera Traps sets that are neither "empty" nor an animal.
NOT_ANIMAL = {"empty", "human", "person", "vehicle", "car", "mower", "riding-mower", "unknown"}


@dataclass
class Frame:
    path: str  # absolute path of the source frame
    source: str  # "<set>:<kind>"
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # normalized x1,y1,x2,y2
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))  # 1 animal, 2 person, 3 vehicle


def _coco(root: Path, name: str) -> dict:
    return json.loads((root / name / "coco_ct.json").read_text())


def gt_frames(root: Path, name: str, split: str) -> list[Frame]:
    """Frames of one split of a set with ground-truth boxes (COCO absolute [x, y, w, h])."""
    db = _coco(root, name)
    by_image: dict[str, list] = {}
    for ann in db["annotations"]:
        if "bbox" in ann:
            by_image.setdefault(ann["image_id"], []).append(ann["bbox"])
    frames = []
    for im in db["images"]:
        if im.get("split") != split:
            continue
        w, h = im["width"], im["height"]
        boxes = [[x / w, y / h, (x + bw) / w, (y + bh) / h] for x, y, bw, bh in by_image.get(im["id"], [])]
        frames.append(
            Frame(
                str(root / name / im["file_name"]),
                f"{name}:{split}",
                np.asarray(boxes, np.float32).reshape(-1, 4),
                np.ones(len(boxes), np.int64),
            )
        )
    return frames


def pseudo_frames(root: Path, name: str, min_conf: float = 0.8, empty_conf: float = 0.1) -> list[Frame]:
    """Frames with MegaDetector detections >= min_conf as boxes (format 1.1 and 1.4 alike)."""
    md = json.loads((root / name / "megadetector.json").read_text())
    labelled_empty: set[str] = set()
    if (root / name / "coco_ct.json").exists():
        db = _coco(root, name)
        cats = {c["id"]: c["name"] for c in db["categories"]}
        labelled_empty = {
            db_im["file_name"]
            for db_im in db["images"]
            if all(cats[a["category_id"]] == "empty" for a in db["annotations"] if a["image_id"] == db_im["id"])
            and any(a["image_id"] == db_im["id"] for a in db["annotations"])
        }
    frames = []
    for im in md["images"]:
        if im.get("failure"):
            continue
        dets = im.get("detections") or []
        best = max((d["conf"] for d in dets), default=0.0)
        keep = [d for d in dets if d["conf"] >= min_conf]
        if keep:
            boxes = [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in keep)]
            labels = [int(d["category"]) for d in keep]
            kind = "md>=%.1f" % min_conf
        elif best < empty_conf or (im["file"] in labelled_empty and best < 0.5):
            boxes, labels, kind = [], [], "md-empty"
        else:
            continue
        frames.append(
            Frame(
                str(root / name / im["file"]),
                f"{name}:{kind}",
                np.clip(np.asarray(boxes, np.float32).reshape(-1, 4), 0.0, 1.0),
                np.asarray(labels, np.int64),
            )
        )
    return frames


def training_frames(root: Path) -> list[Frame]:
    return (
        gt_frames(root, "serengeti_boxes", "training")
        + gt_frames(root, "pw_squirrels", "train")
        + pseudo_frames(root, "cct_sample")
        + pseudo_frames(root, "md_test_images")
    )


def empty_vs_animal_frames(root: Path, sets=("cct_sample", "chicago_fieldguide", "carpathia")) -> list[tuple[str, str, bool]]:
    """(set, path, has_animal) for frames whose labels say empty or an animal (people/vehicles left out)."""
    out = []
    for name in sets:
        db = _coco(root, name)
        cats = {c["id"]: c["name"] for c in db["categories"]}
        labels: dict[str, set[str]] = {}
        for a in db["annotations"]:
            labels.setdefault(a["image_id"], set()).add(cats[a["category_id"]])
        for im in db["images"]:
            names = labels.get(im["id"], set())
            if names == {"empty"}:
                out.append((name, str(root / name / im["file_name"]), False))
            elif names and not (names & NOT_ANIMAL):
                out.append((name, str(root / name / im["file_name"]), True))
    return out


def load_rgb(path: str, long_side: int | None = None) -> np.ndarray:
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        if long_side and max(im.size) > long_side:
            s = long_side / max(im.size)
            im = im.resize((round(im.width * s), round(im.height * s)), Image.BILINEAR)
        return np.asarray(im, np.uint8).copy()


class FrameCache:
    """Decoded uint8 frames keyed by path, pickled once under the output folder."""

    def __init__(self, frames: list[Frame], long_side: int, cache_dir: Path):
        key = hashlib.sha1(("|".join(sorted(f.path for f in frames)) + f"@{long_side}").encode()).hexdigest()[:12]
        path = cache_dir / f"frames-{long_side}-{key}.pkl"
        if path.exists():
            self.images = pickle.loads(path.read_bytes())
        else:
            self.images = {f.path: load_rgb(f.path, long_side) for f in frames}
            cache_dir.mkdir(parents=True, exist_ok=True)
            path.write_bytes(pickle.dumps(self.images, protocol=pickle.HIGHEST_PROTOCOL))

    def __getitem__(self, path: str) -> np.ndarray:
        return self.images[path]


def resize_uint8(img: np.ndarray, long_side: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = long_side / max(h, w)
    if abs(s - 1.0) < 1e-6:
        return img
    im = Image.fromarray(img).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    return np.asarray(im)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)


class TrainDataset(torch.utils.data.Dataset):
    """Random-scale crops: the frame is resized to a random long side, then a ``crop`` square is cut from it
    (biased towards the boxes), flipped, colour-jittered and sometimes turned grey (night IR frames).
    Scale augmentation shows the head small animals at many sizes for the cost of a fixed crop."""

    def __init__(self, frames: list[Frame], cache: FrameCache, crop: int, scale_range: tuple[int, int],
                 min_visible: float = 0.4, gray_p: float = 0.2):
        self.frames, self.cache, self.crop = frames, cache, crop
        self.scale_range, self.min_visible, self.gray_p = scale_range, min_visible, gray_p

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int):
        f = self.frames[i]
        img = resize_uint8(self.cache[f.path], random.randint(*self.scale_range))
        h, w = img.shape[:2]
        boxes = f.boxes * np.array([w, h, w, h], np.float32)
        ch, cw = min(self.crop, h), min(self.crop, w)
        if len(boxes) and random.random() < 0.7:  # centre the crop somewhere around a random box
            b = boxes[random.randrange(len(boxes))]
            cx = (b[0] + b[2]) / 2 + random.uniform(-0.4, 0.4) * cw
            cy = (b[1] + b[3]) / 2 + random.uniform(-0.4, 0.4) * ch
            x0 = int(np.clip(cx - cw / 2, 0, w - cw))
            y0 = int(np.clip(cy - ch / 2, 0, h - ch))
        else:
            x0, y0 = random.randint(0, w - cw), random.randint(0, h - ch)
        img = img[y0 : y0 + ch, x0 : x0 + cw]
        labels = f.labels
        if len(boxes):
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            boxes = boxes - np.array([x0, y0, x0, y0], np.float32)
            boxes = np.clip(boxes, 0, [cw, ch, cw, ch]).astype(np.float32)
            vis = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            keep = (vis >= self.min_visible * np.maximum(area, 1e-6)) & (boxes[:, 2] - boxes[:, 0] >= 2) & (
                boxes[:, 3] - boxes[:, 1] >= 2
            )
            boxes, labels = boxes[keep], labels[keep]
        if random.random() < 0.5:
            img = img[:, ::-1]
            if len(boxes):
                boxes = np.stack([cw - boxes[:, 2], boxes[:, 1], cw - boxes[:, 0], boxes[:, 3]], 1)
        x = to_tensor(img)
        if random.random() < self.gray_p:
            x = x.mean(0, keepdim=True).expand(3, -1, -1).contiguous()
        x = (x * random.uniform(0.75, 1.25) + random.uniform(-0.08, 0.08)).clamp_(0, 1)
        target = {
            "boxes": torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4)),
            "labels": torch.from_numpy(np.asarray(labels, np.int64)),
        }
        return x, target


def pad_to_multiple(x: torch.Tensor, m: int = 32) -> torch.Tensor:
    _, h, w = x.shape
    return torch.nn.functional.pad(x, (0, math.ceil(w / m) * m - w, 0, math.ceil(h / m) * m - h))


def collate(batch):
    return tuple(zip(*batch))
