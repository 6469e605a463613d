"""Uncertainty sampling on the classifier's probabilities: ``confidence``, ``margin``, ``entropy``.

* confidence: lowest top probability first (score: the top probability);
* margin: smallest gap between the two most probable classes first (score: the gap);
* entropy: highest ``-sum p log p`` first (score: the entropy, nats).

Only points with a prediction compete; ties go to the lower row index.
"""

from __future__ import annotations

import numpy as np

from trapline.runtime import errors

from . import Pool, Selection, available, register, take_ranked


def top_probability(p: np.ndarray) -> np.ndarray:
    return p.max(axis=1)


def margin(p: np.ndarray) -> np.ndarray:
    if p.shape[1] < 2:
        return p[:, 0].astype(np.float64)
    top2 = -np.partition(-p, 1, axis=1)[:, :2]
    return (top2[:, 0] - top2[:, 1]).astype(np.float64)


def entropy(p: np.ndarray) -> np.ndarray:
    q = p.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(q > 0, q * np.log(q), 0.0).sum(axis=1)


def predicted_candidates(pool: Pool, count: int, strategy: str) -> np.ndarray:
    """Candidate rows that have a prediction; FailedPrecondition if there are none or too few."""
    cand = pool.candidates()
    rows = np.flatnonzero(cand & pool.predicted())
    if len(rows) == 0:
        raise errors.FailedPrecondition(
            f"strategy {strategy!r} ranks by the classifier's probabilities, but none of the "
            f"{int(cand.sum())} candidate points has a prediction yet: call SetPredictions first",
            field="strategy")
    mask = np.zeros(len(cand), bool)
    mask[rows] = True
    n = available(pool, mask)
    if n < count:
        raise errors.FailedPrecondition(
            f"asked for {count} but only {n} candidate points have predictions", field="count")
    return rows


def _ranked(pool: Pool, count: int, strategy: str, measure, ascending: bool) -> Selection:
    rows = predicted_candidates(pool, count, strategy)
    values = measure(pool.probabilities[rows])
    order = np.argsort(values if ascending else -values, kind="stable")
    chosen = take_ranked(rows[order], count, pool)
    return Selection(chosen, measure(pool.probabilities[chosen]))


@register("confidence")
def confidence(pool: Pool, count: int, rng: np.random.Generator) -> Selection:
    return _ranked(pool, count, "confidence", top_probability, ascending=True)


@register("margin")
def margin_strategy(pool: Pool, count: int, rng: np.random.Generator) -> Selection:
    return _ranked(pool, count, "margin", margin, ascending=True)


@register("entropy")
def entropy_strategy(pool: Pool, count: int, rng: np.random.Generator) -> Selection:
    return _ranked(pool, count, "entropy", entropy, ascending=False)
