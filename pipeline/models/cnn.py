"""The CNN-VQGAN baseline's encoder and decoder (the taming-transformers design, Esser et al. 2021).

Encoder: a 3x3 conv in, then one level per resolution, each `cnn_res_blocks` residual blocks (GroupNorm,
swish, 3x3 conv, twice) followed by a stride-2 3x3 conv between levels, so log2(patch_size) halvings bring
the image to the same image_size / patch_size grid the ViT makes; non-local self-attention after every
block of the lowest level and in the middle (res, attention, res); GroupNorm, swish and a 3x3 conv out.
Decoder: the mirror, with `cnn_res_blocks + 1` blocks per level and nearest upsampling followed by a
3x3 conv. Both speak the ViT's token interface, (B, grid*grid, width) in row-major grid order, so the
quantizer, the output heads, the losses and every stage use the same tokenizer model either way.

Choices where the taming code has one fixed value: GroupNorm uses gcd(channels, 32) groups (32, as taming,
at widths that are multiples of 32; fewer at the small widths a CPU run uses), and attention goes through
`scaled_dot_product_attention` with one head, the arithmetic of taming's explicit softmax(q k^T / sqrt(c)) v.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.settings import TokenizerSettings

TAMING_NORM_GROUPS = 32


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, TAMING_NORM_GROUPS), channels, eps=1e-6)


class ResBlock(nn.Module):
    """norm -> swish -> conv3x3, twice, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(channels_in), nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(channels_out), nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.shortcut = (nn.Identity() if channels_in == channels_out
                         else nn.Conv2d(channels_in, channels_out, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class NonLocalBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map, added to its input."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)  # taming's q, k and v 1x1 convs, fused
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # (B, 3C, H, W) -> three (B, 1, HW, C): one head over the H*W positions
        q, k, v = self.qkv(self.norm(x)).view(batch, 3, channels, height * width).transpose(2, 3).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(1, 2).reshape(batch, channels, height, width))


class Downsample(nn.Module):
    """Halves the resolution with a stride-2 3x3 conv, padded on the right and bottom only (as taming)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Doubles the resolution: nearest neighbour, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MiddleBlock(nn.Sequential):
    def __init__(self, channels: int):
        super().__init__(ResBlock(channels, channels), NonLocalBlock(channels), ResBlock(channels, channels))


def _level_blocks(channels_in: int, channels_out: int, count: int, attention: bool) -> nn.Sequential:
    """`count` residual blocks, each followed by self-attention when `attention` (the lowest level)."""
    layers: list[nn.Module] = []
    for index in range(count):
        layers.append(ResBlock(channels_in if index == 0 else channels_out, channels_out))
        if attention:
            layers.append(NonLocalBlock(channels_out))
    return nn.Sequential(*layers)


def _check_sizes(settings: TokenizerSettings) -> None:
    if settings.image_size % settings.patch_size:
        raise ValueError(f"image size {settings.image_size} is not a multiple of patch size {settings.patch_size}")


class CNNEncoder(nn.Module):
    """Image (B, channels, H, W) in [-1, 1] -> tokens (B, (H/p) * (W/p), settings.latent_width)."""

    def __init__(self, settings: TokenizerSettings, channels: int = 3):
        super().__init__()
        _check_sizes(settings)
        widths = [settings.cnn_channels * mult for mult in settings.cnn_levels]
        self.conv_in = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        previous = widths[0]
        for level, width in enumerate(widths):
            lowest = level == len(widths) - 1
            self.levels.append(_level_blocks(previous, width, settings.cnn_res_blocks, attention=lowest))
            self.downsamples.append(nn.Identity() if lowest else Downsample(width))
            previous = width
        self.middle = MiddleBlock(previous)
        self.norm_out = group_norm(previous)
        self.conv_out = nn.Conv2d(previous, settings.latent_width, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(images)
        for blocks, downsample in zip(self.levels, self.downsamples):
            x = downsample(blocks(x))
        x = self.conv_out(F.silu(self.norm_out(self.middle(x))))
        return x.flatten(2).transpose(1, 2).contiguous()  # row-major grid order, as the ViT's tokens


class CNNDecoder(nn.Module):
    """Tokens (B, grid*grid, settings.latent_width) -> per-pixel outputs (B, out_channels, H, W)."""

    def __init__(self, settings: TokenizerSettings, out_channels: int):
        super().__init__()
        _check_sizes(settings)
        self.grid = settings.grid
        widths = [settings.cnn_channels * mult for mult in settings.cnn_levels]
        previous = widths[-1]
        self.conv_in = nn.Conv2d(settings.latent_width, previous, 3, padding=1)
        self.middle = MiddleBlock(previous)
        # Lowest resolution first; each level but the last ends by doubling the resolution.
        self.levels = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width = widths[level]
            self.levels.append(_level_blocks(previous, width, settings.cnn_res_blocks + 1,
                                             attention=level == len(widths) - 1))
            self.upsamples.append(Upsample(width) if level > 0 else nn.Identity())
            previous = width
        self.norm_out = group_norm(previous)
        self.conv_out = nn.Conv2d(previous, out_channels, 3, padding=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, _, width = tokens.shape
        x = tokens.transpose(1, 2).reshape(batch, width, self.grid, self.grid)
        x = self.middle(self.conv_in(x))
        for blocks, upsample in zip(self.levels, self.upsamples):
            x = upsample(blocks(x))
        return self.conv_out(F.silu(self.norm_out(x)))
