"""The paper's experiments as a harness: active learning with an oracle that answers from ground truth.

Input is a features file (``.npz``): ``vectors`` float32 [n, d], ``labels`` [n] (class names or ids), and
optionally ``locations`` and ``sequences`` [n]. Several files can be compared (e.g. triplet vs
cross-entropy embeddings, crops vs full frames); each is run with several strategies and seeds.

The loop is the paper's Algorithm 2 at any scale: label ``seed_size`` random points, then repeatedly
train the classifier (the trainer's MLP), measure accuracy on the held-out points, and ask the strategy
(the selector's implementation, the same code the service runs) for ``batch_size`` more.
Held-out points are a random fraction of the sequences (of the points, when the file has no sequences), or
whole locations (``holdout_locations``), the generalisation the paper argues for.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class Features:
    name: str
    vectors: np.ndarray
    labels: np.ndarray
    locations: np.ndarray | None = None
    sequences: np.ndarray | None = None

    @classmethod
    def proxy(cls, name: str) -> "Features":
        """A larger real data set that installs offline, named as a proxy (not camera-trap data).

        ``sklearn:digits``: scikit-learn's bundled handwritten digits (1,797 images, 10 classes, 64 features
        scaled to [0, 1]).
        """
        if name != "sklearn:digits":
            raise ValueError(f"unknown proxy {name!r}; available: sklearn:digits")
        from sklearn.datasets import load_digits

        digits = load_digits()
        return cls("digits (proxy)", (digits.data / 16.0).astype(np.float32), digits.target.astype(str))

    @classmethod
    def load(cls, path: Path, name: str | None = None) -> "Features":
        with np.load(path, allow_pickle=False) as data:
            if "vectors" not in data or "labels" not in data:
                raise ValueError(f"{path}: a features file needs arrays 'vectors' and 'labels' (has {list(data)})")
            vectors = np.ascontiguousarray(data["vectors"], dtype=np.float32)
            labels = data["labels"].astype(str)
            if vectors.ndim != 2 or len(vectors) != len(labels):
                raise ValueError(f"{path}: vectors must be [n, d] with one label per row")
            if not np.isfinite(vectors).all():
                raise ValueError(f"{path}: vectors contain NaN or inf")
            locations = data["locations"].astype(str) if "locations" in data else None
            sequences = data["sequences"].astype(str) if "sequences" in data else None
        return cls(name or path.stem, vectors, labels, locations, sequences)


@dataclasses.dataclass(frozen=True)
class Config:
    strategies: Sequence[str] = ("kcenter", "random")
    seeds: Sequence[int] = (0, 1, 2)
    seed_size: int = 100
    batch_size: int = 50
    budget: int = 1000
    test_fraction: float = 0.25
    holdout_locations: bool = False


@dataclasses.dataclass(frozen=True)
class Point:
    features: str
    strategy: str
    seed: int
    labels: int
    accuracy: float


# (labelled vectors, their labels, vectors to predict, seed) -> (classes, probabilities [m, classes])
TrainPredict = Callable[[np.ndarray, np.ndarray, np.ndarray, int], tuple[list[str], np.ndarray]]
# (strategy, vectors, labelled mask, probabilities or None, count, seed, sequences) -> chosen indices
Select = Callable[[str, np.ndarray, np.ndarray, np.ndarray | None, int, int, np.ndarray | None], np.ndarray]


def split(features: Features, config: Config, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the pool (labelable) and of the held-out test points."""
    rng = np.random.default_rng(10_000 + seed)
    n = len(features.labels)
    if config.holdout_locations:
        if features.locations is None:
            raise ValueError(f"{features.name}: --holdout-locations needs a 'locations' array in the features file")
        locs = np.unique(features.locations)
        if len(locs) < 2:
            raise ValueError(f"{features.name}: only one location; nothing to hold out")
        n_test = max(1, round(len(locs) * config.test_fraction))
        test_locs = set(rng.choice(locs, size=n_test, replace=False).tolist())
        is_test = np.array([loc in test_locs for loc in features.locations])
    elif features.sequences is not None:
        # whole sequences (bursts, or the crops of one frame) go to one side, so near-duplicates never
        # sit on both sides of the split
        seqs = np.unique(features.sequences)
        n_test = max(1, round(len(seqs) * config.test_fraction))
        test_seqs = set(rng.choice(seqs, size=n_test, replace=False).tolist())
        is_test = np.array([q in test_seqs for q in features.sequences])
    else:
        is_test = np.zeros(n, dtype=bool)
        is_test[rng.choice(n, size=max(1, round(n * config.test_fraction)), replace=False)] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def run_one(features: Features, strategy: str, seed: int, config: Config, train_predict: TrainPredict,
            select: Select) -> list[Point]:
    pool, test = split(features, config, seed)
    X, y = features.vectors[pool], features.labels[pool]
    seqs = features.sequences[pool] if features.sequences is not None else None
    rng = np.random.default_rng(seed)
    labelled = np.zeros(len(pool), dtype=bool)
    labelled[rng.choice(len(pool), size=min(config.seed_size, len(pool)), replace=False)] = True
    points: list[Point] = []
    budget = min(config.budget, len(pool))
    while True:
        classes, probs_all = train_predict(X[labelled], y[labelled], np.concatenate([X, features.vectors[test]]), seed)
        probs_pool, probs_test = probs_all[: len(X)], probs_all[len(X):]
        predicted = np.asarray(classes)[probs_test.argmax(axis=1)]
        accuracy = float((predicted == features.labels[test]).mean())
        points.append(Point(features.name, strategy, seed, int(labelled.sum()), accuracy))
        remaining = budget - int(labelled.sum())
        if remaining <= 0:
            return points
        count = min(config.batch_size, remaining)
        chosen = select(strategy, X, labelled, probs_pool, count, seed * 7919 + int(labelled.sum()), seqs)
        if len(chosen) == 0 or labelled[chosen].any():
            raise RuntimeError(f"strategy {strategy} returned {len(chosen)} points, some already labelled")
        labelled[chosen] = True


def run(features_list: Sequence[Features], config: Config, train_predict: TrainPredict, select: Select,
        on_curve: Callable[[list[Point]], None] | None = None) -> list[Point]:
    """Every (features, strategy, seed) curve; ``on_curve`` hears of each as it ends. A ValueError names the run."""
    points: list[Point] = []
    for features in features_list:
        for strategy in config.strategies:
            for seed in config.seeds:
                try:
                    curve = run_one(features, strategy, seed, config, train_predict, select)
                except ValueError as exc:
                    raise ValueError(f"{features.name} / {strategy}: {exc}") from None
                points.extend(curve)
                if on_curve:
                    on_curve(curve)
    return points


def write_csv(points: Sequence[Point], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["features", "strategy", "seed", "labels", "accuracy"])
        for p in points:
            writer.writerow([p.features, p.strategy, p.seed, p.labels, f"{p.accuracy:.4f}"])


def summarise(points: Sequence[Point]) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(features, strategy) -> (labels, mean accuracy, std accuracy) over seeds."""
    out: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    keys = sorted({(p.features, p.strategy) for p in points})
    for key in keys:
        sel = [p for p in points if (p.features, p.strategy) == key]
        labels = np.array(sorted({p.labels for p in sel}))
        acc = [[p.accuracy for p in sel if p.labels == n] for n in labels]
        out[key] = (labels, np.array([np.mean(a) for a in acc]), np.array([np.std(a) for a in acc]))
    return out


def labels_to_reach(points: Sequence[Point], target: float) -> dict[tuple[str, str], float]:
    """Labels each (features, strategy) needs for its mean accuracy to reach ``target`` (nan if never)."""
    result = {}
    for key, (labels, mean, _std) in summarise(points).items():
        hit = np.flatnonzero(mean >= target)
        result[key] = float(labels[hit[0]]) if len(hit) else math.nan
    return result


def table(points: Sequence[Point], target: float | None = None) -> str:
    rows = ["| features | strategy | labels | accuracy (mean ± sd over seeds) |" + (
        f" labels to reach {target:.2f} |" if target else ""), "|---|---|---|---|" + ("---|" if target else "")]
    reach = labels_to_reach(points, target) if target else {}
    for key, (labels, mean, std) in summarise(points).items():
        marks = [0, len(labels) // 2, len(labels) - 1]
        cells = ", ".join(f"{labels[i]}: {mean[i]:.3f} ± {std[i]:.3f}" for i in sorted(set(marks)))
        extra = ""
        if target:
            r = reach[key]
            extra = f" {'not reached' if math.isnan(r) else int(r)} |"
        rows.append(f"| {key[0]} | {key[1]} | {labels[-1]} | {cells} |" + extra)
    return "\n".join(rows)


def plot(points: Sequence[Point], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for (feat, strategy), (labels, mean, std) in summarise(points).items():
        name = strategy if len({p.features for p in points}) == 1 else f"{feat} / {strategy}"
        ax.plot(labels, mean, label=name)
        ax.fill_between(labels, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("human labels")
    ax.set_ylabel("accuracy on held-out points")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
