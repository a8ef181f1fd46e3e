"""DiGIT's tokens: an image's SSL patch features, each replaced by the index of its nearest K-means centroid.

The encoder is either the one the `ssl` stage trained (its folder: config.json + model.safetensors) or a
pretrained timm ViT from a local weights file; `EncoderSource` says which, as plain data that travels to Ray
actors. Free of Ray: the K-means and pretokenize stages and the benchmarks share it."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeline.models.kmeans import nearest_centroids


@dataclass(frozen=True)
class EncoderSource:
    """Where the SSL encoder comes from: `folder` (the ssl stage's export, a local path) or a timm
    `pretrained` architecture with its local `weights` file, read at `image_size` (ViT positions are
    resized by timm) with the features of `feature_block`."""

    folder: str | None = None
    pretrained: str | None = None
    weights: str | None = None
    image_size: int = 0
    feature_block: int = -3

    def as_dict(self) -> dict:
        return asdict(self)


def load_feature_encoder(source: EncoderSource, device: str | torch.device = "cpu") -> nn.Module:
    """The encoder in eval mode; it has `patch_features(images in [0, 1]) -> (B, N, dim)` and `feature_dim`."""
    if source.folder is not None:
        from pipeline.models.ssl import load_ssl_encoder
        return load_ssl_encoder(source.folder, device)
    from pipeline.models.pretrained_ssl import PretrainedSSLEncoder
    return PretrainedSSLEncoder(source.pretrained, source.weights, source.image_size,
                                source.feature_block).to(device).eval()


@torch.no_grad()
def patch_features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """RGB (B, 3, H, W) in [0, 1] -> (B, N, dim) float32 patch features (a grey encoder reads their luma)."""
    return encoder.patch_features(images).float()


@torch.no_grad()
def ssl_tokens(encoder: nn.Module, centroids: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B, N) int64 K-means tokens, raster order."""
    features = patch_features(encoder, images)
    tokens, _ = nearest_centroids(features.flatten(0, 1), centroids.to(features.device, features.dtype))
    return tokens.view(features.shape[0], features.shape[1])
