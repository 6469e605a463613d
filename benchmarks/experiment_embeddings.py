"""Which embedding makes the MLP most accurate with few labels? (the paper's triplet vs cross-entropy finding)

On crops of the real species sets (../shared/data), MLP accuracy on one *evaluation set* with:
  (a) frozen ImageNet features: EfficientNet-Lite0 pooled features (1280-d), L2-normalized;
  (b) triplet head: a 256-d head trained with triplet loss (semi-hard, P x K) on the OTHER sets only;
  (c) cross-entropy head: the same head trained with (normalized-softmax) cross-entropy on the other sets;
  (d) after a fine-tune: (b) fine-tuned with triplet loss (head + last 2 backbone stages, augmentations)
      on the evaluation set's training split, i.e. on the labels the MLP gets.
The evaluation set is split by source (frame): per class one third of the frames to test, the rest to
train, so no frame is on both sides; the MLP (one hidden layer of 100 units) trains on the train split.
Repeated over several seeds (split, MLP and head initialisation); the table gives mean, std and each run.

Small data: the field-guide sets have 3 frames per class, so the MLP sees 2 labels per class. This is a
proxy for the paper's setting (25k labels), not a reproduction of its numbers.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/experiment_embeddings.py --seeds 5 | tee docs/embedder_experiment.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trapline.trainer import crops as crops_mod  # noqa: E402
from trapline.trainer import mlp  # noqa: E402
from trapline.trainer.engine import FineTuneConfig, embed_pixels, finetune, train_head  # noqa: E402
from trapline.trainer.models import build  # noqa: E402
from trapline.trainer.references.embedder.train import cached_features  # noqa: E402


def accuracy(train_x, train_y, test_x, test_y, seed: int) -> float:
    clf = mlp.fit(train_x, train_y, seed=seed, threads=2)
    pred = np.asarray(clf.classes)[clf.predict_proba(test_x).argmax(1)]
    return float((pred == np.asarray(test_y)).mean())


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default="/work/shared/data")
    ap.add_argument("--eval-set", default="serengeti_fieldguide")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--views", type=int, default=7)
    ap.add_argument("--head-epochs", type=int, default=50)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--skip-finetune", action="store_true")
    ap.add_argument("--cache", default="var/embedder/cache")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    crops = crops_mod.load_sets(args.data_root)
    model0 = build(seed=0)
    feats = cached_features(model0, crops, args.views, 0, args.cache, "efficientnet_lite0")  # [views, n, 1280]
    is_eval = np.array([c.dataset == args.eval_set for c in crops])
    other = np.flatnonzero(~is_eval)
    ev = np.flatnonzero(is_eval)
    eval_crops = [crops[i] for i in ev]
    other_labels = [crops[i].label for i in other]
    print(f"# Embedding experiment: MLP accuracy on `{args.eval_set}`\n")
    print(f"Heads trained on {len(other)} crops of {len(set(other_labels))} classes from the other sets "
          f"({', '.join(sorted({crops[i].dataset for i in other}))}); evaluation set: {len(ev)} crops of "
          f"{len({c.label for c in eval_crops})} classes, split by source (frame), 1/3 of each class's "
          f"frames to test. Seeds: {args.seeds}.\n")
    results: dict[str, list[float]] = {k: [] for k in ("a", "b", "c", "d")}
    names = {"a": "(a) frozen ImageNet features (1280-d)", "b": "(b) triplet head (256-d)",
             "c": "(c) cross-entropy head (256-d)", "d": f"(d) (b) + fine-tune on train split ({args.finetune_epochs} ep)"}
    ft_seconds = []
    for seed in range(args.seeds):
        train_idx, test_idx = crops_mod.split_by_source(eval_crops, 1 / 3, seed)
        ytr = [eval_crops[i].label for i in train_idx]
        yte = [eval_crops[i].label for i in test_idx]
        clean = feats[0, ev]
        fa = l2(clean)
        results["a"].append(accuracy(fa[train_idx], ytr, fa[test_idx], yte, seed))
        heads = {}
        for key, loss in (("b", "triplet"), ("c", "cross_entropy")):
            m = build(seed=seed)
            train_head(m, feats[:, other], other_labels, loss=loss, epochs=args.head_epochs, seed=seed)
            with torch.no_grad():
                v = m.embed_features(torch.from_numpy(clean)).numpy()
            results[key].append(accuracy(v[train_idx], ytr, v[test_idx], yte, seed))
            heads[key] = m
        if not args.skip_finetune:
            m = heads["b"]
            t = time.perf_counter()
            finetune(m, [eval_crops[i].pixels for i in train_idx], ytr,
                     FineTuneConfig(loss="triplet", epochs=args.finetune_epochs, seed=seed, train_blocks=2))
            ft_seconds.append(time.perf_counter() - t)
            v = embed_pixels(m, [c.pixels for c in eval_crops])
            results["d"].append(accuracy(v[train_idx], ytr, v[test_idx], yte, seed))
        print(f"<!-- seed {seed}: " + ", ".join(f"{k}={v[-1]:.3f}" for k, v in results.items() if v)
              + f" ({time.perf_counter() - t0:.0f}s) -->", flush=True)
    print("| representation | accuracy mean | std | runs |")
    print("|---|---|---|---|")
    for k, vals in results.items():
        if vals:
            print(f"| {names[k]} | {np.mean(vals):.3f} | {np.std(vals):.3f} | {' '.join(f'{x:.2f}' for x in vals)} |")
    n_test = len(crops_mod.split_by_source(eval_crops, 1 / 3, 0)[1])
    print(f"\nTest crops per run: {n_test} (one accuracy step = {1 / max(1, n_test):.3f}). "
          f"Chance: {1 / len({c.label for c in eval_crops}):.3f}.")
    if ft_seconds:
        print(f"Fine-tune time per run: {np.mean(ft_seconds):.0f}s for {len(train_idx)} crops x "
              f"{args.finetune_epochs} epochs on this CPU (2 threads, shared).")
    print(f"Total {time.perf_counter() - t0:.0f}s.")


if __name__ == "__main__":
    main()
