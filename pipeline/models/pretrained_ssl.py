"""A pretrained self-supervised ViT (e.g. DINOv2 with registers, DiGIT's encoder) for cluster users: the
architecture from `timm`, the weights from a local file (copied from a bucket beforehand); nothing is
downloaded at run time.

It offers what the in-pipeline encoder (`pipeline/models/ssl.py:SSLViT`) offers K-means: `patch_features`
of one block through the final LayerNorm, prefix tokens (class and registers) left out, and `feature_dim`.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

# DINOv2 and most timm ViTs were trained on ImageNet-normalised pixels.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PretrainedWeightsError(FileNotFoundError):
    """The weights file is missing or does not fit the named architecture."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher"):  # common wrappers of released checkpoints
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def resized_positions(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A checkpoint's position table resampled (bicubic) to the model's patch grid: released ViTs carry the
    table of their training resolution (DINOv2: 37 x 37 at 518 px), the pipeline reads its own image size."""
    from timm.layers import resample_abs_pos_embed

    table = state.get("pos_embed")
    if table is None or table.shape == model.pos_embed.shape:
        return state
    prefix = table.shape[1] - math.isqrt(table.shape[1]) ** 2  # class token rows in the table (registers never are)
    return {**state, "pos_embed": resample_abs_pos_embed(table, list(model.patch_embed.grid_size),
                                                         num_prefix_tokens=prefix)}


class PretrainedSSLEncoder(nn.Module):
    def __init__(self, architecture: str, weights: str | Path, image_size: int, feature_block: int = -3):
        super().__init__()
        import timm

        path = Path(weights)
        if not path.is_file():
            raise PretrainedWeightsError(
                f"SSL encoder weights not found: {path}. Nothing is downloaded at run time: copy the {architecture} "
                f"checkpoint (.safetensors or .pth, e.g. from your bucket) to this path, or train the encoder in "
                f"the pipeline instead")
        try:
            self.model = timm.create_model(architecture, pretrained=False, num_classes=0, img_size=image_size)
        except RuntimeError as error:  # timm: "Unknown model (...)"
            raise PretrainedWeightsError(f"{architecture}: {error}") from error
        state = resized_positions(read_state_dict(path), self.model)
        try:
            missing, unexpected = self.model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # a tensor of another shape
            raise PretrainedWeightsError(f"{path} does not fit {architecture}: {error}") from error
        missing = [k for k in missing if not k.startswith("head")]
        if missing or unexpected:
            raise PretrainedWeightsError(
                f"{path} does not fit {architecture}: {len(missing)} missing key(s) (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        depth = len(self.model.blocks)
        if not -depth <= feature_block < depth:
            raise ValueError(f"feature_block {feature_block}: {architecture} has {depth} blocks")
        self.block = feature_block % depth
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    @property
    def feature_dim(self) -> int:
        return self.model.embed_dim

    @torch.no_grad()
    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] (H, W multiples of the patch size) -> (B, N, dim) patch features."""
        x = (images - self.mean) / self.std
        return self.model.forward_intermediates(x, indices=[self.block], norm=True, output_fmt="NLC",
                                                intermediates_only=True, stop_early=True)[0]
