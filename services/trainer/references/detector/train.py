"""Fine-tune the default detector.

    OMP_NUM_THREADS=2 python -m trapline.trainer.references.detector.train --output-dir var/detector/run1

Checkpoints (model, optimizer, lr_scheduler, args, epoch) go to ``<output-dir>/checkpoint.pth`` after every
epoch; ``--resume <output-dir>/checkpoint.pth`` continues an interrupted run. The log and ``metrics.jsonl`` sit
next to them. Runs on CUDA when available (``--device auto``), on CPU otherwise; the device and wall time are
recorded in ``summary.json`` and carried into the exported manifest.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import data as D
from . import engine
from .model import build_model


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train Trapline's default detector", add_help=add_help)
    p.add_argument("--data-root", default="/work/shared/data", type=Path)
    p.add_argument("--output-dir", default="var/detector/run", type=Path)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", default=2, type=int, help="torch CPU threads")
    p.add_argument("--epochs", default=6, type=int)
    p.add_argument("--batch-size", default=2, type=int)
    p.add_argument("--lr", default=0.01, type=float)
    p.add_argument("--momentum", default=0.9, type=float)
    p.add_argument("--weight-decay", default=1e-4, type=float)
    p.add_argument("--warmup-iters", default=50, type=int)
    p.add_argument("--crop", default=448, type=int, help="side of the square training crop")
    p.add_argument("--scale-range", default=(480, 1024), type=int, nargs=2, help="long side before cropping")
    p.add_argument("--cache-long-side", default=1024, type=int)
    p.add_argument("--trainable-from-block", default=11, type=int, help="stem and blocks before it are frozen")
    p.add_argument("--fpn-channels", default=128, type=int)
    p.add_argument("--box-head-width", default=256, type=int)
    p.add_argument("--test-proposals", default=100, type=int)
    p.add_argument("--eval-long-side", default=640, type=int)
    p.add_argument("--eval-threshold", default=0.5, type=float)
    p.add_argument("--eval-every", default=0, type=int, help="epochs between validation runs (0: only at the end;"
                   " export.py evaluates the exported model in full)")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--workers", default=0, type=int)
    p.add_argument("--resume", default="", help="checkpoint to resume from")
    p.add_argument("--print-freq", default=20, type=int)
    return p


def main(args: argparse.Namespace) -> dict:
    args.output_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(args.output_dir / "train.log", "a")

    def log(msg: str) -> None:
        line = f"{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S} {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    log(f"args {vars(args)} device {device}")

    frames = D.training_frames(args.data_root)
    sources: dict[str, int] = {}
    for f in frames:
        sources[f.source] = sources.get(f.source, 0) + 1
    log(f"{len(frames)} training frames, {sum(len(f.boxes) for f in frames)} boxes: {sources}")
    cache = D.FrameCache(frames, args.cache_long_side, args.output_dir.parent / "cache")
    dataset = D.TrainDataset(frames, cache, args.crop, tuple(args.scale_range))
    g = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=D.collate, num_workers=args.workers, generator=g)

    model = build_model(trainable_from_block=args.trainable_from_block, fpn_channels=args.fpn_channels,
                        box_head_width=args.box_head_width, test_proposals=args.test_proposals).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    log(f"trainable parameters {sum(p.numel() for p in params):,} of {sum(p.numel() for p in model.parameters()):,}")
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    total = args.epochs * len(loader)

    def lr_lambda(it: int) -> float:  # linear warm-up, then cosine to 1% of the base rate
        if it < args.warmup_iters:
            return 0.001 + (1 - 0.001) * it / args.warmup_iters
        t = (it - args.warmup_iters) / max(1, total - args.warmup_iters)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    start_epoch, elapsed = 0, 0.0
    if args.resume:
        ckpt = torch.load(args.resume, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
        start_epoch, elapsed = ckpt["epoch"] + 1, ckpt.get("elapsed_s", 0.0)
        random.setstate(ckpt["py_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        log(f"resumed from {args.resume} at epoch {start_epoch}")

    metrics_path = args.output_dir / "metrics.jsonl"
    t_start = time.time() - elapsed
    result: dict = {}
    for epoch in range(start_epoch, args.epochs):
        stats = engine.train_one_epoch(model, optimizer, scheduler, loader, epoch, log, args.print_freq)
        row = {"epoch": epoch, "elapsed_s": round(time.time() - t_start, 1), **stats}
        last = epoch == args.epochs - 1
        if last or (args.eval_every and (epoch + 1) % args.eval_every == 0):
            result = engine.evaluate(engine.torch_predictor(model, args.eval_long_side), args.data_root,
                                     args.eval_long_side, args.eval_threshold, with_empty=False)
            row["eval"] = result
            log(f"eval epoch {epoch}: {json.dumps(result['serengeti_boxes_validation'])}")
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        ckpt = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
            "args": vars(args), "epoch": epoch, "elapsed_s": time.time() - t_start,
            "py_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
        }
        torch.save(ckpt, args.output_dir / "checkpoint.tmp")
        (args.output_dir / "checkpoint.tmp").replace(args.output_dir / "checkpoint.pth")
        log(f"epoch {epoch} done: loss {stats['loss']:.3f}, {stats['s_per_iter']:.2f} s/it, "
            f"{row['elapsed_s'] / 60:.1f} min elapsed")

    summary = {
        "device": str(device), "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "threads": args.threads, "train_wall_s": round(time.time() - t_start, 1), "epochs": args.epochs,
        "iterations": total, "training_frames": sources,
        "training_boxes": int(sum(len(f.boxes) for f in frames)),
        "command": "python -m trapline.trainer.references.detector.train " + " ".join(sys.argv[1:]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "eval": result,
    }
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    log("done")
    return summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
