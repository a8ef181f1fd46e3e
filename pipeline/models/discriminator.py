"""A StyleGAN2-style residual discriminator (Karras et al. 2020), sized by resolution.

Kept: residual blocks with 1/sqrt(2) skip scaling, leaky ReLU 0.2, anti-aliased (blur) downsampling,
minibatch standard deviation, a linear head. Left out: equalised learning rate and weight demodulation
(the latter belongs to the generator); AdamW at the configured lr handles the scale instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.cpu_linear import Linear


class Blur(nn.Module):
    def __init__(self):
        super().__init__()
        kernel = torch.tensor([1.0, 3.0, 3.0, 1.0])
        kernel = kernel[:, None] * kernel[None]
        self.register_buffer("kernel", (kernel / kernel.sum())[None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        x = F.pad(x, (1, 2, 1, 2), mode="reflect")
        return F.conv2d(x, self.kernel.expand(channels, 1, 4, 4), groups=channels)


class ResidualDown(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, padding=1)
        self.conv2 = nn.Conv2d(cin, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)
        self.blur = Blur()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.skip(F.avg_pool2d(self.blur(x), 2))
        x = F.leaky_relu(self.conv1(x), 0.2)
        x = F.leaky_relu(self.conv2(F.avg_pool2d(self.blur(x), 2)), 0.2)
        return (x + skip) / math.sqrt(2)


class MinibatchStd(nn.Module):
    def __init__(self, group: int = 4):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        group = min(self.group, batch)
        while batch % group:
            group -= 1
        std = x.view(group, -1, channels, height, width).std(0, unbiased=False).add(1e-8)
        std = std.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1).repeat(group, 1, height, width)
        return torch.cat([x, std], 1)


class StyleGANDiscriminator(nn.Module):
    """Images in [0, 1] (B, 3, R, R) -> one real/fake logit per image."""

    def __init__(self, resolution: int, base_channels: int = 64, max_channels: int = 512):
        super().__init__()
        if resolution < 8 or resolution & (resolution - 1):
            raise ValueError(f"discriminator resolution must be a power of two >= 8, got {resolution}")
        steps = int(math.log2(resolution)) - 2  # down to 4x4
        channels = [min(base_channels * 2**i, max_channels) for i in range(steps + 1)]
        self.stem = nn.Conv2d(3, channels[0], 1)
        self.blocks = nn.Sequential(*[ResidualDown(channels[i], channels[i + 1]) for i in range(steps)])
        self.mbstd = MinibatchStd()
        self.conv = nn.Conv2d(channels[-1] + 1, channels[-1], 3, padding=1)
        self.fc = Linear(channels[-1] * 16, channels[-1])
        self.out = Linear(channels[-1], 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.stem(images * 2 - 1), 0.2)
        x = self.blocks(x)
        x = F.leaky_relu(self.conv(self.mbstd(x)), 0.2)
        x = F.leaky_relu(self.fc(x.flatten(1)), 0.2)
        return self.out(x).squeeze(1)
