"""``trapline simulate`` (the paper's experiments) and ``trapline demo`` (the main job)."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from pathlib import Path

import numpy as np

import grpc

from ._common import CommandError, explain, progress_bar


def _train_predict(x_l: np.ndarray, y_l: np.ndarray, x: np.ndarray, seed: int) -> tuple[list[str], np.ndarray]:
    """The trainer's MLP (the same code the trainer service runs), trained on every labelled row."""
    from trapline.trainer import mlp

    classes = sorted(np.unique(y_l).tolist())
    if len(classes) == 1:  # a seed that drew one class: every prediction is that class
        return classes, np.ones((len(x), 1), np.float32)
    index = {c: i for i, c in enumerate(classes)}
    y_idx = np.array([index[v] for v in y_l.tolist()])
    clf = mlp.Classifier(classes, *mlp._fit(np.asarray(x_l, np.float32), y_idx, len(classes), seed))
    return clf.classes, clf.predict_proba(x)


def _select(strategy, x, labelled, probs, count, seed, sequences):
    """The selector's strategies (the same code the selector service runs)."""
    from trapline.selector import strategies

    return strategies.select_indices(strategy, x, labelled, probs, count, seed=seed, sequences=sequences)


async def _featurize_coco(path: Path, args: argparse.Namespace) -> list:
    """Full pipeline: start detector + embedder, cut and embed crops and whole frames of a COCO CT set."""
    from trapline.featurize import featurize
    from trapline.local import LocalStack, free_ports
    from trapline.simulate import Features

    stack = LocalStack(data_dir=Path(args.data_dir).resolve(), services=["detector", "embedder"], ports=free_ports())
    stack.start()
    try:
        await stack.wait_serving(timeout=600)
        arrays = await featurize(path, stack.address("detector"), stack.address("embedder"),
                                 on_progress=lambda d, t: progress_bar(d, t, label="featurize "))
    finally:
        stack.stop()
    out = []
    for kind, data in arrays.items():
        cache = Path(args.output) / f"{path.parent.name}_{kind}.npz"
        np.savez(cache, **data)
        print(f"wrote {cache} ({len(data['labels'])} rows)")
        out.append(Features.load(cache, name=f"{path.parent.name}/{kind}"))
    return out


def cmd_simulate(args: argparse.Namespace) -> int:
    from trapline import simulate

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    features = []
    try:
        for item in args.inputs:
            if item.startswith("sklearn:"):
                features.append(simulate.Features.proxy(item))
                continue
            path = Path(item)
            if not path.exists():
                raise CommandError(f"{item}: no such file")
            if path.suffix == ".json":
                features.extend(asyncio.run(_featurize_coco(path, args)))
            else:
                features.append(simulate.Features.load(path))
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    config = simulate.Config(strategies=tuple(args.strategies), seeds=tuple(range(args.seeds)),
                             seed_size=args.seed_size, batch_size=args.batch_size, budget=args.budget,
                             test_fraction=args.test_fraction, holdout_locations=args.holdout_locations)
    t0 = time.monotonic()
    runs = len(features) * len(config.strategies) * len(config.seeds)
    finished: list[int] = []

    def on_curve(_curve) -> None:
        finished.append(1)
        progress_bar(len(finished), runs, label="simulate ")

    try:
        points = simulate.run(features, config, _train_predict, _select, on_curve=on_curve)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    simulate.write_csv(points, out / "simulate.csv")
    title = args.title or " vs ".join(f.name for f in features)
    simulate.plot(points, out / "simulate.png", title)
    print(simulate.table(points, args.target))
    print(f"\n{runs} runs in {time.monotonic() - t0:.0f}s; wrote {out / 'simulate.csv'} and {out / 'simulate.png'}")
    if args.target:
        for (feat, strategy), n in simulate.labels_to_reach(points, args.target).items():
            shown = f"not reached within {config.budget} labels" if math.isnan(n) else f"{int(n)} labels to reach it"
            print(f"  {feat} / {strategy}: target {args.target:.2f}: {shown}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from trapline import demo

    config = demo.DemoConfig(out=Path(args.output), data_dir=Path(args.data_dir), seed_labels=args.seed_labels,
                             batch_size=args.batch_size, finetune_every=args.finetune_every,
                             max_labels=args.max_labels, sets=tuple(args.sets))
    try:
        summary = asyncio.run(demo.run_demo(config))
    except RuntimeError as exc:
        raise CommandError(f"{exc}. Service logs are in {Path(args.data_dir) / 'logs'}") from None
    except grpc.aio.AioRpcError as exc:
        raise CommandError(f"{explain(exc)}. Service logs are in {Path(args.data_dir) / 'logs'}") from None
    print()
    print(demo.table(summary))
    e = summary["empty_flag_vs_truth"]
    print(f"\n{summary['frames']} frames ({summary['empty_frames']} empty; the empty flag agrees with the labels on "
          f"{e['correct']} of {e['frames']}), {summary['crops']} crops, "
          f"{summary['labels']} human labels, embedding {summary['embedding_version']}; "
          f"{summary['total_seconds']:.0f}s in all")
    print(f"wrote {config.out}/learning_curve.png, {config.out}/megadetector.json (Timelapse/AddaxAI), "
          f"{config.out}/results.csv, {config.out}/summary.json")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="active learning with a ground-truth oracle: strategies x seeds -> curves")
    p.add_argument("inputs", nargs="+", help="features files (.npz: vectors, labels[, locations, sequences]) "
                   "or COCO Camera Traps JSON files (full pipeline: detector + embedder are started), "
                   "or sklearn:digits (a larger real proxy that installs offline)")
    p.add_argument("--strategies", nargs="+", default=["kcenter", "random"],
                   help="kcenter random confidence margin entropy informative_diverse margin_cluster_mean")
    p.add_argument("--seeds", type=int, default=3, help="runs per strategy (default 3)")
    p.add_argument("--seed-size", type=int, default=100, help="random labels first (default 100)")
    p.add_argument("--batch-size", type=int, default=50, help="labels per round (default 50)")
    p.add_argument("--budget", type=int, default=1000, help="labels in all (default 1000)")
    p.add_argument("--test-fraction", type=float, default=0.25, help="held-out fraction (default 0.25)")
    p.add_argument("--holdout-locations", action="store_true", help="hold out whole locations instead")
    p.add_argument("--target", type=float, default=None, help="report labels needed to reach this accuracy")
    p.add_argument("--title", default=None)
    p.add_argument("-o", "--output", default="simulate-output", help="folder for CSV, PNG, features")
    p.add_argument("--data-dir", default="var/simulate", help="state of services started for COCO inputs")
    p.set_defaults(func=cmd_simulate, sync=True)

    p = sub.add_parser("demo", help="the whole system on the real sample frames (the README's main job)")
    p.add_argument("-o", "--output", default="demo-output")
    p.add_argument("--data-dir", default="var/demo")
    p.add_argument("--sets", nargs="+", default=["serengeti_fieldguide", "cct_sample"],
                   help="sample sets in tests/data/frames (default: serengeti_fieldguide cct_sample)")
    p.add_argument("--seed-labels", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=6)
    p.add_argument("--finetune-every", type=int, default=24)
    p.add_argument("--max-labels", type=int, default=0, help="stop after this many labels (0: label everything)")
    p.set_defaults(func=cmd_demo, sync=True)
