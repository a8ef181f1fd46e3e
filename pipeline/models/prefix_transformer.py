"""DiGIT's second stage: a decoder-only Transformer that reads an image's SSL tokens as a prefix and predicts
the pixel tokenizer's codes of the same image, which the pixel decoder then renders.

Sequence layout: [class] [s_0 .. s_{P-1}] [t_0 .. t_{L-2}]. The SSL tokens s (K-means cluster indices on the
SSL encoder's patch grid) have their own embedding table and 2D positions; the pixel codes t are the VIM
Transformer's. The output at the last prefix slot predicts t_0, and so on, so the loss falls on the pixel
codes only. Everything else (blocks, head, KV cache, label dropout) is the VIM Transformer's.
"""
from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from pipeline.models.io import load_model, save_model
from pipeline.models.settings import Int, TransformerSettings
from pipeline.models.transformer import KVCache, VIMTransformer


class PrefixTransformerSettings(TransformerSettings):
    """The VIM Transformer's settings plus the prefix's vocabulary (K-means K) and grid."""

    prefix_vocab_size: Int = Field(..., ge=1, description="SSL token vocabulary: the K-means centroids")
    prefix_grid: tuple[Int, Int] = Field(..., description="the SSL encoder's patch grid")

    @property
    def prefix_length(self) -> int:
        return self.prefix_grid[0] * self.prefix_grid[1]


class PrefixTransformer(VIMTransformer):
    settings: PrefixTransformerSettings

    def __init__(self, settings: PrefixTransformerSettings):
        super().__init__(settings)
        dim = settings.shape.dim
        self.prefix_embedding = nn.Embedding(settings.prefix_vocab_size, dim)
        self.prefix_position = nn.Parameter(torch.zeros(settings.prefix_grid[0], settings.prefix_grid[1], dim))
        nn.init.normal_(self.prefix_embedding.weight, std=0.02)
        nn.init.normal_(self.prefix_position, std=0.02)

    def _prefix_inputs(self, prefix: torch.Tensor) -> torch.Tensor:
        if prefix.shape[1] != self.settings.prefix_length:
            raise ValueError(f"prefix of {prefix.shape[1]} SSL tokens; the model reads "
                             f"{self.settings.prefix_length} ({self.settings.prefix_grid[0]}x"
                             f"{self.settings.prefix_grid[1]})")
        return self.prefix_embedding(prefix) + self.prefix_position.flatten(0, 1)

    def forward(self, tokens: torch.Tensor, prefix: torch.Tensor,  # type: ignore[override]
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, L) pixel codes, prefix (B, P) SSL tokens -> logits (B, L, vocab) of the pixel codes."""
        x = torch.cat([self._class_tokens(labels, tokens.shape[0], tokens.device), self._prefix_inputs(prefix),
                       self._token_inputs(tokens[:, :-1], 0)], dim=1)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, self.settings.prefix_length:]))

    @torch.no_grad()
    def prefill(self, labels: torch.Tensor | None, cache: KVCache,  # type: ignore[override]
                condition: torch.Tensor | None = None) -> torch.Tensor:
        """Start decoding from the class token and the SSL tokens (`condition`, (B, P)) -> logits of t_0."""
        if condition is None:
            raise ValueError("the second stage decodes from SSL tokens: pass condition=(B, P) token indices")
        batch = cache.keys.shape[1]
        x = torch.cat([self._class_tokens(labels, batch, cache.keys.device), self._prefix_inputs(condition)], dim=1)
        return self._run_cached(x, cache)

    @torch.no_grad()
    def decode_step(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        position = cache.length - 1 - self.settings.prefix_length  # grid cell of the token fed in
        return self._run_cached(self._token_inputs(token[:, None], position), cache)

    def parameter_count(self, embeddings: bool = False) -> int:
        count = super().parameter_count(embeddings)
        if not embeddings:
            count -= self.prefix_embedding.weight.numel() + self.prefix_position.numel()
        return count

    def context_length(self) -> int:
        return self.settings.prefix_length + self.settings.length


def save_prefix_transformer(model: PrefixTransformer, folder: str | Path) -> None:
    save_model(model, folder)


def load_prefix_transformer(folder: str | Path, device: str | torch.device = "cpu") -> PrefixTransformer:
    return load_model(PrefixTransformer, PrefixTransformerSettings, folder, device)
