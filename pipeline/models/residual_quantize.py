"""Residual quantization (RQ-VAE, Lee et al., CVPR 2022): each position's latent is coded D times, each code the
one nearest to the residual the codes before it left, so a position becomes a stack of D codes (B, N, D).

    r_0 = z;  k_d = argmin_k ||r_d - e_k||;  r_{d+1} = r_d - e_{k_d};  z_hat_d = e_{k_0} + ... + e_{k_d}

The decoder gets z_hat_{D-1} through the straight-through estimator (the gradient of z_hat reaches z unchanged).
The commitment loss is the paper's cumulative one: beta x the mean over depths of ||z - sg(z_hat_d)||^2. With
`ema` the codebook moves by exponential moving averages of the residuals each code was picked for; without it,
a codebook loss pulls each picked code towards its residual, mean over depths of ||sg(r_d) - e_{k_d}||^2 (at
D = 1 both are the vector quantizer's). The paper's setup is ema with decay 0.99 and dead_code_threshold 1: a
code whose usage (the EMA, decay 0.99, of how often it is picked a step, i.e. the paper's EMA cluster size)
falls below 1 restarts at a random residual of the current batch.

The same interface and the same table, buffers and DDP handling as the vector quantizer (this class extends
it): the projections into the factorised lookup space, `codebook_init: data`, counts all-reduced and restarts
broadcast from rank 0. A shared codebook keeps the vector quantizer's state-dict keys and shapes (so at D = 1 one
loads the other); separate codebooks stack D books of `codebook_size` rows in that table, and a code is always
an index within its depth's book. `l2_normalize` normalises the latent only: the codes stay unnormalised, as the
residuals they code shrink with depth and unit-norm codes could not follow them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.models.quantize import QuantizerOutput, VectorQuantizer, _distributed, nearest_code, usage_and_perplexity
from pipeline.models.settings import QuantizerSettings, RQSettings


class ResidualQuantizer(VectorQuantizer):
    def __init__(self, dim: int, settings: QuantizerSettings, depth: int, shared_codebook: bool = True,
                 search_chunk_elements: int = 2**24):
        if depth < 1:
            raise ValueError(f"residual quantization needs at least one depth, got {depth}")
        super().__init__(dim, settings, search_chunk_elements, books=1 if shared_codebook else depth)
        self.depth, self.shared = depth, shared_codebook

    # ---- the table and its books ----------------------------------------------------------------
    def lookup_table(self) -> torch.Tensor:
        return self.codebook  # never normalised: see the module docstring

    def _offsets(self, depths: int, device) -> torch.Tensor:
        """Row of code 0 of each depth's book in the table: (depths,)."""
        if self.shared:
            return torch.zeros(depths, dtype=torch.long, device=device)
        return torch.arange(depths, device=device) * self.codebook_size

    def _book(self, table: torch.Tensor, depth: int) -> torch.Tensor:
        return depth_book(table, depth, self.codebook_size, self.shared)

    def _latent(self, z: torch.Tensor) -> torch.Tensor:
        latent = self.proj_in(z)
        return F.normalize(latent, dim=-1) if self.l2 else latent

    @torch.no_grad()
    def _search(self, flat: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy residual coding of `flat` (M, c): codes (M, D) and the residual each depth codes, (D, M, c)."""
        residual, table = flat.detach().float(), table.detach().float()
        codes, residuals = [], []
        for depth in range(self.depth):
            book = self._book(table, depth)
            residuals.append(residual)
            codes.append(nearest_code(residual, book, False, self.chunk))
            residual = residual - book[codes[-1]]
        return torch.stack(codes, 1), torch.stack(residuals)

    # ---- codes in and out -----------------------------------------------------------------------
    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Code stacks (..., d) -> the sum of their codes in the model dimension. d may be below D: the first d
        depths alone give the coarser reconstruction."""
        rows = codes + self._offsets(codes.shape[-1], codes.device)
        return self.proj_out(self.lookup_table()[rows].sum(-2))

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) -> code stacks (B, N, D), without losses or updates."""
        latent = self._latent(z)
        codes, _ = self._search(latent.reshape(-1, latent.shape[-1]), self.lookup_table())
        return codes.view(*latent.shape[:-1], self.depth)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        latent = self._latent(z)
        flat = latent.reshape(-1, latent.shape[-1])
        if self.training and bool(self.needs_data_init):
            self._init_from(flat.detach())
        table = self.lookup_table()
        codes, residuals = self._search(flat, table)
        rows = codes + self._offsets(self.depth, codes.device)
        chosen = table[rows]  # (M, D, c): e_{k_d}, with gradients to the codebook when it is learned
        partial = chosen.cumsum(1)  # z_hat_d
        commitment = torch.stack([F.mse_loss(flat, partial[:, d].detach()) for d in range(self.depth)]).mean()
        losses = {"commitment": self.beta * commitment}
        if not self.ema:
            losses["codebook"] = torch.stack([F.mse_loss(chosen[:, d], residuals[d]) for d in range(self.depth)]).mean()
        # One histogram, depth by depth over the codes of each book, serves the EMA, the usage and the stats.
        depth_counts = torch.bincount((codes + torch.arange(self.depth, device=codes.device) * self.codebook_size)
                                      .flatten(), minlength=self.depth * self.codebook_size).float()
        depth_counts = depth_counts.view(self.depth, self.codebook_size)
        local_counts = depth_counts.sum(0) if self.shared else depth_counts.flatten()
        restarted = 0
        if self.training:
            counts = self._reduced(local_counts)
            if self.ema:  # every depth's residuals at once, depth-major like `rows.t()`
                self._ema_update(residuals.flatten(0, 1), rows.t().flatten(), counts)
            restarted = self._track_usage(counts, residuals)
        final = partial[:, -1].view_as(latent)
        straight_through = latent + (final - latent).detach()
        stats = {**self._depth_stats(local_counts, depth_counts, flat.detach(), partial.detach()),
                 "restarted_codes": float(restarted)}
        return QuantizerOutput(codes.view(*latent.shape[:-1], self.depth), self.proj_out(straight_through),
                               losses, stats)

    @torch.no_grad()
    def soft_codes(self, z: torch.Tensor, temperature: float, stochastic: bool = True,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's soft labels for training the RQ-Transformer: at each depth the distribution
        softmax(-||r_d - e_k||^2 / temperature) over the depth's book, and the code stack that generated the
        residuals: codes sampled from those distributions (`stochastic`, the paper's stochastic sampling) or the
        nearest ones. Returns (targets (B, N, D, K), codes (B, N, D))."""
        latent = self._latent(z)
        books = [self._book(self.lookup_table().detach().float(), d) for d in range(self.depth)]
        targets, codes = soft_residual_codes(latent.reshape(-1, latent.shape[-1]), books, temperature, stochastic,
                                             generator)
        shape = (*latent.shape[:-1], self.depth)
        return targets.view(*shape, -1), codes.view(shape)

    # ---- codebook maintenance -------------------------------------------------------------------
    def _book_rows(self, depth: int) -> slice:
        """The table rows `codebook_init: data` fills from depth `depth`'s residuals: that depth's book, or of a
        shared codebook a D-th of it, so the first codes see the latents and the later ones the residuals."""
        if not self.shared:
            return slice(depth * self.codebook_size, (depth + 1) * self.codebook_size)
        edges = [round(d * self.codebook_size / self.depth) for d in range(self.depth + 1)]
        return slice(edges[depth], edges[depth + 1])

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor) -> None:
        """Seeds the table depth by depth: rows from the latents, then from what the codes so far leave of them
        (at D = 1 the vector quantizer's init, draw for draw)."""
        residual = flat.float()
        for depth in range(self.depth):
            rows = self._book_rows(depth)
            picks = residual[torch.randint(0, residual.shape[0], (rows.stop - rows.start,), device=flat.device)]
            picks = picks + 1e-3 * picks.std() * torch.randn_like(picks)  # duplicates must not tie forever
            if _distributed():
                dist.broadcast(picks, src=0)
            self.codebook.data[rows] = picks.to(self.codebook.dtype)
            if self.ema:
                self.ema_sum[rows] = picks
            if depth + 1 < self.depth and rows.stop > 0:
                # a shared book codes with the rows seeded so far; a separate one with its own
                book = self.codebook.data[:rows.stop] if self.shared else self.codebook.data[rows]
                residual = residual - book[nearest_code(residual, book.float(), False, self.chunk)].float()
        self.needs_data_init.fill_(False)

    @torch.no_grad()
    def _track_usage(self, counts: torch.Tensor, residuals: torch.Tensor) -> int:
        """As the vector quantizer's, with restarts at residuals: of any depth for a shared codebook, of its own
        depth for a separate one (so a code restarts at the scale it codes)."""
        self.usage.mul_(0.99).add_(counts, alpha=0.01)
        if self.dead_threshold <= 0:
            return 0
        dead = self.usage < self.dead_threshold
        if self.shared:
            return self._restart(dead, residuals.flatten(0, 1))
        restarted = 0
        for depth in range(self.depth):
            in_book = torch.zeros_like(dead)
            in_book[depth * self.codebook_size:(depth + 1) * self.codebook_size] = True
            restarted += self._restart(dead & in_book, residuals[depth])
        return restarted

    @torch.no_grad()
    def _depth_stats(self, counts: torch.Tensor, depth_counts: torch.Tensor, flat: torch.Tensor,
                     partial: torch.Tensor) -> dict[str, float]:
        """This rank's totals over the table (usage_batch, perplexity_batch, dead_codes, as the vector
        quantizer's), and per depth d: usage and perplexity of its codes over its book, and the quantization
        error mean ||z - z_hat_d||^2 per lookup channel."""
        usage, perplexity = usage_and_perplexity(counts)
        depth_usage, depth_perplexity = usage_and_perplexity(depth_counts)
        errors = (flat[:, None].float() - partial.float()).pow(2).mean((0, 2))
        dead = (self.usage < max(self.dead_threshold, 1e-3)).float().sum()
        # one device-to-host transfer for all of them
        values = torch.cat([torch.stack([usage, perplexity, dead]), depth_usage, depth_perplexity, errors]).tolist()
        names = ["usage_batch", "perplexity_batch", "dead_codes"]
        for kind in ("usage_batch", "perplexity_batch", "quantization_error"):
            names += [f"{kind}_depth{d}" for d in range(self.depth)]
        return dict(zip(names, values))


def depth_book(table: torch.Tensor, depth: int, codebook_size: int, shared: bool) -> torch.Tensor:
    """Depth `depth`'s codebook in the table: all of it when shared, else its own `codebook_size` rows."""
    return table if shared else table[depth * codebook_size:(depth + 1) * codebook_size]


@torch.no_grad()
def soft_residual_codes(latent: torch.Tensor, books: list[torch.Tensor], temperature: float, stochastic: bool,
                        generator: torch.Generator | None = None,
                        known: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual coding of `latent` (M, c) with soft labels: at depth d the distribution softmax(-||r_d - e_k||^2 /
    temperature) over `books[d]` (K, c), and the code taken from it: sampled (`stochastic`), else the `known`
    code (M, D) when given, else the nearest. Returns (targets (M, D, K), codes (M, D))."""
    if temperature <= 0:
        raise ValueError(f"soft labels need a temperature > 0, got {temperature}")
    residual = latent.float()
    targets, codes = [], []
    for book in books:
        book = book.float()
        # ||r||^2 is the same for every code of a row, so the softmax does without it
        distances = (book * book).sum(1)[None] - 2 * residual @ book.t()
        probs = (-distances / temperature).softmax(-1)
        if stochastic:  # drawn on the CPU generator's stream, so a seeded run draws the same on any device
            code = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(residual.device)
        else:
            code = known[:, len(codes)] if known is not None else distances.argmin(1)
        residual = residual - book[code]
        targets.append(probs)
        codes.append(code)
    return torch.stack(targets, 1), torch.stack(codes, 1)


class StoredStackLabels:
    """Soft labels for RQ-Transformer training from stored code stacks (the pretokenized Parquet rows), with the
    tokenizer's codebook. The latent the paper's labels start from is not stored, so it is taken as the sum of
    the stack's codes (the full-depth reconstruction, which leaves out the last depth's quantization error); the
    residuals follow from it exactly as `ResidualQuantizer.soft_codes` codes them."""

    def __init__(self, table: torch.Tensor, codebook_size: int, depth: int, shared: bool):
        self.table, self.size, self.depth, self.shared = table.float(), codebook_size, depth, shared

    def __call__(self, stacks: torch.Tensor, temperature: float, stochastic: bool,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacks (B, L, D) -> (targets (B, L, D, K), the stacks the targets go with): resampled depth by depth
        when `stochastic`; else the stored ones, each depth's target taken at the residual they leave."""
        books = [depth_book(self.table, d, self.size, self.shared) for d in range(self.depth)]
        rows = stacks.reshape(-1, self.depth).to(self.table.device)
        latent = sum(book[rows[:, d]] for d, book in enumerate(books))
        targets, codes = soft_residual_codes(latent, books, temperature, stochastic, generator, known=rows)
        return targets.view(*stacks.shape, -1), codes.view(stacks.shape)


def make_quantizer(dim: int, settings: QuantizerSettings, rq: RQSettings) -> VectorQuantizer:
    """The tokenizer's quantizer: the vector quantizer, or residual quantization when `rq.quantizer` is rq."""
    if rq.quantizer == "rq":
        return ResidualQuantizer(dim, settings, rq.rq_depth, rq.rq_shared_codebook)
    return VectorQuantizer(dim, settings)
