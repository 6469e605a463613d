"""Triplet loss with semi-hard negative mining, and class-balanced P x K batches.

The loss follows FaceNet (Schroff et al. 2015) as implemented in TensorFlow's ``triplet_semihard_loss``:
for every anchor-positive pair in the batch, the negative is the *closest* negative that is still
farther than the positive (semi-hard); when an anchor has no such negative, the *farthest* negative is
used instead. Distances are squared-free Euclidean on L2-normalized embeddings, so margins live in [0, 2].
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [n, n], numerically safe at 0 (gradient of sqrt)."""
    sq = (x * x).sum(1)
    d2 = (sq[:, None] - 2 * x @ x.T + sq[None, :]).clamp_min(0.0)
    zero = d2 <= 1e-16
    d = torch.sqrt(d2 + zero.float() * 1e-16) * (~zero).float()
    return d


def semi_hard_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Mean over anchor-positive pairs of ``max(d(a,p) - d(a,n) + margin, 0)`` with semi-hard ``n``.

    Returns 0 (with a gradient path) when the batch holds no valid anchor-positive pair.
    """
    labels = labels.view(-1)
    d = pairwise_distances(embeddings)
    n = d.shape[0]
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=d.device)
    pos_mask = same & ~eye  # [a, p]
    neg_mask = ~same  # [a, n]
    if not pos_mask.any() or not neg_mask.any():
        return embeddings.sum() * 0.0
    # For each (a, p): candidates n with d(a,n) > d(a,p).
    d_ap = d[:, :, None]  # [a, p, 1]
    d_an = d[:, None, :]  # [a, 1, n]
    semi = neg_mask[:, None, :] & (d_an > d_ap)  # [a, p, n]
    big = d.max().detach() + 1.0
    closest_semi = torch.where(semi, d_an.expand(n, n, n), big).min(dim=2).values  # [a, p]
    has_semi = semi.any(dim=2)
    farthest_neg = torch.where(neg_mask, d, torch.zeros_like(d)).max(dim=1).values  # [a]
    d_neg = torch.where(has_semi, closest_semi, farthest_neg[:, None].expand(n, n))
    losses = (d - d_neg + margin).clamp_min(0.0)
    return losses[pos_mask].mean()


class PKSampler:
    """Batches of P classes x K items each (items repeat within a class when it has fewer than K).

    Only classes with at least two items take part (a single item makes no positive pair). An epoch
    visits every item of the eligible classes about once. Deterministic under ``seed``.
    """

    def __init__(self, labels: list[str] | np.ndarray, p: int, k: int, seed: int = 0) -> None:
        self.labels = np.asarray(labels)
        classes, inverse = np.unique(self.labels, return_inverse=True)
        self.by_class = [np.flatnonzero(inverse == c) for c in range(len(classes))]
        self.eligible = [c for c, idx in enumerate(self.by_class) if len(idx) >= 2]
        if len(self.eligible) < 2:
            raise ValueError("triplet batches need at least two classes with at least two items each")
        self.p = max(2, min(p, len(self.eligible)))
        self.k = max(2, k)
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        items = sum(len(self.by_class[c]) for c in self.eligible)
        return max(1, int(np.ceil(items / (self.p * self.k))))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        queues = {c: list(rng.permutation(self.by_class[c])) for c in self.eligible}
        for _ in range(len(self)):
            # Prefer classes with most unseen items left, ties broken at random.
            order = sorted(self.eligible, key=lambda c: (-len(queues[c]), rng.random()))
            batch: list[int] = []
            for c in order[: self.p]:
                for _ in range(self.k):
                    if not queues[c]:
                        queues[c] = list(rng.permutation(self.by_class[c]))
                    batch.append(int(queues[c].pop()))
            yield batch
