"""Exact k-Center greedy (Sener & Savarese's core-set selection), fast at a million points.

The textbook greedy: the centres are the labelled points; repeatedly take the unlabelled point farthest
(Euclidean) from its nearest centre and make it a centre. :func:`reference_kcenter` is that loop, written
plainly in float64; :class:`KCenter` selects exactly the same points (same order, same lowest-index tie
break) without touching every point at every step:

* **Coarse bounds, one streaming pass.** The distance to any centre is an upper bound on the distance to the
  nearest one. The labelled points are grouped (a few Lloyd steps, ``coarse_centres`` groups); one float32
  pass over the vectors routes each point to its nearest group mean and takes the exact distance to that
  group's centres, so a point costs ``groups + centres / groups`` products instead of ``centres``. A rounding
  margin makes every bound hold for the exact value too. Points are sorted by their bound once. The pass is
  split in row chunks on a few threads (numpy releases the GIL; BLAS is kept single-threaded).
* **Lazy exact greedy.** Only points whose bound could still win enter a *pool*, first with a float32 bound
  over all centres (plus margin), and exactly (float64) once they reach the top. Each step takes the pool's
  best value; a stale value (centres added since it was computed) or a float32 bound is still an upper
  bound, so only the top of the pool is refreshed until the best value is exact and fresh. It is the global
  argmax once it beats the best coarse bound outside the pool; otherwise the pool grows by the next points in
  bound order. The exact float64 objective decides every pick; ties go to the lowest point index as
  ``np.argmax`` would.
* **Warm rounds.** The bounds and the pool's values (with respect to labelled centres only) are kept between
  rounds. When the previous picks are labelled they join the centre list; stale values stay upper bounds, so
  the next round costs a few small refreshes instead of a pass over the data.

How much the bounds prune depends on the data: crop embeddings are clustered with a low intrinsic dimension
and the pool stays small; on vectors drawn uniformly on the sphere (no structure) nearly every bound is loose
and the pool holds a large share of the points, which costs about one float32 product with every centre.

Squared distances are used throughout (same order as distances); scores returned are distances.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

#: Bound on the relative float32 error of ``|x|^2 + |s|^2 - 2 x.s`` for d <= ~600 (d * eps32 * 2, rounded up).
_F32_MARGIN = 4e-5
_CHUNK_ROWS = 65536


def reference_kcenter(vectors: np.ndarray, labelled: np.ndarray, count: int, *,
                      eligible: np.ndarray | None = None, first: int | None = None,
                      sequences: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Textbook greedy in float64 with explicit differences: (picked indices, distances). For tests; O(count * n * d).

    ``first`` is the pick used when nothing is labelled yet (the greedy needs a first centre).
    ``sequences`` (int codes, -1 none) enforces at most one pick per sequence.
    """
    x = np.asarray(vectors, dtype=np.float64)
    n = len(x)
    elig = np.ones(n, bool) if eligible is None else eligible.copy()
    elig &= ~labelled
    mind = np.full(n, np.inf)
    for c in np.flatnonzero(labelled):
        mind = np.minimum(mind, ((x - x[c]) ** 2).sum(1))
    picks, scores = [], []
    for _ in range(count):
        if not mind[np.isfinite(mind)].size and first is not None:
            j = first
        else:
            j = int(np.argmax(np.where(elig, mind, -1.0)))
        picks.append(j)
        scores.append(math.sqrt(mind[j]) if np.isfinite(mind[j]) else math.inf)
        elig[j] = False
        if sequences is not None and sequences[j] >= 0:
            elig &= sequences != sequences[j]
        mind = np.minimum(mind, ((x - x[j]) ** 2).sum(1))
    return np.array(picks, dtype=np.int64), np.array(scores)


def farthest_first(points: np.ndarray, k: int) -> np.ndarray:
    """Indices of ``k`` spread-out rows of ``points`` (farthest-first traversal from row 0)."""
    p = np.asarray(points, dtype=np.float32)
    k = min(k, len(p))
    chosen = [0]
    d2 = ((p - p[0]) ** 2).sum(1)
    for _ in range(k - 1):
        j = int(np.argmax(d2))
        chosen.append(j)
        d2 = np.minimum(d2, ((p - p[j]) ** 2).sum(1))
    return np.array(chosen, dtype=np.int64)


def _route(centres: np.ndarray, groups: int, iters: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Group the centres (a few Lloyd steps from a farthest-first start): (group means, group of each centre).

    A point is routed to its nearest mean and bounded by the exact distance to that group's centres, so the
    bound is usually the distance to a near centre at the cost of ``groups + len(centres) / groups`` products.
    """
    g = max(1, min(groups, len(centres)))
    means = centres[farthest_first(centres, g)].copy()
    for _ in range(iters):
        d2 = (centres ** 2).sum(1)[:, None] + (means ** 2).sum(1)[None, :] - 2.0 * centres @ means.T
        of = d2.argmin(axis=1)
        for q in range(g):
            m = of == q
            if m.any():
                means[q] = centres[m].mean(axis=0)
    d2 = (centres ** 2).sum(1)[:, None] + (means ** 2).sum(1)[None, :] - 2.0 * centres @ means.T
    of = d2.argmin(axis=1)
    keep = np.unique(of)  # drop empty groups
    remap = np.full(g, -1)
    remap[keep] = np.arange(len(keep))
    return means[keep].astype(np.float32), remap[of]


def _sqnorms64(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


@dataclasses.dataclass
class KCenterStats:
    """What a round did (for benchmarks and logs)."""

    cold: bool = False
    pool: int = 0
    refreshed: int = 0
    expansions: int = 0


class KCenter:
    """k-Center greedy over a fixed ``[n, d]`` float32 array (a memmap is fine) with state kept between rounds.

    Use one instance per vector array; call :meth:`select` each round with the current labelled mask. The
    state stays valid while the vectors are unchanged and labelled points stay labelled (then a round is
    warm); otherwise it is rebuilt (cold). ``coarse_centres`` trades the streaming pass's cost (GEMM width)
    against the tightness of the bounds.
    """

    def __init__(self, vectors: np.ndarray, *, coarse_centres: int = 32, chunk_rows: int = _CHUNK_ROWS,
                 workers: int | None = None) -> None:
        if vectors.ndim != 2:
            raise ValueError("vectors must be [n, d]")
        self.x = vectors
        self.n, self.d = vectors.shape
        self.coarse_centres = coarse_centres
        self.chunk_rows = chunk_rows
        self.workers = workers or os.cpu_count() or 1
        self._state: _State | None = None
        self.last = KCenterStats()

    # ------------------------------------------------------------------ public
    def select(self, labelled: np.ndarray, count: int, *, eligible: np.ndarray | None = None,
               sequences: np.ndarray | None = None, first: Callable[[np.ndarray], int] | None = None,
               ) -> tuple[np.ndarray, np.ndarray]:
        """Pick ``count`` points: (indices in pick order, distance of each to its nearest centre when picked).

        ``labelled``: bool [n], the centres. ``eligible``: bool [n], points that may be picked (filters);
        labelled points never are. ``sequences``: int [n] codes (-1 none) for at most one pick per sequence.
        ``first``: chooses the first pick from the eligible indices when nothing is labelled (default: lowest).
        The caller guarantees enough eligible points.
        """
        # Many small products: one BLAS thread each, parallel over chunks in our own threads instead (BLAS
        # thread pools spin and waste the CPU on small products, worse on a shared machine).
        with threadpool_limits(limits=1, user_api="blas"):
            return self._select(labelled, count, eligible, sequences, first)

    def _select(self, labelled, count, eligible, sequences, first):
        labelled = np.asarray(labelled, dtype=bool)
        elig = (np.ones(self.n, bool) if eligible is None else np.array(eligible, dtype=bool, copy=True))
        elig &= ~labelled
        self.last = KCenterStats()
        if not labelled.any():
            cand = np.flatnonzero(elig)
            p0 = int(first(cand)) if first is not None else int(cand[0])
            tmp = labelled.copy()
            tmp[p0] = True
            elig[p0] = False
            if sequences is not None and sequences[p0] >= 0:
                elig &= sequences != sequences[p0]
            state = self._build(tmp)  # a throw-away state: p0 is not a labelled centre for later rounds
            picks, scores = self._round(state, tmp, elig, count - 1, sequences)
            return np.concatenate([[p0], picks]).astype(np.int64), np.concatenate([[math.inf], scores])
        state = self._state
        if state is None or not labelled[state.centres].all():
            state = self._state = self._build(labelled)
        return self._round(state, labelled, elig, count, sequences)

    def _map(self, fn: Callable[[int], None], starts: range) -> None:
        """Run ``fn`` over chunk starts on ``workers`` threads (numpy releases the GIL; BLAS is 1-threaded)."""
        if self.workers <= 1 or len(starts) <= 1:
            for a in starts:
                fn(a)
            return
        with ThreadPoolExecutor(self.workers) as ex:
            list(ex.map(fn, starts))

    def forget(self) -> None:
        """Drop the kept state (the vectors changed)."""
        self._state = None

    # ------------------------------------------------------------------ cold pass
    def _build(self, labelled: np.ndarray) -> "_State":
        self.last.cold = True
        centres = np.flatnonzero(labelled)
        cx = np.asarray(self.x[centres], dtype=np.float32)
        reps, group_of = _route(cx, self.coarse_centres)
        rn = np.einsum("ij,ij->i", reps, reps)
        members = [np.flatnonzero(group_of == q) for q in range(len(reps))]
        gx = [cx[m].T.copy() for m in members]
        gn = [np.einsum("ij,ij->i", cx[m], cx[m]) for m in members]
        cmax = np.float32(max(float(g.max()) for g in gn if len(g)))
        bound = np.empty(self.n, np.float32)
        rt = reps.T.copy()

        def chunk(r0: int) -> None:
            xc = np.asarray(self.x[r0: r0 + self.chunk_rows], dtype=np.float32)
            xn = np.einsum("ij,ij->i", xc, xc)
            g = xc @ rt
            g *= -2.0
            g += rn
            route = g.argmin(axis=1)
            perm = np.argsort(route, kind="stable")
            xs = xc[perm]  # rows grouped by route: one gather, then contiguous slices
            edges = np.searchsorted(route[perm], np.arange(len(reps) + 1))
            bs = np.empty(len(xc), np.float32)
            for q in range(len(reps)):
                a, z = edges[q], edges[q + 1]
                if a == z:
                    continue
                h = xs[a:z] @ gx[q]
                h *= -2.0
                h += gn[q]
                bs[a:z] = h.min(axis=1)
            b = np.empty(len(xc), np.float32)
            b[perm] = bs
            b += xn
            b += np.float32(_F32_MARGIN) * (xn + cmax)  # rounding margin: now >= the exact squared distance
            bound[r0: r0 + len(xc)] = b

        self._map(chunk, range(0, self.n, self.chunk_rows))
        bound[labelled] = -np.inf
        order = np.argsort(-bound, kind="stable")
        state = _State(centres=centres, cx64=np.asarray(self.x[centres], dtype=np.float64),
                       order=order, bound_sorted=bound[order], in_pool=np.zeros(self.n, bool))
        state.cn64 = _sqnorms64(state.cx64)
        return state

    # ------------------------------------------------------------------ one round
    def _round(self, st: "_State", labelled: np.ndarray, elig: np.ndarray, count: int,
               sequences: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        new = np.setdiff1d(np.flatnonzero(labelled), st.centres, assume_unique=True)
        if len(new):  # previous picks (or any other points) were labelled: they are centres now
            st.centres = np.concatenate([st.centres, new])
            nx = np.asarray(self.x[new], dtype=np.float64)
            st.cx64 = np.concatenate([st.cx64, nx])
            st.cn64 = np.concatenate([st.cn64, _sqnorms64(nx)])
        ncent = len(st.centres)
        d = self.d
        picks: list[int] = []
        scores: list[float] = []
        px64 = np.empty((max(count, 1), d), np.float64)
        pn64 = np.empty(max(count, 1), np.float64)
        # round-local copies: picks are centres only for this round
        r_val = st.pool_val.copy()
        r_upto = np.zeros(len(st.pool_idx), np.int64)
        cand = elig[st.pool_idx]
        rv = np.where(cand, r_val, -np.inf)
        scan = 0  # position in the coarse order from which to look for the best coarse bound outside the pool
        grow = 2048

        def next_coarse(start: int) -> tuple[int, float]:
            pos = start
            step = 65536
            while pos < self.n:
                idx = st.order[pos: pos + step]
                ok = np.flatnonzero(elig[idx] & ~st.in_pool[idx])
                if len(ok):
                    return pos + int(ok[0]), float(st.bound_sorted[pos + ok[0]])
                pos += step
            return self.n, -math.inf

        def refresh(p: np.ndarray) -> None:
            """Bring pool positions ``p`` up to date with every labelled centre and every pick so far."""
            nonlocal rv
            if len(p) == 0:
                return
            approx = st.pool_upto[p] < 0
            if approx.any() and not approx.all():
                refresh(p[approx])
                refresh(p[~approx])
                return
            self.last.refreshed += len(p)
            x = np.asarray(self.x[st.pool_idx[p]], dtype=np.float64)
            xn = _sqnorms64(x)
            lo = max(int(st.pool_upto[p].min()), 0)  # float32 bounds (upto -1): recompute from the first centre
            if lo < ncent:
                g = x @ st.cx64[lo:].T
                d2 = (xn[:, None] + st.cn64[lo:][None, :] - 2.0 * g).min(axis=1)
                np.maximum(d2, 0.0, out=d2)
                st.pool_val[p] = d2 if approx[0] else np.minimum(st.pool_val[p], d2)
                st.pool_upto[p] = ncent
            v = np.minimum(r_val[p], st.pool_val[p]) if not approx[0] else st.pool_val[p].copy()
            lo2 = 0 if approx[0] else int(r_upto[p].min())
            if lo2 < len(picks):
                g = x @ px64[lo2: len(picks)].T
                d2 = (xn[:, None] + pn64[lo2: len(picks)][None, :] - 2.0 * g).min(axis=1)
                np.maximum(d2, 0.0, out=d2)
                v = np.minimum(v, d2)
            r_val[p] = v
            r_upto[p] = len(picks)
            rv[p] = np.where(cand[p], v, -np.inf)

        def expand(scan: int, want: int) -> int:
            """Move up to ``want`` eligible points with the largest coarse bounds into the pool (exact values)."""
            nonlocal r_val, r_upto, cand, rv
            got: list[np.ndarray] = []
            have = 0
            pos = scan
            while pos < self.n and have < want:
                idx = st.order[pos: pos + 65536]
                ok = idx[elig[idx] & ~st.in_pool[idx]]
                take = ok[: want - have]
                got.append(take)
                have += len(take)
                pos += 65536 if len(take) == len(ok) else 0
                if len(take) < len(ok):
                    break
            if not have:
                return 0
            add = np.sort(np.concatenate(got))
            self.last.expansions += 1
            st.in_pool[add] = True
            # float32 products plus the rounding margin: upper bounds, made exact (float64) only for the few
            # points that reach the top of the pool (marked by upto = -1, like stale values)
            x = np.asarray(self.x[add], dtype=np.float32)
            xn = np.einsum("ij,ij->i", x, x)
            val = np.empty(len(add))
            if st.cx32 is None or len(st.cx32) != ncent:
                st.cx32 = st.cx64.astype(np.float32)
            cn32 = st.cn64.astype(np.float32)
            cmax = float(st.cn64.max())

            def bound(a: int) -> None:
                g = x[a: a + 2048] @ st.cx32.T
                g *= -2.0
                g += cn32
                d2 = g.min(axis=1) + xn[a: a + 2048]
                val[a: a + 2048] = d2 + _F32_MARGIN * (xn[a: a + 2048] + cmax)

            self._map(bound, range(0, len(add), 2048))
            rval = val.copy()
            if picks:
                pk = px64[: len(picks)].astype(np.float32)
                g = x @ pk.T
                d2 = (xn[:, None] + (pk ** 2).sum(1)[None, :] - 2.0 * g).min(axis=1)
                rval = np.minimum(rval, d2 + _F32_MARGIN * (xn + float(pn64[: len(picks)].max())))
            st.pool_idx = np.concatenate([st.pool_idx, add])
            st.pool_val = np.concatenate([st.pool_val, val])
            st.pool_upto = np.concatenate([st.pool_upto, np.full(len(add), -1, np.int64)])
            r_val = np.concatenate([r_val, rval])
            r_upto = np.concatenate([r_upto, np.zeros(len(add), np.int64)])
            cand = np.concatenate([cand, np.ones(len(add), bool)])
            rv = np.concatenate([rv, rval])
            return have

        scan, t = next_coarse(scan)
        for _ in range(count):
            while True:
                j = int(np.argmax(rv)) if len(rv) else -1
                best = rv[j] if j >= 0 else -math.inf
                if best == -math.inf or best <= t:
                    if t == -math.inf:
                        raise ValueError("no eligible point left to pick")
                    expand(scan, grow)
                    grow *= 2
                    scan, t = next_coarse(scan)
                    continue
                if st.pool_upto[j] == ncent and r_upto[j] == len(picks):
                    ties = np.flatnonzero(rv >= best)
                    if len(ties) > 1:  # exact ties: make all of them fresh, then lowest point index wins
                        stale = ties[(st.pool_upto[ties] < ncent) | (r_upto[ties] < len(picks))]
                        if len(stale):
                            refresh(stale)
                            continue
                        j = int(ties[np.argmin(st.pool_idx[ties])])
                    break
                b = min(256, len(rv))
                top = np.argpartition(-rv, b - 1)[:b] if b < len(rv) else np.arange(len(rv))
                refresh(top[np.isfinite(rv[top])])
            pid = int(st.pool_idx[j])
            picks.append(pid)
            scores.append(math.sqrt(r_val[j]))
            px64[len(picks) - 1] = np.asarray(self.x[pid], dtype=np.float64)
            pn64[len(picks) - 1] = _sqnorms64(px64[len(picks) - 1: len(picks)])[0]
            elig[pid] = False
            if sequences is not None and sequences[pid] >= 0:
                elig &= sequences != sequences[pid]
                cand &= elig[st.pool_idx]
                scan, t = next_coarse(scan)  # the best coarse candidate may have lost its eligibility
            cand[j] = False
            rv = np.where(cand, r_val, -np.inf)
        self.last.pool = len(st.pool_idx)
        return np.array(picks, dtype=np.int64), np.array(scores)


@dataclasses.dataclass
class _State:
    centres: np.ndarray  # labelled point indices accounted for, in the order added
    cx64: np.ndarray  # their vectors, float64
    order: np.ndarray  # all points by coarse bound, largest first (labelled at the end)
    bound_sorted: np.ndarray  # coarse upper bound of the squared distance, in that order
    in_pool: np.ndarray  # bool [n]
    cn64: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0))
    pool_idx: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0, np.int64))
    # exact squared distance to centres[:upto]; upto == -1: a float32 upper bound over all centres
    pool_val: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0))
    pool_upto: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0, np.int64))
    cx32: np.ndarray | None = None  # float32 copy of cx64 for the pool's first bounds
