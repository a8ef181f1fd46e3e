"""Improved precision and recall (Kynkäänniemi et al. 2019) from feature vectors.

Each set spans a manifold: the union of balls around its points, each ball reaching the point's k-th
nearest neighbour in the same set. Precision is the fraction of fake points inside the real manifold
(are the samples realistic?); recall is the fraction of real points inside the fake manifold (is the real
variety covered?).
"""
from __future__ import annotations

import numpy as np


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, batch: int = 1024) -> tuple[float, float]:
    """(precision, recall) of `fake` against `real`, rows are feature vectors.

    Distances are computed in float64 blocks of `batch` rows, so neither the full distance matrix nor a
    (rows, rows, width) difference tensor is ever held in memory.
    """
    real, fake = _checked_features(real, fake, k, batch)
    real_radii = _kth_neighbour_distances(real, k, batch)
    fake_radii = _kth_neighbour_distances(fake, k, batch)
    precision = _fraction_inside(fake, real, real_radii, batch)
    recall = _fraction_inside(real, fake, fake_radii, batch)
    return precision, recall


def _checked_features(real: np.ndarray, fake: np.ndarray, k: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    if k < 1 or batch < 1:
        raise ValueError(f"k and batch must be at least 1, got k={k}, batch={batch}")
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    for name, features in (("real", real), ("fake", fake)):
        if features.ndim != 2:
            raise ValueError(f"{name} features must be 2-d (rows, width), got shape {features.shape}")
        if len(features) <= k:
            raise ValueError(f"{name} features need more than k={k} rows for a k-th neighbour, got {len(features)}")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in width: {real.shape[1]} vs {fake.shape[1]}")
    return real, fake


def _squared_distances(rows: np.ndarray, points: np.ndarray, points_sq: np.ndarray) -> np.ndarray:
    """||a - b||^2 = ||a||^2 - 2 a.b + ||b||^2; rounding can dip below zero, which no distance can."""
    rows_sq = (rows * rows).sum(1)
    return np.maximum(rows_sq[:, None] - 2 * rows @ points.T + points_sq[None], 0.0)


def _kth_neighbour_distances(points: np.ndarray, k: int, batch: int) -> np.ndarray:
    """Squared distance from each point to its k-th nearest other point (itself excluded)."""
    points_sq = (points * points).sum(1)
    radii = np.empty(len(points))
    for start in range(0, len(points), batch):
        block = _squared_distances(points[start:start + batch], points, points_sq)
        block[np.arange(len(block)), np.arange(start, start + len(block))] = np.inf  # not its own neighbour
        radii[start:start + batch] = np.partition(block, k - 1, axis=1)[:, k - 1]
    return radii


def _fraction_inside(queries: np.ndarray, points: np.ndarray, squared_radii: np.ndarray, batch: int) -> float:
    """Fraction of queries within some point's radius, squared distances against squared radii."""
    points_sq = (points * points).sum(1)
    inside = 0
    for start in range(0, len(queries), batch):
        block = _squared_distances(queries[start:start + batch], points, points_sq)
        inside += int((block <= squared_radii[None]).any(1).sum())
    return inside / len(queries)
