"""The paper's classifier: an MLP with one hidden layer of 100 units on embedding vectors.

Training (torch, deterministic under a seed) holds out a stratified fraction of the labelled rows and
reports accuracy, per-class recall and the confusion matrix on it, then refits on *all* rows so the
returned classifier uses every label. Prediction is plain numpy in chunks (no torch, no autograd):
millions of vectors go through two matrix products and a softmax.

Classifiers are stored per project in a folder: ``<root>/<project>/<version>/`` with ``weights.npz``
(no pickles) and ``meta.json``, written via a temporary folder and a rename.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trapline.runtime.errors import InvalidArgument, NotFound

HIDDEN = 100
PROJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class Metrics:
    accuracy: float
    per_class_recall: dict[str, float]
    confusion: np.ndarray  # int64 [classes, classes], rows true, columns predicted
    holdout_size: int


@dataclass
class Classifier:
    """A trained MLP: weights as numpy arrays, class names in column order."""

    classes: list[str]
    w1: np.ndarray  # [d, 100]
    b1: np.ndarray
    w2: np.ndarray  # [100, c]
    b2: np.ndarray
    version: str = ""
    metrics: Metrics | None = None
    info: dict = field(default_factory=dict)

    @property
    def dimension(self) -> int:
        return self.w1.shape[0]

    def predict_proba(self, vectors: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """Class probabilities float32 [n, classes]."""
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dimension:
            raise InvalidArgument(f"vectors must be [n, {self.dimension}], got {list(x.shape)}", field="vectors")
        out = np.empty((len(x), len(self.classes)), np.float32)
        for s in range(0, len(x), chunk):
            h = x[s:s + chunk] @ self.w1
            h += self.b1
            np.maximum(h, 0, out=h)
            z = h @ self.w2
            z += self.b2
            z -= z.max(axis=1, keepdims=True)
            np.exp(z, out=z)
            z /= z.sum(axis=1, keepdims=True)
            out[s:s + len(z)] = z
        return out


def _check(vectors: np.ndarray, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise InvalidArgument(f"vectors must be a non-empty [n, d] matrix, got {list(x.shape)}", field="vectors")
    if len(labels) != len(x):
        raise InvalidArgument(f"{len(labels)} labels for {len(x)} vectors", field="labels")
    if not np.isfinite(x).all():
        raise InvalidArgument("vectors contain NaN or infinity", field="vectors")
    y = np.asarray(labels)
    if any(not str(label) for label in labels):
        raise InvalidArgument("empty class name", field="labels")
    if len(np.unique(y)) < 2:
        raise InvalidArgument("a classifier needs at least two classes", field="labels")
    return x, y


def stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out rows: about ``fraction`` of each class that has at least two rows."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) < 2:
            continue
        n = min(len(idx) - 1, max(1, int(round(len(idx) * fraction))))
        mask[rng.permutation(idx)[:n]] = True
    return mask


def _fit(x: np.ndarray, y_idx: np.ndarray, n_classes: int, seed: int, threads: int = 0) -> tuple[np.ndarray, ...]:
    """Mini-batch Adam on softmax cross-entropy in float32 numpy, on one BLAS thread.

    Not torch: on [256, 256] x [256, 100] matrices torch's per-op overhead and thread pool only cost time.
    One BLAS thread: with the cores shared (other services, a fine-tune), multi-threaded BLAS on tiny
    matrices was measured 10x slower (38.7 s vs 3.8 s for 25k rows). ``threads`` is kept for the API.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        return _fit_numpy(x, y_idx, n_classes, seed)
    with threadpool_limits(limits=1, user_api="blas"):
        return _fit_numpy(x, y_idx, n_classes, seed)


def _fit_numpy(x: np.ndarray, y_idx: np.ndarray, n_classes: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    n, d = x.shape
    x = np.ascontiguousarray(x, np.float32)
    # PyTorch's nn.Linear initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    b = 1 / np.sqrt(d)
    params = [rng.uniform(-b, b, (d, HIDDEN)).astype(np.float32), rng.uniform(-b, b, HIDDEN).astype(np.float32)]
    b = 1 / np.sqrt(HIDDEN)
    params += [rng.uniform(-b, b, (HIDDEN, n_classes)).astype(np.float32),
               rng.uniform(-b, b, n_classes).astype(np.float32)]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    batch = 256 if n > 2048 else min(64, n)
    # About 20 epochs, but at least 300 and at most 1500 steps: small label sets still converge and
    # 25k labels retrain in about a second (the loop retrains after every labelled batch).
    steps = int(np.clip(20 * np.ceil(n / batch), 300, 1500))
    lr0, wd, beta1, beta2, eps = 3e-3, 1e-4, 0.9, 0.999, 1e-8
    onehot = np.eye(n_classes, dtype=np.float32)
    perm, pos = rng.permutation(n), 0
    for t in range(1, steps + 1):
        if pos + batch > n:
            perm, pos = rng.permutation(n), 0
        idx = perm[pos:pos + batch]
        pos += batch
        xb, w1, b1, w2, b2 = x[idx], *params
        h = xb @ w1 + b1
        np.maximum(h, 0, out=h)
        z = h @ w2 + b2
        z -= z.max(1, keepdims=True)
        e = np.exp(z)
        g = e / e.sum(1, keepdims=True)
        g -= onehot[y_idx[idx]]
        g /= len(idx)
        gw2, gb2 = h.T @ g, g.sum(0)
        gh = g @ w2.T
        gh *= h > 0
        grads = [xb.T @ gh, gh.sum(0), gw2, gb2]
        lr = lr0 * 0.5 * (1 + np.cos(np.pi * (t - 1) / steps))  # cosine schedule, as CosineAnnealingLR
        c1, c2 = 1 - beta1 ** t, 1 - beta2 ** t
        for p, gr, mm, vv in zip(params, grads, m, v):
            gr += wd * p  # Adam's L2 weight decay
            mm *= beta1
            mm += (1 - beta1) * gr
            vv *= beta2
            vv += (1 - beta2) * gr * gr
            p -= (lr / c1) * mm / (np.sqrt(vv / c2) + eps)
    return tuple(p.copy() for p in params)


def evaluate(clf: Classifier, x: np.ndarray, y: np.ndarray) -> Metrics:
    classes = clf.classes
    index = {c: i for i, c in enumerate(classes)}
    truth = np.array([index[v] for v in y.tolist()], dtype=np.int64)
    pred = clf.predict_proba(x).argmax(1) if len(x) else np.zeros(0, np.int64)
    confusion = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(confusion, (truth, pred), 1)
    recall = {}
    for i, c in enumerate(classes):
        total = confusion[i].sum()
        if total:
            recall[c] = float(confusion[i, i] / total)
    acc = float((pred == truth).mean()) if len(truth) else float("nan")
    return Metrics(acc, recall, confusion, int(len(truth)))


def fit(vectors: np.ndarray, labels: Sequence[str], *, seed: int = 0, threads: int = 0) -> Classifier:
    """Train on every row, no hold-out (experiments that split the data themselves)."""
    x, y = _check(vectors, labels)
    classes = sorted(np.unique(y).tolist())
    index = {c: i for i, c in enumerate(classes)}
    return Classifier(classes, *_fit(x, np.array([index[v] for v in y.tolist()]), len(classes), seed, threads))


def train(vectors: np.ndarray, labels: Sequence[str], *, holdout_fraction: float = 0.0, seed: int = 0,
          threads: int = 0, refit: bool = True) -> Classifier:
    """Train on labelled vectors; metrics on a stratified hold-out (0 means 0.2); then refit on all rows."""
    x, y = _check(vectors, labels)
    if not 0 <= holdout_fraction <= 0.5:
        raise InvalidArgument("holdout_fraction must be in [0, 0.5]", field="holdout_fraction")
    fraction = holdout_fraction or 0.2
    classes = sorted(np.unique(y).tolist())
    index = {c: i for i, c in enumerate(classes)}
    y_idx = np.array([index[v] for v in y.tolist()])
    t0 = time.perf_counter()
    held = stratified_holdout(y, fraction, seed)
    metrics = None
    if held.any() and len(np.unique(y[~held])) >= 2:
        clf = Classifier(classes, *_fit(x[~held], y_idx[~held], len(classes), seed, threads))
        metrics = evaluate(clf, x[held], y[held])
    if refit or metrics is None:
        clf = Classifier(classes, *_fit(x, y_idx, len(classes), seed, threads))
    if metrics is None:
        metrics = Metrics(float("nan"), {}, np.zeros((len(classes), len(classes)), np.int64), 0)
    clf.metrics = metrics
    clf.info = {"rows": int(len(x)), "train_seconds": time.perf_counter() - t0, "seed": seed,
                "holdout_fraction": fraction, "hidden": HIDDEN}
    return clf


class ClassifierStore:
    """Trained classifiers per project under a folder; versions ``clf-0001``, ``clf-0002``, ..."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._cache: dict[tuple[str, str], Classifier] = {}

    @staticmethod
    def check_project(project: str) -> str:
        if not PROJECT_RE.match(project or ""):
            raise InvalidArgument(f"{project!r} is not a project id (letters, digits, '.', '_', '-')", field="project")
        return project

    def versions(self, project: str) -> list[str]:
        d = self.root / self.check_project(project)
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.name.startswith("clf-") and (p / "meta.json").is_file())

    def save(self, project: str, clf: Classifier) -> str:
        d = self.root / self.check_project(project)
        d.mkdir(parents=True, exist_ok=True)
        existing = self.versions(project)
        n = int(existing[-1].split("-")[1]) if existing else 0
        tmp = d / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            np.savez(tmp / "weights.npz", w1=clf.w1, b1=clf.b1, w2=clf.w2, b2=clf.b2)
            m = clf.metrics
            meta = {"classes": clf.classes, "info": clf.info, "created_at": time.time(),
                    "metrics": None if m is None else {"accuracy": m.accuracy, "per_class_recall": m.per_class_recall,
                                                       "confusion": m.confusion.tolist(),
                                                       "holdout_size": m.holdout_size}}
            (tmp / "meta.json").write_text(json.dumps(meta))
            while True:
                n += 1
                version = f"clf-{n:04d}"
                try:
                    os.rename(tmp, d / version)
                    break
                except OSError:
                    if n > len(existing) + 1000:
                        raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        clf.version = version
        self._cache[(project, version)] = clf
        return version

    def load(self, project: str, version: str = "") -> Classifier:
        versions = self.versions(project)
        if not versions:
            raise NotFound(f"project {project!r} has no trained classifier yet; call TrainClassifier first",
                           field="project")
        version = version or versions[-1]
        key = (project, version)
        if key in self._cache:
            return self._cache[key]
        d = self.root / project / version
        if version not in versions:
            raise NotFound(f"project {project!r} has no classifier version {version!r} (latest: {versions[-1]})",
                           field="classifier_version")
        meta = json.loads((d / "meta.json").read_text())
        with np.load(d / "weights.npz", allow_pickle=False) as z:
            clf = Classifier(meta["classes"], z["w1"], z["b1"], z["w2"], z["b2"], version=version, info=meta["info"])
        self._cache[key] = clf
        return clf
