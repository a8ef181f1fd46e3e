"""Inception Score from class probabilities: exp(E_x KL(p(y|x) || p(y))), averaged over splits."""
from __future__ import annotations

import numpy as np


def inception_score(probabilities: np.ndarray, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """(mean, std) over `splits` equal parts, as in the original code (10 splits of 50k).

    The score must not depend on the row order: the evaluation writes samples class by class, and
    consecutive splits of class-sorted rows each hold one class, which scores ~1 whatever the samples. So
    the rows are first put in a canonical order that depends only on the multiset of rows, then shuffled
    with a fixed seed before splitting (torch-fidelity also shuffles before splitting).
    """
    probabilities = np.asarray(probabilities, np.float64)
    splits = max(1, min(splits, len(probabilities)))
    shuffled = _canonical_order(probabilities)[np.random.default_rng(seed).permutation(len(probabilities))]
    scores = [_split_score(part) for part in np.array_split(shuffled, splits)]
    return float(np.mean(scores)), float(np.std(scores))


def _canonical_order(probabilities: np.ndarray) -> np.ndarray:
    """Rows sorted lexicographically by their columns: only identical rows can tie, and those are
    interchangeable, so any permutation of the input gives the same array."""
    return probabilities[np.lexsort(probabilities.T[::-1])]


def _split_score(part: np.ndarray) -> float:
    marginal = part.mean(0, keepdims=True)
    kl = (part * (np.log(part + 1e-12) - np.log(marginal + 1e-12))).sum(1)
    return float(np.exp(kl.mean()))
