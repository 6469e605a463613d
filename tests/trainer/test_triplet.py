"""Semi-hard triplet loss and class-balanced P x K batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trapline.trainer.triplet import PKSampler, pairwise_distances, semi_hard_triplet_loss


def test_loss_is_zero_when_classes_are_separated_by_more_than_the_margin():
    emb = F.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.05], [-1.0, 0.0], [-0.99, -0.05]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    assert semi_hard_triplet_loss(emb, labels, margin=0.2).item() == 0.0


def test_loss_is_positive_and_has_gradients_when_classes_overlap():
    torch.manual_seed(0)
    x = torch.randn(12, 8, requires_grad=True)
    labels = torch.tensor([0, 1, 2] * 4)
    loss = semi_hard_triplet_loss(F.normalize(x, dim=1), labels, margin=0.5)
    loss.backward()
    assert loss.item() > 0 and x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_semi_hard_negative_is_the_closest_one_farther_than_the_positive():
    # anchor 0, positive 1 at distance 1; negatives at 0.5 (hard), 1.5 (semi-hard), 3 (easy).
    emb = torch.tensor([[0.0], [1.0], [0.5], [1.5], [3.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    d = pairwise_distances(emb)
    assert torch.allclose(d[0, 1], torch.tensor(1.0), atol=1e-6)
    loss = semi_hard_triplet_loss(emb, labels, margin=1.0)
    # Per (anchor, positive): (0,1) semi-hard 1.5 -> 0.5; (1,0) semi-hard 2 -> 0; (2,3) no semi-hard,
    # farthest 0.5 -> 1.5; (2,4) -> 3; (3,2) semi-hard 1.5 -> 0.5; (3,4) farthest 1.5 -> 1; (4,2) 3 -> 0.5;
    # (4,3) 2 -> 0.5. Mean of the 8 = 7.5 / 8.
    assert loss.item() == pytest.approx(7.5 / 8, abs=1e-5)


def test_pk_batches_have_p_classes_of_k_items_and_skip_singletons():
    labels = ["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["solo"]
    s = PKSampler(labels, p=2, k=3, seed=1)
    batches = list(s)
    assert batches and all(len(b) == 6 for b in batches)
    for b in batches:
        names = [labels[i] for i in b]
        assert len(set(names)) == 2 and all(names.count(n) == 3 for n in set(names))
        assert "solo" not in names
    assert batches == list(PKSampler(labels, p=2, k=3, seed=1)), "batches must be deterministic under a seed"
    s.set_epoch(1)
    assert list(s) != batches or len(batches) == 1


def test_pk_sampler_needs_two_classes_with_two_items():
    with pytest.raises(ValueError, match="two classes"):
        PKSampler(["a", "a", "b"], p=2, k=2)
    assert len(np.unique(["a", "a", "b", "b"])) == 2 and len(PKSampler(["a", "a", "b", "b"], p=2, k=2)) == 1
