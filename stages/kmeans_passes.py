"""Distributed K-means on Ray Data: features are computed where the data streams (one feature network per
actor), each Lloyd iteration is one pass whose actors return per-batch cluster sums, and the driver adds them
as they arrive. Nothing holds more than one batch of features, so memory does not grow with the number of
images; the result equals `pipeline.models.kmeans.lloyd` on the same features and initialisation.

A featurizer is a picklable factory: called once in each actor, it returns a function from a Ray Data batch
(dict of numpy arrays) to a float tensor of feature rows (N, D).
"""
from __future__ import annotations

import zlib
from typing import Callable, Iterator

import numpy as np
import ray
import torch

from pipeline.models.kmeans import ClusterSums, cluster_label_counts, nearest_centroids

Featurize = Callable[[dict[str, np.ndarray]], torch.Tensor]
FeaturizerFactory = Callable[[], Featurize]


class BatchClusterSums:
    """Actor: featurizes each batch and returns its cluster sums under fixed centroids, as one row."""

    def __init__(self, make_featurizer: FeaturizerFactory, centroids: np.ndarray):
        self.featurize = make_featurizer()
        self.centroids = torch.from_numpy(centroids)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        features = self.featurize(batch).to(self.centroids.dtype)
        sums = ClusterSums.of(features, self.centroids)
        return {"sums": sums.sums.numpy()[None], "counts": sums.counts.numpy()[None],
                "inertia": np.array([sums.inertia])}


class BatchLabelCounts:
    """Actor: featurizes each batch, assigns every feature row its nearest centroid, and returns the
    (clusters, classes) table of assignments by the image's label (an image's rows share its label)."""

    def __init__(self, make_featurizer: FeaturizerFactory, centroids: np.ndarray, classes: int):
        self.featurize = make_featurizer()
        self.centroids = torch.from_numpy(centroids)
        self.classes = classes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        features = self.featurize(batch).to(self.centroids.dtype)
        labels = torch.from_numpy(np.asarray(batch["label"], np.int64))
        rows_per_image = len(features) // max(len(labels), 1)
        assigned, _ = nearest_centroids(features, self.centroids)
        table = cluster_label_counts(assigned, labels.repeat_interleave(rows_per_image), len(self.centroids),
                                     self.classes)
        return {"table": table.numpy()[None]}


class BatchFeatures:
    """Actor: featurizes each batch and keeps a seeded random subset of its rows (k-means++'s sample). The
    draw is seeded by the seed and the batch's content, so it does not depend on which actor gets the batch
    or when."""

    def __init__(self, make_featurizer: FeaturizerFactory, keep: float, seed: int):
        self.featurize = make_featurizer()
        self.keep, self.seed = keep, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        features = self.featurize(batch).float()
        content = zlib.crc32(features[:1].numpy().tobytes())
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + content)
        chosen = torch.rand(len(features), generator=generator) < self.keep
        return {"feature": features[chosen].numpy()}


def cluster_sums(dataset: ray.data.Dataset, make_featurizer: FeaturizerFactory, centroids: torch.Tensor, *,
                 actors: int, batch_size: int, cpus_per_actor: float = 1.0,
                 gpus_per_actor: float = 0.0) -> ClusterSums:
    """One Lloyd pass: the total cluster sums of every feature of `dataset` under `centroids`."""
    rows = dataset.map_batches(BatchClusterSums, fn_constructor_kwargs={"make_featurizer": make_featurizer,
                                                                        "centroids": centroids.numpy()},
                               batch_size=batch_size, batch_format="numpy", concurrency=actors,
                               num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)
    total = ClusterSums.zeros(*centroids.shape)
    for part in _partial_sums(rows):
        total = total + part
    return total


def _partial_sums(rows: ray.data.Dataset) -> Iterator[ClusterSums]:
    for batch in rows.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=1):
        yield ClusterSums(torch.from_numpy(batch["sums"][0]), torch.from_numpy(batch["counts"][0]),
                          float(batch["inertia"][0]))


def label_counts(dataset: ray.data.Dataset, make_featurizer: FeaturizerFactory, centroids: torch.Tensor,
                 classes: int, *, actors: int, batch_size: int, cpus_per_actor: float = 1.0,
                 gpus_per_actor: float = 0.0) -> torch.Tensor:
    """The (clusters, classes) table of every feature of `dataset` under `centroids`: purity and usage."""
    rows = dataset.map_batches(BatchLabelCounts, fn_constructor_kwargs={
        "make_featurizer": make_featurizer, "centroids": centroids.numpy(), "classes": classes},
        batch_size=batch_size, batch_format="numpy", concurrency=actors, num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor)
    total = torch.zeros(len(centroids), classes, dtype=torch.long)
    for batch in rows.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=1):
        total += torch.from_numpy(batch["table"][0])
    return total


def feature_sample(dataset: ray.data.Dataset, make_featurizer: FeaturizerFactory, *, rows: int, keep: float,
                   seed: int, actors: int, batch_size: int, cpus_per_actor: float = 1.0,
                   gpus_per_actor: float = 0.0) -> torch.Tensor:
    """At most `rows` feature rows, each feature kept with probability `keep`: what k-means++ starts from.
    The stream stops once enough rows have arrived (which ones, when it stops early, follows the stream's
    order; with `rows` above the expected count the sample is the same set on every run)."""
    kept = dataset.map_batches(BatchFeatures, fn_constructor_kwargs={"make_featurizer": make_featurizer,
                                                                     "keep": keep, "seed": seed},
                               batch_size=batch_size, batch_format="numpy", concurrency=actors,
                               num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)
    chunks, count = [], 0
    for batch in kept.iter_batches(batch_size=None, batch_format="numpy"):
        chunks.append(torch.from_numpy(batch["feature"]))
        count += len(chunks[-1])
        if count >= rows:
            break
    if not chunks:
        raise ValueError("no features to start K-means from: the dataset is empty")
    return torch.cat(chunks)[:rows]


def fit_kmeans(dataset: ray.data.Dataset, make_featurizer: FeaturizerFactory, initial: torch.Tensor, *,
               iterations: int, actors: int, batch_size: int, cpus_per_actor: float = 1.0,
               gpus_per_actor: float = 0.0,
               on_iteration: Callable[[int, torch.Tensor, float], None] | None = None,
               ) -> tuple[torch.Tensor, list[float]]:
    """Lloyd iterations from `initial`, one streaming pass each: the centroids and each pass's inertia.
    `on_iteration(i, centroids, inertia)` after each pass (checkpoints, logging)."""
    centroids, inertia = initial.clone(), []
    for iteration in range(iterations):
        total = cluster_sums(dataset, make_featurizer, centroids, actors=actors, batch_size=batch_size,
                             cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor)
        inertia.append(total.inertia)
        centroids = total.centroids(centroids)
        if on_iteration is not None:
            on_iteration(iteration, centroids, total.inertia)
    return centroids, inertia
