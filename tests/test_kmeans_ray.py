"""Distributed K-means on a real local Ray (stages/kmeans_passes.py) equals single-process Lloyd on the same
features and initialisation, with features computed inside the actors."""
import sys

import numpy as np
import ray
import torch

from pipeline.models.kmeans import ClusterSums, kmeans_plus_plus, lloyd
from stages.kmeans_passes import cluster_sums, feature_sample, fit_kmeans

DIM, PATCHES = 5, 9
# Ray's workers do not see tests/: this module's classes travel to them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class PatchFeatures:
    """A featurizer factory: each row holds one 'image' of PATCHES x DIM features, scaled by a constant, so
    the features exist only after the actor computed them."""

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self):
        def featurize(batch):
            return torch.from_numpy(batch["patches"]).reshape(-1, DIM).double() * self.scale
        return featurize


def images(count: int = 120, seed: int = 0) -> np.ndarray:
    generator = np.random.default_rng(seed)
    centres = generator.normal(size=(6, DIM)) * 4
    kinds = generator.integers(0, 6, size=(count, PATCHES))
    return centres[kinds] + generator.normal(size=(count, PATCHES, DIM))


def test_distributed_lloyd_equals_the_single_process_reference(ray_cluster):
    data = images()
    dataset = ray_cluster.data.from_items([{"patches": row} for row in data], override_num_blocks=7)
    features = torch.from_numpy(data).reshape(-1, DIM) * 2.0
    initial = kmeans_plus_plus(features, 6, torch.Generator().manual_seed(0)).double()
    expected, expected_inertia = lloyd(features, initial, iterations=4)
    seen = []
    centroids, inertia = fit_kmeans(dataset, PatchFeatures(2.0), initial, iterations=4, actors=2, batch_size=11,
                                    cpus_per_actor=0.5, on_iteration=lambda i, c, e: seen.append((i, e)))
    torch.testing.assert_close(centroids, expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(inertia, expected_inertia, rtol=1e-12)
    assert [i for i, _ in seen] == [0, 1, 2, 3] and [e for _, e in seen] == inertia
    # one pass counts every feature once: none dropped, none doubled across blocks and actors
    total = cluster_sums(dataset, PatchFeatures(2.0), centroids, actors=2, batch_size=11, cpus_per_actor=0.5)
    assert total.points == len(features)
    reference = ClusterSums.of(features, centroids)
    assert torch.equal(total.counts, reference.counts)


def test_the_feature_sample_is_seeded_and_bounded(ray_cluster):
    data = images(count=60)
    dataset = ray_cluster.data.from_items([{"patches": row} for row in data], override_num_blocks=3)
    every = torch.from_numpy(data).reshape(-1, DIM).float()

    def sample(rows: int, seed: int, actors: int) -> torch.Tensor:
        found = feature_sample(dataset, PatchFeatures(1.0), rows=rows, keep=0.5, seed=seed, actors=actors,
                               batch_size=20, cpus_per_actor=0.5)
        assert bool((found[:, None] == every[None]).all(-1).any(1).all())  # each sampled row is a real feature
        return found

    def as_set(rows: torch.Tensor) -> set:
        return {tuple(row.tolist()) for row in rows}

    first = sample(len(every), seed=3, actors=1)
    assert 0.4 * len(every) < len(first) < 0.6 * len(every)
    assert as_set(sample(len(every), seed=3, actors=2)) == as_set(first)  # whichever actor draws
    assert as_set(sample(len(every), seed=4, actors=1)) != as_set(first)
    assert sample(25, seed=3, actors=1).shape == (25, DIM)
