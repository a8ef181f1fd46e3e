"""The RQ-Transformer (Lee et al., CVPR 2022): autoregressive over code stacks, h*w positions of D codes each.

Spatial transformer, causal over positions: slot 0 holds the class token (in the unconditional model a single
start token), slot t+1 the sum over depth of stack t's code embeddings plus stack t's 2D position embedding. Its
output at slot t, the context h_t, has seen stacks 0..t-1.
Depth transformer, per position and causal over depths: its input at depth 0 is h_t, at depth d the sum of the
embeddings of the codes at depths < d (the partial sum of residual quantization), each plus a depth embedding.
One head, shared across depths, predicts the code at every depth: logits (B, L, D, K).

Both use the VIM Transformer's blocks and KV cache (pipeline/models/transformer.py): sampling runs the spatial
transformer once per position and the depth transformer once per code, each from its own cache. The code
embeddings are learned here (the paper's official code can also read them from the RQ-VAE's codebook). Label
dropout (the null class) gives classifier-free guidance as in the VIM Transformer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.models.cpu_linear import packed_weights
from pipeline.models.dropout import Dropout
from pipeline.models.io import load_model, save_model
from pipeline.models.noble import Noble
from pipeline.models.sampling import SamplingSettings, conditioning_rows, filter_logits, guided_logits
from pipeline.models.settings import RQTransformerSettings, VimSize
from pipeline.models.transformer import Block, KVCache, VIMTransformer


@dataclass
class RQCaches:
    spatial: KVCache  # one slot per position (the class token and stacks 0..L-2)
    depth: KVCache  # one slot per depth, refilled at every position


class RQTransformer(nn.Module):
    def __init__(self, settings: RQTransformerSettings):
        super().__init__()
        self.settings = settings
        size = settings.shape
        books = 1 if settings.shared_codebook else settings.code_depth
        self.token_embedding = nn.Embedding(books * settings.vocab_size, size.dim)
        self.class_embedding = nn.Embedding(settings.num_classes + 1, size.dim)  # + null / start
        self.position = nn.Parameter(torch.zeros(settings.grid[0], settings.grid[1], size.dim))
        self.class_position = nn.Parameter(torch.zeros(size.dim))
        self.depth_position = nn.Parameter(torch.zeros(settings.code_depth, size.dim))
        self.dropout = Dropout(settings.dropout)
        noble = Noble.of(settings)
        spatial = VimSize(size.dim, size.spatial_layers, size.heads, size.mlp_dim)
        depth = VimSize(size.dim, size.depth_layers, size.heads, size.mlp_dim)
        self.spatial_blocks = nn.ModuleList(Block(spatial, settings.dropout, noble) for _ in range(spatial.depth))
        self.depth_blocks = nn.ModuleList(Block(depth, settings.dropout, noble) for _ in range(depth.depth))
        self.norm = nn.LayerNorm(size.dim)
        self.head = nn.Linear(size.dim, settings.vocab_size, bias=False)  # shared across depths
        self.apply(self._init)
        for stack in (self.spatial_blocks, self.depth_blocks):  # GPT-2: residual outputs scaled by the stack's depth
            for name, parameter in stack.named_parameters():
                if name.endswith("attn.proj.weight") or name.endswith("mlp.3.weight"):
                    nn.init.normal_(parameter, std=0.02 / math.sqrt(2 * len(stack)))
        for parameter in (self.position, self.class_position, self.depth_position):
            nn.init.normal_(parameter, std=0.02)

    _init = staticmethod(VIMTransformer._init)  # the VIM Transformer's initialisation of linears and embeddings

    # ---- inputs ---------------------------------------------------------------------------------
    drop_labels = VIMTransformer.drop_labels  # label dropout to the null class, as the VIM Transformer trains

    def embed_codes(self, codes: torch.Tensor, first_depth: int = 0) -> torch.Tensor:
        """Codes (..., d) at depths first_depth.. -> their embeddings (..., d, dim)."""
        if not self.settings.shared_codebook:  # a table per depth, stacked
            depths = torch.arange(first_depth, first_depth + codes.shape[-1], device=codes.device)
            codes = codes + depths * self.settings.vocab_size
        return self.token_embedding(codes)

    def _class_tokens(self, labels: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        if labels is None or self.settings.num_classes == 0:
            labels = torch.full((batch,), self.settings.null_class, dtype=torch.long, device=device)
        return (self.class_embedding(labels) + self.class_position)[:, None]

    def _stack_inputs(self, embedded: torch.Tensor, start: int) -> torch.Tensor:
        """Embedded stacks (B, n, D, dim) at positions start.. -> the spatial transformer's inputs (B, n, dim)."""
        positions = self.position.flatten(0, 1)[start:start + embedded.shape[1]]
        return embedded.sum(2) + positions

    # ---- training -------------------------------------------------------------------------------
    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Code stacks (B, L, D) -> logits (B, L, D, K); logits[:, t, d] predicts codes[:, t, d] from the stacks
        before t and the codes of stack t at depths below d."""
        batch, length, depth = codes.shape
        embedded = self.embed_codes(codes)
        x = torch.cat([self._class_tokens(labels, batch, codes.device),
                       self._stack_inputs(embedded[:, :-1], 0)], dim=1)
        x = self.dropout(x)
        for block in self.spatial_blocks:
            x = block(x)
        # depth 0 reads the context, depth d the partial sum of the stack's first d code embeddings
        x = torch.cat([x[:, :, None], embedded[:, :, :-1].cumsum(2)], dim=2) + self.depth_position[:depth]
        x = x.flatten(0, 1)
        for block in self.depth_blocks:
            x = block(x)
        return self.head(self.norm(x)).view(batch, length, depth, -1)

    # ---- sampling -------------------------------------------------------------------------------
    def new_caches(self, batch: int, device=None, dtype: torch.dtype = torch.float32) -> RQCaches:
        size, settings = self.settings.shape, self.settings
        device = device or self.head.weight.device
        head_dim = size.dim // size.heads
        return RQCaches(KVCache(size.spatial_layers, batch, size.heads, settings.length, head_dim, device, dtype),
                        KVCache(size.depth_layers, batch, size.heads, settings.code_depth, head_dim, device, dtype))

    @staticmethod
    def _run_cached(blocks: nn.ModuleList, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        for index, block in enumerate(blocks):
            x = block(x, cache, index)
        cache.length += x.shape[1]
        return x[:, -1]

    @torch.no_grad()
    def prefill(self, labels: torch.Tensor | None, caches: RQCaches) -> torch.Tensor:
        """Start decoding: the class token -> the context of position 0, (B, dim)."""
        batch = caches.spatial.keys.shape[1]
        return self._run_cached(self.spatial_blocks, self._class_tokens(labels, batch, caches.spatial.keys.device),
                                caches.spatial)

    @torch.no_grad()
    def spatial_step(self, stack: torch.Tensor, caches: RQCaches) -> torch.Tensor:
        """The stack (B, D) at the next position -> the context of the position after it, (B, dim)."""
        x = self._stack_inputs(self.embed_codes(stack)[:, None], caches.spatial.length - 1)
        return self._run_cached(self.spatial_blocks, x, caches.spatial)

    @torch.no_grad()
    def depth_step(self, x: torch.Tensor, depth: int, caches: RQCaches) -> torch.Tensor:
        """Logits (B, K) of the code at `depth` of the current position. `x` (B, dim): at depth 0 the position's
        context (which restarts the depth cache), after it the sum of the embeddings of the codes below."""
        if depth == 0:
            caches.depth.length = 0
        h = self._run_cached(self.depth_blocks, (x + self.depth_position[depth])[:, None], caches.depth)
        return self.head(self.norm(h))

    # ---- features -------------------------------------------------------------------------------
    def stacks(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes as the Parquet rows hold them, (B, L * D) in raster order with depth innermost -> (B, L, D)."""
        return codes.reshape(codes.shape[0], self.settings.length, self.settings.code_depth)

    @torch.no_grad()
    def pooled_block_features(self, codes: torch.Tensor, blocks: list[int]) -> torch.Tensor:
        """Average-pooled features of spatial blocks over the image's positions, in one pass: (B, len(blocks),
        dim), for the linear probe. `codes`: (B, L, D) or flattened. The class slot holds the null class (the
        start token), so no label reaches the features."""
        stacks = self.stacks(codes)
        x = torch.cat([self._class_tokens(None, len(stacks), stacks.device),
                       self._stack_inputs(self.embed_codes(stacks), 0)], dim=1)
        wanted, pooled = set(blocks), {}
        for index in range(max(blocks) + 1):
            x = self.spatial_blocks[index](x)
            if index in wanted:
                pooled[index] = x[:, 1:].mean(1)
        return torch.stack([pooled[b] for b in blocks], 1)

    # ---- accounting -----------------------------------------------------------------------------
    def parameter_count(self, embeddings: bool = False) -> int:
        count = sum(p.numel() for p in self.parameters())
        if not embeddings:
            count -= self.token_embedding.weight.numel() + self.class_embedding.weight.numel()
            count -= self.position.numel() + self.class_position.numel() + self.depth_position.numel()
        return count

    def flops_per_token(self) -> float:
        """Training FLOPs per code (a token here is one code of a stack): the spatial transformer runs once per
        position, so its 6 N + attention is shared by the stack's D codes; the depth transformer and the head
        run once per code, attending over at most D slots."""
        size, settings = self.settings.shape, self.settings
        spatial = sum(p.numel() for p in self.spatial_blocks.parameters())
        per_position = 6 * spatial + 12 * size.spatial_layers * size.dim * settings.length
        per_code = 6 * (self.parameter_count() - spatial) + 12 * size.depth_layers * size.dim * settings.code_depth
        return per_position / settings.code_depth + per_code


def code_stack_loss(logits: torch.Tensor, codes: torch.Tensor,
                    targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy in nats per code (fp32 whatever the autocast dtype) and its mean per depth, (D,),
    detached, for the logs. With `targets` (B, L, D, K), the paper's soft labels (ResidualQuantizer.soft_codes),
    the cross-entropy against those distributions; else against `codes` (B, L, D)."""
    log_probs = logits.float().log_softmax(-1)
    if targets is None:
        nll = -log_probs.gather(-1, codes[..., None]).squeeze(-1)
    else:
        nll = -(targets.float() * log_probs).sum(-1)
    return nll.mean(), nll.detach().flatten(0, -2).mean(0)


@dataclass(frozen=True)
class RQSamplingSettings:
    """Temperature, top-k and top-p: one value for every depth, or a tuple with one per depth. Guidance as
    the VIM sampler's (pipeline/models/sampling.py): 1 is plain conditional sampling."""

    temperature: float | tuple[float, ...] = 1.0
    top_k: int | tuple[int, ...] = 0  # 0: off
    top_p: float | tuple[float, ...] = 1.0  # 1: off
    guidance_scale: float = 1.0

    def at_depth(self, depth: int, depths: int) -> SamplingSettings:
        def pick(value):
            if not isinstance(value, tuple):
                return value
            if len(value) != depths:
                raise ValueError(f"per-depth sampling settings need {depths} values, got {len(value)}: {value}")
            return value[depth]

        return SamplingSettings(pick(self.temperature), pick(self.top_k), pick(self.top_p), self.guidance_scale)


@torch.no_grad()
def sample_code_stacks(model: RQTransformer, labels: torch.Tensor | None, settings: RQSamplingSettings,
                       generator: torch.Generator, batch: int | None = None) -> torch.Tensor:
    """Code stacks (B, L, D) for the given labels (or `batch` unconditional samples), position by position and
    depth by depth through the two KV caches."""
    device = model.head.weight.device
    length, depths = model.settings.length, model.settings.code_depth
    count = len(labels) if labels is not None else batch
    labels_in, guided = conditioning_rows(labels, settings.guidance_scale, model.settings.label_dropout,
                                          model.settings.null_class, device)
    per_depth = [settings.at_depth(d, depths) for d in range(depths)]
    caches = model.new_caches(len(labels_in) if labels_in is not None else count, device)
    codes = torch.empty(count, length, depths, dtype=torch.long, device=device)
    with packed_weights(model):
        context = model.prefill(labels_in, caches)
        for position in range(length):
            x = context
            for depth in range(depths):
                logits = model.depth_step(x, depth, caches)
                if guided:  # conditional rows first, then the same rows with the null class
                    logits = guided_logits(logits[:count], logits[count:], settings.guidance_scale)
                probs = filter_logits(logits, per_depth[depth]).softmax(-1)
                code = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
                codes[:, position, depth] = code
                if depth + 1 < depths:  # the next depth reads the partial sum of this stack's embeddings
                    both = torch.cat([code, code]) if guided else code
                    embedded = model.embed_codes(both[:, None], depth)[:, 0]
                    x = embedded if depth == 0 else x + embedded
            if position + 1 < length:
                stack = codes[:, position]
                context = model.spatial_step(torch.cat([stack, stack]) if guided else stack, caches)
    return codes


def save_rq_transformer(model: RQTransformer, folder: str | Path) -> None:
    save_model(model, folder)


def load_rq_transformer(folder: str | Path, device: str | torch.device = "cpu") -> RQTransformer:
    """An RQ-Transformer from its two files, in eval mode."""
    return load_model(RQTransformer, RQTransformerSettings, folder, device)
