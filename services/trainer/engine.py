"""Training loops for the embedding: fine-tuning on crops (triplet or cross-entropy) and head-only training.

``finetune`` is what the trainer's fine-tune job runs, and what the references and the experiment call.
It is deterministic under ``seed`` (sampler and augmentation RNGs are reseeded from (seed, epoch), so a
run resumed from a checkpoint continues exactly as an uninterrupted one), cancellable between steps, and
checkpoints after every epoch (trainable weights, optimizer, epoch) via a temporary name + rename.

BatchNorm layers stay in eval mode throughout: batches are small P x K sets, and the ImageNet running
statistics are better estimates than any such batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .models import EmbeddingNet, Preprocessing
from .presets import EvalPreset, TrainPreset
from .triplet import PKSampler, semi_hard_triplet_loss

LOSSES = ("triplet", "cross_entropy")


class Stopped(Exception):
    """Raised inside a training loop when ``should_stop`` says so (a cancelled job)."""


@dataclass
class FineTuneConfig:
    loss: str = "triplet"
    epochs: int = 5
    margin: float = 0.2
    classes_per_batch: int = 8  # P
    crops_per_class: int = 4  # K
    batch_size: int = 32  # cross-entropy batches
    lr: float = 1e-3
    backbone_lr_scale: float = 0.1  # unfrozen backbone stages learn slower than the head
    weight_decay: float = 1e-4
    train_blocks: int = 2  # backbone stages trained besides the head (0: head only)
    seed: int = 0
    ce_scale: float = 16.0  # temperature of the normalized-softmax cross-entropy head
    device: str = "auto"  # auto: CUDA when torch sees a GPU, else CPU

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device=cuda but torch sees no GPU")
        return torch.device(self.device)

    def validate(self) -> "FineTuneConfig":
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}")
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if not 0 < self.margin <= 2:
            raise ValueError("margin must be in (0, 2] (distances of L2-normalized vectors)")
        if self.classes_per_batch < 2 or self.crops_per_class < 2:
            raise ValueError("classes_per_batch (P) and crops_per_class (K) must be >= 2")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError("device must be auto, cpu or cuda")
        return self


@dataclass
class Progress:
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    elapsed: float
    eta: float


def check_labels(labels: Sequence[str]) -> None:
    """ValueError unless at least two classes have at least two crops each (a triplet needs both)."""
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"fine-tuning needs at least two classes; got {len(classes)}")
    if (counts >= 2).sum() < 2:
        raise ValueError("fine-tuning needs at least two classes with at least two crops each "
                         f"(counts: {dict(zip(classes.tolist(), counts.tolist()))})")


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def finetune(
    model: EmbeddingNet,
    pixels: Sequence[np.ndarray],
    labels: Sequence[str],
    cfg: FineTuneConfig,
    *,
    preprocessing: Preprocessing = Preprocessing(),
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint: str | Path | None = None,
) -> dict:
    """Fine-tune ``model`` in place on RGB crops; returns stats (final loss, seconds, steps, resumed_from)."""
    cfg.validate()
    check_labels(labels)
    labels_arr = np.asarray(labels)
    classes = sorted(set(labels_arr.tolist()))
    device = cfg.torch_device()
    y = torch.tensor([classes.index(label) for label in labels_arr.tolist()], device=device)
    model.to(device)
    n_stages = model.num_stages()
    train_blocks = max(0, min(cfg.train_blocks, n_stages))
    frozen = n_stages - train_blocks
    model.eval()
    model.set_trainable(train_blocks)
    head_params = list(model.head.parameters())
    backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
    ce_head: nn.Module | None = None
    groups = [{"params": head_params, "lr": cfg.lr}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": cfg.lr * cfg.backbone_lr_scale})
    if cfg.loss == "cross_entropy":
        torch.manual_seed(cfg.seed)
        ce_head = nn.Linear(model.dim, len(classes), bias=False).to(device)
        groups.append({"params": list(ce_head.parameters()), "lr": cfg.lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    augment = TrainPreset(preprocessing)

    if cfg.loss == "triplet":
        sampler = PKSampler(labels_arr, cfg.classes_per_batch, cfg.crops_per_class, seed=cfg.seed)
        steps = len(sampler)
    else:
        steps = max(1, math.ceil(len(labels_arr) / cfg.batch_size))

    start_epoch = 0
    ckpt_path = Path(checkpoint) if checkpoint else None
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    if ckpt_path and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        if ce_head is not None and "ce_head" in state:
            ce_head.load_state_dict(state["ce_head"])
        start_epoch = int(state["epoch"]) + 1
    resumed_from = start_epoch

    t0 = time.perf_counter()
    done_steps = 0
    total_steps = (cfg.epochs - start_epoch) * steps
    last_loss = float("nan")
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        rng = np.random.default_rng([cfg.seed, epoch])
        if cfg.loss == "triplet":
            sampler.set_epoch(epoch)
            batches = list(sampler)
        else:
            order = rng.permutation(len(labels_arr))
            batches = [order[i:i + cfg.batch_size].tolist() for i in range(0, len(order), cfg.batch_size)]
        losses = []
        for step, batch in enumerate(batches):
            if should_stop and should_stop():
                raise Stopped(f"stopped in epoch {epoch + 1}")
            x = torch.stack([augment(pixels[i]) for i in batch]).to(device, non_blocking=True)
            emb = model(x, frozen_stages=frozen)
            if cfg.loss == "triplet":
                loss = semi_hard_triplet_loss(emb, y[batch], cfg.margin)
            else:
                assert ce_head is not None
                logits = cfg.ce_scale * F.linear(emb, F.normalize(ce_head.weight, dim=1))
                loss = F.cross_entropy(logits, y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            done_steps += 1
            elapsed = time.perf_counter() - t0
            if on_progress:
                eta = elapsed / done_steps * (total_steps - done_steps)
                on_progress(Progress(epoch + 1, cfg.epochs, step + 1, len(batches), float(np.mean(losses)),
                                     elapsed, eta))
        last_loss = float(np.mean(losses)) if losses else float("nan")
        if ckpt_path:
            state = {"model": {n: t for n, t in model.state_dict().items() if n in set(trainable_names)},
                     "optimizer": optimizer.state_dict(), "epoch": epoch, "config": asdict(cfg), "loss": last_loss}
            if ce_head is not None:
                state["ce_head"] = ce_head.state_dict()
            _atomic_save(state, ckpt_path)
    for p in model.parameters():
        p.requires_grad_(False)
    model.to("cpu")  # export and parity checks run on the CPU
    model.eval()
    return {"final_loss": last_loss, "train_seconds": time.perf_counter() - t0, "steps": done_steps,
            "device": str(device),
            "resumed_from_epoch": resumed_from, "classes": len(classes), "crops": len(labels_arr)}


@torch.no_grad()
def embed_pixels(model: EmbeddingNet, pixels: Sequence[np.ndarray], preprocessing: Preprocessing = Preprocessing(),
                 batch_size: int = 32) -> np.ndarray:
    """Embeddings [n, d] of RGB crops with the embedder's preprocessing (torch eager)."""
    pre = EvalPreset(preprocessing)
    out = []
    model.eval()
    for i in range(0, len(pixels), batch_size):
        out.append(model(torch.stack([pre(p) for p in pixels[i:i + batch_size]])).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.dim), np.float32)


@torch.no_grad()
def backbone_features(model: EmbeddingNet, pixels: Sequence[np.ndarray], *, views: int = 0, seed: int = 0,
                      preprocessing: Preprocessing = Preprocessing(), batch_size: int = 32) -> np.ndarray:
    """Backbone features [1 + views, n, F]: the clean view, then ``views`` augmented ones (for head training)."""
    model.eval()
    pre, aug = EvalPreset(preprocessing), TrainPreset(preprocessing)
    torch.manual_seed(seed)
    out = []
    for v in range(1 + views):
        tf = pre if v == 0 else aug
        feats = [model.backbone(torch.stack([tf(p) for p in pixels[i:i + batch_size]])).numpy()
                 for i in range(0, len(pixels), batch_size)]
        out.append(np.concatenate(feats))
    return np.stack(out)


def train_head(
    model: EmbeddingNet,
    features: np.ndarray,
    labels: Sequence[str],
    *,
    loss: str = "triplet",
    epochs: int = 60,
    margin: float = 0.2,
    p: int = 16,
    k: int = 4,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    ce_scale: float = 16.0,
) -> list[float]:
    """Train only the head on cached backbone features [views, n, F] (each step draws a random view per item)."""
    check_labels(labels)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    classes = sorted(set(labels_arr.tolist()))
    y = torch.tensor([classes.index(label) for label in labels_arr.tolist()])
    feats = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    n_views = feats.shape[0]
    params = list(model.head.parameters())
    ce_head = nn.Linear(model.dim, len(classes), bias=False) if loss == "cross_entropy" else None
    if ce_head is not None:
        params += list(ce_head.parameters())
    for prm in params:
        prm.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sampler = PKSampler(labels_arr, p, k, seed=seed)
    history = []
    for epoch in range(epochs):
        if loss == "triplet":
            sampler.set_epoch(epoch)
            batches = list(sampler)
        else:
            order = rng.permutation(len(labels_arr))
            batches = [order[i:i + p * k] for i in range(0, len(order), p * k)]
        losses = []
        for batch in batches:
            batch = np.asarray(batch)
            v = torch.from_numpy(rng.integers(0, n_views, len(batch)))
            emb = model.embed_features(feats[v, torch.from_numpy(batch)])
            if ce_head is None:
                value = semi_hard_triplet_loss(emb, y[batch], margin)
            else:
                value = F.cross_entropy(ce_scale * F.linear(emb, F.normalize(ce_head.weight, dim=1)), y[batch])
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            losses.append(float(value.detach()))
        history.append(float(np.mean(losses)))
    for prm in params:
        prm.requires_grad_(False)
    model.eval()
    return history
