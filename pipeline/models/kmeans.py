"""K-means over feature vectors, in pieces a distributed job can run: assignment, partial sums, the update.

DiGIT's tokens are the nearest centroid of each patch feature. Lloyd's algorithm splits into an assignment
that needs only the centroids (so it runs wherever the features are), per-cluster sums and counts that add
up in any order, and an update from the total. `lloyd` is the single-process reference that a distributed
run must equal. Sums are float64 so that the order in which partial sums add up does not change the
centroids beyond rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Rows of the (features x centroids) distance matrix computed at once: bounds memory for large K.
ASSIGN_PAIRS = 1 << 24


def squared_distances(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N, K) squared Euclidean distances, in the features' dtype, clamped at 0 against rounding."""
    return (features.pow(2).sum(1, keepdim=True) - 2 * features @ centroids.T
            + centroids.pow(2).sum(1)[None]).clamp_min_(0)


@torch.no_grad()
def nearest_centroids(features: torch.Tensor, centroids: torch.Tensor,
                      max_pairs: int = ASSIGN_PAIRS) -> tuple[torch.Tensor, torch.Tensor]:
    """Index (N,) of each feature's nearest centroid and the squared distance (N,) to it, in chunks."""
    if features.shape[-1] != centroids.shape[-1]:
        raise ValueError(f"features have dim {features.shape[-1]}, centroids {centroids.shape[-1]}")
    rows = max(1, max_pairs // max(1, centroids.shape[0]))
    indices, distances = [], []
    for chunk in features.split(rows):
        nearest = squared_distances(chunk, centroids).min(1)
        indices.append(nearest.indices)
        distances.append(nearest.values)
    if not indices:
        return features.new_zeros(0, dtype=torch.long), features.new_zeros(0)
    return torch.cat(indices), torch.cat(distances)


@dataclass
class ClusterSums:
    """Per-cluster sums and counts of the features assigned to each centroid, plus the inertia (the sum of
    squared distances to the assigned centroids). Adds up across batches and workers in any order."""

    sums: torch.Tensor      # (K, D) float64
    counts: torch.Tensor    # (K,) int64
    inertia: float = 0.0

    @classmethod
    def zeros(cls, clusters: int, dim: int) -> "ClusterSums":
        return cls(torch.zeros(clusters, dim, dtype=torch.float64), torch.zeros(clusters, dtype=torch.long))

    @classmethod
    def of(cls, features: torch.Tensor, centroids: torch.Tensor) -> "ClusterSums":
        """One batch's contribution under the given centroids."""
        indices, distances = nearest_centroids(features, centroids)
        sums = torch.zeros(centroids.shape[0], features.shape[1], dtype=torch.float64, device=features.device)
        sums.index_add_(0, indices, features.double())
        counts = torch.bincount(indices, minlength=centroids.shape[0])
        return cls(sums.cpu(), counts.cpu(), float(distances.double().sum()))

    def __add__(self, other: "ClusterSums") -> "ClusterSums":
        return ClusterSums(self.sums + other.sums, self.counts + other.counts, self.inertia + other.inertia)

    @property
    def points(self) -> int:
        return int(self.counts.sum())

    def centroids(self, previous: torch.Tensor) -> torch.Tensor:
        """The Lloyd update: each cluster's mean; a cluster nobody chose keeps its previous centroid (rather
        than a random restart, so that the result depends on the data and the initialisation only)."""
        filled = self.counts > 0
        means = self.sums / self.counts.clamp_min(1)[:, None].double()
        return torch.where(filled[:, None], means, previous.double()).to(previous.dtype)


@torch.no_grad()
def kmeans_plus_plus(sample: torch.Tensor, clusters: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ initialisation (Arthur and Vassilvitskii): each next centroid is a sample point drawn with
    probability proportional to its squared distance to the nearest centroid chosen so far."""
    count = sample.shape[0]
    if count < clusters:
        raise ValueError(f"k-means++ needs at least K = {clusters} sample points, got {count}")
    sample = sample.float()
    chosen = [int(torch.randint(count, (1,), generator=generator))]
    nearest = squared_distances(sample, sample[chosen[0]][None])[:, 0]
    for _ in range(clusters - 1):
        total = float(nearest.sum())
        if total <= 0:  # every point already sits on a centroid: fill up with unused points
            unused = torch.ones(count, dtype=torch.bool)
            unused[chosen] = False
            pick = int(unused.nonzero()[torch.randint(int(unused.sum()), (1,), generator=generator)])
        else:
            pick = int(torch.multinomial(nearest.double() / total, 1, generator=generator))
        chosen.append(pick)
        nearest = torch.minimum(nearest, squared_distances(sample, sample[pick][None])[:, 0])
    return sample[chosen].clone()


@torch.no_grad()
def lloyd(features: torch.Tensor, initial: torch.Tensor, iterations: int,
          batch: int = 4096) -> tuple[torch.Tensor, list[float]]:
    """Single-process Lloyd iterations from `initial`: the final centroids and the inertia of each
    iteration's assignment (under the centroids it started from)."""
    centroids, inertia = initial.clone(), []
    for _ in range(iterations):
        total = ClusterSums.zeros(*centroids.shape)
        for chunk in features.split(batch):
            total = total + ClusterSums.of(chunk, centroids)
        inertia.append(total.inertia)
        centroids = total.centroids(centroids)
    return centroids, inertia


def cluster_purity(assignments: torch.Tensor, labels: torch.Tensor, clusters: int, classes: int) -> float:
    """Fraction of points whose label is their cluster's majority label (1.0: every cluster is one class)."""
    if assignments.numel() == 0:
        raise ValueError("cluster purity of no points")
    return purity_of_counts(cluster_label_counts(assignments, labels, clusters, classes))


def cluster_label_counts(assignments: torch.Tensor, labels: torch.Tensor, clusters: int, classes: int) -> torch.Tensor:
    """(clusters, classes) int64: how many points of each label each cluster holds. Adds up across batches."""
    table = torch.zeros(clusters, classes, dtype=torch.long)
    table.index_put_((assignments.long(), labels.long()), torch.ones_like(assignments, dtype=torch.long),
                     accumulate=True)
    return table


def purity_of_counts(table: torch.Tensor) -> float:
    """Cluster purity from a (clusters, classes) count table."""
    total = int(table.sum())
    if total == 0:
        raise ValueError("cluster purity of no points")
    return float(table.max(1).values.sum()) / total
