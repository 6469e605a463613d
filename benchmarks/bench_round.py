"""Round latency of the labelling loop: SubmitLabels of one batch -> the next NextBatch ready.

Setup: the selector and the trainer run as their own processes (trapline.local.LocalStack on free ports,
embedded store); the orchestrator runs in this process behind a real gRPC server so that the loop's own
stage timings can be read. The project holds N crops (synthetic clustered 256-d unit vectors, written
straight into the orchestrator's database and upserted into the selector) and L human labels. Then R rounds:
NextBatch(B) -> SubmitLabels(B labels) -> NextBatch(B), timing the last two calls and the loop's stages.

    .venv/bin/python benchmarks/bench_round.py                 # 100k crops, 5,000 labels, batches of 100
    .venv/bin/python benchmarks/bench_round.py --crops 20000   # smaller

Both ways of retraining are measured: inside SubmitLabels (the default: the answer carries the new classifier)
and with ``retrain_in_background`` (the answer comes once labels are stored and the selector has them).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from trapline.api.orchestrator.v1 import orchestrator_pb2 as pb
from trapline.api.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from trapline.client import aio_channel
from trapline.local import LocalStack, free_ports
from trapline.orchestrator.db import ImageRecord
from trapline.orchestrator.ports import PointData
from trapline.orchestrator.server import OrchestratorApp, OrchestratorSettings
from trapline.runtime.testing import running_server


def synthetic(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    y = rng.integers(0, classes, n)
    x = centres[y] + rng.normal(scale=1.5, size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), y


async def main(args: argparse.Namespace) -> int:
    root = Path(args.data_dir or tempfile.mkdtemp(prefix="bench-round-"))
    stack = LocalStack(data_dir=root / "stack", services=["selector", "trainer"], ports=free_ports(),
                       extra_env={"TRAPLINE_TRAINER_THREADS": str(args.threads)})
    stack.start()
    try:
        await stack.wait_serving(timeout=300)
        settings = OrchestratorSettings(port=0, data_dir=root / "orchestrator", image_roots=str(root),
                                        selector_address=stack.address("selector"),
                                        trainer_address=stack.address("trainer"),
                                        embedder_address="127.0.0.1:1", detector_address="127.0.0.1:1")
        app = OrchestratorApp(settings)
        async with running_server(app) as running:
            return await run_rounds(app, running.port, args)
    finally:
        stack.stop()


async def run_rounds(app: OrchestratorApp, port: int, args: argparse.Namespace) -> int:
    n, dim, project, version = args.crops, 256, "bench", "synthetic-v1"
    x, y = synthetic(n, dim, args.classes)
    names = [f"species{k:02d}" for k in range(args.classes)]
    t = time.perf_counter()
    db = app.db
    db.create_project(project, project, _settings(args), names, embedding_version=version)
    per_image = 2
    records = [ImageRecord(key=f"/synthetic/{i}.jpg", uri=f"/synthetic/{i}.jpg", file=f"{i}.jpg")
               for i in range(n // per_image)]
    db.add_images(project, "setup", records)
    rows = db.images(project)
    crop_ids: list[str] = []
    with db.tx() as c:  # detections and crops in one transaction (what ingest writes, image by image)
        for r in rows:
            for k in range(per_image):
                c.execute("INSERT INTO detections VALUES (?,?,?,?,?,?,?,?)", (r["id"], k, "1", 0.95, 0.1, 0.1, 0.3, 0.3))
                cid = f"{r['id']}-{k}"
                c.execute("INSERT INTO crops VALUES (?,?,?,?,?)", (cid, project, r["id"], k, f"file:///nowhere/{cid}.jpg"))
                crop_ids.append(cid)
        c.execute("UPDATE images SET status='done', width=640, height=480 WHERE project=?", (project,))
    db.put_vectors(version, crop_ids, x)
    for start in range(0, n, 5000):
        part = crop_ids[start:start + 5000]
        await app.selector.upsert(project, version, [PointData(i, i.split("-")[0], "", "") for i in part],
                                  x[start:start + 5000])
    setup_s = time.perf_counter() - t
    rng = np.random.default_rng(1)
    order = rng.permutation(n)
    pre = order[: args.labels]
    db.store_labels(project, "", "setup", [(crop_ids[i], names[y[i]]) for i in pre])
    db.update_project(project, pending_sync=1)  # the first NextBatch pushes them and trains once
    print(f"setup: {n} crops, {args.labels} labels, {args.classes} classes in {setup_s:.1f}s", flush=True)

    async with aio_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.OrchestratorServiceStub(channel)
        t = time.perf_counter()
        await stub.NextBatch(pb.NextBatchRequest(project_id=project, labeller="warmup", count=1))
        print(f"initial sync (SetLabels {args.labels} + first train + predict all): {time.perf_counter() - t:.2f}s")
        truth = dict(zip(crop_ids, (names[k] for k in y)))
        modes = {"sync": False, "background": True} if args.mode == "both" else {args.mode: args.mode == "background"}
        medians = {}
        for mode, background in modes.items():
            table = []
            batch = await stub.NextBatch(pb.NextBatchRequest(project_id=project, labeller="ana", count=args.batch))
            for r in range(args.rounds):
                labels = [pb.CropLabel(crop_id=i.crop_id, label=truth[i.crop_id]) for i in batch.items]
                t0 = time.perf_counter()
                reply = await stub.SubmitLabels(pb.SubmitLabelsRequest(
                    project_id=project, batch_id=batch.batch_id, labeller="ana", labels=labels,
                    retrain_in_background=background))
                t1 = time.perf_counter()
                stages = dict(app.loop.timings)
                batch = await stub.NextBatch(pb.NextBatchRequest(project_id=project, labeller="ana", count=args.batch))
                t2 = time.perf_counter()
                if background:  # the retrain stages belong to a pass still running
                    stages = {k: stages[k] for k in ("store", "set_labels") if k in stages}
                stages["select"] = app.loop.timings.get("select", 0.0)
                stages["wait_retrain"] = app.loop.timings.get("wait_retrain", 0.0)
                table.append({"round": r + 1, "labels": reply.total_labels, "submit": t1 - t0, "next": t2 - t1,
                              "total": t2 - t0, "strategy": batch.strategy, **stages})
            if background and (task := app.loop.retraining(project)):
                t = time.perf_counter()
                await task
                print(f"(background retrain finished {time.perf_counter() - t:.2f}s after the last round)")
            print_table(table, mode, n, args.batch)
            medians[mode] = statistics.median(r["total"] for r in table)
    for mode, med in medians.items():
        print(f"median SubmitLabels -> next NextBatch ready, {mode} retraining: {med:.2f}s (aim: under 2 s)")
    return 0


def print_table(table: list[dict], mode: str, n: int, batch: int) -> None:
    cols = ["round", "labels", "store", "set_labels", "load_vectors", "train", "predict", "store_predictions",
            "set_predictions", "submit", "wait_retrain", "select", "next", "total"]
    print(f"\n{mode} retraining: {n} crops, batches of {batch}, strategy {table[-1]['strategy']} (seconds; "
          "store..set_predictions are stages of submit, wait_retrain and select of next)")
    print(" ".join(f"{c[:12]:>12}" for c in cols))
    for row in table:
        print(" ".join(f"{row[c]:>12.3f}" if isinstance(row.get(c), float) else f"{row.get(c, '-'):>12}"
                       for c in cols))


def _settings(args):
    from trapline.orchestrator.db import Settings

    return Settings(seed_labels=0, batch_size=args.batch, finetune_every=-1, strategy=args.strategy)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, default=100_000)
    parser.add_argument("--labels", type=int, default=5_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strategy", default="kcenter")
    parser.add_argument("--mode", choices=["sync", "background", "both"], default="both",
                        help="retrain inside SubmitLabels (sync) or after answering (retrain_in_background)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default="")
    sys.exit(asyncio.run(main(parser.parse_args())))
