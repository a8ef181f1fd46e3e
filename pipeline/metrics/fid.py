"""Fréchet distance between Gaussian fits of two feature sets (FID, rFID, and FID in any feature space).

Float64 throughout; `scipy.linalg.sqrtm` of the covariance product, with the two guards the reference
implementation (pytorch-fid, after the TTUR code) uses: a small diagonal offset when the product is
singular, and dropping a negligible imaginary part that numerical error leaves behind.

`method="eigh"` computes the same trace without a general matrix square root: Tr((S1 S2)^(1/2)) equals
the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), a symmetric PSD matrix. It avoids
sqrtm's slow, ill-conditioned case (fewer samples than dimensions) and agrees with sqrtm closely
(tests/test_metrics.py); metrics.json names the method used.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import linalg


@dataclass
class GaussianStats:
    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @classmethod
    def of(cls, features: np.ndarray) -> "GaussianStats":
        features = np.asarray(features, np.float64)
        if len(features) < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(features)}")
        return cls(features.mean(0), np.cov(features, rowvar=False), len(features))

    def save(self, path: str | Path) -> None:
        np.savez(path, mu=self.mu, sigma=self.sigma, count=self.count)

    @classmethod
    def load(cls, path: str | Path) -> "GaussianStats":
        data = np.load(path)
        return cls(data["mu"], data["sigma"], int(data["count"]))


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = root1 @ sigma2 @ root1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, method: str = "sqrtm") -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)); `method` is "sqrtm" (reference) or "eigh"."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2)
                     - 2 * _trace_sqrt_product_eigh(sigma1, sigma2))
    if method != "sqrtm":
        raise ValueError(f"unknown Frechet method {method!r}: use 'sqrtm' or 'eigh'")
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # singular product: offset both diagonals
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the matrix square root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_stats(a: GaussianStats, b: GaussianStats, method: str = "sqrtm") -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, method=method)
