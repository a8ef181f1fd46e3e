"""Vector quantizers behind one interface: `quantizer(z) -> QuantizerOutput(codes, quantized, losses, stats)`.

The paper's quantizer: a linear projection to a low-dimensional lookup space, l2-normalised
inputs and codes, a normally initialised codebook, beta = 0.25, straight-through through the normalised
latent, and a projection back up. Turning `codebook_dim` off and `l2_normalize` off gives plain VQ, the
paper's ablation baseline. EMA codebook updates and dead-code restarts are options; under DDP their
statistics are all-reduced and restarts come from rank 0, so every rank keeps the same codebook.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.models.cpu_linear import Linear
from pipeline.models.settings import QuantizerSettings


@dataclass
class QuantizerOutput:
    codes: torch.Tensor  # (B, N) int64; residual quantization: (B, N, D)
    quantized: torch.Tensor  # (B, N, dim), straight-through, back in the model dimension
    losses: dict[str, torch.Tensor]
    stats: dict[str, float]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, cosine: bool, max_elements: int = 2**24) -> torch.Tensor:
    """Index of the nearest codebook row for each row of z, scoring at most `max_elements` pairs at once."""
    rows = max(1, max_elements // codebook.shape[0])
    codebook_sq = None if cosine else (codebook * codebook).sum(1)
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    for start in range(0, z.shape[0], rows):
        chunk = z[start:start + rows]
        scores = chunk @ codebook.t()  # cosine: maximise similarity; else minimise ||z||^2 - 2 z.c + ||c||^2
        if cosine:
            out[start:start + rows] = scores.argmax(1)
        else:
            out[start:start + rows] = (codebook_sq[None] - 2 * scores).argmin(1)
    return out


def usage_and_perplexity(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From code counts (..., K): the fraction of codes used and the perplexity of their distribution."""
    probs = counts / counts.sum(-1, keepdim=True)
    entropy = -torch.xlogy(probs, probs).sum(-1)  # 0 log 0 = 0, without boolean indexing
    return (counts > 0).float().mean(-1), entropy.exp()


class VectorQuantizer(nn.Module):
    def __init__(self, dim: int, settings: QuantizerSettings, search_chunk_elements: int = 2**24, books: int = 1):
        """`books`: independent codebooks of `codebook_size` codes stacked in one table (residual quantization's
        per-depth codebooks, pipeline/models/residual_quantize.py); the vector quantizer has one."""
        super().__init__()
        self.settings = settings
        codebook_size, codebook_dim = settings.codebook_size, settings.codebook_dim
        rows = books * codebook_size
        self.codebook_size, self.beta, self.l2 = codebook_size, settings.beta, settings.l2_normalize
        self.ema, self.ema_decay, self.dead_threshold = settings.ema, settings.ema_decay, settings.dead_code_threshold
        self.chunk = search_chunk_elements
        lookup_dim = codebook_dim or dim
        # No bias: a learnable offset can swamp small encoder outputs and drag every latent onto one code.
        self.proj_in = Linear(dim, lookup_dim, bias=False) if codebook_dim else nn.Identity()
        self.proj_out = Linear(lookup_dim, dim) if codebook_dim else nn.Identity()
        self.codebook = nn.Parameter(torch.randn(rows, lookup_dim), requires_grad=not self.ema)
        # Usage counts (EMA of how often each code is picked) drive dead-code restarts and the stats.
        self.register_buffer("usage", torch.ones(rows))
        # codebook_init="data": the first training batch's latents seed the codebook (instead of the paper's
        # normal init), which avoids the early collapse onto a handful of codes in small, short runs.
        self.register_buffer("needs_data_init", torch.tensor(settings.codebook_init == "data"))
        if self.ema:
            self.register_buffer("ema_count", torch.ones(rows))
            self.register_buffer("ema_sum", self.codebook.detach().clone())

    def lookup_table(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=-1) if self.l2 else self.codebook

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (...,) -> their vectors in the model dimension (what the decoder receives)."""
        return self.proj_out(self.lookup_table()[codes])

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) -> codes (B, N), without losses or updates."""
        latent = self.proj_in(z)
        latent = F.normalize(latent, dim=-1) if self.l2 else latent
        flat = latent.reshape(-1, latent.shape[-1])
        return nearest_code(flat, self.lookup_table(), self.l2, self.chunk).view(latent.shape[:-1])

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        latent = self.proj_in(z)
        latent = F.normalize(latent, dim=-1) if self.l2 else latent
        flat = latent.reshape(-1, latent.shape[-1])
        if self.training and bool(self.needs_data_init):
            self._init_from(flat.detach())
        table = self.lookup_table()
        with torch.no_grad():
            codes = nearest_code(flat.detach().float(), table.detach().float(), self.l2, self.chunk)
        chosen = table[codes].view_as(latent)
        commitment = F.mse_loss(latent, chosen.detach())
        losses = {"commitment": self.beta * commitment}
        if not self.ema:
            losses["codebook"] = F.mse_loss(chosen, latent.detach())
        # One local histogram serves the EMA, the usage counts and the stats.
        local_counts = torch.bincount(codes, minlength=self.codebook_size).float()
        restarted = 0
        if self.training:
            counts = self._reduced(local_counts)
            if self.ema:
                self._ema_update(flat.detach(), codes, counts)
            restarted = self._track_usage(counts, flat.detach())
        straight_through = latent + (chosen - latent).detach()
        stats = {**self._batch_stats(local_counts), "restarted_codes": float(restarted)}
        return QuantizerOutput(codes.view(latent.shape[:-1]), self.proj_out(straight_through), losses, stats)

    # ---- codebook maintenance -------------------------------------------------------------------
    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor) -> None:
        picks = flat[torch.randint(0, flat.shape[0], (self.codebook_size,), device=flat.device)].float()
        picks = picks + 1e-3 * picks.std() * torch.randn_like(picks)  # duplicates must not tie forever
        if _distributed():
            dist.broadcast(picks, src=0)
        self.codebook.data.copy_(picks)
        if self.ema:
            self.ema_sum.copy_(picks)
        self.needs_data_init.fill_(False)

    @torch.no_grad()
    def _reduced(self, local_counts: torch.Tensor) -> torch.Tensor:
        """This step's code counts over all ranks (the local ones when not distributed)."""
        if not _distributed():
            return local_counts
        counts = local_counts.clone()
        dist.all_reduce(counts)
        return counts

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        sums = torch.zeros_like(self.ema_sum).index_add_(0, codes, flat.float())
        if _distributed():
            dist.all_reduce(sums)
        self.ema_count.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
        self.ema_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (total + self.ema_count.numel() * 1e-5) * total  # Laplace smoothing
        self.codebook.data.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def _track_usage(self, counts: torch.Tensor, flat: torch.Tensor) -> int:
        """Updates the usage counts with this step's (all-rank) `counts` and restarts the codes that fell
        below the threshold; returns how many."""
        self.usage.mul_(0.99).add_(counts, alpha=0.01)
        if self.dead_threshold <= 0:
            return 0
        return self._restart(self.usage < self.dead_threshold, flat)

    @torch.no_grad()
    def _restart(self, dead: torch.Tensor, flat: torch.Tensor) -> int:
        """Restarts the codes marked in `dead` at random rows of `flat`; returns how many."""
        count = int(dead.sum())
        if count == 0:
            return 0
        # Restart dead codes at random current latents, chosen on rank 0 and broadcast to all ranks.
        picks = flat[torch.randint(0, flat.shape[0], (count,), device=flat.device)].float()
        if _distributed():
            dist.broadcast(picks, src=0)
        self.codebook.data[dead] = picks.to(self.codebook.dtype)
        self.usage[dead] = self.dead_threshold * 2  # grace period before it can be declared dead again
        if self.ema:
            self.ema_sum[dead] = picks
            self.ema_count[dead] = 1.0
        return count

    @torch.no_grad()
    def _batch_stats(self, counts: torch.Tensor) -> dict[str, float]:
        """From this rank's code `counts`. `dead_codes`: codes below the usage threshold after this step's
        restarts."""
        usage, perplexity = usage_and_perplexity(counts)
        # One device-to-host transfer for all three (each float() would be a sync on an accelerator).
        values = torch.stack([usage, perplexity,
                              (self.usage < max(self.dead_threshold, 1e-3)).float().sum()]).tolist()
        return dict(zip(("usage_batch", "perplexity_batch", "dead_codes"), values))
