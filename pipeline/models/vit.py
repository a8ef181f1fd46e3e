"""The ViT pieces of ViT-VQGAN: patch embedding, pre-LN blocks, the tanh output head, 2D positions.

Choices where the paper is silent: fixed 2D sin-cos position embeddings, GELU MLPs,
pre-LN blocks, a conv patch embedding (= a linear map of each patch), and a per-token
Linear -> tanh -> Linear output head whose hidden width is the block MLP width.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.cpu_linear import Linear
from pipeline.models.noble import Noble
from pipeline.models.settings import ViTSize


def sincos_2d(height: int, width: int, dim: int) -> torch.Tensor:
    """(height*width, dim) fixed 2D sin-cos embedding: half the channels for rows, half for columns."""
    if dim % 4:
        raise ValueError(f"model dim {dim} must be divisible by 4 for 2D sin-cos positions")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                                torch.arange(width, dtype=torch.float64), indexing="ij")
    parts = []
    for grid in (rows.flatten(), cols.flatten()):
        angles = grid[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0, noble: Noble = Noble()):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.qkv = noble.linear(dim, 3 * dim, "attention", branches=3)  # q, k and v: a branch each
        self.proj = noble.linear(dim, dim, "attention")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        # unbind(2) rather than a leading permute: its backward stacks the three gradients straight
        # into the (B, N, 3, heads, head_dim) layout of the qkv output, with no extra copy.
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(batch, tokens, 3, self.heads, -1).unbind(2))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-LN Transformer block (bidirectional: the tokenizer sees the whole image)."""

    def __init__(self, size: ViTSize, dropout: float = 0.0, noble: Noble = Noble()):
        super().__init__()
        self.norm1 = nn.LayerNorm(size.dim)
        self.attn = Attention(size.dim, size.heads, dropout, noble)
        self.norm2 = nn.LayerNorm(size.dim)
        self.mlp = nn.Sequential(noble.linear(size.dim, size.mlp_dim, "mlp"), nn.GELU(),
                                 noble.linear(size.mlp_dim, size.dim, "mlp"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TanhHead(nn.Module):
    """The paper's output head: a two-layer feed-forward network with a tanh in the middle."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.fc1, self.fc2 = Linear(dim, hidden), Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class ViTEncoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> tokens (B, H/p * W/p, dim)."""

    def __init__(self, size: ViTSize, image_size: int, patch_size: int, channels: int = 3, noble: Noble = Noble()):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of patch size {patch_size}")
        self.grid = image_size // patch_size
        self.patch = nn.Conv2d(channels, size.dim, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos", sincos_2d(self.grid, self.grid, size.dim), persistent=False)
        self.blocks = nn.ModuleList(Block(size, noble=noble) for _ in range(size.depth))
        self.norm = nn.LayerNorm(size.dim)
        self.head = TanhHead(size.dim, size.mlp_dim, size.dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The conv's (B, dim, N) output seen as (B, N, dim) is strided, and a strided residual stream costs
        # a copy in every LayerNorm and slower adds. With pos first the sum takes pos's token-major layout
        # (then contiguous() is free); the values are the same either way.
        x = (self.pos + self.patch(images).flatten(2).transpose(1, 2)).contiguous()
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class ViTDecoder(nn.Module):
    """Tokens (B, N, dim) -> per-pixel outputs (B, out_channels, H, W); each token becomes a p x p patch."""

    def __init__(self, size: ViTSize, image_size: int, patch_size: int, out_channels: int, noble: Noble = Noble()):
        super().__init__()
        self.grid, self.patch_size, self.out_channels = image_size // patch_size, patch_size, out_channels
        self.register_buffer("pos", sincos_2d(self.grid, self.grid, size.dim), persistent=False)
        self.blocks = nn.ModuleList(Block(size, noble=noble) for _ in range(size.depth))
        self.norm = nn.LayerNorm(size.dim)
        self.head = TanhHead(size.dim, size.mlp_dim, patch_size * patch_size * out_channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens + self.pos
        for block in self.blocks:
            x = block(x)
        patches = self.head(self.norm(x))  # (B, g*g, p*p*C)
        batch, p, g, c = patches.shape[0], self.patch_size, self.grid, self.out_channels
        return patches.view(batch, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(batch, c, g * p, g * p)


def init_weights(module: nn.Module) -> None:
    """Truncated-normal weights (std 0.02) inside blocks, Xavier for the patch embedding and output heads
    (so the signal entering and leaving the Transformer is unit-scale), zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, TanhHead):
            nn.init.xavier_uniform_(m.fc1.weight)
            nn.init.xavier_uniform_(m.fc2.weight)
        elif isinstance(m, (ViTEncoder,)):
            nn.init.xavier_uniform_(m.patch.weight.view(m.patch.weight.shape[0], -1))


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
