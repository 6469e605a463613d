"""``random``: uniformly random unlabelled points (the paper's baseline)."""

from __future__ import annotations

import numpy as np

from . import Pool, Selection, register, take_ranked


@register("random")
def random(pool: Pool, count: int, rng: np.random.Generator) -> Selection:
    order = rng.permutation(np.flatnonzero(pool.candidates()))
    chosen = take_ranked(order, count, pool)
    return Selection(chosen, np.zeros(len(chosen)))
