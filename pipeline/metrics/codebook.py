"""Codebook statistics over a split: usage the paper's way, whole-split usage, perplexity, dead codes."""
from __future__ import annotations

import numpy as np


class CodebookUsage:
    """Accumulates codes image by image.

    `usage_per_256`: the paper's measure (Table 4): the fraction of the codebook used within each batch of
    256 images, averaged over batches (a final partial batch counts only if it is the only one).
    `usage_split`: fraction of codes used anywhere in the split. `perplexity`: exp(entropy) of the
    split's code histogram. `dead_codes`: codes never used in the split.
    """

    def __init__(self, codebook_size: int, images_per_batch: int = 256):
        self.size, self.per_batch = codebook_size, images_per_batch
        self.histogram = np.zeros(codebook_size, np.int64)
        self._batch = np.zeros(codebook_size, bool)
        self._in_batch = 0
        self._batch_usages: list[float] = []
        self._partial: float | None = None

    def update(self, codes: np.ndarray) -> None:
        """codes: (images, tokens) integers."""
        codes = np.asarray(codes).reshape(len(codes), -1)
        self.histogram += np.bincount(codes.ravel(), minlength=self.size)
        for image in codes:
            self._batch[image] = True
            self._in_batch += 1
            if self._in_batch == self.per_batch:
                self._batch_usages.append(float(self._batch.mean()))
                self._batch[:] = False
                self._in_batch = 0

    def result(self) -> dict[str, float]:
        usages = list(self._batch_usages)
        if not usages and self._in_batch:
            usages.append(float(self._batch.mean()))
        total = self.histogram.sum()
        probs = self.histogram[self.histogram > 0] / max(total, 1)
        return {"usage_per_256": float(np.mean(usages)) if usages else 0.0,
                "usage_split": float((self.histogram > 0).mean()),
                "perplexity": float(np.exp(-(probs * np.log(probs)).sum())) if total else 0.0,
                "dead_codes": float((self.histogram == 0).sum())}


class CodeStackUsage:
    """`CodebookUsage` for code stacks (residual quantization, (images, ..., depth)): the figures over the whole
    table, and per depth `<name>_depth<d>` over that depth's codes. A shared codebook is one table of
    `codebook_size`; separate ones are `depth` tables, so the whole-table figures count `depth x codebook_size`
    codes. Plain codes (depth 1) give just the whole-table figures."""

    def __init__(self, codebook_size: int, depth: int = 1, shared: bool = True, images_per_batch: int = 256):
        self.depth, self.shared, self.size = depth, shared, codebook_size
        self.table = CodebookUsage(codebook_size * (1 if shared else depth), images_per_batch)
        self.depths = [CodebookUsage(codebook_size, images_per_batch) for _ in range(depth)] if depth > 1 else []

    def add_counts(self, by_depth: np.ndarray) -> None:
        """Code counts gathered elsewhere, (depth, codebook_size): they add to the whole-split figures
        (usage_split, perplexity, dead_codes), not to the per-256 ones, which need the images."""
        by_depth = np.asarray(by_depth, np.int64).reshape(self.depth, self.size)
        self.table.histogram += by_depth.sum(0) if self.shared else by_depth.ravel()
        for depth, usage in enumerate(self.depths):
            usage.histogram += by_depth[depth]

    def update(self, codes: np.ndarray) -> None:
        codes = np.asarray(codes).reshape(len(codes), -1, self.depth)
        offsets = 0 if self.shared else np.arange(self.depth) * self.size
        self.table.update(codes + offsets)
        for depth, usage in enumerate(self.depths):
            usage.update(codes[..., depth])

    def result(self) -> dict[str, float]:
        figures = self.table.result()
        for depth, usage in enumerate(self.depths):
            figures.update({f"{name}_depth{depth}": value for name, value in usage.result().items()})
        return figures
