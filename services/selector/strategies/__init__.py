"""Selection strategies behind one interface, chosen by name.

A strategy sees a :class:`Pool` (vectors, which points are labelled, which may be picked, the classifier's
probabilities, sequence codes) and returns a :class:`Selection`. Every strategy lives in its own small module
and registers itself in :data:`STRATEGIES`; :func:`select` validates the request and dispatches::

    select("kcenter", Pool(vectors, labelled), count=100)

Nothing here imports grpc; errors are ``trapline.runtime.errors`` with the offending field named.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from trapline.runtime import errors

from ..kcenter import KCenter


@dataclasses.dataclass
class Pool:
    """What a strategy may look at. Row ``i`` of every array is the same point."""

    vectors: np.ndarray  # [n, d] float32, a memmap is fine
    labelled: np.ndarray  # bool [n]
    eligible: np.ndarray | None = None  # bool [n]: may be picked (filters); labelled points never are
    probabilities: np.ndarray | None = None  # float32 [n, classes]; rows without a prediction are NaN
    sequences: np.ndarray | None = None  # int [n] sequence codes, -1 when unknown
    one_per_sequence: bool = False
    kcenter: KCenter | None = None  # k-Center state kept between rounds (warm starts)

    def candidates(self) -> np.ndarray:
        """bool [n]: unlabelled points that pass the filters."""
        ok = ~np.asarray(self.labelled, dtype=bool)
        if self.eligible is not None:
            ok &= self.eligible
        return ok

    def predicted(self) -> np.ndarray:
        if self.probabilities is None:
            return np.zeros(len(self.labelled), bool)
        return ~np.isnan(self.probabilities[:, 0])


@dataclasses.dataclass(frozen=True)
class Selection:
    """Chosen row indices in pick order and one score each (what the strategy ranked by)."""

    indices: np.ndarray
    scores: np.ndarray


Strategy = Callable[[Pool, int, np.random.Generator], Selection]

STRATEGIES: dict[str, Strategy] = {}


def register(name: str) -> Callable[[Strategy], Strategy]:
    def deco(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        return fn

    return deco


def available(pool: Pool, candidates: np.ndarray | None = None) -> int:
    """How many points a batch can hold: candidates, or distinct sequences when one crop per sequence."""
    cand = pool.candidates() if candidates is None else candidates
    if not pool.one_per_sequence or pool.sequences is None:
        return int(cand.sum())
    seqs = pool.sequences[cand]
    return int((seqs < 0).sum()) + len(np.unique(seqs[seqs >= 0]))


def take_ranked(order: np.ndarray, count: int, pool: Pool) -> np.ndarray:
    """The first ``count`` of ``order`` (row indices, best first), skipping repeated sequences if asked."""
    if not pool.one_per_sequence or pool.sequences is None:
        return np.asarray(order[:count], dtype=np.int64)
    seq = pool.sequences[order]
    first = np.ones(len(order), bool)
    known = seq >= 0
    _, where = np.unique(seq[known], return_index=True)
    keep_known = np.zeros(int(known.sum()), bool)
    keep_known[where] = True  # np.unique's return_index is the first occurrence in ``order``
    first[known] = keep_known
    return np.asarray(order[first][:count], dtype=np.int64)


def strategy_names() -> list[str]:
    return sorted(STRATEGIES)


def select(name: str, pool: Pool, count: int, seed: int | None = None) -> Selection:
    """Validate and run strategy ``name``; raises InvalidArgument/FailedPrecondition naming the field."""
    fn = STRATEGIES.get(name)
    if fn is None:
        raise errors.InvalidArgument(f"unknown strategy {name!r}; choose one of {', '.join(strategy_names())}",
                                     field="strategy")
    if count < 1:
        raise errors.InvalidArgument(f"must be at least 1, got {count}", field="count")
    n_avail = available(pool)
    if count > n_avail:
        what = "sequences" if pool.one_per_sequence and pool.sequences is not None else "points"
        raise errors.InvalidArgument(
            f"asked for {count} but only {n_avail} unlabelled {what} match the filter", field="count")
    rng = np.random.default_rng(seed)
    return fn(pool, count, rng)


def select_indices(strategy: str, vectors: np.ndarray, labelled: np.ndarray, probabilities: np.ndarray | None,
                   count: int, seed: int, sequences: np.ndarray | None = None) -> np.ndarray:
    """Row indices to label next: the signature ``trapline.simulate`` expects (sequences: any labels, or None).

    With ``sequences`` given, at most one point per sequence is taken, as the service does with
    ``one_per_sequence``.
    """
    codes = None
    if sequences is not None:
        seq = np.asarray(sequences).astype(str)
        _, codes = np.unique(seq, return_inverse=True)
        codes = np.where(seq == "", -1, codes)
    pool = Pool(np.asarray(vectors, dtype=np.float32), np.asarray(labelled, dtype=bool),
                probabilities=None if probabilities is None else np.asarray(probabilities, dtype=np.float32),
                sequences=codes, one_per_sequence=codes is not None)
    count = min(count, available(pool))
    return select(strategy, pool, count, seed).indices


# Each module registers its strategies on import.
from . import clustered, kcenter, randomly, uncertainty  # noqa: E402,F401
