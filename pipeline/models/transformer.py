"""The VIM Transformer: decoder-only, next-token prediction over the raster-ordered token grid.

Sequence layout: position 0 holds the class token (its own embedding table; in the unconditional
model a single start token), positions 1..L hold image tokens t_0..t_{L-1}, each with a learnable
2D position embedding of its grid cell. The output at position i predicts t_i, so training feeds
[class, t_0 .. t_{L-2}] and sampling decodes token by token from a preallocated KV cache.

Label dropout (beyond the paper; as in LlamaGen) swaps a label for the null class at a set rate,
so one model gives both the conditional and unconditional logits for classifier-free guidance.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.attention import causal_attention
from pipeline.models.cpu_linear import Linear
from pipeline.models.dropout import Dropout
from pipeline.models.io import load_model, save_model
from pipeline.models.noble import Noble
from pipeline.models.settings import TransformerSettings, VimSize


class KVCache:
    """Keys and values of every block for up to `max_len` positions, allocated once."""

    def __init__(self, depth: int, batch: int, heads: int, max_len: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (depth, batch, heads, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled so far

    def append(self, block: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + keys.shape[2]
        self.keys[block, :, :, start:end] = keys
        self.values[block, :, :, start:end] = values
        return self.keys[block, :, :, :end], self.values[block, :, :, :end]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, noble: Noble = Noble()):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = noble.linear(dim, 3 * dim, "attention", branches=3)  # q, k and v: a branch each
        self.proj = noble.linear(dim, dim, "attention")
        self.resid_dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, block: int = 0) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if cache is None:
            out = causal_attention(q, k, v, self.dropout if self.training else 0.0)
        else:
            start = cache.length
            k, v = cache.append(block, k, v)
            mask = None
            if length > 1:  # new positions see the cache and the new positions before them
                rows = torch.arange(start, start + length, device=x.device)[:, None]
                mask = torch.arange(k.shape[2], device=x.device)[None, :] <= rows
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.resid_dropout(self.proj(out.transpose(1, 2).reshape(batch, length, dim)))


class Block(nn.Module):
    def __init__(self, shape: VimSize, dropout: float, noble: Noble = Noble()):
        super().__init__()
        self.norm1 = nn.LayerNorm(shape.dim)
        self.attn = Attention(shape.dim, shape.heads, dropout, noble)
        self.norm2 = nn.LayerNorm(shape.dim)
        self.mlp = nn.Sequential(noble.linear(shape.dim, shape.mlp_dim, "mlp"), nn.GELU(approximate="tanh"),
                                 Dropout(dropout), noble.linear(shape.mlp_dim, shape.dim, "mlp"), Dropout(dropout))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, block: int = 0) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache, block)
        return x + self.mlp(self.norm2(x))


class VIMTransformer(nn.Module):
    def __init__(self, settings: TransformerSettings):
        super().__init__()
        self.settings = settings
        shape = settings.shape
        self.token_embedding = nn.Embedding(settings.vocab_size, shape.dim)
        self.class_embedding = nn.Embedding(settings.num_classes + 1, shape.dim)  # + null / start
        self.position = nn.Parameter(torch.zeros(settings.grid[0], settings.grid[1], shape.dim))
        self.class_position = nn.Parameter(torch.zeros(shape.dim))
        self.dropout = Dropout(settings.dropout)
        noble = Noble.of(settings)  # NOBLE branches on the blocks' linear layers (rank 0: none)
        self.blocks = nn.ModuleList(Block(shape, settings.dropout, noble) for _ in range(shape.depth))
        self.norm = nn.LayerNorm(shape.dim)  # the paper's extra LayerNorm after the last block
        self.head = Linear(shape.dim, settings.vocab_size, bias=False)
        self.apply(self._init)
        for name, parameter in self.named_parameters():  # GPT-2: scale residual outputs by depth
            if name.endswith("attn.proj.weight") or name.endswith("mlp.3.weight"):
                nn.init.normal_(parameter, std=0.02 / math.sqrt(2 * shape.depth))
        nn.init.normal_(self.position, std=0.02)
        nn.init.normal_(self.class_position, std=0.02)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # ---- inputs ---------------------------------------------------------------------------------
    def drop_labels(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training-time label dropout: each label becomes the null class with p = label_dropout."""
        rate = self.settings.label_dropout
        if rate <= 0:
            return labels
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < rate
        return torch.where(drop, torch.full_like(labels, self.settings.null_class), labels)

    def _class_tokens(self, labels: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        if labels is None or self.settings.num_classes == 0:
            labels = torch.full((batch,), self.settings.null_class, dtype=torch.long, device=device)
        return (self.class_embedding(labels) + self.class_position)[:, None]

    def _token_inputs(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Embeddings of tokens sitting at grid positions start, start+1, ..."""
        positions = self.position.flatten(0, 1)[start:start + tokens.shape[1]]
        return self.token_embedding(tokens) + positions

    def _sequence(self, tokens: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return torch.cat([self._class_tokens(labels, tokens.shape[0], tokens.device),
                          self._token_inputs(tokens, 0)], dim=1)

    # ---- training and features -----------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, L) -> logits (B, L, vocab); logits[:, i] predicts tokens[:, i] from tokens[:, :i]."""
        x = self.dropout(self._sequence(tokens[:, :-1], labels))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    @torch.no_grad()
    def features(self, tokens: torch.Tensor, labels: torch.Tensor | None, block: int) -> torch.Tensor:
        """Output of block `block` (0-based) at every image-token position: (B, L, dim), for the probe."""
        if not 0 <= block < len(self.blocks):
            raise ValueError(f"block {block} out of range 0..{len(self.blocks) - 1}")
        x = self._sequence(tokens, labels)
        for index in range(block + 1):
            x = self.blocks[index](x)
        return x[:, 1:]

    @torch.no_grad()
    def pooled_block_features(self, tokens: torch.Tensor, blocks: list[int]) -> torch.Tensor:
        """Average-pooled image-token features of several blocks in one pass: (B, len(blocks), dim).
        The class slot holds the null class, so no label reaches the features."""
        wanted = set(blocks)
        x = self._sequence(tokens, None)
        pooled = {}
        for index in range(max(blocks) + 1):
            x = self.blocks[index](x)
            if index in wanted:
                pooled[index] = x[:, 1:].mean(1)
        return torch.stack([pooled[b] for b in blocks], 1)

    # ---- sampling -------------------------------------------------------------------------------
    def new_cache(self, batch: int, device=None, dtype: torch.dtype = torch.float32) -> KVCache:
        shape = self.settings.shape
        device = device or self.head.weight.device
        return KVCache(shape.depth, batch, shape.heads, self.context_length() + 1, shape.dim // shape.heads,
                       device, dtype)

    def _run_cached(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        for index, block in enumerate(self.blocks):
            x = block(x, cache, index)
        cache.length += x.shape[1]
        return self.head(self.norm(x[:, -1]))

    @torch.no_grad()
    def prefill(self, labels: torch.Tensor | None, cache: KVCache, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Start decoding: the class token (plus optional known first tokens) -> logits of the next token."""
        batch = cache.keys.shape[1]
        x = self._class_tokens(labels, batch, cache.keys.device)
        if prefix is not None and prefix.shape[1]:
            x = torch.cat([x, self._token_inputs(prefix, 0)], dim=1)
        return self._run_cached(x, cache)

    @torch.no_grad()
    def decode_step(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token (B,) at the next grid position -> logits (B, vocab) of the token after it."""
        return self._run_cached(self._token_inputs(token[:, None], cache.length - 1), cache)

    # ---- accounting -----------------------------------------------------------------------------
    def parameter_count(self, embeddings: bool = False) -> int:
        count = sum(p.numel() for p in self.parameters())
        if not embeddings:
            count -= self.token_embedding.weight.numel() + self.class_embedding.weight.numel()
            count -= self.position.numel() + self.class_position.numel()
        return count

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 N (non-embedding weights) + 12 layers x dim x context (attention)."""
        shape = self.settings.shape
        return 6 * self.parameter_count() + 12 * shape.depth * shape.dim * self.context_length()

    def context_length(self) -> int:
        """Positions a token attends over besides the class slot: the image's."""
        return self.settings.length


def save_transformer(model: VIMTransformer, folder: str | Path) -> None:
    save_model(model, folder)


def load_transformer(folder: str | Path, device: str | torch.device = "cpu") -> VIMTransformer:
    """A VIM Transformer from its two files, in eval mode."""
    return load_model(VIMTransformer, TransformerSettings, folder, device)
