"""K-means pieces (pipeline/models/kmeans.py) against brute force and against their single-process reference."""
import torch

from pipeline.models.kmeans import ClusterSums, cluster_purity, kmeans_plus_plus, lloyd, nearest_centroids


def blobs(seed: int = 0, per_blob: int = 200, dim: int = 6, centres: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    middles = torch.randn(centres, dim, generator=generator) * 8
    labels = torch.arange(centres).repeat_interleave(per_blob)
    points = middles[labels] + torch.randn(len(labels), dim, generator=generator)
    order = torch.randperm(len(labels), generator=generator)
    return points[order], labels[order]


def test_nearest_centroid_equals_brute_force_in_any_chunking():
    generator = torch.Generator().manual_seed(1)
    features, centroids = torch.randn(1000, 16, generator=generator), torch.randn(37, 16, generator=generator)
    brute = torch.cdist(features.double(), centroids.double()).argmin(1)
    for max_pairs in (1, 37, 100, 37 * 333, 1 << 24):
        indices, distances = nearest_centroids(features, centroids, max_pairs=max_pairs)
        assert torch.equal(indices, brute)
        expected = (features.double() - centroids.double()[brute]).pow(2).sum(1)
        torch.testing.assert_close(distances.double(), expected, rtol=1e-4, atol=1e-4)


def test_cluster_sums_add_up_in_any_order():
    features, _ = blobs()
    centroids = features[:5].clone()
    whole = ClusterSums.of(features, centroids)
    parts = [ClusterSums.of(chunk, centroids) for chunk in features.split(77)]
    forward, backward = sum(parts[1:], parts[0]), sum(reversed(parts[:-1]), parts[-1])
    for total in (forward, backward):
        assert torch.equal(total.counts, whole.counts)
        torch.testing.assert_close(total.sums, whole.sums, rtol=0, atol=1e-9)
        assert abs(total.inertia - whole.inertia) < 1e-6 * whole.inertia
    assert whole.points == len(features)
    indices = torch.cdist(features, centroids).argmin(1)
    for k in range(5):  # each cluster's mean is the mean of the points nearest to it
        torch.testing.assert_close(whole.centroids(centroids)[k], features[indices == k].mean(0), rtol=1e-5,
                                   atol=1e-5)


def test_an_empty_cluster_keeps_its_centroid():
    features = torch.zeros(10, 2)
    centroids = torch.tensor([[0.0, 0.0], [100.0, 100.0]])
    updated = ClusterSums.of(features, centroids).centroids(centroids)
    assert torch.equal(updated, centroids)


def test_lloyd_recovers_separated_blobs_and_never_raises_inertia():
    features, labels = blobs()
    initial = kmeans_plus_plus(features, 5, torch.Generator().manual_seed(0))
    centroids, inertia = lloyd(features, initial, iterations=10, batch=123)
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(inertia, inertia[1:]))
    assignments, _ = nearest_centroids(features, centroids)
    assert cluster_purity(assignments, labels, 5, 5) == 1.0
    # the same result from one batch: chunking does not change Lloyd
    whole, _ = lloyd(features, initial, iterations=10, batch=len(features))
    torch.testing.assert_close(whole, centroids, rtol=0, atol=1e-5)


def test_kmeans_plus_plus_is_seeded_and_picks_distinct_sample_points():
    features, _ = blobs(per_blob=50)
    first = kmeans_plus_plus(features, 12, torch.Generator().manual_seed(3))
    again = kmeans_plus_plus(features, 12, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert len({tuple(row.tolist()) for row in first}) == 12
    members = (first[:, None] == features[None]).all(-1).any(1)
    assert bool(members.all())
    # with 5 far-apart blobs, the first 5 picks land in 5 different blobs (D^2 sampling)
    _, labels = blobs(per_blob=50)
    picked_labels = {int(labels[(features == row).all(1)][0]) for row in first[:5]}
    assert picked_labels == set(range(5))


def test_kmeans_plus_plus_on_duplicate_points_fills_up_with_unused_ones():
    sample = torch.zeros(8, 3)
    centroids = kmeans_plus_plus(sample, 4, torch.Generator().manual_seed(0))
    assert centroids.shape == (4, 3)


def test_cluster_purity_counts_majority_labels():
    assignments = torch.tensor([0, 0, 0, 1, 1, 2])
    labels = torch.tensor([1, 1, 2, 0, 0, 3])
    assert cluster_purity(assignments, labels, 3, 4) == 5 / 6
    # a relabelling of the clusters or a reordering of the points changes nothing
    order = torch.tensor([5, 3, 1, 0, 4, 2])
    assert cluster_purity((assignments[order] + 1) % 3, labels[order], 3, 4) == 5 / 6
