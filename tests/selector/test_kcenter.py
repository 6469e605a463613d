"""k-Center greedy picks exactly what the textbook greedy picks (float64 reference), cold and warm."""

from __future__ import annotations

import numpy as np
import pytest

from trapline.selector.kcenter import KCenter, reference_kcenter

from .conftest import embedding_like


def labelled_mask(n: int, k: int, seed: int = 1) -> np.ndarray:
    m = np.zeros(n, bool)
    m[np.random.default_rng(seed).choice(n, k, replace=False)] = True
    return m


@pytest.mark.parametrize("data", ["embedding", "isotropic"])
def test_cold_picks_equal_textbook_greedy(data):
    x = embedding_like(3000) if data == "embedding" else \
        np.random.default_rng(3).standard_normal((3000, 256)).astype(np.float32)
    lab = labelled_mask(3000, 60)
    engine = KCenter(x, coarse_centres=8, chunk_rows=700)  # several chunks and groups even at this size
    picks, scores = engine.select(lab, 40)
    ref, ref_scores = reference_kcenter(x, lab, 40)
    assert picks.tolist() == ref.tolist(), "k-Center must pick exactly what the textbook greedy picks"
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-9, err_msg="scores are distances to the nearest centre")
    assert engine.last.cold


def test_warm_round_after_labelling_equals_textbook_greedy_and_is_warm():
    x = embedding_like(3000, seed=4)
    lab = labelled_mask(3000, 30)
    engine = KCenter(x, coarse_centres=6, chunk_rows=1000)
    for round_ in range(3):
        picks, _ = engine.select(lab, 25)
        ref, _ = reference_kcenter(x, lab, 25)
        assert picks.tolist() == ref.tolist(), f"round {round_} differs from the textbook greedy"
        assert engine.last.cold == (round_ == 0), "after labelling the previous picks the round must be warm"
        lab[picks[:20]] = True  # the labeller only did 20 of the 25


def test_unlabelled_picks_of_a_round_are_not_centres_next_round():
    x = embedding_like(1500, seed=5)
    lab = labelled_mask(1500, 10)
    engine = KCenter(x, coarse_centres=4)
    first, _ = engine.select(lab, 10)
    again, _ = engine.select(lab, 10)  # nothing was labelled: the same picks again
    assert again.tolist() == first.tolist()


def test_exact_ties_go_to_the_lowest_index():
    base = embedding_like(800, seed=6)
    x = np.concatenate([base, base])  # every point has a twin: distances tie exactly
    lab = np.zeros(1600, bool)
    lab[[3, 500]] = True
    picks, _ = KCenter(x, coarse_centres=2, chunk_rows=300).select(lab, 15)
    ref, _ = reference_kcenter(x, lab, 15)
    assert picks.tolist() == ref.tolist()
    assert (picks < 800).all(), "of two identical points the lower index is picked, as np.argmax does"


def test_filters_and_one_per_sequence_match_the_constrained_greedy():
    x = embedding_like(2000, seed=7)
    lab = labelled_mask(2000, 20)
    rng = np.random.default_rng(8)
    eligible = rng.random(2000) < 0.5
    seqs = rng.integers(-1, 300, 2000)
    picks, _ = KCenter(x, coarse_centres=4).select(lab, 30, eligible=eligible, sequences=seqs)
    ref, _ = reference_kcenter(x, lab, 30, eligible=eligible, sequences=seqs)
    assert picks.tolist() == ref.tolist()
    assert eligible[picks].all() and not lab[picks].any()
    known = seqs[picks][seqs[picks] >= 0]
    assert len(set(known.tolist())) == len(known), "at most one crop per sequence"


def test_nothing_labelled_starts_from_the_given_first_point():
    x = embedding_like(1000, seed=9)
    lab = np.zeros(1000, bool)
    picks, scores = KCenter(x).select(lab, 12, first=lambda cand: int(cand[17]))
    ref, _ = reference_kcenter(x, lab, 12, first=17)
    assert picks.tolist() == ref.tolist()
    assert np.isinf(scores[0]) and np.isfinite(scores[1:]).all()


def test_changed_labelled_set_that_drops_centres_rebuilds_state():
    x = embedding_like(1200, seed=10)
    lab = labelled_mask(1200, 15)
    engine = KCenter(x, coarse_centres=4)
    engine.select(lab, 5)
    lab2 = labelled_mask(1200, 15, seed=2)  # a different labelled set (not a superset)
    picks, _ = engine.select(lab2, 10)
    assert engine.last.cold
    assert picks.tolist() == reference_kcenter(x, lab2, 10)[0].tolist()
