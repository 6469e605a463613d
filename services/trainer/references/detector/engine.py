"""One training epoch and the detector's evaluation (AP50, recall/precision by size, empty vs animal)."""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable

import numpy as np
import torch

from . import data as D

# (boxes normalized x1,y1,x2,y2 [N,4], labels [N], scores [N]) for one uint8 RGB frame
Predict = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]

SIZE_BINS = {"small": (0, 32), "medium": (32, 96), "large": (96, 1e9)}


def train_one_epoch(model, optimizer, scheduler, loader, epoch: int, log: Callable[[str], None],
                    print_freq: int = 20, clip: float = 10.0) -> dict:
    model.train()
    sums: dict[str, float] = {}
    t0 = time.time()
    n = 0
    for it, (images, targets) in enumerate(loader):
        losses = model(list(images), list(targets))
        loss = sum(losses.values())
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch} iter {it}: {losses}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        optimizer.step()
        scheduler.step()
        n += 1
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.item()
        sums["loss"] = sums.get("loss", 0.0) + loss.item()
        if it % print_freq == 0:
            log(
                f"epoch {epoch} iter {it}/{len(loader)} loss {loss.item():.3f} "
                + " ".join(f"{k} {v.item():.3f}" for k, v in losses.items())
                + f" lr {optimizer.param_groups[0]['lr']:.5f} {(time.time() - t0) / n:.2f}s/it"
            )
    return {k: v / max(n, 1) for k, v in sums.items()} | {"s_per_iter": (time.time() - t0) / max(n, 1)}


def torch_predictor(model, long_side: int) -> Predict:
    """The eager model behind the same interface as the ONNX one: resize to ``long_side``, pad to /32."""
    model.eval()

    @torch.inference_mode()
    def predict(img: np.ndarray):
        x = D.to_tensor(D.resize_uint8(img, long_side))
        h, w = x.shape[1:]
        out = model([D.pad_to_multiple(x)])[0]
        boxes = out["boxes"].numpy() / np.array([w, h, w, h], np.float32)
        return np.clip(boxes, 0, 1), out["labels"].numpy(), out["scores"].numpy()

    return predict


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-12)


def _match(pred_boxes, pred_scores, gt_boxes, iou_thr=0.5):
    """Greedy match in score order; returns a true-positive flag per prediction and the matched gt index."""
    order = np.argsort(-pred_scores)
    tp = np.zeros(len(pred_boxes), bool)
    matched_gt = -np.ones(len(pred_boxes), int)
    if len(gt_boxes) and len(pred_boxes):
        ious = _iou(pred_boxes, gt_boxes)
        taken = np.zeros(len(gt_boxes), bool)
        for i in order:
            j = int(np.argmax(np.where(taken, -1, ious[i])))
            if ious[i, j] >= iou_thr and not taken[j]:
                taken[j] = True
                tp[i] = True
                matched_gt[i] = j
    return tp, matched_gt


def _size_bin(boxes_norm: np.ndarray, w: int, h: int, long_side: int) -> np.ndarray:
    s = long_side / max(w, h)
    side = np.sqrt((boxes_norm[:, 2] - boxes_norm[:, 0]) * w * s * (boxes_norm[:, 3] - boxes_norm[:, 1]) * h * s)
    return np.array([next(k for k, (lo, hi) in SIZE_BINS.items() if lo <= v < hi) for v in side], dtype=object)


def evaluate_boxes(predict: Predict, frames: list[D.Frame], images: Iterable[np.ndarray], long_side: int,
                   threshold: float, category: int = 1, size_long_side: int | None = None) -> dict:
    """AP50 (all-point interpolated) over ``category`` predictions, and recall/precision at ``threshold``
    by box size, where size is sqrt(area) in pixels once the frame's long side is ``size_long_side``
    (default: the model input, ``long_side``)."""
    size_ls = size_long_side or long_side
    all_scores, all_tp, n_gt = [], [], 0
    gt_bins: list[str] = []
    gt_hit: list[bool] = []
    pred_bins: list[str] = []
    pred_tp_thr: list[bool] = []
    for f, img in zip(frames, images):
        h, w = img.shape[:2]
        boxes, labels, scores = predict(img)
        keep = labels == category
        boxes, scores = boxes[keep], scores[keep]
        tp, _ = _match(boxes, scores, f.boxes)
        all_scores.append(scores)
        all_tp.append(tp)
        n_gt += len(f.boxes)
        at = scores >= threshold
        tp_thr, gt_idx = _match(boxes[at], scores[at], f.boxes)
        hit = np.zeros(len(f.boxes), bool)
        hit[gt_idx[gt_idx >= 0]] = True
        gt_bins += list(_size_bin(f.boxes, w, h, size_ls))
        gt_hit += list(hit)
        pred_bins += list(_size_bin(boxes[at], w, h, size_ls))
        pred_tp_thr += list(tp_thr)
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    tp = np.concatenate(all_tp)[np.argsort(-scores, kind="stable")] if len(scores) else np.zeros(0, bool)
    ctp = np.cumsum(tp)
    recall = ctp / max(n_gt, 1)
    precision = ctp / np.arange(1, len(tp) + 1)
    ap = 0.0
    if len(tp):
        mrec = np.concatenate([[0], recall, [1]])
        mpre = np.concatenate([[0], precision, [0]])
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        idx = np.where(mrec[1:] != mrec[:-1])[0]
        ap = float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))
    gt_bins_a, gt_hit_a = np.array(gt_bins, dtype=object), np.array(gt_hit, bool)
    pred_bins_a, pred_tp_a = np.array(pred_bins, dtype=object), np.array(pred_tp_thr, bool)
    by_size = {}
    for b in SIZE_BINS:
        g, p = gt_bins_a == b, pred_bins_a == b
        by_size[b] = {
            "gt_boxes": int(g.sum()),
            "recall": round(float(gt_hit_a[g].mean()), 4) if g.any() else None,
            "predictions": int(p.sum()),
            "precision": round(float(pred_tp_a[p].mean()), 4) if p.any() else None,
        }
    return {
        "frames": len(frames),
        "gt_boxes": n_gt,
        "ap50": round(ap, 4),
        "max_recall": round(float(recall[-1]) if len(recall) else 0.0, 4),
        "threshold": threshold,
        "recall": round(float(gt_hit_a.mean()) if len(gt_hit_a) else 0.0, 4),
        "precision": round(float(pred_tp_a.mean()) if len(pred_tp_a) else 1.0, 4),
        "by_size": by_size,
        "size_definition": f"sqrt(box area) in pixels with the frame's long side at {size_ls} px: "
        + ", ".join(f"{k} [{lo}, {hi})" for k, (lo, hi) in SIZE_BINS.items()),
    }


def evaluate_empty(predict: Predict, items: list[tuple[str, str, bool]], threshold: float,
                   long_side: int) -> dict:
    """Empty-vs-animal accuracy per set: a frame holds an animal iff an animal box scores >= threshold."""
    out: dict[str, dict] = {}
    for name, path, has_animal in items:
        boxes, labels, scores = predict(D.load_rgb(path, max(long_side, 1280)))
        said = bool(np.any((labels == 1) & (scores >= threshold)))
        r = out.setdefault(name, {"frames": 0, "correct": 0, "empty_frames": 0, "empty_correct": 0,
                                  "animal_frames": 0, "animal_correct": 0})
        r["frames"] += 1
        r["correct"] += said == has_animal
        k = "animal" if has_animal else "empty"
        r[f"{k}_frames"] += 1
        r[f"{k}_correct"] += said == has_animal
    for r in out.values():
        r["accuracy"] = round(r["correct"] / r["frames"], 4)
    return out


def evaluate(predict: Predict, root, long_side: int, threshold: float, cache: D.FrameCache | None = None,
             with_empty: bool = True) -> dict:
    frames = D.gt_frames(root, "serengeti_boxes", "validation")
    images = (cache[f.path] if cache else D.load_rgb(f.path, 1280) for f in frames)
    res = {"serengeti_boxes_validation": evaluate_boxes(predict, frames, images, long_side, threshold)}
    if with_empty:
        res["empty_vs_animal"] = evaluate_empty(predict, D.empty_vs_animal_frames(root), threshold, long_side)
    return res
