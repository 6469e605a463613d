"""The fine-tune job: labelled crops + a base model version -> a new, registered embedder model version.

``submit_finetune`` validates everything a caller can get wrong *before* a job exists (crops that are
not images, fewer than two classes with two crops each, an unknown base version, bad hyper-parameters),
writes the inputs into the job's folder and queues it. ``run_finetune`` is the job's work function:
rebuild the base version's torch model (architecture + weights.npz from the store), fine-tune
(``engine.finetune``: checkpoints every epoch, resumable), export to ONNX with a parity check and
publish the result as ``ft-NNNN`` with the base as its parent.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from trapline.embedder.modelstore import ModelStore
from trapline.embedder.preprocess import decode
from trapline.runtime.errors import FailedPrecondition, InvalidArgument

from .crops import CROP_SIZE
from .jobs import JobContext, JobRunner, JobStopped
from .models import ModelSpec, Preprocessing, build, load_weights

log = logging.getLogger("trapline.trainer.finetune")

MAX_EPOCHS = 200


@dataclass
class FineTuneParams:
    project: str = "default"
    base_version: str = ""
    loss: str = "triplet"
    epochs: int = 3
    margin: float = 0.2
    seed: int = 0
    classes_per_batch: int = 8
    crops_per_class: int = 4
    train_blocks: int = 2
    lr: float = 1e-3
    device: str = "auto"
    extra: dict = field(default_factory=dict)


def validate_params(p: FineTuneParams) -> None:
    if p.loss not in ("triplet", "cross_entropy"):
        raise InvalidArgument(f"unknown loss {p.loss!r}", field="loss")
    if not 1 <= p.epochs <= MAX_EPOCHS:
        raise InvalidArgument(f"epochs must be in 1..{MAX_EPOCHS}", field="epochs")
    if not 0 < p.margin <= 2:
        raise InvalidArgument("margin must be in (0, 2]: vectors are L2-normalized", field="margin")
    if p.classes_per_batch < 2:
        raise InvalidArgument("classes_per_batch (P) must be >= 2", field="classes_per_batch")
    if p.crops_per_class < 2:
        raise InvalidArgument("crops_per_class (K) must be >= 2", field="crops_per_class")


def check_classes(labels: Sequence[str]) -> None:
    if any(not label for label in labels):
        raise InvalidArgument("every crop needs a label", field="crops")
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    if len(classes) < 2:
        raise InvalidArgument(f"fine-tuning needs at least two classes; got {len(classes)} "
                              f"({', '.join(classes.tolist()) or 'none'})", field="crops")
    if (counts >= 2).sum() < 2:
        raise InvalidArgument("fine-tuning needs at least two classes with at least two crops each; got "
                              + ", ".join(f"{c}: {n}" for c, n in zip(classes.tolist(), counts.tolist())),
                              field="crops")


def to_pixels(data: bytes, field: str) -> np.ndarray:
    image = decode(data, field)
    if image.size != (CROP_SIZE, CROP_SIZE):
        image = image.resize((CROP_SIZE, CROP_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image)


def _write_inputs(d: Path, crops: Sequence[bytes], labels: Sequence[str], ids: Sequence[str]) -> None:
    blob = np.frombuffer(b"".join(crops), np.uint8)
    offsets = np.cumsum([0] + [len(c) for c in crops]).astype(np.int64)
    np.savez(d / "inputs.npz", blob=blob, offsets=offsets)
    (d / "labels.json").write_text(json.dumps({"labels": list(labels), "ids": list(ids)}))


def _read_inputs(d: Path) -> tuple[list[bytes], list[str]]:
    with np.load(d / "inputs.npz", allow_pickle=False) as z:
        blob, offsets = z["blob"].tobytes(), z["offsets"]
    crops = [blob[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    return crops, json.loads((d / "labels.json").read_text())["labels"]


def resolve_base(store: ModelStore, base_version: str, active: str) -> str:
    version = base_version or active
    if not version:
        raise FailedPrecondition("no base version: name one, or publish a model to the store first",
                                 field="base_version")
    stored = store.get(version, "base_version")
    if stored.weights_path is None:
        raise FailedPrecondition(f"model version {version!r} has no torch weights (weights.npz) to start from",
                                 field="base_version")
    return version


def submit_finetune(runner: JobRunner, store: ModelStore, params: FineTuneParams, crops: Sequence[bytes],
                    labels: Sequence[str], ids: Sequence[str] = (), active_version: str = "") -> "object":
    """Validate, store the inputs, queue the job; returns the queued Job."""
    validate_params(params)
    if len(crops) != len(labels):
        raise InvalidArgument(f"{len(crops)} crops for {len(labels)} labels", field="crops")
    check_classes(labels)
    for i, data in enumerate(crops):
        to_pixels(data, f"crops[{i}]")  # fail now, with the crop's index, not later inside the job
    params.base_version = resolve_base(store, params.base_version, active_version)
    job_id, d = runner.new_job_dir()
    _write_inputs(d, crops, labels, list(ids) or [str(i) for i in range(len(crops))])
    return runner.submit(job_id, "fine_tune", asdict(params), total=params.epochs, unit="epochs")


def run_finetune(ctx: JobContext, store: ModelStore, threads: int = 0) -> dict[str, str]:
    """The job's work: fine-tune from the base version, export, check parity, publish a new version."""
    import torch

    from .engine import FineTuneConfig, Progress, Stopped, finetune
    from .export import publish_model
    from .presets import EvalPreset

    if threads:
        torch.set_num_threads(threads)
    p = FineTuneParams(**ctx.params)
    crops, labels = _read_inputs(ctx.dir)
    pixels = [to_pixels(c, f"crops[{i}]") for i, c in enumerate(crops)]
    base = store.verify(p.base_version)
    spec = ModelSpec.from_dict(base.manifest["architecture"])
    pre_d = base.manifest["preprocessing"]
    pre = Preprocessing(size=int(pre_d["size"]), mean=tuple(pre_d["mean"]), std=tuple(pre_d["std"]),
                        scale=float(pre_d.get("scale", 1 / 255.0)))
    model = build(spec.arch, spec.dim, weights=load_weights(base.weights_path), pretrained=spec.base == "imagenet",
                  image_size=spec.image_size, seed=p.seed)
    cfg = FineTuneConfig(loss=p.loss, epochs=p.epochs, margin=p.margin, classes_per_batch=p.classes_per_batch,
                         crops_per_class=p.crops_per_class, train_blocks=p.train_blocks, lr=p.lr, seed=p.seed,
                         device=p.device)
    ctx.update(done=0, total=p.epochs, unit="epochs", message=f"fine-tuning {p.base_version} on {len(crops)} crops")

    def progress(pr: Progress) -> None:
        ctx.update(done=pr.epoch if pr.step == pr.steps else pr.epoch - 1,
                   eta=pr.eta, message=f"epoch {pr.epoch}/{pr.epochs} step {pr.step}/{pr.steps}",
                   metrics={"epoch": float(pr.epoch), "step": float(pr.step), "steps": float(pr.steps),
                            "loss": pr.loss})

    t0 = time.perf_counter()
    try:
        stats = finetune(model, pixels, labels, cfg, preprocessing=pre, on_progress=progress,
                         should_stop=ctx.should_stop, checkpoint=ctx.dir / "checkpoint.pt")
    except Stopped:
        raise JobStopped() from None
    ctx.update(message="exporting to ONNX and checking parity")
    parity_inputs = torch.stack([EvalPreset(pre)(px) for px in pixels[:8]]).numpy()
    version = store.next_version("ft")
    classes = sorted(set(labels))
    stored = publish_model(
        store, model, version=version, parent_version=p.base_version, spec=spec, preprocessing=pre,
        training={"job_id": ctx.job_id, "project": p.project, "loss": p.loss, "margin": p.margin,
                  "epochs": p.epochs, "seed": p.seed, "classes_per_batch": p.classes_per_batch,
                  "crops_per_class": p.crops_per_class, "train_blocks": p.train_blocks, "lr": p.lr,
                  "data": {"crops": len(crops), "classes": len(classes), "class_names": classes[:200]}},
        metrics={"final_loss": stats["final_loss"], "train_seconds": stats["train_seconds"],
                 "seconds_per_1000_crops_per_epoch": 1000 * (time.perf_counter() - t0) / max(1, len(crops) * p.epochs)},
        parity_inputs=parity_inputs,
    )
    (ctx.dir / "checkpoint.pt").unlink(missing_ok=True)
    ctx.update(done=p.epochs, metrics={"onnx_parity_max_abs_diff": stored.manifest["metrics"]["onnx_parity_max_abs_diff"]})
    return {"model_version": stored.version, "parent_version": p.base_version, "uri": stored.uri}
