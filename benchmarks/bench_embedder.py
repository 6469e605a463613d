"""Embedder and trainer speed on this machine, baselines measured in the same run.

1. Embedding crops/s: ONNX Runtime (the embedder service's engine, default model) vs torch eager (the same
   network rebuilt from the version's weights), CPU; with CUDA when present (batches 64 and 256). Decoding
   and preprocessing are timed separately (they are the same PIL code for both).
2. Fine-tune: seconds per 1,000 crops per epoch (triplet, P x K batches, augmentations, head + last 2
   backbone stages, the trainer's defaults).
3. MLP: retrain (25k labelled 256-d vectors, with hold-out metrics and the refit on all rows) + predict
   (1M vectors), the trainer's per-batch cost in the active-learning loop.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_embedder.py --threads 2 | tee docs/embedder_benchmark.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timeit(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--crops", type=int, default=64, help="crops per embedding measurement")
    ap.add_argument("--finetune-crops", type=int, default=64)
    ap.add_argument("--labels", type=int, default=25_000)
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--data", default="tests/data/frames/serengeti_fieldguide")
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from trapline.embedder.engine import Embedder
    from trapline.embedder.modelstore import ModelStore
    from trapline.embedder.preprocess import preprocess_batch
    from trapline.embedder.server import BUNDLED, DEFAULT_VERSION, seed_bundled
    from trapline.trainer import mlp
    from trapline.trainer.crops import load_set
    from trapline.trainer.engine import FineTuneConfig, finetune
    from trapline.trainer.models import ModelSpec, build, load_weights

    torch.set_num_threads(args.threads)
    import tempfile

    tmp = tempfile.mkdtemp(prefix="bench-embedder-")
    store = ModelStore(tmp)
    seed_bundled(store, BUNDLED)
    crops = load_set(args.data)
    jpegs = [crops[i % len(crops)].jpeg() for i in range(args.crops)]
    print("# Embedder and trainer benchmark\n")
    load0 = os.getloadavg()
    print(f"Machine: {platform.processor() or platform.machine()}, {args.threads} threads "
          f"(torch {torch.__version__}, onnxruntime {ort.__version__}); model {DEFAULT_VERSION} "
          f"(EfficientNet-Lite0 + 256-d head, 224x224 input); crops: real 256x256 JPEGs from {args.data}.\n")

    emb = Embedder(store, threads=args.threads, batch_size=64)
    model_ort = emb.load(DEFAULT_VERSION)
    pre = model_ort.preprocessing
    batch = preprocess_batch(jpegs, pre)
    v = store.get(DEFAULT_VERSION)
    net = build(ModelSpec.from_dict(v.manifest["architecture"]).arch, weights=load_weights(v.weights_path))
    rows = []
    t_pre = timeit(lambda: preprocess_batch(jpegs, pre))
    rows.append(("decode + preprocess (PIL, numpy)", "-", args.crops / t_pre, None))
    for bs in (1, 16, 64):
        with torch.no_grad():
            xb = torch.from_numpy(batch)
            t_torch = timeit(lambda: [net(xb[i:i + bs]) for i in range(0, len(xb), bs)], repeat=2)
        model_ort.batch_size = bs
        t_ort = timeit(lambda: model_ort.run(batch), repeat=2)
        rows.append((f"torch eager, batch {bs}", "cpu", args.crops / t_torch, 1.0))
        rows.append((f"ONNX Runtime, batch {bs}", "cpu", args.crops / t_ort, t_torch / t_ort))
    model_ort.batch_size = 64
    t_e2e = timeit(lambda: emb.embed(jpegs), repeat=2)
    rows.append(("ONNX Runtime end to end (decode + infer), batch 64", "cpu", args.crops / t_e2e, None))
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        gpu = Embedder(store, device="cuda", batch_size=256)
        m = gpu.load(DEFAULT_VERSION)
        if m.on_cuda:
            big = np.concatenate([batch] * 8)
            netc = net.cuda()
            for bs in (64, 256):
                with torch.no_grad():
                    xc = torch.from_numpy(big).cuda()
                    def run_torch():
                        for i in range(0, len(xc), bs):
                            netc(xc[i:i + bs])
                        torch.cuda.synchronize()
                    t_torch = timeit(run_torch)
                m.batch_size = bs
                t_ort = timeit(lambda: m.run(big))
                rows.append((f"torch eager, batch {bs}", "cuda", len(big) / t_torch, 1.0))
                rows.append((f"ONNX Runtime, batch {bs}", "cuda", len(big) / t_ort, t_torch / t_ort))
    else:
        rows.append(("(no GPU here: CUDA rows skipped)", "-", float("nan"), None))

    print("## Embedding throughput\n")
    print("| what | device | crops/s | vs torch eager (same batch) |")
    print("|---|---|---|---|")
    for name, dev, rate, ratio in rows:
        print(f"| {name} | {dev} | {rate:.1f} | {'' if ratio is None else f'{ratio:.2f}x'} |")

    # Fine-tune speed.
    ft = [crops[i % len(crops)] for i in range(args.finetune_crops)]
    cfg = FineTuneConfig(epochs=1, seed=0)
    netf = build(ModelSpec.from_dict(v.manifest["architecture"]).arch, weights=load_weights(v.weights_path))
    t = time.perf_counter()
    finetune(netf, [c.pixels for c in ft], [c.label for c in ft], cfg)
    t_ft = time.perf_counter() - t
    cfg0 = FineTuneConfig(epochs=1, seed=0, train_blocks=0)
    neth = build(ModelSpec.from_dict(v.manifest["architecture"]).arch, weights=load_weights(v.weights_path))
    t = time.perf_counter()
    finetune(neth, [c.pixels for c in ft], [c.label for c in ft], cfg0)
    t_head = time.perf_counter() - t
    print("\n## Fine-tune (triplet, P=8 x K=4, augmentations, CPU)\n")
    print("| trainable | crops x epochs | seconds | s per 1,000 crops per epoch |")
    print("|---|---|---|---|")
    print(f"| head + last 2 backbone stages (default) | {len(ft)} x 1 | {t_ft:.1f} | {1000 * t_ft / len(ft):.0f} |")
    print(f"| head only (backbone frozen) | {len(ft)} x 1 | {t_head:.1f} | {1000 * t_head / len(ft):.0f} |")

    # MLP.
    rng = np.random.default_rng(0)
    classes = 20
    centers = rng.normal(size=(classes, 256)).astype(np.float32)
    y = rng.integers(0, classes, args.labels)
    x = centers[y] + 2.0 * rng.normal(size=(args.labels, 256)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    names = [f"class{i}" for i in y]
    t = time.perf_counter()
    clf = mlp.train(x, names, seed=0, threads=args.threads)
    t_train = time.perf_counter() - t
    big = rng.normal(size=(args.vectors, 256)).astype(np.float32)
    t = time.perf_counter()
    clf.predict_proba(big)
    t_pred = time.perf_counter() - t
    t = time.perf_counter()
    fit_only = mlp.fit(x, names, seed=0, threads=args.threads)
    t_fit = time.perf_counter() - t
    del fit_only
    print(f"\n## MLP (one hidden layer of 100 units), {classes} classes, CPU\n")
    print("| step | rows | seconds |")
    print("|---|---|---|")
    print(f"| retrain with hold-out metrics + refit on all rows | {args.labels:,} | {t_train:.2f} |")
    print(f"| fit only (no hold-out) | {args.labels:,} | {t_fit:.2f} |")
    print(f"| predict (numpy, chunks of 65,536) | {args.vectors:,} | {t_pred:.2f} |")
    print(f"| retrain + predict | | {t_train + t_pred:.2f} |")
    print(f"\nHeld-out accuracy of that MLP (synthetic, sanity only): {clf.metrics.accuracy:.3f}.")
    load1 = os.getloadavg()
    print(f"\nLoad average (1 min) at start {load0[0]:.1f}, at end {load1[0]:.1f} on {os.cpu_count()} cores: "
          "the machine is shared, so absolute figures move with it; ratios within a table are from the same run.")


if __name__ == "__main__":
    main()
