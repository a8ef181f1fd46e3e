"""Batch image transforms on tensors: uint8 NHWC from the data stream -> float NCHW in [0, 1]."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255)


def center(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (antialiased) to `size` when needed, then the centered square."""
    height, width = images.shape[-2:]
    if min(height, width) != size:
        scale = size / min(height, width)
        images = F.interpolate(images, size=(round(height * scale), round(width * scale)), mode="bicubic",
                               antialias=True, align_corners=False).clamp(0, 1)
        height, width = images.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return images[..., top:top + size, left:left + size]


def random_crop_flip(images: torch.Tensor, size: int, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Train augmentation: center to `size`, reflect-pad by `pad`, random crop back, random h-flip."""
    images = center(images, size)
    if pad:
        images = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    batch = images.shape[0]
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator)
    flips = torch.rand(batch, generator=generator) < 0.5
    out = torch.empty(batch, images.shape[1], size, size, dtype=images.dtype)
    for i in range(batch):
        top, left = int(offsets[i, 0]), int(offsets[i, 1])
        crop = images[i, :, top:top + size, left:left + size]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out
