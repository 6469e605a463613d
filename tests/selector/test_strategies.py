"""Every strategy against a brute-force reference or its defining property, plus the interface's errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trapline.runtime import errors
from trapline.selector.strategies import Pool, select, select_indices, strategy_names
from trapline.selector.strategies.uncertainty import entropy, margin, top_probability

from .conftest import embedding_like, probabilities

N = 1500


@pytest.fixture
def pool() -> Pool:
    x = embedding_like(N, seed=11)
    lab = np.zeros(N, bool)
    lab[np.random.default_rng(12).choice(N, 25, replace=False)] = True
    return Pool(x, lab, probabilities=probabilities(N, seed=13))


def brute_force(p: np.ndarray, rows: list[int], key) -> list[int]:
    """Sort rows by key(probabilities) in plain Python; ties by row index."""
    return sorted(rows, key=lambda r: (key([float(v) for v in p[r]]), r))


def py_margin(v):
    s = sorted(v, reverse=True)
    return s[0] - s[1]


def py_entropy(v):
    return -sum(q * math.log(q) for q in v if q > 0)


@pytest.mark.parametrize("name,key", [
    ("confidence", lambda v: max(v)),
    ("margin", py_margin),
    ("entropy", lambda v: -py_entropy(v)),
])
def test_uncertainty_strategies_match_brute_force(pool, name, key):
    rows = np.flatnonzero(~pool.labelled).tolist()
    expected = brute_force(pool.probabilities, rows, key)[:30]
    got = select(name, pool, 30, seed=1)
    assert got.indices.tolist() == expected
    measure = {"confidence": top_probability, "margin": margin, "entropy": entropy}[name]
    np.testing.assert_allclose(got.scores, measure(pool.probabilities[got.indices]), rtol=1e-6)


def test_measures_on_known_distributions():
    p = np.array([[1.0, 0.0, 0.0], [0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]], np.float32)
    np.testing.assert_allclose(top_probability(p), [1.0, 0.5, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(margin(p), [1.0, 0.2, 0.0], atol=1e-6)
    np.testing.assert_allclose(entropy(p), [0.0, -(0.5 * np.log(0.5) + 0.3 * np.log(0.3) + 0.2 * np.log(0.2)),
                                            np.log(3)], rtol=1e-6)


def test_points_without_prediction_do_not_compete(pool):
    pool.probabilities[: N // 2] = np.nan
    got = select("margin", pool, 20, seed=1)
    assert (got.indices >= N // 2).all()


def test_random_is_seeded_and_only_picks_candidates(pool):
    pool.eligible = np.arange(N) % 3 == 0
    a = select("random", pool, 50, seed=7).indices
    b = select("random", pool, 50, seed=7).indices
    assert a.tolist() == b.tolist(), "the same seed gives the same batch"
    assert (a % 3 == 0).all() and not pool.labelled[a].any() and len(set(a.tolist())) == 50
    assert select("random", pool, 50, seed=8).indices.tolist() != a.tolist()


def test_informative_diverse_spreads_uncertain_points_over_clusters(pool):
    got = select("informative_diverse", pool, 20, seed=3)
    assert len(set(got.indices.tolist())) == 20 and not pool.labelled[got.indices].any()
    # more uncertain than the candidates on average, and not all from one cluster of the data
    cand_margin = margin(pool.probabilities[~pool.labelled]).mean()
    assert got.scores.mean() < cand_margin
    pure_margin = select("margin", pool, 20).indices
    assert got.indices.tolist() != pure_margin.tolist(), "diversity should change the batch"


def test_margin_cluster_mean_picks_inside_the_margin(pool):
    got = select("margin_cluster_mean", pool, 10, seed=3)
    rows = np.flatnonzero(~pool.labelled)
    inside = set(rows[np.argsort(margin(pool.probabilities[rows]), kind="stable")[:100]].tolist())
    assert set(got.indices.tolist()) <= inside, "picks come from the 10 x count smallest margins"
    assert len(set(got.indices.tolist())) == 10


@pytest.mark.parametrize("name", ["kcenter", "random", "confidence", "margin", "entropy", "informative_diverse",
                                  "margin_cluster_mean"])
def test_one_per_sequence_for_every_strategy(pool, name):
    pool.sequences = np.arange(N) // 4  # bursts of 4 crops
    pool.sequences[::7] = -1  # some crops have no sequence
    pool.one_per_sequence = True
    got = select(name, pool, 40, seed=5).indices
    seqs = pool.sequences[got]
    known = seqs[seqs >= 0]
    assert len(set(known.tolist())) == len(known), f"{name} returned two crops of one sequence"
    assert len(got) == 40 and not pool.labelled[got].any()


def test_every_strategy_is_registered():
    assert strategy_names() == sorted(["kcenter", "random", "confidence", "margin", "entropy",
                                       "informative_diverse", "margin_cluster_mean"])


def test_unknown_strategy_is_invalid_argument_naming_strategy(pool):
    with pytest.raises(errors.InvalidArgument) as e:
        select("kcentre", pool, 5)
    assert e.value.field == "strategy" and "kcenter" in e.value.message


def test_more_points_than_exist_is_invalid_argument_naming_count(pool):
    with pytest.raises(errors.InvalidArgument) as e:
        select("random", pool, N, seed=1)
    assert e.value.field == "count" and str(N - 25) in e.value.message
    with pytest.raises(errors.InvalidArgument) as e:
        select("random", pool, 0)
    assert e.value.field == "count"


@pytest.mark.parametrize("name", ["confidence", "margin", "entropy", "informative_diverse", "margin_cluster_mean"])
def test_uncertainty_before_any_prediction_is_failed_precondition(pool, name):
    pool.probabilities = None
    with pytest.raises(errors.FailedPrecondition) as e:
        select(name, pool, 5)
    assert e.value.field == "strategy" and "SetPredictions" in e.value.message


def test_select_indices_is_what_simulate_expects(pool):
    seqs = np.array([f"s{i // 3}" for i in range(N)])
    got = select_indices("kcenter", pool.vectors, pool.labelled, None, 30, 1, seqs)
    assert len(got) == 30 and not pool.labelled[got].any()
    assert len(set(seqs[got].tolist())) == 30
