"""Class-balanced, seeded row subsets for evaluation.

A prefix of class-sorted rows would hold only the first classes, so subsets are drawn per class: every
class present gets the same number of rows, picked by a seeded permutation of that class's indices in
ascending order, so the choice depends on the labels and the seed only.
"""
from __future__ import annotations

import numpy as np


def balanced_indices(labels: np.ndarray, total: int, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Sorted row indices holding min(total // classes, smallest class count) rows of every class present
    in `labels` once the `exclude` indices are removed."""
    rows_by_class = _rows_by_class(labels, exclude)
    per_class = min(_per_class_quota(total, len(rows_by_class)), min(len(rows) for rows in rows_by_class))
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([_permuted(rows, rng)[:per_class] for rows in rows_by_class]))


def _rows_by_class(labels: np.ndarray, exclude: np.ndarray | None) -> list[np.ndarray]:
    """Indices of each class present (classes in ascending order), each in ascending index order."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-d, got shape {labels.shape}")
    available = np.ones(len(labels), dtype=bool)
    if exclude is not None:
        available[np.asarray(exclude, dtype=np.intp)] = False
    candidates = np.flatnonzero(available)
    if len(candidates) == 0:
        raise ValueError("no rows left to choose from")
    # A stable sort keeps each class's indices ascending, so the per-class permutation sees a fixed order.
    grouped = candidates[np.argsort(labels[candidates], kind="stable")]
    _, counts = np.unique(labels[grouped], return_counts=True)
    return np.split(grouped, np.cumsum(counts)[:-1])


def _per_class_quota(total: int, num_classes: int) -> int:
    if total < num_classes:
        raise ValueError(f"a class-balanced subset of {total} rows cannot hold all {num_classes} classes")
    return total // num_classes


def _permuted(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rows[rng.permutation(len(rows))]
