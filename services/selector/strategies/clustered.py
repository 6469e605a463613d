"""Uncertainty plus diversity: ``informative_diverse`` and ``margin_cluster_mean``.

* informative_diverse: cluster the candidate points (k-means, k = count) and fill each cluster's share of
  the batch, proportional to its size, with its most uncertain points (smallest margin).
* margin_cluster_mean: take the points inside the classifier's margin (the ``10 * count`` smallest
  margins), cluster them into ``count`` clusters and pick the point nearest each cluster's mean.

Scores are the margins of the chosen points. k-means is fitted on at most ``FIT_SAMPLE`` points (seeded),
then every candidate is assigned to its nearest mean, so a million candidates cost one GEMM pass.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans

from . import Pool, Selection, register, take_ranked
from .uncertainty import margin, predicted_candidates

FIT_SAMPLE = 20_000
MARGIN_FACTOR = 10


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Cluster means of ``x`` (float32 [m, d]) with k-means fitted on a seeded sample."""
    fit = x if len(x) <= FIT_SAMPLE else x[np.sort(rng.choice(len(x), FIT_SAMPLE, replace=False))]
    km = KMeans(n_clusters=min(k, len(fit)), n_init=1, max_iter=100,
                random_state=int(rng.integers(2**31 - 1))).fit(fit)
    return km.cluster_centers_.astype(np.float32)


def _assign(x: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest mean of each row and the squared distance to it."""
    labels = np.empty(len(x), np.int64)
    dist = np.empty(len(x), np.float32)
    mn = (means ** 2).sum(1)
    for a in range(0, len(x), 65536):
        xc = x[a: a + 65536]
        d2 = (xc ** 2).sum(1)[:, None] + mn[None, :] - 2.0 * xc @ means.T
        labels[a: a + len(xc)] = d2.argmin(1)
        dist[a: a + len(xc)] = d2.min(1)
    return labels, dist


def _quotas(sizes: np.ndarray, count: int) -> np.ndarray:
    """Largest-remainder split of ``count`` proportional to ``sizes``."""
    exact = sizes / sizes.sum() * count
    q = np.floor(exact).astype(np.int64)
    rest = count - int(q.sum())
    q[np.argsort(-(exact - q), kind="stable")[:rest]] += 1
    return q


def _fill(chosen: list[int], order: np.ndarray, count: int, pool: Pool) -> np.ndarray:
    """Top up ``chosen`` from ``order`` (best first) to ``count`` points, respecting one-per-sequence."""
    picked = np.asarray(chosen, dtype=np.int64)
    if len(picked) < count:
        rest = order[~np.isin(order, picked)]
        if pool.one_per_sequence and pool.sequences is not None:
            used = pool.sequences[picked]
            rest = rest[~np.isin(pool.sequences[rest], used[used >= 0])]
        picked = np.concatenate([picked, take_ranked(rest, count - len(picked), pool)])
    return picked[:count]


def _per_cluster(groups: list[np.ndarray], quotas: list[int], pool: Pool) -> list[int]:
    """Walk each cluster's ranked rows taking its quota, skipping sequences already used in the batch."""
    chosen: list[int] = []
    used: set[int] = set()
    for rows, want in zip(groups, quotas):
        got = 0
        for r in rows:
            if got >= want:
                break
            s = int(pool.sequences[r]) if pool.one_per_sequence and pool.sequences is not None else -1
            if s >= 0 and s in used:
                continue
            if s >= 0:
                used.add(s)
            chosen.append(int(r))
            got += 1
    return chosen


@register("informative_diverse")
def informative_diverse(pool: Pool, count: int, rng: np.random.Generator) -> Selection:
    rows = predicted_candidates(pool, count, "informative_diverse")
    m = margin(pool.probabilities[rows])
    x = np.asarray(pool.vectors[rows], dtype=np.float32)
    labels, _ = _assign(x, _kmeans(x, count, rng))
    order = np.argsort(m, kind="stable")  # most uncertain first
    sizes = np.bincount(labels, minlength=labels.max() + 1)
    quotas = _quotas(sizes.astype(np.float64), count)
    groups = [rows[order[labels[order] == c]] for c in range(len(sizes))]
    chosen = _per_cluster(groups, list(quotas), pool)
    picked = _fill(chosen, rows[order], count, pool)
    return Selection(picked, margin(pool.probabilities[picked]))


@register("margin_cluster_mean")
def margin_cluster_mean(pool: Pool, count: int, rng: np.random.Generator) -> Selection:
    rows = predicted_candidates(pool, count, "margin_cluster_mean")
    m = margin(pool.probabilities[rows])
    inside = rows[np.argsort(m, kind="stable")[: max(count * MARGIN_FACTOR, count)]]
    x = np.asarray(pool.vectors[inside], dtype=np.float32)
    labels, dist = _assign(x, _kmeans(x, count, rng))
    sizes = np.bincount(labels, minlength=labels.max() + 1)
    groups = []
    for c in np.argsort(-sizes, kind="stable"):  # biggest clusters first
        members = np.flatnonzero(labels == c)
        groups.append(inside[members[np.argsort(dist[members], kind="stable")]])
    chosen = _per_cluster(groups, [1] * len(groups), pool)
    picked = _fill(chosen, inside, count, pool)
    return Selection(picked, margin(pool.probabilities[picked]))
