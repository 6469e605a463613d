"""Detector speed on real frames: ONNX Runtime vs torch eager for the same model, decode vs inference share.

    .venv/bin/python benchmarks/bench_detector.py [--model services/detector/models/default/model.onnx]
        [--checkpoint var/detector/run1/checkpoint.pth] [--threads 2] [--frames 24]

Prints one table. Figures are ratios against torch eager measured in the same run, interleaved frame by frame (the machine
is shared, so absolute seconds move from run to run). torch is only imported for the eager column (model-building code),
and only when the training checkpoint of the same model is at hand; the service itself never imports it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from trapline.detector.decoding import decode_image
from trapline.detector.engine import Detector, Item, Options
from trapline.detector.server import DEFAULT_MODEL

FRAMES = Path(__file__).resolve().parents[1] / "tests" / "data" / "frames"


def real_frames(n: int) -> list[bytes]:
    paths = sorted(p for p in FRAMES.glob("*/images/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    step = max(1, len(paths) // n)
    return [p.read_bytes() for p in paths[::step][:n]]


def timed(fn, *a):
    t = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--checkpoint", type=Path, default=Path("var/detector/run1/checkpoint.pth"))
    ap.add_argument("--threads", type=int, default=1, help="for both runtimes; more than the free cores makes torch's OpenMP crawl")
    ap.add_argument("--frames", type=int, default=24)
    args = ap.parse_args()

    det = Detector(args.model, threads=args.threads, decode_workers=2)
    data = real_frames(args.frames)
    m = det.manifest
    print(f"model {m.name} {m.version} ({m.layout}, long side {m.input.long_side}), providers {det.providers}, "
          f"{len(data)} real frames from tests/data/frames, {args.threads} threads")

    # Decode (+ resize/normalize) and inference, separately, one frame at a time.
    decode_s, infer_s, prepared = [], [], []
    for d in data:
        (img, p), t = timed(lambda b: (lambda i: (i, det.layout.prepare(i)))(decode_image(b)), d)
        decode_s.append(t)
        prepared.append(p)
    det.infer(prepared[0])  # warm-up

    # torch eager for the same model, interleaved frame by frame with ONNX Runtime so that both see the same
    # machine load (it is shared); torch only when the training checkpoint of this model is at hand.
    eager = None
    if args.checkpoint.is_file():
        import torch

        from trapline.trainer.references.detector.export import SingleImage, load_trained

        torch.set_num_threads(args.threads)
        model, _ = load_trained(args.checkpoint)
        wrapped = SingleImage(model).eval()

        def eager(p):
            with torch.inference_mode():
                return wrapped(torch.from_numpy(next(iter(p.feeds.values()))))

        eager(prepared[0])
    torch_s = [] if eager else None
    for p in prepared:
        infer_s.append(timed(det.infer, p)[1])
        if eager:
            torch_s.append(timed(eager, p)[1])

    # The service's pipeline: decoding in the pool overlapping inference, batches of 1, 8, 32.
    batch_rows = []
    for bs in (1, 8, 32):
        items = [Item(str(i), (lambda b: lambda: b)(data[i % len(data)])) for i in range(max(bs, 8))]
        t = time.perf_counter()
        for s in range(0, len(items), bs):
            det.detect(items[s:s + bs], Options())
        dt = time.perf_counter() - t
        batch_rows.append((bs, len(items) / dt, dt / len(items)))

    med = statistics.median
    total = med(decode_s) + med(infer_s)
    rows = [
        ("decode + resize/normalize (per frame)", med(decode_s), f"{100 * med(decode_s) / total:.0f}% of a frame"),
        ("ONNX Runtime inference (per frame)", med(infer_s), f"{100 * med(infer_s) / total:.0f}% of a frame"),
    ]
    if torch_s:
        rows.append(("torch eager inference (per frame)", med(torch_s),
                     f"ONNX Runtime is {med(torch_s) / med(infer_s):.2f}x faster"))
    else:
        rows.append(("torch eager inference", float("nan"), f"skipped: no checkpoint at {args.checkpoint}"))
    print()
    print(f"{'stage':<44}{'median s':>10}{'images/s':>10}  note")
    print("-" * 100)
    for name, s, note in rows:
        print(f"{name:<44}{s:>10.4f}{(1 / s if s == s else float('nan')):>10.2f}  {note}")
    for bs, ips, lat in batch_rows:
        print(f"{'Detect pipeline, batch ' + str(bs):<44}{lat:>10.4f}{ips:>10.2f}  decode overlapped with inference, "
              f"{det.providers[0]}")
    print(f"\nlatency p90 ONNX inference {np.percentile(infer_s, 90):.4f} s; frames {len(data)}")
    det.close()


if __name__ == "__main__":
    main()
