"""``kcenter``: Sener & Savarese's core-set greedy (see :mod:`trapline.selector.kcenter`)."""

from __future__ import annotations

import numpy as np

from ..kcenter import KCenter
from . import Pool, Selection, register


@register("kcenter")
def kcenter(pool: Pool, count: int, rng: np.random.Generator) -> Selection:
    engine = pool.kcenter if pool.kcenter is not None else KCenter(pool.vectors)
    indices, scores = engine.select(
        pool.labelled, count, eligible=pool.candidates(),
        sequences=pool.sequences if pool.one_per_sequence else None,
        first=lambda cand: int(rng.choice(cand)))  # nothing labelled yet: a random first centre
    return Selection(indices, scores)
